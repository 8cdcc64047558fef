"""The sampler's model-free parts: settings, embedding math, output files."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from dalle2_jax import sampling


def test_slerp_endpoints_norms_and_angles():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(3, 16)), 2.0 * rng.normal(size=(3, 16))
  np.testing.assert_array_equal(sampling.slerp(a, b, 0.0), a.astype(np.float32))
  np.testing.assert_array_equal(sampling.slerp(a, b, 1.0), b.astype(np.float32))
  mid = np.asarray(sampling.slerp(a, b, 0.5))
  na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
  np.testing.assert_allclose(np.linalg.norm(mid, axis=-1), (na + nb) / 2, rtol=1e-5)

  def angle(x, y):
    return np.arccos(np.sum(x * y, -1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1))
  # The midpoint is equally far (in angle) from both ends, at half the total angle.
  np.testing.assert_allclose(angle(a, mid), angle(a, b) / 2, rtol=1e-4)
  np.testing.assert_allclose(angle(mid, b), angle(a, b) / 2, rtol=1e-4)
  # Per-row t, and parallel inputs fall back to linear interpolation.
  ts = np.array([0.0, 0.25, 1.0])
  out = np.asarray(sampling.slerp(a, b, ts))
  np.testing.assert_allclose(out[0], a[0], rtol=1e-6)
  np.testing.assert_allclose(out[2], b[2], rtol=1e-6)
  np.testing.assert_allclose(sampling.slerp(a[0], 3 * a[0], 0.5), 2 * a[0], rtol=1e-5)


def test_text_diff_embed():
  rng = np.random.default_rng(1)
  z_i = rng.normal(size=(2, 8))
  t_from, t_to = rng.normal(size=(8,)), rng.normal(size=(8,))
  np.testing.assert_allclose(sampling.text_diff_embed(z_i, t_from, t_to, 0.0), z_i,
                             rtol=1e-6)
  z_d = (t_to - t_from) / np.linalg.norm(t_to - t_from)
  end = np.asarray(sampling.text_diff_embed(z_i, t_from, t_to, 1.0))
  np.testing.assert_allclose(end, z_d * np.linalg.norm(z_i, axis=-1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  # Moving along theta increases the cosine with the text diff direction monotonically.
  cos = [np.asarray(sampling.text_diff_embed(z_i, t_from, t_to, th))[0] @ z_d
         / np.linalg.norm(np.asarray(sampling.text_diff_embed(z_i, t_from, t_to, th))[0])
         for th in (0.0, 0.25, 0.5)]
  assert cos[0] < cos[1] < cos[2]


def test_settings_presets_and_validation():
  s = sampling.Settings(upsamplers=(sampling.StageSampling(steps=4),
                                    sampling.StageSampling(steps=4)))
  fast = s.with_preset('fast')
  assert (fast.prior.steps, fast.decoder.steps) == (25, 25)
  assert [u.steps for u in fast.upsamplers] == [7, 7]
  paper = s.with_preset('paper')
  assert (paper.prior.steps, paper.decoder.steps) == (64, 250)
  assert [u.steps for u in paper.upsamplers] == [27, 15]
  assert [u.steps for u in s.with_upsampler_steps([3]).upsamplers] == [3, 3]
  with pytest.raises(ValueError, match='one per upsampler'):
    s.with_upsampler_steps([1, 2, 3])
  assert s.replace_stage('decoder', guidance_scale=None) == s   # None = keep
  assert s.replace_stage('decoder', guidance_scale=3.0).decoder.guidance_scale == 3.0
  hash(paper)   # usable as a jit cache key
  with pytest.raises(ValueError, match='decoder: steps=2000'):
    sampling.StageSampling(steps=2000).validate('decoder', timesteps=1000)
  with pytest.raises(ValueError, match='prior: sampler'):
    sampling.StageSampling(sampler='euler').validate('prior')
  with pytest.raises(ValueError, match='guidance_scale'):
    sampling.StageSampling(guidance_scale=-1.0).validate('decoder')
  with pytest.raises(ValueError, match='num_candidates'):
    sampling.StageSampling(num_candidates=0).validate('prior')
  with pytest.raises(ValueError, match='decoder: rerank_mirror'):
    sampling.StageSampling(rerank_mirror='yes').validate('decoder')
  sampling.StageSampling(guidance_interval=(0, 600)).validate('decoder', timesteps=1000)
  for bad in ((600, 0), (0,), (-1, 5), (0.0, 600)):
    with pytest.raises(ValueError, match='decoder: guidance_interval'):
      sampling.StageSampling(guidance_interval=bad).validate('decoder', timesteps=1000)
  with pytest.raises(ValueError, match='no step would be guided'):
    sampling.StageSampling(guidance_interval=(1000, 2000)).validate('decoder', timesteps=1000)
  assert sampling.parse_interval(['0', '600'], 'x') == (0, 600)
  assert sampling.parse_interval(None, 'x') is None
  for bad in (['600'], ['0', 'a'], ['0', '1', '2']):
    with pytest.raises(ValueError, match='--decoder_guidance_interval takes two integer'):
      sampling.parse_interval(bad, 'decoder_guidance_interval')


def test_to_uint8_round_trip():
  x = np.array([-1.5, -1.0, 0.0, 1.0, 2.0], np.float32)
  np.testing.assert_array_equal(sampling.to_uint8(x), [0, 0, 128, 255, 255])
  u = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(sampling.to_uint8(sampling.from_uint8(u)), u)


def test_write_samples(tmp_path):
  images = np.stack([np.full((8, 8, 3), 10 * i, np.uint8) for i in range(5)])
  records = [{'prompt': f'p{i}', 'index': i} for i in range(5)]
  paths = sampling.write_samples(str(tmp_path), images, records, ncols=2)
  assert [os.path.basename(p) for p in paths] == [f'{i:04d}.png' for i in range(5)]
  for i, p in enumerate(paths):
    np.testing.assert_array_equal(np.asarray(Image.open(p)), images[i])
  grid = np.asarray(Image.open(tmp_path / 'grid.png'))
  assert grid.shape == (3 * 10 + 2, 2 * 10 + 2, 3)
  np.testing.assert_array_equal(grid[2 + 10:2 + 18, 2 + 10:2 + 18], images[3])
  lines = [json.loads(l) for l in (tmp_path / 'samples.jsonl').read_text().splitlines()]
  assert [l['file'] for l in lines] == [f'{i:04d}.png' for i in range(5)]
  assert [l['prompt'] for l in lines] == [f'p{i}' for i in range(5)]
  # A second, smaller run into the same directory leaves no stale images behind.
  sampling.write_samples(str(tmp_path), images[:2], records[:2])
  assert sorted(os.listdir(tmp_path)) == ['0000.png', '0001.png', 'grid.png', 'samples.jsonl']


def test_load_image_errors_name_the_file(tmp_path):
  bad = tmp_path / 'not_an_image.png'
  bad.write_text('hello')
  with pytest.raises(ValueError, match='not_an_image.png'):
    sampling.load_image(str(bad))
  with pytest.raises(ValueError, match='missing.png'):
    sampling.load_image(str(tmp_path / 'missing.png'))
  good = tmp_path / 'good.png'
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(good)
  assert sampling.load_image(str(good), size=8).shape == (8, 8, 3)
