"""Gaussian KL and the discretized Gaussian log-likelihood (Nichol & Dhariwal 2021), float32.

Everything here upcasts to at least float32 and clamps logs and exponents so the variational
bound stays finite for extreme timesteps and low-precision model outputs.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_EXP_MAX = 60.0   # exp(60) ~ 1e26: far inside float32 range


def _f32(x):
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) elementwise, in nats."""
  mean1, logvar1, mean2, logvar2 = map(_f32, (mean1, logvar1, mean2, logvar2))
  return 0.5 * (-1.0 + logvar2 - logvar1
                + jnp.exp(jnp.clip(logvar1 - logvar2, -_EXP_MAX, _EXP_MAX))
                + jnp.square(mean1 - mean2) * jnp.exp(jnp.clip(-logvar2, -_EXP_MAX, _EXP_MAX)))


def approx_standard_normal_cdf(x):
  """The tanh approximation of the standard normal CDF used by improved DDPM."""
  return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
  """Log-likelihood of data in [-1, 1] quantised to 256 bins under N(means, exp(log_scales)^2).

  Elementwise, in nats. The edge bins extend to -inf / +inf.
  """
  x, means, log_scales = map(_f32, (x, means, log_scales))
  centered = x - means
  inv_stdv = jnp.exp(jnp.clip(-log_scales, -_EXP_MAX, _EXP_MAX))
  cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
  cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
  log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
  return jnp.where(x < -0.999, log_cdf_plus,
                   jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def gaussian_log_likelihood(x, means, log_scales):
  """Continuous Gaussian log density, elementwise (for data that is not 8-bit images)."""
  x, means, log_scales = map(_f32, (x, means, log_scales))
  z = (x - means) * jnp.exp(jnp.clip(-log_scales, -_EXP_MAX, _EXP_MAX))
  return -0.5 * jnp.square(z) - log_scales - 0.5 * np.log(2 * np.pi)
