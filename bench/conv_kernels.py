r"""The kernels under the UNet, jax (XLA CPU) vs torch (oneDNN), on this machine.

  python bench/conv_kernels.py            # -> bench/results/conv_kernels.json
  python bench/conv_kernels.py --xla_flags=--xla_cpu_experimental_ynn_fusion_type=dot

One 3x3 convolution (NHWC for jax, NCHW for torch; same sizes, default batch 8, 32x32,
64 -> 64 channels, 'same' padding), forward and forward + backward (input and kernel
gradients), and a 2048^3 f32 matmul: GFLOP/s, the median of --reps timed calls after a
warm-up. The torch side runs in the peer's virtual environment (see bench/compare.py) with
as many threads as cores. This is what explains the UNet rows of bench/compare.py: the
convolution kernel, not the model code around it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # pylint: disable=g-import-not-at-top,wrong-import-position

_TORCH = r'''
import json, sys, time, torch
b, s, c, o, reps, n = (int(v) for v in sys.argv[1:7])
torch.set_num_threads(int(sys.argv[7]))
def med(f):
  f(); ts = []
  for _ in range(reps):
    t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
  return sorted(ts)[len(ts) // 2]
conv = torch.nn.Conv2d(c, o, 3, padding=1, bias=False)
x = torch.randn(b, c, s, s, requires_grad=True)
with torch.no_grad():
  fwd = med(lambda: conv(x))
def fb():
  (conv(x) ** 2).sum().backward()
a, m = torch.randn(n, n), torch.randn(n, n)
print(json.dumps(dict(conv_fwd_s=fwd, conv_fwd_bwd_s=med(fb), matmul_s=med(lambda: a @ m),
                      torch=torch.__version__)))
'''


def jax_side(b, s, c, o, reps, n):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (b, s, s, c))
  w = jax.random.normal(key, (3, 3, c, o)) * 0.05
  conv = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
      x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  fwd = jax.jit(conv)
  fb = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
  a, m = jax.random.normal(key, (n, n)), jax.random.normal(key, (n, n))
  mm = jax.jit(lambda a, m: a @ m)
  med = lambda f, *args: common.time_calls(  # noqa: E731
      lambda: jax.block_until_ready(f(*args)), reps, 1)['median_s']
  return dict(conv_fwd_s=med(fwd, x, w), conv_fwd_bwd_s=med(fb, x, w), matmul_s=med(mm, a, m))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--size', type=int, default=32)
  ap.add_argument('--channels', type=int, default=64)
  ap.add_argument('--matmul', type=int, default=2048)
  ap.add_argument('--reps', type=int, default=10)
  ap.add_argument('--xla_flags', default='', help='XLA_FLAGS for the jax side (a fresh process)')
  ap.add_argument('--peer_python', default='/work/d2pt/bin/python')
  ap.add_argument('--out', default='conv_kernels.json', help='file name in bench/results/')
  ap.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  a = ap.parse_args()
  dims = (a.batch, a.size, a.channels, a.channels, a.reps, a.matmul)
  if a.child:
    print(json.dumps(jax_side(*dims)))
    return
  if a.xla_flags:   # XLA reads its flags once per process
    env = dict(os.environ, XLA_FLAGS=a.xla_flags)
    p = subprocess.run([sys.executable, __file__, '--child'] + sys.argv[1:], env=env,
                       capture_output=True, text=True, check=True)
    ours = json.loads(p.stdout.strip().splitlines()[-1])
  else:
    ours = jax_side(*dims)
  theirs = None
  if os.path.exists(a.peer_python):
    p = subprocess.run([a.peer_python, '-c', _TORCH] + [str(v) for v in dims] +
                       [str(os.cpu_count() or 1)], capture_output=True, text=True,
                       cwd=tempfile.gettempdir())
    theirs = json.loads(p.stdout.strip().splitlines()[-1]) if p.returncode == 0 else dict(
        error=p.stderr[-2000:])
  conv_flops = 2 * a.batch * a.size * a.size * a.channels * a.channels * 9
  flops = dict(conv_fwd_s=conv_flops, conv_fwd_bwd_s=3 * conv_flops,
               matmul_s=2 * a.matmul ** 3)
  rows = {}
  for k, f in flops.items():
    rows[k.replace('_s', '_gflops')] = dict(
        jax=f / ours[k] / 1e9,
        torch=(f / theirs[k] / 1e9) if theirs and k in theirs else None)
  for k, v in rows.items():
    t = f'{v["torch"]:7.1f}' if v['torch'] else '    n/a'
    print(f'{k:18s} jax {v["jax"]:7.1f}  torch {t}  GFLOP/s')
  path = common.write_json(a.out, dict(
      benchmark='conv_kernels', command='python bench/conv_kernels.py ' + ' '.join(sys.argv[1:]),
      env=dict(ours=common.jax_environment(), torch=(theirs or {}).get('torch')),
      xla_flags=a.xla_flags, batch=a.batch, size=a.size, channels=a.channels,
      matmul=a.matmul, gflops=rows, load=common.load_snapshot(), raw=dict(jax=ours,
                                                                           torch=theirs)))
  print('wrote', path)


if __name__ == '__main__':
  main()
