"""The diffusion prior: a decoder-only causal transformer that denoises CLIP image embeddings.

Token sequence (unCLIP, Ramesh et al. 2022, Sec. 2.1 and App. C), in this order:

  [text_encodings (L tokens), text_embed, timestep embedding, noised image embed, query]

each projected to `width`, plus a learned position embedding. With `text_encodings=False` the
L token encodings are left out and the prior sees the caption only through CLIP's pooled text
embedding (not the paper's; configs/shapes.py says why). A causal transformer
(`layers.Transformer`, pre-LN, causal mask combined with the text padding mask) runs over it;
the output at the final learned query, after a LayerNorm and a linear head, is the model's
prediction of the objective (x0 in the paper: the clean, normalised image embedding). Only
that output is read, so the last block computes queries, attention and MLP for that position
alone: the same function in 20% fewer FLOPs at depth 4 (40% at depth 2, 10% at depth 8;
DALLE2-pytorch computes every position).

Classifier-free guidance: where `drop_cond` is True the text encodings are replaced by learned
null encodings (all positions attended) and the text embedding by a learned null embedding.

Params (logical axis names in brackets):
  text_enc_proj, text_embed_proj, image_embed_proj, time_mlp/{dense_0,dense_1}: Dense
      kernels ('embed' or None, 'embed')
  null_text_encodings [L, text_width] (None, 'embed'), null_text_embed [D] ('embed',),
  query [width] ('embed',), position_embedding [L + 4, width] (None, 'embed')
  (text_encodings=False: no text_enc_proj or null_text_encodings, position_embedding [4, width])
  transformer/layers_i/...  (see layers.py), ln_final, head (Dense to D)
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dalle2_jax.models import flops as flops_lib
from dalle2_jax.models import layers

Dtype = Any
Array = jax.Array


def _dense(features, names, dtype, param_dtype, name, use_bias=True, zero=False):
  init = nn.initializers.zeros if zero else layers.dense_init()
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  name=name, kernel_init=nn.with_logical_partitioning(init, names),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[-1],)))


class PriorTransformer(nn.Module):
  """Causal-transformer diffusion prior over CLIP embeddings.

  Attributes:
    embed_dim: D, the CLIP embedding size (input and output of the prior).
    width, depth, num_heads: the transformer.
    context_length: L, the number of text tokens (CLIP's context length).
    text_width: width of the CLIP text encodings.
    mlp_dim: transformer MLP size (default 4 * width).
    activation: the MLP's activation (layers.ACTIVATIONS). The configs take 'gelu_tanh'
      (GPT-2's tanh form of GELU): XLA:CPU's erf made a prior step 4-5% slower. The default
      stays 'gelu' (erf), which priors trained before the config field existed used.
    remat: rematerialise the transformer blocks.
    attention_impl: the transformer's attention, 'xla' or 'cudnn' (layers.MultiHeadAttention).
    text_encodings: whether the caption's token encodings are in the sequence (the paper's
      prior); False: the pooled text embedding alone (text_encodings and text_mask ignored).
  """
  embed_dim: int
  width: int
  depth: int
  num_heads: int
  context_length: int
  text_width: int
  mlp_dim: int | None = None
  activation: str = 'gelu'
  remat: bool = False
  attention_impl: str = 'xla'
  text_encodings: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_t: Array, t: Array, text_embed: Array, text_encodings: Array,
               text_mask: Array, drop_cond: Array | None = None) -> Array:
    """x_t [B, D] noised (normalised) image embed; t [B] int; text_embed [B, D] (normalised);
    text_encodings [B, L, text_width]; text_mask [B, L] bool; drop_cond [B] bool or None.
    Returns the prediction [B, D] in float32."""
    x_t, text_embed, text_encodings = (jnp.asarray(a).astype(self.dtype)
                                       for a in (x_t, text_embed, text_encodings))
    b, length = text_encodings.shape[:2]
    if length != self.context_length:
      raise ValueError(f'text_encodings have {length} tokens; the prior was built for '
                       f'{self.context_length} (tokenizer.context_length).')
    if x_t.shape[-1] != self.embed_dim or text_embed.shape[-1] != self.embed_dim:
      raise ValueError(f'Embeddings must have dim {self.embed_dim}; got x_t {x_t.shape}, '
                       f'text_embed {text_embed.shape}.')
    dense = functools.partial(_dense, dtype=self.dtype, param_dtype=self.param_dtype)
    pinit = lambda names, std=0.02: nn.with_logical_partitioning(  # noqa: E731
        nn.initializers.normal(std), names)

    text_mask = jnp.asarray(text_mask, jnp.bool_)
    if not self.text_encodings:
      text_encodings, text_mask = text_encodings[:, :0], text_mask[:, :0]
    if drop_cond is not None:
      drop = jnp.asarray(drop_cond, jnp.bool_)
      null_emb = self.param('null_text_embed', pinit(('embed',)), (self.embed_dim,),
                            self.param_dtype)
      text_embed = jnp.where(drop[:, None], null_emb[None].astype(self.dtype), text_embed)
      if self.text_encodings:
        null_enc = self.param('null_text_encodings', pinit((None, 'embed')),
                              (self.context_length, self.text_width), self.param_dtype)
        text_encodings = jnp.where(drop[:, None, None], null_enc[None].astype(self.dtype),
                                   text_encodings)
        text_mask = jnp.where(drop[:, None], True, text_mask)

    enc = (dense(self.width, (None, 'embed'), name='text_enc_proj')(text_encodings)
           if self.text_encodings else jnp.zeros((b, 0, self.width), self.dtype))
    emb = dense(self.width, ('embed', 'mlp'), name='text_embed_proj')(text_embed)
    img = dense(self.width, ('embed', 'mlp'), name='image_embed_proj')(x_t)
    temb = layers.timestep_embedding(t, self.width).astype(self.dtype)
    temb = dense(self.width, ('embed', 'mlp'), name='time_mlp_0')(temb)
    temb = dense(self.width, ('mlp', 'embed'), name='time_mlp_1')(nn.silu(temb))
    query = self.param('query', pinit(('embed',)), (self.width,), self.param_dtype)
    seq = jnp.concatenate([
        enc, emb[:, None], temb[:, None], img[:, None],
        jnp.broadcast_to(query.astype(self.dtype), (b, 1, self.width))], axis=1)
    pos = self.param('position_embedding', pinit((None, 'embed'), 0.01),
                     (enc.shape[1] + 4, self.width), self.param_dtype)
    seq = seq + pos.astype(self.dtype)[None]
    mask = jnp.concatenate([text_mask, jnp.ones((b, 4), jnp.bool_)], axis=1)
    h = layers.Transformer(
        width=self.width, depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        activation=self.activation, causal=True, remat=self.remat,
        attention_impl=self.attention_impl, dtype=self.dtype, param_dtype=self.param_dtype,
        name='transformer')(seq, mask=mask, num_outputs=1)
    h = layers.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                         name='ln_final')(h[:, -1])
    out = dense(self.embed_dim, ('embed', 'mlp'), name='head')(h)
    return out.astype(jnp.float32)


def flops_per_example(embed_dim: int, width: int, depth: int, context_length: int,
                      text_width: int, mlp_dim: int | None = None,
                      text_encodings: bool = True) -> float:
  """Analytic forward FLOPs of one prior call (dense matmuls 2mnk + attention 2*2*Lq*Lk*W).
  The last block queries from the final position only (PriorTransformer)."""
  if not text_encodings:
    context_length = 0
  flops = 2 * context_length * text_width * width        # text encodings projection
  flops += 2 * 2 * embed_dim * width                      # text embed, image embed projections
  flops += 2 * 2 * width * width                          # timestep MLP
  flops += flops_lib.transformer_flops(context_length + 4, width, depth, mlp_dim,
                                       num_outputs=1)
  flops += 2 * width * embed_dim                          # head
  return float(flops)
