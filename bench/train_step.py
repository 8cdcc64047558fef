r"""Training-step benchmark of the prior, decoder and upsampler at two sizes each.

  python bench/train_step.py                       # all stages and sizes -> results/train_step_cpu.json
  python bench/train_step.py --only decoder_s      # one config
  python bench/train_step.py --steps 30 --warmup 3

Each config runs in a fresh subprocess (so the peak RSS is that config's), through the
project's real engine step (`dalle2_jax.training.state.make_train_step`: loss, grads,
global-norm clip, AdamW, EMA, finite check) jitted with the state donated on a 1-device
mesh (on CPU, data parallel over --cpu_devices XLA devices: `num_cpu_devices`; by default
bench/matched.py CPU_DEVICES, 1 for the prior and 2 for the UNets), compiled ahead of time
(`.lower().compile()`, timed apart). It reports:

  step_time_s      median wall time of a step over --steps steps after --warmup steps
  examples_per_s   batch / step_time_s
  flops_per_step   analytic: 3 x task.flops_per_example() x batch (forward x3 for training)
  achieved_flops_per_s, mfu   against the f32 matmul peak measured in the same process
  compile_s        lower + compile time
  peak_rss_mb      the process's peak resident memory (getrusage), and XLA's own
                   temp/argument/output byte counts of the compiled step

The sizes (and the DALLE2-pytorch configs matched to them) are in bench/matched.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from bench import matched  # pylint: disable=g-import-not-at-top,wrong-import-position


def run_one(name: str, steps: int, warmup: int, custom_conv_grad: bool | None = None,
            peak: float | None = None, cpu_devices: int = 1) -> dict:
  """Builds, compiles and times one config's train step in this process (`cpu_devices` > 1
  must be set before JAX starts: a fresh process)."""
  import jax  # pylint: disable=g-import-not-at-top
  from dalle2_jax.training import runtime  # pylint: disable=g-import-not-at-top
  runtime.set_num_cpu_devices(cpu_devices if cpu_devices > 1 else 0)   # as train.py does
  from bench import ours  # pylint: disable=g-import-not-at-top
  if jax.default_backend() != 'cpu':
    cpu_devices = 1   # an accelerator row runs on one chip

  rss0 = common.rss_peak_mb()
  spec = matched.CONFIGS[name]
  peak = peak or common.device_peak()['flops_per_s']
  t0 = time.perf_counter()
  built = ours.build_train(spec, total_steps=steps + warmup + 1,
                           custom_conv_grad=custom_conv_grad, num_devices=cpu_devices)
  state, batch, rng, frozen = built.state, built.batch, built.rng, built.frozen

  t0 = common.phase(name, 'built (state initialised)', t0)
  lowered = built.jitted.lower(state, batch, rng, frozen)
  t1 = common.phase(name, 'lowered', t0)
  compiled = lowered.compile()
  common.phase(name, 'compiled', t1)
  compile_s = time.perf_counter() - t0
  mem = {}
  try:
    ma = compiled.memory_analysis()
    mem = dict(temp_mb=ma.temp_size_in_bytes / 2**20,
               argument_mb=ma.argument_size_in_bytes / 2**20,
               output_mb=ma.output_size_in_bytes / 2**20)
  except Exception:  # pylint: disable=broad-except
    pass

  xla_flops = None
  try:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    xla_flops = float(ca.get('flops')) if ca and ca.get('flops') is not None else None
  except Exception:  # pylint: disable=broad-except
    pass

  holder = [state]

  def step():
    new_state, metrics = compiled(holder[0], batch, rng, frozen)
    jax.block_until_ready(metrics['loss'])
    holder[0] = new_state
    return metrics

  t0 = time.perf_counter()
  step()
  first_step_s = time.perf_counter() - t0
  timing = common.time_calls(step, steps=steps, warmup=max(warmup - 1, 0))
  metrics = step()
  common.phase(name, f'timed {steps} steps', t0)
  trace = None
  if name in os.environ.get('BENCH_TRACE', '').split(','):
    trace = common.profile_trace(step, name)
  b = built.batch_size
  flops_per_step = 3.0 * built.flops_per_example * b
  med = timing['median_s']
  return dict(
      name=name, kind=spec['kind'], size=spec.get('size'), side='dalle2_jax',
      batch=b, devices=cpu_devices, params=built.num_params, config=built.model_config,
      dtype=built.config[spec['ours']['stage']].get('dtype', 'float32'),
      custom_conv_grad=built.custom_conv_grad,
      compile_s=compile_s, first_step_s=first_step_s,
      step_time_s=med, step_time_min_s=timing['min_s'], step_time_mean_s=timing['mean_s'],
      step_time_iqr_s=timing['iqr_s'], steps=steps, warmup=warmup,
      examples_per_s=b / med,
      flops_per_example_fwd=built.flops_per_example, flops_per_step=flops_per_step,
      xla_cost_analysis_flops_per_step=xla_flops,
      achieved_flops_per_s=flops_per_step / med, matmul_peak_flops_per_s=peak,
      mfu=flops_per_step / med / peak,
      final_loss=float(metrics['loss']),
      xla_memory=mem, rss_before_model_mb=rss0, peak_rss_mb=common.rss_peak_mb(),
      device_peak_mb=common.device_memory_peak_mb(), trace=trace)


def run_in_subprocess(name: str, steps: int, warmup: int, custom_conv_grad=None,
                      peak: float | None = None, timeout: float = 900,
                      cpu_devices: int = 1) -> dict:
  cmd = common.pin_prefix() + [sys.executable, os.path.abspath(__file__), '--child', name,
         '--steps', str(steps), '--warmup', str(warmup), '--cpu_devices', str(cpu_devices)]
  if custom_conv_grad is not None:
    cmd += ['--custom_conv_grad', str(int(custom_conv_grad))]
  if peak:
    cmd += ['--peak', repr(peak)]
  return common.run_child_json(name, cmd, timeout)


def matmul_peak_subprocess() -> float:
  """The jax f32 matmul peak measured in a child process (pinned like the benchmarks)."""
  cmd = common.pin_prefix() + [sys.executable, '-c',
                               'import sys; sys.path.insert(0, %r); from bench import common; '
                               'print(common.matmul_peak_jax())' % common.REPO_ROOT]
  p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=common.REPO_ROOT)
  return float(p.stdout.strip().splitlines()[-1])


def main():
  ap = argparse.ArgumentParser(description='Training-step benchmark (see module docstring).')
  ap.add_argument('--only', default='', help='comma-separated config names (bench/matched.py)')
  ap.add_argument('--steps', type=int, default=20)
  ap.add_argument('--warmup', type=int, default=3)
  ap.add_argument('--out', default='', help='file name in bench/results/ '
                  '(default train_step_<backend>.json)')
  ap.add_argument('--cpu_devices', type=matched.cpu_devices_arg, default='auto',
                  help='on CPU, data parallel over this many XLA devices made of the cores '
                       '(config num_cpu_devices); auto = bench/matched.py CPU_DEVICES by '
                       'kind: 1 for the prior, 2 for the UNets')
  ap.add_argument('--child', default='', help=argparse.SUPPRESS)
  ap.add_argument('--custom_conv_grad', type=int, default=None, help=argparse.SUPPRESS)
  ap.add_argument('--peak', type=float, default=None, help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.child:   # the host memory setting train.py runs with (dalle2_jax/cpu_flags.py)
    from dalle2_jax import cpu_flags  # pylint: disable=g-import-not-at-top
    cpu_flags.keep_host_memory()
    ccg = None if a.custom_conv_grad is None else bool(a.custom_conv_grad)
    print(json.dumps(run_one(a.child, a.steps, a.warmup, ccg, a.peak,
                             matched.cpu_devices(a.child, a.cpu_devices))), flush=True)
    return

  import jax  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()
  names = [n for n in a.only.split(',') if n] or (
      matched.TRAIN_STEP_CONFIGS if backend == 'cpu' else matched.GPU_TRAIN_STEP_CONFIGS)
  unknown = [n for n in names if n not in matched.CONFIGS]
  if unknown:
    sys.exit(f'unknown config(s) {unknown}; known: {sorted(matched.CONFIGS)}')
  load_before = common.load_snapshot()
  device_peak = common.device_peak()
  peak = device_peak['flops_per_s']

  def write():
    return common.write_json(a.out or f'train_step_{backend}.json', dict(
        benchmark='train_step', command='python bench/train_step.py ' + ' '.join(sys.argv[1:]),
        env=common.jax_environment(), matmul_peak_flops_per_s=peak,
        matmul_peak=device_peak,
        load_before=load_before, load_after=common.load_snapshot(), results=results))

  results = []
  for n in names:
    r = run_in_subprocess(n, a.steps, a.warmup, peak=peak,
                          cpu_devices=matched.cpu_devices(n, a.cpu_devices))
    results.append(r)
    write()   # after every config: a run cut short keeps what it measured
    if 'error' in r:
      print(f'{n}: FAILED\n{r["error"]}', file=sys.stderr)
      continue
    print(f'{n:14s} batch {r["batch"]:3d}  params {r["params"] / 1e6:7.2f}M  '
          f'step {common.fmt_s(r["step_time_s"]):>9s}  {r["examples_per_s"]:7.1f} ex/s  '
          f'{r["achieved_flops_per_s"] / 1e9:6.1f} GFLOP/s  MFU {100 * r["mfu"]:5.1f}%  '
          f'compile {r["compile_s"]:5.1f} s  peak RSS {r["peak_rss_mb"]:6.0f} MB'
          + (f'  device peak {r["device_peak_mb"]:6.0f} MB' if r.get('device_peak_mb') else ''),
          flush=True)
  print('wrote', write())


if __name__ == '__main__':
  main()
