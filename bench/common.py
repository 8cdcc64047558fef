"""Shared pieces of the bench/ scripts: machine facts, the matmul peak, timing, JSON output.

Benchmarks, not tests: nothing here is imported by the package or the test suite.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

# The parent processes of the benchmarks touch the device too (the matmul peak, the backend's
# name); without this, a GPU parent would hold most of the GPU's memory while its children run.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

# BENCH_RESULTS_DIR redirects the result files (bench/gpu.sh: a lent machine's output folder).
RESULTS_DIR = os.environ.get('BENCH_RESULTS_DIR') or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), 'results')
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)


def pin_prefix() -> list[str]:
  """['taskset', '-c', CORE] when BENCH_PIN_CORE is set (compare.py --pin_core), else []."""
  core = os.environ.get('BENCH_PIN_CORE', '')
  return ['taskset', '-c', core] if core else []


def rss_peak_mb() -> float:
  """Peak resident set size of this process so far (MiB), from getrusage."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_snapshot() -> dict[str, Any]:
  """How busy the machine is: load averages and the busiest other processes."""
  snap = dict(loadavg_1_5_15=list(os.getloadavg()), cpu_count=os.cpu_count())
  try:
    out = subprocess.run(['ps', '-eo', 'pid,pcpu,comm', '--sort=-pcpu', '--no-headers'],
                         capture_output=True, text=True, timeout=5).stdout.splitlines()
    me = os.getpid()
    busy = []
    for line in out[:8]:
      pid, pcpu, comm = line.split(None, 2)
      if int(pid) != me and float(pcpu) >= 5.0:
        busy.append(dict(pid=int(pid), pcpu=float(pcpu), comm=comm))
    snap['busy_processes'] = busy
  except (OSError, ValueError, subprocess.SubprocessError):
    pass
  return snap


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def jax_environment() -> dict[str, Any]:
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  dev = jax.devices()[0]
  return dict(
      python=platform.python_version(), jax=jax.__version__, jaxlib=jaxlib.__version__,
      flax=flax.__version__, optax=optax.__version__, backend=jax.default_backend(),
      device=dev.device_kind, num_devices=jax.device_count(), cpu=cpu_model(),
      cpu_count=os.cpu_count(), platform=platform.platform(),
      xla_flags=os.environ.get('XLA_FLAGS', ''),
      git_commit=_git_commit())


def _git_commit() -> str:
  try:
    return subprocess.run(['git', '-C', REPO_ROOT, 'rev-parse', '--short', 'HEAD'],
                          capture_output=True, text=True, timeout=5).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ''


def matmul_peak_jax(n: int = 2048, repeats: int = 10, dtype: str = 'float32') -> float:
  """FLOP/s of a large jitted matmul in `dtype`: the device peak that MFU is measured against."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), dtype)
  b = jax.random.normal(k2, (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2.0 * n ** 3 / min(times)


def device_peak() -> dict[str, Any]:
  """The matmul peak MFU is measured against: bfloat16 8192^3 on an accelerator, f32 2048^3
  on CPU (where bf16 is slower than f32)."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.default_backend() == 'cpu':
    n, dtype = 2048, 'float32'
  else:
    n, dtype = 8192, 'bfloat16'
  return dict(flops_per_s=matmul_peak_jax(n, repeats=20, dtype=dtype), n=n, dtype=dtype)


def device_memory_peak_mb() -> float | None:
  """Peak bytes in use on the first device (accelerators; None where not reported)."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    return None
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2**20


def profile_trace(fn: Callable[[], Any], name: str, calls: int = 3) -> str | None:
  """Runs fn() `calls` times under jax.profiler and keeps the Perfetto trace as
  RESULTS_DIR/trace_<name>.json.gz (kernel names and device times; open it in
  ui.perfetto.dev, or sum it with bench/trace_summary.py). None if tracing failed."""
  import glob  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  try:
    with tempfile.TemporaryDirectory() as tmp:
      with jax.profiler.trace(tmp, create_perfetto_trace=True):
        for _ in range(calls):
          fn()
      found = glob.glob(os.path.join(tmp, '**', 'perfetto_trace.json.gz'), recursive=True)
      if not found:
        return None
      os.makedirs(RESULTS_DIR, exist_ok=True)
      out = os.path.join(RESULTS_DIR, f'trace_{name}.json.gz')
      shutil.copy(found[0], out)
      return out
  except Exception as e:  # pylint: disable=broad-except
    print(f'profile_trace({name}) failed: {e!r}', file=sys.stderr)
    return None


def run_child_json(name: str, cmd: list[str], timeout: float) -> dict[str, Any]:
  """Runs one benchmark child (`cmd`, from the repository root) and returns the JSON object
  on the last '{' line of its stdout, or dict(name=, error=<its output's tail>).

  The child's stderr is echoed line by line as it comes, prefixed with `name`, so a run cut
  short from outside (a lent GPU's time limit) still shows how far each child got."""
  import tempfile  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  tail = []
  with tempfile.TemporaryFile('w+') as out:
    p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    timer = threading.Timer(timeout, p.kill)
    timer.start()
    try:
      for line in p.stderr:
        print(f'[{name}] {line}', end='', file=sys.stderr, flush=True)
        tail = (tail + [line])[-60:]
      p.wait()
    finally:
      timer.cancel()
    out.seek(0)
    lines = [l for l in out.read().splitlines() if l.startswith('{')]
  if p.returncode or not lines:
    why = f'killed after {timeout:.0f} s\n' if p.returncode == -9 else ''
    return dict(name=name, error=why + ''.join(tail)[-3000:])
  return json.loads(lines[-1])


def phase(name: str, what: str, since: float) -> float:
  """Prints '<name>: <what> after N s' to stderr (a child's progress); returns now."""
  now = time.perf_counter()
  print(f'{name}: {what} after {now - since:.1f} s', file=sys.stderr, flush=True)
  return now


def time_calls(fn: Callable[[], Any], steps: int, warmup: int) -> dict[str, float]:
  """Runs fn() warmup + steps times (fn must block until its result is ready)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  q = statistics.quantiles(times, n=4) if len(times) >= 4 else [times[0], 0, times[-1]]
  return dict(median_s=statistics.median(times), min_s=min(times),
              mean_s=statistics.fmean(times), iqr_s=max(q[2] - q[0], 0.0), n=len(times))


def write_json(name: str, payload: dict[str, Any]) -> str:
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, name)
  payload = dict(payload)
  payload.setdefault('written_at', datetime.datetime.now(datetime.timezone.utc).isoformat(
      timespec='seconds'))
  with open(path, 'w') as f:
    json.dump(payload, f, indent=1, sort_keys=False)
    f.write('\n')
  return path


def fmt_s(x: float | None) -> str:
  if x is None:
    return '-'
  if x >= 1:
    return f'{x:.2f} s'
  return f'{x * 1e3:.1f} ms'
