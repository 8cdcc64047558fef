"""AdamW with warmup + cosine/linear decay, global-norm clipping and a weight-decay mask.

Everything comes from a stage's `optim` section:
  lr, warmup_steps, schedule ('cosine' | 'linear' | 'constant'), end_lr_factor,
  b1, b2, eps, weight_decay, grad_clip (0 = off), grad_accum (micro-batches per step)
"""

from __future__ import annotations

from typing import Any

import jax
import optax

OPTIM_KEYS = frozenset({'lr', 'warmup_steps', 'schedule', 'end_lr_factor', 'b1', 'b2', 'eps',
                        'weight_decay', 'grad_clip', 'grad_accum'})
SCHEDULES = ('cosine', 'linear', 'constant')


def check_optim_config(stage: str, optim) -> None:
  """Unknown or missing optimizer fields fail here, naming the field."""
  unknown = sorted(set(optim.keys()) - OPTIM_KEYS)
  if unknown:
    raise ValueError(f'config.{stage}.optim has unknown fields {unknown}; '
                     f'the known fields are {sorted(OPTIM_KEYS)}.')
  missing = sorted(OPTIM_KEYS - set(optim.keys()))
  if missing:
    raise ValueError(f'config.{stage}.optim lacks {missing}.')
  if optim.schedule not in SCHEDULES:
    raise ValueError(f'config.{stage}.optim.schedule={optim.schedule!r}; '
                     f'choose one of {SCHEDULES}.')


def learning_rate_schedule(optim, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then decay to `lr * end_lr_factor` at `total_steps`."""
  lr = float(optim.lr)
  warmup = int(optim.warmup_steps)
  decay_steps = max(int(total_steps) - warmup, 1)
  end = lr * float(optim.end_lr_factor)
  if optim.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=end / lr if lr else 0.0)
  elif optim.schedule == 'linear':
    decay = optax.linear_schedule(lr, end, decay_steps)
  else:
    decay = optax.constant_schedule(lr)
  if warmup <= 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def weight_decay_mask(params: Any) -> Any:
  """True where weight decay applies: matrices and conv kernels, not embeddings.

  Norm scales and biases are 1-D and excluded by rank; embedding tables and positional
  embeddings are excluded by name (a leaf name containing 'emb').
  """
  def decays(path, leaf):
    name = _key_name(path[-1]) if path else ''
    return leaf.ndim >= 2 and 'emb' not in name.lower()
  return jax.tree_util.tree_map_with_path(decays, params)


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def make_optimizer(optim, total_steps: int) -> tuple[optax.GradientTransformation,
                                                     optax.Schedule]:
  """Returns (transformation, learning-rate schedule) of a stage's optim section."""
  schedule = learning_rate_schedule(optim, total_steps)
  parts = []
  if float(optim.grad_clip) > 0:
    parts.append(optax.clip_by_global_norm(float(optim.grad_clip)))
  parts.append(optax.adamw(schedule, b1=float(optim.b1), b2=float(optim.b2),
                           eps=float(optim.eps), weight_decay=float(optim.weight_decay),
                           mask=weight_decay_mask))
  return optax.chain(*parts), schedule


def global_norm(tree: Any) -> jax.Array:
  return optax.tree.norm(tree)
