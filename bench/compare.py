r"""Side by side with DALLE2-pytorch 1.15.6 on this machine, in one run: prints the ratios.

  python bench/compare.py                 # everything -> bench/results/compare_cpu.json
  python bench/compare.py --only decoder_s,prior_s --no_sampling

Needs the peer's own virtual environment (kept out of the project's dependencies and CI):

  python3 -m venv /work/d2pt
  /work/d2pt/bin/pip install torch==2.14.1 torchvision==0.29.1 dalle2-pytorch==1.15.6

(or --peer_python PATH). For every matched config of bench/matched.py it runs our side
(bench/train_step.py / bench/sampling.py, in the project's python) and then theirs
(bench/peer_dalle2_pytorch.py, in the peer's python), each config in a fresh process, one
after the other on the same machine, and reports:

  training  step time (median after warm-up), examples/s, parameter counts, model FLOP/s
            and MFU (ours: analytic FLOPs; theirs: torch's FlopCounterMode count), peak RSS;
            speedup = their step time / ours
  sampling  latency of one batch through prior -> decoder -> upsampler(s) at the same step
            counts, guidance and candidates; speedup = their latency / ours

MFU is against the larger of the two f32 matmul peaks measured here (jax and torch, 2048^3).
Targets (issue 8): training throughput >= 1.5x theirs for the decoder and the prior,
sampling >= 2x faster at equal step counts.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from bench import matched  # pylint: disable=g-import-not-at-top,wrong-import-position
from bench import sampling as sampling_bench  # pylint: disable=g-import-not-at-top,wrong-import-position
from bench import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'peer_dalle2_pytorch.py')
TRAIN_TARGET = 1.5
SAMPLING_TARGET = 2.0


def run_peer(python: str, configs: list[dict], threads: int, matmul_peak: bool = False,
             timeout: float = 3600) -> list[dict]:
  """Runs the peer script on `configs` (each in its own process); returns its JSON lines."""
  outs = []
  groups = [[c] for c in configs] or [[]]
  for group in groups:
    with tempfile.NamedTemporaryFile('w', suffix='.json', delete=False) as f:
      json.dump(dict(threads=threads, configs=group), f)
      spec = f.name
    cmd = common.pin_prefix() + [python, PEER, '--spec', spec] + (
        ['--matmul_peak'] if matmul_peak else [])
    # Run from a neutral directory: the peer's package name must not resolve to a local path.
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       cwd=tempfile.gettempdir(), env=dict(os.environ, TQDM_DISABLE='1'))
    os.unlink(spec)
    lines = [json.loads(l) for l in p.stdout.splitlines() if l.startswith('{')]
    if p.returncode:
      lines.append(dict(name=group[0]['name'] if group else '', error=p.stderr[-3000:]))
    outs.extend(lines)
  return outs


def _pct(a, b):
  return 100.0 * (b - a) / a if a else float('nan')


def train_row(ours: dict, peer: dict, peak: float) -> dict:
  pt = peer.get('train', {})
  row = dict(name=ours.get('name'), kind=ours.get('kind'), batch=ours.get('batch'))
  if 'error' in ours or 'error' in peer or not pt:
    row['error'] = ours.get('error') or peer.get('error') or 'no peer train result'
    return row
  row.update(
      ours_params=ours['params'], peer_params=peer['params'],
      params_diff_pct=_pct(ours['params'], peer['params']),
      ours_step_s=ours['step_time_s'], peer_step_s=pt['step_time_s'],
      ours_examples_per_s=ours['examples_per_s'], peer_examples_per_s=pt['examples_per_s'],
      speedup=pt['step_time_s'] / ours['step_time_s'],
      ours_flops_per_step=ours['flops_per_step'],
      ours_xla_flops_per_step=ours.get('xla_cost_analysis_flops_per_step'),
      peer_counted_flops_per_step=pt['counted_train_flops_per_step'],
      ours_achieved_flops_per_s=ours['achieved_flops_per_s'],
      peer_achieved_flops_per_s=pt['achieved_flops_per_s'],
      ours_mfu=ours['achieved_flops_per_s'] / peak, peer_mfu=pt['achieved_flops_per_s'] / peak,
      ours_compile_s=ours['compile_s'], peer_first_step_s=pt['first_step_s'],
      ours_peak_rss_mb=ours['peak_rss_mb'], peer_peak_rss_mb=peer['peak_rss_mb'],
      ours_step_iqr_s=ours['step_time_iqr_s'], peer_step_iqr_s=pt['step_time_iqr_s'],
      custom_conv_grad=ours.get('custom_conv_grad'), ours_devices=ours.get('devices', 1))
  return row


def sampling_row(ours: dict, peer: dict) -> dict:
  ps = peer.get('sample', {})
  row = dict(name=ours.get('name'), preset=ours.get('preset'), batch=ours.get('batch'))
  if 'error' in ours or 'error' in peer or not ps:
    row['error'] = ours.get('error') or peer.get('error') or 'no peer sampling result'
    return row
  row.update(
      steps=ours['steps'], peer_model_calls=ps['model_calls'],
      ours_latency_s=ours['latency_s'], peer_latency_s=ps['latency_s'],
      ours_images_per_s=ours['images_per_s'], peer_images_per_s=ps['images_per_s'],
      speedup=ps['latency_s'] / ours['latency_s'], ours_compile_s=ours['compile_s'],
      ours_first_call_s=ours['first_call_s'], peer_first_run_s=ps['first_run_s'],
      ours_params=ours['params'], peer_params=ps['params'],
      ours_peak_rss_mb=ours['peak_rss_mb'], peer_peak_rss_mb=peer['peak_rss_mb'])
  return row


def print_tables(train_rows, sample_rows):
  if train_rows:
    print('\nTraining step (median after warm-up; speedup = DALLE2-pytorch step time / ours)')
    hdr = (f'{"config":20s} {"batch":>5s} {"params ours/theirs (diff)":>28s} '
           f'{"ours":>9s} {"theirs":>9s} {"ex/s ours":>9s} {"ex/s thr":>9s} {"speedup":>8s} '
           f'{"MFU ours":>8s} {"MFU thr":>8s} {"compile":>8s}')
    print(hdr)
    print('-' * len(hdr))
    for r in train_rows:
      if 'error' in r:
        print(f'{r["name"]:20s} ERROR: {r["error"][-200:]}')
        continue
      params = (f'{r["ours_params"] / 1e6:.2f}M/{r["peer_params"] / 1e6:.2f}M '
                f'({r["params_diff_pct"]:+.1f}%)')
      print(f'{r["name"]:20s} {r["batch"]:5d} {params:>28s} {common.fmt_s(r["ours_step_s"]):>9s} '
            f'{common.fmt_s(r["peer_step_s"]):>9s} {r["ours_examples_per_s"]:9.2f} '
            f'{r["peer_examples_per_s"]:9.2f} {r["speedup"]:7.2f}x '
            f'{100 * r["ours_mfu"]:7.1f}% {100 * r["peer_mfu"]:7.1f}% '
            f'{r["ours_compile_s"]:7.1f}s')
  if sample_rows:
    print('\nSampling, one batch text -> image (speedup = DALLE2-pytorch latency / ours)')
    hdr = (f'{"config":16s} {"steps":>14s} {"batch":>5s} {"ours":>9s} {"theirs":>9s} '
           f'{"img/s ours":>10s} {"img/s thr":>10s} {"speedup":>8s} {"compile":>8s}')
    print(hdr)
    print('-' * len(hdr))
    for r in sample_rows:
      if 'error' in r:
        print(f'{r["name"]:16s} ERROR: {r["error"][-200:]}')
        continue
      print(f'{r["name"]:16s} {"/".join(map(str, r["steps"])):>14s} {r["batch"]:5d} '
            f'{common.fmt_s(r["ours_latency_s"]):>9s} {common.fmt_s(r["peer_latency_s"]):>9s} '
            f'{r["ours_images_per_s"]:10.3f} {r["peer_images_per_s"]:10.3f} '
            f'{r["speedup"]:7.2f}x {r["ours_compile_s"]:7.1f}s')


def targets(train_rows, sample_rows) -> dict:
  out = {}
  for r in train_rows:
    if r.get('kind') in ('decoder', 'prior'):
      out[r['name']] = dict(target=f'>= {TRAIN_TARGET}x training throughput',
                            speedup=r.get('speedup'),
                            met=bool(r.get('speedup') and r['speedup'] >= TRAIN_TARGET))
  for r in sample_rows:
    out[r['name']] = dict(target=f'>= {SAMPLING_TARGET}x faster sampling',
                          speedup=r.get('speedup'),
                          met=bool(r.get('speedup') and r['speedup'] >= SAMPLING_TARGET))
  return out


def main():
  ap = argparse.ArgumentParser(description='Side-by-side benchmark (see module docstring).')
  ap.add_argument('--only', default='', help='training configs (bench/matched.CONFIGS)')
  ap.add_argument('--sampling', default='', help='sampling configs (bench/matched.SAMPLING)')
  ap.add_argument('--no_sampling', action='store_true')
  ap.add_argument('--no_train', action='store_true')
  ap.add_argument('--steps', type=int, default=0, help='override the timed steps of every config')
  ap.add_argument('--peer_python', default='/work/d2pt/bin/python')
  ap.add_argument('--threads', type=int, default=os.cpu_count() or 2,
                  help='torch intra-op threads (XLA uses every core)')
  ap.add_argument('--pin_core', default='',
                  help='run both sides on this one core (taskset; torch 1 thread): a check '
                       'that is less sensitive to other load on the machine')
  ap.add_argument('--cpu_devices', type=matched.cpu_devices_arg, default='auto',
                  help='our training steps data parallel over this many CPU devices '
                       '(num_cpu_devices); auto = bench/matched.py CPU_DEVICES by kind: 1 '
                       'for the prior, 2 for the UNets')
  ap.add_argument('--out', default='compare_cpu.json', help='file name in bench/results/')
  a = ap.parse_args()
  if a.pin_core:
    os.environ['BENCH_PIN_CORE'] = a.pin_core
    a.threads = 1
  if not os.path.exists(a.peer_python):
    sys.exit(f'No peer python at {a.peer_python}: create the venv (see the module docstring) '
             'or pass --peer_python.')
  train_names = [] if a.no_train else (
      [n for n in a.only.split(',') if n] or
      matched.TRAIN_STEP_CONFIGS + matched.CONV_GRAD_CONFIGS)
  sample_names = [] if a.no_sampling else (
      [n for n in a.sampling.split(',') if n] or matched.CPU_SAMPLING)
  for n in train_names:
    if n not in matched.CONFIGS:
      sys.exit(f'unknown training config {n!r}; known: {sorted(matched.CONFIGS)}')
  for n in sample_names:
    if n not in matched.SAMPLING:
      sys.exit(f'unknown sampling config {n!r}; known: {sorted(matched.SAMPLING)}')

  t_start = time.time()
  load_before = common.load_snapshot()
  jax_peak = common.matmul_peak_jax() if not a.pin_core else train_step.matmul_peak_subprocess()
  peer_env = run_peer(a.peer_python, [], a.threads, matmul_peak=True)
  torch_peak = peer_env[0].get('matmul_peak_flops_per_s', 0.0) if peer_env else 0.0
  peak = max(jax_peak, torch_peak)
  print(f'f32 matmul peak: jax {jax_peak / 1e9:.1f} GFLOP/s, torch {torch_peak / 1e9:.1f} '
        f'GFLOP/s; load {load_before["loadavg_1_5_15"]}', flush=True)

  train_rows, raw = [], dict(ours_train=[], peer_train=[], ours_sampling=[], peer_sampling=[])
  sample_rows = []

  def save(done: bool):
    return common.write_json(a.out, dict(
        benchmark='compare_dalle2_pytorch', complete=done,
        command='python bench/compare.py ' + ' '.join(sys.argv[1:]),
        env=dict(ours=common.jax_environment(),
                 peer=(peer_env[0].get('env') if peer_env else None)),
        matmul_peak_f32_flops_per_s=dict(jax=jax_peak, torch=torch_peak, used=peak),
        load_before=load_before, load_after=common.load_snapshot(),
        wall_s=time.time() - t_start, train=train_rows, sampling=sample_rows,
        targets=targets(train_rows, sample_rows), raw=raw))
  peer_cache = {}   # the conv-gradient pair shares one peer config: measure it once
  for n in train_names:
    spec = matched.CONFIGS[n]
    steps = a.steps or spec['steps']
    ours = train_step.run_in_subprocess(n, steps, spec['warmup'], peak=peak,
                                        cpu_devices=matched.cpu_devices(n, a.cpu_devices))
    pconf = dict(spec['peer'], train=dict(steps=steps, warmup=spec['warmup']))
    key = json.dumps({k: v for k, v in pconf.items() if k != 'name'}, sort_keys=True)
    if key not in peer_cache:
      peer = run_peer(a.peer_python, [pconf], a.threads)
      peer_cache[key] = [p for p in peer if p.get('name') == n] or [
          dict(name=n, error='no output')]
    peer = [dict(p, name=n) for p in peer_cache[key]]
    raw['ours_train'].append(ours)
    raw['peer_train'].append(peer[-1])
    row = train_row(ours, peer[-1], peak)
    train_rows.append(row)
    if 'error' in row:
      print(f'{n}: ERROR {row["error"][-1500:]}', flush=True)
    else:
      print(f'{n}: ours {common.fmt_s(row["ours_step_s"])}, theirs '
            f'{common.fmt_s(row["peer_step_s"])}: {row["speedup"]:.2f}x', flush=True)
    save(False)

  for n in sample_names:
    spec = matched.SAMPLING[n]
    ours = sampling_bench.run_in_subprocess(n, repeats=spec.get('repeats', 2))
    peer = run_peer(a.peer_python, [spec['peer']], a.threads)
    peer = [p for p in peer if p.get('name') == n] or [dict(name=n, error='no output')]
    raw['ours_sampling'].append(ours)
    raw['peer_sampling'].append(peer[-1])
    row = sampling_row(ours, peer[-1])
    sample_rows.append(row)
    if 'error' in row:
      print(f'{n}: ERROR {row["error"][-1500:]}', flush=True)
    else:
      print(f'{n}: ours {common.fmt_s(row["ours_latency_s"])}, theirs '
            f'{common.fmt_s(row["peer_latency_s"])}: {row["speedup"]:.2f}x', flush=True)
    save(False)

  print_tables(train_rows, sample_rows)
  tgt = targets(train_rows, sample_rows)
  print('\nTargets:')
  for k, v in tgt.items():
    sp = f'{v["speedup"]:.2f}x' if v['speedup'] else 'n/a'
    print(f'  {k:20s} {v["target"]:34s} {sp:>8s}  {"MET" if v["met"] else "NOT MET"}')
  path = save(True)
  print('wrote', path)


if __name__ == '__main__':
  main()
