"""Parity of the diffusion core with diffusers' schedulers (golden fixtures).

Fixtures: scripts/make_diffusion_fixtures.py (diffusers DDPMScheduler, DDIMScheduler,
DPMSolverMultistepScheduler, torch CPU, float64). Every step is replayed with the recorded
sample, model output and noise; "relative error" is max|ours - golden| / max|golden| per
array: <= 1e-6 in float64 (jax_enable_x64) and <= 1e-5 in float32.
"""

import contextlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dalle2_jax import diffusion

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
TOL = {'float64': 1e-6, 'float32': 1e-5}
SCHEDULE = {'squaredcos_cap_v2': 'cosine', 'linear': 'linear'}


def _load(kind):
  with np.load(os.path.join(FIXTURES, f'diffusion_{kind}.npz'), allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def _nhwc(a):
  return np.moveaxis(a, -3, -1)   # [..., C, H, W] -> [..., H, W, C]


def _rel(ours, golden):
  ours, golden = np.asarray(ours, np.float64), np.asarray(golden, np.float64)
  return np.max(np.abs(ours - golden)) / np.max(np.abs(golden))


@contextlib.contextmanager
def _precision(dtype):
  with jax.enable_x64(dtype == 'float64'):
    yield jnp.float64 if dtype == 'float64' else jnp.float32


def _cases(kind):
  data = _load(kind)
  for i, case in enumerate(data['cases']):
    case = json.loads(str(case))
    yield case, {k.split('__', 1)[1]: v for k, v in data.items() if k.startswith(f'{i}__')}


def _diffusion(case):
  return diffusion.GaussianDiffusion(
      schedule=SCHEDULE[case['schedule']], timesteps=1000, objective=case['objective'],
      learned_variance=case.get('learned_variance', False),
      variance=case.get('variance', 'fixed_small'))


def _thresh(case):
  return dict(thresholding=case.get('thresholding', 'none'), percentile=0.995,
              max_value=3.0 if case.get('thresholding') == 'dynamic' else np.inf)


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
def test_schedules_and_add_noise(dtype):
  g = _load('schedules')
  with _precision(dtype) as jdt:
    for name in ('cosine', 'linear'):
      d = diffusion.GaussianDiffusion(schedule=name)
      # our tables are float64 numpy whatever the compute dtype
      assert _rel(d.table('betas'), g[f'{name}__betas']) < 1e-12
      assert _rel(d.alphas_cumprod, g[f'{name}__alphas_cumprod']) < 1e-12
      assert _rel(jnp.asarray(d.alphas_cumprod, jdt), g[f'{name}__alphas_cumprod']) < TOL[dtype]
      x_t = d.q_sample(jnp.asarray(_nhwc(g['x0']), jdt), jnp.asarray(g['t']),
                       jnp.asarray(_nhwc(g['noise']), jdt))
      assert x_t.dtype == jdt
      assert _rel(x_t, _nhwc(g[f'{name}__add_noise'])) < TOL[dtype], name


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
@pytest.mark.parametrize('kind', ['ddpm', 'ddim', 'dpmpp'])
def test_every_step_matches_diffusers(kind, dtype):
  worst = 0.0
  with _precision(dtype) as jdt:
    for case, f in _cases(kind):
      d = _diffusion(case)
      ts = f['timesteps']
      np.testing.assert_array_equal(
          ts, d.sampling_timesteps(case['steps'], case['spacing']), err_msg=str(case))
      coefs = diffusion.sampler_coefficients(d.alphas_cumprod, ts)
      samples, outs, noises = (_nhwc(f['samples']), _nhwc(f['outputs']), _nhwc(f['noises']))
      x0_before = jnp.zeros(samples.shape[1:], jdt)
      kw = dict(objective=case['objective'], learned_variance=case.get('learned_variance', False),
                **_thresh(case))
      for i in range(len(ts)):
        x, out = jnp.asarray(samples[i], jdt), jnp.asarray(outs[i], jdt)
        c = {k: jnp.asarray(v[i], jdt) for k, v in coefs.items()}
        last = i == len(ts) - 1
        noise = jnp.asarray(noises[i] * (not last), jdt)
        if kind == 'ddpm':
          new, _ = diffusion.ddpm_step(out, x, c, noise, variance=d.variance, **kw)
        elif kind == 'ddim':
          new, _ = diffusion.ddim_step(out, x, c, noise, eta=case.get('eta', 0.0), **kw)
        else:
          new, x0_before = diffusion.dpmpp_2m_step(out, x, c, x0_before, **kw)
        assert new.dtype == jdt
        err = _rel(new, samples[i + 1])
        worst = max(worst, err)
        assert err < TOL[dtype], (case, i, int(ts[i]), err)
    print(kind, dtype, "worst step rel err", worst)


@pytest.mark.parametrize('dtype', ['float64', 'float32'])
@pytest.mark.parametrize('kind', ['ddim', 'dpmpp'])
def test_compiled_sampler_matches_diffusers(kind, dtype):
  """The whole lax.scan sampler, with the recorded model outputs looked up by timestep."""
  sampler = {'ddim': 'ddim', 'dpmpp': 'dpmpp_2m'}[kind]
  with _precision(dtype) as jdt:
    for case, f in _cases(kind):
      if case.get('eta', 0.0) > 0:
        continue   # stochastic: covered step by step above
      d = _diffusion(case)
      ts = jnp.asarray(f['timesteps'])
      table = jnp.asarray(_nhwc(f['outputs']), jdt)
      samples = _nhwc(f['samples'])

      def model_fn(x, t, table=table, ts=ts):
        del x
        return table[jnp.argmax(ts == t[0])]

      th = _thresh(case)
      run = jax.jit(lambda x_T, d=d, case=case, th=th: d.sample(
          model_fn, x_T.shape, jax.random.PRNGKey(0), sampler=sampler, steps=case['steps'],
          spacing=case['spacing'], thresholding=th['thresholding'],
          dynamic_threshold_max=th['max_value'], x_T=x_T))
      out = run(jnp.asarray(samples[0], jdt))
      assert out.dtype == jdt
      err = _rel(out, samples[-1])
      assert err < TOL[dtype], (case, err)
