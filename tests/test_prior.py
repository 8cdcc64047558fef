"""The diffusion prior: model behaviour, task losses and statistics, FLOPs, and learning.

The learning test trains the prior through the real engine (`training.loop.run`, one
device) on a tiny random-weight CLIP where every caption comes with one fixed image, so the
true image embedding is a fixed function of the text that the text embedding itself does not
give; the sampled embeddings must beat the text-embedding baseline by >= 0.1 cosine.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from dalle2_jax.models import clip as clip_lib
from dalle2_jax.models import prior as prior_lib
from dalle2_jax.tasks import clip as clip_task
from dalle2_jax.tasks import prior as prior_task
from dalle2_jax.training import export
from dalle2_jax.training import loop
from dalle2_jax.training import sharding as sharding_lib

CONTEXT, VOCAB, IMAGE = 8, 64, 16
NUM_PAIRS = 8


def make_config(embed_norm='l2', steps=4, **sample):
  c = tiny.get_config()
  c.unlock()
  c.stages = ('prior',)
  c.tokenizer.context_length = CONTEXT
  c.clip.image_size = IMAGE
  c.clip.model.text.vocab_size = VOCAB
  c.clip.model.vision.patch_size = 4
  c.prior.image_size = IMAGE
  c.prior.steps = steps
  c.prior.batch_size = 16
  c.prior.log_every = 1000
  c.prior.ckpt_every = 0
  c.prior.ema.decay = 0.9
  c.prior.optim.update(lr=3e-3, warmup_steps=10, weight_decay=0.0)
  c.prior.model.update(width=64, depth=2, heads=4, embed_norm=embed_norm)
  c.prior.sample.update(sample)
  return c


def pairs(seed=0):
  """NUM_PAIRS (tokens, image) pairs: random captions, each with its own random image."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, VOCAB - 1, (NUM_PAIRS, CONTEXT)).astype(np.int32)
  for i, end in enumerate(rng.integers(3, CONTEXT, NUM_PAIRS)):
    tokens[i, end], tokens[i, end + 1:] = VOCAB - 1, 0
  images = rng.uniform(-1, 1, (NUM_PAIRS, IMAGE, IMAGE, 3)).astype(np.float32)
  return tokens, images


@pytest.fixture(scope='module')
def clip_workdir(tmp_path_factory):
  """A workdir whose clip/export holds a random-weight tiny CLIP."""
  wd = str(tmp_path_factory.mktemp('prior'))
  c = make_config()
  task = clip_task.ClipTask(c, 'clip', wd)
  tokens, images = pairs()
  params = task.init(jax.random.PRNGKey(0), dict(tokens=tokens, image=images))
  export.save_export(os.path.join(wd, 'clip', 'export'), c, 'clip', nn.unbox(params))
  return wd


class PairInput:
  """Batches drawn from the fixed pairs, with the input pipeline's interface."""

  def __init__(self, batch_size, mesh, seed):
    self.batch_size, self.mesh, self.seed, self.index = batch_size, mesh, seed, 0
    self.tokens, self.images = pairs()

  def __iter__(self):
    return self

  def __next__(self):
    idx = np.random.default_rng([self.seed, self.index]).integers(0, NUM_PAIRS,
                                                                  self.batch_size)
    self.index += 1
    return sharding_lib.shard_batch({'tokens': self.tokens[idx], 'image': self.images[idx]},
                                    self.mesh)

  def get_state(self):
    return {'index': self.index}

  def set_state(self, state):
    self.index = int(state['index'])


def _random_batch(n=6, seed=1):
  tokens, images = pairs(seed)
  return dict(tokens=np.resize(tokens, (n, CONTEXT)), image=np.resize(images, (n,) + images.shape[1:]))


def test_model_is_causal_masks_padding_and_drops_text():
  net = prior_lib.PriorTransformer(embed_dim=8, width=16, depth=2, num_heads=2,
                                   context_length=5, text_width=12)
  rng = np.random.default_rng(0)
  b = 3
  x, emb = rng.normal(size=(b, 8)), rng.normal(size=(b, 8))
  enc = rng.normal(size=(b, 5, 12))
  mask = np.array([[1, 1, 1, 0, 0]] * b, bool)
  t = np.array([0, 500, 999])
  params = net.init(jax.random.PRNGKey(0), x, t, emb, enc, mask, np.zeros(b, bool))
  f = jax.jit(lambda *a: net.apply(params, *a))
  out = f(x, t, emb, enc, mask, np.zeros(b, bool))
  assert out.shape == (b, 8) and out.dtype == jnp.float32
  enc2 = enc.copy()
  enc2[:, 3:] += 5.0                     # padded positions: ignored
  np.testing.assert_allclose(f(x, t, emb, enc2, mask, np.zeros(b, bool)), out, atol=1e-5)
  enc2[:, 1] += 1.0                      # a real token: matters
  assert np.abs(f(x, t, emb, enc2, mask, np.zeros(b, bool)) - out).max() > 1e-3
  for changed in ((x + 1, t, emb), (x, t + 1, emb), (x, t, emb + 1)):
    assert np.abs(f(*changed, enc, mask, np.zeros(b, bool)) - out).max() > 1e-3
  # dropped rows ignore the text entirely
  drop = np.ones(b, bool)
  d1 = f(x, t, emb, enc, mask, drop)
  d2 = f(x, t, emb + 3, enc2, ~mask, drop)
  np.testing.assert_allclose(d1, d2, atol=1e-5)
  assert np.abs(d1 - out).max() > 1e-3


def test_model_without_text_encodings_reads_the_text_embedding_only():
  net = prior_lib.PriorTransformer(embed_dim=8, width=16, depth=2, num_heads=2,
                                   context_length=5, text_width=12, text_encodings=False)
  rng = np.random.default_rng(0)
  b = 3
  x, emb = rng.normal(size=(b, 8)), rng.normal(size=(b, 8))
  enc, mask = rng.normal(size=(b, 5, 12)), np.array([[1, 1, 1, 0, 0]] * b, bool)
  t, keep = np.array([0, 500, 999]), np.zeros(b, bool)
  params = net.init(jax.random.PRNGKey(0), x, t, emb, enc, mask, keep)
  names = set(params['params'])
  assert not names & {'text_enc_proj', 'null_text_encodings'} and 'null_text_embed' in names
  assert params['params']['position_embedding'].value.shape == (4, 16)
  f = jax.jit(lambda *a: net.apply(params, *a))
  out = f(x, t, emb, enc, mask, keep)
  np.testing.assert_allclose(f(x, t, emb, enc + 1.0, ~mask, keep), out, atol=1e-5)
  assert np.abs(f(x, t, emb + 1, enc, mask, keep) - out).max() > 1e-3
  drop = np.ones(b, bool)   # dropped rows ignore the text embedding too
  np.testing.assert_allclose(f(x, t, emb + 3, enc, mask, drop), f(x, t, emb, enc, mask, drop),
                             atol=1e-5)


@pytest.mark.parametrize('text_encodings', [True, False])
def test_flops_match_xla(text_encodings):
  b, e, w, depth, length, tw = 2, 64, 128, 2, 16, 64   # matmuls dominate elementwise ops
  net = prior_lib.PriorTransformer(embed_dim=e, width=w, depth=depth, num_heads=4,
                                   context_length=length, text_width=tw,
                                   text_encodings=text_encodings)
  args = (jnp.zeros((b, e)), jnp.zeros((b,), jnp.int32), jnp.zeros((b, e)),
          jnp.zeros((b, length, tw)), jnp.ones((b, length), bool), jnp.zeros((b,), bool))
  params = net.init(jax.random.PRNGKey(0), *args)
  cost = jax.jit(net.apply).lower(params, *args).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  analytic = prior_lib.flops_per_example(e, w, depth, length, tw,
                                         text_encodings=text_encodings)
  assert analytic == pytest.approx(float(cost['flops']) / b, rel=0.15)


@pytest.mark.parametrize('embed_norm', ['l2', 'standardize'])
def test_task_loss_metrics_and_stats(clip_workdir, embed_norm):
  c = make_config(embed_norm)
  stats = None
  if embed_norm == 'standardize':
    rng = np.random.default_rng(0)
    stats = prior_task.embed_stats(rng.normal(2.0, 3.0, (500, 32)), rng.normal(size=(500, 32)))
    np.testing.assert_allclose(stats['image_mean'], 2.0, atol=0.5)
    np.testing.assert_allclose(stats['image_std'], 3.0, atol=0.5)
  task = prior_task.PriorTask(c, 'prior', clip_workdir, stats=stats)
  batch = _random_batch()
  params = nn.unbox(task.init(jax.random.PRNGKey(1), batch))
  assert ('embed_stats' in params) == (embed_norm == 'standardize')
  frozen = task.frozen_params()
  (loss, m), grads = jax.jit(jax.value_and_grad(
      lambda p: task.loss(p, batch, jax.random.PRNGKey(2), frozen, train=False),
      has_aux=True))(params)
  assert set(m) >= {'loss', 'mse', 'cos_pred_image', 'cos_text_image', 'cos_pred_text'}
  assert np.isfinite(float(loss)) and float(loss) == pytest.approx(float(m['mse']))
  if embed_norm == 'standardize':   # statistics are carried in params but never trained
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads['embed_stats']))
  # the text baseline is the cosine of CLIP's two embeddings
  te, _, _, ie = task.encode(frozen, batch['tokens'], batch['image'])
  np.testing.assert_allclose(m['cos_text_image'], np.mean(np.asarray(prior_task.cosine(te, ie))),
                             rtol=1e-5)
  # round trip of the normalisation
  st = params.get('embed_stats')
  x = task.normalize(ie, 'image', st)
  if embed_norm == 'l2':
    np.testing.assert_allclose(jnp.linalg.norm(x, axis=-1), np.sqrt(32), rtol=1e-5)
    np.testing.assert_allclose(task.denormalize(x, 'image', st), clip_lib.l2_normalize(ie), atol=1e-5)
  else:
    np.testing.assert_allclose(task.denormalize(x, 'image', st), ie, rtol=1e-4, atol=1e-4)
  assert task.flops_per_example() > 0


def test_activation_from_config(clip_workdir):
  """model.activation reaches the transformer; a config without it (priors trained before the
  field) gets the exact GELU it was trained with."""
  batch = _random_batch(4)
  c = make_config()
  assert c.prior.model.activation == 'gelu_tanh'
  tanh_task = prior_task.PriorTask(c, 'prior', clip_workdir)
  with c.unlocked():
    del c.prior.model['activation']
  erf_task = prior_task.PriorTask(c, 'prior', clip_workdir)
  assert erf_task.model().activation == 'gelu'
  params = nn.unbox(tanh_task.init(jax.random.PRNGKey(1), batch))
  frozen = tanh_task.frozen_params()
  loss = lambda task: task.loss(params, batch, jax.random.PRNGKey(2), frozen)[0]  # noqa: E731
  a, b = float(loss(tanh_task)), float(loss(erf_task))
  assert a != b and abs(a - b) < 1e-2 * abs(b)   # same parameters, nearly the same function
  with c.unlocked():
    c.prior.model.activation = 'swish'
  with pytest.raises(ValueError, match='activation'):
    prior_task.PriorTask(c, 'prior', clip_workdir).init(jax.random.PRNGKey(1), batch)


def test_attention_impl_reaches_every_layer(cudnn_attention_on_cpu):
  """attention_impl='cudnn' sends each transformer layer of the prior to the fused path
  (conftest's cudnn_attention_on_cpu), in bfloat16, with the prior's causal and padding
  masks, and gives the outputs of XLA's attention."""
  kw = dict(embed_dim=8, width=16, depth=3, num_heads=2, context_length=5, text_width=12,
            dtype=jnp.bfloat16)
  rng = np.random.default_rng(0)
  args = (rng.normal(size=(2, 8)), np.array([3, 900]), rng.normal(size=(2, 8)),
          rng.normal(size=(2, 5, 12)), np.array([[1, 1, 1, 0, 0]] * 2, bool))
  net = prior_lib.PriorTransformer(**kw, attention_impl='cudnn')
  params = net.init(jax.random.PRNGKey(0), *args)
  assert cudnn_attention_on_cpu == ['cudnn'] * 3
  ours = prior_lib.PriorTransformer(**kw).apply(params, *args)
  np.testing.assert_allclose(np.asarray(net.apply(params, *args), np.float32),
                             np.asarray(ours, np.float32), rtol=5e-2, atol=5e-2)


def test_attention_impl_from_config(clip_workdir):
  """model.attention_impl reaches the transformer's attention and is checked when the task
  is built, naming the field."""
  c = make_config()
  assert prior_task.PriorTask(c, 'prior', clip_workdir).model().attention_impl == 'xla'
  with c.unlocked():
    c.prior.model.attention_impl = 'flash'
  with pytest.raises(ValueError, match=r"config.prior.model.attention_impl='flash'; choose"):
    prior_task.PriorTask(c, 'prior', clip_workdir)


def test_candidates_best_of_n_and_guidance(clip_workdir):
  task = prior_task.PriorTask(make_config(), 'prior', clip_workdir)
  batch = _random_batch(4)
  params = nn.unbox(task.init(jax.random.PRNGKey(1), batch))
  frozen = task.frozen_params()
  run = jax.jit(lambda r: task.sample_image_embed(
      params, frozen, batch['tokens'], r, steps=6, guidance_scale=3.0, num_candidates=3,
      sampler='dpmpp_2m', return_candidates=True))
  best, cands = run(jax.random.PRNGKey(0))
  assert best.shape == (4, 32) and cands.shape == (4, 3, 32)
  te = task.encode(frozen, batch['tokens'])[0]
  scores = np.einsum('bnd,bd->bn', np.asarray(clip_lib.l2_normalize(cands)),
                     np.asarray(clip_lib.l2_normalize(te)))
  chosen = np.einsum('bd,bd->b', np.asarray(best), np.asarray(clip_lib.l2_normalize(te)))
  np.testing.assert_allclose(chosen, scores.max(1), rtol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(best, axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize('text_encodings', [True, False])
def test_trained_prior_beats_text_embedding_baseline(clip_workdir, tmp_path, text_encodings):
  c = make_config('standardize', steps=150)
  c.prior.model.text_encodings = text_encodings
  c.prior.clip_checkpoint = os.path.join(clip_workdir, 'clip', 'export')
  tokens, images = pairs()
  frozen_clip = clip_lib.FrozenClip.load(c.prior.clip_checkpoint)
  te = np.asarray(frozen_clip.encode_text(tokens)[0])
  ie = np.asarray(frozen_clip.encode_image(images))
  stats = prior_task.embed_stats(np.repeat(ie, 4, 0), np.repeat(te, 4, 0))

  def task_fn(config, stage, workdir):
    return prior_task.PriorTask(config, stage, workdir, stats=stats)

  def input_fn(config, stage, task, mesh, seed):
    return PairInput(int(config[stage].batch_size), mesh, seed)

  loop.run(c, str(tmp_path), task_fn=task_fn, input_fn=input_fn, devices=jax.devices()[:1])
  _, _, params = export.load_export(tmp_path / 'prior' / 'export')
  np.testing.assert_array_equal(params['embed_stats']['image_mean'], stats['image_mean'])
  task = task_fn(c, 'prior', str(tmp_path))
  ev = jax.jit(lambda r: task.evaluate(params, task.frozen_params(),
                                       dict(tokens=tokens, image=images), r,
                                       sampler='ddim', steps=16, num_candidates=2))(
                                           jax.random.PRNGKey(0))
  pred, base = float(ev['cos_pred_image'].mean()), float(ev['cos_text_image'].mean())
  mean_base = float(ev['cos_mean_image'].mean())
  print(f'prior cos {pred:.3f} vs text baseline {base:.3f}, mean-image baseline {mean_base:.3f}')
  assert pred >= base + 0.1, (pred, base)
  # it uses the text: better than the mean image embedding, and each sample is nearest to
  # its own caption's image embedding
  assert pred > mean_base, (pred, mean_base)
  # Scenes the captions are false of (here: another pair's image): each sample is nearer
  # its own image than that one (evaluate_split's colour_binding uses colour swaps).
  swap = np.roll(images, 1, axis=0)
  ev2 = jax.jit(lambda r: task.evaluate(params, task.frozen_params(),
                                        dict(tokens=tokens, image=images, swap_image=swap), r,
                                        sampler='ddim', steps=16, num_candidates=2))(
                                            jax.random.PRNGKey(0))
  np.testing.assert_allclose(ev2['cos_pred_image'], ev['cos_pred_image'], rtol=1e-5)
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
  np.testing.assert_allclose(ev2['cos_text_swap'],
                             np.sum(unit(te) * unit(np.roll(ie, 1, axis=0)), -1), atol=1e-4)
  assert np.mean(ev2['cos_pred_image'] > ev2['cos_pred_swap']) >= 0.75
  emb = jax.jit(lambda r: task.sample_image_embed(params, task.frozen_params(), tokens, r,
                                                  steps=16))(jax.random.PRNGKey(1))
  sims = np.asarray(clip_lib.l2_normalize(emb)) @ np.asarray(clip_lib.l2_normalize(ie)).T
  assert np.mean(np.argmax(sims, 1) == np.arange(NUM_PAIRS)) >= 0.75, sims


def test_evaluate_split_shape_match_and_nearest_real(tmp_path, monkeypatch):
  """evaluate_split on captioned_shapes: each one-object example whose caption names its
  shape is also drawn with each shape; shape_match counts the samples nearest the drawing
  with the true shape. A prior that always answers with the circle drawing's embedding
  matches exactly the circles. cos_nearest_real leaves out the example's own image."""
  from dalle2_jax.data import captioned_shapes as cs  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  clip = clip_task.ClipTask(c, 'clip', str(tmp_path))
  batch = dict(image=np.zeros((2, 32, 32, 3), np.float32),
               tokens=np.zeros((2, c.tokenizer.context_length), np.int32))
  export.save_export(tmp_path / 'clip' / 'export', c, 'clip',
                     nn.unbox(clip.init(jax.random.PRNGKey(0), batch)))
  task = prior_task.PriorTask(c, 'prior', str(tmp_path))
  params = nn.unbox(task.init(jax.random.PRNGKey(1), batch))
  evaluate = task.evaluate

  def circle_prior(params, frozen, batch, rng, **kw):
    task.sample_image_embed = lambda *a, **k: clip_lib.encode_image(  # noqa: E731
        task.clip.config, frozen, batch['shape0_image'])
    return evaluate(params, frozen, batch, rng, **kw)

  monkeypatch.setattr(task, 'evaluate', circle_prior)
  num = 40
  res = prior_task.evaluate_split(task, params, 'test', num, batch_size=16, steps=2)
  ex = pipeline.load_examples(c, 'test', num, image_size=32)
  named = cs.shape_change_applies(ex['num_objects'], ex['names'])
  partial = named & ~ex['names'].all(-1)
  circles = ex['objects'][:, 0, cs.SHAPE] == 0
  assert res['num_shape_match'] == named.sum() > 0
  assert res['num_shape_match_partial'] == partial.sum() > 0
  assert res['shape_match'] == pytest.approx((named & circles).sum() / named.sum())
  assert res['shape_match_partial'] == pytest.approx((partial & circles).sum() / partial.sum())
  assert 0.0 <= res['shape_match_text'] <= 1.0
  assert res['num_colour_binding'] > 0 and 'colour_binding_text' in res

  # A prior that answers with each example's own image embedding: its nearest other real
  # embedding is the true embedding's own nearest other one.
  def oracle_prior(params, frozen, batch, rng, **kw):
    task.sample_image_embed = lambda *a, **k: clip_lib.encode_image(  # noqa: E731
        task.clip.config, frozen, batch['image'])
    return evaluate(params, frozen, batch, rng, **kw)

  monkeypatch.setattr(task, 'evaluate', oracle_prior)
  res = prior_task.evaluate_split(task, params, 'test', num, batch_size=16, steps=2)
  assert res['cos_pred_image'] == pytest.approx(1.0, abs=1e-5)
  assert res['cos_nearest_real'] == pytest.approx(res['cos_nearest_real_true'], abs=1e-5)
  assert res['cos_nearest_real_true'] < 1.0 - 1e-4   # its own image is not counted


def test_render_each_shape():
  """The scene drawn with each shape: the same colour, size and cell, by the scoring rule."""
  from dalle2_jax.data import captioned_shapes as cs  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import scoring  # pylint: disable=g-import-not-at-top
  obj = np.array([[cs.SHAPES.index('square'), cs.COLOUR_NAMES.index('cyan'), 0, 2, 1],
                  [-1] * 5], np.int32)
  drawn = cs.render_each_shape(obj)
  assert drawn.shape == (3, 64, 64, 3)
  for s, image in enumerate(drawn):
    found = [(o['shape'], o['colour'], o['size'], o['row'], o['col'])
             for o in scoring.detect(image)]
    assert found == [(s, cs.COLOUR_NAMES.index('cyan'), 0, 2, 1)], found
