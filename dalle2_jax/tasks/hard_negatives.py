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


MIRROR_MODES = ('none', 'left_right', 'both')
# Values of the batch's `mirror` field: which negative image an example's caption gets.
NO_MIRROR, LEFT_RIGHT, UP_DOWN, COLOUR_SWAP, RELOCATE, EXTRA_OBJECT = 0, 1, 2, 3, 4, 5
DRAWN_KINDS = (COLOUR_SWAP, RELOCATE, EXTRA_OBJECT)   # in the batch's `negative_image`


class MirrorNegatives:
  """Host-side batch field for `config.<stage>.mirror_negatives`: `mirror` int32 [B], the
  axis along which the example's image, mirrored, is false of its caption (LEFT_RIGHT or
  UP_DOWN; NO_MIRROR for none), so the clip loss can add that mirrored image as a hard
  negative image for the caption (text -> image direction, `tasks.clip.contrastive_loss`).

  A mirror is used only where it is exactly another captioned_shapes scene. All three shapes
  are left-right symmetric, so mirroring left-right reverses the columns and nothing else:
  it is false of a two-object caption with a left/right relation and of a one-object caption
  that names a left or right column. Circles and squares are also up-down symmetric (a
  triangle's apex would point down), so with mode 'both', scenes without a triangle are
  also mirrored up-down where that makes the caption false (an above/below relation, a top or
  bottom row) and left-right does not. Captions every mirror keeps true (two objects named
  alike, the centre, no position) are left out. Runs after Recolour and ConverseCaptions,
  whose `names`, `objects` and `relation` it reads. The negative captions (HardNegatives)
  test the text tower on the relation's words; this tests the image tower on where things
  are.

  With `config.<stage>.colour_swap_negatives`, a two-object image whose objects' colours,
  exchanged, make a scene its caption is false of (`captioned_shapes.colour_swap_applies`:
  no held-out pair drawn) may instead get that image (`negative_image`, float like
  `image`; `mirror` = COLOUR_SWAP): always where no mirror applies, else half the time
  (seeded by the batch's tokens). The negative captions test which colour goes with which
  shape from the image's side; this tests it from the caption's, the direction the prior
  samples in.

  With `config.<stage>.relocate_negatives`, a two-object image may instead get the scene
  with its second object moved to another cell whose relation to the first is not the
  caption's (nor, for objects the caption names alike, its converse): "above" drawn side by
  side or diagonally, "to the left of" drawn in one column or reversed (`negative_image`,
  `mirror` = RELOCATE; `captioned_shapes.move_object`, any shapes). The mirror tests one
  axis; this tests which axis the pair lies on.

  With `config.<stage>.extra_object_negatives`, an image of small objects may instead get
  itself with one of its objects copied into an empty cell (`mirror` = EXTRA_OBJECT): one
  object more than the caption says, which no captioned_shapes caption or image (one or two
  objects) ever contrasts.

  Each kind that applies to an example is equally likely to be its negative image (the
  mirror and the colour swap as above; each further kind taken in 1 / n of the examples
  where n kinds apply, always where it alone does).
  """

  def __init__(self, config, stage: str):
    mode = config[stage].get('mirror_negatives', 'none')
    self.mode = {False: 'none', True: 'left_right'}.get(mode, mode)
    if self.mode not in MIRROR_MODES:
      raise ValueError(f'config.{stage}.mirror_negatives={mode!r}; choose one of '
                       f'{MIRROR_MODES}.')
    if self.mode != 'none' and config.data.name != 'captioned_shapes':
      raise ValueError(f'config.{stage}.mirror_negatives needs the captioned_shapes '
                       f"attributes; set it to 'none' for config.data.name="
                       f'{config.data.name!r}.')

    self.colour_swap = bool(config[stage].get('colour_swap_negatives', False))
    self.relocate = bool(config[stage].get('relocate_negatives', False))
    self.extra_object = bool(config[stage].get('extra_object_negatives', False))
    for field in ('colour_swap', 'relocate', 'extra_object'):
      if getattr(self, field) and config.data.name != 'captioned_shapes':
        raise ValueError(f'config.{stage}.{field}_negatives needs the captioned_shapes '
                         'attributes; set it to False for config.data.name='
                         f'{config.data.name!r}.')

  def __call__(self, batch: dict) -> dict:
    drawn = self.colour_swap or self.relocate or self.extra_object
    if self.mode == 'none' and not drawn:
      return batch
    mirror = (np.full(len(batch['objects']), NO_MIRROR, np.int32) if self.mode == 'none' else
              mirror_axis(batch['objects'], batch['num_objects'], batch['names'],
                          batch['relation'], up_down=self.mode == 'both'))
    if not drawn:
      return dict(batch, mirror=mirror)
    seed = zlib.crc32(np.ascontiguousarray(batch['tokens']).tobytes())
    num_kinds = (mirror != NO_MIRROR).astype(np.int32)
    negative_image = batch['image']
    if self.colour_swap:
      applies = captioned_shapes.colour_swap_applies(batch['objects'], batch['num_objects'],
                                                     batch['names'])
      num_kinds += applies
      swap = applies & ((mirror == NO_MIRROR)
                        | (np.random.default_rng(seed + 2).random(len(mirror)) < 0.5))
      mirror = np.where(swap, COLOUR_SWAP, mirror).astype(np.int32)
      negative_image = captioned_shapes.swap_colours_where(negative_image, batch['objects'],
                                                           swap)   # a copy
    else:
      negative_image = np.array(negative_image)
    for kind, on, make in ((RELOCATE, self.relocate, relocated_images),
                           (EXTRA_OBJECT, self.extra_object, extra_object_images)):
      if not on:
        continue
      rng = np.random.default_rng(seed + kind - 1)
      for i, image in enumerate(make(batch, rng)):
        if image is not None:   # reservoir sampling: uniform over the kinds that apply
          num_kinds[i] += 1
          if rng.random() * num_kinds[i] < 1:
            mirror[i], negative_image[i] = kind, image
    return dict(batch, mirror=mirror, negative_image=negative_image)


def relocated_images(batch, rng) -> list:
  """For each two-object example, its image with the second object moved to a random cell
  that makes the caption false (`MirrorNegatives`' RELOCATE), or None (one object, or no
  such cell far enough from the first object)."""
  cs = captioned_shapes
  images, num_objects = batch['image'], batch['num_objects']
  objects, relation = np.asarray(batch['objects']), np.asarray(batch['relation'])
  apart = told_apart(objects, batch['names'])
  out = []
  for i in range(len(objects)):
    moved = None
    if int(num_objects[i]) == 2:
      r0, c0 = int(objects[i, 0, cs.ROW]), int(objects[i, 0, cs.COL])
      rel = int(relation[i])
      for cell in rng.permutation(9):
        new = cs.relation_of(r0, c0, cell // 3, cell % 3)
        if new in (-1, rel) or (not apart[i] and new == cs.OPPOSITE_RELATION[rel]):
          continue
        moved = cs.move_object(images[i], objects[i], 1, int(cell))
        if moved is not None:
          break
    out.append(moved)
  return out


def extra_object_images(batch, rng) -> list:
  """For each example whose objects are all small, its image with one of them (at random)
  copied into a random empty cell far enough from the others (`MirrorNegatives`'
  EXTRA_OBJECT), else None."""
  cs = captioned_shapes
  objects = np.asarray(batch['objects'])
  out = []
  for i in range(len(objects)):
    n = int(batch['num_objects'][i])
    copied = None
    if np.all(objects[i, :n, cs.SIZE] == 0):
      which = int(rng.integers(n))
      taken = {int(o[cs.ROW] * 3 + o[cs.COL]) for o in objects[i, :n]}
      for cell in rng.permutation(9):
        if int(cell) not in taken:
          copied = cs.move_object(batch['image'][i], objects[i, :n], which, int(cell),
                                  keep=True)
          if copied is not None:
            break
    out.append(copied)
  return out


def told_apart(objects, names) -> np.ndarray:
  """bool [B]: the caption names the two objects differently (shape, colour or size), so a
  relation read the other way round is false of it."""
  cs = captioned_shapes
  objects, names = np.asarray(objects), np.asarray(names, bool)
  fields = [cs.SHAPE, cs.COLOUR, cs.SIZE]
  return np.any(names[:, [cs.NAME_FIELDS.index(f) for f in ('shape', 'colour', 'size')]]
                & (objects[:, 0, fields] != objects[:, 1, fields]), axis=1)


def mirror_axis(objects, num_objects, names, relation, up_down: bool = False) -> np.ndarray:
  """int32 [B]: LEFT_RIGHT where mirroring the image left-right makes its caption false,
  else (with `up_down`, scenes without a triangle) UP_DOWN where mirroring it up-down does,
  else NO_MIRROR."""
  cs = captioned_shapes
  objects, names = np.asarray(objects), np.asarray(names, bool)
  two = np.asarray(num_objects) == 2
  relation = np.asarray(relation)
  # Objects the caption names alike ("a triangle to the left of a triangle") stay true.
  apart = told_apart(objects, names)
  position = names[:, cs.NAME_FIELDS.index('position')]

  def changes(relations, cell_field):
    rel = np.isin(relation, [cs.RELATIONS.index(r) for r in relations])
    return np.where(two, rel & apart, position & (objects[:, 0, cell_field] != 1))
  out = np.where(changes(('to the left of', 'to the right of'), cs.COL), LEFT_RIGHT, NO_MIRROR)
  if up_down:
    symmetric = ~np.any(objects[:, :, cs.SHAPE] == cs.SHAPES.index('triangle'), axis=1)
    out = np.where((out == NO_MIRROR) & symmetric & changes(('above', 'below'), cs.ROW),
                   UP_DOWN, out)
  return out.astype(np.int32)
