"""NegCLIP-style hard negative captions for the clip stage: `config.clip.hard_negatives`.

Every example gets one caption that is false of its image but differs from the true caption
only in what binds attributes to objects: two objects with their colours or shapes swapped or
the relation reversed; one object with one named attribute changed
(`data.captioned_shapes.hard_negative`). The clip loss adds these captions as extra texts in
the image -> text direction (`tasks.clip.contrastive_loss`), so the towers must encode which
colour goes with which shape and where, which in-batch negatives of a random batch rarely
test. Without them the text embedding of "a red circle to the left of a blue square" barely
differs from that of "a blue circle to the left of a red square".
"""

from __future__ import annotations

import zlib

import numpy as np

from dalle2_jax import tokenizer as tokenizer_lib
from dalle2_jax.data import captioned_shapes


class HardNegatives:
  """Host-side batch augmentation: adds `negative_tokens` [B, L] (a task's prepare_batch).

  An example with no applicable negative (a one-object caption naming only its shape, all of
  whose other shapes would make a held-out pair, say) gets its own tokens, marked False in
  `has_negative`; the loss leaves those out.
  """

  def __init__(self, config, stage: str):
    self.enabled = bool(config[stage].get('hard_negatives', False))
    if self.enabled and config.data.name != 'captioned_shapes':
      raise ValueError(f'config.{stage}.hard_negatives needs the captioned_shapes attributes; '
                       f'set it to False for config.data.name={config.data.name!r}.')
    self._tokenizer = tokenizer_lib.Tokenizer.from_config(config) if self.enabled else None

  def __call__(self, batch: dict) -> dict:
    """A new dict with `negative_tokens` and `has_negative`; seeded by the batch's tokens, so
    a resumed run draws the same negatives."""
    if not self.enabled:
      return batch
    tokens = np.asarray(batch['tokens'])
    rng = np.random.default_rng(zlib.crc32(np.ascontiguousarray(tokens).tobytes()) + 1)
    captions, has = [], np.zeros(len(tokens), bool)
    for i in range(len(tokens)):
      neg = captioned_shapes.hard_negative(batch['objects'][i], batch['num_objects'][i],
                                           batch['names'][i], batch['relation'][i], rng)
      has[i] = neg is not None
      captions.append(neg['caption'] if neg else '')
    negative = self._tokenizer(captions)
    negative[~has] = tokens[~has]
    return dict(batch, negative_tokens=negative, has_negative=has)
