r"""XLA:CPU library-path flags on our side only: the training step and sampling latency with
each XLA_FLAGS setting, side by side (one fresh process per setting and config, since XLA
reads its flags once per process).

  python bench/xla_flags.py                  # -> bench/results/xla_flags_cpu.json
  python bench/xla_flags.py --train decoder_s --sampling pipeline_fast \
      --flags=";--xla_cpu_experimental_ynn_fusion_type=-reduce"

The settings are XLA's CPU library fusions (YNNPACK, XNNPACK, oneDNN) that decide which
convolutions, matmuls, elementwise ops and reductions leave XLA's own emitters. Run it on an
idle machine: every figure is a median over steps, but a busy core moves them all.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # pylint: disable=g-import-not-at-top,wrong-import-position

DEFAULT_FLAGS = [
    '',
    '--xla_cpu_experimental_ynn_fusion_type=-reduce',
    '--xla_cpu_experimental_ynn_fusion_type=+individual_convolution',
    '--xla_cpu_experimental_ynn_fusion_type=dot',
    '--xla_cpu_experimental_xnn_fusion_type=individual_convolution',
    '--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true',
]


def _child(script: str, args: list[str], flags: str, timeout: float = 1800) -> dict:
  env = dict(os.environ, XLA_FLAGS=flags)
  cmd = common.pin_prefix() + [sys.executable, os.path.join(common.REPO_ROOT, 'bench', script)]
  p = subprocess.run(cmd + args, capture_output=True, text=True, timeout=timeout,
                     cwd=common.REPO_ROOT, env=env)
  lines = [l for l in p.stdout.splitlines() if l.startswith('{')]
  if p.returncode or not lines:
    return dict(error=(p.stderr or p.stdout)[-2000:])
  return json.loads(lines[-1])


def main():
  ap = argparse.ArgumentParser(description='XLA:CPU flag sweep (see module docstring).')
  ap.add_argument('--train', default='decoder_s,prior_s',
                  help='training configs (bench/matched.CONFIGS), comma-separated')
  ap.add_argument('--sampling', default='pipeline_fast',
                  help='sampling configs (bench/matched.SAMPLING), comma-separated')
  ap.add_argument('--flags', default=';'.join(DEFAULT_FLAGS),
                  help="XLA_FLAGS settings to compare, separated by ';' (empty = none)")
  ap.add_argument('--steps', type=int, default=12)
  ap.add_argument('--repeats', type=int, default=2)
  ap.add_argument('--out', default='xla_flags_cpu.json', help='file name in bench/results/')
  a = ap.parse_args()
  load_before = common.load_snapshot()
  rows = []
  for flags in [f.strip() for f in a.flags.split(';')]:
    for name in filter(None, a.train.split(',')):
      r = _child('train_step.py', ['--child', name, '--steps', str(a.steps), '--warmup', '2'],
                 flags)
      rows.append(dict(kind='train', name=name, xla_flags=flags,
                       seconds=r.get('step_time_s'), error=r.get('error')))
    for name in filter(None, a.sampling.split(',')):
      r = _child('sampling.py', ['--child', name, '--repeats', str(a.repeats)], flags)
      rows.append(dict(kind='sampling', name=name, xla_flags=flags,
                       seconds=r.get('latency_s'), error=r.get('error')))
    for r in rows[-len(list(filter(None, (a.train + ',' + a.sampling).split(',')))):]:
      print(f'{r["name"]:14s} {r["seconds"] or 0:8.3f} s  {flags or "(none)"}'
            + ('  FAILED' if r['error'] else ''), flush=True)
  base = {r['name']: r['seconds'] for r in rows if not r['xla_flags'] and r['seconds']}
  for r in rows:
    if r['seconds'] and r['name'] in base:
      r['speedup_vs_none'] = base[r['name']] / r['seconds']
  path = common.write_json(a.out, dict(
      benchmark='xla_flags', command='python bench/xla_flags.py ' + ' '.join(sys.argv[1:]),
      env=common.jax_environment(), load_before=load_before,
      load_after=common.load_snapshot(), results=rows))
  print('wrote', path)


if __name__ == '__main__':
  main()
