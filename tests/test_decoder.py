"""The decoder stage: guidance drops, task plumbing, FLOPs, and overfitting a fixed batch of
8 captioned_shapes images whose DDIM samples must score as the right shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from dalle2_jax import tokenizer as tokenizer_lib
from dalle2_jax.data import captioned_shapes as cs
from dalle2_jax.data import pipeline
from dalle2_jax.data import scoring
from dalle2_jax.models import clip as clip_lib
from dalle2_jax.tasks import decoder as decoder_task

SIZE = 32


def make_config(**model):
  c = tiny.get_config()
  c.unlock()
  c.decoder.image_size = SIZE
  c.clip.image_size = SIZE
  c.decoder.model.update(model)
  return c


def random_clip(c) -> clip_lib.FrozenClip:
  """A random-weight tiny CLIP (no trained one is needed to test the decoder's plumbing)."""
  mc = clip_lib.model_config_from(c, 'clip')
  params = clip_lib.build_model(mc).init(
      jax.random.PRNGKey(0), jnp.zeros((1, c.tokenizer.context_length), jnp.int32),
      jnp.zeros((1, SIZE, SIZE, 3)))['params']
  return clip_lib.FrozenClip(params=nn.unbox(params), config=mc)


@pytest.fixture(scope='module')
def shapes():
  """8 captioned_shapes train examples at 32 px (generated directly, as the dataset does)."""
  ex = [cs.make_example('train', i) for i in range(8)]
  images = np.stack([pipeline.decode_image(cs.png_bytes(e['image']), SIZE) for e in ex])
  out = {k: np.stack([e[k] for e in ex]) for k in ('objects', 'num_objects', 'relation',
                                                   'names')}
  out['image'] = images
  out['caption'] = [e['caption'] for e in ex]
  return out


def test_cond_drop_fractions_match_config():
  c = make_config(image_embed_drop_prob=0.1, text_drop_prob=0.5)
  n = 20000
  keep_img, keep_txt = decoder_task.cond_drop_masks(
      jax.random.PRNGKey(0), n, c.decoder.model.image_embed_drop_prob,
      c.decoder.model.text_drop_prob)
  drop_img, drop_txt = 1 - float(keep_img.mean()), 1 - float(keep_txt.mean())
  tol = lambda p: 4 * np.sqrt(p * (1 - p) / n)  # noqa: E731
  assert abs(drop_img - 0.1) < tol(0.1) and abs(drop_txt - 0.5) < tol(0.5)
  # Independent: both dropped about 5% of the time.
  both = float(jnp.mean(~keep_img & ~keep_txt))
  assert abs(both - 0.05) < tol(0.05)


def test_loss_drops_conditioning_at_the_configured_rate(shapes):
  """Through the task's loss (what training runs): a batch of 512 at 8 px."""
  c = make_config(image_embed_drop_prob=0.25, text_drop_prob=0.5, channel_mult=(1,),
                  attention_resolutions=(8,))
  c.decoder.image_size = 8
  task = decoder_task.DecoderTask(c, 'decoder', '/tmp/unused', frozen_clip=random_clip(c))
  n = 512
  tokens = tokenizer_lib.Tokenizer.from_config(c)(shapes['caption'])
  batch = dict(image=jnp.zeros((n, SIZE, SIZE, 3)), tokens=jnp.tile(tokens, (n // 8, 1)))
  params = task.init(jax.random.PRNGKey(0), {k: v[:2] for k, v in batch.items()})
  _, m = jax.jit(task.loss)(nn.unbox(params), batch, jax.random.PRNGKey(1))
  tol = lambda p: 4 * np.sqrt(p * (1 - p) / n)  # noqa: E731
  assert abs(float(m['image_embed_drop_frac']) - 0.25) < tol(0.25)
  assert abs(float(m['text_drop_frac']) - 0.5) < tol(0.5)
  _, m = jax.jit(lambda p, b, r: task.loss(p, b, r, train=False))(nn.unbox(params), batch,
                                                                  jax.random.PRNGKey(1))
  assert float(m['image_embed_drop_frac']) == 0 and float(m['text_drop_frac']) == 0
  assert task.flops_per_example() > 0


def test_config_errors():
  c = make_config(text_encoder='t5')
  with pytest.raises(ValueError, match='text_encoder'):
    decoder_task.DecoderTask(c, 'decoder', '/tmp/unused', frozen_clip=random_clip(c))
  c = make_config(text_drop_prob=1.5)
  with pytest.raises(ValueError, match='text_drop_prob'):
    decoder_task.DecoderTask(c, 'decoder', '/tmp/unused', frozen_clip=random_clip(c))
  if jax.default_backend() != 'gpu':
    c = make_config(attention_impl='cudnn')
    with pytest.raises(ValueError, match=r"config.decoder.model.attention_impl='cudnn' runs "
                                         'on NVIDIA GPUs only'):
      decoder_task.DecoderTask(c, 'decoder', '/tmp/unused', frozen_clip=random_clip(c))
  c = make_config()
  with pytest.raises(FileNotFoundError, match='CLIP'):
    decoder_task.DecoderTask(c, 'decoder', '/tmp/no_such_workdir')


OVERFIT_STEPS = 600


def test_tiny_decoder_overfits_a_fixed_batch(shapes):
  """The tiny decoder (16 channels, 32 px) memorises 8 captioned images; DDIM samples for
  those 8 conditions are scored by the spec's rule.

  The CLIP is random (no trained one is needed to memorise 8 pairs), and its image
  embeddings of black-background images are nearly parallel (cosine ~0.99), so the batch's
  embeddings are standardised per dimension (as precomputed embeddings would be with
  Karlo-style statistics) and given as `clip_image_embed`. No guidance drops, so memorising
  is quick. The objective and weighting are the shapes default's, x0 weighted as v capped at
  6 (in 600 steps v got 3 of 6 shapes right and x0 with a learned variance 4; eps samples
  noise from t = 999 at this length: configs/shapes.py). Uniformly weighted x0 got 3-6 of 6
  over six sampling keys on an AMD EPYC (4 with the key below, so this test failed there);
  capped v got 5-6 on all six.
  """
  c = make_config(image_embed_drop_prob=0.0, text_drop_prob=0.0)
  c.decoder.diffusion.update(objective='x0', learned_variance=False, loss_weight='v',
                             loss_weight_cap=6.0)
  frozen = random_clip(c)
  task = decoder_task.DecoderTask(c, 'decoder', '/tmp/unused', frozen_clip=frozen)
  images = jnp.asarray(shapes['image'].astype(np.float32) / 127.5 - 1.0)
  z = clip_lib.encode_image(frozen.config, frozen.params, images)
  z = (z - z.mean(0)) / z.std(0)
  tokens = jnp.asarray(tokenizer_lib.Tokenizer.from_config(c)(shapes['caption']))
  batch = dict(image=images, tokens=tokens, clip_image_embed=z)
  params = nn.unbox(task.init(jax.random.PRNGKey(1), batch))
  opt = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 3e-3, 20, OVERFIT_STEPS, 3e-4))
  state = opt.init(params)

  @jax.jit
  def step(p, s, rng):
    (loss, _), g = jax.value_and_grad(task.loss, has_aux=True)(p, batch, rng, frozen.params)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss

  rng = jax.random.PRNGKey(2)
  losses = []
  for _ in range(OVERFIT_STEPS):
    rng, k = jax.random.split(rng)
    params, state, loss = step(params, state, k)
    losses.append(float(loss))
  assert np.mean(losses[-50:]) < 0.1 * np.mean(losses[:5])
  x = jax.jit(lambda p, r: task.generate(p, frozen.params, tokens, r, clip_image_embed=z,
                                         steps=25, guidance_scale=1.0))(
                                             params, jax.random.PRNGKey(3))
  samples = np.asarray(jnp.round((x + 1) * 127.5)).clip(0, 255).astype(np.uint8)
  got = scoring.score_images(samples, shapes)
  truth = scoring.score_images(shapes['image'], shapes)   # the rule on the real images
  right = sum(g['shape'] for g in got)
  assert right >= sum(t['shape'] for t in truth) - 1, (got, truth)


def test_empty_caption_takes_the_null_caption():
  """generate() with an empty prompt samples with the caption dropped (text_keep False, the
  learned null of training), not with CLIP's encoding of ''."""
  c = make_config()
  frozen = random_clip(c)
  task = decoder_task.DecoderTask(c, 'decoder', '/tmp/unused', frozen_clip=frozen)
  tokens = jnp.asarray(tokenizer_lib.Tokenizer.from_config(c)(['', 'a red circle']))
  np.testing.assert_array_equal(decoder_task.has_caption(tokens), [False, True])
  images = jnp.zeros((2, SIZE, SIZE, 3))
  batch = dict(image=images, tokens=tokens)
  params = nn.unbox(task.init(jax.random.PRNGKey(1), batch))
  # a decoder that actually reads its caption (the final layer is zero at init)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
                        params)
  rng = jax.random.PRNGKey(3)
  got = task.generate(params, frozen.params, tokens, rng, images=images, steps=4,
                      guidance_scale=1.0)
  cond = task.conditioning(frozen.params, tokens, images=images)
  for text_keep, row in (([False, True], slice(None)), ([True, True], slice(1, None))):
    fn = task._model_fn(params, cond, jnp.ones((2,), bool), jnp.asarray(text_keep))  # pylint: disable=protected-access
    want = jnp.clip(task.diffusion.sample(
        fn, images.shape, rng, sampler=c.decoder.sample.sampler, steps=4,
        thresholding=c.decoder.sample.get('thresholding', 'static')), -1, 1)
    np.testing.assert_allclose(got[row], want[row], atol=1e-5)
  # and the null caption is not the same as CLIP's encoding of ''
  assert np.abs(np.asarray(got[0]) - np.asarray(want[0])).max() > 1e-3


def test_text_embed_in_time():
  """With model.text_embed_in_time the caption's CLIP text embedding reaches the UNet through
  the timestep embedding: the prediction moves with it where the caption is kept, not where
  it is dropped; the own text encoder refuses the option."""
  c = make_config(text_embed_in_time=True)
  frozen = random_clip(c)
  task = decoder_task.DecoderTask(c, 'decoder', '/tmp/unused', frozen_clip=frozen)
  tokens = jnp.asarray(tokenizer_lib.Tokenizer.from_config(c)(['a red circle'] * 2))
  images = jnp.zeros((2, SIZE, SIZE, 3))
  params = nn.unbox(task.init(jax.random.PRNGKey(1), dict(image=images, tokens=tokens)))
  assert params['text_embed_proj']['kernel'].shape == (task.embed_dim,
                                                       4 * c.decoder.model.channels)
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.PRNGKey(2), p.shape),
                        params)
  cond = task.conditioning(frozen.params, tokens, images=images)
  np.testing.assert_allclose(jnp.linalg.norm(cond['text_embed'], axis=-1),
                             np.sqrt(task.embed_dim), rtol=1e-5)
  x = jax.random.normal(jax.random.PRNGKey(4), images.shape)
  t = jnp.full((2,), 500)
  other = dict(cond, text_embed=-cond['text_embed'])
  def predict(cond, text_keep):
    fn = task._model_fn(params, cond, jnp.ones((2,), bool), jnp.asarray(text_keep))  # pylint: disable=protected-access
    return np.asarray(fn(x, t))
  assert np.abs(predict(cond, [True] * 2) - predict(other, [True] * 2)).max() > 1e-3
  np.testing.assert_array_equal(predict(cond, [False] * 2), predict(other, [False] * 2))
  c = make_config(text_embed_in_time=True, text_encoder='own',
                  text=dict(width=16, depth=1, heads=1))
  with pytest.raises(ValueError, match="text_embed_in_time needs the CLIP text embedding"):
    decoder_task.DecoderTask(c, 'decoder', '/tmp/unused', frozen_clip=frozen)


def test_clip_embeds_the_image_at_its_own_resolution(shapes, monkeypatch):
  """A decoder below CLIP's resolution loads images at CLIP's size (the prior's embedding
  space) and trains on them resized to its own."""
  from dalle2_jax.training import loop  # pylint: disable=g-import-not-at-top
  c = make_config()
  c.decoder.image_size = 16
  task = decoder_task.DecoderTask(c, 'decoder', '/tmp/unused', frozen_clip=random_clip(c))
  assert task.input_image_size() == SIZE
  seen = {}
  monkeypatch.setattr(pipeline, 'make_input', lambda *a, **kw: seen.update(kw))
  loop.default_input_fn(c, 'decoder', task, mesh=None, seed=0)
  assert seen['image_size'] == SIZE
  x = jnp.asarray(shapes['image'], jnp.float32) / 127.5 - 1
  assert task.images({'image': x}).shape == (8, 16, 16, 3)
  c.decoder.image_size = 64
  assert decoder_task.DecoderTask(c, 'decoder', '/tmp/unused',
                                  frozen_clip=random_clip(c)).input_image_size() == 64


def test_recolour_augmentation_in_prepare_batch():
  """config.decoder.recolour_prob recolours that fraction of the batch (colour-free
  captions, re-tokenised), and refuses precomputed CLIP embeddings it would invalidate."""
  from configs import shapes as shapes_config  # pylint: disable=g-import-not-at-top
  c = shapes_config.get_config()
  c.unlock()
  for k in ('image_size', 'model'):
    c.clip[k] = make_config().clip[k]
  c.decoder.recolour_prob = 0.5
  task = decoder_task.DecoderTask(c, 'decoder', '/tmp/unused', frozen_clip=random_clip(c))
  ex = [cs.make_example('train', i) for i in range(64)]
  batch = {k: np.stack([e[k] for e in ex]) for k in ('objects', 'num_objects', 'relation',
                                                     'names')}
  batch['image'] = np.stack([e['image'] for e in ex]).astype(np.float32) / 127.5 - 1
  batch['caption'] = [e['caption'] for e in ex]
  batch['tokens'] = tokenizer_lib.Tokenizer.from_config(c)(batch['caption'])
  out = task.prepare_batch(batch)
  changed = np.any(out['image'] != batch['image'], axis=(1, 2, 3))
  assert 16 <= changed.sum() <= 48
  for i in np.flatnonzero(changed):
    assert not set(out['caption'][i].replace(',', ' ').split()) & set(cs.COLOUR_NAMES)
  with pytest.raises(ValueError, match='recolour_prob'):
    task.prepare_batch(dict(batch, clip_image_embed=np.zeros((64, 8), np.float32)))
  c.decoder.recolour_prob = 0.0
  task = decoder_task.DecoderTask(c, 'decoder', '/tmp/unused', frozen_clip=random_clip(c))
  assert task.prepare_batch(batch) is batch
