"""A workdir of tiny random-weight stage exports, for sampler and CLI tests (no training).

Params come from `jax.eval_shape` of each task's init, filled with seeded normal noise, so
nothing is compiled to build them; the images they draw are noise, which is all the sampler's
plumbing tests need (shapes, order, determinism, endpoints).
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import tiny
from dalle2_jax.models import clip as clip_lib
from dalle2_jax.training import export


def micro_config() -> ml_collections.ConfigDict:
  """configs/tiny.py made smaller still: 16 px decoder, 16 -> 32 px upsampler, 2 steps."""
  c = ml_collections.ConfigDict(tiny.get_config().to_dict())
  c.clip.image_size = 16
  c.clip.model.vision.patch_size = 8
  c.decoder.image_size = 16
  c.decoder.model.channels = 8
  c.decoder.model.channel_mult = (1,)
  c.decoder.model.attention_resolutions = (16,)
  c.decoder.sample.steps = 2
  c.prior.sample.steps = 2
  c.upsampler.low_res = 16
  c.upsampler.high_res = 32
  c.upsampler.model.channels = 8
  c.upsampler.model.channel_mult = (1,)
  c.upsampler.sample.steps = 2
  # Random weights predict eps ~ 0, which makes every image the sign of its initial noise;
  # predicting x0 instead keeps random-weight images dependent on their conditioning.
  c.decoder.diffusion.objective = 'x0'
  c.upsampler.diffusion.objective = 'x0'
  # As configs/shapes.py (tiny's 'l2' is covered by the end-to-end test).
  c.prior.model.embed_norm = 'standardize'
  return c


def _random_params(abstract, seed: int):
  """Init-like random params: norm scales 1, biases 0, other weights N(0, 1 / fan_in)."""
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = str(path[-1].key if hasattr(path[-1], 'key') else path[-1])
    if name == 'scale':
      return np.ones(x.shape, np.float32)
    if name == 'bias':
      return np.zeros(x.shape, np.float32)
    fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else 1
    std = 1.0 / np.sqrt(max(fan_in, 1)) if len(x.shape) > 1 else 0.02
    return (std * rng.standard_normal(x.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, nn.unbox(abstract))


def make_workdir(workdir: str, config: ml_collections.ConfigDict | None = None,
                 skip=()) -> str:
  """Writes random-weight exports of config.stages (but `skip`) into workdir/<stage>/export."""
  from dalle2_jax import tasks  # pylint: disable=g-import-not-at-top
  from dalle2_jax.tasks import decoder as decoder_task  # pylint: disable=g-import-not-at-top
  from dalle2_jax.tasks import prior as prior_task  # pylint: disable=g-import-not-at-top
  config = config or micro_config()
  length = int(config.tokenizer.context_length)
  batch = {'image': jnp.zeros((2, 32, 32, 3)), 'tokens': jnp.ones((2, length), jnp.int32)}
  rng = jax.random.PRNGKey(0)
  clip = None
  for i, stage in enumerate(config.stages):
    kind = config[stage].task
    if stage in skip and kind != 'clip':
      continue
    if kind == 'clip':
      task = tasks.get_task(config, stage, workdir)
    elif kind == 'prior':
      d = int(config.clip.model.embed_dim)
      stats = {'image_mean': np.zeros(d), 'image_std': np.full(d, 0.5),
               'text_mean': np.zeros(d), 'text_std': np.full(d, 0.5)}
      task = prior_task.PriorTask(config, stage, workdir, frozen_clip=clip, stats=stats)
    elif kind == 'decoder':
      task = decoder_task.DecoderTask(config, stage, workdir, frozen_clip=clip)
    else:
      task = tasks.get_task(config, stage, workdir)
    params = _random_params(jax.eval_shape(task.init, rng, batch), i)
    if kind == 'prior' and 'embed_stats' in params:
      params['embed_stats'] = {k: np.asarray(v, np.float32) for k, v in stats.items()}
    if kind == 'clip':
      params['logit_scale'] = np.asarray(np.log(10.0), np.float32)
    if stage not in skip:
      export.save_export(os.path.join(workdir, stage, 'export'), config, stage, params)
    if kind == 'clip':
      clip = clip_lib.FrozenClip(params=jax.tree.map(jnp.asarray, params),
                                 config=clip_lib.model_config_from(config, stage),
                                 experiment_config=config)
  return workdir
