"""GaussianDiffusion: the forward process, training losses and the compiled samplers."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax.diffusion import losses
from dalle2_jax.diffusion import samplers
from dalle2_jax.diffusion import schedules

ModelFn = Callable[[jax.Array, jax.Array], jax.Array]


def _compute_dtype(*xs):
  """float64 if any input is float64 (tests with jax_enable_x64), else float32."""
  for x in xs:
    if x is not None and jnp.asarray(x).dtype == jnp.float64:
      return jnp.float64
  return jnp.float32


def _mean_flat(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
  """A discrete-time Gaussian diffusion with `timesteps` steps.

  Attributes:
    schedule: 'cosine' or 'linear' (see `schedules.get_betas`).
    timesteps: number of training steps T; models see integer t in [0, T).
    objective: what the model predicts: 'eps' (noise), 'x0' (clean sample) or 'v'
      (v = sqrt(a) eps - sqrt(1 - a) x0, Salimans & Ho 2022).
    learned_variance: the model also outputs v in [-1, 1] per element (channels doubled on the
      last axis) interpolating the log variance between the posterior variance and beta; the
      loss is then the hybrid L_simple + vlb_weight * L_vlb (Nichol & Dhariwal 2021).
    vlb_weight: lambda of the hybrid loss (0.001 in improved DDPM).
    variance: sampling variance without learned variance: 'fixed_small' (posterior) or
      'fixed_large' (beta).
    discretized_nll: the t=0 term of L_vlb is the discretized Gaussian log-likelihood of 8-bit
      images in [-1, 1] (True) or a continuous Gaussian log density (False, e.g. embeddings).
    loss_weight: how L_simple weighs the timesteps, whatever the model predicts. Written as a
      weight w(t) on the squared x0 error: 'x0' w = 1, 'eps' w = SNR(t), 'v' w = 1 + SNR(t),
      with SNR(t) = a_t / (1 - a_t); '' = the objective's own (plain MSE of its target).
    loss_weight_cap: w(t) is capped at this value (0 = no cap). loss_weight='eps' with cap
      gamma is Min-SNR-gamma (Hang et al. 2023); 'v' with a cap keeps x0's weight near pure
      noise and caps v's extra weight near the data.
  """

  schedule: str = 'cosine'
  timesteps: int = 1000
  objective: str = 'eps'
  learned_variance: bool = False
  vlb_weight: float = 0.001
  variance: str = 'fixed_small'
  discretized_nll: bool = True
  loss_weight: str = ''
  loss_weight_cap: float = 0.0

  def __post_init__(self):
    if self.objective not in samplers.OBJECTIVES:
      raise ValueError(f'Unknown diffusion.objective {self.objective!r}; use one of '
                       f'{samplers.OBJECTIVES}.')
    if self.variance not in ('fixed_small', 'fixed_large'):
      raise ValueError(f"Unknown diffusion.variance {self.variance!r}; use 'fixed_small' or "
                       "'fixed_large'.")
    if self.loss_weight not in ('',) + samplers.OBJECTIVES:
      raise ValueError(f'Unknown diffusion.loss_weight {self.loss_weight!r}; use one of '
                       f"{samplers.OBJECTIVES} or '' (the objective's own).")
    if self.loss_weight_cap < 0:
      raise ValueError(f'diffusion.loss_weight_cap must be >= 0 (0 = no cap), not '
                       f'{self.loss_weight_cap}.')
    betas = schedules.get_betas(self.schedule, self.timesteps)
    acp = np.cumprod(1.0 - betas)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
    tables = dict(
        betas=betas,
        alphas_cumprod=acp,
        alphas_cumprod_prev=acp_prev,
        sqrt_alphas_cumprod=np.sqrt(acp),
        sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - acp),
        posterior_variance=post_var,
        # log of the posterior variance with the t=0 entry (0) replaced by the t=1 one
        posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:]))
        if self.timesteps > 1 else np.log(np.maximum(post_var, 1e-20)),
        posterior_mean_coef1=betas * np.sqrt(acp_prev) / (1.0 - acp),
        posterior_mean_coef2=(1.0 - acp_prev) * np.sqrt(1.0 - betas) / (1.0 - acp),
        log_betas=np.log(betas),
    )
    # The MSE of each objective's target is the squared x0 error times its own weight.
    snr = acp / (1.0 - acp)
    x0_weight = {'x0': np.ones_like(snr), 'eps': snr, 'v': 1.0 + snr}
    weight = x0_weight[self.loss_weight or self.objective]
    if self.loss_weight_cap:
      weight = np.minimum(weight, self.loss_weight_cap)
    tables['loss_weight'] = weight / x0_weight[self.objective]
    object.__setattr__(self, '_tables', tables)

  @classmethod
  def from_config(cls, config: Any) -> 'GaussianDiffusion':
    """From a config section (ConfigDict or dict) with the dataclass fields; others rejected."""
    cfg = dict(config.to_dict() if hasattr(config, 'to_dict') else config)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(cfg) - names
    if unknown:
      raise ValueError(f'Unknown diffusion config fields {sorted(unknown)}; known: '
                       f'{sorted(names)}.')
    return cls(**cfg)

  # --- tables ----------------------------------------------------------------------------
  def table(self, name: str) -> np.ndarray:
    """A float64 numpy table [T]: betas, alphas_cumprod, posterior_variance, ..."""
    return self._tables[name]

  @property
  def alphas_cumprod(self) -> np.ndarray:
    return self._tables['alphas_cumprod']

  def _take(self, name, t, ndim, dtype):
    vals = jnp.asarray(self._tables[name], dtype)[t]
    return vals.reshape(vals.shape + (1,) * (ndim - vals.ndim))

  def sample_timesteps(self, rng, batch_size: int) -> jax.Array:
    """Uniform int32 timesteps in [0, T)."""
    return jax.random.randint(rng, (batch_size,), 0, self.timesteps, dtype=jnp.int32)

  # --- forward process -------------------------------------------------------------------
  def q_sample(self, x0, t, noise):
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise (float32, or float64 for float64 inputs)."""
    dtype = _compute_dtype(x0, noise)
    x0, noise = jnp.asarray(x0, dtype), jnp.asarray(noise, dtype)
    return (self._take('sqrt_alphas_cumprod', t, x0.ndim, dtype) * x0
            + self._take('sqrt_one_minus_alphas_cumprod', t, x0.ndim, dtype) * noise)

  def v_target(self, x0, t, noise):
    dtype = _compute_dtype(x0, noise)
    x0, noise = jnp.asarray(x0, dtype), jnp.asarray(noise, dtype)
    return (self._take('sqrt_alphas_cumprod', t, x0.ndim, dtype) * noise
            - self._take('sqrt_one_minus_alphas_cumprod', t, x0.ndim, dtype) * x0)

  def q_posterior(self, x0, x_t, t):
    """Mean and clipped log variance of q(x_{t-1} | x_t, x0)."""
    dtype = _compute_dtype(x0, x_t)
    mean = (self._take('posterior_mean_coef1', t, x_t.ndim, dtype) * x0
            + self._take('posterior_mean_coef2', t, x_t.ndim, dtype) * x_t)
    return mean, self._take('posterior_log_variance_clipped', t, x_t.ndim, dtype)

  def predict_x0_eps(self, out, x_t, t):
    """(x0, eps) implied by the mean part of a model output at per-example timesteps t."""
    dtype = _compute_dtype(x_t)
    return samplers.predict_x0_eps(
        self.objective, jnp.asarray(out, dtype), x_t,
        self._take('sqrt_alphas_cumprod', t, x_t.ndim, dtype),
        self._take('sqrt_one_minus_alphas_cumprod', t, x_t.ndim, dtype))

  # --- training --------------------------------------------------------------------------
  def training_losses(self, model_fn: ModelFn, x0, t, noise
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-example losses for x_t = q_sample(x0, t, noise) and prediction model_fn(x_t, t).

    Everything after the model call is float32 (the model may compute in bfloat16).
    Returns (loss [B], terms) where terms has 'mse' [B] (L_simple before `loss_weight`, mean
    over non-batch axes), 'vlb' [B] (bits per dimension of the L_t term; only with learned
    variance) and 'pred_x0' (the model's x0 prediction, stop-gradient, float32, like x0).
    """
    dtype = _compute_dtype(x0, noise)
    x0, noise = jnp.asarray(x0, dtype), jnp.asarray(noise, dtype)
    x_t = self.q_sample(x0, t, noise)
    out = jnp.asarray(model_fn(x_t, t)).astype(dtype)
    if self.learned_variance and out.shape[-1] != 2 * x0.shape[-1]:
      raise ValueError(f'learned_variance=True needs a model output with 2x the channels of x0 '
                       f'on the last axis: got {out.shape} for x0 {x0.shape}.')
    if not self.learned_variance and out.shape != x0.shape:
      raise ValueError(f'Model output shape {out.shape} != x0 shape {x0.shape}.')
    out, v = samplers.split_output(out, self.learned_variance)
    target = {'eps': noise, 'x0': x0, 'v': None}[self.objective]
    if self.objective == 'v':
      target = self.v_target(x0, t, noise)
    mse = _mean_flat(jnp.square(out - target))
    pred_x0, _ = self.predict_x0_eps(jax.lax.stop_gradient(out), x_t, t)
    terms = {'mse': mse, 'pred_x0': pred_x0}
    loss = mse
    if self.loss_weight or self.loss_weight_cap:
      loss = mse * self._take('loss_weight', t, 1, dtype)
    if self.learned_variance:
      vlb = self._vlb_term(pred_x0, v, x0, x_t, t)
      terms['vlb'] = vlb
      loss = mse + self.vlb_weight * vlb
    return loss, terms

  def _vlb_term(self, pred_x0, v, x0, x_t, t):
    """L_t in bits/dim with a stop-gradient mean: only the variance learns from it."""
    model_mean, min_log = self.q_posterior(pred_x0, x_t, t)
    true_mean, true_log_var = self.q_posterior(x0, x_t, t)
    max_log = self._take('log_betas', t, x_t.ndim, x_t.dtype)
    frac = (v + 1) / 2
    model_log_var = frac * max_log + (1 - frac) * min_log
    kl = _mean_flat(losses.normal_kl(true_mean, true_log_var, model_mean, model_log_var))
    loglik = (losses.discretized_gaussian_log_likelihood if self.discretized_nll
              else losses.gaussian_log_likelihood)
    nll = -_mean_flat(loglik(x0, model_mean, 0.5 * model_log_var))
    return jnp.where(t == 0, nll, kl) / np.log(2.0)

  # --- sampling --------------------------------------------------------------------------
  def sampling_timesteps(self, steps: int | None = None,
                         spacing: str | Sequence[int] = 'trailing') -> np.ndarray:
    return schedules.spaced_timesteps(self.timesteps, steps, spacing)

  def sample(self, model_fn: ModelFn, shape: Sequence[int], rng: jax.Array, *,
             sampler: str = 'ddim', steps: int | None = None,
             spacing: str | Sequence[int] = 'trailing', eta: float = 0.0,
             guidance_scale: float | jax.Array | None = 1.0,
             guidance_interval: tuple[int, int] | None = None,
             image_embed_guidance_scale: float | None = None, thresholding: str = 'none',
             dynamic_threshold_percentile: float = 0.995,
             dynamic_threshold_max: float = float('inf'),
             x_T: jax.Array | None = None, dtype=None) -> jax.Array:
    """Draws samples; one `lax.scan` over the steps (traceable under jit).

    Args:
      model_fn: model_fn(x_t, t) -> output like in training (t: int32 [B] in the training grid).
        With guidance it is called as model_fn(x_t, t, drop_cond=bool[2B]); see
        `classifier_free_guidance`.
      shape: [B, ...] of the samples.
      rng: PRNG key (initial noise and, for ddpm / ddim with eta > 0, the step noise).
      sampler: 'ddpm' (ancestral), 'ddim' (with eta) or 'dpmpp_2m'.
      steps: number of model calls (respaced); None = all T.
      spacing: 'trailing' | 'leading' | 'linspace' | explicit timesteps
        (see `schedules.spaced_timesteps`).
      eta: DDIM stochasticity (0 = deterministic).
      guidance_scale: classifier-free guidance scale; 1.0 or None = one unguided model call per
        step. A Python number 1.0 skips the doubled batch (unless image_embed_guidance_scale
        guides); anything else (including traced values) runs the guided doubled batch.
      guidance_interval: (lo, hi) = guide only the steps with lo <= t < hi (training grid);
        the other steps make one conditional model call. None = every step.
      image_embed_guidance_scale: a separate scale for the decoder's CLIP image embedding,
        guidance_scale then being the caption's (`classifier_free_guidance`); None = one
        scale for both.
      thresholding: 'none' | 'static' | 'dynamic' on the predicted x0 at every step.
      x_T: the starting noise (default: drawn from rng).
      dtype: float32 (default) or float64 for the sampler state.
    Returns:
      The final samples [B, ...] in `dtype`.
    """
    if sampler not in samplers.SAMPLERS:
      raise ValueError(f'Unknown sampler {sampler!r}; use one of {samplers.SAMPLERS}.')
    if thresholding not in samplers.THRESHOLDINGS:
      raise ValueError(f'Unknown thresholding {thresholding!r}; use one of '
                       f'{samplers.THRESHOLDINGS}.')
    dtype = dtype or _compute_dtype(x_T)
    shape = tuple(shape)
    rng_init, rng_steps = jax.random.split(rng)
    if x_T is None:
      x_T = jax.random.normal(rng_init, shape, dtype)
    x_T = jnp.asarray(x_T, dtype)
    ts = self.sampling_timesteps(steps, spacing)
    guided = samplers.needs_guidance(guidance_scale, image_embed_guidance_scale)
    guided_fn = (samplers.classifier_free_guidance(
        model_fn, guidance_scale, self.learned_variance, guidance_interval,
        image_embed_guidance_scale) if guided else model_fn)
    is_guided = samplers.guided_steps(np.asarray(ts), guidance_interval) & guided
    coefs = samplers.sampler_coefficients(self.alphas_cumprod, ts)
    xs = {k: jnp.asarray(v, jnp.int32 if k == 't' else bool if k == 'last' else dtype)
          for k, v in coefs.items()}
    xs['rng'] = jax.random.split(rng_steps, len(ts))
    kw = dict(objective=self.objective, learned_variance=self.learned_variance,
              thresholding=thresholding, percentile=dynamic_threshold_percentile,
              max_value=dynamic_threshold_max)
    batch = shape[0]
    zero_noise = sampler == 'dpmpp_2m' or (
        sampler == 'ddim' and isinstance(eta, (int, float)) and eta == 0)

    def body(fn, carry, c):
      x, x0_before = carry
      t = jnp.full((batch,), c['t'], jnp.int32)
      out = jnp.asarray(fn(x, t)).astype(dtype)
      if zero_noise:
        noise = jnp.zeros(shape, dtype)
      else:
        noise = jax.random.normal(c['rng'], shape, dtype)
        noise = jnp.where(c['last'], jnp.zeros_like(noise), noise)
      if sampler == 'dpmpp_2m':
        x, x0 = samplers.dpmpp_2m_step(out, x, c, x0_before, **kw)
      elif sampler == 'ddpm':
        x, x0 = samplers.ddpm_step(out, x, c, noise, variance=self.variance, **kw)
      else:
        x, x0 = samplers.ddim_step(out, x, c, noise, eta=eta, **kw)
      return (x, x0), None

    # One scan per run of steps that are all guided or all unguided, so that steps outside
    # a guidance interval skip the doubled batch.
    carry = (x_T, jnp.zeros(shape, dtype))
    bounds = [0] + [i for i in range(1, len(ts)) if is_guided[i] != is_guided[i - 1]] + [len(ts)]
    for start, end in zip(bounds[:-1], bounds[1:]):
      fn = guided_fn if is_guided[start] else model_fn
      carry, _ = jax.lax.scan(functools.partial(body, fn), carry,
                              {k: v[start:end] for k, v in xs.items()})
    return carry[0]
