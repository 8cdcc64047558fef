"""Compositional accuracy on captioned_shapes: the spec's deterministic detector and scorer.

  objs = detect(image_uint8)                      # list of dicts: shape, colour, size, row, col
  result = check(objs, objects, num_objects, relation, names)   # per-attribute bools, 'overall'
  summary = aggregate([result, ...])             # accuracy per attribute and overall

The rule (captioned_shapes.md, "Scoring a generated image"): foreground = pixels whose max
channel > 80; objects = 8-connected components with area >= 20 px; colour = nearest palette
entry to the component's mean colour; shape by fill ratio area / box area (> 0.88 square,
0.62 to 0.88 circle, < 0.62 triangle); size large if the box's longer side >= 18 px; cell =
grid third holding the box centre. A prompt is satisfied when the detected objects match
every attribute it names (two objects: both objects and the relation) and no extra object is
present. Images of another size than 64 px have the pixel thresholds scaled by (size / 64).
"""

from __future__ import annotations

import itertools
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from dalle2_jax.data import captioned_shapes as cs

FOREGROUND_THRESHOLD = 80
MIN_AREA = 20
LARGE_SIDE = 18
SQUARE_FILL = 0.88
CIRCLE_FILL = 0.62
_EIGHT = np.ones((3, 3), bool)
ATTRIBUTES = ('count', 'shape', 'colour', 'size', 'position', 'relation')


def detect(image: np.ndarray) -> list[dict]:
  """Objects in a uint8 [H, W, 3] image, sorted top-to-bottom then left-to-right.

  Each object: dict(shape, colour, size, row, col) as indices like captioned_shapes, plus
  'area', 'fill' and 'box' (y0, x0, y1, x1 inclusive) for inspection.
  """
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'detect wants a [H, W, 3] image, got shape {image.shape}.')
  if image.dtype != np.uint8:
    raise ValueError(f'detect wants uint8 pixels (0..255), got {image.dtype}; convert '
                     'with np.clip((x + 1) * 127.5, 0, 255).round().astype(np.uint8).')
  h, w = image.shape[:2]
  scale = h / cs.IMAGE_SIZE
  fg = image.max(-1) > FOREGROUND_THRESHOLD
  labels, n = ndimage.label(fg, structure=_EIGHT)
  out = []
  if n == 0:
    return out
  boxes = ndimage.find_objects(labels)
  areas = np.bincount(labels.ravel(), minlength=n + 1)
  pix = image.reshape(-1, 3).astype(np.float64)
  flat = labels.ravel()
  sums = np.stack([np.bincount(flat, weights=pix[:, c], minlength=n + 1) for c in range(3)], -1)
  palette = cs.PALETTE.astype(np.float64)
  for k in range(1, n + 1):
    area = int(areas[k])
    if area < MIN_AREA * scale * scale:
      continue
    ys, xs = boxes[k - 1]
    bh, bw = ys.stop - ys.start, xs.stop - xs.start
    fill = area / float(bh * bw)
    shape = (cs.SHAPES.index('square') if fill > SQUARE_FILL else
             cs.SHAPES.index('circle') if fill >= CIRCLE_FILL else cs.SHAPES.index('triangle'))
    mean = sums[k] / area
    colour = int(np.argmin(((palette - mean) ** 2).sum(-1)))
    size = 1 if max(bh, bw) >= LARGE_SIDE * scale else 0
    cy = (ys.start + ys.stop) / 2.0
    cx = (xs.start + xs.stop) / 2.0
    row = min(int(cy * 3 // h), 2)
    col = min(int(cx * 3 // w), 2)
    out.append(dict(shape=shape, colour=colour, size=size, row=row, col=col, area=area,
                    fill=fill, box=(ys.start, xs.start, ys.stop - 1, xs.stop - 1)))
  out.sort(key=lambda o: (o['row'], o['col'], o['box']))
  return out


def _match(det: Mapping, obj: Sequence[int], names: Sequence[bool]) -> dict:
  return dict(shape=det['shape'] == obj[cs.SHAPE],
              colour=(not names[1]) or det['colour'] == obj[cs.COLOUR],
              size=(not names[2]) or det['size'] == obj[cs.SIZE],
              position=(not names[3]) or (det['row'] == obj[cs.ROW] and
                                          det['col'] == obj[cs.COL]))


def check(detected: Sequence[Mapping], objects: np.ndarray, num_objects: int,
          relation: int, names: Sequence[bool]) -> dict:
  """Whether detected objects satisfy a prompt's attributes.

  Returns a dict of bools for 'count' and each attribute the prompt names (of 'shape',
  'colour', 'size', 'position', 'relation'; an attribute is right when it matches for every
  prompt object under the best assignment of detected to prompt objects) and 'overall'.
  Attributes the prompt does not name are absent from the dict.
  """
  objects = np.asarray(objects)
  names = [bool(x) for x in names]
  num_objects = int(num_objects)
  named = [a for a, on in zip(cs.NAME_FIELDS, names) if on]
  if num_objects == 2:
    named.append('relation')
  result = {'count': len(detected) == num_objects}
  best, best_score = None, -1
  if len(detected) >= num_objects:
    for perm in itertools.permutations(range(len(detected)), num_objects):
      per = [_match(detected[p], objects[i], names) for i, p in enumerate(perm)]
      attrs = {a: all(m[a] for m in per) for a in ('shape', 'colour', 'size', 'position')}
      if num_objects == 2:
        d0, d1 = detected[perm[0]], detected[perm[1]]
        rel = cs.relation_of(d0['row'], d0['col'], d1['row'], d1['col'])
        attrs['relation'] = rel == int(relation)
      score = sum(attrs[a] for a in named) + 0.01 * sum(attrs.values())
      if score > best_score:
        best, best_score = attrs, score
  if best is None:   # too few objects: nothing named can be right
    best = {a: False for a in named}
  for a in named:
    result[a] = bool(best[a])
  result['overall'] = all(result[a] for a in ['count'] + named)
  return result


# How a two-object prompt's image went, first that applies: 'right'; 'missing' (fewer than two
# objects) or 'extra' (more); then with exactly two: 'relation' (both objects right, the
# relation wrong); 'swapped' (every named attribute value present, bound to the wrong
# object: the red circle and blue square drawn as a blue circle and a red square);
# 'duplicated' (the two objects share the shape or colour the prompt gives only one of
# them); 'other' (an attribute value the prompt does not name).
TWO_OBJECT_OUTCOMES = ('right', 'missing', 'extra', 'relation', 'swapped', 'duplicated',
                       'other')


def two_object_outcome(detected: Sequence[Mapping], objects: np.ndarray, relation: int,
                       names: Sequence[bool]) -> str:
  """Which of TWO_OBJECT_OUTCOMES a two-object prompt's detected objects fall in."""
  objects = np.asarray(objects)
  names = [bool(x) for x in names]
  if check(detected, objects, 2, relation, names)['overall']:
    return 'right'
  if len(detected) != 2:
    return 'missing' if len(detected) < 2 else 'extra'
  for perm in ((0, 1), (1, 0)):
    per = [_match(detected[p], objects[i], names) for i, p in enumerate(perm)]
    if all(all(m.values()) for m in per):
      return 'relation'
  fields = [(key, col) for key, col, on in (('shape', cs.SHAPE, True),
                                            ('colour', cs.COLOUR, names[1]),
                                            ('size', cs.SIZE, names[2])) if on]
  wanted = {key: sorted(int(o[col]) for o in objects[:2]) for key, col in fields}
  drawn = {key: sorted(int(d[key]) for d in detected) for key, _ in fields}
  if wanted == drawn:
    return 'swapped'
  for key, _ in fields:
    want, got = wanted[key], drawn[key]
    if want[0] != want[1] and got[0] == got[1] and got[0] in want:
      return 'duplicated'
  return 'other'


def two_object_outcomes(images: np.ndarray, prompts: Mapping) -> dict:
  """Fraction of the two-object prompts among `prompts` (as `score_images`) in each of
  TWO_OBJECT_OUTCOMES, and 'n', how many there were."""
  found = [two_object_outcome(detect(img), prompts['objects'][i], prompts['relation'][i],
                              prompts['names'][i])
           for i, img in enumerate(images) if int(prompts['num_objects'][i]) == 2]
  out = {'n': len(found)}
  for outcome in TWO_OBJECT_OUTCOMES:
    out[outcome] = found.count(outcome) / len(found) if found else 0.0
  return out


def score_images(images: np.ndarray, prompts: Mapping) -> list[dict]:
  """`check` for every image against the prompts of `captioned_shapes.eval_prompts` (or a
  batch of dataset examples): images uint8 [N, H, W, 3]."""
  return [check(detect(img), prompts['objects'][i], prompts['num_objects'][i],
                prompts['relation'][i], prompts['names'][i]) for i, img in enumerate(images)]


def aggregate(results: Iterable[Mapping]) -> dict:
  """Mean accuracy per attribute (over the prompts that name it) and 'overall'; 'n' counts."""
  results = list(results)
  out = {'n': len(results)}
  for a in ATTRIBUTES + ('overall',):
    vals = [r[a] for r in results if a in r]
    if vals:
      out[a] = float(np.mean(vals))
  return out
