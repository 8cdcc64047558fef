"""captioned_shapes: spec conformance, determinism, split hygiene, the scoring rule."""

import numpy as np
import pytest

from dalle2_jax.data import builders
from dalle2_jax.data import captioned_shapes as cs
from dalle2_jax.data import scoring

SPEC_PALETTE = {'red': (220, 40, 40), 'green': (40, 190, 60), 'blue': (50, 90, 235),
                'yellow': (235, 215, 40), 'magenta': (215, 60, 205), 'cyan': (40, 205, 215)}
HELD_OUT = {('red', 'triangle'), ('green', 'square'), ('blue', 'circle')}


def _pairs(ex):
  return {(cs.COLOUR_NAMES[o[cs.COLOUR]], cs.SHAPES[o[cs.SHAPE]])
          for o in ex['objects'][:int(ex['num_objects'])]}


@pytest.fixture(scope='module')
def shapes_source(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  b = builders.shapes_builder(seed=3, num_train=96, num_test=32, num_heldout=64,
                              data_dir=data_dir)
  b.download_and_prepare(file_format=builders.ARRAY_RECORD)
  return b


def test_constants_follow_spec():
  assert dict(zip(cs.COLOUR_NAMES, map(tuple, cs.PALETTE.tolist()))) == SPEC_PALETTE
  assert cs.SHAPES == ('circle', 'square', 'triangle')
  assert cs.SIZE_PX == (12, 24)
  assert {(cs.COLOUR_NAMES[c], cs.SHAPES[s]) for c, s in cs._HELD_OUT_IDX} == HELD_OUT  # pylint: disable=protected-access
  assert len(cs.TRAIN_PAIRS) == 15


def test_render_and_score_ground_truth_is_perfect():
  """The spec's scoring rule gives 100% on rendered ground truth, every split and style."""
  results = []
  for split in cs.SPLITS:
    for i in range(150):
      ex = cs.make_example(split, i, seed=11)
      img = ex['image']
      assert img.shape == (64, 64, 3) and img.dtype == np.uint8
      colours = {tuple(c) for c in img.reshape(-1, 3).tolist()}
      # Black background, flat objects in exact palette colours.
      assert colours <= {(0, 0, 0)} | set(SPEC_PALETTE.values())
      assert (img == 0).all(-1).mean() > 0.5
      det = scoring.detect(img)
      assert len(det) == ex['num_objects']
      r = scoring.check(det, ex['objects'], ex['num_objects'], ex['relation'], ex['names'])
      assert r['overall'], (split, i, ex['caption'], r, det)
      results.append(r)
  summary = scoring.aggregate(results)
  assert summary['overall'] == 1.0 and summary['n'] == 450
  for a in scoring.ATTRIBUTES:
    assert summary[a] == 1.0, a


def test_caption_names_what_attributes_say():
  for i in range(200):
    ex = cs.make_example('train', i, seed=0)
    cap, names, o = ex['caption'], ex['names'], ex['objects']
    words = cap.replace(',', '').split()
    assert cs.SHAPES[o[0, cs.SHAPE]] in words
    assert (cs.COLOUR_NAMES[o[0, cs.COLOUR]] in words) == bool(names[1])
    assert (cs.SIZES[o[0, cs.SIZE]] in words) == bool(names[2])
    if ex['num_objects'] == 2:
      assert cs.RELATIONS[ex['relation']] in cap and not names[3]
      assert o[0, cs.SIZE] == 0 and o[1, cs.SIZE] == 0   # both small
      assert (o[0, cs.ROW], o[0, cs.COL]) != (o[1, cs.ROW], o[1, cs.COL])
    else:
      pos = cs.POSITIONS[o[0, cs.ROW]][o[0, cs.COL]]
      assert (pos in cap) == bool(names[3])
  styles = [cs.make_example('train', i)['names'] for i in range(300)]
  assert any(n.all() for n in styles) and any(not n.all() for n in styles)


def test_relation_rule():
  assert cs.RELATIONS[cs.relation_of(0, 0, 2, 1)] == 'to the left of'   # columns first
  assert cs.RELATIONS[cs.relation_of(2, 2, 0, 1)] == 'to the right of'
  assert cs.RELATIONS[cs.relation_of(0, 1, 2, 1)] == 'above'
  assert cs.RELATIONS[cs.relation_of(2, 1, 1, 1)] == 'below'


def test_deterministic_given_split_index_seed():
  a = cs.make_example('train', 5, seed=1)
  b = cs.make_example('train', 5, seed=1)
  for k in ('image', 'objects', 'names'):
    np.testing.assert_array_equal(a[k], b[k])
  assert a['caption'] == b['caption']
  diff = [cs.make_example('train', 5, seed=2), cs.make_example('test', 5, seed=1),
          cs.make_example('train', 6, seed=1)]
  assert all(not np.array_equal(a['image'], d['image']) or a['caption'] != d['caption']
             for d in diff)


def test_split_hygiene_many_examples():
  for i in range(1500):
    for split in ('train', 'test'):
      assert not _pairs(cs.make_example(split, i, seed=0)) & HELD_OUT, (split, i)
    assert _pairs(cs.make_example('heldout', i, seed=0)) & HELD_OUT, i


def test_tfds_builder_round_trip_and_hygiene(shapes_source):
  b = shapes_source
  assert b.builder_config.name == 'seed3_train96_test32_heldout64'
  assert {s: b.info.splits[s].num_examples for s in cs.SPLITS} == {
      'train': 96, 'test': 32, 'heldout': 64}
  for split in cs.SPLITS:
    src = b.as_data_source(split)
    for i in range(len(src)):
      rec = src[i]
      assert rec['index'] == i   # stored in index order
      if i < 12:
        ref = cs.make_example(split, i, seed=3)
        np.testing.assert_array_equal(rec['image'], ref['image'])
        np.testing.assert_array_equal(rec['objects'], ref['objects'])
        np.testing.assert_array_equal(rec['names'], ref['names'])
        assert rec['caption'].decode() == ref['caption']
        assert (rec['num_objects'], rec['relation']) == (ref['num_objects'], ref['relation'])
      ex = {'objects': rec['objects'], 'num_objects': rec['num_objects']}
      if split == 'heldout':
        assert _pairs(ex) & HELD_OUT
      else:
        assert not _pairs(ex) & HELD_OUT


def test_eval_prompts():
  for kind in ('test', 'heldout'):
    p = scoring_prompts = cs.eval_prompts(kind, num=20, seed=5)
    assert len(p['caption']) == 60 and p['objects'].shape == (60, 2, 5)
    assert p['style'][:20] == ['full'] * 20 and p['style'][-20:] == ['two'] * 20
    assert p['names'][:20].all()
    assert not p['names'][20:40].all(axis=1).any()   # partial prompts leave something out
    assert (p['num_objects'][40:] == 2).all()
    for i in range(60):
      ex = {'objects': p['objects'][i], 'num_objects': p['num_objects'][i]}
      assert bool(_pairs(ex) & HELD_OUT) == (kind == 'heldout')
    # Their ground-truth renderings score 100%.
    summary = scoring.aggregate(scoring.score_images(p['image'], scoring_prompts))
    assert summary['overall'] == 1.0


def test_scoring_catches_errors():
  ex = cs.make_example('test', 0, seed=0, style='full')
  o, args = ex['objects'], (ex['num_objects'], ex['relation'], ex['names'])
  det = scoring.detect(ex['image'])
  assert scoring.check(det, o, *args)['overall']
  wrong_colour = o.copy()
  wrong_colour[0, cs.COLOUR] = (o[0, cs.COLOUR] + 1) % 6
  r = scoring.check(det, wrong_colour, *args)
  assert not r['overall'] and not r['colour'] and r['shape'] and r['position']
  # An extra object breaks 'count' (and overall) even when the named one is right.
  extra = np.array(ex['image'])
  spot = (slice(0, 6), slice(58, 64)) if o[0, cs.COL] != 2 or o[0, cs.ROW] != 0 else (
      slice(58, 64), slice(0, 6))
  extra[spot] = cs.PALETTE[0]
  r = scoring.check(scoring.detect(extra), o, *args)
  assert not r['count'] and not r['overall']
  # Blank image: nothing named is right.
  r = scoring.check(scoring.detect(np.zeros((64, 64, 3), np.uint8)), o, *args)
  assert not r['overall'] and not r['shape']
  # A bright speck below the area threshold is ignored; dim pixels are background.
  noisy = np.array(ex['image'])
  dark = noisy.max(-1) == 0
  y, x = next((y, x) for y in range(0, 60, 4) for x in range(0, 60, 4)
              if dark[max(y - 1, 0):y + 5, max(x - 1, 0):x + 5].all())
  noisy[y:y + 4, x:x + 4] = 255   # 16 px < 20
  noisy[dark] = 60
  assert scoring.check(scoring.detect(noisy), o, *args)['overall']


def test_scoring_two_objects_relation():
  for i in range(40):
    ex = cs.make_example('test', i, seed=1, style='two')
    det = scoring.detect(ex['image'])
    swapped = ex['objects'][::-1].copy()
    r_ok = scoring.check(det, ex['objects'], 2, ex['relation'], ex['names'])
    assert r_ok['overall']
    # The objects swapped around the same relation is wrong unless both objects look alike.
    r = scoring.check(det, swapped, 2, ex['relation'], ex['names'])
    alike = (ex['objects'][0, :2] == ex['objects'][1, :2]).all() or (
        not ex['names'][1] and ex['objects'][0, 0] == ex['objects'][1, 0])
    assert r['overall'] == bool(alike), (ex['caption'], r)


def test_two_object_outcomes_name_the_failure():
  """Each failure of a two-object image is put in the outcome that describes it."""
  ex = next(e for e in (cs.make_example('test', i, seed=2, style='two') for i in range(200))
            if e['names'][1] and e['objects'][0, cs.SHAPE] != e['objects'][1, cs.SHAPE]
            and e['objects'][0, cs.COLOUR] != e['objects'][1, cs.COLOUR])
  o, rel, names = ex['objects'], ex['relation'], ex['names']
  det = scoring.detect(ex['image'])
  assert len(det) == 2

  def outcome(objs):
    return scoring.two_object_outcome(objs, o, rel, names)

  def moved(d, **kw):
    return {**d, **kw}

  assert outcome(det) == 'right'
  assert outcome(det[:1]) == 'missing'
  assert outcome(det + [moved(det[0], row=(det[0]['row'] + 1) % 3)]) == 'extra'
  # The two objects trade places: both right, the relation reversed.
  a, b = det
  swapped_places = [moved(a, row=b['row'], col=b['col']), moved(b, row=a['row'], col=a['col'])]
  assert outcome(swapped_places) == 'relation'
  # Colours traded between the objects: every value present, bound wrongly.
  assert outcome([moved(a, colour=b['colour']), moved(b, colour=a['colour'])]) == 'swapped'
  assert outcome([a, moved(b, shape=a['shape'])]) == 'duplicated'
  assert outcome([a, moved(b, colour=a['colour'])]) == 'duplicated'
  other = next(c for c in range(len(cs.PALETTE)) if c not in (a['colour'], b['colour']))
  assert outcome([a, moved(b, colour=other)]) == 'other'

  images = np.stack([ex['image'], np.zeros_like(ex['image'])])
  prompts = {k: np.stack([ex[k], ex[k]]) for k in ('objects', 'num_objects', 'relation',
                                                  'names')}
  frac = scoring.two_object_outcomes(images, prompts)
  assert frac['n'] == 2 and frac['right'] == frac['missing'] == 0.5
  assert sum(frac[k] for k in scoring.TWO_OBJECT_OUTCOMES) == 1.0


def test_detect_scales_to_other_sizes():
  ex = cs.make_example('train', 3, seed=0, style='full')
  big = np.repeat(np.repeat(ex['image'], 4, 0), 4, 1)   # 256 px
  r = scoring.check(scoring.detect(big), ex['objects'], ex['num_objects'], ex['relation'],
                    ex['names'])
  assert r['overall']


def test_png_bytes_are_standard_png_with_a_fast_decode_path():
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  for i in range(20):
    img = cs.make_example('heldout', i)['image']
    data = cs.png_bytes(img)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data)).convert('RGB')), img)
    np.testing.assert_array_equal(pipeline._decode_unfiltered_png(data), img)  # pylint: disable=protected-access
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format='PNG')   # PIL's filtered rows: PIL path, same pixels
  np.testing.assert_array_equal(pipeline.decode_image(buf.getvalue(), 64), img)


def test_recolour_keeps_layout_and_never_shows_a_held_out_pair():
  """The CLIP colour augmentation: every object is found again by the scoring rule with its
  shape, size and cell, in a colour that never makes a held-out pair; the caption is the
  layout's caption without colour words."""
  rng = np.random.default_rng(0)
  seen_colours = set()
  for i in range(200):
    ex = cs.make_example('train', i)
    img = ex['image'].astype(np.float32) / 127.5 - 1.0
    out, caption = cs.recolour(img, ex['objects'], ex['num_objects'], ex['names'],
                               ex['relation'], rng)
    assert out.shape == img.shape and out.dtype == img.dtype
    assert not set(caption.replace(',', ' ').split()) & set(cs.COLOUR_NAMES), caption
    u8 = np.clip(np.round((out + 1) * 127.5), 0, 255).astype(np.uint8)
    # the foreground (any channel bright) is where it was
    np.testing.assert_array_equal(u8.max(-1) > 8, ex['image'].max(-1) > 8)
    found = scoring.detect(u8)
    assert len(found) == int(ex['num_objects'])
    everything_but_colour = [True, False, True, True]
    assert scoring.check(found, ex['objects'], ex['num_objects'], ex['relation'],
                         everything_but_colour)['overall']
    for d in found:
      assert not cs.is_held_out(d['colour'], d['shape'])
      seen_colours.add(tuple(u8[d['box'][0]:d['box'][2] + 1,
                                d['box'][1]:d['box'][3] + 1].reshape(-1, 3).max(0)))
  assert len(seen_colours) > 150   # off-palette, not six colours


def test_hard_negatives_are_false_of_the_image_and_name_no_held_out_pair():
  """NegCLIP negatives: the scoring rule finds the true caption right and the negative wrong
  on the image; two-object negatives keep the caption's words (only the binding changes)."""
  rng = np.random.default_rng(0)
  kinds = {}
  for i in range(400):
    ex = cs.make_example('train', i)
    neg = cs.hard_negative(ex['objects'], ex['num_objects'], ex['names'], ex['relation'], rng)
    if neg is None:   # a bare shape whose other shapes would all be held-out pairs
      continue
    kinds[neg['kind']] = kinds.get(neg['kind'], 0) + 1
    found = scoring.detect(ex['image'])
    assert scoring.check(found, ex['objects'], ex['num_objects'], ex['relation'],
                         ex['names'])['overall']
    assert not scoring.check(found, neg['objects'], neg['num_objects'], neg['relation'],
                             neg['names'])['overall'], (ex['caption'], neg['caption'])
    assert cs.caption_of(neg) == neg['caption'] != ex['caption']
    n = int(ex['num_objects'])
    for o in neg['objects'][:n]:
      assert not cs.is_held_out(o[cs.COLOUR], o[cs.SHAPE]) or not ex['names'][1]
    if neg['kind'] in ('colour_swap', 'shape_swap'):
      same_template = cs.caption_of(dict(ex, template=neg['template']))
      assert sorted(neg['caption'].split()) == sorted(same_template.split())
  assert set(kinds) == set(cs.NEGATIVE_KINDS), kinds
  assert sum(kinds.values()) >= 390
  # A kind that does not apply gives None: one object has no relation to flip.
  ex = cs.make_example('train', 0, style='full')
  assert cs.hard_negative(ex['objects'], 1, ex['names'], -1, rng,
                          kinds=('relation_flip',)) is None
