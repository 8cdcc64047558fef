"""captioned_shapes: the embedded procedurally generated text-to-image dataset.

This module is the dataset's definition (see the spec, captioned_shapes.md): the palette, the
shapes, the 3 x 3 position grid, caption templates, split rules and the renderer. It needs only
numpy; the TFDS builder that writes it to disk lives in `dalle2_jax.data.builders`.

Every example is a pure function of (split, index, seed):

  ex = make_example('train', 7, seed=0)
  ex['image']     # uint8 [64, 64, 3]
  ex['caption']   # 'a large red circle in the top left'
  ex['objects']   # int32 [2, 5]: per object (shape, colour, size, row, col); row 1 = -1 if absent
  ex['num_objects'], ex['relation'], ex['names']

Attribute layout (shared with `scoring`):
  objects[i] = (shape, colour, size, row, col), indices into SHAPES, COLOUR_NAMES, SIZES and
               rows/cols of the grid (0 = top/left); the second object is all -1 when the image
               holds one object.
  relation   = index into RELATIONS of "object 0 <relation> object 1", -1 for one object.
  names      = bool [4]: which of NAME_FIELDS the caption names. Two-object captions never
               name a position (they name the relation instead).
"""

from __future__ import annotations

import struct
from typing import Sequence
import zlib

import numpy as np

IMAGE_SIZE = 64
SHAPES = ('circle', 'square', 'triangle')
COLOUR_NAMES = ('red', 'green', 'blue', 'yellow', 'magenta', 'cyan')
PALETTE = np.array([(220, 40, 40), (40, 190, 60), (50, 90, 235), (235, 215, 40),
                    (215, 60, 205), (40, 205, 215)], dtype=np.uint8)
SIZES = ('small', 'large')
SIZE_PX = (12, 24)
CELL_CENTRES = (16, 32, 48)
JITTER = 2
POSITIONS = (('top left', 'top', 'top right'),
             ('left', 'center', 'right'),
             ('bottom left', 'bottom', 'bottom right'))
RELATIONS = ('to the left of', 'to the right of', 'above', 'below')
NAME_FIELDS = ('shape', 'colour', 'size', 'position')
# Object attribute columns.
SHAPE, COLOUR, SIZE, ROW, COL = range(5)

SPLITS = ('train', 'test', 'heldout')
_SPLIT_IDS = {'train': 0, 'test': 1, 'heldout': 2}
# (colour, shape) pairs never seen in train/test; every heldout image holds at least one.
HELD_OUT_PAIRS = (('red', 'triangle'), ('green', 'square'), ('blue', 'circle'))
_HELD_OUT_IDX = tuple((COLOUR_NAMES.index(c), SHAPES.index(s)) for c, s in HELD_OUT_PAIRS)
_ALL_PAIRS = tuple((c, s) for c in range(len(COLOUR_NAMES)) for s in range(len(SHAPES)))
TRAIN_PAIRS = tuple(p for p in _ALL_PAIRS if p not in _HELD_OUT_IDX)

# Mix of caption styles.
P_TWO_OBJECTS = 0.25
P_FULL = 0.6         # of single-object captions; the rest are partial
STYLES = ('full', 'partial', 'two')
MIN_GAP = 2          # px between the boxes of two objects (keeps 8-connected components apart)

_POS_TEMPLATES = ('a {np} {in_pos}', 'there is a {np} {at_pos}', '{np}, {pos}',
                  'a picture of a {np} {in_pos}', 'the {pos} has a {np}')
_NOPOS_TEMPLATES = ('a {np}', 'there is a {np}', '{np}', 'a picture of a {np}')
_TWO_TEMPLATES = ('a {np0} {rel} a {np1}', 'there is a {np0} {rel} a {np1}',
                  '{np0} {rel} {np1}')


def _templates():
  """Boolean masks [s, s] per (shape, size): pixel centres inside the shape."""
  out = {}
  for si, s in enumerate(SIZE_PX):
    c = np.arange(s) + 0.5
    y, x = np.meshgrid(c, c, indexing='ij')
    out[(0, si)] = (x - s / 2) ** 2 + (y - s / 2) ** 2 <= (s / 2) ** 2
    out[(1, si)] = np.ones((s, s), bool)
    # Isosceles, apex up, base = full box width at the bottom (a 1/4 px tolerance so the
    # apex row is drawn and the box is exactly s x s).
    out[(2, si)] = np.abs(x - s / 2) <= y / 2 + 0.25
  return out


TEMPLATES = _templates()


def is_held_out(colour: int, shape: int) -> bool:
  return (colour, shape) in _HELD_OUT_IDX


def split_rng(split: str, index: int, seed: int) -> np.random.Generator:
  if split not in _SPLIT_IDS:
    raise ValueError(f'captioned_shapes has splits {SPLITS}, not {split!r}.')
  return np.random.default_rng([int(seed), _SPLIT_IDS[split], int(index)])


def _box(obj, jit):
  """(y0, x0, s) of an object's bounding box given its jitter (dy, dx)."""
  s = SIZE_PX[obj[SIZE]]
  cy = CELL_CENTRES[obj[ROW]] + jit[0]
  cx = CELL_CENTRES[obj[COL]] + jit[1]
  return cy - s // 2, cx - s // 2, s


def _gap(b0, b1):
  """Chebyshev gap in px between two boxes (<= 0 when they overlap or touch)."""
  (y0, x0, s0), (y1, x1, s1) = b0, b1
  gy = max(y1 - (y0 + s0), y0 - (y1 + s1))
  gx = max(x1 - (x0 + s0), x0 - (x1 + s1))
  return max(gy, gx)


def relation_of(row0, col0, row1, col1) -> int:
  """Index into RELATIONS of "object 0 <rel> object 1" (columns first, then rows)."""
  if col0 != col1:
    return 0 if col0 < col1 else 1
  if row0 != row1:
    return 2 if row0 < row1 else 3
  return -1


def sample_layout(rng: np.random.Generator, split: str, style: str | None = None):
  """Draws objects, jitter, relation and caption style. Returns a dict of numpy fields."""
  pairs_ok = TRAIN_PAIRS
  if style is None:
    u = rng.random()
    style = ('two' if u < P_TWO_OBJECTS else
             'full' if u < P_TWO_OBJECTS + (1 - P_TWO_OBJECTS) * P_FULL else 'partial')
  objects = np.full((2, 5), -1, np.int32)
  jitter = np.zeros((2, 2), np.int32)
  if style == 'two':
    if split == 'heldout':
      p0 = _HELD_OUT_IDX[rng.integers(len(_HELD_OUT_IDX))]
      p1 = _ALL_PAIRS[rng.integers(len(_ALL_PAIRS))]
      pairs = [p0, p1] if rng.random() < 0.5 else [p1, p0]
    else:
      pairs = [pairs_ok[i] for i in rng.integers(len(pairs_ok), size=2)]
    cells = rng.choice(9, size=2, replace=False)
    for i in range(2):
      objects[i] = (pairs[i][1], pairs[i][0], 0, cells[i] // 3, cells[i] % 3)
    while True:   # redraw the jitter until the boxes are apart (jitter 0 always is)
      jitter = rng.integers(-JITTER, JITTER + 1, size=(2, 2)).astype(np.int32)
      if _gap(_box(objects[0], jitter[0]), _box(objects[1], jitter[1])) >= MIN_GAP:
        break
    relation = relation_of(objects[0, ROW], objects[0, COL], objects[1, ROW], objects[1, COL])
  else:
    if split == 'heldout':
      pair = _HELD_OUT_IDX[rng.integers(len(_HELD_OUT_IDX))]
    else:
      pair = pairs_ok[rng.integers(len(pairs_ok))]
    cell = rng.integers(9)
    objects[0] = (pair[1], pair[0], rng.integers(2), cell // 3, cell % 3)
    jitter[0] = rng.integers(-JITTER, JITTER + 1, size=2)
    relation = -1
  names = np.ones(4, bool)
  if style == 'two':
    names[3] = False
    names[2] = rng.random() < 0.5
  elif style == 'partial':
    # Drop a non-empty subset of (colour, size, position); heldout keeps the colour, since
    # naming the unseen (colour, shape) combination is the point of that split.
    droppable = [2, 3] if split == 'heldout' else [1, 2, 3]
    while True:
      drop = rng.random(len(droppable)) < 0.5
      if drop.any():
        break
    for d, f in zip(drop, droppable):
      names[f] = not d
  template = int(rng.integers(1 << 16))
  return dict(objects=objects, jitter=jitter, relation=np.int32(relation), names=names,
              num_objects=np.int32(2 if style == 'two' else 1), template=template,
              style=style)


def _noun_phrase(obj, names):
  words = []
  if names[2]:
    words.append(SIZES[obj[SIZE]])
  if names[1]:
    words.append(COLOUR_NAMES[obj[COLOUR]])
  words.append(SHAPES[obj[SHAPE]])
  return ' '.join(words)


def caption_of(layout) -> str:
  """The caption text of a layout from `sample_layout`."""
  objects, names, t = layout['objects'], layout['names'], layout['template']
  if layout['num_objects'] == 2:
    return _TWO_TEMPLATES[t % len(_TWO_TEMPLATES)].format(
        np0=_noun_phrase(objects[0], names), np1=_noun_phrase(objects[1], names),
        rel=RELATIONS[layout['relation']])
  np_ = _noun_phrase(objects[0], names)
  if names[3]:
    pos = POSITIONS[objects[0, ROW]][objects[0, COL]]
    side = pos in ('left', 'right')
    return _POS_TEMPLATES[t % len(_POS_TEMPLATES)].format(
        np=np_, pos=pos, in_pos=('on the ' if side else 'in the ') + pos,
        at_pos=('on the ' if side else 'at the ') + pos)
  return _NOPOS_TEMPLATES[t % len(_NOPOS_TEMPLATES)].format(np=np_)


def render(objects: np.ndarray, jitter: np.ndarray) -> np.ndarray:
  """Draws the objects (rows with shape -1 are skipped) on a black 64 x 64 canvas."""
  img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  for obj, jit in zip(objects, jitter):
    if obj[SHAPE] < 0:
      continue
    y0, x0, s = _box(obj, jit)
    mask = TEMPLATES[(int(obj[SHAPE]), int(obj[SIZE]))]
    img[y0:y0 + s, x0:x0 + s][mask] = PALETTE[obj[COLOUR]]
  return img


def make_example(split: str, index: int, seed: int = 0, style: str | None = None) -> dict:
  """The example `index` of `split` (deterministic given split, index, seed)."""
  layout = sample_layout(split_rng(split, index, seed), split, style)
  return dict(image=render(layout['objects'], layout['jitter']),
              caption=caption_of(layout),
              objects=layout['objects'],
              num_objects=layout['num_objects'],
              relation=layout['relation'],
              names=layout['names'])


def random_colour(rng: np.random.Generator, shape: int, min_max: int = 140) -> np.ndarray:
  """A random RGB colour (uint8 [3], brightest channel >= min_max) whose nearest palette
  entry does not make a held-out pair with `shape`: no recoloured object is, by the scoring
  rule, an object of a held-out pair."""
  while True:
    c = rng.integers(0, 256, size=3)
    if c.max() < min_max:
      continue
    nearest = int(np.argmin(np.sum((PALETTE.astype(np.int64) - c) ** 2, axis=1)))
    if not is_held_out(nearest, shape):
      return c.astype(np.uint8)


def recolour(image: np.ndarray, objects: np.ndarray, num_objects: int, names: np.ndarray,
             relation: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
  """Colour augmentation: each object gets a random off-palette colour and the caption is
  rewritten from the attributes without colour words (so the text never names a colour
  the image does not show).

  image: float [H, W, 3] in [-1, 1] at any size (anti-aliased edges keep their coverage:
  a pixel is alpha x its object's colour on black). Returns (image like the input, caption).
  Teaches the image tower shape, size and position features that do not depend on colour,
  without showing a held-out (colour, shape) pair.
  """
  n = int(num_objects)
  new = np.stack([random_colour(rng, int(objects[i, SHAPE])) for i in range(n)]).astype(
      np.float32)
  out = _repaint(image, objects[:n], new)
  names = np.array(names, bool)
  names[1] = False
  caption = caption_of(dict(objects=objects, names=names, template=int(rng.integers(1 << 16)),
                            num_objects=n, relation=int(relation)))
  return out, caption


def _repaint(image: np.ndarray, objects: np.ndarray, colours: np.ndarray) -> np.ndarray:
  """The image with each object's palette colour replaced by `colours` [n, 3] (0..255).

  image: float [H, W, 3] in [-1, 1] at any size. Each lit pixel is alpha x the palette
  colour of the object it matches best (anti-aliased edges keep their coverage alpha)."""
  u = (np.asarray(image, np.float32) + 1.0) * 127.5                     # [H, W, 3] in 0..255
  lit = np.maximum(np.maximum(u[..., 0], u[..., 1]), u[..., 2]) > 8.0   # 25x u.max(-1)'s speed
  p = u[lit]                                   # [P, 3]: only lit pixels change (2x faster)
  cols = PALETTE[objects[:, COLOUR]].astype(np.float32)               # [n, 3]
  alpha = np.einsum('pc,nc->pn', p, cols) / np.sum(cols * cols, axis=1)
  alpha = np.clip(alpha, 0.0, 1.0)
  resid = np.sum((p[:, None, :] - alpha[..., None] * cols) ** 2, axis=-1)   # [P, n]
  k = np.argmin(resid, axis=-1)
  a = np.take_along_axis(alpha, k[:, None], axis=-1)[:, 0]
  out = np.zeros_like(u)
  out[lit] = a[:, None] * colours[k]
  return (out / 127.5 - 1.0).astype(np.asarray(image).dtype)


def colour_swap_applies(objects, num_objects, names, allow_held_out: bool = False
                        ) -> np.ndarray:
  """bool [B]: the scene's two objects, their colours exchanged, make another
  captioned_shapes scene that the caption is false of: two objects of different colours,
  a caption that names colours, and (unless `allow_held_out`, for evaluation) neither new
  (colour, shape) pair held out, so held-out pairs stay unseen in training images."""
  objects, names = np.asarray(objects), np.asarray(names, bool)
  c0, c1 = objects[:, 0, COLOUR], objects[:, 1, COLOUR]
  s0, s1 = objects[:, 0, SHAPE], objects[:, 1, SHAPE]
  held = np.array([is_held_out(int(a), int(b)) or is_held_out(int(c), int(d))
                   for a, b, c, d in zip(c1, s0, c0, s1)], bool)
  return ((np.asarray(num_objects) == 2) & names[:, NAME_FIELDS.index('colour')]
          & (c0 != c1) & (allow_held_out | ~held))


def swap_colours(image: np.ndarray, objects: np.ndarray) -> np.ndarray:
  """The two-object image with the objects' colours exchanged (pixel for pixel: the same
  shapes, sizes, places and jitter). image: float [H, W, 3] in [-1, 1]."""
  objects = np.asarray(objects)[:2]
  return _repaint(image, objects, PALETTE[objects[::-1, COLOUR]].astype(np.float32))


def swap_colours_where(images: np.ndarray, objects: np.ndarray, where: np.ndarray
                       ) -> np.ndarray:
  """A copy of the float images [B, H, W, 3] with `swap_colours` applied to the rows where
  `where` (bool, at most B long; e.g. `colour_swap_applies`) is true."""
  out = np.array(images)
  for i in np.flatnonzero(where):
    out[i] = swap_colours(out[i], objects[i])
  return out


def _cell_window(cell: int, size: int) -> tuple[slice, slice]:
  """The rows and columns of a cell's 16 px window (at 64 px; scaled to `size`), which
  holds a small object whatever its jitter; the nine windows do not overlap."""
  half = IMAGE_SIZE // 8
  y, x = CELL_CENTRES[cell // 3], CELL_CENTRES[cell % 3]
  to = lambda v: v * size // IMAGE_SIZE  # noqa: E731
  return slice(to(y - half), to(y + half)), slice(to(x - half), to(x + half))


def move_object(image: np.ndarray, objects: np.ndarray, which: int, cell: int,
                keep: bool = False) -> np.ndarray | None:
  """The image with small object `which` moved (or, with `keep`, copied), pixel for pixel
  (its jitter kept), to the empty `cell` (row * 3 + col); None where it would come nearer
  another object than MIN_GAP (no captioned_shapes scene, and one the scorer could read as
  one object). A cell's window holds a small object whatever its jitter (two-object scenes
  draw small objects only). image: float [H, W, 3] in [-1, 1], H a multiple of 8."""
  size = image.shape[0]
  if size % 8:
    raise ValueError(f'move_object needs an image size that is a multiple of 8, not {size}.')
  objects = np.asarray(objects)
  present = [i for i in range(len(objects)) if objects[i, SHAPE] >= 0]
  if np.any(objects[present, SIZE] != 0):
    raise ValueError('move_object moves small objects only (a large one overflows its cell).')
  cells = [int(objects[i, ROW] * 3 + objects[i, COL]) for i in present]
  if cell in cells:
    raise ValueError(f'move_object: cell {cell} is not empty.')
  src = _cell_window(cells[present.index(which)], size)
  dst = _cell_window(cell, size)
  out = np.array(image)
  out[dst] = out[src]
  if not keep:
    out[src] = -1.0

  def box(window):
    lit = np.max(out[window], axis=-1) > -1.0 + 16 / 127.5
    ys, xs = np.flatnonzero(lit.any(1)), np.flatnonzero(lit.any(0))
    return (window[0].start + ys[0], window[1].start + xs[0],
            window[0].start + ys[-1] + 1, window[1].start + xs[-1] + 1)
  by0, bx0, by1, bx1 = box(dst)
  for i, c in zip(present, cells):
    if i == which and not keep:
      continue
    ay0, ax0, ay1, ax1 = box(_cell_window(c, size))
    if max(by0 - ay1, ay0 - by1, bx0 - ax1, ax0 - bx1) * IMAGE_SIZE < MIN_GAP * size:
      return None
  return out


def shape_change_applies(num_objects, names) -> np.ndarray:
  """bool [B]: one object, and a caption that names its shape (so the scene drawn with
  another shape is one the caption is false of)."""
  return (np.asarray(num_objects) == 1) & np.asarray(names, bool)[:, NAME_FIELDS.index('shape')]


def render_each_shape(objects: np.ndarray) -> np.ndarray:
  """uint8 [len(SHAPES), 64, 64, 3]: a one-object scene drawn with each shape in turn (its
  colour, size and cell; no jitter, so the drawings differ only in the shape)."""
  obj = np.array(objects, np.int32)[:1]
  out = []
  for s in range(len(SHAPES)):
    obj[0, SHAPE] = s
    out.append(render(obj, np.zeros((1, 2), np.int32)))
  return np.stack(out)


OPPOSITE_RELATION = (1, 0, 3, 2)   # index into RELATIONS of each relation's converse
NEGATIVE_KINDS = ('colour_swap', 'shape_swap', 'relation_flip', 'colour', 'shape', 'size',
                  'position')
# The two objects named in the other order with the same relation ("a B to the left of an A"
# for "an A to the left of a B"): the caption's own words, so only word order tells it apart.
ORDER_SWAP = 'order_swap'


def _names_pair(objects, i) -> bool:
  return not is_held_out(int(objects[i, COLOUR]), int(objects[i, SHAPE]))


def hard_negative(objects: np.ndarray, num_objects: int, names: np.ndarray, relation: int,
                  rng: np.random.Generator, kinds: Sequence[str] = NEGATIVE_KINDS,
                  template: int | None = None) -> dict | None:
  """A caption that is false of the image but close to its true one (NegCLIP's hard
  negatives); None when no kind in `kinds` applies. Returns a dict: caption, kind, and the
  attributes it names (objects, num_objects, relation, names; as `sample_layout`).

  Two objects: their colours swapped ('colour_swap'), their shapes swapped ('shape_swap') or
  the relation replaced by its converse ('relation_flip'; not when the caption names the two
  alike) or, when `kinds` has ORDER_SWAP, the objects named in the other order, so only the
  binding of attributes to objects is wrong. One object: one named
  attribute ('colour', 'shape', 'size', 'position') replaced by another value. A negative
  never names a held-out (colour, shape) pair, so those pairs stay unseen in training text
  too. The caption template is `template`
  or, if None, drawn from `rng` as for a true caption.
  """
  objects = np.array(objects, np.int32)
  names = np.array(names, bool)
  n, relation = int(num_objects), int(relation)
  options = []
  if n == 2:
    for kind, col in (('colour_swap', COLOUR), ('shape_swap', SHAPE)):
      if kind in kinds and objects[0, col] != objects[1, col] and (col != COLOUR or names[1]):
        o = objects.copy()
        o[[0, 1], col] = o[[1, 0], col]
        if _names_pair(o, 0) and _names_pair(o, 1):
          options.append((kind, o, relation))
    # Reversing the relation between two objects the caption cannot tell apart ("a green
    # triangle to the left of a green triangle") leaves it true.
    if ('relation_flip' in kinds and relation >= 0
        and _noun_phrase(objects[0], names) != _noun_phrase(objects[1], names)):
      options.append(('relation_flip', objects, OPPOSITE_RELATION[relation]))
    if (ORDER_SWAP in kinds and relation >= 0
        and _noun_phrase(objects[0], names) != _noun_phrase(objects[1], names)):
      options.append((ORDER_SWAP, objects[::-1].copy(), relation))
  else:
    num_values = dict(colour=len(COLOUR_NAMES), shape=len(SHAPES), size=len(SIZES),
                      position=9)
    for kind, num in num_values.items():
      field = NAME_FIELDS.index(kind)
      if kind not in kinds or not names[field]:
        continue
      for value in rng.permutation(num):
        o = objects.copy()
        if kind == 'position':
          if value == objects[0, ROW] * 3 + objects[0, COL]:
            continue
          o[0, ROW], o[0, COL] = value // 3, value % 3
        else:
          col = {'colour': COLOUR, 'shape': SHAPE, 'size': SIZE}[kind]
          if value == objects[0, col]:
            continue
          o[0, col] = value
        if kind not in ('colour', 'shape') or _names_pair(o, 0):
          options.append((kind, o, relation))
          break
  if not options:
    return None
  kind, o, rel = options[int(rng.integers(len(options)))]
  if template is None:
    template = int(rng.integers(1 << 16))
  layout = dict(objects=o, names=names, num_objects=n, relation=rel, template=template)
  return dict(layout, caption=caption_of(layout), kind=kind)


def converse(objects: np.ndarray, relation: int) -> tuple[np.ndarray, int]:
  """The same two-object scene described the other way round: (objects in the other
  order, the converse relation), for "a B to the right of an A" from "an A to the left of
  a B"."""
  return np.asarray(objects)[::-1].copy(), OPPOSITE_RELATION[int(relation)]


def eval_prompts(kind: str = 'test', num: int = 64, seed: int = 0,
                 styles: Sequence[str] = ('full', 'partial', 'two')) -> dict:
  """Prompts with their attributes for compositional-accuracy evaluation.

  Args:
    kind: 'test' (train distribution of (colour, shape) pairs) or 'heldout' (every prompt
      names at least one held-out pair).
    num: number of prompts per style.
    seed: sampling seed (use a seed different from the dataset's for fresh prompts).
    styles: any of 'full' (one object, all attributes), 'partial' (one object, some
      attributes left out) and 'two' (two objects and their relation).

  Returns:
    dict with 'caption' (list of str), 'style' (list of str) and numpy 'objects' [N, 2, 5],
    'num_objects' [N], 'relation' [N], 'names' [N, 4], 'image' [N, 64, 64, 3] (a ground
    truth rendering, useful as a reference), in the order of `styles`.
  """
  if kind not in ('test', 'heldout'):
    raise ValueError(f"eval_prompts kind must be 'test' or 'heldout', not {kind!r}.")
  out = {k: [] for k in ('caption', 'style', 'objects', 'num_objects', 'relation', 'names',
                         'image')}
  for si, style in enumerate(styles):
    if style not in STYLES:
      raise ValueError(f'eval_prompts styles must be among {STYLES}, not {style!r}.')
    for i in range(num):
      rng = np.random.default_rng([int(seed), 1000 + _SPLIT_IDS[kind], si, i])
      ex_layout = sample_layout(rng, kind, style)
      out['caption'].append(caption_of(ex_layout))
      out['style'].append(style)
      out['image'].append(render(ex_layout['objects'], ex_layout['jitter']))
      for k in ('objects', 'num_objects', 'relation', 'names'):
        out[k].append(ex_layout[k])
  for k in ('objects', 'num_objects', 'relation', 'names', 'image'):
    out[k] = np.stack(out[k]) if out[k] else np.zeros((0,))
  return out


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return (struct.pack('>I', len(data)) + kind + data +
          struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF))


def png_bytes(image: np.ndarray) -> bytes:
  """A standard 8-bit RGB PNG with filter type 0 (None) on every row.

  Unfiltered rows let `pipeline.decode_image` decode these with one zlib call (any PNG
  reader opens them too); on flat shapes over black they compress as well as PIL's output.
  """
  image = np.ascontiguousarray(image, dtype=np.uint8)
  h, w, _ = image.shape
  raw = np.zeros((h, 1 + 3 * w), np.uint8)
  raw[:, 1:] = image.reshape(h, 3 * w)
  return (b'\x89PNG\r\n\x1a\n' +
          _png_chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0)) +
          _png_chunk(b'IDAT', zlib.compress(raw.tobytes(), 1)) +
          _png_chunk(b'IEND', b''))


def encoded_chunk(args) -> list:
  """Examples [start, stop) of a split with PNG-encoded images: [(index, example), ...].

  (split, start, stop, seed) in; used by the TFDS builder, in worker processes too.
  """
  split, start, stop, seed = args
  out = []
  for i in range(start, stop):
    ex = make_example(split, i, seed)
    ex['image'] = png_bytes(ex['image'])
    ex['index'] = np.int32(i)
    out.append((i, ex))
  return out
