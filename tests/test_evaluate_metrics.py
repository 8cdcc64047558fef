"""Fréchet distance and CLIP score against closed forms."""

import numpy as np
import pytest

from dalle2_jax.evaluation import metrics


def _random_spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T + 0.1 * np.eye(d)


def test_frechet_distance_diagonal_closed_form():
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, -1.0])
  v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  got = metrics.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
  np.testing.assert_allclose(got, expected, rtol=1e-10)   # = 1 + 0 + 9 + 4 + 1 + 0


def test_frechet_distance_non_commuting_2x2_closed_form():
  # For 2x2 SPD matrices, tr sqrt(S1 S2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2)).
  rng = np.random.default_rng(0)
  s1, s2 = _random_spd(rng, 2), _random_spd(rng, 2)
  mu1, mu2 = rng.normal(size=2), rng.normal(size=2)
  tr_sqrt = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), expected,
                             rtol=1e-9)


def test_frechet_distance_properties():
  rng = np.random.default_rng(1)
  s1, s2 = _random_spd(rng, 6), _random_spd(rng, 6)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-8
  d12 = metrics.frechet_distance(mu1, s1, mu2, s2)
  d21 = metrics.frechet_distance(mu2, s2, mu1, s1)
  assert d12 > 0
  np.testing.assert_allclose(d12, d21, rtol=1e-8)


def test_frechet_distance_from_samples_converges():
  rng = np.random.default_rng(2)
  d = 4
  s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
  mu1, mu2 = np.zeros(d), np.ones(d)
  x = rng.multivariate_normal(mu1, s1, size=20000)
  y = rng.multivariate_normal(mu2, s2, size=20000)
  expected = metrics.frechet_distance(mu1, s1, mu2, s2)
  got = metrics.frechet_distance_from_embeddings(x, y)
  np.testing.assert_allclose(got, expected, rtol=0.05)


def test_gaussian_stats_rejects_too_few():
  with pytest.raises(ValueError, match='N >= 2'):
    metrics.gaussian_stats(np.zeros((1, 3)))


def test_clip_score():
  img = np.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
  txt = np.array([[3.0, 0.0], [0.0, -1.0], [1.0, 0.0]])
  # cosines: 1, -1 (clipped to 0), 1/sqrt(2)
  np.testing.assert_allclose(metrics.clip_score(img, txt),
                             100 * (1 + 0 + 1 / np.sqrt(2)) / 3, rtol=1e-12)
