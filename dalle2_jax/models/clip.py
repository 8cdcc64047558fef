"""CLIP: a causal text transformer and a ViT image tower embedding into one space.

unCLIP's prior and decoder see the world only through these embeddings. The parameter
layout mirrors Hugging Face's `CLIPModel` one to one (see `dalle2_jax.convert.hf_clip`):

  text/token_embedding/embedding      [vocab, width]
  text/position_embedding             [context_length, width]
  text/transformer/layers_i/...       pre-LN blocks (`layers.ResidualBlock`), causal
  text/ln_final/{scale,bias}
  text/text_projection/kernel         [width, embed_dim] (no bias)
  vision/patch_embedding/kernel       [patch, patch, 3, width] (no bias)
  vision/pixel_stem/{kernel,bias}     [3, stem_width] (only with vision.stem_width > 0;
                                      then patch_embedding takes stem_width channels)
  vision/class_embedding              [width]
  vision/position_embedding           [1 + (image_size // patch)**2, width]
  vision/ln_pre, vision/transformer/layers_i/..., vision/ln_post
  vision/projection/kernel            [width, embed_dim] (no bias)
  logit_scale                         []  (log of the temperature; exp clamped at 100)

The *model config* is the `model` section of a clip stage, resolved by `model_config_from`
so it is self-contained:

  embed_dim, logit_scale_init, image_size (from the stage's `image_size`),
  image_mean, image_std (optional; default OpenAI's), and
  text:   width, depth, heads, vocab_size, activation, context_length (default the
          tokenizer's), mlp_dim (default 4 * width), pool ('argmax' = OpenAI: the highest
          token id, which is the end-of-text token of the CLIP BPE; 'eos' = Hugging Face: the
          first `eos_token_id`), eos_token_id (49407), layer_norm_eps (1e-5)
  vision: width, depth, heads, patch_size, activation, mlp_dim, layer_norm_eps,
          stem_width (default 0: none, as in OpenAI / Hugging Face CLIP; > 0: a per-pixel
          Dense + activation of that width before the patch embedding. A linear patch
          embedding multiplies every shape feature by the object's colour; one pixel-wise
          nonlinearity lets the tower compute a colour-free foreground first)

Pure functions used by the later stages (traceable inside jit; `model_config` is static):

  encode_text(model_config, params, tokens) -> (text_embed [B, D], text_encodings [B, L, W],
                                                mask [B, L] bool)
  encode_image(model_config, params, images) -> image_embed [B, D]   (images in [-1, 1])

Embeddings are projected but NOT normalised. `FrozenClip.load(export_dir)` loads a trained or
imported CLIP (an export directory, see `dalle2_jax.training.export`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dalle2_jax.models import flops as flops_lib
from dalle2_jax.models import layers

Dtype = Any
Array = jax.Array

# OpenAI CLIP's pixel normalisation (also Hugging Face's CLIPImageProcessor default).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_LOGIT_SCALE = 100.0


def _partitioned(init, names):
  return nn.with_logical_partitioning(init, names)


def pool_index(tokens: Array, pool: str, eos_token_id: int) -> Array:
  """Index of the token whose output is the sequence's embedding, [B] int32."""
  if pool == 'argmax':
    return jnp.argmax(tokens, axis=-1).astype(jnp.int32)
  if pool == 'eos':   # first eos, as Hugging Face (0 if there is none)
    return jnp.argmax(tokens == eos_token_id, axis=-1).astype(jnp.int32)
  raise ValueError(f"Unknown text pool {pool!r}: use 'argmax' or 'eos' "
                   '(config field clip.model.text.pool).')


class TextTransformer(nn.Module):
  """Causal text transformer, pooled at the end-of-text token and projected."""
  vocab_size: int
  context_length: int
  width: int
  depth: int
  heads: int
  embed_dim: int
  mlp_dim: int | None = None
  activation: str = 'quick_gelu'
  pool: str = 'argmax'
  eos_token_id: int = 49407
  layer_norm_eps: float = 1e-5
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: Array) -> tuple[Array, Array, Array]:
    """tokens [B, L] int -> (text_embed [B, D], text_encodings [B, L, W], mask [B, L])."""
    length = tokens.shape[-1]
    if length > self.context_length:
      raise ValueError(f'{length} tokens exceed the text context length '
                       f'{self.context_length} (tokenizer.context_length / '
                       'clip.model.text.context_length).')
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                 param_dtype=self.param_dtype, name='token_embedding',
                 embedding_init=_partitioned(nn.initializers.normal(0.02),
                                             ('vocab', 'embed')))(tokens)
    pos = self.param('position_embedding',
                     _partitioned(nn.initializers.normal(0.01), ('length', 'embed')),
                     (self.context_length, self.width), self.param_dtype)
    x = x + pos[:length].astype(self.dtype)
    x = layers.Transformer(
        width=self.width, depth=self.depth, num_heads=self.heads, mlp_dim=self.mlp_dim,
        activation=self.activation, causal=True, layer_norm_eps=self.layer_norm_eps,
        remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype,
        name='transformer')(x)
    x = layers.LayerNorm(self.layer_norm_eps, self.dtype, self.param_dtype,
                         name='ln_final')(x)
    idx = pool_index(tokens, self.pool, self.eos_token_id)
    pooled = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
    text_embed = nn.Dense(
        self.embed_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
        name='text_projection',
        kernel_init=_partitioned(nn.initializers.normal(self.width ** -0.5),
                                 ('embed', 'mlp')))(pooled)
    mask = jnp.arange(length)[None, :] <= idx[:, None]
    return text_embed, x, mask


def patchify(x: Array, patch_size: int) -> Array:
  """Images [B, S, S, C] -> patches [B, (S / p)^2, p * p, C], row-major over patches and
  over the pixels of each."""
  p = patch_size
  b, s, _, c = x.shape
  n = s // p
  return x.reshape(b, n, p, n, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, n * n, p * p, c)


class PatchEmbedding(nn.Module):
  """Patches [B, N, p * p, C] (`patchify`) -> [B, N, width]: each patch through one linear
  map, the strided p x p convolution without bias of OpenAI's and Hugging Face's CLIP (same
  kernel [p, p, C, width], same values), computed as a matmul over the flattened patches.
  On XLA:CPU the convolution's forward and backward took twice as long (0.20 against 0.10 s
  for the shapes config's 256 images a step)."""
  patch_size: int
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, patches: Array) -> Array:
    p = self.patch_size
    b, n, pp, c = patches.shape
    if pp != p * p:
      raise ValueError(f'Expected patches [B, N, {p * p}, C] (patchify), got {patches.shape}.')
    kernel = self.param('kernel', _partitioned(nn.initializers.lecun_normal(),
                                               (None, None, 'conv_in', 'embed')),
                        (p, p, c, self.width), self.param_dtype)
    return patches.reshape(b, n, pp * c) @ kernel.astype(self.dtype).reshape(
        pp * c, self.width)


class VisionTransformer(nn.Module):
  """ViT image tower: patches + class token, pre-LN blocks, class token projected."""
  image_size: int
  patch_size: int
  width: int
  depth: int
  heads: int
  embed_dim: int
  mlp_dim: int | None = None
  activation: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  remat: bool = False
  stem_width: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pixels: Array) -> Array:
    """pixels [B, S, S, 3] CLIP-normalised, S = image_size -> image_embed [B, D]."""
    if pixels.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f'Vision tower expects [B, {self.image_size}, {self.image_size}, 3] '
                       f'pixels, got {pixels.shape} (use encode_image, which resizes).')
    if self.image_size % self.patch_size:
      raise ValueError(f'image_size {self.image_size} is not a multiple of patch_size '
                       f'{self.patch_size} (clip.image_size / clip.model.vision.patch_size).')
    p = self.patch_size
    # Patches first, then the per-pixel stem: the stem's wider output is then already in
    # patch order (the rearrangement moves 3 channels a pixel, not stem_width).
    x = patchify(pixels.astype(self.dtype), p)
    if self.stem_width:
      x = nn.Dense(self.stem_width, dtype=self.dtype, param_dtype=self.param_dtype,
                   name='pixel_stem',
                   kernel_init=_partitioned(nn.initializers.lecun_normal(),
                                            ('conv_in', None)),
                   bias_init=_partitioned(nn.initializers.zeros, (None,)))(x)
      x = layers.get_activation(self.activation)(x)
    x = PatchEmbedding(p, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                       name='patch_embedding')(x)
    b = x.shape[0]
    cls = self.param('class_embedding',
                     _partitioned(nn.initializers.normal(self.width ** -0.5), ('embed',)),
                     (self.width,), self.param_dtype)
    # Position 0 is the class token's (OpenAI's and Hugging Face's layout), but the sequence
    # puts it last: attention without a mask is the same in any order, and the last block
    # then computes the one output that is read (Transformer num_outputs=1).
    pos = self.param('position_embedding',
                     _partitioned(nn.initializers.normal(self.width ** -0.5),
                                  ('length', 'embed')),
                     (x.shape[1] + 1, self.width), self.param_dtype).astype(self.dtype)
    x = jnp.concatenate([x + pos[1:], jnp.broadcast_to(cls.astype(self.dtype) + pos[0],
                                                       (b, 1, self.width))], axis=1)
    ln = functools.partial(layers.LayerNorm, self.layer_norm_eps, self.dtype,
                           self.param_dtype)
    x = ln(name='ln_pre')(x)
    x = layers.Transformer(
        width=self.width, depth=self.depth, num_heads=self.heads, mlp_dim=self.mlp_dim,
        activation=self.activation, causal=False, layer_norm_eps=self.layer_norm_eps,
        remat=self.remat, dtype=self.dtype, param_dtype=self.param_dtype,
        name='transformer')(x, num_outputs=1)
    pooled = ln(name='ln_post')(x[:, 0])
    return nn.Dense(
        self.embed_dim, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
        name='projection',
        kernel_init=_partitioned(nn.initializers.normal(self.width ** -0.5),
                                 ('embed', 'mlp')))(pooled)


class CLIP(nn.Module):
  """Both towers and the learnable logit scale (log temperature, exp clamped at 100)."""
  text: TextTransformer
  vision: VisionTransformer
  logit_scale_init: float = float(np.log(1 / 0.07))

  def setup(self):
    self.logit_scale = self.param('logit_scale',
                                  _partitioned(nn.initializers.constant(
                                      self.logit_scale_init), ()), (), jnp.float32)

  def encode_text(self, tokens: Array) -> tuple[Array, Array, Array]:
    return self.text(tokens)

  def encode_image(self, pixels: Array) -> Array:
    return self.vision(pixels)

  def scale(self) -> Array:
    return jnp.minimum(jnp.exp(self.logit_scale), MAX_LOGIT_SCALE)

  def __call__(self, tokens: Array, pixels: Array) -> tuple[Array, Array, Array]:
    """-> (image_embed [B, D], text_embed [B, D], logit scale []), embeds not normalised."""
    text_embed, _, _ = self.text(tokens)
    return self.vision(pixels), text_embed, self.scale()


# --- configs -----------------------------------------------------------------------------

def model_config_from(config: ml_collections.ConfigDict, stage: str = 'clip'
                      ) -> ml_collections.ConfigDict:
  """The self-contained model config of stage `stage` of an experiment config.

  Copies `config[stage].model` and fills in `image_size` (from `config[stage].image_size`)
  and `text.context_length` (from `config.tokenizer.context_length` unless set).
  """
  if stage not in config:
    raise KeyError(f'The config has no {stage!r} section (stages: {config.get("stages")}).')
  section = config[stage]
  if 'model' not in section:
    raise KeyError(f'Config section {stage!r} has no `model` (a CLIP model config).')
  m = ml_collections.ConfigDict(section.model.to_dict())
  with m.unlocked():
    if 'image_size' not in m:
      if 'image_size' not in section:
        raise KeyError(f'Set {stage}.image_size (the CLIP image resolution).')
      m.image_size = int(section.image_size)
    if not m.text.get('context_length'):
      m.text.context_length = int(config.tokenizer.context_length)
  return m


def _get(c, key, default):
  v = c.get(key, default)
  return default if v is None else v


def build_model(model_config: ml_collections.ConfigDict, dtype: Dtype = jnp.float32,
                param_dtype: Dtype = jnp.float32, remat: bool = False) -> CLIP:
  """The CLIP module of a resolved model config (see `model_config_from`)."""
  m = model_config
  missing = [k for k in ('embed_dim', 'image_size', 'text', 'vision') if k not in m]
  missing += [f'text.{k}' for k in ('width', 'depth', 'heads', 'vocab_size',
                                    'context_length') if 'text' in m and k not in m.text]
  missing += [f'vision.{k}' for k in ('width', 'depth', 'heads', 'patch_size')
              if 'vision' in m and k not in m.vision]
  if missing:
    raise KeyError(f'CLIP model config lacks {missing} (config section clip.model; '
                   'resolve it with clip.model_config_from(config)).')
  t, v = m.text, m.vision
  text = TextTransformer(
      vocab_size=int(t.vocab_size), context_length=int(t.context_length),
      width=int(t.width), depth=int(t.depth), heads=int(t.heads),
      embed_dim=int(m.embed_dim), mlp_dim=_get(t, 'mlp_dim', None),
      activation=_get(t, 'activation', 'quick_gelu'), pool=_get(t, 'pool', 'argmax'),
      eos_token_id=int(_get(t, 'eos_token_id', 49407)),
      layer_norm_eps=float(_get(t, 'layer_norm_eps', 1e-5)), remat=remat, dtype=dtype,
      param_dtype=param_dtype)
  vision = VisionTransformer(
      image_size=int(m.image_size), patch_size=int(v.patch_size), width=int(v.width),
      depth=int(v.depth), heads=int(v.heads), embed_dim=int(m.embed_dim),
      mlp_dim=_get(v, 'mlp_dim', None), activation=_get(v, 'activation', 'quick_gelu'),
      layer_norm_eps=float(_get(v, 'layer_norm_eps', 1e-5)), remat=remat,
      stem_width=int(_get(v, 'stem_width', 0)), dtype=dtype, param_dtype=param_dtype)
  return CLIP(text=text, vision=vision,
              logit_scale_init=float(_get(m, 'logit_scale_init', np.log(1 / 0.07))))


# --- pure embedding API --------------------------------------------------------------------

def preprocess_images(model_config: ml_collections.ConfigDict, images: Array) -> Array:
  """Images [B, H, W, 3] in [-1, 1] -> CLIP pixels [B, S, S, 3] (resized, normalised)."""
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'Expected images [B, H, W, 3] in [-1, 1], got {images.shape}.')
  s = int(model_config.image_size)
  x = (images + 1.0) / 2.0
  if x.shape[1:3] != (s, s):
    x = jax.image.resize(x, (x.shape[0], s, s, 3), method='bicubic', antialias=True)
  mean = jnp.asarray(_get(model_config, 'image_mean', OPENAI_MEAN), jnp.float32)
  std = jnp.asarray(_get(model_config, 'image_std', OPENAI_STD), jnp.float32)
  return (x - mean) / std


def _variables(params):
  return {'params': params['params'] if 'params' in params and len(params) == 1
          else params}


def encode_text(model_config: ml_collections.ConfigDict, params, tokens: Array
                ) -> tuple[Array, Array, Array]:
  """-> (text_embed [B, D] projected, not normalised; text_encodings [B, L, W]; mask [B, L])."""
  model = build_model(model_config)
  return model.apply(_variables(params), jnp.asarray(tokens, jnp.int32),
                     method=CLIP.encode_text)


def encode_image(model_config: ml_collections.ConfigDict, params, images: Array) -> Array:
  """Images [B, H, W, 3] in [-1, 1], any size -> image_embed [B, D] (not normalised)."""
  model = build_model(model_config)
  return model.apply(_variables(params), preprocess_images(model_config, images),
                     method=CLIP.encode_image)


def logit_scale(params) -> Array:
  p = _variables(params)['params']
  return jnp.minimum(jnp.exp(p['logit_scale']), MAX_LOGIT_SCALE)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


# --- frozen CLIP for the prior and decoder -------------------------------------------------

@dataclasses.dataclass
class FrozenClip:
  """A trained or imported CLIP: its params and resolved model config.

  params: the CLIP params (plain nested dicts of arrays, the 'params' collection).
  config: the resolved model config (see `model_config_from`).
  """
  params: Any
  config: ml_collections.ConfigDict
  experiment_config: ml_collections.ConfigDict | None = None

  @property
  def embed_dim(self) -> int:
    return int(self.config.embed_dim)

  @property
  def image_size(self) -> int:
    return int(self.config.image_size)

  @property
  def context_length(self) -> int:
    return int(self.config.text.context_length)

  @property
  def tokenizer_path(self) -> str:
    if self.experiment_config is None or 'tokenizer' not in self.experiment_config:
      return ''
    return self.experiment_config.tokenizer.get('path', '') or ''

  @classmethod
  def for_stage(cls, stage_config, workdir) -> 'FrozenClip':
    """The frozen CLIP of a prior, decoder or upsampler stage: `clip_checkpoint`, or the
    `clip` stage of the same workdir (<workdir>/clip/export) when that field is empty."""
    import os  # pylint: disable=g-import-not-at-top
    path = stage_config.get('clip_checkpoint', '') or os.path.join(workdir, 'clip', 'export')
    return cls.load(path)

  @classmethod
  def load(cls, path) -> 'FrozenClip':
    """Loads an export directory (config.json + stage.txt + params.safetensors)."""
    from dalle2_jax.training import export  # pylint: disable=g-import-not-at-top
    from etils import epath  # pylint: disable=g-import-not-at-top
    directory = epath.Path(path)
    if not (directory / export.PARAMS_FILE).exists():
      raise FileNotFoundError(
          f'No CLIP export at {directory} (needs {export.CONFIG_FILE}, {export.STAGE_FILE}, '
          f'{export.PARAMS_FILE}). Train one (`python train.py --config configs/... '
          '--workdir W`, which writes W/clip/export) or import Hugging Face weights with '
          '`python -m dalle2_jax.convert.hf_clip --src HF_DIR --out DIR`.')
    config, stage, params = export.load_export(directory)
    if stage not in config or config[stage].get('task', stage) != 'clip':
      raise ValueError(f'{directory} holds stage {stage!r}, not a CLIP (task clip).')
    params = jax.tree.map(jnp.asarray, params)
    return cls(params=params, config=model_config_from(config, stage),
               experiment_config=config)

  def encode_text(self, tokens: Array, params=None):
    return encode_text(self.config, self.params if params is None else params, tokens)

  def encode_image(self, images: Array, params=None):
    return encode_image(self.config, self.params if params is None else params, images)


# --- FLOPs ---------------------------------------------------------------------------------

def flops_per_example(model_config: ml_collections.ConfigDict, batch_size: int = 1,
                      text_length: int | None = None) -> float:
  """Analytic forward FLOPs (matmuls 2mnk + attention) of both towers for one pair,
  plus its share of the [B, B] similarity matrix."""
  m = model_config
  t, v = m.text, m.vision
  d = int(m.embed_dim)
  length = int(text_length or t.context_length)
  tw = int(t.width)
  text = flops_lib.transformer_flops(length, tw, int(t.depth),
                                     int(_get(t, 'mlp_dim', 4 * tw)))
  text += 2 * tw * d
  vw, p = int(v.width), int(v.patch_size)
  n = (int(m.image_size) // p) ** 2
  sw = int(_get(v, 'stem_width', 0))
  vision = 2 * n * (p * p * (sw or 3)) * vw + 2 * int(m.image_size) ** 2 * 3 * sw
  vision += flops_lib.transformer_flops(n + 1, vw, int(v.depth),
                                       int(_get(v, 'mlp_dim', 4 * vw)),
                                       num_outputs=1)   # the class token's output alone
  vision += 2 * vw * d
  return float(text + vision + 2 * batch_size * d)
