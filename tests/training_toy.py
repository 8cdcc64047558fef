r"""A minimal task and a fake input iterator for the training-engine tests.

ToyTask regresses per-channel image means (plus a token-dependent term) with a small MLP
whose params carry logical axis names, so FSDP sharding is exercised. FakeInput mimics the
input pipeline's interface (global batches sharded over ('data', 'fsdp'), JSON state).

Also a script, for the tests that need real processes:
  python tests/training_toy.py --workdir DIR [--steps N] [--sleep S] [--num_processes 2
      --process_id I --port P] [--devices 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dalle2_jax.tasks import base
from dalle2_jax.training import sharding as sharding_lib

IMAGE_SIZE = 8
CONTEXT = 6
VOCAB = 16


def toy_config(steps=8, batch_size=16, mesh=None, **stage_overrides):
  """A one-stage config laid out like configs/tiny.py."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ('toy',)
  c.mesh = dict(data=-1, fsdp=1) if mesh is None else dict(mesh)
  c.axis_rules = (
      ('batch', ('data', 'fsdp')),
      ('embed', 'fsdp'),
      ('conv_out', 'fsdp'),
      ('mlp', None),
      ('vocab', None),
  )
  c.toy = dict(
      task='toy', steps=steps, batch_size=batch_size, dtype='float32', remat=False,
      optim=dict(lr=3e-2, warmup_steps=2, schedule='cosine', end_lr_factor=0.1,
                 b1=0.9, b2=0.99, eps=1e-8, weight_decay=1e-4, grad_clip=1.0,
                 grad_accum=1),
      ema=dict(decay=0.9, warmup_steps=1),
      log_every=1, ckpt_every=4, keep=2, sample_every=0, max_nonfinite=3,
      image_size=IMAGE_SIZE,
      model=dict(width=32, noise=0.1),
  )
  for k, v in stage_overrides.items():
    if isinstance(v, dict):
      c.toy[k].update(v)
    else:
      c.toy[k] = v
  return c


class Block(nn.Module):
  width: int
  dtype: str = 'float32'

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(dtype=self.dtype, scale_init=nn.with_logical_partitioning(
        nn.initializers.ones, ('embed',)), bias_init=nn.with_logical_partitioning(
            nn.initializers.zeros, ('embed',)))(x)
    h = nn.Dense(2 * self.width, dtype=self.dtype,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          ('embed', 'mlp')))(h)
    h = nn.gelu(h)
    h = nn.Dense(self.width, dtype=self.dtype,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          ('mlp', 'embed')))(h)
    return x + h


class ToyModel(nn.Module):
  width: int = 32
  dtype: str = 'float32'
  remat: bool = False

  @nn.compact
  def __call__(self, image, tokens):
    x = image.reshape(image.shape[0], -1).astype(self.dtype)
    x = nn.Dense(self.width, dtype=self.dtype,
                 kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                          (None, 'embed')))(x)
    emb = nn.Embed(VOCAB, self.width, dtype=self.dtype,
                   embedding_init=nn.with_logical_partitioning(
                       nn.initializers.normal(0.02), ('vocab', 'embed')))(tokens)
    x = x + emb.mean(axis=1)
    x = nn.with_logical_constraint(x, ('batch', 'embed'))
    block = nn.remat(Block) if self.remat else Block
    for i in range(2):
      x = block(self.width, self.dtype, name=f'block{i}')(x)
    out = nn.Dense(4, dtype=self.dtype,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                            ('embed', None)))(x)
    return out.astype(jnp.float32)


def toy_target(image, tokens):
  return jnp.concatenate([image.mean(axis=(1, 2)),
                          (tokens[:, :1].astype(jnp.float32) / VOCAB - 0.5)], axis=-1)


class ToyTask(base.Task):
  """Regresses image channel means and the first token from a noised input."""

  name = 'toy'

  def model(self):
    mc = self.stage_config.model
    return ToyModel(width=mc.width, dtype=self.stage_config.dtype,
                    remat=self.stage_config.remat)

  def init(self, rng, batch):
    return self.model().init(rng, batch['image'], batch['tokens'])['params']

  def loss(self, params, batch, rng, frozen=None, train=True):
    image = batch['image']
    noise = self.stage_config.model.noise
    if train and noise:
      image = image + noise * jax.random.normal(rng, image.shape)
    pred = self.model().apply({'params': params}, image, batch['tokens'])
    err = (pred - toy_target(batch['image'], batch['tokens'])) ** 2
    loss = err.mean()
    return loss, {'mse_mean': err[:, :3].mean(), 'mse_token': err[:, 3].mean()}

  def flops_per_example(self):
    w = self.stage_config.model.width
    return 2.0 * (IMAGE_SIZE * IMAGE_SIZE * 3 * w + 2 * (4 * w * w) + 4 * w)

  def sample(self, params, batch, rng, frozen=None):
    return jnp.tanh(batch['image'] + 0.0 * params['Dense_0']['kernel'].sum())


def toy_task_fn(config, stage, workdir):
  return ToyTask(config, stage, workdir)


class FakeInput:
  """Deterministic global batches with the input pipeline's interface.

  Batch i depends only on (seed, i); each process builds only its addressable shards.
  `nan_at`: batch indices whose images are NaN. `sleep`: seconds per batch (slow runs
  for the kill tests).
  """

  def __init__(self, global_batch_size, mesh, *, image_size=IMAGE_SIZE, seed=0,
               prepare=None, nan_at=(), sleep=0.0):
    self.batch_size, self.mesh, self.image_size = global_batch_size, mesh, image_size
    self.seed, self.prepare, self.nan_at, self.sleep = seed, prepare, set(nan_at), sleep
    self.index = 0

  def _host_batch(self, i):
    rng = np.random.default_rng([self.seed, i])
    b, s = self.batch_size, self.image_size
    image = rng.uniform(-1, 1, (b, s, s, 3)).astype(np.float32)
    image += rng.uniform(-0.5, 0.5, (b, 1, 1, 3)).astype(np.float32)
    image = np.clip(image, -1, 1)
    if i in self.nan_at:
      image[:] = np.nan
    tokens = rng.integers(1, VOCAB, (b, CONTEXT)).astype(np.int32)
    batch = {'image': image, 'tokens': tokens}
    return self.prepare(batch) if self.prepare else batch

  def __iter__(self):
    return self

  def __next__(self):
    if self.sleep:
      time.sleep(self.sleep)
    batch = self._host_batch(self.index)
    self.index += 1
    return sharding_lib.shard_batch(batch, self.mesh)

  def get_state(self):
    return {'index': self.index, 'seed': self.seed}

  def set_state(self, state):
    if int(state['seed']) != self.seed:   # as grain's iterators check their sampler
      raise ValueError(f'seed in checkpoint {state["seed"]} does not match {self.seed}.')
    self.index = int(state['index'])


def fake_input_fn(nan_at=(), sleep=0.0):
  def input_fn(config, stage, task, mesh, seed):
    return FakeInput(int(config[stage].batch_size), mesh,
                     image_size=config[stage].get('image_size', IMAGE_SIZE), seed=seed,
                     prepare=task.prepare_batch, nan_at=nan_at, sleep=sleep)
  return input_fn


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--steps', type=int, default=8)
  parser.add_argument('--ckpt_every', type=int, default=4)
  parser.add_argument('--sleep', type=float, default=0.0)
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--mesh_fsdp', type=int, default=1)
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  parser.add_argument('--port', type=int, default=0)
  args = parser.parse_args()
  os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={args.devices}'
  from dalle2_jax.training import loop, runtime  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_platforms', 'cpu')
  if args.num_processes > 1:
    runtime.initialize_distributed(dict(coordinator_address=f'127.0.0.1:{args.port}',
                                        num_processes=args.num_processes,
                                        process_id=args.process_id))
  config = toy_config(steps=args.steps, ckpt_every=args.ckpt_every,
                      mesh=dict(data=-1, fsdp=args.mesh_fsdp))
  try:
    loop.run(config, args.workdir, task_fn=toy_task_fn,
             input_fn=fake_input_fn(sleep=args.sleep))
  except loop.Preempted as e:
    print(f'PREEMPTED {e}', flush=True)
    sys.exit(0)
  print('DONE', flush=True)


if __name__ == '__main__':
  main()
