r"""DALLE2-pytorch 1.15.6 side of the side-by-side benchmark (bench/compare.py).

Runs ONLY under the peer's own virtual environment, never in the project's python:

  python3 -m venv /work/d2pt
  /work/d2pt/bin/pip install torch==2.14.1 torchvision==0.29.1 dalle2-pytorch==1.15.6
  /work/d2pt/bin/python bench/peer_dalle2_pytorch.py --spec spec.json [--only NAME]

The spec (a JSON file, or '-' for stdin) lists matched configurations; see bench/README.md
for the architecture mapping and bench/compare.py for how the spec is built:

  {"threads": 2, "configs": [
     {"name": "decoder_s", "kind": "decoder", "batch": 8, "image_size": 32, ...,
      "train": {"steps": 20, "warmup": 3},
      "sample": [{"steps": 25, "cond_scale": 3.0, "batch": 4}]},
     {"name": "pipeline_fast", "kind": "pipeline", ...}]}

Kinds: 'prior' (DiffusionPrior on precomputed CLIP embeddings, x0 objective),
'decoder' (Decoder with one Unet, learned variance, text-conditioned),
'upsampler' (the second Unet of a two-Unet Decoder, trained on random crops),
'unet' (the decoder Unet alone, forward + backward of the plain eps MSE),
'pipeline' (prior -> decoder -> upsampler(s) sampling of one batch).

For each config it prints one JSON object per line on stdout (train step statistics,
sampling latency, parameter counts, counted FLOPs). No CLIP, no download: every
conditioning input is a random tensor of the right shape.
"""

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

os.environ.setdefault('TQDM_DISABLE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

import torch  # pylint: disable=g-import-not-at-top
from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=g-import-not-at-top

import dalle2_pytorch  # pylint: disable=g-import-not-at-top
from dalle2_pytorch import dalle2_pytorch as d2  # pylint: disable=g-import-not-at-top


def _rss_mb():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _params(module):
  return int(sum(p.numel() for p in module.parameters() if p.requires_grad))


def _count_flops(fn):
  """FLOPs torch's FlopCounterMode sees (matmuls, convolutions, attention) in fn()."""
  with FlopCounterMode(display=False) as counter:
    fn()
  return float(counter.get_total_flops())


class _CallCounter:
  """Counts forward calls of a module (to check equal step counts when sampling).

  Wraps the instance's `forward` (not a hook: `forward_with_cond_scale` calls
  `self.forward` directly, bypassing `__call__` and its hooks).
  """

  def __init__(self, module):
    self.n = 0
    inner = module.forward

    def forward(*args, **kwargs):
      self.n += 1
      return inner(*args, **kwargs)
    module.forward = forward


# --- model builders --------------------------------------------------------------------

def build_prior(c):
  net = d2.DiffusionPriorNetwork(
      dim=c['dim'], depth=c['depth'], dim_head=c['dim_head'], heads=c['heads'],
      ff_mult=c.get('ff_mult', 4), num_timesteps=c.get('num_timesteps', 1000),
      max_text_len=c['text_len'], rotary_emb=c.get('rotary_emb', True))
  prior = d2.DiffusionPrior(
      net, image_embed_dim=c['dim'], timesteps=1000, cond_drop_prob=c.get('cond_drop_prob', 0.1),
      condition_on_text_encodings=True, predict_x_start=True)
  return prior


def prior_inputs(c, batch):
  return dict(text_embed=torch.randn(batch, c['dim']),
              image_embed=d2.l2norm(torch.randn(batch, c['dim'])),
              text_encodings=torch.randn(batch, c['text_len'], c['dim']))


def _unet(c, lowres=False):
  n_levels = len(c['dim_mults'])
  return d2.Unet(
      dim=c['dim'], image_embed_dim=c['image_embed_dim'], text_embed_dim=c.get('text_embed_dim'),
      cond_dim=c.get('cond_dim'), dim_mults=tuple(c['dim_mults']),
      num_resnet_blocks=c['num_resnet_blocks'],
      self_attn=tuple(c.get('self_attn', (False,) * n_levels)),
      attn_heads=c.get('attn_heads', 16), attn_dim_head=c.get('attn_dim_head', 32),
      attend_at_middle=c.get('attend_at_middle', True),
      cond_on_text_encodings=bool(c.get('text_embed_dim')) and not lowres,
      max_text_len=c.get('text_len', 256), lowres_cond=lowres,
      init_cross_embed=c.get('init_cross_embed', True))


def _attend_at_middle(decoder, unet_configs):
  """Applies `attend_at_middle=False` (accepted but ignored by Unet 1.15.6, which always
  builds a middle self-attention) by removing the layer: forward skips a None mid_attn.

  Done after the Decoder is built because Decoder re-instantiates its Unets
  (`cast_model_parameters`). The upsamplers (no attention, as in the paper and ours) need
  it: at 128 px sampling their middle attention alone is 4096 tokens wide.
  """
  for unet, c in zip(decoder.unets, unet_configs):
    if not c.get('attend_at_middle', True):
      unet.mid_attn = None
  return decoder


def build_decoder(c):
  unet = _unet(c)
  return d2.Decoder(unet, image_sizes=(c['image_size'],), timesteps=1000,
                    image_cond_drop_prob=0.1, text_cond_drop_prob=0.5,
                    learned_variance=c.get('learned_variance', True),
                    auto_normalize_img=False)


def decoder_inputs(c, batch):
  d = dict(image=torch.rand(batch, 3, c['image_size'], c['image_size']) * 2 - 1,
           image_embed=torch.randn(batch, c['image_embed_dim']))
  if c.get('text_embed_dim'):
    d['text_encodings'] = torch.randn(batch, c['text_len'], c['text_embed_dim'])
  return d


def build_upsampler(c):
  """A two-Unet Decoder whose second Unet (low_res -> high_res) is the one trained."""
  base = dict(c['base']) if 'base' in c else dict(
      dim=8, dim_mults=(1,), num_resnet_blocks=0, image_embed_dim=c['image_embed_dim'])
  base.setdefault('image_embed_dim', c['image_embed_dim'])
  unets = (_unet(base), _unet(c, lowres=True))
  crop = c.get('crop_size')
  dec = d2.Decoder(unets, image_sizes=(c['low_res'], c['high_res']), timesteps=1000,
                   image_cond_drop_prob=0.1, text_cond_drop_prob=0.5,
                   learned_variance=(True, False), auto_normalize_img=False,
                   random_crop_sizes=(None, crop) if crop else None,
                   beta_schedule=('cosine', 'cosine'))
  return _attend_at_middle(dec, (base, c))


def upsampler_inputs(c, batch):
  return dict(image=torch.rand(batch, 3, c['high_res'], c['high_res']) * 2 - 1,
              image_embed=torch.randn(batch, c['image_embed_dim']), unet_number=2)


class UnetOnly(torch.nn.Module):
  """The decoder's Unet with the plain eps MSE: the conv-gradient comparison."""

  def __init__(self, c):
    super().__init__()
    self.unet = _unet(c)
    self.unet = self.unet.cast_model_parameters(
        lowres_cond=False, lowres_noise_cond=False, channels=3, channels_out=3,
        cond_on_image_embeds=True, cond_on_text_encodings=bool(c.get('text_embed_dim')))

  def forward(self, image, image_embed, text_encodings=None):
    t = torch.randint(0, 1000, (image.shape[0],))
    noise = torch.randn_like(image)
    out = self.unet(image + noise, t, image_embed=image_embed, text_encodings=text_encodings)
    return torch.nn.functional.mse_loss(out, noise)


BUILDERS = {
    'prior': (build_prior, prior_inputs),
    'decoder': (build_decoder, decoder_inputs),
    'upsampler': (build_upsampler, upsampler_inputs),
    'unet': (UnetOnly, lambda c, b: {k: v for k, v in decoder_inputs(c, b).items()}),
}


def trained_params(kind, model):
  if kind == 'upsampler':
    return list(model.unets[1].parameters())
  return [p for p in model.parameters() if p.requires_grad]


def count_params(kind, model):
  if kind == 'upsampler':
    return _params(model.unets[1])
  if kind == 'prior':
    return _params(model.net)
  if kind == 'decoder':
    return _params(model.unets[0])
  return _params(model)


# --- measurements ----------------------------------------------------------------------

def bench_train(c, model, make_inputs):
  kind, batch = c['kind'], c['batch']
  steps, warmup = c['train'].get('steps', 20), c['train'].get('warmup', 3)
  params = trained_params(kind, model)
  opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
  model.train()
  inputs = make_inputs(c, batch)

  def fresh():   # DiffusionPrior.forward scales image_embed in place: pass copies
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()}

  def step():
    loss = model(**fresh())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return float(loss.detach())

  fwd_flops = _count_flops(lambda: model(**fresh()))   # forward only, this batch
  times = []
  t_first = time.perf_counter()
  step()
  first = time.perf_counter() - t_first
  for _ in range(max(warmup - 1, 0)):
    step()
  for _ in range(steps):
    t0 = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  return dict(
      first_step_s=first, step_time_s=med, step_time_min_s=min(times),
      step_time_mean_s=statistics.fmean(times),
      step_time_iqr_s=(statistics.quantiles(times, n=4)[2] - statistics.quantiles(times, n=4)[0]
                       if len(times) >= 4 else 0.0),
      steps=steps, warmup=warmup, examples_per_s=batch / med,
      counted_fwd_flops_per_step=fwd_flops,
      counted_train_flops_per_step=3 * fwd_flops,
      achieved_flops_per_s=3 * fwd_flops / med, final_loss=loss)


def prior_ddim_timesteps(steps):
  """DiffusionPrior.p_sample_loop_ddim(timesteps=n) calls the network n - 1 times; asking
  for steps + 1 gives `steps` network calls, the same as ours (checked by model_calls)."""
  return steps + 1


@torch.no_grad()
def bench_sample_decoder(c, model, s):
  batch = s['batch']
  inp = decoder_inputs(c, batch)
  unet = model.unets[0]
  calls = _CallCounter(unet)
  model.sample_timesteps = (s['steps'],)
  model.eval()

  def run():
    return model.sample(image_embed=inp['image_embed'], text_encodings=inp.get('text_encodings'),
                        cond_scale=s.get('cond_scale', 1.0))
  return _time_runs(run, s, calls, batch)


@torch.no_grad()
def bench_sample_prior(c, model, s):
  batch = s['batch']
  cands = s.get('num_candidates', 1)
  inp = prior_inputs(c, batch)
  calls = _CallCounter(model.net)
  model.eval()

  def run():
    # DiffusionPrior.sample without CLIP: repeat for candidates, DDIM loop, keep the best.
    text_cond = dict(text_embed=inp['text_embed'].repeat_interleave(cands, 0),
                     text_encodings=inp['text_encodings'].repeat_interleave(cands, 0))
    emb = model.p_sample_loop((batch * cands, c['dim']), text_cond=text_cond,
                              cond_scale=s.get('cond_scale', 1.0),
                              timesteps=prior_ddim_timesteps(s['steps']))
    emb = emb.view(batch, cands, -1)
    sims = torch.einsum('brd,bd->br', d2.l2norm(emb), d2.l2norm(inp['text_embed']))
    return emb[torch.arange(batch), sims.argmax(-1)]
  return _time_runs(run, s, calls, batch)


def _time_runs(run, s, calls, batch):
  t0 = time.perf_counter()
  run()
  first = time.perf_counter() - t0
  n_calls = calls.n
  times = []
  for _ in range(s.get('repeats', 2)):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  return dict(steps=s['steps'], batch=batch, cond_scale=s.get('cond_scale', 1.0),
              first_run_s=first, latency_s=med, images_per_s=batch / med,
              model_calls=n_calls, repeats=len(times))


@torch.no_grad()
def bench_pipeline(c):
  """prior -> decoder -> upsampler(s) on one batch: the preset's sampling latency."""
  prior = build_prior(c['prior'])
  dec_c = c['decoder']
  unets = [_unet(dec_c)] + [_unet(u, lowres=True) for u in c.get('upsamplers', [])]
  sizes = (dec_c['image_size'],) + tuple(u['high_res'] for u in c.get('upsamplers', []))
  n = len(unets)
  decoder = d2.Decoder(tuple(unets) if n > 1 else unets[0], image_sizes=sizes, timesteps=1000,
                       image_cond_drop_prob=0.1, text_cond_drop_prob=0.5,
                       learned_variance=(True,) + (False,) * (n - 1),
                       auto_normalize_img=False, beta_schedule=('cosine',) * n,
                       sample_timesteps=tuple(c['steps'][1:1 + n]))
  _attend_at_middle(decoder, [dec_c] + list(c.get('upsamplers', [])))
  prior.eval()
  decoder.eval()
  batch, cands = c['batch'], c.get('num_candidates', 1)
  p_in = prior_inputs(c['prior'], batch)
  text_enc = (torch.randn(batch, dec_c['text_len'], dec_c['text_embed_dim'])
              if dec_c.get('text_embed_dim') else None)
  calls = [_CallCounter(prior.net)] + [_CallCounter(u) for u in decoder.unets]

  def run():
    text_cond = dict(text_embed=p_in['text_embed'].repeat_interleave(cands, 0),
                     text_encodings=p_in['text_encodings'].repeat_interleave(cands, 0))
    emb = prior.p_sample_loop((batch * cands, c['prior']['dim']), text_cond=text_cond,
                              cond_scale=c.get('prior_cond_scale', 1.0),
                              timesteps=prior_ddim_timesteps(c['steps'][0]))
    emb = emb.view(batch, cands, -1)
    sims = torch.einsum('brd,bd->br', d2.l2norm(emb), d2.l2norm(p_in['text_embed']))
    emb = emb[torch.arange(batch), sims.argmax(-1)]
    emb = emb[:, :dec_c['image_embed_dim']]
    return decoder.sample(image_embed=emb, text_encodings=text_enc,
                          cond_scale=(c.get('decoder_cond_scale', 1.0),) + (1.0,) * (n - 1))

  t0 = time.perf_counter()
  img = run()
  first = time.perf_counter() - t0
  n_calls = [k.n for k in calls]
  times = []
  for _ in range(c.get('repeats', 1)):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  return dict(steps=list(c['steps'][:1 + n]), batch=batch, image_shape=list(img.shape),
              first_run_s=first, latency_s=med, images_per_s=batch / med,
              model_calls=n_calls, repeats=len(times),
              params=dict(prior=_params(prior.net),
                          unets=[_params(u) for u in decoder.unets]))


def run_config(c):
  torch.manual_seed(c.get('seed', 0))
  rss0 = _rss_mb()
  out = dict(name=c['name'], kind=c['kind'], side='dalle2_pytorch')
  if c['kind'] == 'pipeline':
    out['sample'] = bench_pipeline(c)
  else:
    build, make_inputs = BUILDERS[c['kind']]
    model = build(c)
    out['params'] = count_params(c['kind'], model)
    out['batch'] = c['batch']
    if 'train' in c:
      out['train'] = bench_train(c, model, make_inputs)
    samples = []
    for s in c.get('sample', []):
      if c['kind'] == 'prior':
        samples.append(bench_sample_prior(c, model, s))
      elif c['kind'] == 'decoder':
        samples.append(bench_sample_decoder(c, model, s))
    if samples:
      out['sample'] = samples
  out['rss_before_model_mb'] = rss0
  out['peak_rss_mb'] = _rss_mb()
  return out


def measure_matmul_peak(n=2048, repeats=10):
  a, b = torch.randn(n, n), torch.randn(n, n)
  for _ in range(2):
    a @ b
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    a @ b
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / min(times)


def environment():
  return dict(python=platform.python_version(), torch=torch.__version__,
              dalle2_pytorch=getattr(dalle2_pytorch, '__version__', None) or _dist_version(),
              threads=torch.get_num_threads(), interop_threads=torch.get_num_interop_threads(),
              machine=platform.machine(), processor=platform.processor(),
              cpu_count=os.cpu_count())


def _dist_version():
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  return metadata.version('dalle2-pytorch')


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--spec', required=True, help="JSON spec file, or '-' for stdin")
  p.add_argument('--only', default='', help='run only the config with this name')
  p.add_argument('--matmul_peak', action='store_true', help='also measure an f32 matmul peak')
  p.add_argument('--params_only', action='store_true', help='only build models, count params')
  a = p.parse_args()
  spec = json.load(sys.stdin if a.spec == '-' else open(a.spec))
  torch.set_num_threads(spec.get('threads', 2))
  configs = [c for c in spec['configs'] if not a.only or c['name'] == a.only]
  if a.only and not configs:
    sys.exit(f'no config named {a.only!r} in the spec')
  if a.matmul_peak:
    print(json.dumps(dict(matmul_peak_flops_per_s=measure_matmul_peak(), env=environment())),
          flush=True)
  for c in configs:
    if a.params_only:
      if c['kind'] == 'pipeline':
        continue
      build = BUILDERS[c['kind']][0]
      print(json.dumps(dict(name=c['name'], params=count_params(c['kind'], build(c)))),
            flush=True)
      continue
    out = run_config(c)
    out['env'] = environment()
    print(json.dumps(out), flush=True)


if __name__ == '__main__':
  main()
