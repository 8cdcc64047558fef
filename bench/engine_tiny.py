r"""Training-engine cost on the tiny config: compile time and step time, 1 vs 8 CPU devices.

  python bench/engine_tiny.py [--stage clip] [--steps 40] [--devices 1 8] [--repeats 2]

Each measurement is a fresh process (XLA_FLAGS=--xla_force_host_platform_device_count=N)
that trains the stage into a temporary workdir with the real input pipeline; it reports the
ahead-of-time compile time of the train step, the median step time (host-synchronised, per
step, after the first), and the process CPU time. The best of `--repeats` runs is kept,
since on a shared machine other load only ever adds time.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CHILD = r'''
import json, sys, time, resource
sys.path.insert(0, {root!r})
import jax
jax.config.update('jax_platforms', 'cpu')
from configs import tiny
from dalle2_jax.training import loop
c = tiny.get_config()
c.unlock()
c[{stage!r}].update(steps={steps}, ckpt_every=0, log_every=10**9)
t = time.perf_counter()
s = loop.run(c, {workdir!r}, stages=[{stage!r}])[{stage!r}]
u = resource.getrusage(resource.RUSAGE_SELF)
print('RESULT ' + json.dumps(dict(devices=jax.device_count(), compile_s=s['compile_time'],
                                 step_s=s['step_time'], total_s=time.perf_counter() - t,
                                 cpu_s=u.ru_utime + u.ru_stime)))
'''


def measure(stage, steps, devices):
  with tempfile.TemporaryDirectory() as workdir:
    code = _CHILD.format(root=ROOT, stage=stage, steps=steps, workdir=workdir)
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True,
                         text=True, check=True).stdout
  return json.loads(out.split('RESULT ', 1)[1])


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--stage', default='clip')
  parser.add_argument('--steps', type=int, default=40)
  parser.add_argument('--devices', type=int, nargs='+', default=[1, 8])
  parser.add_argument('--repeats', type=int, default=2)
  args = parser.parse_args()
  results = {}
  for n in args.devices:
    runs = [measure(args.stage, args.steps, n) for _ in range(args.repeats)]
    results[n] = dict(compile_s=min(r['compile_s'] for r in runs),
                      step_s=min(r['step_s'] for r in runs),
                      cpu_s=min(r['cpu_s'] for r in runs), runs=runs)
    print(f'{n} device(s): compile {results[n]["compile_s"]:.2f} s, '
          f'step {1e3 * results[n]["step_s"]:.1f} ms', flush=True)
  if 1 in results and len(results) > 1:
    for n, r in results.items():
      if n != 1:
        print(f'{n} vs 1 device: step x{r["step_s"] / results[1]["step_s"]:.2f}, '
              f'compile x{r["compile_s"] / results[1]["compile_s"]:.2f}')
  os.makedirs(os.path.join(ROOT, 'bench', 'results'), exist_ok=True)
  path = os.path.join(ROOT, 'bench', 'results', f'engine_tiny_{args.stage}.json')
  with open(path, 'w') as f:
    json.dump(dict(stage=args.stage, steps=args.steps, results=results), f, indent=2)
  print('wrote', path)


if __name__ == '__main__':
  main()
