r"""Zero-shot attribute classification on captioned_shapes with a CLIP.

  python -m dalle2_jax.evaluation.zero_shot --workdir runs/shapes   # uses runs/shapes/clip/export
  python -m dalle2_jax.evaluation.zero_shot --clip EXPORT_DIR --splits test,heldout

Every single-object image of the `test` and `heldout` splits is classified by its colour,
shape, size and position using prompts only (no training on labels): each of the
3 x 6 x 2 x 9 = 324 attribute combinations is written with the dataset's own full-caption
templates ("a large red circle in the top left", "there is a small blue square at the
bottom", ...); the text embeddings of a combination's templates are averaged (prompt
ensembling). An attribute's score is the log-sum-exp of the image's CLIP logits over every
combination with that attribute value (its marginal under CLIP's softmax); the prediction is
the best-scoring value. Reports accuracy per attribute and for all four at once.
`--method partial` instead uses the dataset's partial captions naming the shape and the one
attribute ("a red circle", "a large circle", "a circle in the top left", "a circle"),
marginalised over the shape.

Two-object images are skipped (an attribute is ambiguous there); `heldout` images hold a
(colour, shape) pair that never appears in training, so its accuracy measures compositional
generalisation of the text tower.

Attribute binding is measured on the two-object images instead: how often an image's CLIP
logit for its true caption beats the same caption (same template) with the two objects'
colours swapped, their shapes swapped, or the relation reversed
(`data.captioned_shapes.hard_negative`). 50% is chance: a CLIP that embeds a caption as a bag
of words.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax.data import captioned_shapes as cs
from dalle2_jax.models import clip as clip_lib

ATTRIBUTES = ('colour', 'shape', 'size', 'position')
NUM_VALUES = dict(colour=len(cs.COLOUR_NAMES), shape=len(cs.SHAPES), size=len(cs.SIZES),
                  position=9)
NUM_POS_TEMPLATES = 5   # the dataset's templates of a caption naming the position


def attribute_prompts(num_templates: int = NUM_POS_TEMPLATES):
  """All full single-object prompts -> (captions [C*T], attributes [C, 4] in ATTRIBUTES order).

  Caption c * num_templates + t is combination c written with template t.
  """
  captions, attrs = [], []
  for shape in range(len(cs.SHAPES)):
    for colour in range(len(cs.COLOUR_NAMES)):
      for size in range(len(cs.SIZES)):
        for pos in range(9):
          objects = np.full((2, 5), -1, np.int32)
          objects[0] = (shape, colour, size, pos // 3, pos % 3)
          attrs.append((colour, shape, size, pos))
          for t in range(num_templates):
            captions.append(cs.caption_of(dict(
                objects=objects, names=np.ones(4, bool), template=t, num_objects=1,
                relation=-1)))
  return captions, np.asarray(attrs, np.int32)


def partial_prompts(attribute: str):
  """Prompts naming the shape and (unless attribute == 'shape') one other attribute.

  The dataset's partial captions ("a red circle", "a large square", "a triangle in the top
  left", "a circle") leave attributes out, so these prompts name no unseen (colour, shape)
  pair except in the colour prompts. Returns (captions [C*T], values [C], shapes [C], T).
  """
  names = np.zeros(4, bool)
  names[0] = True
  if attribute != 'shape':
    names[cs.NAME_FIELDS.index(attribute)] = True
  num_templates = NUM_POS_TEMPLATES if attribute == 'position' else 4
  captions, values, shapes = [], [], []
  for shape in range(len(cs.SHAPES)):
    for v in range(NUM_VALUES[attribute] if attribute != 'shape' else 1):
      objects = np.zeros((2, 5), np.int32)
      objects[1] = -1
      objects[0, cs.SHAPE] = shape
      if attribute == 'colour':
        objects[0, cs.COLOUR] = v
      elif attribute == 'size':
        objects[0, cs.SIZE] = v
      elif attribute == 'position':
        objects[0, cs.ROW], objects[0, cs.COL] = v // 3, v % 3
      values.append(shape if attribute == 'shape' else v)
      shapes.append(shape)
      for t in range(num_templates):
        captions.append(cs.caption_of(dict(objects=objects, names=names, template=t,
                                           num_objects=1, relation=-1)))
  return captions, np.asarray(values), np.asarray(shapes), num_templates


def image_attributes(objects: np.ndarray) -> np.ndarray:
  """objects [N, 2, 5] (shape, colour, size, row, col) -> [N, 4] in ATTRIBUTES order."""
  o = np.asarray(objects)[:, 0]
  return np.stack([o[:, cs.COLOUR], o[:, cs.SHAPE], o[:, cs.SIZE],
                   o[:, cs.ROW] * 3 + o[:, cs.COL]], axis=1).astype(np.int32)


def _batched(fn, x, batch_size):
  return np.concatenate([np.asarray(fn(x[i:i + batch_size]))
                         for i in range(0, len(x), batch_size)], axis=0)


def _text_embeddings(frozen, tokenizer, captions, num_templates, batch_size=256):
  """Unit-norm template-averaged embeddings [len(captions) // num_templates, D]."""
  tokens = tokenizer(captions)
  fn = jax.jit(lambda p, t: clip_lib.encode_text(frozen.config, p, t)[0])
  emb = _batched(lambda t: fn(frozen.params, t), tokens, batch_size)
  emb = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  emb = emb.reshape(len(captions) // num_templates, num_templates, -1).mean(1)
  return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def prompt_embeddings(frozen: clip_lib.FrozenClip, tokenizer, batch_size: int = 256):
  """-> (class embeddings [324, D] unit norm, attributes [324, 4])."""
  captions, attrs = attribute_prompts()
  return _text_embeddings(frozen, tokenizer, captions, NUM_POS_TEMPLATES, batch_size), attrs


def image_embeddings(frozen: clip_lib.FrozenClip, images_uint8: np.ndarray,
                     batch_size: int = 256) -> np.ndarray:
  """uint8 images [N, H, W, 3] -> unit-norm image embeddings [N, D]."""
  fn = jax.jit(lambda p, x: clip_lib.encode_image(
      frozen.config, p, x.astype(jnp.float32) / 127.5 - 1.0))
  emb = _batched(lambda x: fn(frozen.params, x), np.asarray(images_uint8), batch_size)
  return emb / np.linalg.norm(emb, axis=-1, keepdims=True)


def classify(image_embeds: np.ndarray, class_embeds: np.ndarray, class_attrs: np.ndarray,
             scale: float) -> np.ndarray:
  """Marginal zero-shot prediction per attribute: [N, 4] in ATTRIBUTES order."""
  logits = scale * np.asarray(image_embeds, np.float64) @ np.asarray(class_embeds, np.float64).T
  preds = []
  for a, name in enumerate(ATTRIBUTES):
    scores = np.full((logits.shape[0], NUM_VALUES[name]), -np.inf)
    for v in range(NUM_VALUES[name]):
      sel = logits[:, class_attrs[:, a] == v]
      m = sel.max(1, keepdims=True)
      scores[:, v] = (m + np.log(np.exp(sel - m).sum(1, keepdims=True)))[:, 0]
    preds.append(scores.argmax(1))
  return np.stack(preds, axis=1)


def _logsumexp_by(logits, groups, num):
  out = np.full((logits.shape[0], num), -np.inf)
  for v in range(num):
    sel = logits[:, groups == v]
    m = sel.max(1, keepdims=True)
    out[:, v] = (m + np.log(np.exp(sel - m).sum(1, keepdims=True)))[:, 0]
  return out


def classify_partial(frozen, tokenizer, image_embeds: np.ndarray, scale: float) -> np.ndarray:
  """Per-attribute prediction from partial prompts, marginalised over the shape: [N, 4]."""
  preds = []
  for name in ATTRIBUTES:
    captions, values, _, t = partial_prompts(name)
    emb = _text_embeddings(frozen, tokenizer, captions, t)
    logits = scale * np.asarray(image_embeds, np.float64) @ emb.astype(np.float64).T
    preds.append(_logsumexp_by(logits, values, NUM_VALUES[name]).argmax(1))
  return np.stack(preds, axis=1)


def accuracy(preds: np.ndarray, truth: np.ndarray) -> dict[str, float]:
  out = {name: float(np.mean(preds[:, a] == truth[:, a])) for a, name in enumerate(ATTRIBUTES)}
  out['all'] = float(np.mean(np.all(preds == truth, axis=1)))
  return out


def load_split(split: str, num: int, seed: int = 0) -> dict:
  """Single-object examples among the first `num` of a captioned_shapes split."""
  examples = [cs.make_example(split, i, seed) for i in range(num)]
  examples = [e for e in examples if int(e['num_objects']) == 1]
  return dict(image=np.stack([e['image'] for e in examples]),
              objects=np.stack([e['objects'] for e in examples]))


def evaluate(frozen: clip_lib.FrozenClip, tokenizer, splits: Sequence[str] = ('test', 'heldout'),
             num: int | dict = 256, seed: int = 0, method: str = 'full'
             ) -> dict[str, dict[str, float]]:
  """Per-split, per-attribute zero-shot accuracy (plus 'all' and 'num_images').

  method: 'full' (marginals over all 324 full captions) or 'partial' (prompts naming the
  shape and the one attribute, marginalised over the shape; see `partial_prompts`).
  """
  if method not in ('full', 'partial'):
    raise ValueError(f"Zero-shot method must be 'full' or 'partial', not {method!r}.")
  class_embeds, class_attrs = prompt_embeddings(frozen, tokenizer)
  scale = float(clip_lib.logit_scale(frozen.params))
  results = {}
  for split in splits:
    n = num[split] if isinstance(num, dict) else num
    data = load_split(split, n, seed)
    image_embeds = image_embeddings(frozen, data['image'])
    if method == 'full':
      preds = classify(image_embeds, class_embeds, class_attrs, scale)
    else:
      preds = classify_partial(frozen, tokenizer, image_embeds, scale)
    res = accuracy(preds, image_attributes(data['objects']))
    res['num_images'] = int(len(preds))
    results[split] = res
  return results


BINDING_KINDS = ('colour_swap', 'shape_swap', 'relation_flip')


def binding_pairs(split: str, num: int, seed: int = 0) -> dict:
  """Two-object examples among the first `num` of a split, each with its full caption,
  one negative per kind in BINDING_KINDS (None where it does not apply: equal colours,
  say) and 'converse': the caption's converse ("a B to the right of an A" for "an A to the
  left of a B"), true of the same image, where the relation can be reversed. Captions name
  size and colour, written with template t = index."""
  out = dict(image=[], caption=[], converse=[], **{k: [] for k in BINDING_KINDS})
  rng = np.random.default_rng(seed)
  for i in range(num):
    e = cs.make_example(split, i, seed)
    if int(e['num_objects']) != 2:
      continue
    names = np.array([True, True, True, False])
    out['image'].append(e['image'])
    out['caption'].append(cs.caption_of(dict(objects=e['objects'], names=names, template=i,
                                             num_objects=2, relation=int(e['relation']))))
    for kind in BINDING_KINDS:
      neg = cs.hard_negative(e['objects'], 2, names, e['relation'], rng, kinds=(kind,),
                             template=i)
      out[kind].append(None if neg is None else neg['caption'])
    objects, relation = cs.converse(e['objects'], e['relation'])
    out['converse'].append(None if out['relation_flip'][-1] is None else cs.caption_of(dict(
        objects=objects, names=names, template=i, num_objects=2, relation=relation)))
  out['image'] = (np.stack(out['image']) if out['image'] else
                  np.zeros((0, cs.IMAGE_SIZE, cs.IMAGE_SIZE, 3), np.uint8))
  return out


def evaluate_binding(frozen: clip_lib.FrozenClip, tokenizer, splits: Sequence[str],
                     num: int | dict = 256, seed: int = 0) -> dict[str, dict[str, float]]:
  """Per split and kind, how often the true caption outscores its binding negative; and
  'text_converse': how often the text tower puts a caption closer to its converse (the same
  scene) than to its relation reversed (another scene). Both have the words of the caption,
  in another order or with one word changed, so a text embedding blind to what the relation
  binds scores at most chance here, and one that goes by word order near 0."""
  def embed(captions):   # unit norm, one template each
    return _text_embeddings(frozen, tokenizer, captions, num_templates=1)

  results = {}
  for split in splits:
    n = num[split] if isinstance(num, dict) else num
    data = binding_pairs(split, n, seed)
    if not len(data['image']):
      results[split] = dict({k: float('nan') for k in BINDING_KINDS}, num_images=0)
      continue
    img = image_embeddings(frozen, data['image'])
    true = np.sum(img * embed(data['caption']), -1)
    res = {'num_images': int(len(img))}
    for kind in BINDING_KINDS:
      idx = [i for i, c in enumerate(data[kind]) if c is not None]
      neg = np.sum(img[idx] * embed([data[kind][i] for i in idx]), -1)
      res[kind] = float(np.mean(true[idx] > neg)) if idx else float('nan')
    idx = [i for i, c in enumerate(data['converse']) if c is not None]
    if idx:
      t = embed([data['caption'][i] for i in idx])
      conv = np.sum(t * embed([data['converse'][i] for i in idx]), -1)
      flip = np.sum(t * embed([data['relation_flip'][i] for i in idx]), -1)
      res['text_converse'] = float(np.mean(conv > flip))
    else:
      res['text_converse'] = float('nan')
    results[split] = res
  return results


def format_binding(results: dict) -> str:
  kinds = BINDING_KINDS + ('text_converse',)
  lines = ['binding  ' + ' '.join(f'{k:>14}' for k in kinds) + '   images']
  for split, r in results.items():
    lines.append(f'{split:<8} ' + ' '.join(f'{100 * r.get(k, float("nan")):13.1f}%'
                                             for k in kinds) + f'   {r["num_images"]}')
  return '\n'.join(lines)


def _default_num(config, split: str) -> int:
  shapes = config.get('data', {}).get('shapes', {}) if config is not None else {}
  return int(shapes.get(f'num_{split}', 256) or 256)


def format_results(results: dict) -> str:
  lines = [f'{"split":<8} ' + ' '.join(f'{a:>9}' for a in ATTRIBUTES + ('all',)) + '   images']
  for split, r in results.items():
    lines.append(f'{split:<8} ' + ' '.join(f'{100 * r[a]:8.1f}%' for a in ATTRIBUTES + ('all',))
                 + f'   {r["num_images"]}')
  return '\n'.join(lines)


_WORKDIR = None
_CLIP = None
_SPLITS = None
_NUM = None
_OUT = None
_METHOD = None


def _define_flags():
  """Command-line flags (defined only when run as a program, so that importing
  several modules with flags never clashes)."""
  global _WORKDIR, _CLIP, _SPLITS, _NUM, _OUT, _METHOD
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Experiment workdir: its clip/export is used.')
  _CLIP = flags.DEFINE_string('clip', None, 'A CLIP export dir (overrides --workdir).')
  _SPLITS = flags.DEFINE_list('splits', ['test', 'heldout'], 'captioned_shapes splits.')
  _NUM = flags.DEFINE_integer('num', 0, 'Examples per split (two-object ones are skipped); '
                              '0 = the config data.shapes.num_<split>.')
  _OUT = flags.DEFINE_string('out', None, 'JSON results file; default <clip export>/../'
                             'zero_shot.json.')
  _METHOD = flags.DEFINE_enum('method', 'full', ['full', 'partial'],
                              "Prompts: 'full' (all 324 full captions, marginals) or "
                              "'partial' (shape + one attribute, marginalised over shape).")


def main(argv):
  del argv
  if not (_CLIP.value or _WORKDIR.value):
    raise app.UsageError('Pass --workdir DIR (uses DIR/clip/export) or --clip EXPORT_DIR.')
  path = _CLIP.value or os.path.join(_WORKDIR.value, 'clip', 'export')
  frozen = clip_lib.FrozenClip.load(path)
  from dalle2_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  config = frozen.experiment_config
  tok = tokenizer_lib.Tokenizer(path=frozen.tokenizer_path,
                                context_length=frozen.context_length)
  num = {s: _NUM.value or _default_num(config, s) for s in _SPLITS.value}
  seed = int(config.get('data', {}).get('shapes', {}).get('seed', 0)) if config else 0
  results = evaluate(frozen, tok, _SPLITS.value, num, seed, _METHOD.value)
  print(format_results(results))
  binding = evaluate_binding(frozen, tok, _SPLITS.value, num, seed)
  print(format_binding(binding))
  for split in binding:
    results[split]['binding'] = binding[split]
  out = _OUT.value or os.path.join(os.path.dirname(os.path.abspath(path)), 'zero_shot.json')
  with open(out, 'w') as f:
    json.dump(results, f, indent=2)
  logging.info('Wrote %s', out)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
