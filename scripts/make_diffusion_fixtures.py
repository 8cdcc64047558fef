r"""Writes golden diffusion fixtures from diffusers' schedulers (torch CPU, float64).

  /work/refvenv/bin/python scripts/make_diffusion_fixtures.py [--out tests/fixtures]

Needs torch + diffusers (the reference venv); never imported by the package or the tests.
Writes tests/fixtures/diffusion_{schedules,ddpm,ddim,dpmpp}.npz (no pickle):
  schedules: diffusers' 'squaredcos_cap_v2' and 'linear' betas / alphas_cumprod (T=1000) and
    `add_noise` outputs for a few timesteps.
  ddpm / ddim / dpmpp: for each case (a JSON string in `cases`, settings of both sides), the
    per-step timesteps, the sample before every step and after the last (`samples`, NCHW),
    the model output used at every step and the noise (DDPM, DDIM eta > 0).
The model is a fixed smooth function of the sample (so the trajectory is realistic), but the
tests replay the recorded outputs, so only the scheduler math is compared.

diffusers keeps its tables and the DPM-Solver sample in float32; for float64 goldens this
script hands the three scheduler modules a `torch` whose `float32` is float64 and replaces
DPM-Solver's float32 `sigmas` after `set_timesteps` by the same values in float64.
"""

import argparse
import json
import os
import types

import numpy as np
import torch
from diffusers import DDIMScheduler
from diffusers import DDPMScheduler
from diffusers import DPMSolverMultistepScheduler
from diffusers.schedulers import scheduling_ddim
from diffusers.schedulers import scheduling_ddpm
from diffusers.schedulers import scheduling_dpmsolver_multistep

T = 1000
SHAPE = (2, 3, 4, 4)   # NCHW; diffusers' DPM-Solver hard-codes 3 channels for learned variance


class _Float64Torch(types.ModuleType):
  """`torch`, except that `float32` means float64."""

  def __getattr__(self, name):
    return getattr(torch, name)


_TORCH64 = _Float64Torch('torch')
_TORCH64.float32 = torch.float64
for _mod in (scheduling_ddpm, scheduling_ddim, scheduling_dpmsolver_multistep):
  _mod.torch = _TORCH64
torch.set_default_dtype(torch.float64)

# DDPM draws its noise with randn_tensor; the fixtures feed recorded noise instead.
_NEXT_NOISE = []
scheduling_ddpm.randn_tensor = lambda *a, **k: _NEXT_NOISE.pop()


def _model(sample, step, channels_out, rng):
  """A smooth deterministic stand-in for a network (numbers only; the tests replay them)."""
  x = sample.numpy()
  w = rng.normal(size=(channels_out, x.shape[1])) / np.sqrt(x.shape[1])
  out = 0.8 * np.tanh(np.einsum('oc,bchw->bohw', w, x)) + 0.2 * rng.normal(
      size=(x.shape[0], channels_out) + x.shape[2:])
  if channels_out == 2 * x.shape[1]:   # learned variance interpolation in [-1, 1]
    out[:, x.shape[1]:] = np.tanh(out[:, x.shape[1]:] * 2)
  del step
  return torch.from_numpy(out)


def _pred_type(objective):
  return {'eps': 'epsilon', 'x0': 'sample', 'v': 'v_prediction'}[objective]


def _thresh_kwargs(thresholding):
  if thresholding == 'static':
    return dict(clip_sample=True, clip_sample_range=1.0, thresholding=False)
  if thresholding == 'dynamic':
    return dict(clip_sample=False, thresholding=True, dynamic_thresholding_ratio=0.995,
                sample_max_value=3.0)
  return dict(clip_sample=False, thresholding=False)


def _run(kind, case, seed):
  rng = np.random.default_rng(seed)
  lv = case.get('learned_variance', False)
  common = dict(num_train_timesteps=T, beta_schedule=case['schedule'],
                prediction_type=_pred_type(case['objective']))
  th = case.get('thresholding', 'none')
  if kind == 'ddpm':
    sched = DDPMScheduler(variance_type='learned_range' if lv else case['variance'],
                          timestep_spacing=case['spacing'], steps_offset=0,
                          **common, **_thresh_kwargs(th))
  elif kind == 'ddim':
    sched = DDIMScheduler(set_alpha_to_one=True, steps_offset=0,
                          timestep_spacing=case['spacing'], **common, **_thresh_kwargs(th))
  else:
    kw = _thresh_kwargs(th)
    kw.pop('clip_sample', None)
    kw.pop('clip_sample_range', None)
    if th == 'static':   # DPM-Solver has no clip_sample: dynamic with max 1 is a clip to [-1, 1]
      kw = dict(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
    sched = DPMSolverMultistepScheduler(
        algorithm_type='dpmsolver++', solver_order=2, solver_type='midpoint',
        lower_order_final=True, final_sigmas_type='zero', timestep_spacing=case['spacing'],
        variance_type='learned_range' if lv else None, **common, **kw)
  assert sched.alphas_cumprod.dtype == torch.float64
  sched.set_timesteps(case['steps'])
  if kind == 'dpmpp':
    acp = sched.alphas_cumprod.numpy()
    sig = ((1 - acp) / acp) ** 0.5
    ts = sched.timesteps.numpy()
    sched.sigmas = torch.from_numpy(
        np.concatenate([np.interp(ts, np.arange(len(sig)), sig), [0.0]]))
  sample = torch.from_numpy(rng.normal(size=SHAPE))
  samples, outputs, noises = [sample.numpy()], [], []
  c_out = 2 * SHAPE[1] if lv else SHAPE[1]
  for i, t in enumerate(sched.timesteps):
    out = _model(sample, i, c_out, rng)
    noise = rng.normal(size=SHAPE)
    if kind == 'ddpm':
      _NEXT_NOISE.append(torch.from_numpy(noise))
      sample = sched.step(out, t, sample).prev_sample
      _NEXT_NOISE.clear()
    elif kind == 'ddim':
      sample = sched.step(out, t, sample, eta=case.get('eta', 0.0),
                          use_clipped_model_output=th != 'none',
                          variance_noise=torch.from_numpy(noise) if case.get('eta', 0.0) > 0
                          else None).prev_sample
    else:
      sample = sched.step(out, t, sample).prev_sample
    assert sample.dtype == torch.float64, sample.dtype
    samples.append(sample.numpy())
    outputs.append(out.numpy())
    noises.append(noise)
  return dict(timesteps=sched.timesteps.numpy().astype(np.int64),
              samples=np.stack(samples), outputs=np.stack(outputs), noises=np.stack(noises))


def _cases(kind):
  cases = []
  for objective in ('eps', 'x0', 'v'):
    base = dict(schedule='squaredcos_cap_v2', objective=objective, steps=10)
    if kind == 'ddpm':
      cases.append(dict(base, spacing='leading', variance='fixed_small'))
      cases.append(dict(base, spacing='leading', variance='fixed_small', learned_variance=True))
    elif kind == 'ddim':
      cases.append(dict(base, spacing='trailing'))
      cases.append(dict(base, spacing='leading'))
    else:
      cases.append(dict(base, spacing='trailing'))
  if kind == 'ddpm':
    cases.append(dict(schedule='linear', objective='eps', steps=10, spacing='leading',
                      variance='fixed_large'))
    cases.append(dict(schedule='linear', objective='eps', steps=50, spacing='leading',
                      variance='fixed_small'))
    cases.append(dict(schedule='squaredcos_cap_v2', objective='eps', steps=10,
                      spacing='leading', variance='fixed_small', thresholding='static'))
    cases.append(dict(schedule='squaredcos_cap_v2', objective='x0', steps=10,
                      spacing='leading', variance='fixed_small', thresholding='dynamic'))
  elif kind == 'ddim':
    cases.append(dict(schedule='linear', objective='eps', steps=8, spacing='trailing',
                      eta=0.5))
    cases.append(dict(schedule='squaredcos_cap_v2', objective='eps', steps=8,
                      spacing='trailing', thresholding='static'))
    cases.append(dict(schedule='squaredcos_cap_v2', objective='v', steps=8,
                      spacing='trailing', thresholding='dynamic'))
  else:
    cases.append(dict(schedule='linear', objective='eps', steps=20, spacing='trailing'))
    cases.append(dict(schedule='squaredcos_cap_v2', objective='eps', steps=8,
                      spacing='trailing', learned_variance=True))
    cases.append(dict(schedule='squaredcos_cap_v2', objective='x0', steps=8,
                      spacing='trailing', thresholding='static'))
    cases.append(dict(schedule='squaredcos_cap_v2', objective='eps', steps=8,
                      spacing='trailing', thresholding='dynamic'))
  return cases


def _schedules():
  rng = np.random.default_rng(0)
  out = {}
  x0 = torch.from_numpy(rng.uniform(-1, 1, size=(4,) + SHAPE[1:]))
  noise = torch.from_numpy(rng.normal(size=(4,) + SHAPE[1:]))
  t = torch.tensor([0, 37, 500, 999])
  out['x0'], out['noise'], out['t'] = x0.numpy(), noise.numpy(), t.numpy()
  for name, diffusers_name in (('cosine', 'squaredcos_cap_v2'), ('linear', 'linear')):
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule=diffusers_name)
    assert sched.betas.dtype == torch.float64
    out[f'{name}__betas'] = sched.betas.numpy()
    out[f'{name}__alphas_cumprod'] = sched.alphas_cumprod.numpy()
    out[f'{name}__add_noise'] = sched.add_noise(x0, noise, t).numpy()
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), '..', 'tests',
                                                    'fixtures'))
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  np.savez_compressed(os.path.join(args.out, 'diffusion_schedules.npz'), **_schedules())
  for seed, kind in enumerate(('ddpm', 'ddim', 'dpmpp')):
    arrays, names = {}, []
    for i, case in enumerate(_cases(kind)):
      for key, value in _run(kind, case, seed * 100 + i).items():
        arrays[f'{i}__{key}'] = value
      names.append(json.dumps(case, sort_keys=True))
    arrays['cases'] = np.asarray(names)
    path = os.path.join(args.out, f'diffusion_{kind}.npz')
    np.savez_compressed(path, **arrays)
    print(f'wrote {path}: {len(names)} cases, {os.path.getsize(path)} bytes')


if __name__ == '__main__':
  main()
