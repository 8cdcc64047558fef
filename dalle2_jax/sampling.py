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
import re
import time
from typing import Any, Callable, Sequence
import warnings  # pylint: disable=g-bad-import-order

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dalle2_jax.training import writers

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
  # Best of N. Prior: N image embeddings, the one closest to the text embedding. Decoder: N
  # images, the one whose CLIP image embedding is closest to the text embedding (CLIP
  # reranking, before the upsamplers); costs N decoder samples. Upsamplers: 1.
  num_candidates: int = 1
  # Decoder best of N, scored also on each candidate's mirror image: the cosine of the image
  # with the prompt plus that of the image flipped left to right with the prompt mirrored
  # ('left' and 'right' exchanged: `mirror_caption`). Text-to-image only.
  rerank_mirror: bool = False
  # Guidance only at timesteps lo <= t < hi of the training grid (Kynkäänniemi et al. 2024);
  # None = every step. Prior and decoder (the upsamplers are unguided).
  guidance_interval: tuple[int, int] | None = None
  # Decoder only: the CLIP image embedding's own guidance scale, guidance_scale then being the
  # caption's given the embedding (InstructPix2Pix's two scales; `diffusion.
  # classifier_free_guidance`). None = one scale for both (plain guidance). With 1 the
  # embedding is not guided, and a sample without a caption (variations) is unguided.
  image_embed_guidance_scale: float | None = None

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
    if self.guidance_interval is not None:
      iv = tuple(self.guidance_interval)
      if (len(iv) != 2 or not all(isinstance(v, (int, np.integer)) for v in iv)
          or not 0 <= iv[0] < iv[1]):
        raise ValueError(f'{stage}: guidance_interval must be two integer timesteps lo, hi '
                         f'with 0 <= lo < hi, got {self.guidance_interval!r}.')
      if timesteps is not None and iv[0] >= timesteps:
        raise ValueError(f'{stage}: guidance_interval {iv} starts at or after the '
                         f'{timesteps} diffusion timesteps; no step would be guided.')
    if not math.isfinite(self.eta) or self.eta < 0:
      raise ValueError(f'{stage}: eta must be finite and >= 0, got {self.eta!r}.')
    if not isinstance(self.num_candidates, (int, np.integer)) or self.num_candidates < 1:
      raise ValueError(f'{stage}: num_candidates must be a positive integer, '
                       f'got {self.num_candidates!r}.')
    if not isinstance(self.rerank_mirror, (bool, np.bool_)):
      raise ValueError(f'{stage}: rerank_mirror must be True or False, '
                       f'got {self.rerank_mirror!r}.')
    s = self.image_embed_guidance_scale
    if s is not None and (not isinstance(s, (int, float, np.number)) or not math.isfinite(s)
                          or s < 0):
      raise ValueError(f'{stage}: image_embed_guidance_scale must be finite and >= 0 '
                       f'(1 = the embedding unguided), got {s!r}.')


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


def parse_interval(values: Sequence[str] | None, flag: str) -> tuple[int, int] | None:
  """['lo', 'hi'] from the list flag --`flag` -> (lo, hi); None stays None."""
  if values is None:
    return None
  try:
    lo, hi = (int(v) for v in values)
  except ValueError as e:
    raise ValueError(f'--{flag} takes two integer timesteps lo,hi (e.g. 0,600), '
                     f'got {",".join(values)!r}.') from e
  return lo, hi


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
_MIRRORED_WORDS = {'left': 'right', 'right': 'left'}


def mirror_caption(caption: str) -> str:
  """The caption of the image flipped left to right: the words 'left' and 'right'
  exchanged (whole words; a capital first letter kept), e.g. "a red circle to the left of a
  blue square in the top right" -> "... to the right of ... in the top left"."""
  def swap(m):
    word = _MIRRORED_WORDS[m.group(0).lower()]
    return word.capitalize() if m.group(0)[0].isupper() else word
  return re.sub(r'\b(left|right)\b', swap, caption, flags=re.IGNORECASE)


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


def write_samples(outdir: str, images: np.ndarray, records: Sequence[dict[str, Any]],
                  ncols: int | None = None) -> list[str]:
  """Writes images as 0000.png, 0001.png, ... (in the given order), grid.png and
  samples.jsonl (one record per image plus its `file`). Numbered PNGs of an earlier run in
  `outdir` beyond the new ones are removed, so the directory matches samples.jsonl.
  Returns the image paths."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  images = np.asarray(images)
  if len(records) != len(images):
    raise ValueError(f'{len(images)} images but {len(records)} records.')
  out = epath.Path(outdir)
  out.mkdir(parents=True, exist_ok=True)
  for old in out.glob('[0-9][0-9][0-9][0-9].png'):
    if int(old.name[:4]) >= len(images):
      old.unlink()
  paths, lines = [], []
  for i, (image, record) in enumerate(zip(images, records)):
    name = f'{i:04d}.png'
    writers.write_png(out / name, image)
    paths.append(os.fspath(out / name))
    lines.append(json.dumps({'file': name, **record}))
  if len(images):
    writers.write_png(out / 'grid.png', writers.image_grid(images, ncols, pad=2))
  (out / 'samples.jsonl').write_text(''.join(line + '\n' for line in lines))
  return paths


# --------------------------------------------------------------------------------------------
# Loading the stages of a run
# --------------------------------------------------------------------------------------------
_TRAIN_HINT = ('python train.py --config <the config the run was trained with, e.g. '
               'configs/shapes.py> --workdir {workdir} --stage {stage}')


def _has_export(directory) -> bool:
  from etils import epath  # pylint: disable=g-import-not-at-top
  from dalle2_jax.training import export  # pylint: disable=g-import-not-at-top
  return (epath.Path(directory) / export.PARAMS_FILE).exists()


def _missing_stage_error(stage: str, directory, workdir) -> FileNotFoundError:
  hint = _TRAIN_HINT.format(workdir=workdir or 'W', stage=stage)
  return FileNotFoundError(
      f'Stage {stage!r} has no checkpoint: {directory} holds no export. Train it with\n'
      f'  {hint}\nor point at an export with --export {stage}=DIR '
      f'(UnCLIP.from_workdir(..., exports={{{stage!r}: DIR}})).')


def _stage_dir(stage: str, workdir, exports: dict[str, str]):
  if stage in exports:
    return exports[stage]
  if workdir is None:
    raise FileNotFoundError(f'No export for stage {stage!r}: give --workdir or '
                            f'--export {stage}=DIR.')
  return os.path.join(workdir, stage, 'export')


def _reference_config(workdir, exports: dict[str, str]):
  """The experiment config of a run: from any of its exports (each carries the whole
  config); the last trained stage first, with the workdir's stages that it does not name."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from dalle2_jax.training import export  # pylint: disable=g-import-not-at-top
  candidates = list(reversed(list(exports.values())))
  if workdir is not None:
    root = epath.Path(workdir)
    if not root.exists():
      raise FileNotFoundError(f'--workdir {workdir} does not exist; train a run first: '
                              'python train.py --config configs/shapes.py --workdir '
                              f'{workdir}')
    exported = sorted(str(p.parent) for p in root.glob(f'*/export/{export.CONFIG_FILE}'))
    candidates += exported[::-1]
  for directory in candidates:
    if (epath.Path(directory) / export.CONFIG_FILE).exists():
      config = export.load_config(directory)
      # Prefer the config of the stage that was trained last in config.stages order.
      stages = list(config.get('stages', ()))
      if workdir is not None:
        for stage in reversed(stages):
          d = _stage_dir(stage, workdir, exports)
          if (epath.Path(d) / export.CONFIG_FILE).exists():
            config = export.load_config(d)
            break
        config = _with_other_exported_stages(config, exported)
      return config
  raise FileNotFoundError(
      f'No trained stage in {workdir or list(exports.values())}: no <stage>/export/'
      f'{export.CONFIG_FILE}. Train the run first: python train.py --config '
      f'configs/shapes.py --workdir {workdir or "W"}')


def _with_other_exported_stages(config, export_dirs):
  """`config` with the stages of `export_dirs` (<workdir>/<stage>/export) that it does not
  name added to config.stages, in task order.

  Stages trained by separate commands that each narrowed `--config.stages` (say clip and
  prior, then decoder and upsampler) export configs that each name only their own stages.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  from dalle2_jax.training import export  # pylint: disable=g-import-not-at-top
  from dalle2_jax.tasks import TASK_ORDER  # pylint: disable=g-import-not-at-top
  order = {task: i for i, task in enumerate(TASK_ORDER)}
  config = ml_collections.ConfigDict(config.to_dict())
  stages = tuple(config.get('stages', ()))
  rank = {s: (order.get(config[s].get('task', s) if s in config else s, len(order)), i)
          for i, s in enumerate(stages)}
  for directory in export_dirs:
    stage = epath.Path(directory).parent.name
    if stage in rank:
      continue
    other = export.load_config(directory)
    if stage in other and stage in other.get('stages', ()):
      config[stage] = other[stage]
      rank[stage] = (order.get(other[stage].get('task', stage), len(order)),
                     list(other.stages).index(stage))
  if len(rank) > len(stages):
    config.stages = tuple(sorted(rank, key=rank.get))
  return config


def _with_overrides(config, stage: str, dtype: str | None, attention_impl: str | None):
  """A copy of `config` with config[stage].dtype = dtype ('float32' or 'bfloat16') and, for
  stages with attention, config[stage].model.attention_impl = attention_impl; None keeps
  the config's."""
  if dtype not in (None, 'float32', 'bfloat16'):
    raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}.")
  config = ml_collections.ConfigDict(config.to_dict())
  if dtype is not None:
    config[stage].dtype = dtype
  if attention_impl is not None and config[stage].get('task', stage) in ('prior', 'decoder'):
    config[stage].model.attention_impl = attention_impl
  return config


def _build_task(config, stage: str, workdir: str, clip, params):
  """The stage's task object (for its model, diffusion and sampling functions), with the
  already loaded CLIP (nothing is recomputed: the prior's embedding statistics come from
  its params)."""
  from dalle2_jax import tasks  # pylint: disable=g-import-not-at-top
  kind = config[stage].get('task', stage)
  if kind == 'prior':
    from dalle2_jax.tasks import prior as prior_task  # pylint: disable=g-import-not-at-top
    stats = params.get('embed_stats') if isinstance(params, dict) else None
    return prior_task.PriorTask(config, stage, workdir, frozen_clip=clip, stats=stats)
  if kind == 'decoder':
    from dalle2_jax.tasks import decoder as decoder_task  # pylint: disable=g-import-not-at-top
    return decoder_task.DecoderTask(config, stage, workdir, frozen_clip=clip)
  if kind == 'upsampler':
    from dalle2_jax.tasks import upsampler as upsampler_task  # pylint: disable=g-import-not-at-top
    return upsampler_task.UpsamplerTask(config, stage, workdir, frozen_clip=clip)
  return tasks.get_task(config, stage, workdir)


@dataclasses.dataclass
class Stage:
  """A loaded stage: its section name, task object and (EMA) params."""
  name: str
  task: Any
  params: Any
  directory: str


# --------------------------------------------------------------------------------------------
# The sampler
# --------------------------------------------------------------------------------------------
class UnCLIP:
  """Trained stages assembled into one sampler. Build with `UnCLIP.from_workdir`.

  Attributes:
    config: the experiment config (of the last trained stage's export).
    clip: the frozen CLIP (`models.clip.FrozenClip`) the prior and decoder were trained with.
    prior, decoder: `Stage`s; upsamplers: a tuple of `Stage`s (in config.stages order).
    devices: the devices the batch is sharded over.
    image_size: the side of the final images.
  """

  def __init__(self, config, clip, prior: Stage, decoder: Stage,
               upsamplers: Sequence[Stage] = (), devices=None):
    from dalle2_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    self.config = config
    self.clip = clip
    self.prior = prior
    self.decoder = decoder
    self.upsamplers = tuple(upsamplers)
    self.devices = list(jax.devices() if devices is None else devices)
    self.mesh = jax.sharding.Mesh(np.asarray(self.devices, dtype=object), ('data',))
    self._batch_sharding = jax.sharding.NamedSharding(self.mesh,
                                                      jax.sharding.PartitionSpec('data'))
    self._replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    self.tokenizer = tokenizer_lib.Tokenizer.from_config(config)
    if self.tokenizer.context_length != clip.context_length:
      raise ValueError(f'config.tokenizer.context_length={self.tokenizer.context_length} but '
                       f'the CLIP was built for {clip.context_length}.')
    params = {'clip': clip.params, 'prior': prior.params, 'decoder': decoder.params,
              'upsamplers': tuple(u.params for u in self.upsamplers)}
    self.params = jax.device_put(params, self._replicated)
    self._fns: dict[Any, Callable] = {}

  # --- construction -----------------------------------------------------------------------
  @classmethod
  def from_workdir(cls, workdir: str | None = None, exports: dict[str, str] | None = None,
                   devices=None, dtype: str | None = None,
                   attention_impl: str | None = None,
                   upsamplers: bool = True) -> 'UnCLIP':
    """Loads every stage of a run from <workdir>/<stage>/export (or `exports[stage]`).

    Each export carries the config it was trained with; `dtype` ('float32' or 'bfloat16')
    overrides every stage's compute dtype, `attention_impl` ('xla' or 'cudnn', see
    models/layers.py) the prior's and decoder's attention; `upsamplers=False` stops at the
    decoder's resolution. A missing stage raises FileNotFoundError naming the stage and the
    command that trains it.
    """
    from dalle2_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
    from dalle2_jax.training import export  # pylint: disable=g-import-not-at-top
    exports = dict(exports or {})
    if attention_impl is not None:   # the flag's own error, before anything loads
      from dalle2_jax.models import layers  # pylint: disable=g-import-not-at-top
      layers.check_attention_impl(attention_impl, jnp.float32 if dtype == 'float32'
                                  else jnp.bfloat16, field='--attention_impl',
                                  dtype_field='--dtype')
    config = _reference_config(workdir, exports)
    stages = list(config.stages)
    by_task: dict[str, list[str]] = {}
    for s in stages:
      by_task.setdefault(config[s].get('task', s), []).append(s)
    if not upsamplers:
      by_task.pop('upsampler', None)
    for task in ('prior', 'decoder'):
      if len(by_task.get(task, [])) != 1:
        raise ValueError(f'The run\'s config.stages {tuple(stages)} must hold exactly one '
                         f'stage with task {task!r}; found {by_task.get(task, [])}.')
    unknown = set(exports) - set(stages)
    if unknown:
      raise ValueError(f'--export names stages {sorted(unknown)} that are not in the run\'s '
                       f'config.stages {tuple(stages)}.')

    def load(stage):
      directory = _stage_dir(stage, workdir, exports)
      if not _has_export(directory):
        raise _missing_stage_error(stage, directory, workdir)
      stage_config, exported_stage, params = export.load_export(directory)
      if exported_stage != stage:
        raise ValueError(f'{directory} holds stage {exported_stage!r}, not {stage!r}.')
      if dtype is not None or attention_impl is not None:
        stage_config = _with_overrides(stage_config, stage, dtype, attention_impl)
      return stage_config, jax.tree.map(jnp.asarray, params), str(directory)

    prior_name, decoder_name = by_task['prior'][0], by_task['decoder'][0]
    loaded = {s: load(s) for s in [prior_name, decoder_name] + by_task.get('upsampler', [])}

    # The frozen CLIP the prior was trained with (its clip_checkpoint, else the run's clip).
    prior_config = loaded[prior_name][0]
    clip_dir = prior_config[prior_name].get('clip_checkpoint', '')
    clip_stage = by_task.get('clip', ['clip'])[0]
    if not clip_dir:
      clip_dir = _stage_dir(clip_stage, workdir, exports)
    elif not _has_export(clip_dir) and _has_export(os.path.join(clip_dir, 'export')):
      clip_dir = os.path.join(clip_dir, 'export')
    if not _has_export(clip_dir):
      raise _missing_stage_error(clip_stage, clip_dir, workdir)
    clip = clip_lib.FrozenClip.load(clip_dir)
    for name in [decoder_name] + by_task.get('upsampler', []):
      other = loaded[name][0][name].get('clip_checkpoint', '')
      if other and os.path.abspath(other).rstrip('/') not in (
          os.path.abspath(clip_dir).rstrip('/'),
          os.path.dirname(os.path.abspath(clip_dir).rstrip('/'))):
        raise ValueError(f'The prior and {name} were trained with different CLIPs '
                         f'({clip_dir} vs {other}); unCLIP needs one CLIP for all stages.')

    def stage(name):
      stage_config, params, directory = loaded[name]
      task = _build_task(stage_config, name, workdir or os.path.dirname(directory), clip,
                         params)
      return Stage(name=name, task=task, params=params, directory=directory)

    return cls(config, clip, stage(prior_name), stage(decoder_name),
               [stage(s) for s in by_task.get('upsampler', [])], devices=devices)

  @property
  def dtypes(self) -> dict[str, str]:
    """Compute dtype of each diffusion stage (from its config, or the `dtype` override)."""
    stages = (self.prior, self.decoder) + self.upsamplers
    return {s.name: str(s.task.stage_config.get('dtype', 'float32')) for s in stages}

  @property
  def attention_impls(self) -> dict[str, str]:
    """Attention implementation of the prior and decoder (config or `attention_impl` override)."""
    return {s.name: str(s.task.stage_config.model.get('attention_impl', 'xla'))
            for s in (self.prior, self.decoder)}

  @property
  def stage_names(self) -> tuple[str, ...]:
    return ('clip', self.prior.name, self.decoder.name) + tuple(u.name for u in self.upsamplers)

  # --- settings ---------------------------------------------------------------------------
  def default_settings(self, mode: str = 'generate') -> Settings:
    """Each stage's `sample` config section, for `mode` (a sample.py mode or 'decode').

    The decoder's num_candidates (CLIP reranking against the prompt) is a text-to-image
    setting: every other mode draws one decoder sample unless its settings ask for more
    (variations and decodes keep their variety, interpolation and text diffs their shared
    noise, inpainting samples one image). So is its image_embed_guidance_scale (the caption
    guided given the embedding): the other modes guide with one scale for both, as
    variations, interpolations and text diffs have no caption to guide."""
    def get(stage):
      return stage_sampling_from_config(stage.task.stage_config)
    prior = get(self.prior)
    prior = dataclasses.replace(prior, num_candidates=int(
        self.prior.task.stage_config.sample.get('num_candidates', 2)))
    decoder = get(self.decoder)
    if mode != 'generate':
      decoder = dataclasses.replace(decoder, num_candidates=1, image_embed_guidance_scale=None)
    return Settings(prior=prior, decoder=decoder,
                    upsamplers=tuple(get(u) for u in self.upsamplers))

  def validate(self, settings: Settings):
    """Raises ValueError for settings the stages cannot run (before anything compiles)."""
    if len(settings.upsamplers) != len(self.upsamplers):
      raise ValueError(f'Settings have {len(settings.upsamplers)} upsampler entries; the run '
                       f'has {len(self.upsamplers)} upsampler stages.')
    settings.prior.validate(self.prior.name, self.prior.task.diffusion.timesteps)
    if settings.prior.eta != 0:
      raise ValueError(f'{self.prior.name}: the prior samples with eta=0 only.')
    settings.decoder.validate(self.decoder.name, self.decoder.task.diffusion.timesteps)
    for u, s in [(self.prior, settings.prior), *zip(self.upsamplers, settings.upsamplers)]:
      if s.image_embed_guidance_scale is not None:
        raise ValueError(f'{u.name}: image_embed_guidance_scale is a decoder setting (only '
                         'the decoder is conditioned on an image embedding); leave it None.')
    for u, s in zip(self.upsamplers, settings.upsamplers):
      s.validate(u.name, u.task.diffusion.timesteps)
      if s.num_candidates != 1:
        raise ValueError(f'{u.name}: num_candidates={s.num_candidates}, but only the prior '
                         'and the decoder choose among candidates; use 1.')

  def _settings(self, settings: Settings | None, mode: str = 'generate') -> Settings:
    settings = settings or self.default_settings(mode)
    self.validate(settings)
    return settings

  @property
  def image_size(self) -> int:
    if self.upsamplers:
      return int(self.upsamplers[-1].task.stage_config.high_res)
    return int(self.decoder.task.image_size)

  # --- text and images in -----------------------------------------------------------------
  def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
    """Prompts -> int32 [N, L]; a prompt longer than the context is truncated (warning)."""
    prompts = [str(p) for p in prompts]
    before = self.tokenizer.num_truncated
    tokens = self.tokenizer(prompts)
    if self.tokenizer.num_truncated > before:
      long = [p for p in prompts if len(self.tokenizer.encode(p)) + 2 >
              self.tokenizer.context_length]
      warnings.warn(f'{len(long)} prompt(s) are longer than the {self.tokenizer.context_length}'
                    f'-token context and were truncated: {long[:3]}', stacklevel=2)
    return tokens

  def load_image(self, path: str) -> np.ndarray:
    """An image file as uint8 [S, S, 3] at the decoder's resolution (names the file if it
    cannot be read)."""
    return load_image(path, self.decoder_image_size)

  def load_mask(self, path: str) -> np.ndarray:
    """A mask file as bool [S, S] at the decoder's resolution: True (white) = regenerate."""
    return load_image(path, self.decoder_image_size, mode='L') > 127

  @property
  def decoder_image_size(self) -> int:
    return int(self.decoder.task.image_size)

  def encode_text(self, prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """CLIP text embeddings [N, D] (float32 numpy, not normalised) of prompts."""
    tokens = self.tokenize(prompts)
    fn = self._cached(('encode_text',), lambda: lambda p, t: self.clip.encode_text(t, p)[0])
    return self._run_batched(fn, [tokens], batch_size)

  def encode_image(self, images, batch_size: int = 64) -> np.ndarray:
    """CLIP image embeddings [N, D] (float32 numpy, not normalised) of uint8 images."""
    images = from_uint8(images)
    fn = self._cached(('encode_image',), lambda: lambda p, x: self.clip.encode_image(x, p))
    return self._run_batched(fn, [images], batch_size)

  # --- machinery --------------------------------------------------------------------------
  def _cached(self, key, make: Callable[[], Callable]) -> Callable:
    """One jitted function per key: f(clip_params, *batched) for encoders, else
    f(params, *batched); batched args and outputs sharded over the mesh."""
    if key not in self._fns:
      self._fns[key] = jax.jit(make(), out_shardings=self._batch_sharding)
    return self._fns[key]

  def _pad_to(self, n: int, batch_size: int | None) -> int:
    d = len(self.devices)
    bs = n if not batch_size else min(batch_size, n)
    return max(d, int(math.ceil(bs / d)) * d)

  def _run_batched(self, fn, arrays: Sequence[np.ndarray], batch_size: int | None,
                   params=None, progress=None) -> np.ndarray:
    """Runs fn(params, *chunks) over chunks of the leading axis, each padded (by repeating
    its last row) to a fixed multiple of the device count, and concatenates the results."""
    n = len(arrays[0])
    if n == 0:
      raise ValueError('Nothing to sample: the batch is empty.')
    params = self.params['clip'] if params is None else params
    bs = self._pad_to(n, batch_size)
    outs, t0 = [], time.time()
    for start in range(0, n, bs):
      chunk = [np.asarray(a[start:start + bs]) for a in arrays]
      real = len(chunk[0])
      chunk = [np.concatenate([c, np.repeat(c[-1:], bs - real, axis=0)]) if real < bs else c
               for c in chunk]
      chunk = [jax.device_put(c, self._batch_sharding) for c in chunk]
      out = np.asarray(jax.device_get(fn(params, *chunk)))[:real]
      outs.append(out)
      if progress is not None:
        progress(min(start + bs, n), n, time.time() - t0)
    return np.concatenate(outs)

  def _keys(self, seed: int, indices) -> np.ndarray:
    """Per-example PRNG keys fold_in(PRNGKey(seed), index), raw uint32 [N, 2]."""
    base = jax.random.PRNGKey(int(seed))
    return np.asarray(jax.vmap(lambda i: jax.random.fold_in(base, i))(
        jnp.asarray(np.asarray(indices, np.int32))))

  # --- the chain, per example (vmapped over the batch) -----------------------------------
  def _prior_one(self, params, key, tokens, s: StageSampling):
    """tokens [1, L] -> CLIP image embedding [1, D] (best of s.num_candidates)."""
    return self.prior.task.sample_image_embed(
        params['prior'], params['clip'], tokens, key, steps=s.steps,
        guidance_scale=s.guidance_scale, num_candidates=s.num_candidates, sampler=s.sampler,
        guidance_interval=s.guidance_interval or (0, self.prior.task.diffusion.timesteps))

  def _decode_one(self, params, key, image_embed, tokens, settings: Settings, target=None,
                  mirror_target=None):
    """image_embed [1, D], tokens [1, L] -> uint8 [H, W, 3] through decoder and upsamplers.

    With settings.decoder.num_candidates = N > 1 the decoder draws N images and keeps the one
    whose CLIP image embedding is closest to `target` [1, D] (default: image_embed, the
    embedding the decoder was asked to invert; text-to-image passes the prompt's text
    embedding), and whose mirror image is closest to `mirror_target` where given
    (`_closest_to`)."""
    keys = jax.random.split(key, 1 + len(self.upsamplers))
    n = settings.decoder.num_candidates
    x = self._decoder_sample(params, keys[0], jnp.repeat(image_embed, n, axis=0),
                             jnp.repeat(tokens, n, axis=0), settings.decoder)
    if n > 1:
      x = self._closest_to(params['clip'], x, image_embed if target is None else target,
                           mirror_target)
    for i, (up, s) in enumerate(zip(self.upsamplers, settings.upsamplers)):
      x = self._upsampler_sample(up, params['upsamplers'][i], keys[1 + i], x, s, image_embed)
    return to_uint8(x)[0]

  def _decoder_sample(self, params, key, image_embed, tokens, s: StageSampling):
    """CLIP image embedding [1, D] (CLIP space) + tokens [1, L] -> [1, S, S, 3] in [-1, 1]."""
    return self.decoder.task.generate(
        params['decoder'], params['clip'], tokens, key, clip_image_embed=image_embed,
        steps=s.steps, guidance_scale=s.guidance_scale, sampler=s.sampler, eta=s.eta,
        guidance_interval=s.guidance_interval or (0, self.decoder.task.diffusion.timesteps),
        # None would mean the config's; plain guidance is the same scale for both
        image_embed_guidance_scale=(s.guidance_scale if s.image_embed_guidance_scale is None
                                    else s.image_embed_guidance_scale))

  def _closest_to(self, clip_params, images, target, mirror_target=None):
    """images [N, S, S, 3] in [-1, 1], target embedding [1, D] -> the image [1, S, S, 3]
    whose CLIP image embedding has the highest cosine with target (CLIP reranking); with
    `mirror_target` [1, D] (the mirrored prompt's), the highest sum of that cosine and the
    cosine of the image flipped left to right with mirror_target."""
    from dalle2_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
    def cosine(x, t):
      return (clip_lib.l2_normalize(self.clip.encode_image(x, clip_params))
              @ clip_lib.l2_normalize(t)[0])
    score = cosine(images, target)
    if mirror_target is not None:
      score = score + cosine(images[:, :, ::-1], mirror_target)
    return images[jnp.argmax(score)][None]

  def _upsampler_sample(self, stage: Stage, params, key, low_res, s: StageSampling,
                        image_embed):
    """[1, s, s, 3] -> [1, S, S, 3] in [-1, 1]; image_embed [1, D]: the decoder's (used by
    upsamplers with image_embed_cond)."""
    return stage.task.generate(params, low_res, key, steps=s.steps, sampler=s.sampler,
                               eta=s.eta, clip_image_embed=image_embed)

  def _generate_fn(self, settings: Settings):
    rerank = settings.decoder.num_candidates > 1
    def one(params, key, tokens, mirror_tokens):
      k_prior, k_decode = jax.random.split(key)
      tokens = tokens[None]
      image_embed = self._prior_one(params, k_prior, tokens, settings.prior)
      text_embed = mirror_embed = None
      if rerank:
        text_embed = self.clip.encode_text(tokens, params['clip'])[0]
      if rerank and settings.decoder.rerank_mirror:
        mirror_embed = self.clip.encode_text(mirror_tokens[None], params['clip'])[0]
      return self._decode_one(params, k_decode, image_embed, tokens, settings, text_embed,
                              mirror_embed)
    return jax.vmap(one, in_axes=(None, 0, 0, 0))

  def _prior_fn(self, settings: Settings):
    def one(params, key, tokens):
      k_prior, _ = jax.random.split(key)
      return self._prior_one(params, k_prior, tokens[None], settings.prior)[0]
    return jax.vmap(one, in_axes=(None, 0, 0))

  def _decode_fn(self, settings: Settings):
    def one(params, key, image_embed, tokens):
      _, k_decode = jax.random.split(key)
      return self._decode_one(params, k_decode, image_embed[None], tokens[None], settings)
    return jax.vmap(one, in_axes=(None, 0, 0, 0))

  # --- public API -------------------------------------------------------------------------
  def __call__(self, prompts: Sequence[str] | str, seed: int = 0,
               num_images_per_prompt: int = 1, settings: Settings | None = None,
               batch_size: int | None = None, progress=None) -> np.ndarray:
    """Text -> images: uint8 [len(prompts) * num_images_per_prompt, S, S, 3], all images of
    a prompt together, in prompt order. Image i depends only on (seed, i, its prompt).
    An empty prompt gives an unconditional sample (the prior unguided with its null text).
    """
    if isinstance(prompts, str):
      prompts = [prompts]
    if num_images_per_prompt < 1:
      raise ValueError(f'num_images_per_prompt must be >= 1, got {num_images_per_prompt}.')
    settings = self._settings(settings)
    expanded = [p for p in prompts for _ in range(num_images_per_prompt)]
    tokens = self.tokenize(expanded)
    mirror_tokens = tokens
    if settings.decoder.rerank_mirror:
      with warnings.catch_warnings():   # the prompts' own truncation was warned about above
        warnings.simplefilter('ignore')
        mirror_tokens = self.tokenize([mirror_caption(p) for p in expanded])
    keys = self._keys(seed, range(len(expanded)))
    uncond = np.array([not p.strip() for p in expanded])
    out = np.zeros((len(expanded), self.image_size, self.image_size, 3), np.uint8)
    groups = [(~uncond, settings),
              (uncond, settings.replace_stage('prior', guidance_scale=0.0))]
    done, t0 = [0], time.time()

    def group_progress(d, n, seconds):
      del n, seconds
      if progress is not None:
        progress(done[0] + d, len(expanded), time.time() - t0)
    for sel, s in groups:
      if sel.any():
        fn = self._cached(('generate', s), lambda s=s: self._generate_fn(s))
        out[sel] = self._run_batched(fn, [keys[sel], tokens[sel], mirror_tokens[sel]],
                                     batch_size, self.params, group_progress)
        done[0] += int(sel.sum())
    return out

  def image_embeddings(self, prompts: Sequence[str], seed: int = 0,
                       settings: Settings | None = None, batch_size: int | None = None,
                       indices: Sequence[int] | None = None) -> np.ndarray:
    """The prior alone: CLIP image embeddings [N, D] for prompts, with the noise of
    `indices` (default 0..N-1): those `__call__` decodes for the same seed, one image per
    prompt."""
    settings = self._settings(settings)
    tokens = self.tokenize(prompts)
    indices = range(len(prompts)) if indices is None else indices
    fn = self._cached(('prior', settings.prior), lambda: self._prior_fn(settings))
    return self._run_batched(fn, [self._keys(seed, indices), tokens], batch_size,
                             self.params)

  def decode(self, image_embeds, seed: int = 0, prompts: Sequence[str] | None = None,
             settings: Settings | None = None, same_noise: bool = False,
             batch_size: int | None = None, progress=None) -> np.ndarray:
    """Decoder and upsamplers alone: CLIP image embeddings [N, D] -> uint8 images.

    `prompts` (default: empty captions) condition the decoder's text input. Example i uses
    the noise of index i (index 0 for all when `same_noise`), so decoding the embeddings that
    `image_embeddings` returns gives the images `__call__` draws for the same seed.
    """
    settings = self._settings(settings, 'decode')
    image_embeds = np.asarray(image_embeds, np.float32)
    n = len(image_embeds)
    tokens = self.tokenize(list(prompts) if prompts is not None else [''] * n)
    if len(tokens) != n:
      raise ValueError(f'{n} embeddings but {len(tokens)} prompts.')
    keys = self._keys(seed, [0] * n if same_noise else range(n))
    fn = self._cached(('decode', settings), lambda: self._decode_fn(settings))
    return self._run_batched(fn, [keys, image_embeds, tokens], batch_size, self.params,
                             progress)

  def variations(self, images, seed: int = 0, num_variations: int = 4,
                 settings: Settings | None = None, batch_size: int | None = None,
                 progress=None) -> np.ndarray:
    """Image variations (paper Fig. 3): each image's CLIP image embedding decoded with new
    noise. images: uint8 [B, H, W, 3] (any size) or a list of paths. Returns uint8
    [B * num_variations, S, S, 3], the variations of an image together."""
    images = self._as_images(images)
    embeds = self.encode_image(images)
    embeds = np.repeat(embeds, num_variations, axis=0)
    return self.decode(embeds, seed, settings=settings, batch_size=batch_size,
                       progress=progress)

  def _as_images(self, images) -> np.ndarray:
    if isinstance(images, (str, os.PathLike)):
      images = [images]
    if isinstance(images, (list, tuple)) and images and isinstance(images[0],
                                                                    (str, os.PathLike)):
      return np.stack([self.load_image(p) for p in images])
    images = np.asarray(images)
    if images.ndim == 3:
      images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f'Expected uint8 images [B, H, W, 3], got {images.dtype} '
                       f'{images.shape}.')
    return images

  def _endpoint_embed(self, x, index: int, seed: int, settings: Settings) -> np.ndarray:
    """A prompt (through the prior, with the noise of `index`) or an image (CLIP)."""
    if isinstance(x, str):
      return self.image_embeddings([x], seed, settings, indices=[index])[0]
    return self.encode_image(self._as_images(x))[0]

  def interpolate(self, a, b, frames: int = 8, seed: int = 0,
                  settings: Settings | None = None, batch_size: int | None = None,
                  progress=None) -> np.ndarray:
    """Interpolation (paper Fig. 4): slerp between the CLIP image embeddings of two images
    (uint8 [H, W, 3] or paths) or of two prompts (through the prior), decoded with the same
    noise for every frame. Returns uint8 [frames, S, S, 3]; frame 0 and frame -1 are
    `decode([embed_a], seed)` and `decode([embed_b], seed)`."""
    if frames < 2:
      raise ValueError(f'frames must be >= 2, got {frames}.')
    settings = self._settings(settings, 'interpolate')
    za = self._endpoint_embed(a, 0, seed, settings)
    zb = self._endpoint_embed(b, 1, seed, settings)
    ts = np.linspace(0.0, 1.0, frames, dtype=np.float32)
    embeds = np.asarray(slerp(np.broadcast_to(za, (frames, za.shape[-1])),
                              np.broadcast_to(zb, (frames, zb.shape[-1])), ts))
    return self.decode(embeds, seed, settings=settings, same_noise=True,
                       batch_size=batch_size, progress=progress)

  def text_diff(self, image, from_caption: str, to_caption: str,
                thetas: Sequence[float] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5), seed: int = 0,
                settings: Settings | None = None, batch_size: int | None = None,
                progress=None) -> np.ndarray:
    """Text diffs (paper Fig. 5): the image's CLIP embedding rotated towards
    normalize(z_t(to_caption) - z_t(from_caption)) by slerp with angle fraction theta,
    decoded with the same noise. Returns uint8 [len(thetas), S, S, 3]."""
    settings = self._settings(settings, 'text_diff')
    z_i = self.encode_image(self._as_images(image))[0]
    z_from, z_to = self.encode_text([from_caption, to_caption])
    thetas = np.asarray(thetas, np.float32)
    embeds = np.asarray(text_diff_embed(np.broadcast_to(z_i, (len(thetas), z_i.shape[-1])),
                                        z_from, z_to, thetas))
    return self.decode(embeds, seed, settings=settings, same_noise=True,
                       batch_size=batch_size, progress=progress)

  def _inpaint_fn(self, settings: Settings, resample: int, use_prior: bool):
    from dalle2_jax.tasks import decoder as decoder_task  # pylint: disable=g-import-not-at-top
    task = self.decoder.task
    s = settings.decoder
    thresholding = task.stage_config.sample.get('thresholding', 'static')

    def one(params, key, tokens, known, mask, image_embed):
      k_prior, k_decode = jax.random.split(key)
      tokens = tokens[None]
      if use_prior:
        image_embed = self._prior_one(params, k_prior, tokens, settings.prior)
      else:
        image_embed = image_embed[None]
      keys = jax.random.split(k_decode, 1 + len(self.upsamplers))
      cond = task.conditioning(params['clip'], tokens, clip_image_embed=image_embed)
      model_fn = task._model_fn(params['decoder'], cond, jnp.ones((1,), bool),  # pylint: disable=protected-access
                                decoder_task.has_caption(tokens))
      x = repaint_sample(task.diffusion, model_fn, known[None], mask[None, :, :, None],
                         keys[0], steps=s.steps, sampler=s.sampler, eta=s.eta,
                         resample=resample, guidance_scale=s.guidance_scale,
                         guidance_interval=s.guidance_interval,
                         image_embed_guidance_scale=s.image_embed_guidance_scale,
                         spacing=task.stage_config.sample.get('spacing', 'trailing'),
                         thresholding=thresholding)
      x = jnp.clip(x, -1.0, 1.0)
      for i, (up, us) in enumerate(zip(self.upsamplers, settings.upsamplers)):
        x = self._upsampler_sample(up, params['upsamplers'][i], keys[1 + i], x, us,
                                   image_embed)
      return to_uint8(x)[0]
    return jax.vmap(one, in_axes=(None, 0, 0, 0, 0, 0))

  def inpaint(self, image, mask, prompt: str = '', seed: int = 0, num_images: int = 1,
              resample: int = 4, settings: Settings | None = None,
              batch_size: int | None = None, progress=None) -> np.ndarray:
    """Inpainting: regenerates the masked region of an image for a prompt, keeping the rest.

    image: uint8 [H, W, 3] or a path; mask: bool/uint8 [H, W] or a path, True (white) where
    to generate. Both are resized to the decoder's resolution. The decoder is conditioned on
    the prior's embedding of `prompt` (or, for an empty prompt, on the image's own CLIP
    embedding) and samples with RePaint resampling (`resample` passes per step, ddim or ddpm);
    the upsamplers then run as usual. Returns uint8 [num_images, S, S, 3].
    """
    settings = self._settings(settings, 'inpaint')
    if settings.decoder.num_candidates != 1:
      raise ValueError('Inpainting draws one decoder sample per image; set the decoder '
                       f'num_candidates to 1, not {settings.decoder.num_candidates} '
                       '(--decoder_num_candidates).')
    if settings.decoder.sampler not in ('ddim', 'ddpm'):
      raise ValueError(f'Inpainting needs the decoder sampler ddim or ddpm, not '
                       f'{settings.decoder.sampler!r} (--decoder_sampler).')
    if resample < 1:
      raise ValueError(f'resample must be >= 1, got {resample}.')
    size = self.decoder_image_size
    image = self._as_images(image)[0]
    if image.shape[:2] != (size, size):
      from PIL import Image  # pylint: disable=g-import-not-at-top
      image = np.asarray(Image.fromarray(image).resize((size, size), Image.BICUBIC))
    if isinstance(mask, (str, os.PathLike)):
      mask = self.load_mask(mask)
    mask = np.asarray(mask)
    if mask.ndim == 3:
      mask = mask[..., 0]
    if mask.ndim != 2:
      raise ValueError(f'The mask must be [H, W] (or [H, W, C]), got shape {mask.shape}.')
    mask = mask > (127 if mask.dtype == np.uint8 else 0.5)
    if mask.shape != (size, size):
      from PIL import Image  # pylint: disable=g-import-not-at-top
      mask = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(
          (size, size), Image.NEAREST)) > 127
    n = int(num_images)
    use_prior = bool(prompt.strip())
    tokens = self.tokenize([prompt] * n)
    known = np.repeat(from_uint8(image)[None], n, axis=0)
    masks = np.repeat(mask.astype(np.float32)[None], n, axis=0)
    embeds = np.repeat(self.encode_image(image[None]), n, axis=0)
    fn = self._cached(('inpaint', settings, resample, use_prior),
                      lambda: self._inpaint_fn(settings, resample, use_prior))
    return self._run_batched(fn, [self._keys(seed, range(n)), tokens, known, masks, embeds],
                             batch_size, self.params, progress)


# --------------------------------------------------------------------------------------------
# Inpainting: RePaint-style resampling (Lugmayr et al. 2022) with any diffusion model
# --------------------------------------------------------------------------------------------
def repaint_sample(diffusion, model_fn: Callable, known: jax.Array, mask: jax.Array,
                   rng: jax.Array, *, steps: int, sampler: str = 'ddim', eta: float = 0.0,
                   resample: int = 1, spacing: str = 'trailing',
                   guidance_scale: float = 1.0, guidance_interval: Sequence[int] | None = None,
                   image_embed_guidance_scale: float | None = None,
                   thresholding: str = 'none') -> jax.Array:
  """Samples x0 whose `mask`ed region is generated and whose rest is `known`.

  At every step the unknown region takes the model's step from x_t and the known region is
  the known image noised to the same level, q(x_prev | known); then (RePaint) the merged
  x_prev is noised back to x_t and the step redone, `resample` passes in all, which lets the
  generated region agree with the kept one. The last step lands on `known` exactly outside
  the mask.

  Args:
    diffusion: a `diffusion.GaussianDiffusion`.
    model_fn: model_fn(x_t, t[, drop_cond]) as for `GaussianDiffusion.sample`.
    known: [B, ...] the image to keep (same scale as the samples, e.g. [-1, 1]).
    mask: broadcastable to known; 1 (True) where to generate, 0 where to keep.
    rng: PRNG key.
    steps, sampler ('ddim' or 'ddpm'), eta, spacing, guidance_scale, guidance_interval,
      image_embed_guidance_scale,
      thresholding: as for `GaussianDiffusion.sample`.
    resample: passes per step (1 = plain replacement-based inpainting).
  """
  from dalle2_jax.diffusion import samplers as samplers_lib  # pylint: disable=g-import-not-at-top
  if sampler not in ('ddim', 'ddpm'):
    raise ValueError(f'Inpainting supports the ddim and ddpm samplers, not {sampler!r}.')
  if resample < 1:
    raise ValueError(f'resample must be >= 1, got {resample}.')
  known = jnp.asarray(known, jnp.float32)
  mask = jnp.broadcast_to(jnp.asarray(mask, jnp.float32), known.shape)
  if samplers_lib.needs_guidance(guidance_scale, image_embed_guidance_scale):
    model_fn = samplers_lib.classifier_free_guidance(model_fn, guidance_scale,
                                                     diffusion.learned_variance,
                                                     guidance_interval,
                                                     image_embed_guidance_scale)
  ts = diffusion.sampling_timesteps(steps, spacing)
  coefs = samplers_lib.sampler_coefficients(diffusion.alphas_cumprod, ts)
  xs = {k: jnp.asarray(v, jnp.int32 if k == 't' else bool if v.dtype == bool else jnp.float32)
        for k, v in coefs.items()}
  rng_init, rng_steps = jax.random.split(rng)
  xs['rng'] = jax.random.split(rng_steps, len(ts))
  b = known.shape[0]
  kw = dict(objective=diffusion.objective, learned_variance=diffusion.learned_variance,
            thresholding=thresholding)

  def body(x, c):
    t = jnp.full((b,), c['t'], jnp.int32)
    beta = jnp.exp(c['log_beta'])

    def one_pass(u, carry):
      x_t, _ = carry
      k_step, k_known, k_back = jax.random.split(jax.random.fold_in(c['rng'], u), 3)
      out = jnp.asarray(model_fn(x_t, t)).astype(jnp.float32)
      noise = jnp.where(c['last'], 0.0, jax.random.normal(k_step, known.shape))
      if sampler == 'ddpm':
        x_prev, _ = samplers_lib.ddpm_step(out, x_t, c, noise, variance=diffusion.variance,
                                           **kw)
      else:
        x_prev, _ = samplers_lib.ddim_step(out, x_t, c, noise, eta=eta, **kw)
      known_prev = (c['sqrt_a_prev'] * known + jnp.sqrt(c['one_minus_a_prev'])
                    * jax.random.normal(k_known, known.shape))
      x_prev = mask * x_prev + (1.0 - mask) * known_prev
      x_back = (jnp.sqrt(1.0 - beta) * x_prev
                + jnp.sqrt(beta) * jax.random.normal(k_back, known.shape))
      return x_back, x_prev

    _, x_prev = jax.lax.fori_loop(0, resample, one_pass, (x, x))
    return x_prev, None

  x_T = jax.random.normal(rng_init, known.shape, jnp.float32)
  x, _ = jax.lax.scan(body, x_T, xs)
  return x
