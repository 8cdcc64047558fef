r"""Sampling benchmark: text -> image latency and images/s for the 'fast' and 'paper' presets.

  python bench/sampling.py                         # -> bench/results/sampling_cpu.json
  python bench/sampling.py --only pipeline_fast

Runs `dalle2_jax.sampling.UnCLIP` (the library's own sampler: tokenizer -> CLIP text ->
prior, best of N -> decoder -> upsampler(s), one jitted function per settings, vmapped over
examples) on randomly initialised stages of small sizes (bench/matched.py SAMPLING), on one
device. Steps: 'fast' is prior 25 / decoder 25 / upsampler 7 (diffusers' UnCLIPPipeline
defaults), 'paper' is 64 / 250 / 27 / 15 (unCLIP Table 3). Guidance and candidate counts
are in SAMPLING. Reports the first call (compile + one run), the compile time
(first call - steady latency), the median latency of a batch over --repeats calls and
images/s. Each config runs in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from bench import matched  # pylint: disable=g-import-not-at-top,wrong-import-position

PROMPTS = ['a large red circle in the top left', 'two small blue squares',
           'a green triangle above a yellow star', 'a purple cross on the right',
           'three orange circles', 'a small white square at the bottom',
           'a blue star left of a red triangle', 'a large green cross']


def build_unclip(spec: dict):
  """An UnCLIP of randomly initialised stages shaped by a SAMPLING spec (1 device)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from bench import ours  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from dalle2_jax import sampling  # pylint: disable=g-import-not-at-top
  from dalle2_jax.tasks import decoder as decoder_task  # pylint: disable=g-import-not-at-top
  from dalle2_jax.tasks import prior as prior_task  # pylint: disable=g-import-not-at-top

  config = tiny.get_config()
  with config.unlocked():
    config.tokenizer.context_length = matched.CONTEXT_LENGTH
    config.clip.model.embed_dim = spec['clip']['embed_dim']
    config.clip.model.text.width = spec['clip']['text_width']
    config.clip.model.text.heads = max(1, spec['clip']['text_width'] // 64)
    config.clip.model.text.depth = 0
    for k, v in spec['prior'].items():
      config.prior.model[k] = v
    config.decoder.image_size = spec['decoder']['image_size']
    for k, v in spec['decoder']['model'].items():
      config.decoder.model[k] = v
    ups = spec.get('upsamplers', [])
    names = []
    for i, u in enumerate(ups):
      name = 'upsampler' if i == 0 else f'upsampler{i + 1}'
      if name not in config:
        config[name] = config.upsampler.to_dict()
      config[name].task = 'upsampler'
      config[name].low_res = u['low_res']
      config[name].high_res = u['high_res']
      for k, v in u['model'].items():
        config[name].model[k] = v
      names.append(name)
    config.stages = ('clip', 'prior', 'decoder') + tuple(names)
    for stage in config.stages:
      config[stage].dtype = spec.get('dtype', 'float32')
  clip = ours.random_frozen_clip(config)
  rng = jax.random.key(0)
  fake = ours.synthetic_batch(config, 'decoder', 2)

  def params_of(task, host_batch=None):
    b = jax.tree.map(jax.numpy.asarray, task.prepare_batch(dict(
        fake if host_batch is None else host_batch)))

    def init():
      with nn.logical_axis_rules(()):
        return task.init(rng, b)
    return ours.random_like(init)

  pt = prior_task.PriorTask(config, 'prior', '', frozen_clip=clip)
  dt = decoder_task.DecoderTask(config, 'decoder', '', frozen_clip=clip)
  stages = []
  from dalle2_jax import tasks  # pylint: disable=g-import-not-at-top
  for name in names:
    t = tasks.get_task(config, name, '')
    p = params_of(t, ours.synthetic_batch(config, name, 2))
    stages.append(sampling.Stage(name, t, p, ''))
  unclip = sampling.UnCLIP(config, clip, sampling.Stage('prior', pt, params_of(pt), ''),
                           sampling.Stage('decoder', dt, params_of(dt), ''), stages,
                           devices=jax.devices()[:1])
  s = spec['settings']
  settings = sampling.Settings(
      prior=sampling.StageSampling(steps=s['steps'][0], guidance_scale=s['prior_guidance'],
                                   num_candidates=s['num_candidates']),
      decoder=sampling.StageSampling(steps=s['steps'][1], guidance_scale=s['decoder_guidance']),
      upsamplers=tuple(sampling.StageSampling(steps=n) for n in s['steps'][2:2 + len(names)]))
  counts = dict(prior=ours.count_params(unclip.params['prior']),
                decoder=ours.count_params(unclip.params['decoder']),
                upsamplers=[ours.count_params(p) for p in unclip.params['upsamplers']])
  return unclip, settings, counts


def run_one(name: str, repeats: int) -> dict:
  rss0 = common.rss_peak_mb()
  spec = matched.SAMPLING[name]
  t0 = time.perf_counter()
  unclip, settings, counts = build_unclip(spec)
  build_s = time.perf_counter() - t0
  t0 = common.phase(name, 'built', t0)
  batch = spec['batch']
  prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
  images = unclip(prompts, seed=0, settings=settings, batch_size=batch)
  first = time.perf_counter() - t0
  common.phase(name, 'first call (compile + run)', t0)
  times = []
  for r in range(repeats):
    t0 = time.perf_counter()
    unclip(prompts, seed=r + 1, settings=settings, batch_size=batch)
    times.append(time.perf_counter() - t0)
  med = sorted(times)[len(times) // 2]
  return dict(name=name, side='dalle2_jax', preset=spec['preset'],
              steps=list(spec['settings']['steps']), batch=batch,
              image_shape=list(images.shape), params=counts, build_s=build_s,
              first_call_s=first, compile_s=max(first - med, 0.0), latency_s=med,
              latency_all_s=times, images_per_s=batch / med, repeats=repeats,
              settings=spec['settings'], dtype=spec.get('dtype', 'float32'),
              rss_before_model_mb=rss0, peak_rss_mb=common.rss_peak_mb(),
              device_peak_mb=common.device_memory_peak_mb())


def run_in_subprocess(name: str, repeats: int, timeout: float = 1800) -> dict:
  cmd = common.pin_prefix() + [sys.executable, os.path.abspath(__file__), '--child', name,
                              '--repeats', str(repeats)]
  return common.run_child_json(name, cmd, timeout)


def main():
  ap = argparse.ArgumentParser(description='Sampling benchmark (see module docstring).')
  ap.add_argument('--only', default='', help='comma-separated names of bench/matched.SAMPLING')
  ap.add_argument('--repeats', type=int, default=2)
  ap.add_argument('--out', default='', help='file name in bench/results/ '
                  '(default sampling_<backend>.json)')
  ap.add_argument('--child', default='', help=argparse.SUPPRESS)
  a = ap.parse_args()
  if a.child:   # the XLA flags sample.py runs with (dalle2_jax/cpu_flags.py)
    from dalle2_jax import cpu_flags  # pylint: disable=g-import-not-at-top
    cpu_flags.use_sampling_flags()
    print(json.dumps(run_one(a.child, a.repeats)), flush=True)
    return
  import jax  # pylint: disable=g-import-not-at-top
  backend = jax.default_backend()
  names = [n for n in a.only.split(',') if n] or (
      matched.CPU_SAMPLING if backend == 'cpu' else matched.GPU_SAMPLING)
  load_before = common.load_snapshot()

  def write():
    return common.write_json(a.out or f'sampling_{backend}.json', dict(
        benchmark='sampling', command='python bench/sampling.py ' + ' '.join(sys.argv[1:]),
        env=common.jax_environment(), load_before=load_before,
        load_after=common.load_snapshot(), results=results))

  results = []
  for n in names:
    r = run_in_subprocess(n, a.repeats)
    results.append(r)
    write()   # after every config: a run cut short keeps what it measured
    if 'error' in r:
      print(f'{n}: FAILED\n{r["error"]}', file=sys.stderr)
      continue
    print(f'{n:16s} steps {"/".join(map(str, r["steps"])):14s} batch {r["batch"]}  '
          f'latency {common.fmt_s(r["latency_s"]):>9s}  {r["images_per_s"]:6.2f} img/s  '
          f'compile {r["compile_s"]:5.1f} s', flush=True)
  print('wrote', write())


if __name__ == '__main__':
  main()
