"""The unCLIP sampler on random-weight stages: determinism across devices, manipulations,
bad input. (Quality is checked by the end-to-end and evaluation runs, not here.)"""

import json
import os
import shutil
import warnings

import jax
import numpy as np
import pytest

import sampling_testutil
from dalle2_jax import sampling


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return sampling_testutil.make_workdir(str(tmp_path_factory.mktemp('unclip')))


@pytest.fixture(scope='module')
def unclip(workdir):
  return sampling.UnCLIP.from_workdir(workdir)


def test_loads_every_stage_from_its_export(unclip):
  assert unclip.stage_names == ('clip', 'prior', 'decoder', 'upsampler')
  assert len(unclip.devices) == 8
  assert unclip.image_size == 32 and unclip.decoder_image_size == 16
  s = unclip.default_settings()   # each stage's config.sample section
  assert (s.prior.steps, s.decoder.steps, s.upsamplers[0].steps) == (2, 2, 2)
  assert s.prior.num_candidates == 2 and s.decoder.guidance_scale == 3.0


def test_same_seed_same_images_on_1_and_8_devices(workdir, unclip):
  prompts = ['a large red circle in the top left', 'a small blue square', '']
  images8 = unclip(prompts, seed=3, num_images_per_prompt=2)
  assert images8.shape == (6, 32, 32, 3) and images8.dtype == np.uint8
  one = sampling.UnCLIP.from_workdir(workdir, devices=jax.devices()[:1])
  assert len(one.devices) == 1
  images1 = one(prompts[:2], seed=3, num_images_per_prompt=2)
  diff = np.abs(images8[:4].astype(int) - images1.astype(int))
  assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())
  # Every image has its own noise, and the seed matters.
  assert np.abs(images8[0].astype(int) - images8[1]).mean() > 1
  assert np.abs(unclip(prompts[:1], seed=4)[0].astype(int) - images8[0]).mean() > 1
  # An image depends only on (seed, index, prompt): a prefix of the batch is unchanged.
  np.testing.assert_array_equal(unclip(prompts[:1], seed=3, num_images_per_prompt=2),
                                images8[:2])
  # The empty prompt (unconditional) is deterministic too.
  np.testing.assert_array_equal(unclip(prompts, seed=3, num_images_per_prompt=2)[4:],
                                images8[4:])


def test_manipulations(unclip):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)

  variations = unclip.variations(images, seed=1, num_variations=3)
  assert variations.shape == (6, 32, 32, 3)
  assert np.abs(variations[0].astype(int) - variations[1]).mean() > 1   # new noise

  frames = unclip.interpolate(images[0], images[1], frames=5, seed=2)
  assert frames.shape == (5, 32, 32, 3)
  z = unclip.encode_image(images)
  ends = unclip.decode(z, seed=2, same_noise=True)
  np.testing.assert_array_equal(frames[0], ends[0])
  np.testing.assert_array_equal(frames[-1], ends[1])
  # Frames move away from the first one step by step.
  dist = [np.abs(f.astype(int) - frames[0]).mean() for f in frames]
  assert dist[0] == 0 and all(a < b for a, b in zip(dist[1:], dist[2:])), dist

  prompt_frames = unclip.interpolate('a red circle', 'a blue square', frames=3, seed=2)
  z_prompts = unclip.image_embeddings(['a red circle', 'a blue square'], seed=2)
  np.testing.assert_array_equal(prompt_frames[[0, -1]],
                                unclip.decode(z_prompts, seed=2, same_noise=True))

  diffs = unclip.text_diff(images[0], 'a red circle', 'a red square', thetas=[0.0, 0.5],
                           seed=2)
  assert diffs.shape == (2, 32, 32, 3)
  np.testing.assert_array_equal(diffs[0], ends[0])   # theta = 0 is the image's embedding

  mask = np.zeros((16, 16), bool)
  mask[4:12, 4:12] = True
  s = unclip.default_settings()
  no_up = sampling.UnCLIP(unclip.config, unclip.clip, unclip.prior, unclip.decoder, [])
  painted = no_up.inpaint(images[0], mask, 'a green triangle', seed=0, num_images=2,
                          resample=2, settings=sampling.Settings(s.prior, s.decoder, ()))
  assert painted.shape == (2, 16, 16, 3)
  np.testing.assert_array_equal(painted[:, ~mask], np.broadcast_to(images[0][~mask],
                                                                    (2,) + images[0][~mask].shape))
  assert not np.array_equal(painted[:, mask], np.broadcast_to(images[0][mask],
                                                             (2,) + images[0][mask].shape))


def test_missing_stage_names_the_stage_and_command(workdir, tmp_path):
  partial = str(tmp_path / 'run')
  shutil.copytree(workdir, partial)
  shutil.rmtree(os.path.join(partial, 'decoder'))
  with pytest.raises(FileNotFoundError,
                     match=r"(?s)Stage 'decoder'.*train\.py.*--stage decoder"):
    sampling.UnCLIP.from_workdir(partial)
  with pytest.raises(FileNotFoundError, match='does not exist.*train.py'):
    sampling.UnCLIP.from_workdir(str(tmp_path / 'nothing'))
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='No trained stage.*train.py'):
    sampling.UnCLIP.from_workdir(str(tmp_path / 'empty'))
  # A stage can come from elsewhere.
  u = sampling.UnCLIP.from_workdir(partial,
                                   exports={'decoder': os.path.join(workdir, 'decoder', 'export')})
  assert u.decoder.name == 'decoder'


def test_attention_impl_override(workdir, request):
  """attention_impl='cudnn' reaches the prior's and decoder's attention (conftest's
  cudnn_attention_on_cpu) and gives the images of XLA's attention in the same dtype; off a
  GPU it is refused before anything loads, naming the flag."""
  if jax.default_backend() != 'gpu':
    with pytest.raises(ValueError, match="--attention_impl='cudnn' runs on NVIDIA GPUs only"):
      sampling.UnCLIP.from_workdir(workdir, attention_impl='cudnn')
  prompts = ['a large red circle in the top left', 'a small blue square']
  settings = dict(seed=1, num_images_per_prompt=1)
  ours = sampling.UnCLIP.from_workdir(workdir, dtype='bfloat16')(prompts, **settings)
  calls = request.getfixturevalue('cudnn_attention_on_cpu')
  unclip = sampling.UnCLIP.from_workdir(workdir, dtype='bfloat16', attention_impl='cudnn')
  assert unclip.decoder.task.stage_config.model.attention_impl == 'cudnn'
  assert unclip.prior.task.stage_config.model.attention_impl == 'cudnn'
  assert unclip.attention_impls == {'prior': 'cudnn', 'decoder': 'cudnn'}
  fused = unclip(prompts, **settings)
  assert calls.count('cudnn') >= 2 and None in calls   # CLIP keeps its own attention
  # bfloat16 attention outputs differ in rounding only: uint8 pixels within a few levels.
  diff = np.abs(fused.astype(int) - ours.astype(int))
  assert diff.mean() < 4, diff.mean()


def test_stages_trained_by_separate_narrowed_commands_load_together(workdir, tmp_path):
  """train.py --config.stages="('clip','prior')", then "('decoder','upsampler')"."""
  split = str(tmp_path / 'split')
  shutil.copytree(workdir, split)
  for stages in (('clip', 'prior'), ('decoder', 'upsampler')):
    for stage in stages:
      path = os.path.join(split, stage, 'export', 'config.json')
      with open(path) as f:
        config = json.load(f)
      config['stages'] = list(stages)
      with open(path, 'w') as f:
        json.dump(config, f)
  u = sampling.UnCLIP.from_workdir(split)
  assert u.stage_names == ('clip', 'prior', 'decoder', 'upsampler')


def test_bad_settings_and_prompts(unclip, tmp_path):
  s = unclip.default_settings()
  with pytest.raises(ValueError, match='decoder: steps=5000'):
    unclip.validate(s.replace_stage('decoder', steps=5000))
  with pytest.raises(ValueError, match='guidance_scale'):
    unclip.validate(s.replace_stage('prior', guidance_scale=-2.0))
  with pytest.raises(ValueError, match='upsampler'):
    unclip.validate(sampling.Settings(s.prior, s.decoder, ()))
  with pytest.raises(ValueError, match='num_images_per_prompt'):
    unclip(['x'], num_images_per_prompt=0)
  with pytest.raises(ValueError, match='upsampler: num_candidates=2'):
    unclip.validate(s.replace_stage('upsamplers', num_candidates=2))
  with pytest.raises(ValueError, match='decoder_num_candidates'):
    unclip.inpaint(np.zeros((16, 16, 3), np.uint8), np.ones((16, 16), bool),
                   settings=s.replace_stage('decoder', num_candidates=2))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    tokens = unclip.tokenize(['red ' * 100, 'a red circle'])
  assert tokens.shape == (2, 32)
  assert any('truncated' in str(w.message) for w in caught)
  bad = tmp_path / 'broken.png'
  bad.write_bytes(b'not a png')
  with pytest.raises(ValueError, match='broken.png'):
    unclip.variations([str(bad)])


def _cosine(x, t):
  l2 = lambda v: np.asarray(v) / np.linalg.norm(np.asarray(v), axis=-1, keepdims=True)
  return l2(x) @ l2(t)[0]


def _check_chain_keeps_best(unclip, s, prompts, score_fn):
  """Rebuilds the decoder candidates of image 0 from its key, scores them with score_fn
  (candidates, tokens of prompt 0), upsamples the best: that must be the image returned."""
  out = unclip(prompts, seed=5, settings=s)
  assert out.shape == (len(prompts), 32, 32, 3)
  n = s.decoder.num_candidates
  tokens = unclip.tokenize(prompts[:1])
  k_prior, k_decode = jax.random.split(jax.numpy.asarray(unclip._keys(5, [0])[0]))
  p = unclip.params
  embed = unclip._prior_one(p, k_prior, tokens, s.prior)
  keys = jax.random.split(k_decode, 2)
  cands = unclip._decoder_sample(p, keys[0], np.repeat(embed, n, 0), np.repeat(tokens, n, 0),
                                 s.decoder)
  score = score_fn(cands, tokens)
  assert len(set(np.round(score, 5))) == n   # the choice is not a tie
  best = cands[int(np.argmax(score))][None]
  want = sampling.to_uint8(unclip._upsampler_sample(unclip.upsamplers[0], p['upsamplers'][0],
                                                    keys[1], best, s.upsamplers[0],
                                                    embed))[0]
  diff = np.abs(np.asarray(want).astype(int) - out[0])
  assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())
  return out


def test_upsampler_with_image_embed_cond_takes_the_decoders_embedding(tmp_path):
  c = sampling_testutil.micro_config()
  c.upsampler.model.image_embed_cond = True
  u = sampling.UnCLIP.from_workdir(sampling_testutil.make_workdir(str(tmp_path), c))
  assert u.upsamplers[0].task.clip is u.clip   # the chain's CLIP, not loaded again
  s = u.default_settings().replace_stage('decoder', num_candidates=1)
  prompts = ['a red circle']
  out = u(prompts, seed=5, settings=s)
  tokens = u.tokenize(prompts)
  k_prior, k_decode = jax.random.split(jax.numpy.asarray(u._keys(5, [0])[0]))
  p = u.params
  embed = u._prior_one(p, k_prior, tokens, s.prior)
  keys = jax.random.split(k_decode, 2)
  low = u._decoder_sample(p, keys[0], embed, tokens, s.decoder)

  def upsample(e):
    return np.asarray(sampling.to_uint8(u._upsampler_sample(
        u.upsamplers[0], p['upsamplers'][0], keys[1], low, s.upsamplers[0], e))[0], int)
  assert np.abs(upsample(embed) - out[0]).max() <= 1
  assert np.abs(upsample(-embed) - out[0]).mean() > 1   # the embedding matters


def test_decoder_best_of_n_keeps_the_candidate_closest_to_the_prompt(workdir, unclip):
  # The selection itself: the image whose CLIP embedding is the target wins.
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
  z = unclip.encode_image(images)
  for k in range(3):
    chosen = unclip._closest_to(unclip.params['clip'], sampling.from_uint8(images), z[k:k + 1])
    np.testing.assert_array_equal(np.asarray(chosen[0]), sampling.from_uint8(images)[k])

  # In the chain: the candidate whose CLIP image embedding is closest to the prompt's.
  s = unclip.default_settings().replace_stage('decoder', num_candidates=3)
  prompts = ['a large red circle in the top left', 'a small blue square']
  clip, p = unclip.clip, unclip.params['clip']
  out = _check_chain_keeps_best(
      unclip, s, prompts,
      lambda c, t: _cosine(clip.encode_image(c, p), clip.encode_text(t, p)[0]))
  # The same on one device.
  one = sampling.UnCLIP.from_workdir(workdir, devices=jax.devices()[:1])
  diff1 = np.abs(one(prompts, seed=5, settings=s).astype(int) - out)
  assert diff1.max() <= 1 and diff1.mean() < 0.01


def test_mirror_caption():
  assert (sampling.mirror_caption('a red circle to the left of a blue square in the top right')
          == 'a red circle to the right of a blue square in the top left')
  assert sampling.mirror_caption('Left of a RIGHT angle, leftover, bright') == (
      'Right of a Left angle, leftover, bright')
  assert sampling.mirror_caption('a small blue square') == 'a small blue square'


def test_decoder_best_of_n_with_mirror_images(unclip):
  # The selection: the highest sum of the image's cosine with the target and its mirror
  # image's with the mirror target; over random targets the mirror term changes some picks.
  rng = np.random.default_rng(2)
  images = sampling.from_uint8(rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
  clip, p = unclip.clip, unclip.params['clip']
  plain, mirrored = (np.asarray(clip.encode_image(x, p)) for x in (images, images[:, :, ::-1]))
  changed = 0
  for _ in range(8):
    t, m = rng.normal(size=(2, 1, plain.shape[-1])).astype(np.float32)
    chosen = unclip._closest_to(p, images, t, m)
    k = int(np.argmax(_cosine(plain, t) + _cosine(mirrored, m)))
    np.testing.assert_array_equal(np.asarray(chosen[0]), images[k])
    changed += k != int(np.argmax(_cosine(plain, t)))
  assert changed

  # In the chain, the mirror target is the CLIP text embedding of the mirrored prompt.
  s = unclip.default_settings().replace_stage('decoder', num_candidates=3, rerank_mirror=True)
  prompts = ['a red circle to the left of a blue square', 'a small blue square on the right']
  mirror = unclip.tokenize([sampling.mirror_caption(prompts[0])])
  _check_chain_keeps_best(
      unclip, s, prompts,
      lambda c, t: (_cosine(clip.encode_image(c, p), clip.encode_text(t, p)[0])
                    + _cosine(clip.encode_image(c[:, :, ::-1], p),
                              clip.encode_text(mirror, p)[0])))


def test_guidance_interval_reaches_prior_and_decoder(unclip):
  s = unclip.default_settings()
  prompts = ['a large red circle in the top left', 'a small blue square']
  guided = unclip(prompts, seed=6, settings=s)
  assert s.decoder.guidance_scale != 1.0
  t = unclip.decoder.task.diffusion.timesteps
  # (0, T) guides every step: the default.
  np.testing.assert_array_equal(
      unclip(prompts, seed=6, settings=s.replace_stage('decoder', guidance_interval=(0, t))),
      guided)
  # (0, 1) guides none of the 2 sampling steps: the same as scale 1.
  no_decoder_guidance = unclip(prompts, seed=6, settings=s.replace_stage(
      'decoder', guidance_scale=1.0))
  assert np.abs(no_decoder_guidance.astype(int) - guided).mean() > 1
  np.testing.assert_array_equal(
      unclip(prompts, seed=6, settings=s.replace_stage('decoder', guidance_interval=(0, 1))),
      no_decoder_guidance)
  # The same for the prior.
  sp = s.replace_stage('prior', guidance_scale=4.0)
  tokens = unclip.tokenize(prompts)
  key = jax.random.PRNGKey(0)
  embed = lambda st: np.asarray(unclip._prior_one(unclip.params, key, tokens, st.prior))
  np.testing.assert_array_equal(
      embed(sp.replace_stage('prior', guidance_interval=(0, 1))),
      embed(sp.replace_stage('prior', guidance_scale=1.0)))
  assert np.abs(embed(sp) - embed(s)).max() > 1e-4


def test_image_embed_guidance_scale_reaches_the_decoder(unclip):
  s = unclip.default_settings()
  g = s.decoder.guidance_scale
  assert g != 1.0 and s.decoder.image_embed_guidance_scale is None
  prompts = ['a large red circle in the top left', 'a small blue square']
  plain = unclip(prompts, seed=6, settings=s)
  run = lambda p, **kw: unclip(p, seed=6, settings=s.replace_stage('decoder', **kw))
  # The embedding's scale equal to the caption's is plain guidance.
  np.testing.assert_array_equal(run(prompts, image_embed_guidance_scale=g), plain)
  # 1: only the caption is guided (given the embedding); 0.5: three model rows.
  caption_only = run(prompts, image_embed_guidance_scale=1.0)
  assert np.abs(caption_only.astype(int) - plain).mean() > 1
  assert np.abs(run(prompts, image_embed_guidance_scale=0.5).astype(int)
                - caption_only).mean() > 1
  # Without a caption there is nothing to guide given the embedding: unguided.
  unguided = run([''], guidance_scale=1.0)
  assert np.abs(run([''], image_embed_guidance_scale=1.0).astype(int) - unguided).max() <= 1
  assert np.abs(run([''], image_embed_guidance_scale=g).astype(int) - unguided).mean() > 1
  with pytest.raises(ValueError, match='image_embed_guidance_scale is a decoder setting'):
    unclip.validate(s.replace_stage('prior', image_embed_guidance_scale=1.0))
  with pytest.raises(ValueError, match='image_embed_guidance_scale must be finite'):
    unclip.validate(s.replace_stage('decoder', image_embed_guidance_scale=float('nan')))


def test_decoder_reranking_is_a_text_to_image_default(workdir):
  image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
  plain = sampling.UnCLIP.from_workdir(workdir)
  embeds = plain.encode_image(np.stack([image, image[::-1]]))
  u = sampling.UnCLIP.from_workdir(workdir)
  with u.decoder.task.stage_config.unlocked():
    u.decoder.task.stage_config.sample.num_candidates = 3
    u.decoder.task.stage_config.sample.image_embed_guidance_scale = 1.0
  assert u.default_settings().decoder.num_candidates == 3
  assert u.default_settings().decoder.image_embed_guidance_scale == 1.0
  for mode in ('decode', 'variations', 'interpolate', 'text_diff', 'inpaint'):
    assert u.default_settings(mode).decoder.num_candidates == 1, mode
    assert u.default_settings(mode).decoder.image_embed_guidance_scale is None, mode
  # Decodes (variations, interpolations, text diffs) guide as a config without the setting.
  np.testing.assert_array_equal(u.decode(embeds, seed=2), plain.decode(embeds, seed=2))
  # The manipulations run on these defaults: inpainting (one sample per image) does not
  # refuse, and interpolation's end frames are still the direct decodes.
  assert u.inpaint(image, np.ones((16, 16), bool), seed=1).shape == (1, 32, 32, 3)
  frames = u.interpolate(image, image[::-1], frames=3, seed=2)
  np.testing.assert_array_equal(frames[[0, -1]], u.decode(u.encode_image(
      np.stack([image, image[::-1]])), seed=2, same_noise=True))
