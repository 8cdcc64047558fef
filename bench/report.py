r"""Markdown tables of the recorded results (what README.md's Performance section shows).

  python bench/report.py                     # from bench/results/compare_cpu.json
  python bench/report.py --results PATH
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def _m(x):
  return f'{x / 1e6:.2f}M'


def merge(results: list[dict]) -> dict:
  """Several compare runs as one: rows by config name (later runs win)."""
  out = dict(results[-1])
  train, sampling, targets = {}, {}, {}
  for r in results:
    train.update({t['name']: t for t in r.get('train', [])})
    sampling.update({s['name']: s for s in r.get('sampling', [])})
    targets.update(r.get('targets', {}))
  out.update(train=list(train.values()), sampling=list(sampling.values()), targets=targets,
             runs=results)
  return out


def machine_line(r: dict) -> str:
  env = r['env']['ours']
  peer = r['env'].get('peer') or {}
  peak = r['matmul_peak_f32_flops_per_s']
  names = ', '.join([t['name'] for t in r.get('train', [])] +
                    [s['name'] for s in r.get('sampling', [])])
  rows = [t for t in r.get('train', []) if 'error' not in t]
  by_count = {}
  for t in rows:
    by_count.setdefault(t.get('ours_devices', 1), []).append(t['name'])
  ours_on = (' Our training steps on CPU devices (data parallel): ' + '; '.join(
      f'{n}: {", ".join(names)}' for n, names in sorted(by_count.items())) + '.'
             if by_count else '')
  return (f'Run `{r.get("command", "")}` ({names}): {env["cpu"]}, {env["cpu_count"]} cores; '
          f'jax {env["jax"]}, flax {env["flax"]}; DALLE2-pytorch {peer.get("dalle2_pytorch")} '
          f'on torch {peer.get("torch")} ({peer.get("threads")} threads). f32 matmul peak: jax '
          f'{peak["jax"] / 1e9:.0f} GFLOP/s, torch {peak["torch"] / 1e9:.0f} GFLOP/s (MFU uses '
          f'{peak["used"] / 1e9:.0f}). Load average (1, 5, 15 min) before / after: '
          f'{", ".join(f"{x:.1f}" for x in r["load_before"]["loadavg_1_5_15"])} / '
          f'{", ".join(f"{x:.1f}" for x in r["load_after"]["loadavg_1_5_15"])}. '
          f'Recorded {r.get("written_at", "")} at commit {env.get("git_commit", "")}'
          f'{"" if r.get("complete", True) else " (stopped before the end)"}.{ours_on}')


def render(r: dict) -> str:
  runs = r.get('runs', [r])
  return '\n\n'.join(machine_line(x) for x in runs) + '\n\n' + render_tables(r)


def render_tables(r: dict) -> str:
  lines = []
  train = [t for t in r['train'] if t.get('kind') != 'unet']
  unet = [t for t in r['train'] if t.get('kind') == 'unet']
  if train:
    lines += ['Training step (median after warm-up; compile time apart; speedup = their step '
              'time / ours):', '',
              '| config | batch | params ours / theirs | step ours | step theirs | examples/s '
              'ours / theirs | speedup | model TFLOP/step (x3 fwd) | MFU ours / theirs | '
              'compile ours | peak RSS ours / theirs |',
              '|---|---|---|---|---|---|---|---|---|---|---|']
    for t in train:
      if 'error' in t:
        lines.append(f'| {t["name"]} | error | | | | | | | | | |')
        continue
      lines.append(
          f'| {t["name"]} | {t["batch"]} | {_m(t["ours_params"])} / {_m(t["peer_params"])} '
          f'({t["params_diff_pct"]:+.1f}%) | {common.fmt_s(t["ours_step_s"])} | '
          f'{common.fmt_s(t["peer_step_s"])} | {t["ours_examples_per_s"]:.1f} / '
          f'{t["peer_examples_per_s"]:.1f} | **{t["speedup"]:.2f}x** | '
          f'{t["ours_flops_per_step"] / 1e12:.3f} / {t["peer_counted_flops_per_step"] / 1e12:.3f} | '
          f'{100 * t["ours_mfu"]:.0f}% / {100 * t["peer_mfu"]:.0f}% | '
          f'{t["ours_compile_s"]:.0f} s | {t["ours_peak_rss_mb"]:.0f} / '
          f'{t["peer_peak_rss_mb"]:.0f} MB |')
    lines.append('')
  if unet:
    lines += ['CPU convolution gradient: the decoder UNet alone (eps MSE, decoder_s sizes), '
              "XLA's own gradient vs the custom one (`model.custom_conv_grad`), beside "
              "DALLE2-pytorch's Unet:", '',
              '| gradient | step ours | step theirs | speedup | compile ours |',
              '|---|---|---|---|---|']
    for t in unet:
      if 'error' in t:
        lines.append(f'| {t["name"]} | error | | | |')
        continue
      kind = 'custom' if t.get('custom_conv_grad') else 'XLA autodiff'
      lines.append(f'| {kind} | {common.fmt_s(t["ours_step_s"])} | '
                   f'{common.fmt_s(t["peer_step_s"])} | {t["speedup"]:.2f}x | '
                   f'{t["ours_compile_s"]:.0f} s |')
    lines.append('')
  if r.get('sampling'):
    lines += ['Sampling, one batch text -> image through prior (2 candidates) -> decoder -> '
              'upsampler(s), guidance 4 (prior) / 3 (decoder), equal network calls:', '',
              '| preset | steps | batch | latency ours | latency theirs | images/s ours / theirs '
              '| speedup | compile ours |', '|---|---|---|---|---|---|---|---|']
    for s in r['sampling']:
      if 'error' in s:
        lines.append(f'| {s["name"]} | error | | | | | | |')
        continue
      lines.append(
          f'| {s["preset"]} | {"/".join(map(str, s["steps"]))} | {s["batch"]} | '
          f'{common.fmt_s(s["ours_latency_s"])} | {common.fmt_s(s["peer_latency_s"])} | '
          f'{s["ours_images_per_s"]:.3f} / {s["peer_images_per_s"]:.3f} | '
          f'**{s["speedup"]:.2f}x** | {s["ours_compile_s"]:.0f} s |')
    lines.append('')
  if r.get('targets'):
    met = [k for k, v in r['targets'].items() if v['met']]
    unmet = [k for k, v in r['targets'].items() if not v['met']]
    lines.append(f'Targets met: {", ".join(met) or "none"}; not met: {", ".join(unmet) or "none"}.')
  return '\n'.join(lines)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--results', default=os.path.join(common.RESULTS_DIR, 'compare_cpu.json'),
                  help='a compare.py JSON file, or several, comma-separated (merged)')
  a = ap.parse_args()
  results = []
  for path in a.results.split(','):
    with open(path) as f:
      results.append(json.load(f))
  print(render(results[0] if len(results) == 1 else merge(results)))


if __name__ == '__main__':
  main()
