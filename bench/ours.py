"""Our side of the benchmarks: a stage's task and the engine's jitted train step.

`build_train(spec)` turns a bench/matched.py entry into everything a timing loop needs:
the train state (initialised through `training.state.make_state_spec`), a synthetic batch
already placed on the mesh (1 device, or data parallel over `num_devices`), the frozen
params (a random CLIP of the matched widths, where the stage needs one) and `jax.jit(make_train_step(...), donate_argnums=0)`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax.models import unet as unet_lib
from dalle2_jax.tasks import base
from dalle2_jax.training import optimizer as optimizer_lib
from dalle2_jax.training import sharding as sharding_lib
from dalle2_jax.training import state as state_lib


@dataclasses.dataclass
class Built:
  state: Any
  batch: dict
  rng: jax.Array
  frozen: Any
  jitted: Any
  batch_size: int
  flops_per_example: float
  num_params: int
  model_config: dict
  custom_conv_grad: bool | None
  task: Any = None
  config: Any = None


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _tolist(d):
  if isinstance(d, dict):
    return {k: _tolist(v) for k, v in d.items()}
  if isinstance(d, tuple):
    return list(d)
  return d


def make_config(spec: dict, custom_conv_grad: bool | None = None):
  """configs/tiny.py with the spec's stage overrides (and CLIP widths) applied."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  o = spec['ours']
  stage = o['stage']
  with config.unlocked():
    sc = config[stage]
    sc.batch_size = o['batch_size']
    for k in ('image_size', 'low_res', 'high_res', 'crop_frac'):
      if k in o:
        sc[k] = o[k]
    for k, v in o['model'].items():
      sc.model[k] = v
    if custom_conv_grad is not None and 'custom_conv_grad' in sc.model:
      sc.model.custom_conv_grad = custom_conv_grad
    if 'dtype' in o:
      sc.dtype = o['dtype']
      config.clip.dtype = o['dtype']
    if 'custom_conv_grad' in spec and 'custom_conv_grad' in sc.model:
      sc.model.custom_conv_grad = spec['custom_conv_grad']
    clip = o.get('clip')
    if clip:
      config.clip.model.embed_dim = clip['embed_dim']
      config.clip.model.text.width = clip['text_width']
      config.clip.model.text.heads = max(1, clip['text_width'] // 64)
      # The peer takes precomputed CLIP embeddings; ours embeds every batch with the frozen
      # CLIP inside the loss. Keep that CLIP as cheap as possible (no text blocks: token +
      # position embeddings and the final LayerNorm; one small vision block) so the step
      # time is the stage's own. Its cost still counts against us (not in the FLOP count).
      config.clip.model.text.depth = 0
    config.tokenizer.context_length = 32
    sc.ema.decay = 0.999
  return config


class UNetEpsTask(base.Task):
  """The decoder's UNet with an eps-prediction MSE (no CLIP): the conv-gradient benchmark."""
  name = 'unet'

  def __init__(self, config, stage, workdir):
    super().__init__(config, stage, workdir)
    m = self.stage_config.model
    self.unet = unet_lib.unet_from_config(m, out_channels=3)
    self.decoder = unet_lib.Decoder(unet=self.unet, num_clip_tokens=m.num_clip_tokens)
    self.embed_dim = config.clip.model.embed_dim
    self.text_width = config.clip.model.text.width

  def model(self):
    return self.decoder

  def _conditioning(self, batch):
    b = batch['image'].shape[0]
    k = jax.random.key(1)
    z = jax.random.normal(k, (b, self.embed_dim))
    te = jax.random.normal(k, (b, batch['tokens'].shape[1], self.text_width))
    return z, te, batch['tokens'] != 0

  def init(self, rng, batch):
    z, te, tm = self._conditioning(batch)
    t = jnp.zeros((batch['image'].shape[0],), jnp.int32)
    return self.decoder.init(rng, batch['image'], t, z, te, tm)['params']

  def loss(self, params, batch, rng, frozen=None, train=True):
    x0 = batch['image']
    b = x0.shape[0]
    k1, k2 = jax.random.split(rng)
    t = jax.random.randint(k1, (b,), 0, 1000)
    a = jnp.cos((t / 1000 + 0.008) / 1.008 * jnp.pi / 2)[:, None, None, None]
    noise = jax.random.normal(k2, x0.shape)
    xt = a * x0 + jnp.sqrt(1 - a * a) * noise
    z, te, tm = self._conditioning(batch)
    out = self.decoder.apply({'params': params}, xt, t, z, te, tm, train=train)
    loss = jnp.mean((out - noise) ** 2)
    return loss, {'mse': loss}

  def flops_per_example(self):
    try:
      from dalle2_jax.models import flops  # pylint: disable=g-import-not-at-top
      return float(flops.unet_flops(self.stage_config.model, self.stage_config.image_size))
    except Exception:  # pylint: disable=broad-except
      return float('nan')


def synthetic_batch(config, stage: str, batch_size: int) -> dict:
  """A host batch shaped like the input pipeline's: images in [-1, 1], padded tokens."""
  sc = config[stage]
  size = sc.get('high_res', None) or sc.get('image_size', None) or config.data.image_size
  rs = np.random.RandomState(0)
  img = rs.uniform(-1, 1, (batch_size, size, size, 3)).astype(np.float32)
  length = config.tokenizer.context_length
  tokens = np.zeros((batch_size, length), np.int32)
  for i in range(batch_size):
    n = 6 + i % 10
    tokens[i, 0] = 49406
    tokens[i, 1:n - 1] = rs.randint(1, 49405, n - 2)
    tokens[i, n - 1] = 49407
  return dict(image=img, tokens=tokens)


def random_like(init_fn, seed: int = 0, std: float = 0.02):
  """Random params with the structure of init_fn()'s output, without running it.

  `jax.eval_shape` gives the shapes; numpy fills them (normal, `std`). Running a module's
  init eagerly compiles every initialiser op by op (minutes for a UNet on a busy 2-core CPU)
  and timing does not depend on the values.
  """
  shapes = jax.eval_shape(init_fn)
  rs = np.random.RandomState(seed)

  def fill(s):
    if jnp.issubdtype(s.dtype, jnp.floating):
      return jnp.asarray((rs.standard_normal(s.shape) * std).astype(s.dtype))
    return jnp.zeros(s.shape, s.dtype)
  return jax.tree.map(fill, nn.unbox(shapes))


def random_frozen_clip(config):
  """A randomly initialised CLIP of `config.clip.model`, as stages that need one load it."""
  from dalle2_jax.models import clip as clip_lib  # pylint: disable=g-import-not-at-top
  mc = clip_lib.model_config_from(config, 'clip')
  model = clip_lib.build_model(mc)
  s = int(mc.image_size)

  def init():
    with nn.logical_axis_rules(()):
      return model.init(jax.random.key(0),
                        jnp.ones((1, int(mc.text.context_length)), jnp.int32),
                        jnp.zeros((1, s, s, 3)))['params']
  return clip_lib.FrozenClip(params=random_like(init), config=mc, experiment_config=config)


class _InitWithoutRules:
  """Delegates to a task; runs `init` and `loss` with empty logical-axis rules.

  Works around flax 0.12.8's DenseGeneral (used by models/layers.MultiHeadAttention):
  under the engine's `use_mesh`, its kernel_init wrapper (run at init, and again at apply
  for flax's param shape check) applies the rank-3 logical constraint to the flat rank-2
  kernel and fails ("only valid for values of rank at least 3"). The params keep their
  logical names, so the engine's shardings are unchanged; on the 1-device benchmark mesh
  the activation constraints this drops are no-ops anyway.
  """

  def __init__(self, task):
    self._task = task

  def __getattr__(self, name):
    return getattr(self._task, name)

  def init(self, rng, batch):
    with nn.logical_axis_rules(()):
      return self._task.init(rng, batch)

  def loss(self, *args, **kwargs):
    with nn.logical_axis_rules(()):
      return self._task.loss(*args, **kwargs)


def build_train(spec: dict, total_steps: int = 100,
                custom_conv_grad: bool | None = None, num_devices: int = 1) -> Built:
  config = make_config(spec, custom_conv_grad)
  stage = spec['ours']['stage']
  sc = config[stage]
  if spec['kind'] == 'unet':
    task = UNetEpsTask(config, stage, '')
  else:
    import importlib  # pylint: disable=g-import-not-at-top
    from dalle2_jax import tasks  # pylint: disable=g-import-not-at-top
    module, cls = tasks._TASKS[config[stage].task].split(':')  # pylint: disable=protected-access
    cls = getattr(importlib.import_module(module), cls)
    if stage in ('prior', 'decoder'):
      task = cls(config, stage, '', frozen_clip=random_frozen_clip(config))
    else:
      task = cls(config, stage, '')
  task = _InitWithoutRules(task)
  mesh = sharding_lib.make_mesh(config, jax.devices()[:num_devices])
  rules = sharding_lib.axis_rules(config)
  tx, schedule = optimizer_lib.make_optimizer(sc.optim, total_steps)
  host = task.prepare_batch(synthetic_batch(config, stage, sc.batch_size))
  batch = sharding_lib.shard_batch(host, mesh)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch)
  spec_ = state_lib.make_state_spec(task, tx, shapes, mesh, rules)
  st = spec_.init_fn(jax.random.key(0))
  frozen = task.frozen_params()
  step = state_lib.make_train_step(task, tx, schedule, sc, mesh, rules)
  jitted = jax.jit(step, donate_argnums=0)
  model_config = _tolist(sc.model.to_dict())
  ccg = model_config.get('custom_conv_grad')
  return Built(state=st, batch=batch, rng=jax.random.key(1), frozen=frozen, jitted=jitted,
               batch_size=sc.batch_size, flops_per_example=float(task.flops_per_example()),
               num_params=count_params(st.params), model_config=model_config,
               custom_conv_grad=ccg, task=task, config=config)
