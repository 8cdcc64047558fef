"""The unCLIP sampler: trained stages assembled into text -> image, and the paper's edits.

  from dalle2_jax import sampling
  unclip = sampling.UnCLIP.from_workdir('runs/shapes')
  images = unclip(['a large red circle in the top left'], seed=0)   # uint8 [1, 64, 64, 3]

The chain (prompts -> tokens -> CLIP text -> prior, best of N -> decoder -> upsamplers) is
one jitted function per (batch size, settings), run with the batch sharded over a 1-D mesh
of all devices. Every example gets its own key, `fold_in(key(seed), index)`, and the chain
is vmapped over examples, so an image depends only on (seed, its index, its prompt): the
same on 1 or 8 devices and in any batch size.

The paper's manipulations (section 3) are methods of `UnCLIP`: `variations`, `interpolate`,
`text_diff` and `inpaint`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SAMPLERS = ('ddim', 'ddpm', 'dpmpp_2m')

# Steps of (prior, decoder, upsamplers...) for `--preset`. 'fast' is diffusers' UnCLIPPipeline
# default (25/25/7), 'paper' the unCLIP paper's (64/250/27/15, Table 3).
PRESETS = {
    'fast': dict(prior=25, decoder=25, upsamplers=(7,)),
    'paper': dict(prior=64, decoder=250, upsamplers=(27, 15)),
}


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StageSampling:
  """How one diffusion stage samples. Hashable: part of the jit cache key."""
  sampler: str = 'ddim'
  steps: int = 25
  guidance_scale: float = 1.0
  eta: float = 0.0
  num_candidates: int = 1   # prior only: best of N by dot product with the text embedding

  def validate(self, stage: str, timesteps: int | None = None):
    """Raises ValueError naming the stage and the offending setting."""
    if self.sampler not in SAMPLERS:
      raise ValueError(f'{stage}: sampler {self.sampler!r} is not one of {SAMPLERS}.')
    if not isinstance(self.steps, (int, np.integer)) or self.steps < 1:
      raise ValueError(f'{stage}: steps must be a positive integer, got {self.steps!r}.')
    if timesteps is not None and self.steps > timesteps:
      raise ValueError(f'{stage}: steps={self.steps} is more than the {timesteps} diffusion '
                       f'timesteps the stage was trained with.')
    if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
      raise ValueError(f'{stage}: guidance_scale must be finite and >= 0 (1 = no guidance), '
                       f'got {self.guidance_scale!r}.')
    if not math.isfinite(self.eta) or self.eta < 0:
      raise ValueError(f'{stage}: eta must be finite and >= 0, got {self.eta!r}.')
    if not isinstance(self.num_candidates, (int, np.integer)) or self.num_candidates < 1:
      raise ValueError(f'{stage}: num_candidates must be a positive integer, '
                       f'got {self.num_candidates!r}.')


@dataclasses.dataclass(frozen=True)
class Settings:
  """Sampling settings of the whole chain; `upsamplers` has one entry per upsampler stage."""
  prior: StageSampling = StageSampling()
  decoder: StageSampling = StageSampling()
  upsamplers: tuple[StageSampling, ...] = ()

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def replace_stage(self, stage: str, **changes) -> 'Settings':
    """Returns settings with `changes` applied to 'prior', 'decoder' or 'upsamplers'."""
    changes = {k: v for k, v in changes.items() if v is not None}
    if not changes:
      return self
    if stage == 'upsamplers':
      return dataclasses.replace(self, upsamplers=tuple(
          dataclasses.replace(u, **changes) for u in self.upsamplers))
    return dataclasses.replace(self, **{stage: dataclasses.replace(getattr(self, stage),
                                                                   **changes)})

  def with_preset(self, preset: str) -> 'Settings':
    """Applies the steps of a preset ('fast' or 'paper'); see PRESETS."""
    if preset not in PRESETS:
      raise ValueError(f'Unknown preset {preset!r}; choose one of {sorted(PRESETS)}.')
    p = PRESETS[preset]
    ups = tuple(dataclasses.replace(u, steps=p['upsamplers'][min(i, len(p['upsamplers']) - 1)])
                for i, u in enumerate(self.upsamplers))
    return dataclasses.replace(
        self, prior=dataclasses.replace(self.prior, steps=p['prior']),
        decoder=dataclasses.replace(self.decoder, steps=p['decoder']), upsamplers=ups)

  def with_upsampler_steps(self, steps: Sequence[int]) -> 'Settings':
    """One value for every upsampler, or one per upsampler stage."""
    steps = list(steps)
    if len(steps) not in (1, len(self.upsamplers)):
      raise ValueError(f'Give one upsampler steps value or {len(self.upsamplers)} '
                       f'(one per upsampler stage), got {steps}.')
    if len(steps) == 1:
      steps = steps * len(self.upsamplers)
    return dataclasses.replace(self, upsamplers=tuple(
        dataclasses.replace(u, steps=int(s)) for u, s in zip(self.upsamplers, steps)))


def stage_sampling_from_config(stage_config) -> StageSampling:
  """Defaults from a stage's `sample` config section (missing fields keep the defaults)."""
  s = dict(stage_config.get('sample', {}) or {})
  fields = {f.name for f in dataclasses.fields(StageSampling)}
  return StageSampling(**{k: (tuple(v) if isinstance(v, list) else v)
                          for k, v in s.items() if k in fields})


# --------------------------------------------------------------------------------------------
# Embedding math (plain jnp, usable inside and outside jit)
# --------------------------------------------------------------------------------------------
def slerp(a: jax.Array, b: jax.Array, t) -> jax.Array:
  """Spherical interpolation between embeddings a and b [..., D] at t in [0, 1].

  Directions are interpolated on the sphere and norms linearly, so t=0 gives a and t=1
  gives b exactly. Nearly parallel inputs fall back to linear interpolation.
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  t = jnp.asarray(t, jnp.float32)[..., None]
  na = jnp.linalg.norm(a, axis=-1, keepdims=True)
  nb = jnp.linalg.norm(b, axis=-1, keepdims=True)
  ua, ub = a / jnp.maximum(na, 1e-12), b / jnp.maximum(nb, 1e-12)
  cos = jnp.clip(jnp.sum(ua * ub, axis=-1, keepdims=True), -1.0, 1.0)
  omega = jnp.arccos(cos)
  sin = jnp.sin(omega)
  small = sin < 1e-6
  safe_sin = jnp.where(small, 1.0, sin)
  wa = jnp.where(small, 1.0 - t, jnp.sin((1.0 - t) * omega) / safe_sin)
  wb = jnp.where(small, t, jnp.sin(t * omega) / safe_sin)
  direction = wa * ua + wb * ub
  norm = (1.0 - t) * na + t * nb
  out = direction * norm
  # Exact endpoints (the trigonometry is only accurate to ~1e-7).
  out = jnp.where(t == 0.0, a, out)
  return jnp.where(t == 1.0, b, out)


def text_diff_embed(image_embed: jax.Array, text_embed_from: jax.Array,
                    text_embed_to: jax.Array, theta) -> jax.Array:
  """The paper's text diff (section 3.3): z_d = normalize(z_t(to) - z_t(from)) and
  z_theta = slerp(z_i, z_d, theta), rescaled to the norm of z_i. theta = 0 gives z_i;
  the paper uses theta in [0, 0.5]."""
  image_embed = jnp.asarray(image_embed, jnp.float32)
  diff = jnp.asarray(text_embed_to, jnp.float32) - jnp.asarray(text_embed_from, jnp.float32)
  z_d = diff / jnp.maximum(jnp.linalg.norm(diff, axis=-1, keepdims=True), 1e-12)
  norm = jnp.linalg.norm(image_embed, axis=-1, keepdims=True)
  z_d = jnp.broadcast_to(z_d * norm, image_embed.shape)
  return slerp(image_embed, z_d, theta)


# --------------------------------------------------------------------------------------------
# Images in and out
# --------------------------------------------------------------------------------------------
def to_uint8(images: jax.Array) -> jax.Array:
  """[-1, 1] floats -> uint8 [0, 255] (rounded, clipped)."""
  x = (jnp.asarray(images, jnp.float32) + 1.0) * 127.5
  return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)


def from_uint8(images) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


def load_image(path: str, size: int | None = None, mode: str = 'RGB') -> np.ndarray:
  """Reads an image file as uint8 [H, W, C] (C=3 for RGB, H, W for 'L'), resized to
  size x size if given. An unreadable file raises ValueError naming it."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  try:
    with epath.Path(path).open('rb') as f:
      img = Image.open(f)
      img.load()
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'Cannot read image file {path!r}: {e}. Give a PNG or JPEG file.') from e
  img = img.convert(mode)
  if size is not None and img.size != (size, size):
    img = img.resize((size, size), Image.BICUBIC if mode == 'RGB' else Image.NEAREST)
  return np.asarray(img, np.uint8)


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one uint8 [rows*(H+pad)+pad, cols*(W+pad)+pad, 3] grid."""
  images = np.asarray(images, np.uint8)
  n, h, w, c = images.shape
  ncols = ncols or max(1, int(math.ceil(math.sqrt(n))))
  ncols = min(ncols, n)
  nrows = int(math.ceil(n / ncols))
  grid = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    y, x = pad + r * (h + pad), pad + col * (w + pad)
    grid[y:y + h, x:x + w] = images[i]
  return grid


def save_png(path: str, image: np.ndarray):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format='PNG')
  epath.Path(path).write_bytes(buf.getvalue())


def write_samples(outdir: str, images: np.ndarray, records: Sequence[dict[str, Any]],
                  ncols: int | None = None) -> list[str]:
  """Writes images as 0000.png, 0001.png, ... (in the given order), grid.png and
  samples.jsonl (one record per image plus its `file`). Returns the image paths."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  images = np.asarray(images)
  if len(records) != len(images):
    raise ValueError(f'{len(images)} images but {len(records)} records.')
  out = epath.Path(outdir)
  out.mkdir(parents=True, exist_ok=True)
  paths, lines = [], []
  for i, (image, record) in enumerate(zip(images, records)):
    name = f'{i:04d}.png'
    save_png(os.fspath(out / name), image)
    paths.append(os.fspath(out / name))
    lines.append(json.dumps({'file': name, **record}))
  if len(images):
    save_png(os.fspath(out / 'grid.png'), image_grid(images, ncols))
  (out / 'samples.jsonl').write_text(''.join(line + '\n' for line in lines))
  return paths
