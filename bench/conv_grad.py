r"""Convolution gradients on CPU: XLA's autodiff vs the hand-written VJP of models/conv.py.

  python bench/conv_grad.py                       # writes bench/results/conv_grad.json
  python bench/conv_grad.py --unet_batch 8 --out /tmp/conv_grad.json

Measures (best of --reps, after a warm-up call; compile times separately):
  conv: one 3x3 convolution, batch 32, 32x32, 64 -> 64 channels, NHWC, stride 1 and 2:
    forward; forward + backward (input and kernel gradients) with XLA's autodiff and with
    the custom VJP; the input gradient and kernel gradient alone.
  unet: the ADM UNet of models/unet.py (64 channels, mults 1,2,2, 2 res blocks, attention
    at 16 px, 32 px images): forward and one gradient step (value_and_grad of an MSE), with
    `custom_conv_grad` False (XLA) and True (custom).
The CPU is shared with other processes in this project's sandbox: the 1-minute load
average before and after is recorded with the results; compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from dalle2_jax.models import conv  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
from dalle2_jax.models import unet  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def timed(fn, *args, reps=5):
  """(compile seconds, best run seconds) of a jitted fn."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(*args))
  best = float('inf')
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    best = min(best, time.perf_counter() - t0)
  return compile_s, best


def bench_conv(stride: int, reps: int) -> dict:
  kx, kw = jax.random.split(jax.random.PRNGKey(0))
  x = jax.random.normal(kx, (32, 32, 32, 64))
  w = jax.random.normal(kw, (3, 3, 64, 64)) * 0.05
  s = (stride, stride)
  out = {}
  _, out['forward_ms'] = timed(lambda x, w: conv.conv2d(x, w, s, custom_grad=False), x, w,
                               reps=reps)
  for name, custom in (('xla', False), ('custom', True)):
    f = lambda x, w, c=custom: jax.grad(  # noqa: E731
        lambda x, w: jnp.sum(jnp.square(conv.conv2d(x, w, s, custom_grad=c))), (0, 1))(x, w)
    _, out[f'fwd_bwd_{name}_ms'] = timed(f, x, w, reps=reps)
    y, vjp = jax.vjp(lambda x, w, c=custom: conv.conv2d(x, w, s, custom_grad=c), x, w)
    g = jnp.ones_like(y)
    _, out[f'input_grad_{name}_ms'] = timed(lambda g, vjp=vjp: vjp(g)[0], g, reps=reps)
    _, out[f'kernel_grad_{name}_ms'] = timed(lambda g, vjp=vjp: vjp(g)[1], g, reps=reps)
  return {k: round(v * 1e3, 2) for k, v in out.items()}


def bench_unet(batch: int, reps: int) -> dict:
  x = jax.random.normal(jax.random.PRNGKey(0), (batch, 32, 32, 3))
  t = jnp.arange(batch, dtype=jnp.int32) * 7
  out = {}
  for name, custom in (('xla', False), ('custom', True)):
    net = unet.UNet(channels=64, out_channels=3, channel_mult=(1, 2, 2), num_res_blocks=2,
                    attention_resolutions=(16,), head_channels=32, custom_conv_grad=custom)
    params = net.init(jax.random.PRNGKey(1), x[:1], t[:1])
    out['params'] = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
    c, fwd = timed(lambda p, x, t, net=net: net.apply(p, x, t), params, x, t, reps=reps)
    out[f'forward_{name}_s'] = round(fwd, 3)
    loss = lambda p, x, t, net=net: jnp.mean(jnp.square(net.apply(p, x, t) - x))  # noqa: E731
    c, step = timed(jax.value_and_grad(loss), params, x, t, reps=reps)
    out[f'step_{name}_s'] = round(step, 3)
    out[f'step_{name}_compile_s'] = round(c, 1)
    out[f'step_{name}_images_per_s'] = round(batch / step, 2)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--reps', type=int, default=3)
  parser.add_argument('--unet_batch', type=int, default=32)
  parser.add_argument('--skip_unet', action='store_true')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results',
                                                    'conv_grad.json'))
  args = parser.parse_args()
  result = dict(
      jax=jax.__version__, backend=jax.default_backend(), cpu_count=os.cpu_count(),
      machine=platform.machine(), load_avg_1min_before=round(os.getloadavg()[0], 2),
      conv_batch32_32x32_64to64={f'stride{s}': bench_conv(s, args.reps) for s in (1, 2)})
  if not args.skip_unet:
    result[f'unet_64ch_mult122_32px_batch{args.unet_batch}'] = bench_unet(args.unet_batch,
                                                                          args.reps)
  result['load_avg_1min_after'] = round(os.getloadavg()[0], 2)
  print(json.dumps(result, indent=2))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump(result, f, indent=2)
    f.write('\n')


if __name__ == '__main__':
  main()
