"""The captioned_shapes colour augmentation of a stage: `config[stage].recolour_prob`.

A `recolour_prob` fraction of each batch gets random off-palette object colours and captions
rewritten without colour words (`data.captioned_shapes.recolour`; never a held-out
(colour, shape) pair). CLIP learns shape and position features that do not depend on colour;
the decoder learns to take an object's colour from the image embedding rather than from the
few (colour, shape) pairs it has seen.
"""

from __future__ import annotations

import zlib

import numpy as np

from dalle2_jax import tokenizer as tokenizer_lib
from dalle2_jax.data import captioned_shapes


class Recolour:
  """Host-side batch augmentation (a task's `prepare_batch`)."""

  def __init__(self, config, stage: str):
    self.prob = float(config[stage].get('recolour_prob', 0.0))
    if not 0.0 <= self.prob <= 1.0:
      raise ValueError(f'config.{stage}.recolour_prob={self.prob} must be in [0, 1].')
    if self.prob and config.data.name != 'captioned_shapes':
      raise ValueError(f'config.{stage}.recolour_prob needs the captioned_shapes attributes; '
                       f'set it to 0 for config.data.name={config.data.name!r}.')
    self._tokenizer = tokenizer_lib.Tokenizer.from_config(config) if self.prob else None

  def __call__(self, batch: dict) -> dict:
    """Recolours a `prob` fraction of the batch (a new dict; the input is not modified). The
    choice is seeded by the batch's own tokens, so a resumed run draws the same
    augmentation."""
    if not self.prob:
      return batch
    rng = np.random.default_rng(zlib.crc32(np.ascontiguousarray(batch['tokens']).tobytes()))
    pick = np.flatnonzero(rng.random(len(batch['tokens'])) < self.prob)
    if not len(pick):
      return batch
    batch = dict(batch)
    images, captions = np.array(batch['image']), list(batch['caption'])
    for i in pick:
      images[i], captions[i] = captioned_shapes.recolour(
          images[i], batch['objects'][i], batch['num_objects'][i], batch['names'][i],
          batch['relation'][i], rng)
    names = np.array(batch['names'], bool)
    names[pick, 1] = False          # the new captions name no colour
    batch['image'], batch['caption'], batch['names'] = images, captions, names
    batch['tokens'] = np.array(batch['tokens'])
    batch['tokens'][pick] = self._tokenizer([captions[i] for i in pick])
    return batch
