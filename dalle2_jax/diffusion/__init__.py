"""Gaussian diffusion math in plain JAX (no Flax): schedules, losses, samplers, guidance.

Usage::

  from dalle2_jax import diffusion
  d = diffusion.GaussianDiffusion.from_config(stage_config.diffusion)
  # fields: schedule ('cosine'|'linear'), timesteps (1000), objective ('eps'|'x0'|'v'),
  #         learned_variance (bool), vlb_weight (0.001), variance ('fixed_small'|'fixed_large'),
  #         discretized_nll (True: 8-bit images at t=0 of L_vlb), loss_weight ('' | 'x0' |
  #         'eps' | 'v': the timestep weighting of L_simple), loss_weight_cap (0 = none)

  t = d.sample_timesteps(rng, batch)                      # int32 [B] in [0, T)
  x_t = d.q_sample(x0, t, noise)
  loss, terms = d.training_losses(model_fn, x0, t, noise)
  # model_fn(x_t, t) -> prediction of `objective` (with learned_variance: 2x channels on the
  # last axis, [mean part, v]); loss: float32 [B]; terms: 'mse' [B], 'vlb' [B] (learned
  # variance only; bits/dim), 'pred_x0' (stop-gradient x0 prediction).

  x0 = d.sample(model_fn, shape, rng, sampler='ddim', steps=64, eta=0.0,
                guidance_scale=1.0, guidance_interval=None, thresholding='none', x_T=None,
                spacing='trailing')

Conventions:
* Timesteps given to models are always integers in the original T-step grid, also when a
  sampler uses fewer steps (respacing maps its indices back; `spacing` picks which steps:
  'trailing' (default, starts at T-1), 'leading', 'linspace' (both ends, the paper's
  "strided" sampling), or an explicit list).
* Samplers: 'ddpm' (ancestral; learned variance is used when the model has it), 'ddim'
  (`eta`), 'dpmpp_2m' (DPM-Solver++ 2M). Each is a `lax.scan` over the steps (two or three
  with a guidance interval), so `jax.jit(lambda ...: d.sample(...))` compiles one program
  (one per step count).
* Classifier-free guidance: with guidance_scale != 1 the model is called once per step on a
  doubled batch as model_fn(x_t, t, drop_cond=bool[2B]) (first half conditional, second half
  with the null conditioning; repeat your conditioning with `repeat_batch(cond, x.shape[0])`).
  The guided output is uncond + s * (cond - uncond) on the mean part (whatever the
  objective), the learned-variance half is taken from the conditional half. Use
  `classifier_free_guidance(model_fn, s, learned_variance)` to get the guided model_fn(x, t).
  `guidance_interval=(lo, hi)` guides only the steps with lo <= t < hi; the others make one
  conditional call on the plain batch.
* Thresholding of x0 at every step: 'static' (clip to [-1, 1]) or 'dynamic' (Imagen,
  percentile 0.995), only for data in [-1, 1] (images), not embeddings.
* Schedules are computed in float64 numpy and cast at use; losses and sampler state are
  float32 whatever the model's compute dtype (float64 when given float64 inputs, for tests).
* Single steps (`ddpm_step`, `ddim_step`, `dpmpp_2m_step`, with per-step coefficients from
  `sampler_coefficients(d.alphas_cumprod, timesteps)`) match diffusers' schedulers; see
  tests/test_diffusion_parity.py and scripts/make_diffusion_fixtures.py.
"""

from dalle2_jax.diffusion.gaussian import GaussianDiffusion
from dalle2_jax.diffusion.samplers import classifier_free_guidance
from dalle2_jax.diffusion.samplers import ddim_step
from dalle2_jax.diffusion.samplers import ddpm_step
from dalle2_jax.diffusion.samplers import dpmpp_2m_step
from dalle2_jax.diffusion.samplers import predict_x0_eps
from dalle2_jax.diffusion.samplers import repeat_batch
from dalle2_jax.diffusion.samplers import sampler_coefficients
from dalle2_jax.diffusion.samplers import threshold
from dalle2_jax.diffusion.schedules import get_betas
from dalle2_jax.diffusion.schedules import spaced_timesteps

__all__ = [
    'GaussianDiffusion', 'classifier_free_guidance', 'ddim_step', 'ddpm_step',
    'dpmpp_2m_step', 'predict_x0_eps', 'repeat_batch', 'sampler_coefficients', 'threshold', 'get_betas',
    'spaced_timesteps',
]
