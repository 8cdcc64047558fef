"""Behaviour of the diffusion core: samplers recover a known distribution, losses are sane."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle2_jax import diffusion

MU = np.array([0.5, -0.3])
SIGMA = np.array([[0.30, 0.10], [0.10, 0.20]])
N = 4096


def exact_model(d, mu, sigma, objective):
  """The exact denoiser of x0 ~ N(mu, sigma) under `d`, as a model_fn(x_t, t)."""
  mu, sigma = jnp.asarray(mu, jnp.float32), jnp.asarray(sigma, jnp.float32)
  eye = jnp.eye(mu.shape[0])

  def model_fn(x, t):
    a = jnp.asarray(d.alphas_cumprod, jnp.float32)[t][:, None]
    sa = jnp.asarray(d.table('sqrt_alphas_cumprod'), jnp.float32)[t][:, None]
    s1 = jnp.asarray(d.table('sqrt_one_minus_alphas_cumprod'), jnp.float32)[t][:, None]
    # E[x0 | x_t] = mu + sqrt(a) sigma (a sigma + (1 - a) I)^-1 (x_t - sqrt(a) mu)
    cov = a[:, :, None] * sigma + (1 - a)[:, :, None] * eye              # [B, D, D]
    r = jnp.linalg.solve(cov, (x - sa * mu)[..., None])[..., 0]
    x0 = mu + sa * (r @ sigma)
    eps = (x - sa * x0) / s1
    return {'eps': eps, 'x0': x0, 'v': sa * eps - s1 * x0}[objective]
  return model_fn


def _check_moments(x, mu, sigma, tol_mean=0.04, tol_cov=0.04):
  x = np.asarray(x, np.float64)
  assert np.all(np.isfinite(x))
  np.testing.assert_allclose(x.mean(0), mu, atol=tol_mean)
  np.testing.assert_allclose(np.cov(x.T), sigma, atol=tol_cov)


@pytest.mark.parametrize('sampler,steps,objective,schedule', [
    ('ddpm', 100, 'eps', 'cosine'),
    ('ddim', 50, 'x0', 'cosine'),
    ('ddim', 50, 'v', 'linear'),
    ('dpmpp_2m', 20, 'eps', 'cosine'),
    ('dpmpp_2m', 20, 'x0', 'linear'),
])
def test_samplers_recover_gaussian(sampler, steps, objective, schedule):
  d = diffusion.GaussianDiffusion(schedule=schedule, objective=objective)
  fn = exact_model(d, MU, SIGMA, objective)
  x = jax.jit(lambda r: d.sample(fn, (N, 2), r, sampler=sampler, steps=steps))(
      jax.random.PRNGKey(0))
  _check_moments(x, MU, SIGMA)


def test_ddim_eta_one_and_ddpm_learned_variance_recover_gaussian():
  d = diffusion.GaussianDiffusion(objective='eps', learned_variance=True)
  base = exact_model(d, MU, SIGMA, 'eps')
  # v = -1: the posterior variance (the optimum for a narrow data distribution)
  fn = lambda x, t: jnp.concatenate([base(x, t), -jnp.ones_like(x)], -1)
  for sampler in ('ddpm', 'ddim'):
    x = d.sample(fn, (N, 2), jax.random.PRNGKey(1), sampler=sampler, steps=100, eta=1.0)
    _check_moments(x, MU, SIGMA)


def test_classifier_free_guidance_doubled_batch():
  d = diffusion.GaussianDiffusion(objective='eps')
  mu_u = np.array([-0.4, 0.2])
  cond, uncond = exact_model(d, MU, SIGMA, 'eps'), exact_model(d, mu_u, SIGMA, 'eps')
  calls = []

  def model_fn(x, t, drop_cond):
    calls.append(x.shape[0])
    return jnp.where(drop_cond[:, None], uncond(x, t), cond(x, t))

  # a traced / non-1 scale runs the doubled batch; scale 1 -> the conditional distribution,
  # scale 0 -> the unconditional one
  for scale, mu in ((jnp.float32(1.0), MU), (0.0, mu_u)):
    x = d.sample(model_fn, (N, 2), jax.random.PRNGKey(2), sampler='dpmpp_2m', steps=20,
                 guidance_scale=scale)
    _check_moments(x, mu, SIGMA)
  assert set(calls) == {2 * N}
  # the guided output is uncond + s (cond - uncond)
  guided = diffusion.classifier_free_guidance(model_fn, 3.0)
  x, t = jnp.ones((4, 2)), jnp.full((4,), 500)
  np.testing.assert_allclose(guided(x, t), uncond(x, t) + 3.0 * (cond(x, t) - uncond(x, t)),
                             rtol=1e-5, atol=1e-5)


def test_image_embed_guidance_scale_two_conditions():
  # Three exact models: both conditions, the embedding only (caption dropped), neither.
  d = diffusion.GaussianDiffusion(objective='eps')
  both, embed, null = (exact_model(d, mu, SIGMA, 'eps')
                       for mu in (MU, [-0.4, 0.2], [0.3, -0.9]))
  calls = []

  def model_fn(x, t, drop_cond=None, drop_text=None):
    calls.append(x.shape[0])
    if drop_cond is None:
      return both(x, t)
    text = drop_text if drop_text is not None else drop_cond
    return jnp.where(drop_cond[:, None], null(x, t),
                     jnp.where(text[:, None], embed(x, t), both(x, t)))

  x, t = jnp.ones((4, 2)) * 0.3, jnp.array([100, 500, 700, 999])
  b, e, u = both(x, t), embed(x, t), null(x, t)
  for s_embed, rows in ((2.0, 12), (1.0, 8), (3.0, 8), (None, 8)):
    calls.clear()
    out = diffusion.classifier_free_guidance(model_fn, 3.0,
                                             image_embed_guidance_scale=s_embed)(x, t)
    want = u + (3.0 if s_embed is None else s_embed) * (e - u) + 3.0 * (b - e)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert calls == [rows], (s_embed, calls)   # equal scales: plain guidance, two rows
  # With 1 the embedding is unguided: the caption guided given the embedding.
  np.testing.assert_allclose(
      diffusion.classifier_free_guidance(model_fn, 3.0, image_embed_guidance_scale=1.0)(x, t),
      e + 3.0 * (b - e), rtol=1e-5, atol=1e-5)
  # The interval switches both scales off (the conditional output) outside it.
  out = diffusion.classifier_free_guidance(model_fn, 3.0, interval=(0, 600),
                                           image_embed_guidance_scale=2.0)(x, t)
  np.testing.assert_allclose(out[2:], b[2:], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out[:2], (u + 2.0 * (e - u) + 3.0 * (b - e))[:2], rtol=1e-5,
                             atol=1e-5)
  # Sampling: guidance_scale 1 with an embedding scale still guides; both 1 do not.
  calls.clear()
  d.sample(model_fn, (N, 2), jax.random.PRNGKey(4), steps=4, guidance_scale=1.0,
           image_embed_guidance_scale=2.0)
  assert set(calls) == {3 * N}
  calls.clear()
  d.sample(model_fn, (N, 2), jax.random.PRNGKey(4), steps=4, guidance_scale=1.0,
           image_embed_guidance_scale=1.0)
  assert set(calls) == {N}
  # Guided samples with scale 1 for the embedding and s for the caption follow the score
  # e + s (b - e): for these Gaussians (equal variances) the mean e + s (b - e).
  x = d.sample(model_fn, (N, 2), jax.random.PRNGKey(2), sampler='dpmpp_2m', steps=20,
               guidance_scale=1.0, image_embed_guidance_scale=0.0)
  _check_moments(x, np.array(MU) - np.array([-0.4, 0.2]) + np.array([0.3, -0.9]), SIGMA)


@pytest.mark.parametrize('sampler', ['ddpm', 'dpmpp_2m'])
def test_guidance_interval(sampler):
  d = diffusion.GaussianDiffusion(objective='eps')
  cond, uncond = exact_model(d, MU, SIGMA, 'eps'), exact_model(d, [-0.4, 0.2], SIGMA, 'eps')
  calls = []

  def model_fn(x, t, drop_cond=None):
    calls.append(x.shape[0])
    return cond(x, t) if drop_cond is None else jnp.where(drop_cond[:, None], uncond(x, t),
                                                          cond(x, t))

  # Per row: scale 3 where lo <= t < hi, the conditional output elsewhere.
  guided = diffusion.classifier_free_guidance(model_fn, 3.0, interval=(0, 600))
  x, t = jnp.ones((2, 2)), jnp.array([599, 600])
  want = uncond(x, t) + 3.0 * (cond(x, t) - uncond(x, t))
  np.testing.assert_allclose(guided(x, t), jnp.stack([want[0], cond(x, t)[1]]), rtol=1e-5)

  # 8 steps [999, 874, ..., 124]: the four below 600 are guided, the others make one
  # conditional call on the plain batch; the same samples as guiding every step with that
  # per-row scale.
  n, rng = 256, jax.random.PRNGKey(3)
  kw = dict(sampler=sampler, steps=8)
  calls.clear()
  x = d.sample(model_fn, (n, 2), rng, guidance_scale=3.0, guidance_interval=(0, 600), **kw)
  assert sorted(set(calls)) == [n, 2 * n]
  ref = d.sample(guided, (n, 2), rng, **kw)
  np.testing.assert_allclose(x, ref, rtol=1e-4, atol=1e-4)
  guided_all = d.sample(model_fn, (n, 2), rng, guidance_scale=3.0, **kw)
  assert float(jnp.abs(x - guided_all).mean()) > 0.05
  # An interval covering every step is plain guidance; one covering none is no guidance.
  np.testing.assert_array_equal(
      d.sample(model_fn, (n, 2), rng, guidance_scale=3.0, guidance_interval=(0, 1000), **kw),
      guided_all)
  calls.clear()
  np.testing.assert_array_equal(
      d.sample(model_fn, (n, 2), rng, guidance_scale=3.0, guidance_interval=(0, 100), **kw),
      d.sample(model_fn, (n, 2), rng, **kw))
  assert set(calls) == {n}


def test_thresholding():
  x0 = jnp.stack([jnp.linspace(-3, 3, 200), jnp.linspace(-0.5, 0.5, 200)])
  static = diffusion.threshold(x0, 'static')
  assert float(jnp.max(jnp.abs(static))) == 1.0
  dyn = diffusion.threshold(x0, 'dynamic', percentile=0.9)
  s = np.quantile(np.abs(np.asarray(x0[0])), 0.9)
  np.testing.assert_allclose(dyn[0], np.clip(x0[0], -s, s) / s, rtol=1e-5)
  np.testing.assert_allclose(dyn[1], x0[1])          # s clamped to 1: already inside
  with pytest.raises(ValueError, match='thresholding'):
    diffusion.threshold(x0, 'soft')


def test_timestep_spacings():
  assert list(diffusion.spaced_timesteps(1000, 8)) == [999, 874, 749, 624, 499, 374, 249, 124]
  assert list(diffusion.spaced_timesteps(1000, 4, 'leading')) == [750, 500, 250, 0]
  assert list(diffusion.spaced_timesteps(1000, 64, 'linspace'))[::21] == [999, 666, 333, 0]
  assert list(diffusion.spaced_timesteps(1000, spacing=[3, 500, 10])) == [500, 10, 3]
  assert len(diffusion.spaced_timesteps(1000)) == 1000
  with pytest.raises(ValueError, match='steps'):
    diffusion.spaced_timesteps(1000, 0)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match='diffusion.schedule'):
    diffusion.GaussianDiffusion(schedule='quadratic')
  with pytest.raises(ValueError, match='diffusion.objective'):
    diffusion.GaussianDiffusion(objective='score')
  with pytest.raises(ValueError, match='Unknown diffusion config fields'):
    diffusion.GaussianDiffusion.from_config(dict(schedule='cosine', timestep=10))


def test_training_losses_targets():
  x0 = jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 3))
  noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  t = jnp.array([0, 1, 10, 500, 998, 999])
  for objective in ('eps', 'x0', 'v'):
    d = diffusion.GaussianDiffusion(objective=objective)
    sa = d.table('sqrt_alphas_cumprod')[np.asarray(t)][:, None, None, None]
    s1 = d.table('sqrt_one_minus_alphas_cumprod')[np.asarray(t)][:, None, None, None]
    target = {'eps': noise, 'x0': x0, 'v': sa * noise - s1 * x0}[objective]
    loss, terms = d.training_losses(lambda x, t, target=target: target, x0, t, noise)
    np.testing.assert_allclose(loss, 0.0, atol=1e-10)
    # the perfect prediction implies the true x0, also through eps at t=999
    np.testing.assert_allclose(terms['pred_x0'][:5], x0[:5], atol=2e-3)
    loss, _ = d.training_losses(lambda x, t: jnp.zeros_like(x), x0, t, noise)
    np.testing.assert_allclose(loss, np.mean(np.square(target), axis=(1, 2, 3)), rtol=1e-5)


@pytest.mark.parametrize('loss_weight,cap', [('v', 0.0), ('v', 6.0), ('eps', 5.0), ('x0', 0.0)])
def test_loss_weight_is_independent_of_the_objective(loss_weight, cap):
  """One x0 prediction, written as each objective's output, gets one loss: w(t) x0-MSE."""
  x0 = jax.random.normal(jax.random.PRNGKey(0), (5, 4, 4, 3))
  noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  x0_hat = x0 + 0.1 * jax.random.normal(jax.random.PRNGKey(2), x0.shape)
  t = jnp.array([0, 100, 500, 900, 999])
  a = diffusion.GaussianDiffusion().alphas_cumprod[np.asarray(t)]
  snr = a / (1 - a)
  w = {'x0': np.ones_like(snr), 'eps': snr, 'v': 1 + snr}[loss_weight]
  want = (np.minimum(w, cap) if cap else w) * np.mean(np.square(x0_hat - x0), axis=(1, 2, 3))
  for objective in ('eps', 'x0', 'v'):
    d = diffusion.GaussianDiffusion(objective=objective, loss_weight=loss_weight,
                                    loss_weight_cap=cap)
    sa = jnp.sqrt(a)[:, None, None, None]
    s1 = jnp.sqrt(1 - a)[:, None, None, None]

    def model_fn(x, t, objective=objective, sa=sa, s1=s1):
      eps_hat = (x - sa * x0_hat) / s1
      return {'x0': x0_hat, 'eps': eps_hat, 'v': sa * eps_hat - s1 * x0_hat}[objective]
    loss, terms = d.training_losses(model_fn, x0, t, noise)
    np.testing.assert_allclose(loss, want, rtol=5e-3, err_msg=objective)   # float32 at t=999
    assert terms['mse'].shape == (5,)
  with pytest.raises(ValueError, match='diffusion.loss_weight'):
    diffusion.GaussianDiffusion(loss_weight='snr')


def _hybrid_setup(dtype):
  d = diffusion.GaussianDiffusion(objective='eps', learned_variance=True, vlb_weight=0.001)
  k = jax.random.split(jax.random.PRNGKey(0), 3)
  x0 = jnp.round(jax.random.uniform(k[0], (4, 8, 8, 3), minval=-1, maxval=1) * 127.5) / 127.5
  x0 = x0.at[0, 0].set(1.0).at[1, 0].set(-1.0)      # edge bins of the discretized NLL
  noise = jax.random.normal(k[1], x0.shape)
  w = 0.3 * jax.random.normal(k[2], (3, 6))

  def model_fn(w, x, t, v_scale):
    del t
    h = x.astype(dtype) @ w.astype(dtype)
    return jnp.concatenate([h[..., :3], v_scale * jnp.tanh(h[..., 3:])], -1).astype(dtype)
  return d, x0, noise, w, model_fn


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_hybrid_loss_finite_at_extreme_timesteps(dtype):
  d, x0, noise, w, model_fn = _hybrid_setup(dtype)

  def total(w, t, v_scale):
    loss, terms = d.training_losses(lambda x, t: model_fn(w, x, t, v_scale), x0, t, noise)
    return jnp.mean(loss), terms

  step = jax.jit(jax.value_and_grad(total, has_aux=True))
  for t_val in (0, 1, 998, 999):
    for v_scale in (1.0, 3.0):   # v outside [-1, 1] extrapolates the log variance
      (loss, terms), grad = step(w, jnp.full((4,), t_val), v_scale)
      assert loss.dtype == jnp.float32
      assert np.isfinite(float(loss)), (t_val, v_scale)
      assert np.all(np.isfinite(np.asarray(terms['vlb']))), (t_val, terms['vlb'])
      assert np.all(np.isfinite(np.asarray(grad))), (t_val, v_scale)


def test_vlb_trains_only_the_variance_and_is_zero_at_the_true_posterior():
  d = diffusion.GaussianDiffusion(objective='eps', learned_variance=True, vlb_weight=1.0)
  x0 = jax.random.uniform(jax.random.PRNGKey(0), (3, 4, 4, 3), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.PRNGKey(1), x0.shape)
  t = jnp.array([5, 300, 999])

  @jax.jit
  def vlb(out):
    return d.training_losses(lambda x, t: out, x0, t, noise)[1]['vlb'].sum()

  # true eps and v = -1 (the posterior log variance): KL = 0
  perfect = jnp.concatenate([noise, -jnp.ones_like(x0)], -1)
  np.testing.assert_allclose(vlb(perfect), 0.0, atol=1e-4)
  out = jnp.concatenate([noise + 0.3, jnp.zeros_like(x0)], -1)
  g = jax.grad(vlb)(out)
  assert float(jnp.abs(g[..., :3]).max()) == 0.0       # stop-gradient on the mean
  assert float(jnp.abs(g[..., 3:]).max()) > 0.0
  # t = 0 uses the discretized NLL: positive bits, small when the mean is right
  t0 = jnp.zeros((3,), jnp.int32)
  terms = jax.jit(lambda: d.training_losses(lambda x, t: perfect, x0, t0, noise)[1])()
  assert np.all(np.asarray(terms['vlb']) > 0) and np.all(np.asarray(terms['vlb']) < 1.0)
