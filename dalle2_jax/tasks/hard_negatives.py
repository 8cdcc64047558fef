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
  """Host-side batch augmentation: adds `negative_tokens` [B, L] (a task's prepare_batch),
  or [B, K, L] with `config.<stage>.num_hard_negatives` K > 1: up to K negatives of
  different kinds per example (a two-object caption has up to three: colours swapped,
  shapes swapped, relation reversed; with K = 1 it gets one of those that apply, at random).

  An example with no applicable negative (a one-object caption naming only its shape, all of
  whose other shapes would make a held-out pair, say) gets its own tokens, marked False in
  `has_negative` ([B] or [B, K]); the loss leaves those out.
  """

  def __init__(self, config, stage: str):
    self.enabled = bool(config[stage].get('hard_negatives', False))
    self.num = int(config[stage].get('num_hard_negatives', 1))
    self.kinds = captioned_shapes.NEGATIVE_KINDS + (
        (captioned_shapes.ORDER_SWAP,) if config[stage].get('order_swap_negatives') else ())
    if self.num < 1:
      raise ValueError(f'config.{stage}.num_hard_negatives={self.num}: needs at least 1 '
                       f'(turn them off with config.{stage}.hard_negatives=False).')
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
    b, k = len(tokens), self.num
    captions, has = [], np.zeros((b, k), bool)
    for i in range(b):
      kinds = list(self.kinds)
      for j in range(k):   # distinct kinds while any apply
        neg = captioned_shapes.hard_negative(batch['objects'][i], batch['num_objects'][i],
                                             batch['names'][i], batch['relation'][i], rng,
                                             kinds=kinds)
        has[i, j] = neg is not None
        captions.append(neg['caption'] if neg else '')
        if neg is not None:
          kinds.remove(neg['kind'])
    negative = self._tokenizer(captions).reshape(b, k, -1)
    negative = np.where(has[..., None], negative, tokens[:, None])
    if k == 1:
      negative, has = negative[:, 0], has[:, 0]
    return dict(batch, negative_tokens=negative, has_negative=has)


class ConverseCaptions:
  """Host-side batch augmentation: `config.<stage>.converse_prob` of the two-object examples
  get their caption's converse ("a B to the right of an A" for "an A to the left of a B",
  `captioned_shapes.converse`), with `objects` and `relation` to match, so the text tower
  sees both descriptions of one scene. Seeded by the batch's tokens (a resumed run repeats
  it); the input batch is not modified."""

  def __init__(self, config, stage: str):
    self.prob = float(config[stage].get('converse_prob', 0.0))
    if not 0.0 <= self.prob <= 1.0:
      raise ValueError(f'config.{stage}.converse_prob={self.prob} must be in [0, 1].')
    if self.prob and config.data.name != 'captioned_shapes':
      raise ValueError(f'config.{stage}.converse_prob needs the captioned_shapes attributes; '
                       f'set it to 0 for config.data.name={config.data.name!r}.')
    self._tokenizer = tokenizer_lib.Tokenizer.from_config(config) if self.prob else None

  def __call__(self, batch: dict) -> dict:
    if not self.prob:
      return batch
    tokens = np.asarray(batch['tokens'])
    rng = np.random.default_rng(zlib.crc32(np.ascontiguousarray(tokens).tobytes()) + 2)
    pick = np.flatnonzero((rng.random(len(tokens)) < self.prob)
                          & (np.asarray(batch['num_objects']) == 2)
                          & (np.asarray(batch['relation']) >= 0))
    if not len(pick):
      return batch
    objects, relation = np.array(batch['objects']), np.array(batch['relation'])
    captions = list(batch.get('caption', [''] * len(tokens)))
    for i in pick:
      objects[i], relation[i] = captioned_shapes.converse(objects[i], relation[i])
      captions[i] = captioned_shapes.caption_of(dict(
          objects=objects[i], names=np.asarray(batch['names'][i], bool), num_objects=2,
          relation=int(relation[i]), template=int(rng.integers(1 << 16))))
    tokens = np.array(tokens)
    tokens[pick] = self._tokenizer([captions[i] for i in pick])
    return dict(batch, objects=objects, relation=relation, caption=captions, tokens=tokens)


class MirrorNegatives:
  """Host-side batch flag for `config.<stage>.mirror_negatives`: `has_mirror_negative` [B],
  True where the image mirrored left-right is false of the caption, so the clip loss can add
  that mirrored image as a hard negative image for the caption (text -> image direction,
  `tasks.clip.contrastive_loss`).

  All captioned_shapes shapes are left-right symmetric, so the mirror is exactly the scene
  with its columns reversed: false of a two-object caption with a left/right relation and of
  a one-object caption that names a left or right column; true of everything else (above /
  below, two objects named alike, the middle column, captions without a position), which are
  left unflagged. Runs after Recolour and ConverseCaptions, whose `names`, `objects` and
  `relation` it reads. The negative captions (HardNegatives) test the text tower on the
  relation's words; this tests the image tower on where things are.
  """

  def __init__(self, config, stage: str):
    self.enabled = bool(config[stage].get('mirror_negatives', False))
    if self.enabled and config.data.name != 'captioned_shapes':
      raise ValueError(f'config.{stage}.mirror_negatives needs the captioned_shapes '
                       f'attributes; set it to False for config.data.name='
                       f'{config.data.name!r}.')

  def __call__(self, batch: dict) -> dict:
    if not self.enabled:
      return batch
    return dict(batch, has_mirror_negative=mirror_changes_caption(
        batch['objects'], batch['num_objects'], batch['names'], batch['relation']))


def mirror_changes_caption(objects, num_objects, names, relation) -> np.ndarray:
  """bool [B]: whether mirroring each image left-right makes its caption false."""
  objects, names = np.asarray(objects), np.asarray(names, bool)
  two = np.asarray(num_objects) == 2
  relation = np.asarray(relation)
  sideways = (relation == captioned_shapes.RELATIONS.index('to the left of')) | (
      relation == captioned_shapes.RELATIONS.index('to the right of'))
  # Objects the caption names alike ("a triangle to the left of a triangle") stay true.
  fields = [captioned_shapes.SHAPE, captioned_shapes.COLOUR, captioned_shapes.SIZE]
  told_apart = np.any(names[:, [captioned_shapes.NAME_FIELDS.index(f) for f in
                                ('shape', 'colour', 'size')]]
                      & (objects[:, 0, fields] != objects[:, 1, fields]), axis=1)
  position = names[:, captioned_shapes.NAME_FIELDS.index('position')]
  off_centre = objects[:, 0, captioned_shapes.COL] != 1
  return np.where(two, sideways & told_apart, position & off_centre)
