"""Transformer building blocks shared by CLIP, the diffusion prior and the decoder.

Everything here is a small pure Linen module (no I/O, no globals):

  MultiHeadAttention  self-attention with an optional causal mask, an optional key padding
                      mask and optional extra context tokens (GLIDE style: the context is
                      projected to keys/values of its own and put in front of the sequence's
                      keys/values, so every query can attend to it)
  Mlp                 fc1 -> activation ('quick_gelu', 'gelu', 'gelu_tanh', 'relu') -> fc2
  ResidualBlock       pre-LayerNorm block: x + attn(ln_1(x)); x + mlp(ln_2(x))
  Transformer         a stack of ResidualBlocks, `layers_0 ... layers_{depth-1}`, with
                      optional rematerialisation (`remat=True`)

Shapes: activations are [batch, length, width] ('batch', 'length', 'embed'). Params carry
logical axis names ('embed', 'mlp', 'heads', 'kv') that the engine maps to mesh axes:

  attn/query|key|value   kernel [width, heads, head_dim] ('embed', 'heads', 'kv'),
                         bias [heads, head_dim] ('heads', 'kv')
  attn/out               kernel [heads, head_dim, width] ('heads', 'kv', 'embed'), bias [width]
  mlp/fc1, mlp/fc2       kernel [width, mlp] / [mlp, width], biases [mlp] / [width]
  ln_1, ln_2             scale, bias [width] ('embed',)

Attention logits and softmax are computed in float32 whatever `dtype` is; masked logits
are set to the most negative float32, so a fully masked row gives a uniform (not NaN)
distribution. That is `attention_impl='xla'`, the default: XLA materialises the logits,
[B, heads, Lq, Lk] in float32. `attention_impl='cudnn'` (NVIDIA GPUs, bfloat16 or float16)
runs cuDNN's fused flash attention through `jax.nn.dot_product_attention` instead, which
keeps no logits in memory (they were what filled an 80 GB H100 at the GPU decoder's 32 px
attention, bench/matched.py); masks become an additive bias over every query row there.
On CPU the tests check that jax's generic path given the same arguments matches 'xla';
tests/test_gpu.py checks cuDNN itself on a GPU (passed on an H200, jax 0.11.2).

Masks are booleans, True = may attend. `mask` is either a key padding mask [B, Lk] or a
full mask broadcastable to [B, heads, Lq, Lk]; it is combined (logical and) with the causal
mask when `causal=True`. A context's own mask (`context_mask`, [B, Lc]) is never causal.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Array = jax.Array


def quick_gelu(x: Array) -> Array:
  """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    'quick_gelu': quick_gelu,
    'gelu': functools.partial(jax.nn.gelu, approximate=False),   # exact (erf), as torch/HF
    'gelu_tanh': functools.partial(jax.nn.gelu, approximate=True),
    'relu': jax.nn.relu,
}


def get_activation(name: str) -> Callable[[Array], Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f'Unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)} '
                     '(config field `activation`).')
  return ACTIVATIONS[name]


def dense_init(std: float | None = None, in_axis=-2, out_axis=-1):
  """Kernel initializer: normal(std) if std is given, else lecun normal (fan-in over
  `in_axis`, which may be a tuple for multi-axis kernels such as [heads, head_dim, width])."""
  if std is None:
    return nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal',
                                            in_axis=in_axis, out_axis=out_axis)
  return nn.initializers.normal(stddev=std)


class HeadsDense(nn.Module):
  """[..., in] -> [..., heads, head_dim] projection (kernel [in, heads, head_dim]).

  Same parameters as nn.DenseGeneral(features=(heads, head_dim)), but the kernel is created
  in its final shape, so its logical partitioning applies to it as is.
  """
  num_heads: int
  head_dim: int
  use_bias: bool = True
  kernel_std: float | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param(
        'kernel', nn.with_logical_partitioning(
            dense_init(self.kernel_std, in_axis=0, out_axis=(1, 2)), ('embed', 'heads', 'kv')),
        (x.shape[-1], self.num_heads, self.head_dim), self.param_dtype)
    y = jnp.einsum('...w,whd->...hd', x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                             ('heads', 'kv')),
                        (self.num_heads, self.head_dim), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class HeadsOut(nn.Module):
  """[..., heads, head_dim] -> [..., features] projection (kernel [heads, head_dim, features])."""
  features: int
  use_bias: bool = True
  kernel_std: float | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param(
        'kernel', nn.with_logical_partitioning(
            dense_init(self.kernel_std, in_axis=(0, 1), out_axis=2), ('heads', 'kv', 'embed')),
        x.shape[-2:] + (self.features,), self.param_dtype)
    y = jnp.einsum('...hd,hdw->...w', x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param('bias', nn.with_logical_partitioning(nn.initializers.zeros,
                                                             ('embed',)),
                        (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


def causal_mask(length: int) -> Array:
  """[1, 1, L, L] bool, True on and below the diagonal."""
  return jnp.tril(jnp.ones((length, length), jnp.bool_))[None, None]


def _as_full_mask(mask: Array | None) -> Array | None:
  """A [B, Lk] key mask or a full mask -> a mask broadcastable to [B, H, Lq, Lk]."""
  if mask is None:
    return None
  mask = jnp.asarray(mask, jnp.bool_)
  if mask.ndim == 2:
    return mask[:, None, None, :]
  if mask.ndim == 4:
    return mask
  raise ValueError(f'Attention mask must be [B, Lk] or [B, H|1, Lq, Lk], got {mask.shape}.')


def combine_masks(*masks: Array | None) -> Array | None:
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  return functools.reduce(jnp.logical_and, masks)


def LayerNorm(epsilon: float = 1e-5, dtype: Dtype = jnp.float32,  # pylint: disable=invalid-name
              param_dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
  """nn.LayerNorm over the last axis with logically partitioned scale and bias ('embed',)."""
  return nn.LayerNorm(
      epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))


ATTENTION_IMPLS = ('xla', 'cudnn')


def check_attention_impl(impl: str, dtype: Dtype, head_dim: int | None = None,
                         field: str = 'model.attention_impl',
                         dtype_field: str = 'dtype') -> None:
  """Raises a ValueError naming config `field` (and `dtype_field`) unless `impl` can run
  here in `dtype` with heads of `head_dim`."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f'{field}={impl!r}; choose one of {ATTENTION_IMPLS}.')
  if impl != 'cudnn':
    return
  if jax.default_backend() != 'gpu':
    raise ValueError(f"{field}='cudnn' runs on NVIDIA GPUs only (this backend is "
                     f"{jax.default_backend()!r}); set {field}='xla'.")
  if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
    raise ValueError(f"{field}='cudnn' needs bfloat16 or float16 compute, got "
                     f"{jnp.dtype(dtype).name}: set {dtype_field}='bfloat16' or {field}='xla'.")
  if head_dim is not None and (head_dim % 8 or head_dim > 128):
    raise ValueError(f"{field}='cudnn' needs a head size that is a multiple of 8 and at "
                     f"most 128, got {head_dim}; change the heads or set {field}='xla'.")


def attend(q: Array, k: Array, v: Array, mask: Array | None, dtype: Dtype,
           fused: str | None = None) -> Array:
  """softmax(q k^T / sqrt(D)) v with `mask` (bool, broadcastable to [B, H, Lq, Lk]):
  q [B, Lq, H, D], k and v [B, Lk, H, D] -> [B, Lq, H, D] in `dtype`.

  fused: None computes the float32 logits here (MultiHeadAttention's 'xla'); otherwise the
  `implementation` of `jax.nn.dot_product_attention` ('cudnn'; 'xla' is its generic path),
  which takes q, k and v in `dtype` and the mask as a bias over every query row.
  """
  scale = q.shape[-1] ** -0.5
  # cuDNN's kernel takes no single-query attention (the prior's last block); the plain path
  # is as fast there.
  if fused is not None and q.shape[1] > 1:
    lq = q.shape[1]
    if mask is not None:
      # Every head explicit: jax's vmap rule for the cuDNN kernel (UnCLIP's sampler vmaps
      # over examples) reshapes the mask as if it had one row per head.
      b, h, lk = q.shape[0], q.shape[2], k.shape[1]
      mask = jnp.broadcast_to(mask, (b, h, lq, lk))
      # With a mask (a bias to cuDNN) its training kernel takes even lengths only: an odd
      # one gets a masked key, or a query row that is dropped again.
      pad_q, pad_k = lq % 2, lk % 2
      pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))  # noqa: E731
      q, k, v = pad(q, pad_q), pad(k, pad_k), pad(v, pad_k)
      mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, pad_k)), constant_values=False)
      mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pad_q), (0, 0)), constant_values=True)
    out = jax.nn.dot_product_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                       mask=mask, scale=scale, implementation=fused)
    return out[:, :lq]
  logits = jnp.einsum('bqhd,bkhd->bhqk', q.astype(jnp.float32) * scale,
                      k.astype(jnp.float32))
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
  return jnp.einsum('bhqk,bkhd->bhqd', probs, v).transpose(0, 2, 1, 3)


class MultiHeadAttention(nn.Module):
  """Multi-head dot-product self-attention, optionally also attending to a context.

  Attributes:
    num_heads: number of heads.
    head_dim: size of each head; default width // num_heads.
    out_features: output width; default the input width.
    use_bias: biases on the q/k/v/out projections.
    causal: apply a causal mask over the sequence's own keys.
    kernel_std: std of the normal kernel init (None = lecun normal).
    attention_impl: 'xla' (float32 logits in memory) or 'cudnn' (fused, NVIDIA GPUs in
      bfloat16/float16); see the module docstring.
  """
  num_heads: int
  head_dim: int | None = None
  out_features: int | None = None
  use_bias: bool = True
  causal: bool = False
  kernel_std: float | None = None
  attention_impl: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _proj(self, name: str, head_dim: int) -> HeadsDense:
    return HeadsDense(num_heads=self.num_heads, head_dim=head_dim, use_bias=self.use_bias,
                      kernel_std=self.kernel_std, dtype=self.dtype,
                      param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None, context: Array | None = None,
               context_mask: Array | None = None, num_queries: int | None = None) -> Array:
    """x: [B, L, W]; mask: [B, L] or [B, H|1, L, L]; context: [B, Lc, Wc]; -> [B, L, W_out].

    num_queries: only the last n positions query (-> [B, n, W_out]); the keys and values are
    still every position's, so those rows equal the full call's last n rows.
    """
    width = x.shape[-1]
    if self.head_dim is None and width % self.num_heads:
      raise ValueError(f'width {width} is not divisible by heads {self.num_heads}.')
    head_dim = self.head_dim or width // self.num_heads
    x = x.astype(self.dtype)
    seq_len = x.shape[1]
    q_len = seq_len if num_queries is None else num_queries
    if not 0 < q_len <= seq_len:
      raise ValueError(f'num_queries={num_queries} must be in [1, {seq_len}].')
    q = self._proj('query', head_dim)(x[:, seq_len - q_len:])
    k = self._proj('key', head_dim)(x)
    v = self._proj('value', head_dim)(x)
    def query_rows(m):   # a full mask's rows of the positions that query
      return m if m is None or m.shape[-2] == 1 else m[..., seq_len - q_len:, :]
    mask = query_rows(combine_masks(_as_full_mask(mask),
                                    causal_mask(seq_len) if self.causal else None))
    if context is not None:
      context = context.astype(self.dtype)
      ck = self._proj('context_key', head_dim)(context)
      cv = self._proj('context_value', head_dim)(context)
      k = jnp.concatenate([ck, k], axis=1)
      v = jnp.concatenate([cv, v], axis=1)
      if mask is not None or context_mask is not None:
        b, lc = context.shape[0], context.shape[1]
        cmask = (jnp.ones((b, 1, 1, lc), jnp.bool_) if context_mask is None
                 else query_rows(_as_full_mask(context_mask)))
        smask = jnp.ones((b, 1, 1, seq_len), jnp.bool_) if mask is None else mask
        shape = jnp.broadcast_shapes(cmask.shape[:-1], smask.shape[:-1])
        mask = jnp.concatenate([jnp.broadcast_to(cmask, shape + (lc,)),
                                jnp.broadcast_to(smask, shape + (seq_len,))], axis=-1)

    check_attention_impl(self.attention_impl, self.dtype, head_dim)
    out = attend(q, k, v, mask, self.dtype,
                 fused='cudnn' if self.attention_impl == 'cudnn' else None)
    return HeadsOut(features=self.out_features or width, use_bias=self.use_bias,
                    kernel_std=self.kernel_std, dtype=self.dtype,
                    param_dtype=self.param_dtype, name='out')(out)


class Mlp(nn.Module):
  """fc1 -> activation -> fc2. `mlp_dim` hidden units; output width = input width."""
  mlp_dim: int
  activation: str = 'gelu'
  kernel_std: float | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    width = x.shape[-1]
    dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.mlp_dim, name='fc1',
              kernel_init=nn.with_logical_partitioning(dense_init(self.kernel_std),
                                                       ('embed', 'mlp')),
              bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('mlp',)))(x)
    h = get_activation(self.activation)(h)
    return dense(width, name='fc2',
                 kernel_init=nn.with_logical_partitioning(dense_init(self.kernel_std),
                                                          ('mlp', 'embed')),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))(h)


class ResidualBlock(nn.Module):
  """Pre-LayerNorm transformer block: x += attn(ln_1(x)); x += mlp(ln_2(x))."""
  num_heads: int
  mlp_dim: int
  activation: str = 'gelu'
  causal: bool = False
  layer_norm_eps: float = 1e-5
  kernel_std: float | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  num_queries: int | None = None   # only the last n positions' outputs (MultiHeadAttention)
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None, context: Array | None = None,
               context_mask: Array | None = None) -> Array:
    ln = functools.partial(LayerNorm, epsilon=self.layer_norm_eps, dtype=self.dtype,
                           param_dtype=self.param_dtype)
    h = ln(name='ln_1')(x)
    if self.num_queries is not None:
      x = x[:, x.shape[1] - self.num_queries:]
    x = x + MultiHeadAttention(
        num_heads=self.num_heads, causal=self.causal, kernel_std=self.kernel_std,
        attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
        name='attn')(
            h, mask=mask, context=context, context_mask=context_mask,
            num_queries=self.num_queries)
    h = ln(name='ln_2')(x)
    return x + Mlp(mlp_dim=self.mlp_dim, activation=self.activation,
                   kernel_std=self.kernel_std, dtype=self.dtype,
                   param_dtype=self.param_dtype, name='mlp')(h)


class Transformer(nn.Module):
  """`depth` pre-LN ResidualBlocks named layers_0 ... (no final LayerNorm; callers add one).

  Attributes:
    width: not a parameter of the modules (taken from the input), checked against it.
    mlp_dim: hidden units of each MLP; default 4 * width.
    remat: rematerialise each block in the backward pass (saves activation memory).
    attention_impl: MultiHeadAttention's ('xla' or 'cudnn').
  """
  width: int
  depth: int
  num_heads: int
  mlp_dim: int | None = None
  activation: str = 'gelu'
  causal: bool = False
  layer_norm_eps: float = 1e-5
  kernel_std: float | None = None
  remat: bool = False
  attention_impl: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array | None = None, context: Array | None = None,
               context_mask: Array | None = None, num_outputs: int | None = None) -> Array:
    """x [B, L, W] -> [B, L, W], or with `num_outputs` only the last n positions [B, n, W]:
    the final block then computes queries, attention and MLP for those alone (a caller that
    reads one token, like the prior, skips most of the last block)."""
    if x.shape[-1] != self.width:
      raise ValueError(f'Transformer width {self.width} != input width {x.shape[-1]}.')
    block = nn.remat(ResidualBlock) if self.remat else ResidualBlock
    for i in range(self.depth):
      x = block(num_heads=self.num_heads, mlp_dim=self.mlp_dim or 4 * self.width,
                activation=self.activation, causal=self.causal,
                layer_norm_eps=self.layer_norm_eps, kernel_std=self.kernel_std,
                num_queries=num_outputs if i == self.depth - 1 else None,
                attention_impl=self.attention_impl, dtype=self.dtype,
                param_dtype=self.param_dtype, name=f'layers_{i}')(x, mask, context, context_mask)
    return x


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
  """Sinusoidal embedding [B, dim] of (integer or real) timesteps t [B] (ADM/GLIDE layout:
  cos half then sin half)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb
