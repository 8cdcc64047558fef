"""Analytic forward FLOP counts (one example) for MFU: dense, conv, attention, UNet.

Conventions: a multiply-add is 2 FLOPs; only matrix products and convolutions are counted
(normalisations, activations and other element-wise work are a few percent of these
networks and are left out, as in the usual MFU accounting). A training step costs about
3x the forward count (forward + 2x backward). The counts agree with XLA's own cost
analysis (`jax.jit(f).lower(...).compile().cost_analysis()['flops']`) within a few percent
on the tiny test configs (tests/test_flops.py).

`unet_flops` walks the same architecture as `dalle2_jax.models.unet.UNet`; the other
helpers are shared with the transformers (CLIP, the prior, the decoder's text encoder).
"""

from __future__ import annotations

from typing import Sequence


def dense_flops(tokens: int, d_in: int, d_out: int) -> float:
  """A [tokens, d_in] x [d_in, d_out] product."""
  return 2.0 * tokens * d_in * d_out


def conv_flops(out_h: int, out_w: int, kernel: int, c_in: int, c_out: int) -> float:
  """A kernel x kernel convolution producing an out_h x out_w x c_out map."""
  return 2.0 * out_h * out_w * kernel * kernel * c_in * c_out


def attention_flops(q_len: int, kv_len: int, width: int) -> float:
  """The two attention products (q k^T and probs v) over all heads; no projections."""
  return 2.0 * 2.0 * q_len * kv_len * width


def transformer_flops(length: int, width: int, depth: int, mlp_dim: int | None = None,
                      context_len: int = 0, context_width: int | None = None,
                      num_outputs: int | None = None) -> float:
  """`depth` pre-LN blocks: q/k/v/out projections, attention, a 2-layer MLP; optionally
  attending to `context_len` extra tokens of width `context_width` (own k/v projections).
  With `num_outputs` the last block computes only that many positions' queries, attention,
  out projection and MLP, the keys and values of every position (layers.Transformer)."""
  mlp_dim = mlp_dim or 4 * width

  def block(queries):
    f = (dense_flops(length, width, 2 * width) + dense_flops(queries, width, 2 * width)
         + attention_flops(queries, length + context_len, width)
         + 2 * dense_flops(queries, width, mlp_dim))
    if context_len:
      f += 2 * dense_flops(context_len, context_width or width, width)
    return f
  if not depth:
    return 0.0
  return float((depth - 1) * block(length) + block(num_outputs or length))


def unet_flops(image_size: int | Sequence[int], channels: int, channel_mult: Sequence[int],
               num_res_blocks: int, attention_resolutions: Sequence[int] = (),
               in_channels: int = 3, out_channels: int = 3, context_len: int = 0,
               context_width: int = 0) -> float:
  """Forward FLOPs of `unet.UNet` on one image (H, W) with the given context tokens."""
  if isinstance(image_size, int):
    h = w = image_size
  else:
    h, w = image_size
  emb = 4 * channels
  total = dense_flops(1, channels, emb) + dense_flops(1, emb, emb)   # timestep MLP

  def res(c_in, c_out, hh, ww, up=False):
    # An up block's first conv runs at the low resolution (conv.upsample_conv2d): a 2x2
    # conv of 4x the channels over (hh/2 + 1) x (ww/2 + 1) positions, not 3x3 over hh x ww.
    first = (conv_flops(hh // 2 + 1, ww // 2 + 1, 2, c_in, 4 * c_out) if up
             else conv_flops(hh, ww, 3, c_in, c_out))
    f = first + conv_flops(hh, ww, 3, c_out, c_out)
    f += dense_flops(1, emb, 2 * c_out)
    if c_in != c_out:
      f += conv_flops(hh, ww, 1, c_in, c_out)
    return f

  def attn(c, hh, ww):
    n = hh * ww
    f = 4 * dense_flops(n, c, c) + attention_flops(n, n + context_len, c)
    if context_len:
      f += 2 * dense_flops(context_len, context_width, c)
    return f

  attn_at = set(attention_resolutions)
  ch = channels * channel_mult[0]
  total += conv_flops(h, w, 3, in_channels, ch)
  skips = [ch]
  for level, mult in enumerate(channel_mult):
    hh, ww = h >> level, w >> level
    for _ in range(num_res_blocks):
      total += res(ch, channels * mult, hh, ww)
      ch = channels * mult
      if hh in attn_at:
        total += attn(ch, hh, ww)
      skips.append(ch)
    if level != len(channel_mult) - 1:
      total += res(ch, ch, hh // 2, ww // 2)
      skips.append(ch)
  last = len(channel_mult) - 1
  hh, ww = h >> last, w >> last
  total += 2 * res(ch, ch, hh, ww)
  if attn_at:
    total += attn(ch, hh, ww)
  for level in range(last, -1, -1):
    hh, ww = h >> level, w >> level
    for _ in range(num_res_blocks + 1):
      c_in = ch + skips.pop()
      ch = channels * channel_mult[level]
      total += res(c_in, ch, hh, ww)
      if hh in attn_at:
        total += attn(ch, hh, ww)
    if level:
      total += res(ch, ch, 2 * hh, 2 * ww, up=True)
  total += conv_flops(h, w, 3, ch, out_channels)
  return float(total)


def unet_flops_from_config(model_config, image_size, in_channels: int = 3,
                           out_channels: int = 3, context_len: int = 0,
                           context_width: int = 0) -> float:
  m = model_config
  return unet_flops(image_size, int(m.channels), tuple(m.channel_mult),
                    int(m.num_res_blocks), tuple(m.attention_resolutions), in_channels,
                    out_channels, context_len, context_width)
