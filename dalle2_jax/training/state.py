"""The train state, its sharded initialisation, and the jitted train step.

`TrainState` is a plain pytree (params unboxed; their logical-axis shardings live beside
it), so orbax saves it as is and `train_step(state, batch, rng, frozen) -> (state, metrics)`
is one pure function: micro-batch gradient accumulation (lax.scan), a finite check that
leaves params, optimizer state and EMA unchanged on a non-finite loss or gradient, AdamW,
and the EMA update. The loop compiles it once ahead of time with the state donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import optax

from dalle2_jax.training import sharding as sharding_lib

EMA_KEYS = frozenset({'decay', 'warmup_steps'})


@flax.struct.dataclass
class TrainState:
  step: jax.Array              # int32 []: train steps taken, including skipped ones
  params: Any                  # float32 trainable params (unboxed)
  opt_state: Any
  ema_params: Any              # exponential moving average of params: what sampling uses
  nonfinite_run: jax.Array     # int32 []: consecutive steps with a non-finite loss/grad
  nonfinite_total: jax.Array   # int32 []: all skipped steps


@dataclasses.dataclass(frozen=True)
class StateSpec:
  """What the loop needs to build, shard and restore a train state."""
  abstract: TrainState         # ShapeDtypeStructs
  shardings: TrainState        # NamedShardings of the same structure
  init_fn: Callable[[jax.Array], TrainState]   # jitted, out_shardings=shardings


def check_ema_config(stage: str, ema) -> None:
  unknown = sorted(set(ema.keys()) - EMA_KEYS)
  if unknown:
    raise ValueError(f'config.{stage}.ema has unknown fields {unknown}; '
                     f'the known fields are {sorted(EMA_KEYS)}.')
  if not 0.0 <= float(ema.decay) < 1.0:
    raise ValueError(f'config.{stage}.ema.decay={ema.decay} must be in [0, 1).')


def init_batch(batch_shapes: dict, mesh: Mesh) -> dict:
  """Zeros shaped like a batch with the smallest batch the mesh can shard (traced in jit)."""
  rows = sharding_lib.batch_size_per_shard(mesh)
  return {k: jnp.zeros((rows,) + tuple(v.shape[1:]), v.dtype) for k, v in batch_shapes.items()}


def _float32(tree):
  return jax.tree.map(
      lambda x: x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_state_spec(task, tx: optax.GradientTransformation, batch_shapes: dict, mesh: Mesh,
                    rules) -> StateSpec:
  """Abstract init (`jax.eval_shape`), shardings from logical names, jitted sharded init."""
  replicated = sharding_lib.replicated(mesh)

  def boxed_params(rng):
    with sharding_lib.use_mesh(mesh, rules):
      return task.init(rng, init_batch(batch_shapes, mesh))

  rng_shape = jax.eval_shape(lambda: jax.random.key(0))
  abstract_boxed = jax.eval_shape(boxed_params, rng_shape)
  param_shardings = sharding_lib.logical_shardings(abstract_boxed, mesh, rules)

  def init(rng):
    params = _float32(nn.unbox(boxed_params(rng)))   # params stay float32 (mixed precision)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(step=zero, params=params, opt_state=tx.init(params),
                      ema_params=jax.tree.map(jnp.copy, params),
                      nonfinite_run=zero, nonfinite_total=zero)

  abstract = jax.eval_shape(init, rng_shape)
  opt_shardings = optax.tree_map_params(
      tx, lambda _, s: s, abstract.opt_state, param_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, NamedSharding))
  shardings = TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                         ema_params=param_shardings, nonfinite_run=replicated,
                         nonfinite_total=replicated)
  # Large params are born sharded: never materialised whole on one device.
  init_fn = jax.jit(init, out_shardings=shardings)
  return StateSpec(abstract=abstract, shardings=shardings, init_fn=init_fn)


def frozen_shardings(frozen: Any, mesh: Mesh, rules) -> Any:
  """Shardings of a task's frozen params (logical names if boxed, else replicated)."""
  if frozen is None:
    return None
  return sharding_lib.logical_shardings(frozen, mesh, rules)


def make_train_step(task, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    stage_config, mesh: Mesh, rules) -> Callable:
  """Returns train_step(state, batch, rng, frozen) -> (state, metrics); pure, to be jitted."""
  accum = int(stage_config.optim.grad_accum)
  ema_decay = float(stage_config.ema.decay)
  ema_warmup = int(stage_config.ema.warmup_steps)
  batch_spec = PartitionSpec(sharding_lib.BATCH_AXES)

  def loss_and_grads(params, batch, rng, frozen):
    def loss_fn(p):
      loss, metrics = task.loss(p, batch, rng, frozen, train=True)
      return loss.astype(jnp.float32), metrics
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    return loss, metrics, grads

  def train_step(state: TrainState, batch, rng, frozen):
    with sharding_lib.use_mesh(mesh, rules):
      step_rng = jax.random.fold_in(rng, state.step)
      if accum == 1:
        loss, metrics, grads = loss_and_grads(state.params, batch, step_rng, frozen)
      else:
        # Micro-batch j holds examples j, j+accum, ...: every device keeps its own rows.
        def split(x):
          x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])
          x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, batch_spec))
          return jnp.swapaxes(x, 0, 1)
        micro = jax.tree.map(split, batch)

        def body(carry, xs):
          i, mb = xs
          mb = jax.tree.map(
              lambda x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, batch_spec)),
              mb)
          out = loss_and_grads(state.params, mb, jax.random.fold_in(step_rng, i), frozen)
          return jax.tree.map(jnp.add, carry, out), None

        zeros = jax.eval_shape(loss_and_grads, state.params,
                               jax.tree.map(lambda x: x[0], micro), step_rng, frozen)
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
        total, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
        loss, metrics, grads = jax.tree.map(lambda x: x / accum, total)

      grad_norm = optax.tree.norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      def apply_update(operand):
        params, opt_state, ema_params = operand
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        decay = jnp.where(state.step < ema_warmup, 0.0, ema_decay)
        ema_params = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema_params,
                                  params)
        return params, opt_state, ema_params

      # A non-finite step leaves params, optimizer state and EMA as they were. A cond, not a
      # select of new and old values: the select kept both alive, and XLA copied the whole
      # train state every step (5% of a prior step on CPU).
      params, opt_state, ema = jax.lax.cond(
          finite, apply_update, lambda operand: operand,
          (state.params, state.opt_state, state.ema_params))

      bad = (~finite).astype(jnp.int32)
      new_state = TrainState(
          step=state.step + 1,
          params=params,
          opt_state=opt_state,
          ema_params=ema,
          nonfinite_run=(state.nonfinite_run + 1) * bad,
          nonfinite_total=state.nonfinite_total + bad)
      metrics = dict(metrics)
      metrics.update(
          loss=loss,
          grad_norm=grad_norm,
          param_norm=optax.tree.norm(new_state.params),
          learning_rate=schedule(state.step - state.nonfinite_total),
          nonfinite=bad,
          nonfinite_run=new_state.nonfinite_run,
          nonfinite_total=new_state.nonfinite_total)
      return new_state, metrics

  return train_step
