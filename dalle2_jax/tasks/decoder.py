"""Stage `decoder`: the unCLIP decoder, a diffusion UNet from CLIP image embeddings to images.

Training (unCLIP Sec. 2.1, App. C): a frozen CLIP (an export directory:
`config.decoder.clip_checkpoint`, or <workdir>/clip/export when empty) embeds each batch inside
`loss` (the engine passes its params as `frozen`): the CLIP *image* embedding of the training
image (L2-normalised and scaled by sqrt(D), like the prior's 'l2' space, so the decoder takes
what the prior samples) and, with `model.text_encoder='clip'`, the caption's token encodings
from the CLIP text tower. With `text_encoder='own'` the decoder trains a text transformer of
its own on the tokens (GLIDE; `model.text` sets its width/depth/heads). The UNet
(`models.unet.Decoder`) sees the embedding added to its timestep embedding and as
`model.num_clip_tokens` extra context tokens joined to the caption's encodings, and with
`model.clip_embed_map` also as a feature map at its lowest resolution.

Classifier-free guidance: per example, the CLIP embedding is replaced by a learned null
embedding with probability `model.image_embed_drop_prob` (paper 10%) and the caption is
masked out with probability `model.text_drop_prob` (paper 50%), independently. Sampling
with guidance drops both for the unconditional half; with `sample.image_embed_guidance_scale`
the embedding and the caption are guided with separate scales (`diffusion.
classifier_free_guidance`), which also takes the output with only the caption dropped.

Loss: `config.decoder.diffusion` (paper: cosine schedule, 1000 steps, eps objective with a
learned variance, hybrid loss L_simple + 0.001 L_vlb); plain eps / x0 / v objectives with
`learned_variance=False`.

The input pipeline loads images at max(image_size, CLIP's resolution) (`input_image_size`):
CLIP embeds the full image, as for the prior, and the diffusion target is it resized to
image_size. `recolour_prob` (captioned_shapes only, tasks/recolour.py) recolours that
fraction of each batch, so objects' colours come from the image embedding.

A batch may carry precomputed CLIP image embeddings as 'clip_image_embed' [B, D] (CLIP space,
see tasks/clip_embeddings.py); they are used instead of embedding the images.

Metrics: loss, mse, vlb (learned variance), image_embed_drop_frac and text_drop_frac (the
fractions dropped in this batch).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax import diffusion as diffusion_lib
from dalle2_jax.models import clip as clip_lib
from dalle2_jax.models import flops as flops_lib
from dalle2_jax.models import layers
from dalle2_jax.models import unet as unet_lib
from dalle2_jax.tasks import base
from dalle2_jax.tasks import recolour as recolour_lib

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
TEXT_ENCODERS = ('clip', 'own')


def stage_dtype(config, stage: str):
  name = config[stage].get('dtype', 'float32')
  if name not in DTYPES:
    raise ValueError(f'config.{stage}.dtype={name!r}; choose one of {sorted(DTYPES)}.')
  return DTYPES[name]


def diffusion_from_config(config, stage: str) -> diffusion_lib.GaussianDiffusion:
  if 'diffusion' not in config[stage]:
    raise ValueError(f'config.{stage}.diffusion is missing (schedule, timesteps, objective, '
                     'learned_variance).')
  return diffusion_lib.GaussianDiffusion.from_config(config[stage].diffusion)


def text_config(config, stage: str) -> dict[str, Any]:
  """The own text encoder's fields; context_length defaults to the tokenizer's."""
  m = config[stage].model
  t = dict(m.get('text', None) or {})
  missing = [k for k in ('width', 'depth', 'heads') if k not in t]
  if missing:
    raise ValueError(f"config.{stage}.model.text_encoder='own' needs model.text with "
                     f'{missing} (e.g. text=dict(width=2048, depth=24, heads=32)).')
  t.setdefault('vocab_size', 49408)
  t.setdefault('context_length', int(config.tokenizer.context_length))
  return {k: t[k] for k in ('width', 'depth', 'heads', 'vocab_size', 'context_length')}


def build_decoder(config, stage: str = 'decoder') -> unet_lib.Decoder:
  """The decoder module of `config[stage]` (its input widths follow the inputs at init)."""
  sc = config[stage]
  m = sc.model
  text_encoder = m.get('text_encoder', 'clip')
  if text_encoder not in TEXT_ENCODERS:
    raise ValueError(f'config.{stage}.model.text_encoder={text_encoder!r}; choose one of '
                     f'{TEXT_ENCODERS}.')
  if m.get('text_embed_in_time', False) and text_encoder != 'clip':
    raise ValueError(f'config.{stage}.model.text_embed_in_time needs the CLIP text '
                     "embedding: set text_encoder='clip' or text_embed_in_time=False.")
  learned = bool(sc.diffusion.get('learned_variance', False))
  dtype = stage_dtype(config, stage)
  net = unet_lib.unet_from_config(m, out_channels=6 if learned else 3,
                                  remat=bool(sc.get('remat', False)), dtype=dtype)
  layers.check_attention_impl(net.attention_impl, dtype,
                              field=f'config.{stage}.model.attention_impl',
                              dtype_field=f'config.{stage}.dtype')
  return unet_lib.Decoder(
      unet=net, num_clip_tokens=int(m.get('num_clip_tokens', 4)),
      clip_embed_map=bool(m.get('clip_embed_map', False)),
      text_encoder=text_encoder,
      text_embed_in_time=bool(m.get('text_embed_in_time', False)),
      text=text_config(config, stage) if text_encoder == 'own' else None, dtype=dtype)


def decoder_inputs(config, stage: str, batch_size: int, embed_dim: int,
                   clip_text_width: int) -> dict[str, jax.Array]:
  """Dummy inputs of the decoder's shapes (init, eval_shape)."""
  sc = config[stage]
  size = int(sc.image_size)
  length = int(config.tokenizer.context_length)
  own = sc.model.get('text_encoder', 'clip') == 'own'
  text_embed = (jnp.zeros((batch_size, embed_dim)) if sc.model.get('text_embed_in_time', False)
                else None)
  return dict(
      x=jnp.zeros((batch_size, size, size, 3)), t=jnp.zeros((batch_size,), jnp.int32),
      clip_image_embed=jnp.zeros((batch_size, embed_dim)),
      text_encodings=None if own else jnp.zeros((batch_size, length, clip_text_width)),
      text_mask=None if own else jnp.ones((batch_size, length), bool),
      tokens=jnp.ones((batch_size, length), jnp.int32) if own else None,
      image_embed_keep=jnp.ones((batch_size,), bool), text_keep=jnp.ones((batch_size,), bool),
      text_embed=text_embed)


def normalize_embed(embed):
  """A CLIP image or text embedding [..., D] -> a UNet's input: unit vector x sqrt(D)."""
  return clip_lib.l2_normalize(embed) * math.sqrt(embed.shape[-1])


def cond_drop_masks(rng, batch_size: int, image_embed_drop_prob: float,
                    text_drop_prob: float) -> tuple[jax.Array, jax.Array]:
  """(image_embed_keep, text_keep) bool [B]: each False with its drop probability."""
  k1, k2 = jax.random.split(rng)
  return (jax.random.uniform(k1, (batch_size,)) >= image_embed_drop_prob,
          jax.random.uniform(k2, (batch_size,)) >= text_drop_prob)


def has_caption(tokens) -> jax.Array:
  """bool [B]: False for empty captions (only the start- and end-of-text tokens)."""
  return jnp.sum(jnp.asarray(tokens) != 0, axis=-1) > 2


class DecoderTask(base.Task):
  """The 64 px (configurable) decoder; CLIP is frozen."""

  name = 'decoder'

  def __init__(self, config, stage, workdir, frozen_clip: clip_lib.FrozenClip | None = None):
    """`frozen_clip` overrides loading the CLIP export (tests, notebooks)."""
    super().__init__(config, stage, workdir)
    sc = self.stage_config
    if frozen_clip is None:
      frozen_clip = clip_lib.FrozenClip.for_stage(sc, workdir)
    self.clip = frozen_clip
    if 'image_size' not in sc:
      raise ValueError(f'config.{stage}.image_size is missing (the decoder resolution, '
                       'paper 64).')
    self.image_size = int(sc.image_size)
    m = sc.model
    self.image_embed_drop_prob = float(m.get('image_embed_drop_prob', 0.1))
    self.text_drop_prob = float(m.get('text_drop_prob', 0.5))
    for key, p in (('image_embed_drop_prob', self.image_embed_drop_prob),
                   ('text_drop_prob', self.text_drop_prob)):
      if not 0.0 <= p < 1.0:
        raise ValueError(f'config.{stage}.model.{key}={p} must be in [0, 1).')
    self.text_encoder = m.get('text_encoder', 'clip')
    self.diffusion = diffusion_from_config(config, stage)
    self.embed_dim = self.clip.embed_dim
    self.clip_text_width = int(self.clip.config.text.width)
    self.context_length = int(config.tokenizer.context_length)
    self._model = build_decoder(config, stage)
    self.recolour = recolour_lib.Recolour(config, stage)
    if 'sample' not in sc:
      raise ValueError(f'config.{stage}.sample is missing (sampler, steps, guidance_scale).')

  # --- model ------------------------------------------------------------------------------
  def model(self):
    return self._model

  def init(self, rng, batch):
    b = batch['image'].shape[0]
    inputs = decoder_inputs(self.config, self.stage, b, self.embed_dim, self.clip_text_width)
    return self._model.init({'params': rng, 'dropout': rng}, **inputs)['params']

  def frozen_params(self):
    return self.clip.params

  def input_image_size(self) -> int:
    """The larger of the decoder's and CLIP's resolutions: CLIP embeds the image at its own
    resolution (as the prior's training images and sampling do) and the diffusion target is
    that image resized to `image_size`. A decoder below CLIP's resolution that embedded its
    own small images would train on embeddings that the prior never samples (at 32 px vs
    CLIP's 64 on captioned_shapes: cosine 0.92 with the 64 px embedding, and small objects'
    shapes and positions lost)."""
    return max(self.image_size, self.clip.image_size)

  def prepare_batch(self, batch: dict) -> dict:
    if 'clip_image_embed' in batch and self.recolour.prob:
      raise ValueError(f'config.{self.stage}.recolour_prob changes the images, so it cannot '
                       'use precomputed clip_image_embed; set it to 0 or drop the '
                       'precomputed embeddings.')
    return self.recolour(batch)

  # --- conditioning -----------------------------------------------------------------------
  def normalize_embed(self, embed):
    return normalize_embed(embed)

  def conditioning(self, frozen, tokens, images=None, clip_image_embed=None
                   ) -> dict[str, jax.Array]:
    """The decoder's conditioning from tokens and either images (their CLIP embeddings) or
    given CLIP image embeddings (e.g. sampled by the prior)."""
    frozen = self.clip.params if frozen is None else frozen
    tokens = jnp.asarray(tokens, jnp.int32)
    if clip_image_embed is None:
      if images is None:
        raise ValueError('The decoder needs images or clip_image_embed.')
      clip_image_embed = clip_lib.encode_image(self.clip.config, frozen, images)
    cond = dict(clip_image_embed=self.normalize_embed(
        jax.lax.stop_gradient(clip_image_embed)))
    if self.text_encoder == 'own':
      cond['tokens'] = tokens
    else:
      text_embed, text_enc, mask = clip_lib.encode_text(self.clip.config, frozen, tokens)
      cond['text_encodings'] = jax.lax.stop_gradient(text_enc)
      cond['text_mask'] = mask
      if self._model.text_embed_in_time:
        cond['text_embed'] = self.normalize_embed(jax.lax.stop_gradient(text_embed))
    return cond

  def _model_fn(self, params, cond, image_keep, text_keep, train=False, dropout_rng=None):
    """model_fn(x, t[, drop_cond, drop_text]) of the diffusion API (doubled batch under
    guidance; drop_text: rows that drop only the caption)."""
    def model_fn(x, t, drop_cond=None, drop_text=None):
      c = diffusion_lib.repeat_batch(cond, x.shape[0])
      ik, tk = image_keep, text_keep
      if drop_cond is not None:   # guidance: the null rows drop both, as in training
        ik = ~drop_cond
        tk = ~drop_cond & diffusion_lib.repeat_batch(text_keep, x.shape[0])
        if drop_text is not None:
          tk = tk & ~drop_text
      rngs = {'dropout': dropout_rng} if dropout_rng is not None else {}
      return self._model.apply({'params': params}, x, t, image_embed_keep=ik, text_keep=tk,
                               train=train, rngs=rngs, **c)
    return model_fn

  # --- training ---------------------------------------------------------------------------
  def images(self, batch) -> jax.Array:
    x0 = jnp.asarray(batch['image'], jnp.float32)
    if x0.shape[1:3] != (self.image_size, self.image_size):
      x0 = jax.image.resize(x0, (x0.shape[0], self.image_size, self.image_size, 3),
                            method='bicubic', antialias=True)
    return x0

  def loss(self, params, batch, rng, frozen=None, train=True):
    x0 = self.images(batch)
    cond = self.conditioning(frozen, batch['tokens'], images=batch['image'],
                             clip_image_embed=batch.get('clip_image_embed'))
    b = x0.shape[0]
    rng_t, rng_n, rng_d, rng_drop = jax.random.split(rng, 4)
    t = self.diffusion.sample_timesteps(rng_t, b)
    noise = jax.random.normal(rng_n, x0.shape, jnp.float32)
    if train:
      image_keep, text_keep = cond_drop_masks(rng_drop, b, self.image_embed_drop_prob,
                                              self.text_drop_prob)
    else:
      image_keep = text_keep = jnp.ones((b,), bool)
    model_fn = self._model_fn(params, cond, image_keep, text_keep, train=train,
                              dropout_rng=rng_d if train else None)
    per_example, terms = self.diffusion.training_losses(model_fn, x0, t, noise)
    loss = jnp.mean(per_example)
    metrics = dict(loss=loss, mse=jnp.mean(terms['mse']),
                   image_embed_drop_frac=1.0 - jnp.mean(image_keep.astype(jnp.float32)),
                   text_drop_frac=1.0 - jnp.mean(text_keep.astype(jnp.float32)))
    if 'vlb' in terms:
      metrics['vlb'] = jnp.mean(terms['vlb'])
    return loss, metrics

  def flops_per_example(self) -> float:
    sc = self.stage_config
    m = sc.model
    out = 6 if sc.diffusion.get('learned_variance', False) else 3
    k = int(m.get('num_clip_tokens', 4))
    if self.text_encoder == 'own':
      t = text_config(self.config, self.stage)
      width = int(t['width'])
      text = flops_lib.transformer_flops(t['context_length'], width, int(t['depth']))
      length = int(t['context_length'])
    else:
      width, text, length = self.clip_text_width, 0.0, self.context_length
    unet = flops_lib.unet_flops_from_config(m, self.image_size, 3, out, k + length, width)
    emb = 4 * int(m.channels)
    proj = (flops_lib.dense_flops(1, self.embed_dim, emb)
            + flops_lib.dense_flops(1, self.embed_dim, k * width))
    if self._model.text_embed_in_time:
      proj += flops_lib.dense_flops(1, self.embed_dim, emb)
    if self._model.clip_embed_map:
      shape = self._model.unet.lowest_map_shape(self.image_size)
      proj += flops_lib.dense_flops(1, self.embed_dim, math.prod(shape))
    return float(unet + text + proj)

  # --- sampling ---------------------------------------------------------------------------
  def generate(self, params, frozen, tokens, rng, *, images=None, clip_image_embed=None,
               steps: int | None = None, guidance_scale: float | None = None,
               sampler: str | None = None, spacing: str | None = None,
               eta: float | None = None, guidance_interval: Sequence[int] | None = None,
               image_embed_guidance_scale: float | None = None, x_T=None) -> jax.Array:
    """Images [B, S, S, 3] in [-1, 1] for tokens [B, L] and CLIP image embeddings (CLIP
    space, e.g. from the prior; or `images` to embed). None = `config.decoder.sample`.
    guidance_interval (lo, hi): guidance only at timesteps lo <= t < hi (config default:
    every step). image_embed_guidance_scale: the embedding's own scale, guidance_scale then
    the caption's (config default: none, one scale for both).

    An empty caption (tokens holding only start and end of text) takes the decoder's learned
    null caption, as the captions dropped in training did, not the CLIP encoding of ''.
    """
    sc = self.stage_config.sample
    cond = self.conditioning(frozen, tokens, images=images, clip_image_embed=clip_image_embed)
    b = cond['clip_image_embed'].shape[0]
    model_fn = self._model_fn(params, cond, jnp.ones((b,), bool), has_caption(tokens))
    x = self.diffusion.sample(
        model_fn, (b, self.image_size, self.image_size, 3), rng,
        sampler=sampler or sc.get('sampler', 'ddim'), steps=int(steps or sc.get('steps', 64)),
        spacing=spacing or sc.get('spacing', 'trailing'),
        eta=float(sc.get('eta', 0.0) if eta is None else eta),
        guidance_scale=float(sc.get('guidance_scale', 1.0) if guidance_scale is None
                             else guidance_scale),
        guidance_interval=(sc.get('guidance_interval') if guidance_interval is None
                           else guidance_interval),
        image_embed_guidance_scale=(sc.get('image_embed_guidance_scale')
                                    if image_embed_guidance_scale is None
                                    else image_embed_guidance_scale),
        thresholding=sc.get('thresholding', 'static'), x_T=x_T)
    return jnp.clip(x, -1.0, 1.0)

  def sample(self, params, batch: Mapping[str, jax.Array], rng, frozen=None):
    """Reconstructions: decodes the CLIP embeddings of the batch's own images."""
    return self.generate(params, frozen, batch['tokens'], rng, images=batch['image'],
                         clip_image_embed=batch.get('clip_image_embed'))


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
