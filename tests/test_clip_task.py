"""Stage `clip`: global-batch contrastive loss (1 vs 8 devices), hard negatives, learning,
FLOPs."""

import time

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import tiny
from dalle2_jax.models import clip as clip_lib
from dalle2_jax.tasks import clip as clip_task


def tiny_config(**model):
  c = tiny.get_config()
  c.unlock()
  c.tokenizer.context_length = 8
  c.clip.model.text.vocab_size = 64
  c.clip.model.update(model)
  return c


def random_batch(n, config, seed=0):
  rng = np.random.default_rng(seed)
  s, length = config.clip.image_size, config.tokenizer.context_length
  tokens = rng.integers(1, 63, (n, length)).astype(np.int32)
  ends = rng.integers(2, length, n)
  for i, e in enumerate(ends):   # end-of-text = the top id, zero padding after it
    tokens[i, e] = 63
    tokens[i, e + 1:] = 0
  image = rng.uniform(-1, 1, (n, s, s, 3)).astype(np.float32)
  return dict(image=image, tokens=tokens)


def reference_loss(img, txt, scale):
  img = img / np.linalg.norm(img, axis=-1, keepdims=True)
  txt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
  logits = scale * img.astype(np.float64) @ txt.T

  def ce(lg):
    lg = lg - lg.max(1, keepdims=True)
    return -np.mean(np.diag(lg) - np.log(np.exp(lg).sum(1)))
  return 0.5 * (ce(logits) + ce(logits.T))


def test_contrastive_loss_matches_numpy():
  rng = np.random.default_rng(0)
  img, txt = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
  loss, m = clip_task.contrastive_loss(jnp.asarray(img, jnp.float32),
                                       jnp.asarray(txt, jnp.float32), jnp.float32(10.0))
  np.testing.assert_allclose(loss, reference_loss(img, txt, 10.0), rtol=1e-5)
  assert 0 <= m['i2t_top1'] <= 1 and 0 <= m['t2i_top1'] <= 1
  # Perfectly aligned pairs: both retrieval directions are right.
  _, m = clip_task.contrastive_loss(jnp.eye(4), jnp.eye(4), jnp.float32(1.0))
  assert m['i2t_top1'] == 1 and m['t2i_top1'] == 1


def test_hard_negatives_in_the_loss_match_numpy():
  """NegCLIP: each image's row gets the B hard negatives as extra columns (image -> text
  only); negatives an example lacks are left out; hard_negative_top1 compares each image's
  caption with its own negative."""
  rng = np.random.default_rng(1)
  img, txt, neg = (rng.normal(size=(6, 4)) for _ in range(3))
  has = np.array([True, True, False, True, True, False])
  loss, m = clip_task.contrastive_loss(*(jnp.asarray(x, jnp.float32) for x in (img, txt)),
                                       jnp.float32(10.0), jnp.asarray(neg, jnp.float32),
                                       jnp.asarray(has))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  logits = 10.0 * unit(img) @ unit(txt).T
  neg_logits = 10.0 * unit(img) @ unit(neg).T

  def ce(lg):
    m_ = lg.max(1, keepdims=True)
    return -np.mean(np.diag(lg) - (m_[:, 0] + np.log(np.exp(lg - m_).sum(1))))
  i2t = np.concatenate([logits, neg_logits[:, has]], axis=1)
  np.testing.assert_allclose(loss, 0.5 * (ce(i2t) + ce(logits.T)), rtol=1e-5)
  wins = np.diag(logits) > np.diag(neg_logits)
  np.testing.assert_allclose(m['hard_negative_top1'], wins[has].mean(), rtol=1e-6)
  # No negative at all: the plain CLIP loss.
  plain, _ = clip_task.contrastive_loss(jnp.asarray(img, jnp.float32),
                                        jnp.asarray(txt, jnp.float32), jnp.float32(10.0),
                                        jnp.asarray(neg, jnp.float32), jnp.zeros(6, bool))
  np.testing.assert_allclose(plain, reference_loss(img, txt, 10.0), rtol=1e-5)
  # K negatives an example ([B, K, D], config.clip.num_hard_negatives): all B x K as columns.
  neg2 = rng.normal(size=(6, 2, 4))
  has2 = np.array([[1, 1], [1, 0], [0, 0], [1, 1], [0, 1], [1, 0]], bool)
  loss2, m2 = clip_task.contrastive_loss(*(jnp.asarray(x, jnp.float32) for x in (img, txt)),
                                         jnp.float32(10.0), jnp.asarray(neg2, jnp.float32),
                                         jnp.asarray(has2))
  neg2_logits = 10.0 * unit(img) @ unit(neg2.reshape(12, 4)).T
  i2t2 = np.concatenate([logits, neg2_logits[:, has2.reshape(-1)]], axis=1)
  np.testing.assert_allclose(loss2, 0.5 * (ce(i2t2) + ce(logits.T)), rtol=1e-5)
  own2 = neg2_logits.reshape(6, 6, 2)[np.arange(6), np.arange(6)]   # [B, K]
  wins2 = np.diag(logits)[:, None] > own2
  np.testing.assert_allclose(m2['hard_negative_top1'], wins2[has2].mean(), rtol=1e-6)


def test_same_loss_on_1_and_8_devices():
  config = tiny_config()
  task = clip_task.ClipTask(config, 'clip', '/tmp/unused')
  batch = random_batch(16, config)
  params = task.init(jax.random.PRNGKey(0), batch)
  params = jax.tree.map(jnp.asarray, nn.unbox(params))
  # logit_scale is clamped at 100.
  assert 1.0 < float(clip_lib.logit_scale(params)) <= 100.0

  boxed = task.init(jax.random.PRNGKey(0), batch)
  rules = (('embed', 'fsdp'), ('batch', ('data', 'fsdp')))

  def run(devices, fsdp=1):
    mesh = Mesh(np.array(devices).reshape(-1, fsdp), ('data', 'fsdp'))
    bs = NamedSharding(mesh, P(('data', 'fsdp')))
    sharded = {k: jax.device_put(v, bs) for k, v in batch.items()}
    # Params sharded by their logical names ('embed' over 'fsdp': FSDP when fsdp > 1).
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, rules)
    p = jax.device_put(params, shardings)

    def f(p, b):
      (loss, metrics), grads = jax.value_and_grad(
          lambda p: task.loss(p, b, jax.random.PRNGKey(0)), has_aux=True)(p)
      return loss, metrics, grads
    if fsdp > 1:   # forward only (one compilation less)
      loss, metrics = jax.jit(lambda p, b: task.loss(p, b, jax.random.PRNGKey(0)))(p, sharded)
      return jax.device_get((loss, metrics, None))
    return jax.device_get(jax.jit(f)(p, sharded))

  loss1, m1, g1 = run(jax.devices()[:1])
  for fsdp in (1, 2):   # 8 devices data parallel (+ gradients); 4 x 2 with FSDP params
    loss8, m8, g8 = run(jax.devices()[:8], fsdp)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    for k in m1:
      np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5)
    # Some gradients are zero up to rounding (the key bias: softmax ignores it), so the
    # absolute tolerance is relative to the largest gradient.
    scale = max(np.abs(b).max() for b in jax.tree.leaves(g1))
    for a, b in zip(jax.tree.leaves(g8) if g8 is not None else [], jax.tree.leaves(g1)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
  # The loss contrasts against the global batch: a per-device (2-pair) loss differs, and the
  # global loss equals the numpy reference on the gathered embeddings.
  img, txt, scale = jax.device_get(task.embed(params, batch))
  np.testing.assert_allclose(loss1, reference_loss(img, txt, scale), rtol=1e-5)
  local = np.mean([reference_loss(img[i:i + 2], txt[i:i + 2], scale) for i in range(0, 16, 2)])
  assert abs(local - loss1) > 0.1


def test_tiny_clip_learns_in_batch_retrieval():
  config = tiny_config(embed_dim=32)
  task = clip_task.ClipTask(config, 'clip', '/tmp/unused')
  batch = {k: jnp.asarray(v) for k, v in random_batch(24, config, seed=1).items()}
  params = nn.unbox(task.init(jax.random.PRNGKey(0), batch))
  tx = optax.adam(3e-3)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt):
    (loss, m), g = jax.value_and_grad(lambda p: task.loss(p, batch, None), has_aux=True)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt, m

  t0 = time.time()
  _, _, first = step(params, opt)
  for _ in range(60):
    params, opt, m = step(params, opt)
  print('loss', float(first['loss']), '->', float(m['loss']), 'in', time.time() - t0, 's')
  assert float(m['loss']) < 0.2 * float(first['loss'])
  assert float(m['i2t_top1']) == 1.0 and float(m['t2i_top1']) == 1.0
  assert float(m['logit_scale']) <= 100.0


def test_flops_per_example_matches_xla_count():
  config = tiny_config()
  task = clip_task.ClipTask(config, 'clip', '/tmp/unused')
  batch = random_batch(1, config)
  params = nn.unbox(task.init(jax.random.PRNGKey(0), batch))
  pixels = clip_lib.preprocess_images(task.model_config, batch['image'])
  fwd = jax.jit(lambda p, t, x: task.model().apply({'params': p}, t, x))
  cost = fwd.lower(params, batch['tokens'], pixels).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  ours = clip_lib.flops_per_example(task.model_config, batch_size=1,
                                    text_length=config.tokenizer.context_length)
  # XLA also counts elementwise ops (LayerNorm, softmax, GELU); matmuls dominate.
  assert 0.7 * cost['flops'] <= ours <= 1.1 * cost['flops'], (ours, cost['flops'])
  assert task.flops_per_example() > 0


def test_recolour_augmentation_in_prepare_batch():
  """config.clip.recolour_prob of the batch gets recoloured images and colour-free captions,
  re-tokenised; the draw depends only on the batch (a resumed run repeats it)."""
  from configs import shapes  # pylint: disable=g-import-not-at-top
  from dalle2_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import captioned_shapes as cs  # pylint: disable=g-import-not-at-top
  config = shapes.get_config()
  assert config.clip.recolour_prob == 0.5
  task = clip_task.ClipTask(config, 'clip', '/tmp/unused')
  tok = tokenizer_lib.Tokenizer.from_config(config)
  examples = [cs.make_example('train', i) for i in range(64)]
  batch = {k: np.stack([e[k] for e in examples]) for k in
           ('objects', 'num_objects', 'relation', 'names')}
  batch['image'] = np.stack([e['image'] for e in examples]).astype(np.float32) / 127.5 - 1
  batch['caption'] = [e['caption'] for e in examples]
  batch['tokens'] = tok(batch['caption'])
  out = task.prepare_batch(dict(batch))
  again = task.prepare_batch(dict(batch))
  np.testing.assert_array_equal(out['image'], again['image'])
  changed = np.any(out['image'] != batch['image'], axis=(1, 2, 3))
  assert 16 <= changed.sum() <= 48
  np.testing.assert_array_equal(out['tokens'], tok(out['caption']))
  for i in np.flatnonzero(changed):
    assert not set(out['caption'][i].replace(',', ' ').split()) & set(cs.COLOUR_NAMES)
  assert [out['caption'][i] for i in np.flatnonzero(~changed)] == [
      batch['caption'][i] for i in np.flatnonzero(~changed)]
  # the input batch is not modified in place
  assert batch['caption'] == [e['caption'] for e in examples]
  # Recoloured captions name no colour, and their `names` say so.
  assert not out['names'][changed, 1].any()
  np.testing.assert_array_equal(out['names'][~changed], batch['names'][~changed])
  # Hard negatives (config.clip.hard_negatives): a caption per example, tokenised, false of
  # the (recoloured) image's attributes, never naming a colour the caption does not.
  assert config.clip.hard_negatives
  has = out['has_negative']
  assert out['negative_tokens'].shape == out['tokens'].shape and has.sum() >= 56
  for i in range(len(examples)):   # no negative applies: e.g. "a circle above a circle"
    assert np.array_equal(out['negative_tokens'][i], out['tokens'][i]) == (not has[i])
  for i in np.flatnonzero(changed):
    assert not np.isin(out['negative_tokens'][i], tok(list(cs.COLOUR_NAMES))[:, 1]).any()
  np.testing.assert_array_equal(out['negative_tokens'], again['negative_tokens'])
  config.unlock()
  config.data.name = 'image_folder'
  with pytest.raises(ValueError, match='recolour_prob'):
    clip_task.ClipTask(config, 'clip', '/tmp/unused')
  config.clip.recolour_prob = 0.0
  with pytest.raises(ValueError, match='hard_negatives'):
    clip_task.ClipTask(config, 'clip', '/tmp/unused')


def test_several_hard_negatives_per_example_are_of_different_kinds():
  """config.clip.num_hard_negatives = 3: [B, 3, L] negatives; a two-object caption gets its
  colours swapped, its shapes swapped and its relation reversed where each applies, each
  once; a negative is never the true caption."""
  from configs import shapes  # pylint: disable=g-import-not-at-top
  from dalle2_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import captioned_shapes as cs  # pylint: disable=g-import-not-at-top
  from dalle2_jax.tasks import hard_negatives  # pylint: disable=g-import-not-at-top
  config = shapes.get_config()
  config.unlock()
  config.clip.num_hard_negatives = 3
  examples = [cs.make_example('train', i) for i in range(64)]
  batch = {k: np.stack([e[k] for e in examples]) for k in
           ('objects', 'num_objects', 'relation', 'names')}
  tok = tokenizer_lib.Tokenizer.from_config(config)
  batch['tokens'] = tok([e['caption'] for e in examples])
  out = hard_negatives.HardNegatives(config, 'clip')(batch)
  neg, has = out['negative_tokens'], out['has_negative']
  assert neg.shape == (64, 3, batch['tokens'].shape[1]) and has.shape == (64, 3)
  two = np.flatnonzero(batch['num_objects'] == 2)
  assert len(two) >= 8 and has[two].sum(1).mean() > 1.5   # one each would be <= 1
  for i in range(64):
    rows = [tuple(r) for r, h in zip(neg[i], has[i]) if h]
    assert len(set(rows)) == len(rows)                  # distinct negatives
    assert tuple(batch['tokens'][i]) not in rows
    for r, h in zip(neg[i], has[i]):
      assert np.array_equal(r, batch['tokens'][i]) == (not h)
  # The loss takes them: one text-tower pass over B + B x K captions.
  task = clip_task.ClipTask(config, 'clip', '/tmp/unused')
  small = {k: v[:8] for k, v in out.items()}
  small['image'] = np.stack([e['image'] for e in examples[:8]]).astype(np.float32) / 127.5 - 1
  params = task.init(jax.random.PRNGKey(0), small)
  loss, m = task.loss(params, small, None)
  assert np.isfinite(loss) and 0 <= m['hard_negative_top1'] <= 1
  config.clip.num_hard_negatives = 0
  with pytest.raises(ValueError, match='num_hard_negatives'):
    hard_negatives.HardNegatives(config, 'clip')


def test_converse_captions_and_order_swap_negatives():
  """config.clip.converse_prob rewrites two-object captions as their converse, with the
  objects and relation to match (the scorer's reading of the image agrees); with
  clip.order_swap_negatives a two-object example also gets the objects named the other way
  round with the same relation, which is false of the image."""
  from configs import shapes  # pylint: disable=g-import-not-at-top
  from dalle2_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import captioned_shapes as cs  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import scoring  # pylint: disable=g-import-not-at-top
  from dalle2_jax.tasks import hard_negatives  # pylint: disable=g-import-not-at-top
  config = shapes.get_config()
  config.unlock()
  config.clip.converse_prob = 1.0
  config.clip.order_swap_negatives = True
  config.clip.num_hard_negatives = 4
  examples = [cs.make_example('train', i) for i in range(48)]
  batch = {k: np.stack([e[k] for e in examples]) for k in
           ('objects', 'num_objects', 'relation', 'names')}
  batch['caption'] = [e['caption'] for e in examples]
  tok = tokenizer_lib.Tokenizer.from_config(config)
  batch['tokens'] = tok(batch['caption'])
  out = hard_negatives.ConverseCaptions(config, 'clip')(batch)
  two = np.flatnonzero(batch['num_objects'] == 2)
  assert len(two) >= 6
  for i in range(48):
    if i not in two:
      assert out['caption'][i] == batch['caption'][i]
      continue
    assert out['caption'][i] != batch['caption'][i]
    np.testing.assert_array_equal(out['objects'][i, :2], batch['objects'][i, 1::-1])
    assert out['relation'][i] == cs.OPPOSITE_RELATION[batch['relation'][i]]
    np.testing.assert_array_equal(out['tokens'][i], tok([out['caption'][i]])[0])
    # both captions are true of the image
    det = scoring.detect(examples[i]['image'])
    assert scoring.check(det, out['objects'][i], 2, out['relation'][i],
                         out['names'][i])['overall']
  negs = hard_negatives.HardNegatives(config, 'clip')
  assert cs.ORDER_SWAP in negs.kinds
  rng = np.random.default_rng(0)
  for i in two:
    neg = cs.hard_negative(out['objects'][i], 2, out['names'][i], out['relation'][i], rng,
                           kinds=(cs.ORDER_SWAP,))
    if neg is None:   # both objects named alike
      continue
    assert neg['relation'] == out['relation'][i]
    det = scoring.detect(examples[i]['image'])
    assert not scoring.check(det, neg['objects'], 2, neg['relation'],
                             out['names'][i])['overall']
  config.clip.converse_prob = 1.5
  with pytest.raises(ValueError, match='converse_prob'):
    hard_negatives.ConverseCaptions(config, 'clip')


def test_mirror_negative_images_in_the_loss_match_numpy():
  """config.clip.mirror_negatives: each caption's row (text -> image) gets its own image's
  mirror as one extra column where has_mirror; image -> text is unchanged."""
  rng = np.random.default_rng(2)
  img, txt, mirror = (rng.normal(size=(6, 4)) for _ in range(3))
  has = np.array([True, False, True, True, False, True])
  loss, m = clip_task.contrastive_loss(
      *(jnp.asarray(x, jnp.float32) for x in (img, txt)), jnp.float32(10.0),
      mirror_embed=jnp.asarray(mirror, jnp.float32), has_mirror=jnp.asarray(has))
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  logits = 10.0 * unit(img) @ unit(txt).T
  own_mirror = 10.0 * np.sum(unit(txt) * unit(mirror), -1)

  def ce_rows(lg, target):
    return [np.log(np.exp(row - row.max()).sum()) + row.max() - row[t]
            for row, t in zip(lg, target)]
  t2i = [np.append(logits[:, i], own_mirror[i]) if has[i] else logits[:, i] for i in range(6)]
  loss_t2i = np.mean(ce_rows(t2i, range(6)))
  loss_i2t = np.mean(ce_rows(logits, range(6)))
  np.testing.assert_allclose(loss, 0.5 * (loss_i2t + loss_t2i), rtol=1e-5)
  wins = np.diag(logits) > own_mirror
  np.testing.assert_allclose(m['mirror_top1'], wins[has].mean(), rtol=1e-6)
  # No mirror flagged: the plain CLIP loss.
  plain, _ = clip_task.contrastive_loss(
      *(jnp.asarray(x, jnp.float32) for x in (img, txt)), jnp.float32(10.0),
      mirror_embed=jnp.asarray(mirror, jnp.float32), has_mirror=jnp.zeros(6, bool))
  np.testing.assert_allclose(plain, reference_loss(img, txt, 10.0), rtol=1e-5)


def assert_loss_takes_negative_images(config, batch, mirror, negative_images):
  """The clip task's prepared `batch` gets the `mirror` kinds, and its loss is
  contrastive_loss with the embeddings of `negative_images` as the negative images."""
  from dalle2_jax.tasks import hard_negatives as hn  # pylint: disable=g-import-not-at-top
  task = clip_task.ClipTask(config, 'clip', '')
  prepared = task.prepare_batch(batch)
  np.testing.assert_array_equal(prepared['mirror'], mirror)
  params = task.init(jax.random.key(0), prepared)
  loss, metrics = task.loss(params, prepared, jax.random.key(1))
  img, txt, scale = task.embed(params, batch)
  neg_img, _, _ = task.embed(params, dict(batch, image=negative_images))
  ref, ref_metrics = clip_task.contrastive_loss(img, txt, scale, mirror_embed=neg_img,
                                                has_mirror=mirror != hn.NO_MIRROR)
  np.testing.assert_allclose(loss, ref, rtol=1e-4)
  np.testing.assert_allclose(metrics['mirror_top1'], ref_metrics['mirror_top1'])


@pytest.mark.parametrize('mode', ['left_right', 'both'])
def test_mirror_negatives_flag_exactly_the_captions_the_mirror_makes_false(mode):
  """MirrorNegatives marks an example with an axis iff the scorer finds its caption false of
  the image mirrored along that axis (and true of the image): left-right first; with 'both',
  up-down for scenes without a triangle (whose mirror would be no captioned_shapes scene).
  An unmarked example's left-right mirror keeps its caption true. The clip loss takes the
  field and reports mirror_top1."""
  from configs import shapes  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import captioned_shapes as cs  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import scoring  # pylint: disable=g-import-not-at-top
  from dalle2_jax.tasks import hard_negatives as hn  # pylint: disable=g-import-not-at-top
  config = shapes.get_config()
  config.unlock()
  config.clip.mirror_negatives = mode
  config.clip.colour_swap_negatives = False   # the mirror alone (the other kinds: below)
  config.clip.relocate_negatives = False
  examples = [cs.make_example('train', i) for i in range(160)]
  batch = {k: np.stack([e[k] for e in examples]) for k in
           ('objects', 'num_objects', 'relation', 'names', 'image')}
  mirror = hn.MirrorNegatives(config, 'clip')(batch)['mirror']
  counts = np.bincount(mirror, minlength=3)
  assert counts[hn.LEFT_RIGHT] > 20 and counts[hn.NO_MIRROR] > 20
  assert (counts[hn.UP_DOWN] > 5) == (mode == 'both')
  for i, e in enumerate(examples):
    args = (e['objects'], e['num_objects'], e['relation'], e['names'])
    true_of = lambda image: scoring.check(scoring.detect(image), *args)['overall']  # noqa: E731
    assert true_of(e['image'])
    assert true_of(e['image'][:, ::-1]) == (mirror[i] != hn.LEFT_RIGHT), e['caption']
    if mirror[i] == hn.UP_DOWN:
      assert not true_of(e['image'][::-1]), e['caption']
      assert cs.SHAPES.index('triangle') not in e['objects'][:, cs.SHAPE]
  # The loss mirrors each image along its own axis (checked against explicit flips).
  from dalle2_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  pick = np.concatenate([np.flatnonzero(mirror == m)[:3] for m in range(3)])
  small = {k: v[pick] for k, v in batch.items()}
  small['image'] = small['image'].astype(np.float32) / 127.5 - 1
  small['tokens'] = tokenizer_lib.Tokenizer.from_config(config)(
      [examples[i]['caption'] for i in pick])
  config.clip.recolour_prob, config.clip.hard_negatives = 0.0, False   # the mirror alone
  flipped = np.stack([im if m == hn.NO_MIRROR else im[::-1] if m == hn.UP_DOWN else im[:, ::-1]
                      for im, m in zip(small['image'], mirror[pick])])
  assert_loss_takes_negative_images(config, small, mirror[pick], flipped)
  config.data.name = 'tfds'
  with pytest.raises(ValueError, match='mirror_negatives'):
    hn.MirrorNegatives(config, 'clip')
  config.clip.mirror_negatives = 'sideways'
  with pytest.raises(ValueError, match='mirror_negatives'):
    hn.MirrorNegatives(config, 'clip')


def shapes_negatives_setup(n, **clip_fields):
  """(config, examples, batch): configs/shapes.py with the given hard negative image fields
  (the relocated and extra-object images off unless given; no recolouring, no negative
  captions) and a float batch of its first n training examples, tokenized."""
  from configs import shapes  # pylint: disable=g-import-not-at-top
  from dalle2_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import captioned_shapes as cs  # pylint: disable=g-import-not-at-top
  config = shapes.get_config()
  config.unlock()
  config.clip.relocate_negatives = config.clip.extra_object_negatives = False
  for k, v in clip_fields.items():
    config.clip[k] = v
  config.clip.recolour_prob, config.clip.hard_negatives = 0.0, False
  examples = [cs.make_example('train', i) for i in range(n)]
  batch = {k: np.stack([e[k] for e in examples]) for k in
           ('objects', 'num_objects', 'relation', 'names')}
  batch['image'] = np.stack([e['image'] for e in examples]).astype(np.float32) / 127.5 - 1
  batch['tokens'] = tokenizer_lib.Tokenizer.from_config(config)(
      [e['caption'] for e in examples])
  return config, examples, batch


def test_colour_swap_negatives_are_the_scene_with_its_colours_exchanged():
  """config.clip.colour_swap_negatives: where a two-object caption names colours, the
  example may get its image with the two objects' colours exchanged as its negative image
  (`mirror` = COLOUR_SWAP): exactly the scene re-rendered with the colours swapped (same
  jitter), false of the caption by the scorer, never a held-out pair; always where no mirror
  applies, otherwise instead of the mirror about half the time. The clip loss embeds it in
  the mirror's place."""
  from dalle2_jax.data import captioned_shapes as cs  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import scoring  # pylint: disable=g-import-not-at-top
  from dalle2_jax.tasks import hard_negatives as hn  # pylint: disable=g-import-not-at-top
  config, examples, batch = shapes_negatives_setup(240, colour_swap_negatives=True)
  out = hn.MirrorNegatives(config, 'clip')(batch)
  mirror, swap_image = out['mirror'], out['negative_image']
  plain = hn.mirror_axis(batch['objects'], batch['num_objects'], batch['names'],
                         batch['relation'])
  applies = cs.colour_swap_applies(batch['objects'], batch['num_objects'], batch['names'])
  swapped = mirror == hn.COLOUR_SWAP
  assert applies.sum() > 15 and not np.any(swapped & ~applies)
  np.testing.assert_array_equal(swapped, applies & ((plain == hn.NO_MIRROR) | swapped))
  both = applies & (plain != hn.NO_MIRROR)
  assert 0 < np.sum(swapped & both) < np.sum(both)          # the mirror's place, some of the time
  np.testing.assert_array_equal(mirror[~swapped], plain[~swapped])
  np.testing.assert_array_equal(swap_image[~swapped], batch['image'][~swapped])
  for i in np.flatnonzero(swapped):
    e = examples[i]
    objects = e['objects'].copy()
    objects[[0, 1], cs.COLOUR] = objects[[1, 0], cs.COLOUR]
    assert not any(cs.is_held_out(int(o[cs.COLOUR]), int(o[cs.SHAPE])) for o in objects)
    jitter = cs.sample_layout(cs.split_rng('train', i, 0), 'train', None)['jitter']
    np.testing.assert_allclose((swap_image[i] + 1) * 127.5, cs.render(objects, jitter),
                               atol=0.5)
    args = (e['objects'], e['num_objects'], e['relation'], e['names'])
    assert not scoring.check(scoring.detect(cs.render(objects, jitter)), *args)['overall']
  # The loss embeds the swapped image where the mirror would go.
  # (examples whose kind is not drawn at random: the draw is seeded by the batch's tokens)
  pick = np.concatenate([np.flatnonzero((mirror == m) & ~both)[:2] for m in
                         (hn.NO_MIRROR, hn.LEFT_RIGHT, hn.COLOUR_SWAP)])
  small = {k: v[pick] for k, v in batch.items()}
  negative = np.stack([swap_image[i] if mirror[i] == hn.COLOUR_SWAP else
                       batch['image'][i][:, ::-1] for i in pick])
  assert_loss_takes_negative_images(config, small, mirror[pick], negative)
  config.data.name = 'tfds'
  config.clip.mirror_negatives = 'none'
  with pytest.raises(ValueError, match='colour_swap_negatives'):
    hn.MirrorNegatives(config, 'clip')


def test_relocate_negatives_move_the_second_object_where_the_relation_is_false():
  """config.clip.relocate_negatives: a two-object example may get its image with the second
  object moved to another cell as its negative image (`mirror` = RELOCATE): exactly the
  scene rendered with that object's cell changed (same jitter), two objects apart, false of
  the caption by the scorer; on both axes (a left/right caption drawn in one column, an
  above/below one side by side); 1 / n of the examples where n kinds apply, always where it
  alone does; one-object examples never. The clip loss embeds it in the mirror's place."""
  from dalle2_jax.data import captioned_shapes as cs  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import scoring  # pylint: disable=g-import-not-at-top
  from dalle2_jax.tasks import hard_negatives as hn  # pylint: disable=g-import-not-at-top
  config, examples, batch = shapes_negatives_setup(320, relocate_negatives=True)
  out = hn.MirrorNegatives(config, 'clip')(batch)
  mirror, negative = out['mirror'], out['negative_image']
  moved = mirror == hn.RELOCATE
  two = batch['num_objects'] == 2
  assert not np.any(moved & ~two)
  config.clip.relocate_negatives = False
  before = hn.MirrorNegatives(config, 'clip')(batch)
  np.testing.assert_array_equal(mirror[~moved], before['mirror'][~moved])
  np.testing.assert_array_equal(negative[~moved], before['negative_image'][~moved])
  alone = two & (before['mirror'] == hn.NO_MIRROR)
  assert alone.sum() > 10 and np.all(moved[alone])
  shared = two & ~alone
  assert 0.15 < moved[shared].mean() < 0.6, moved[shared].mean()
  axes = set()
  for i in np.flatnonzero(moved):
    e = examples[i]
    cells = [(r, c) for r in range(3) for c in range(3)
             if (r, c) != tuple(e['objects'][0, [cs.ROW, cs.COL]])]
    jitter = cs.sample_layout(cs.split_rng('train', i, 0), 'train', None)['jitter']
    drawn = [(r, c) for r, c in cells if np.allclose(
        (negative[i] + 1) * 127.5, cs.render(np.array(
            [e['objects'][0], [*e['objects'][1, :3], r, c]]), jitter), atol=0.5)]
    assert len(drawn) == 1, e['caption']
    image = np.round((negative[i] + 1) * 127.5).astype(np.uint8)
    args = (e['objects'], e['num_objects'], e['relation'], e['names'])
    assert len(scoring.detect(image)) == 2, e['caption']
    assert not scoring.check(scoring.detect(image), *args)['overall'], e['caption']
    new = cs.relation_of(*e['objects'][0, [cs.ROW, cs.COL]], *drawn[0])
    axes.add((int(e['relation']) // 2, new // 2))
  assert {(0, 1), (1, 0)} <= axes, axes
  # The loss embeds the moved image where the mirror would go (examples that need no draw).
  config.clip.relocate_negatives = True
  pick = np.concatenate([np.flatnonzero(alone)[:3], np.flatnonzero(~two)[:3]])
  small = {k: v[pick] for k, v in batch.items()}
  small_out = hn.MirrorNegatives(config, 'clip')(small)
  assert np.all(small_out['mirror'][:3] == hn.RELOCATE)
  images = np.stack([small_out['negative_image'][j] if m == hn.RELOCATE else im[:, ::-1]
                     for j, (im, m) in enumerate(zip(small['image'], small_out['mirror']))])
  assert_loss_takes_negative_images(config, small, small_out['mirror'], images)
  config.data.name = 'tfds'
  config.clip.mirror_negatives, config.clip.colour_swap_negatives = 'none', False
  with pytest.raises(ValueError, match='relocate_negatives'):
    hn.MirrorNegatives(config, 'clip')


def test_move_object_refuses_what_is_no_scene():
  """captioned_shapes.move_object moves or copies a small object pixel for pixel, and
  returns None where it would come within MIN_GAP of another object; it refuses large
  objects, occupied cells and sizes not a multiple of 8."""
  from dalle2_jax.data import captioned_shapes as cs  # pylint: disable=g-import-not-at-top
  objects = np.array([[0, 0, 0, 1, 1], [1, 1, 0, 0, 0]], np.int32)   # centre, top left
  jitter = np.array([[0, 2], [0, -2]], np.int32)   # first 2 px right, second 2 px left
  image = cs.render(objects, jitter).astype(np.float32) / 127.5 - 1
  # Into the right cell the boxes would touch (x 28..40 and 40..52): no scene.
  assert cs.move_object(image, objects, 1, 5) is None
  out = cs.move_object(image, objects, 1, 3)   # the left cell: 8 px apart
  np.testing.assert_allclose((out + 1) * 127.5, cs.render(
      np.array([objects[0], [1, 1, 0, 1, 0]]), jitter), atol=0.5)
  out = cs.move_object(image, objects, 0, 8, keep=True)   # a copy of the first, bottom right
  np.testing.assert_allclose((out + 1) * 127.5, cs.render(
      np.array([objects[0], objects[1], [0, 0, 0, 2, 2]]), np.concatenate([jitter, [[0, 2]]])),
                             atol=0.5)
  assert cs.move_object(image, objects, 0, 2, keep=True) is not None
  with pytest.raises(ValueError, match='small objects'):
    cs.move_object(image, np.array([[0, 0, 1, 1, 1], [1, 1, 0, 0, 0]]), 1, 3)
  with pytest.raises(ValueError, match='not empty'):
    cs.move_object(image, objects, 1, 4)
  with pytest.raises(ValueError, match='multiple of 8'):
    cs.move_object(image[:60, :60], objects, 1, 3)


def test_extra_object_negatives_add_a_copy_of_an_object():
  """config.clip.extra_object_negatives: an example whose objects are all small may get its
  image with one of them copied into an empty cell (`mirror` = EXTRA_OBJECT): the scene
  drawn with that copy added (same jitter), one object more by the scorer, so false of the
  caption; examples with a large object never; the mirror and the extra object each about
  half the time where both apply. The clip loss embeds it in the mirror's place."""
  from dalle2_jax.data import captioned_shapes as cs  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import scoring  # pylint: disable=g-import-not-at-top
  from dalle2_jax.tasks import hard_negatives as hn  # pylint: disable=g-import-not-at-top
  config, examples, batch = shapes_negatives_setup(240, extra_object_negatives=True,
                                                   colour_swap_negatives=False)
  out = hn.MirrorNegatives(config, 'clip')(batch)
  mirror, negative = out['mirror'], out['negative_image']
  extra = mirror == hn.EXTRA_OBJECT
  small = np.array([np.all(e['objects'][:e['num_objects'], cs.SIZE] == 0) for e in examples])
  assert not np.any(extra & ~small)
  plain = hn.mirror_axis(batch['objects'], batch['num_objects'], batch['names'],
                         batch['relation'])
  np.testing.assert_array_equal(mirror[~extra], plain[~extra])
  assert np.mean(extra[small & (plain == hn.NO_MIRROR)]) > 0.9
  assert 0.3 < np.mean(extra[small & (plain != hn.NO_MIRROR)]) < 0.7
  for i in np.flatnonzero(extra):
    e = examples[i]
    image = np.round((negative[i] + 1) * 127.5).astype(np.uint8)
    args = (e['objects'], e['num_objects'], e['relation'], e['names'])
    assert len(scoring.detect(image)) == e['num_objects'] + 1, e['caption']
    assert not scoring.check(scoring.detect(image), *args)['overall'], e['caption']
    jitter = cs.sample_layout(cs.split_rng('train', i, 0), 'train', None)['jitter']
    k = e['num_objects']
    drawn = [(w, c) for w in range(k) for c in range(9) if np.allclose(
        (negative[i] + 1) * 127.5, cs.render(
            np.concatenate([e['objects'][:k], [[*e['objects'][w, :3], c // 3, c % 3]]]),
            np.concatenate([jitter[:k], jitter[w:w + 1]])), atol=0.5)]
    assert len(drawn) == 1, e['caption']
  pick = np.concatenate([np.flatnonzero(extra)[:3], np.flatnonzero(~small)[:3]])
  part = {k: v[pick] for k, v in batch.items()}
  part_out = hn.MirrorNegatives(config, 'clip')(part)
  images = np.stack([part_out['negative_image'][j] if m == hn.EXTRA_OBJECT else
                     im[:, ::-1] for j, (im, m) in enumerate(zip(part['image'],
                                                                 part_out['mirror']))])
  assert_loss_takes_negative_images(config, part, part_out['mirror'], images)
