"""The ADM / GLIDE UNet of unCLIP's decoder and upsamplers.

`UNet` is the shared network (Dhariwal & Nichol 2021, "ADM"; Nichol et al. 2021, GLIDE):

  * residual blocks: GroupNorm -> SiLU -> 3x3 conv, then GroupNorm modulated by a
    scale and shift projected from the timestep embedding, SiLU, dropout, a zero-initialised
    3x3 conv, and a 1x1 conv on the skip path when the channel count changes;
  * resolution changes inside residual blocks (average pool down, nearest-neighbour up;
    the up block's first conv runs at the low resolution, models/conv.upsample_conv2d);
  * `num_res_blocks` blocks per resolution, channel counts `channels * channel_mult[i]`;
  * self-attention at the feature-map resolutions (in pixels) in `attention_resolutions`,
    `head_channels` channels per head; when a `context` is given (the decoder's caption and
    CLIP tokens) each attention layer projects it to keys and values of its own, joined in
    front of the image's keys and values (GLIDE);
  * optional rematerialisation of every block (`remat`), logical axis names on every
    parameter ('conv_in', 'conv_out', 'embed', 'mlp', 'heads', 'kv') so FSDP shards it.

Two thin wrappers add each stage's conditioning:

  `Decoder`    the CLIP image embedding (a) projected and added to the timestep embedding,
               (b) projected into `num_clip_tokens` extra context tokens joined to the
               caption's token encodings (from the frozen CLIP text tower, or from the
               decoder's own text transformer, `text_encoder='own'`). Classifier-free
               guidance drops are given per example by `image_embed_keep` / `text_keep`:
               a dropped CLIP embedding is replaced by a learned null embedding, a dropped
               caption is masked out of every attention layer.
               Optionally (c) projected into a feature map at the lowest resolution and
               added there (`clip_embed_map`; not in the paper, see `Decoder`).
  `Upsampler`  the low-resolution image, upsampled to the output size, concatenated to the
               noisy input (3 + 3 channels), plus an optional embedding of the noise
               level used to augment it. No attention, no text: it is size agnostic, so it
               trains on crops and samples at full size.

All tensors are NHWC; `t` is the (integer or float) diffusion timestep per example.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from dalle2_jax.models import layers
from dalle2_jax.models.conv import Conv

Array = jax.Array
Dtype = Any


def num_groups(channels: int, max_groups: int = 32) -> int:
  """ADM uses 32 groups; smaller nets use the largest divisor of `channels` <= 32."""
  for g in range(min(max_groups, channels), 0, -1):
    if channels % g == 0:
      return g
  return 1


def _group_mean_per_channel(s: Array, num_groups: int, n: int) -> Array:
  """[B, C] per-channel sums -> each channel's group mean (sum / n), [B, C]."""
  b, c = s.shape
  g = jnp.sum(s.reshape(b, num_groups, c // num_groups), axis=-1) / n
  return jnp.repeat(g, c // num_groups, axis=-1)


def _pixels_and_group_size(x: Array, num_groups: int) -> tuple[tuple[int, ...], int]:
  """The pixel axes of NHWC `x` and how many values each group's statistics cover."""
  return (tuple(range(1, x.ndim - 1)),
          math.prod(x.shape[1:-1]) * (x.shape[-1] // num_groups))


def _channels(s: Array, ndim: int) -> Array:
  """[B, C] -> [B, 1, ..., 1, C], broadcastable against an NHWC map."""
  return s.reshape((s.shape[0],) + (1,) * (ndim - 2) + (s.shape[1],))


# Every full-size array below keeps the channel as its minor axis: per-channel sums over
# the pixels first, then over each group's channels on the small [B, C] sums. A grouped
# [B, H, W, G, C/G] view (nn.GroupNorm's) makes C/G (2 with 64 channels) the minor axis,
# which XLA:CPU does not vectorise: its reductions and the normalisation ran several times
# slower in the UNet.
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _group_norm(x: Array, scale: Array, bias: Array, num_groups: int, epsilon: float):
  return _group_norm_fwd(x, scale, bias, num_groups, epsilon)[0]


def _group_norm_fwd(x, scale, bias, num_groups, epsilon):
  xf = x.astype(jnp.float32)
  pixels, n = _pixels_and_group_size(x, num_groups)
  mean = _group_mean_per_channel(jnp.sum(xf, axis=pixels), num_groups, n)
  var = _group_mean_per_channel(jnp.sum(jnp.square(xf), axis=pixels), num_groups, n)
  inv = jax.lax.rsqrt(jnp.maximum(var - jnp.square(mean), 0.0) + epsilon)     # [B, C]
  a = inv * scale.astype(jnp.float32)
  shift = bias.astype(jnp.float32) - mean * a
  y = xf * _channels(a, x.ndim) + _channels(shift, x.ndim)
  return y, (x, scale, bias, mean, inv)


def _group_norm_bwd(num_groups, epsilon, res, dy):
  del epsilon
  x, scale, bias, mean, inv = res
  pixels, n = _pixels_and_group_size(x, num_groups)
  x_hat = (x.astype(jnp.float32) - _channels(mean, x.ndim)) * _channels(inv, x.ndim)
  dy = dy.astype(jnp.float32)
  d_bias = jnp.sum(dy, axis=(0,) + pixels)
  d_scale = jnp.sum(dy * x_hat, axis=(0,) + pixels)
  dx_hat = dy * scale.astype(jnp.float32)
  m1 = _group_mean_per_channel(jnp.sum(dx_hat, axis=pixels), num_groups, n)
  m2 = _group_mean_per_channel(jnp.sum(dx_hat * x_hat, axis=pixels), num_groups, n)
  dx = _channels(inv, x.ndim) * (dx_hat - _channels(m1, x.ndim) - x_hat * _channels(m2, x.ndim))
  return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
  """GroupNorm over NHWC maps: the function and parameters ('scale', 'bias') of
  nn.GroupNorm, statistics in float32, in a form XLA:CPU runs faster (see _group_norm).
  nn.GroupNorm took a fifth of the CPU sampling pipeline's time. The gradient is written
  out (custom VJP) in the same form; autodiff of it made XLA:CPU transpose the conv
  gradients around it, slowing training.
  """
  num_groups: int
  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f'GroupNorm: {c} channels are not divisible by {self.num_groups} groups.')
    init = lambda i: nn.with_logical_partitioning(i, (None,))  # pylint: disable=unnecessary-lambda-assignment
    scale = self.param('scale', init(nn.initializers.ones), (c,), self.param_dtype)
    bias = self.param('bias', init(nn.initializers.zeros), (c,), self.param_dtype)
    return _group_norm(x, scale, bias, self.num_groups, self.epsilon).astype(self.dtype)


def group_norm(channels: int, dtype: Dtype, param_dtype: Dtype, name: str | None = None
               ) -> GroupNorm:
  return GroupNorm(num_groups=num_groups(channels), epsilon=1e-5, dtype=dtype,
                   param_dtype=param_dtype, name=name)


def dense(features: int, axes: tuple[str | None, str | None], dtype: Dtype,
          param_dtype: Dtype, name: str | None = None, zero: bool = False) -> nn.Dense:
  init = nn.initializers.zeros if zero else nn.initializers.lecun_normal()
  return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=nn.with_logical_partitioning(init, axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


def upsample_nearest(x: Array) -> Array:
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


def downsample_avg(x: Array) -> Array:
  _, h, w, _ = x.shape
  if h % 2 or w % 2:
    raise ValueError(f'UNet: feature map {h}x{w} cannot be halved; the image size must be '
                     f'divisible by 2**(len(channel_mult) - 1).')
  # Four strided slices, not a mean over [B, H/2, 2, W/2, 2, C]: XLA:CPU runs that
  # reduction several times slower than the adds.
  return 0.25 * ((x[:, 0::2, 0::2] + x[:, 1::2, 0::2]) + (x[:, 0::2, 1::2] + x[:, 1::2, 1::2]))


def upsample_low_res(low_res: Array, size: Sequence[int]) -> Array:
  """The upsamplers' view of their low-resolution input: bilinear resize to `size`."""
  b, _, _, c = low_res.shape
  return jax.image.resize(low_res, (b, size[0], size[1], c), method='bilinear',
                          antialias=False)


class ResBlock(nn.Module):
  """ADM residual block with scale-shift norm and optional up/down sampling."""
  out_channels: int
  dropout: float = 0.0
  up: bool = False
  down: bool = False
  deterministic: bool = True
  custom_conv_grad: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array) -> Array:
    conv = functools.partial(Conv, custom_grad=self.custom_conv_grad, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    in_ch = x.shape[-1]
    h = nn.silu(group_norm(in_ch, self.dtype, self.param_dtype, 'in_norm')(x))
    if self.up:   # in_conv upsamples h itself (sub-pixel, models/conv.py)
      x = upsample_nearest(x)
    elif self.down:
      h, x = downsample_avg(h), downsample_avg(x)
    h = conv(self.out_channels, upsample=self.up, name='in_conv')(h)
    scale_shift = dense(2 * self.out_channels, ('mlp', 'conv_out'), self.dtype,
                        self.param_dtype, 'emb_proj')(nn.silu(emb))
    scale, shift = jnp.split(scale_shift[:, None, None, :].astype(self.dtype), 2, axis=-1)
    h = group_norm(self.out_channels, self.dtype, self.param_dtype, 'out_norm')(h)
    h = nn.silu(h * (1 + scale) + shift)
    h = nn.Dropout(self.dropout)(h, deterministic=self.deterministic)
    h = conv(self.out_channels, kernel_init=nn.initializers.zeros, name='out_conv')(h)
    if in_ch != self.out_channels:
      x = conv(self.out_channels, (1, 1), name='skip')(x)
    return x.astype(self.dtype) + h


class AttentionBlock(nn.Module):
  """Self-attention over the feature map, optionally also attending to context tokens."""
  head_channels: int
  attention_impl: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None,
               context_mask: Array | None = None) -> Array:
    b, h, w, c = x.shape
    if c % self.head_channels:
      raise ValueError(f'UNet attention: {c} channels are not divisible by head_channels '
                       f'{self.head_channels} (config model.head_channels).')
    y = group_norm(c, self.dtype, self.param_dtype, 'norm')(x).reshape(b, h * w, c)
    y = layers.MultiHeadAttention(
        num_heads=c // self.head_channels, attention_impl=self.attention_impl,
        dtype=self.dtype, param_dtype=self.param_dtype, name='attn')(
            y, context=context, context_mask=context_mask)
    return x + y.reshape(b, h, w, c).astype(x.dtype)


class UNet(nn.Module):
  """The ADM UNet. See the module docstring.

  Attributes:
    channels: base channel count (ADM `model_channels`).
    out_channels: 3, or 6 with a learned variance (the model predicts the interpolation
      coefficient of the log-variance in the extra 3 channels).
    channel_mult: channel multiplier per resolution (its length - 1 halvings).
    num_res_blocks: residual blocks per resolution (the decoder path has one more).
    attention_resolutions: feature-map sizes (pixels) at which attention layers sit.
    head_channels: channels per attention head.
    dropout: dropout rate inside residual blocks.
    remat: rematerialise every block in the backward pass.
    custom_conv_grad: fast hand-written convolution gradients on CPU.
    attention_impl: the attention layers' 'xla' or 'cudnn' (layers.MultiHeadAttention).
  """
  channels: int
  out_channels: int = 3
  channel_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = ()
  head_channels: int = 64
  dropout: float = 0.0
  remat: bool = False
  custom_conv_grad: bool = True
  attention_impl: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def emb_dim(self) -> int:
    """Width of the timestep embedding (conditioning added to it must have this width)."""
    return 4 * self.channels

  def lowest_map_shape(self, size: int) -> tuple[int, int, int]:
    """(side, side, channels) of the features entering the lowest resolution's encoder
    blocks for inputs of `size` pixels, where `extra_map` is added (the downsampling block
    before them keeps the previous level's channels)."""
    side = size >> (len(self.channel_mult) - 1)
    return side, side, self.channels * self.channel_mult[max(len(self.channel_mult) - 2, 0)]

  @nn.compact
  def __call__(self, x: Array, t: Array, extra_emb: Array | None = None,
               context: Array | None = None, context_mask: Array | None = None,
               extra_map: Array | None = None, train: bool = False) -> Array:
    """x: [B, H, W, C_in]; t: [B]; extra_emb: [B, emb_dim]; context: [B, M, D];
    extra_map: [B, *lowest_map_shape(H)], added to the features entering the lowest
    resolution's encoder blocks."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    res_block = nn.remat(ResBlock) if self.remat else ResBlock
    attn_block = nn.remat(AttentionBlock) if self.remat else AttentionBlock
    res = functools.partial(res_block, dropout=self.dropout, deterministic=not train,
                            custom_conv_grad=self.custom_conv_grad, **kw)
    attn = functools.partial(attn_block, head_channels=self.head_channels,
                             attention_impl=self.attention_impl, **kw)

    emb = layers.timestep_embedding(t, self.channels)
    emb = dense(self.emb_dim, ('embed', 'mlp'), self.dtype, self.param_dtype,
                'time_embed_0')(emb)
    emb = dense(self.emb_dim, ('mlp', 'embed'), self.dtype, self.param_dtype,
                'time_embed_1')(nn.silu(emb))
    if extra_emb is not None:
      if extra_emb.shape[-1] != self.emb_dim:
        raise ValueError(f'extra_emb width {extra_emb.shape[-1]} != UNet emb_dim '
                         f'{self.emb_dim} (4 * channels).')
      emb = emb + extra_emb.astype(emb.dtype)

    size = x.shape[1]
    uses_attention = lambda level: (size >> level) in tuple(self.attention_resolutions)
    h = Conv(self.channels * self.channel_mult[0], custom_grad=self.custom_conv_grad,
             kernel_axes=(None, None, None, 'conv_out'), name='conv_in', **kw)(x)
    skips = [h]
    # Encoder.
    for level, mult in enumerate(self.channel_mult):
      if level == len(self.channel_mult) - 1 and extra_map is not None:
        if extra_map.shape[1:] != h.shape[1:]:
          raise ValueError(f'UNet extra_map shape {extra_map.shape[1:]} != the lowest '
                           f'feature map {h.shape[1:]}.')
        h = h + extra_map.astype(h.dtype)
      for i in range(self.num_res_blocks):
        h = res(self.channels * mult, name=f'down_{level}_res_{i}')(h, emb)
        if uses_attention(level):
          h = attn(name=f'down_{level}_attn_{i}')(h, context, context_mask)
        skips.append(h)
      if level != len(self.channel_mult) - 1:
        h = res(h.shape[-1], down=True, name=f'down_{level}_downsample')(h, emb)
        skips.append(h)
    # Middle.
    last = len(self.channel_mult) - 1
    h = res(h.shape[-1], name='mid_res_0')(h, emb)
    if self.attention_resolutions:   # ADM always has middle attention when it has any
      h = attn(name='mid_attn')(h, context, context_mask)
    h = res(h.shape[-1], name='mid_res_1')(h, emb)
    # Decoder.
    for level in range(last, -1, -1):
      mult = self.channel_mult[level]
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
        h = res(self.channels * mult, name=f'up_{level}_res_{i}')(h, emb)
        if uses_attention(level):
          h = attn(name=f'up_{level}_attn_{i}')(h, context, context_mask)
      if level:
        h = res(h.shape[-1], up=True, name=f'up_{level}_upsample')(h, emb)
    assert not skips
    h = nn.silu(group_norm(h.shape[-1], self.dtype, self.param_dtype, 'out_norm')(h))
    h = Conv(self.out_channels, custom_grad=self.custom_conv_grad,
             kernel_init=nn.initializers.zeros, kernel_axes=(None, None, 'conv_in', None),
             name='conv_out', **kw)(h)
    return h.astype(jnp.float32)


class TextEncoder(nn.Module):
  """The decoder's own caption encoder (GLIDE): token + position embeddings, a
  bidirectional transformer over the non-padding tokens, a final LayerNorm."""
  width: int
  depth: int
  heads: int
  vocab_size: int = 49408
  context_length: int = 77
  remat: bool = False
  attention_impl: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array) -> tuple[Array, Array]:
    """tokens: int32 [B, L], zero-padded -> (text_encodings [B, L, width], mask [B, L])."""
    if tokens.shape[1] > self.context_length:
      raise ValueError(f'{tokens.shape[1]} tokens > decoder text context_length '
                       f'{self.context_length} (config decoder.model.text.context_length).')
    mask = tokens != 0
    x = nn.Embed(self.vocab_size, self.width, param_dtype=self.param_dtype,
                 embedding_init=nn.with_logical_partitioning(
                     nn.initializers.normal(0.02), ('vocab', 'embed')),
                 name='token_embedding')(tokens).astype(self.dtype)
    pos = self.param('positional_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(0.01), ('length', 'embed')),
                     (self.context_length, self.width), self.param_dtype)
    x = x + pos[None, :tokens.shape[1]].astype(self.dtype)
    x = layers.Transformer(width=self.width, depth=self.depth, num_heads=self.heads,
                           remat=self.remat, attention_impl=self.attention_impl,
                           dtype=self.dtype, param_dtype=self.param_dtype,
                           name='transformer')(x, mask=mask)
    x = layers.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='ln_final')(x)
    return x, mask


class Decoder(nn.Module):
  """unCLIP's 64 px decoder: a UNet conditioned on a CLIP image embedding and a caption.

  Attributes:
    unet: the UNet (its `out_channels` 6 for a learned variance).
    num_clip_tokens: extra context tokens projected from the CLIP image embedding (paper 4).
    clip_embed_map: also project the CLIP image embedding into a feature map at the UNet's
      lowest resolution, added to the features there (not in the paper). The paper's two
      paths are global (a scale and shift for every pixel alike) or read through attention;
      this one gives each location weights of its own, so where objects go is a direct
      function of the embedding (on captioned_shapes: two-object scenes' layout).
    text_encoder: 'clip' (caption token encodings from the frozen CLIP text tower, passed
      as `text_encodings`) or 'own' (a `TextEncoder` trained with the decoder, fed `tokens`).
    text_embed_in_time: also project the caption's CLIP text embedding (`text_embed`) and
      add it to the timestep embedding, beside the image embedding's projection (GLIDE adds
      its text encoder's final token there; Karlo the CLIP text embedding). Dropped with
      the caption (`text_keep`). 'clip' encoder only.
    text: TextEncoder fields (width, depth, heads, vocab_size, context_length), 'own' only.
  """
  unet: UNet
  num_clip_tokens: int = 4
  clip_embed_map: bool = False
  text_encoder: str = 'clip'
  text_embed_in_time: bool = False
  text: dict | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, t: Array, clip_image_embed: Array,
               text_encodings: Array | None = None, text_mask: Array | None = None,
               tokens: Array | None = None, image_embed_keep: Array | None = None,
               text_keep: Array | None = None, text_embed: Array | None = None,
               train: bool = False) -> Array:
    """Predicts the diffusion target for x [B, H, W, 3] at timestep t [B].

    clip_image_embed: [B, E]. text_encodings/text_mask: [B, L, D] / [B, L] bool
    ('clip' encoder). text_embed: [B, E] (`text_embed_in_time` only). tokens: int32 [B, L]
    ('own' encoder). image_embed_keep/text_keep: bool [B], False where classifier-free
    guidance drops that condition (None = keep all).
    """
    b = x.shape[0]
    if self.text_encoder == 'own':
      if tokens is None:
        raise ValueError("Decoder with text_encoder='own' needs `tokens`.")
      text_encodings, text_mask = TextEncoder(**(self.text or {}), dtype=self.dtype,
                                              param_dtype=self.param_dtype,
                                              remat=self.unet.remat,
                                              attention_impl=self.unet.attention_impl,
                                              name='text')(tokens)
    elif self.text_encoder != 'clip':
      raise ValueError(f"Unknown decoder text_encoder {self.text_encoder!r}: use 'clip' "
                       "(frozen CLIP text tower) or 'own' (config decoder.model.text_encoder).")
    embed_dim = clip_image_embed.shape[-1]
    null_embed = self.param('null_image_embed', nn.with_logical_partitioning(
        nn.initializers.normal(1.0 / math.sqrt(embed_dim)), (None,)), (embed_dim,),
                            self.param_dtype)
    z = clip_image_embed.astype(self.dtype)
    if image_embed_keep is not None:
      z = jnp.where(image_embed_keep[:, None], z, null_embed[None].astype(self.dtype))
    extra_emb = dense(self.unet.emb_dim, (None, 'mlp'), self.dtype, self.param_dtype,
                      'clip_embed_proj')(z)
    if self.text_embed_in_time:
      if text_embed is None or self.text_encoder != 'clip':
        raise ValueError("Decoder with text_embed_in_time needs text_encoder='clip' and "
                         '`text_embed`.')
      zt = text_embed.astype(self.dtype)
      if text_keep is not None:
        zt = jnp.where(text_keep[:, None], zt, 0.0)
      extra_emb = extra_emb + dense(self.unet.emb_dim, (None, 'mlp'), self.dtype,
                                    self.param_dtype, 'text_embed_proj')(zt)
    extra_map = None
    if self.clip_embed_map:
      shape = self.unet.lowest_map_shape(x.shape[1])
      extra_map = dense(math.prod(shape), (None, 'embed'), self.dtype, self.param_dtype,
                        'clip_embed_map_proj')(z).reshape(b, *shape)
    context = context_mask = None
    if self.num_clip_tokens or text_encodings is not None:
      width = text_encodings.shape[-1] if text_encodings is not None else embed_dim
      context = dense(self.num_clip_tokens * width, (None, 'embed'), self.dtype,
                      self.param_dtype, 'clip_tokens_proj')(z)
      context = context.reshape(b, self.num_clip_tokens, width)
      context_mask = jnp.ones((b, self.num_clip_tokens), jnp.bool_)
      if text_encodings is not None:
        if text_mask is None:
          text_mask = jnp.ones(text_encodings.shape[:2], jnp.bool_)
        text_mask = jnp.asarray(text_mask, jnp.bool_)
        if text_keep is not None:
          text_mask = text_mask & text_keep[:, None]
        text_encodings = text_encodings.astype(self.dtype) * text_mask[..., None]
        context = jnp.concatenate([context, text_encodings], axis=1)
        context_mask = jnp.concatenate([context_mask, text_mask], axis=1)
    return self.unet(x, t, extra_emb=extra_emb, context=context, context_mask=context_mask,
                     extra_map=extra_map, train=train)


class Upsampler(nn.Module):
  """A super-resolution UNet: the low-res image (upsampled) concatenated to the input.

  Attributes:
    unet: the UNet (no attention, so any input size works).
    noise_level_cond: embed the noise-augmentation level `noise_level` and add it to the
      timestep embedding.
    image_embed_cond: project the CLIP image embedding `clip_image_embed` (the decoder's
      input) and add it to the timestep embedding, as the decoder does. The paper's
      upsamplers see only the low-res image; DALLE2-pytorch lets every UNet of the cascade
      take the embedding.
  """
  unet: UNet
  noise_level_cond: bool = False
  image_embed_cond: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, t: Array, low_res: Array, noise_level: Array | None = None,
               train: bool = False, clip_image_embed: Array | None = None) -> Array:
    """x: [B, H, W, 3] noisy high-res; low_res: [B, h, w, 3] (resized to H x W if needed);
    noise_level: [B] timestep of the low-res noise augmentation (0 = none);
    clip_image_embed: [B, E] (`image_embed_cond` only)."""
    if low_res.shape[1:3] != x.shape[1:3]:
      low_res = upsample_low_res(low_res, x.shape[1:3])
    h = jnp.concatenate([x.astype(self.dtype), low_res.astype(self.dtype)], axis=-1)
    extra_emb = None
    if self.noise_level_cond:
      if noise_level is None:
        noise_level = jnp.zeros((x.shape[0],), jnp.float32)
      e = layers.timestep_embedding(noise_level, self.unet.channels)
      e = dense(self.unet.emb_dim, (None, 'mlp'), self.dtype, self.param_dtype,
                'noise_level_embed_0')(e)
      extra_emb = dense(self.unet.emb_dim, ('mlp', 'embed'), self.dtype, self.param_dtype,
                        'noise_level_embed_1')(nn.silu(e))
    if self.image_embed_cond:
      if clip_image_embed is None:
        raise ValueError('Upsampler with image_embed_cond needs `clip_image_embed`.')
      e = dense(self.unet.emb_dim, (None, 'mlp'), self.dtype, self.param_dtype,
                'clip_embed_proj')(clip_image_embed.astype(self.dtype))
      extra_emb = e if extra_emb is None else extra_emb + e
    return self.unet(h, t, extra_emb=extra_emb, train=train)


def unet_from_config(model_config, out_channels: int, remat: bool = False,
                     dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32) -> UNet:
  """A UNet from a config section's `model` fields (see configs/tiny.py)."""
  m = model_config
  return UNet(channels=m.channels, out_channels=out_channels,
              channel_mult=tuple(m.channel_mult), num_res_blocks=m.num_res_blocks,
              attention_resolutions=tuple(m.attention_resolutions),
              head_channels=m.head_channels, dropout=m.dropout, remat=remat,
              custom_conv_grad=m.get('custom_conv_grad', True),
              attention_impl=m.get('attention_impl', 'xla'), dtype=dtype,
              param_dtype=param_dtype)
