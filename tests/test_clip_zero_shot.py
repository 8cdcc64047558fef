"""Zero-shot attribute classification on captioned_shapes (dalle2_jax/evaluation/zero_shot.py)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from configs import tiny
from dalle2_jax.data import captioned_shapes as cs
from dalle2_jax.evaluation import zero_shot
from dalle2_jax.models import clip as clip_lib
from dalle2_jax.tasks import clip as clip_task
from dalle2_jax.training import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_prompts_cover_every_combination():
  captions, attrs = zero_shot.attribute_prompts()
  assert len(attrs) == 3 * 6 * 2 * 9 and len(captions) == 5 * len(attrs)
  assert len(set(map(tuple, attrs))) == len(attrs)
  # Combination c is captions[5c:5c+5], the dataset's own templates.
  c = int(np.flatnonzero((attrs == (2, 1, 1, 4)).all(1))[0])   # blue square, large, center
  assert captions[5 * c] == 'a large blue square in the center'
  assert all('large blue square' in s and 'center' in s for s in captions[5 * c:5 * c + 5])


def test_classify_with_oracle_and_confused_embeddings():
  rng = np.random.default_rng(0)
  _, attrs = zero_shot.attribute_prompts()
  classes = rng.normal(size=(len(attrs), 64))
  classes /= np.linalg.norm(classes, axis=1, keepdims=True)
  truth_idx = rng.integers(len(attrs), size=50)
  preds = zero_shot.classify(classes[truth_idx], classes, attrs, scale=100.0)
  acc = zero_shot.accuracy(preds, attrs[truth_idx])
  assert all(v == 1.0 for v in acc.values()), acc
  # An image embedding halfway between two combinations differing only in colour: the
  # marginal still gets shape, size and position right.
  a = int(np.flatnonzero((attrs == (0, 0, 0, 0)).all(1))[0])
  b = int(np.flatnonzero((attrs == (1, 0, 0, 0)).all(1))[0])
  p = zero_shot.classify(((classes[a] + classes[b]) / 2)[None], classes, attrs, 100.0)[0]
  assert tuple(p[1:]) == (0, 0, 0) and p[0] in (0, 1)


def test_partial_prompts():
  for name in zero_shot.ATTRIBUTES:
    captions, values, shapes, t = zero_shot.partial_prompts(name)
    n = zero_shot.NUM_VALUES[name]
    assert len(captions) == t * len(values) == t * (3 if name == 'shape' else 3 * n)
    assert set(values) == set(range(n)) and set(shapes) == {0, 1, 2}
  captions, _, _, _ = zero_shot.partial_prompts('position')
  assert captions[0] == 'a circle in the top left'


def test_command_line_on_an_untrained_clip(tmp_path):
  c = tiny.get_config()
  task = clip_task.ClipTask(c, 'clip', str(tmp_path))
  batch = dict(image=np.zeros((2, 32, 32, 3), np.float32),
               tokens=np.zeros((2, c.tokenizer.context_length), np.int32))
  params = task.init(jax.random.PRNGKey(0), batch)
  export.save_export(tmp_path / 'clip' / 'export', c, 'clip', params)
  frozen = clip_lib.FrozenClip.load(tmp_path / 'clip' / 'export')
  assert frozen.image_size == 32 and frozen.context_length == c.tokenizer.context_length
  r = subprocess.run([sys.executable, '-m', 'dalle2_jax.evaluation.zero_shot', '--workdir',
                      str(tmp_path), '--num', '12', '--method', 'partial'], cwd=ROOT, capture_output=True, text=True,
                     timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))
  assert r.returncode == 0, r.stderr[-3000:]
  results = json.loads((tmp_path / 'clip' / 'zero_shot.json').read_text())
  assert set(results) == {'test', 'heldout'}
  for split in results.values():
    assert set(split) == set(zero_shot.ATTRIBUTES) | {'all', 'num_images', 'binding'}
    assert 0 < split['num_images'] <= 12
    assert set(split['binding']) == set(zero_shot.BINDING_KINDS) | {'num_images',
                                                                     'text_converse'}
    assert split['num_images'] + split['binding']['num_images'] == 12
  assert 'position' in r.stdout and 'relation_flip' in r.stdout


def test_binding_pairs_differ_only_in_binding():
  """Each binding negative is the true caption (same template) with the two objects'
  colours or shapes swapped, or the relation reversed: the same words in another order."""
  data = zero_shot.binding_pairs('test', 80)
  n = len(data['caption'])
  assert n >= 8 and data['image'].shape == (n, 64, 64, 3)
  for i, true in enumerate(data['caption']):
    for kind in zero_shot.BINDING_KINDS:
      neg = data[kind][i]
      if neg is None:   # relation_flip only when both objects are named alike
        assert kind != 'relation_flip' or (data['colour_swap'][i] is None
                                           and data['shape_swap'][i] is None)
        continue
      assert neg != true
      if kind != 'relation_flip':
        assert sorted(neg.split()) == sorted(true.split()), (true, neg)
  assert sum(c is None for c in data['colour_swap']) < n / 2
  # The converse ("a B to the right of an A") has the words of the relation reversed
  # ("an A to the right of a B"), in another order, and describes the caption's scene.
  for true, conv, flip in zip(data['caption'], data['converse'], data['relation_flip']):
    assert (conv is None) == (flip is None)
    if conv is not None:
      assert conv not in (true, flip) and sorted(conv.split()) == sorted(flip.split())
      def parts(caption):   # the two noun phrases and the relation
        rel = next(r for r in cs.RELATIONS if f' {r} ' in caption)
        a, b = caption.removeprefix('there is ').split(f' {rel} ')
        return a, b, cs.RELATIONS.index(rel)
      a, b, rel = parts(true)
      assert parts(conv) == (b, a, cs.OPPOSITE_RELATION[rel])
