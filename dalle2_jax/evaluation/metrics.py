"""Sample-quality metrics in CLIP space: Fréchet distance and CLIP score.

Both work on embeddings (numpy arrays), so they do not care which CLIP made them; the
evaluation command (`python -m dalle2_jax.evaluate`) uses the run's own CLIP.

  fd = frechet_distance_from_embeddings(generated_image_embeds, real_image_embeds)
  score = clip_score(image_embeds, text_embeds)
"""

from __future__ import annotations

import numpy as np


def gaussian_stats(embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (unbiased, rows are samples) in float64."""
  x = np.asarray(embeds, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f'Need a [N >= 2, D] array of embeddings, got shape {x.shape}.')
  return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2).

  d^2 = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), where
  tr((sigma1 sigma2)^(1/2)) is computed as tr((s1^(1/2) sigma2 s1^(1/2))^(1/2)), a symmetric
  PSD matrix, so eigendecompositions suffice (no complex sqrtm, no scipy). Returns d^2, as
  FID does.
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f'Mismatched statistics: {mu1.shape} {sigma1.shape} vs '
                     f'{mu2.shape} {sigma2.shape}.')
  s1 = _sqrtm_psd(sigma1)
  middle = s1 @ sigma2 @ s1
  tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_from_embeddings(x: np.ndarray, y: np.ndarray) -> float:
  """Fréchet distance between Gaussians fitted to two sets of embeddings [N, D], [M, D]."""
  return frechet_distance(*gaussian_stats(x), *gaussian_stats(y))


def _normalize(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Row-wise cosine similarity of two [..., D] arrays (broadcast)."""
  return np.sum(_normalize(a) * _normalize(b), axis=-1)


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray) -> float:
  """Mean over pairs of 100 * max(cos(image_embed, text_embed), 0) (as torchmetrics)."""
  return float(np.mean(100.0 * np.maximum(cosine(image_embeds, text_embeds), 0.0)))
