"""2-D convolution (NHWC, HWIO) with a hand-written gradient for CPU.

XLA's CPU backend runs a forward 3x3 convolution about as fast as PyTorch, but the
gradient it derives by autodiff can be several times slower than it needs to be (see
bench/conv_grad.py and bench/results/conv_grad.json for the numbers on this machine). On
CPU, `conv2d(..., custom_grad=True)` computes the backward pass itself:

  * input gradient: a forward convolution of the (stride-dilated) output gradient with the
    spatially flipped, in/out-transposed kernel;
  * kernel gradient: one matrix product per kernel tap (nine for a 3x3 kernel) between the
    shifted, strided input and the output gradient, contracting batch and space.

On GPU and TPU (or with `custom_grad=False`) XLA's own autodiff is used. The choice is
made at trace time from `jax.default_backend()`, so a jitted function compiled for CPU
uses the custom rule and the same code compiled for an accelerator does not.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array
Padding = str | Sequence[tuple[int, int]]
_DN = ('NHWC', 'HWIO', 'NHWC')


def _explicit_padding(x_shape, k_shape, strides, padding) -> tuple[tuple[int, int], ...]:
  if isinstance(padding, str):
    return tuple(tuple(p) for p in lax.padtype_to_pads(
        x_shape[1:3], k_shape[0:2], strides, padding))
  pads = tuple((int(lo), int(hi)) for lo, hi in padding)
  if len(pads) != 2:
    raise ValueError(f'conv2d: padding must be "SAME", "VALID" or two (lo, hi) pairs, '
                     f'got {padding!r}.')
  return pads


def _xla_conv(x, w, strides, pads):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_DN)


def _input_grad(g, w, x_shape, strides, pads):
  """d(loss)/dx as a forward convolution of the dilated g with the flipped kernel."""
  kh, kw = w.shape[:2]
  w_t = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)   # HWIO -> flipped HW, O<->I
  new_pads = []
  for n, k, s, (lo, _), o in zip(x_shape[1:3], (kh, kw), strides, pads, g.shape[1:3]):
    dilated = (o - 1) * s + 1
    new_lo = k - 1 - lo
    new_pads.append((new_lo, n - dilated - new_lo + k - 1))
  return lax.conv_general_dilated(g, w_t, (1, 1), new_pads, lhs_dilation=strides,
                                  dimension_numbers=_DN)


def _kernel_grad(x, g, w_shape, strides, pads, split: int = 4):
  """d(loss)/dw as one matrix product per kernel tap.

  Each tap contracts the shifted, strided input [N*Ho*Wo, in] with the output gradient
  [N*Ho*Wo, out] over the long batch-and-space axis. That axis is split into `split`
  chunks contracted together ('sko,ski->io'), which XLA:CPU runs about 1.2-1.8x faster than
  one long tall-and-skinny product (measured in bench/conv_grad.py). The output gradient is
  contracted as it is laid out: transposed to [out, rows] first, it cost the up blocks'
  sub-pixel conv (models/conv.upsample_conv2d) a copy as slow as the products (16 ms of a
  0.38 s decoder step of configs/shapes.py on 2 CPU devices, for its [8, 17, 17, 256] output
  gradient), and the step ran 6% slower.
  """
  kh, kw = w_shape[:2]
  n, oh, ow, cout = g.shape
  cin = x.shape[-1]
  sh, sw = strides
  rows = n * oh * ow
  if rows % split:
    split = 1
  xp = lax.pad(x, jnp.zeros((), x.dtype),
               ((0, 0, 0), (pads[0][0], pads[0][1], 0), (pads[1][0], pads[1][1], 0),
                (0, 0, 0)))
  g = g.reshape(split, rows // split, cout)
  taps = []
  for a in range(kh):
    for b in range(kw):
      patch = lax.slice(xp, (0, a, b, 0),
                        (n, a + (oh - 1) * sh + 1, b + (ow - 1) * sw + 1, cin),
                        (1, sh, sw, 1))
      taps.append(jnp.einsum('sko,ski->io', g, patch.reshape(split, rows // split, cin),
                             preferred_element_type=jnp.float32))
  return jnp.stack(taps).reshape(kh, kw, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_custom(x, w, strides, pads):
  return _xla_conv(x, w, strides, pads)


def _conv_custom_fwd(x, w, strides, pads):
  return _xla_conv(x, w, strides, pads), (x, w)


def _conv_custom_bwd(strides, pads, res, g):
  x, w = res
  g = g.astype(x.dtype)
  dx = _input_grad(g, w, x.shape, strides, pads).astype(x.dtype)
  dw = _kernel_grad(x, g, w.shape, strides, pads).astype(w.dtype)
  return dx, dw


_conv_custom.defvjp(_conv_custom_fwd, _conv_custom_bwd)


def use_custom_grad(custom_grad: bool) -> bool:
  """Whether the custom CPU gradient applies (decided at trace time)."""
  return bool(custom_grad) and jax.default_backend() == 'cpu'


def conv2d(x: Array, w: Array, strides: Sequence[int] = (1, 1), padding: Padding = 'SAME',
           custom_grad: bool = True) -> Array:
  """NHWC x HWIO convolution; on CPU with `custom_grad` its VJP is the hand-written one."""
  if x.ndim != 4 or w.ndim != 4:
    raise ValueError(f'conv2d expects x [N, H, W, C] and w [kh, kw, in, out], got '
                     f'{x.shape} and {w.shape}.')
  if x.shape[-1] != w.shape[2]:
    raise ValueError(f'conv2d: input has {x.shape[-1]} channels, kernel expects '
                     f'{w.shape[2]}.')
  strides = tuple(int(s) for s in strides)
  pads = _explicit_padding(x.shape, w.shape, strides, padding)
  if use_custom_grad(custom_grad):
    return _conv_custom(x, w, strides, pads)
  return _xla_conv(x, w, strides, pads)


# Nearest 2x upsampling followed by a 3x3 'SAME' convolution, per output row parity: an
# even row 2m reads input rows m-1, m, m (taps 0 | 1+2), an odd row 2m+1 reads m, m, m+1
# (taps 0+1 | 2). [parity, 2x2 tap, 3x3 tap].
_UPSAMPLE_TAPS = (((1, 0, 0), (0, 1, 1)),
                  ((1, 1, 0), (0, 0, 1)))


def upsample_conv2d(x: Array, w: Array) -> Array:
  """conv2d(nearest 2x upsampling of x, w) for a 3x3 kernel, 'SAME', stride 1, computed at
  the input's resolution (sub-pixel): each of the four output parities is a 2x2
  convolution with taps summed from w, all four as one convolution of 4x the output
  channels, then interleaved. 16 instead of 36 multiply-adds per input pixel and channel
  pair, and no upsampled map; the same function up to float rounding.

  On CPU its gradient is always the hand-written one (`conv2d(custom_grad=True)`): XLA:CPU
  differentiates this 2x2 convolution's kernel with a slow generic convolution (773 ms
  instead of 20 ms for [8, 16, 16, 128] -> 512 channels; it made a decoder training step
  2.3x slower)."""
  if w.shape[:2] != (3, 3):
    raise ValueError(f'upsample_conv2d takes a 3x3 kernel, got {w.shape[:2]}.')
  b, h, wd, _ = x.shape
  cout = w.shape[-1]
  taps = jnp.asarray(_UPSAMPLE_TAPS, w.dtype)
  k = jnp.einsum('pai,qbj,ijco->abcpqo', taps, taps, w).reshape(2, 2, w.shape[2], 4 * cout)
  r = conv2d(x, k, padding=((1, 1), (1, 1)), custom_grad=True)
  r = r.reshape(b, h + 1, wd + 1, 2, 2, cout)       # [.., row parity, column parity, out]
  rows = [jnp.stack([r[:, py:py + h, px:px + wd, py, px] for px in (0, 1)], axis=3)
          for py in (0, 1)]
  return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * wd, cout)


class Conv(nn.Module):
  """A 2-D convolution layer (NHWC) whose CPU gradient can be the hand-written one.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: 'SAME', 'VALID' or ((lo, hi), (lo, hi)).
    use_bias: add a learned bias.
    custom_grad: use the custom gradient when running on CPU (config `custom_conv_grad`;
      the upsampling form always uses it on CPU, see `upsample_conv2d`).
    upsample: the input is first upsampled 2x (nearest); computed at the input's
      resolution by `upsample_conv2d` (3x3, 'SAME', stride 1 only).
    kernel_axes: logical axis names of the HWIO kernel (FSDP shards 'conv_out').
    kernel_init: initializer of the kernel (before partitioning annotations).
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Padding = 'SAME'
  use_bias: bool = True
  custom_grad: bool = True
  upsample: bool = False
  kernel_axes: tuple[str | None, ...] = (None, None, 'conv_in', 'conv_out')
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kh, kw = self.kernel_size
    kernel = self.param(
        'kernel', nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
        (kh, kw, x.shape[-1], self.features), self.param_dtype)
    if self.upsample:
      if tuple(self.strides) != (1, 1) or self.padding != 'SAME':
        raise ValueError('Conv(upsample=True) is 3x3, stride 1, SAME only.')
      y = upsample_conv2d(x.astype(self.dtype), kernel.astype(self.dtype))
    else:
      y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides,
                 self.padding, self.custom_grad)
    if self.use_bias:
      bias = self.param(
          'bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                               (self.kernel_axes[-1],)),
          (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y
