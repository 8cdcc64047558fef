"""Noise schedules and timestep spacings (host-side numpy, float64).

All tables are computed once in float64 numpy and cast to the compute dtype where they are
used, so float32 sampling does not suffer from `1 - alphas_cumprod` cancellation near t=0.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

SCHEDULES = ('cosine', 'linear')
SPACINGS = ('trailing', 'leading', 'linspace')


def get_betas(schedule: str, timesteps: int = 1000, max_beta: float = 0.999) -> np.ndarray:
  """The betas of a named schedule, float64 [timesteps].

  'cosine': Nichol & Dhariwal (2021), alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2), s=0.008,
    betas clipped at `max_beta` (diffusers' 'squaredcos_cap_v2').
  'linear': Ho et al. (2020), 1e-4 .. 2e-2 for T=1000, scaled by 1000/T for other T
    (diffusers' 'linear' for T=1000).
  """
  if timesteps < 1:
    raise ValueError(f'diffusion.timesteps must be >= 1, got {timesteps}.')
  if schedule == 'cosine':
    def alpha_bar(x):
      return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = [min(1 - alpha_bar((i + 1) / timesteps) / alpha_bar(i / timesteps), max_beta)
             for i in range(timesteps)]
    return np.asarray(betas, dtype=np.float64)
  if schedule == 'linear':
    scale = 1000 / timesteps
    return np.linspace(scale * 1e-4, scale * 2e-2, timesteps, dtype=np.float64)
  raise ValueError(f'Unknown diffusion.schedule {schedule!r}; use one of {SCHEDULES}.')


def spaced_timesteps(num_timesteps: int, steps: int | None = None,
                     spacing: str | Sequence[int] = 'trailing') -> np.ndarray:
  """Descending int timesteps (in the original grid) a respaced sampler visits.

  The sampler goes from each timestep to the next one, and from the last one to the clean
  sample (alphas_cumprod = 1). `spacing` names follow diffusers (Lin et al. 2023, Table 2):
    'trailing':  round(arange(T, 0, -T/steps)) - 1, e.g. T=1000, 8 steps: 999, 874, ..., 124.
                 Starts at the noisiest step; the default.
    'leading':   arange(steps) * (T // steps), reversed, e.g. 900, 800, ..., 0.
    'linspace':  round(linspace(0, T-1, steps)), reversed: both ends included (the
                 "strided" sampling of improved DDPM / the unCLIP paper).
  or an explicit sequence of distinct timesteps (any order; sorted descending here).
  `steps=None` means every step (T-1, ..., 0).
  """
  if not isinstance(spacing, str):
    ts = np.unique(np.asarray(spacing, dtype=np.int64))[::-1]
    if ts.size == 0 or ts[0] >= num_timesteps or ts[-1] < 0:
      raise ValueError(f'Explicit timesteps must be a non-empty subset of [0, {num_timesteps}); '
                       f'got {list(spacing)}.')
    return ts.copy()
  if steps is None:
    steps = num_timesteps
  if not 1 <= steps <= num_timesteps:
    raise ValueError(f'Sampling steps must be in [1, {num_timesteps}] (the diffusion.timesteps '
                     f'of this model), got {steps}.')
  if spacing == 'trailing':
    ts = np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)).astype(np.int64) - 1
  elif spacing == 'leading':
    ts = (np.arange(steps) * (num_timesteps // steps)).round()[::-1].astype(np.int64)
  elif spacing == 'linspace':
    ts = np.linspace(0, num_timesteps - 1, steps).round()[::-1].astype(np.int64)
  else:
    raise ValueError(f'Unknown timestep spacing {spacing!r}; use one of {SPACINGS} or an '
                     'explicit list of timesteps.')
  if len(np.unique(ts)) != len(ts):
    raise ValueError(f'spacing {spacing!r} with {steps} steps repeats timesteps: {ts}.')
  return ts.copy()
