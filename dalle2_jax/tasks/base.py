"""The interface every unCLIP stage implements for the training engine.

A task is everything that differs between stages (clip, prior, decoder, upsampler); the
engine (`dalle2_jax.training`) owns everything that is the same: mesh, sharding, optimizer,
EMA, checkpoints, logging. All methods below except `__init__` and `frozen_params` are pure
and are traced inside `jax.jit`.

Batches are dicts of arrays produced by the input pipeline (`dalle2_jax.data.pipeline`):
  'image':  float32 [B, H, W, 3] in [-1, 1]
  'tokens': int32   [B, L] CLIP BPE ids, zero-padded after the end-of-text token
A task may add keys in `prepare_batch` (host side, numpy), e.g. a low-resolution image.
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import ml_collections

PyTree = Any
Metrics = Mapping[str, jax.Array]


class Task:
  """Base class of a stage. Subclasses set `name` and override the methods."""

  name: str = ''

  def __init__(self, config: ml_collections.ConfigDict, stage: str, workdir: str):
    """`config` is the whole experiment config, `config[stage]` this stage's section.

    `workdir` is the experiment's workdir (the stage writes into workdir/stage); tasks that
    need a frozen CLIP load it here (from `config[stage].clip_checkpoint` or workdir/clip).
    """
    self.config = config
    self.stage = stage
    self.stage_config = config[stage]
    self.workdir = workdir

  # --- model -----------------------------------------------------------------------------
  def model(self) -> nn.Module:
    """The trained Flax module (its params are what the optimizer updates)."""
    raise NotImplementedError

  def init(self, rng: jax.Array, batch: Mapping[str, jax.Array]) -> PyTree:
    """Returns the trainable params (a pytree, possibly with nn.Partitioned boxes)."""
    raise NotImplementedError

  def frozen_params(self) -> PyTree | None:
    """Non-trained inputs of the loss (e.g. a frozen CLIP); None if there are none."""
    return None

  # --- data ------------------------------------------------------------------------------
  def input_image_size(self) -> int | None:
    """The side the input pipeline loads training images at (None = config.data's)."""
    size = self.stage_config.get('image_size')
    return None if size is None else int(size)

  def prepare_batch(self, batch: dict) -> dict:
    """Host-side (numpy) preprocessing of a per-process batch. Default: unchanged."""
    return batch

  # --- training --------------------------------------------------------------------------
  def loss(self, params: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array,
           frozen: PyTree | None = None, train: bool = True
           ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss (mean over the global batch) and a dict of scalar metrics."""
    raise NotImplementedError

  def flops_per_example(self) -> float:
    """Analytic forward FLOPs of the trained model for one example (x3 for a train step)."""
    raise NotImplementedError

  # --- optional hooks --------------------------------------------------------------------
  def sample(self, params: PyTree, batch: Mapping[str, jax.Array], rng: jax.Array,
             frozen: PyTree | None = None) -> jax.Array | None:
    """Images in [-1, 1], [B, H, W, 3], for periodic sample grids; None if not an image stage."""
    return None
