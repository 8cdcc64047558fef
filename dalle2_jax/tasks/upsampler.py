"""Stage `upsampler`: a diffusion super-resolution UNet (one stage of the cascade).

Any number of upsamplers form the cascade: each is a config section with `task='upsampler'`
(configs/dalle2_paper.py has `upsampler_256` and `upsampler_1024`). Config fields:

  low_res, high_res   the conditioning and output sizes (paper 64 -> 256 -> 1024)
  image_size          the size the input pipeline loads (= high_res)
  crop_frac           training crops of crop_frac * high_res pixels (paper 1/4); the net has
                      no attention, so it samples at full size
  degradation         'blur' (Gaussian blur, kernel 3, sigma 0.6: the first upsampler),
                      'bsr' (BSR-style: the second), 'none' (bicubic downsampling only)
  noise_aug           noise augmentation of the low-res input: its level is a timestep
                      uniform in [0, noise_aug * T), given to the model (0 = off)
  model               UNet fields (channels, channel_mult, num_res_blocks, dropout, ...);
                      attention_resolutions must be empty; image_embed_cond=True also
                      conditions on the CLIP image embedding (below)
  clip_checkpoint     image_embed_cond only: the frozen CLIP ('' = <workdir>/clip/export)
  diffusion, sample   as the decoder's; sample.noise_level is the augmentation level used
                      when sampling (a fraction of T, default 0)

Training (all inside the jitted step): the batch image, resized to high_res, is the target;
its degraded low_res version (tasks/degradations.py), optionally noise-augmented, is
upsampled back (bilinear, `unet.upsample_low_res`) and concatenated to the noisy target;
both are cropped at the same random place. Not text-conditioned. With
`model.image_embed_cond` the frozen CLIP embeds the full training image (as for the decoder;
or a batch's precomputed 'clip_image_embed') and the UNet adds the embedding's projection to
its timestep embedding; sampling then takes the embedding the decoder was given (the prior's
sample in the unCLIP chain), so that where the low-res image leaves an object ambiguous (a
small triangle at 32 px) the embedding might settle it; on captioned_shapes it did not
(docs/shapes_experiments.md, 2026-12-06). The paper's upsamplers take no embedding.
"""

from __future__ import annotations

from typing import Mapping

import jax
from jax import lax
import jax.numpy as jnp

from dalle2_jax.models import clip as clip_lib
from dalle2_jax.models import flops as flops_lib
from dalle2_jax.models import unet as unet_lib
from dalle2_jax.tasks import base
from dalle2_jax.tasks import decoder as decoder_task
from dalle2_jax.tasks import degradations


def build_upsampler(config, stage: str) -> unet_lib.Upsampler:
  sc = config[stage]
  m = sc.model
  if tuple(m.get('attention_resolutions', ())):
    raise ValueError(f'config.{stage}.model.attention_resolutions must be empty: upsamplers '
                     'train on crops and sample at full size, which needs a net without '
                     'attention.')
  learned = bool(sc.diffusion.get('learned_variance', False))
  dtype = decoder_task.stage_dtype(config, stage)
  net = unet_lib.unet_from_config(m, out_channels=6 if learned else 3,
                                  remat=bool(sc.get('remat', False)), dtype=dtype)
  return unet_lib.Upsampler(unet=net, noise_level_cond=float(sc.get('noise_aug', 0.0)) > 0,
                            image_embed_cond=bool(m.get('image_embed_cond', False)),
                            dtype=dtype)


def random_crop(rng, images: tuple[jax.Array, ...], size: int) -> tuple[jax.Array, ...]:
  """The same random size x size window of each [B, H, W, C] array (per example)."""
  b, h, w = images[0].shape[:3]
  ky, kx = jax.random.split(rng)
  oy = jax.random.randint(ky, (b,), 0, h - size + 1)
  ox = jax.random.randint(kx, (b,), 0, w - size + 1)
  crop = lambda img, y, x: lax.dynamic_slice(  # noqa: E731
      img, (y, x, 0), (size, size, img.shape[-1]))
  return tuple(jax.vmap(crop)(im, oy, ox) for im in images)


class UpsamplerTask(base.Task):
  """A low_res -> high_res diffusion upsampler."""

  name = 'upsampler'

  def __init__(self, config, stage, workdir, frozen_clip: clip_lib.FrozenClip | None = None):
    """`frozen_clip` (image_embed_cond only) overrides loading the CLIP export."""
    super().__init__(config, stage, workdir)
    sc = self.stage_config
    for key in ('low_res', 'high_res', 'model', 'diffusion'):
      if key not in sc:
        raise ValueError(f'config.{stage}.{key} is missing (see configs/tiny.py).')
    self.low_res, self.high_res = int(sc.low_res), int(sc.high_res)
    if self.high_res <= self.low_res:
      raise ValueError(f'config.{stage}: high_res {self.high_res} must exceed low_res '
                       f'{self.low_res}.')
    levels = len(sc.model.channel_mult) - 1
    self.crop_size = int(round(float(sc.get('crop_frac', 1.0)) * self.high_res))
    if not 0 < self.crop_size <= self.high_res or self.crop_size % (2 ** levels):
      raise ValueError(f'config.{stage}.crop_frac gives {self.crop_size} px crops; they must '
                       f'be in (0, high_res] and divisible by {2 ** levels} '
                       '(2 ** (len(channel_mult) - 1)).')
    self.degradation = sc.get('degradation', 'blur')
    if self.degradation not in degradations.DEGRADATIONS:
      raise ValueError(f'config.{stage}.degradation={self.degradation!r}; choose one of '
                       f'{degradations.DEGRADATIONS}.')
    self.noise_aug = float(sc.get('noise_aug', 0.0))
    if not 0.0 <= self.noise_aug <= 1.0:
      raise ValueError(f'config.{stage}.noise_aug={self.noise_aug} must be in [0, 1] '
                       '(a fraction of the diffusion timesteps).')
    self.diffusion = decoder_task.diffusion_from_config(config, stage)
    self._model = build_upsampler(config, stage)
    self.image_embed_cond = self._model.image_embed_cond
    self.clip = None
    if self.image_embed_cond:
      self.clip = frozen_clip or clip_lib.FrozenClip.for_stage(sc, workdir)

  # --- model ------------------------------------------------------------------------------
  def model(self):
    return self._model

  def init(self, rng, batch):
    b = batch['image'].shape[0]
    s = self.crop_size
    embed = jnp.zeros((b, self.clip.embed_dim)) if self.image_embed_cond else None
    return self._model.init({'params': rng, 'dropout': rng}, jnp.zeros((b, s, s, 3)),
                            jnp.zeros((b,), jnp.int32), jnp.zeros((b, s, s, 3)),
                            jnp.zeros((b,), jnp.int32), clip_image_embed=embed)['params']

  def frozen_params(self):
    return self.clip.params if self.image_embed_cond else None

  # --- data -------------------------------------------------------------------------------
  def input_image_size(self) -> int:
    """high_res, or CLIP's resolution where larger and the embedding is used (CLIP embeds
    the full image at its own resolution, as for the decoder)."""
    size = super().input_image_size() or self.high_res
    return max(size, self.clip.image_size) if self.image_embed_cond else size

  def high_res_images(self, batch) -> jax.Array:
    x = jnp.asarray(batch['image'], jnp.float32)
    if x.shape[1:3] != (self.high_res, self.high_res):
      x = jnp.clip(degradations.resize(x, self.high_res, 'bicubic'), -1.0, 1.0)
    return x

  def make_low_res(self, images, rng=None) -> jax.Array:
    """The degraded low-res conditioning of high-res images (BSR needs `rng`; without one
    it falls back to plain bicubic downsampling)."""
    kind = self.degradation
    if kind == 'bsr' and rng is None:
      kind = 'none'
    return degradations.degrade(rng, images, self.low_res, kind)

  def clip_image_embed(self, frozen, batch):
    """The CLIP image embedding [B, D] of a batch's images (or its precomputed
    'clip_image_embed'); None without image_embed_cond."""
    if not self.image_embed_cond:
      return None
    embed = batch.get('clip_image_embed')
    if embed is None:
      frozen = self.clip.params if frozen is None else frozen
      embed = clip_lib.encode_image(self.clip.config, frozen, batch['image'])
    return jax.lax.stop_gradient(embed)

  # --- training ---------------------------------------------------------------------------
  def loss(self, params, batch, rng, frozen=None, train=True):
    embed = self.clip_image_embed(frozen, batch)
    if embed is not None:
      embed = decoder_task.normalize_embed(embed)
    hr = self.high_res_images(batch)
    b = hr.shape[0]
    k_deg, k_aug, k_crop, k_t, k_n, k_drop = jax.random.split(rng, 6)
    low = self.make_low_res(hr, k_deg)
    level = jnp.zeros((b,), jnp.int32)
    if self.noise_aug > 0:
      low, level = degradations.noise_augment(k_aug, self.diffusion, low, self.noise_aug)
    low_up = unet_lib.upsample_low_res(low, (self.high_res, self.high_res))
    x0 = hr
    if train and self.crop_size < self.high_res:
      x0, low_up = random_crop(k_crop, (hr, low_up), self.crop_size)
    t = self.diffusion.sample_timesteps(k_t, b)
    noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    rngs = {'dropout': k_drop} if train else {}

    def model_fn(x, t):
      return self._model.apply({'params': params}, x, t, low_up, level, train=train,
                               rngs=rngs, clip_image_embed=embed)

    per_example, terms = self.diffusion.training_losses(model_fn, x0, t, noise)
    loss = jnp.mean(per_example)
    metrics = dict(loss=loss, mse=jnp.mean(terms['mse']))
    if 'vlb' in terms:
      metrics['vlb'] = jnp.mean(terms['vlb'])
    return loss, metrics

  def flops_per_example(self) -> float:
    """Forward FLOPs of one training example (a crop; 6 input channels)."""
    sc = self.stage_config
    out = 6 if sc.diffusion.get('learned_variance', False) else 3
    f = flops_lib.unet_flops_from_config(sc.model, self.crop_size, 6, out)
    emb = 4 * int(sc.model.channels)   # the timestep embedding's width
    if self.image_embed_cond:
      f += flops_lib.dense_flops(1, self.clip.embed_dim, emb)
    if self.noise_aug > 0:
      f += flops_lib.dense_flops(1, int(sc.model.channels), emb)
      f += flops_lib.dense_flops(1, emb, emb)
    return float(f)

  # --- sampling ---------------------------------------------------------------------------
  def generate(self, params, low_res, rng, *, steps: int | None = None,
               sampler: str | None = None, spacing: str | None = None,
               noise_level: float | None = None, eta: float | None = None,
               x_T=None, clip_image_embed=None) -> jax.Array:
    """high_res images [B, H, H, 3] in [-1, 1] from low_res images [B, h, h, 3] in [-1, 1]
    (e.g. the previous stage's samples). None = `config.<stage>.sample`.
    clip_image_embed [B, D] (CLIP space, e.g. the prior's sample): required with
    image_embed_cond, ignored without."""
    sc = self.stage_config.sample
    embed = None
    if self.image_embed_cond:
      if clip_image_embed is None:
        raise ValueError(f'config.{self.stage}.model.image_embed_cond: the upsampler needs '
                         'the CLIP image embedding the decoder was given (clip_image_embed).')
      embed = decoder_task.normalize_embed(jnp.asarray(clip_image_embed, jnp.float32))
    low_res = jnp.asarray(low_res, jnp.float32)
    b = low_res.shape[0]
    if low_res.shape[1:3] != (self.low_res, self.low_res):
      low_res = jnp.clip(degradations.resize(low_res, self.low_res, 'bicubic'), -1.0, 1.0)
    level_frac = float(sc.get('noise_level', 0.0) if noise_level is None else noise_level)
    level = jnp.full((b,), int(round(level_frac * (self.diffusion.timesteps - 1))), jnp.int32)
    if level_frac > 0:
      rng, k = jax.random.split(rng)
      low_res = self.diffusion.q_sample(low_res, level, jax.random.normal(k, low_res.shape))
    low_up = unet_lib.upsample_low_res(low_res, (self.high_res, self.high_res))

    def model_fn(x, t):
      return self._model.apply({'params': params}, x, t, low_up, level,
                               clip_image_embed=embed)

    x = self.diffusion.sample(
        model_fn, (b, self.high_res, self.high_res, 3), rng,
        sampler=sampler or sc.get('sampler', 'ddim'), steps=int(steps or sc.get('steps', 27)),
        spacing=spacing or sc.get('spacing', 'trailing'),
        eta=float(sc.get('eta', 0.0) if eta is None else eta),
        thresholding=sc.get('thresholding', 'static'), x_T=x_T)
    return jnp.clip(x, -1.0, 1.0)

  def sample(self, params, batch: Mapping[str, jax.Array], rng, frozen=None):
    """Upsamples the degraded (deterministic part only) batch images."""
    hr = self.high_res_images(batch)
    return self.generate(params, self.make_low_res(hr), rng,
                         clip_image_embed=self.clip_image_embed(frozen, batch))
