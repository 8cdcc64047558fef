"""Single sampler steps (pure jnp) and the thresholding / guidance helpers.

A respaced sampler visits descending timesteps t_0 > t_1 > ... > t_{S-1} of the training grid
and goes from each to the next, and from the last to the clean sample. Each step only needs
`a_t = alphas_cumprod[t_i]` and `a_prev = alphas_cumprod[t_{i+1}]` (1.0 after the last step),
so one step function serves every spacing; `sampler_coefficients` turns them into per-step
coefficients on the host in float64 (so float32 sampling keeps its digits near t = 0). The steps follow diffusers' `DDPMScheduler`,
`DDIMScheduler` (set_alpha_to_one=True, use_clipped_model_output=<thresholding on>) and
`DPMSolverMultistepScheduler` (algorithm_type='dpmsolver++', solver_order=2,
solver_type='midpoint', final_sigmas_type='zero'); tests/test_diffusion_parity.py checks them
against golden outputs of those classes.

Shapes: `x` and the mean part of `out` are [B, ...]; with learned variance `out` has twice the
channels on the last axis (mean first, then the variance interpolation v in [-1, 1]).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

OBJECTIVES = ('eps', 'x0', 'v')
THRESHOLDINGS = ('none', 'static', 'dynamic')
SAMPLERS = ('ddpm', 'ddim', 'dpmpp_2m')


def split_output(out, learned_variance: bool):
  """(mean_part, v) of a model output; v is None without learned variance."""
  if not learned_variance:
    return out, None
  if out.shape[-1] % 2:
    raise ValueError(f'With learned_variance the model must output 2x channels on the last axis '
                     f'(mean, variance interpolation); got {out.shape}.')
  return jnp.split(out, 2, axis=-1)


def predict_x0_eps(objective: str, out, x, sqrt_a, sqrt_1ma):
  """(x0, eps) implied by a model output under `objective`.

  sqrt_a = sqrt(alphas_cumprod[t]) and sqrt_1ma = sqrt(1 - alphas_cumprod[t]), both taken
  from float64 tables (computing 1 - a in float32 loses most digits near t = 0).
  """
  if objective == 'eps':
    return (x - sqrt_1ma * out) / sqrt_a, out
  if objective == 'x0':
    return out, (x - sqrt_a * out) / sqrt_1ma
  if objective == 'v':
    return sqrt_a * x - sqrt_1ma * out, sqrt_a * out + sqrt_1ma * x
  raise ValueError(f'Unknown diffusion.objective {objective!r}; use one of {OBJECTIVES}.')


def threshold(x0, mode: str = 'none', percentile: float = 0.995, max_value: float = jnp.inf):
  """Thresholds a predicted clean sample.

  'static': clip to [-1, 1]. 'dynamic' (Imagen): per example, s = the `percentile` quantile of
  |x0| over all non-batch axes, clamped to [1, max_value]; x0 = clip(x0, -s, s) / s.
  """
  if mode == 'none':
    return x0
  if mode == 'static':
    return jnp.clip(x0, -1.0, 1.0)
  if mode == 'dynamic':
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.quantile(flat, percentile, axis=1)
    s = jnp.clip(s, 1.0, max_value).astype(x0.dtype)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) / s
  raise ValueError(f'Unknown thresholding {mode!r}; use one of {THRESHOLDINGS}.')


def sampler_coefficients(alphas_cumprod: np.ndarray, timesteps: np.ndarray
                         ) -> dict[str, np.ndarray]:
  """Per-step coefficients [S] of all samplers, computed on the host in float64.

  Step i goes from timesteps[i] (alphas_cumprod a_t) to timesteps[i + 1] (a_prev), and the
  last step to the clean sample (a_prev = 1). Index the result per step
  (`jax.tree.map(lambda c: c[i], coefs)`) and cast to the compute dtype.
  """
  acp = np.asarray(alphas_cumprod, np.float64)
  ts = np.asarray(timesteps, np.int64)
  a_t = acp[ts]
  a_prev = np.append(acp[ts[1:]], 1.0)
  one_minus_a_t, one_minus_a_prev = 1.0 - a_t, 1.0 - a_prev
  beta = 1.0 - a_t / a_prev                           # of the respaced chain
  post_var = np.maximum(one_minus_a_prev / one_minus_a_t * beta, 1e-20)
  with np.errstate(divide='ignore', invalid='ignore'):
    lam_s = 0.5 * (np.log(a_t) - np.log(one_minus_a_t))
    lam_t = 0.5 * (np.log(a_prev) - np.log(one_minus_a_prev))   # +inf at the clean end
    h = lam_t - lam_s
    phi = -np.sqrt(a_prev) * np.expm1(-h)
    lam_before = np.append(np.nan, lam_s[:-1])
    r0 = (lam_s - lam_before) / h
    c2 = 0.5 / r0
  num = len(ts)
  second_order = (np.arange(num) > 0) & (np.arange(num) < num - 1)
  return dict(
      t=ts,
      sqrt_a=np.sqrt(a_t),
      sqrt_1ma=np.sqrt(one_minus_a_t),
      # ddpm: posterior mean coefficients and log variances
      coef_x0=np.sqrt(a_prev) * beta / one_minus_a_t,
      coef_xt=np.sqrt(1.0 - beta) * one_minus_a_prev / one_minus_a_t,
      log_beta=np.log(beta),
      log_post_var=np.log(post_var),
      # ddim
      sqrt_a_prev=np.sqrt(a_prev),
      one_minus_a_prev=one_minus_a_prev,
      ddim_var=post_var * (one_minus_a_prev > 0),
      # dpm-solver++ (2M, midpoint): x' = ratio x + phi (x0 + c2 (x0 - x0_before))
      dpm_ratio=np.sqrt(one_minus_a_prev) / np.sqrt(one_minus_a_t),
      dpm_phi=phi,
      dpm_c2=np.where(second_order, c2, 0.0),
      last=np.arange(num) == num - 1,
  )


def _x0_eps(objective, out, x, c, thresholding, percentile, max_value):
  x0, eps = predict_x0_eps(objective, out, x, c['sqrt_a'], c['sqrt_1ma'])
  if thresholding != 'none':
    x0 = threshold(x0, thresholding, percentile, max_value)
    eps = (x - c['sqrt_a'] * x0) / c['sqrt_1ma']
  return x0, eps


def ddpm_step(out, x, c, noise, *, objective: str, learned_variance: bool = False,
              variance: str = 'fixed_small', thresholding: str = 'none',
              percentile: float = 0.995, max_value: float = jnp.inf):
  """One ancestral step x_t -> x_prev of the (respaced) posterior q(x_prev | x_t, x0_pred).

  `c`: this step's `sampler_coefficients`. `noise` is standard normal like x; pass zeros on
  the last step (no noise is added there). The variance is the posterior variance
  ('fixed_small'), beta ('fixed_large'), or with learned variance
  exp(frac * log(beta) + (1 - frac) * log(posterior variance)), frac = (v + 1) / 2.
  Returns (x_prev, x0_pred).
  """
  out, v = split_output(out, learned_variance)
  x0, _ = _x0_eps(objective, out, x, c, thresholding, percentile, max_value)
  mean = c['coef_x0'] * x0 + c['coef_xt'] * x
  if learned_variance:
    frac = (v + 1) / 2
    log_var = frac * c['log_beta'] + (1 - frac) * c['log_post_var']
  elif variance == 'fixed_small':
    log_var = c['log_post_var']
  elif variance == 'fixed_large':
    log_var = c['log_beta']
  else:
    raise ValueError(f"Unknown diffusion.variance {variance!r}; use 'fixed_small' or "
                     "'fixed_large' (or learned_variance=True).")
  return mean + jnp.exp(0.5 * log_var) * noise, x0


def ddim_step(out, x, c, noise, *, objective: str, eta=0.0,
              learned_variance: bool = False, thresholding: str = 'none',
              percentile: float = 0.995, max_value: float = jnp.inf):
  """One DDIM step (Song et al. 2021); eta=0 is deterministic, eta=1 has DDPM's variance.

  With thresholding the eps used for the direction is recomputed from the thresholded x0
  (ADM; diffusers' use_clipped_model_output=True). Returns (x_prev, x0_pred).
  """
  out, _ = split_output(out, learned_variance)
  x0, eps = _x0_eps(objective, out, x, c, thresholding, percentile, max_value)
  sigma2 = jnp.square(eta) * c['ddim_var']
  x_prev = (c['sqrt_a_prev'] * x0
            + jnp.sqrt(jnp.maximum(c['one_minus_a_prev'] - sigma2, 0.0)) * eps
            + jnp.sqrt(sigma2) * noise)
  return x_prev, x0


def dpmpp_2m_step(out, x, c, x0_before, *, objective: str, learned_variance: bool = False,
                  thresholding: str = 'none', percentile: float = 0.995,
                  max_value: float = jnp.inf):
  """One DPM-Solver++(2M) step (Lu et al. 2022), data-prediction form, midpoint variant.

  `x0_before` is the previous step's x0 prediction (ignored on the first step, which is first
  order, like the last one to the clean sample). Returns (x_prev, x0_pred).
  """
  out, _ = split_output(out, learned_variance)
  x0, _ = _x0_eps(objective, out, x, c, thresholding, percentile, max_value)
  x_prev = c['dpm_ratio'] * x + c['dpm_phi'] * (x0 + c['dpm_c2'] * (x0 - x0_before))
  return x_prev, x0


def guided_steps(ts, interval):
  """bool, shaped like `ts` (training-grid timesteps, numpy or jax): which get guidance;
  interval = (lo, hi) guides lo <= t < hi, None guides every step."""
  if interval is None:
    return np.ones(np.shape(ts), bool)
  return (ts >= interval[0]) & (ts < interval[1])


def needs_guidance(guidance_scale, image_embed_guidance_scale=None) -> bool:
  """Whether sampling runs `classifier_free_guidance` at all: not for a guidance_scale of
  None or the Python number 1.0 unless image_embed_guidance_scale guides (is not None or 1);
  a traced scale always does."""
  if guidance_scale is None:
    return False
  return not (isinstance(guidance_scale, (int, float)) and guidance_scale == 1.0
              and image_embed_guidance_scale in (None, 1.0))


def classifier_free_guidance(model_fn: Callable, guidance_scale, learned_variance: bool = False,
                             interval: tuple[int, int] | None = None,
                             image_embed_guidance_scale: float | None = None) -> Callable:
  """Wraps a conditional model into a guided model_fn(x_t, t) (Ho & Salimans 2022).

  `model_fn(x, t, drop_cond=...)` is called once per step on a doubled batch: rows [:B] with
  drop_cond False (conditional), rows [B:] with drop_cond True (null conditioning). The model
  must repeat its own conditioning to the batch it is given (see `repeat_batch`). The guided
  output is uncond + guidance_scale * (cond - uncond) on the mean part; with learned variance
  the variance half is taken from the conditional rows.

  interval = (lo, hi): guidance only at timesteps lo <= t < hi, elsewhere scale 1 (the
  conditional output); Kynkäänniemi et al. 2024 find guidance at high noise mostly costs
  diversity. `GaussianDiffusion.sample` skips the doubled batch outside the interval.

  image_embed_guidance_scale (the decoder, whose conditioning is a CLIP image embedding and a
  caption): the two conditions get separate scales, as InstructPix2Pix (Brooks et al. 2023)
  guides its image and text conditions:
    uncond + image_embed_guidance_scale * (embed - uncond) + guidance_scale * (cond - embed)
  where `embed` is the output with the caption dropped and the embedding kept: model_fn is
  also given drop_text=bool[rows]. None or equal to guidance_scale: plain guidance (the
  formula with equal scales). 1: the caption guided given the embedding, two rows an example
  as plain guidance; otherwise three.
  """
  s_embed = image_embed_guidance_scale
  if s_embed is not None and not isinstance(s_embed, (int, float)):
    raise TypeError('image_embed_guidance_scale must be a Python number or None (it decides '
                    f'the rows the model is called on), got {type(s_embed).__name__}.')
  if isinstance(guidance_scale, (int, float)) and s_embed == guidance_scale:
    s_embed = None   # one scale for both: plain guidance, two rows
  # Rows of the model call, as (drop_cond, drop_text) per block of B rows.
  if s_embed is None:
    blocks = {'cond': (False, False), 'uncond': (True, True)}
  elif s_embed == 1:
    blocks = {'cond': (False, False), 'embed': (False, True)}
  else:
    blocks = {'cond': (False, False), 'uncond': (True, True), 'embed': (False, True)}

  def guided(x, t):
    b = x.shape[0]
    n = len(blocks)
    drop = jnp.repeat(jnp.array([d for d, _ in blocks.values()]), b)
    kw = {}
    if s_embed is not None:
      kw['drop_text'] = jnp.repeat(jnp.array([d for _, d in blocks.values()]), b)
    out = model_fn(jnp.concatenate([x] * n), jnp.concatenate([t] * n), drop_cond=drop, **kw)
    parts = {k: split_output(out[i * b:(i + 1) * b], learned_variance)
             for i, k in enumerate(blocks)}
    cond_mean, cond_v = parts['cond']
    s = jnp.asarray(guidance_scale, cond_mean.dtype)
    se = jnp.asarray(s if s_embed is None else s_embed, cond_mean.dtype)
    if interval is not None:
      on = guided_steps(t, interval).reshape((b,) + (1,) * (cond_mean.ndim - 1))
      s, se = (jnp.where(on, v, jnp.ones_like(v)) for v in (s, se))
    if s_embed is None:
      uncond_mean = parts['uncond'][0]
      mean = uncond_mean + s * (cond_mean - uncond_mean)
    else:
      embed_mean = parts['embed'][0]
      mean = embed_mean + s * (cond_mean - embed_mean)
      if 'uncond' in parts:
        mean = mean + (se - 1) * (embed_mean - parts['uncond'][0])
    return mean if cond_v is None else jnp.concatenate([mean, cond_v], axis=-1)
  return guided


def repeat_batch(tree, batch_size: int):
  """Repeats every leaf along axis 0 (tiled) up to `batch_size` rows (a multiple of its own).

  Lets a model_fn accept the doubled batch of classifier-free guidance:
    cond = repeat_batch(cond, x.shape[0]).
  """
  def rep(a):
    n = a.shape[0]
    if batch_size % n:
      raise ValueError(f'Cannot repeat a batch of {n} to {batch_size} rows.')
    return jnp.tile(a, (batch_size // n,) + (1,) * (a.ndim - 1))
  return jax.tree.map(rep, tree)
