r"""Draws images from trained unCLIP stages (text -> image, and the paper's manipulations).

  python sample.py --workdir runs/shapes --prompt "a large red circle in the top left"
  python sample.py --workdir runs/shapes --prompts_file prompts.txt --num_images_per_prompt 4 \
      --preset fast --outdir samples/
  python sample.py --workdir runs/shapes --mode variations --image in.png --num_images_per_prompt 4
  python sample.py --workdir runs/shapes --mode interpolate --image a.png --image b.png --frames 8
  python sample.py --workdir runs/shapes --mode interpolate --prompt "a red circle" \
      --prompt "a blue square" --frames 8
  python sample.py --workdir runs/shapes --mode text_diff --image in.png \
      --from_caption "a red circle" --to_caption "a red square" --frames 6
  python sample.py --workdir runs/shapes --mode inpaint --image in.png --mask mask.png \
      --prompt "a green triangle"

Every stage is read from its export, <workdir>/<stage>/export (or `--export stage=DIR`),
which carries its own config; nothing about the architecture is given here. Writes
0000.png, 0001.png, ... (prompt order; all images of a prompt together), grid.png and
samples.jsonl (file, prompt, seed, index, settings) to --outdir.
"""

import sys
import time

from absl import app
from absl import flags

_MODES = ('generate', 'variations', 'interpolate', 'text_diff', 'inpaint')
_SAMPLERS = ('ddim', 'ddpm', 'dpmpp_2m')

_WORKDIR = flags.DEFINE_string('workdir', None, 'The training workdir; stages are read from '
                               '<workdir>/<stage>/export.')
_EXPORT = flags.DEFINE_multi_string('export', [], 'STAGE=DIR: read this stage from an export '
                                    'directory instead of the workdir (repeatable).')
_MODE = flags.DEFINE_enum('mode', 'generate', _MODES, 'What to draw.')
_PROMPT = flags.DEFINE_multi_string('prompt', [], 'A prompt (repeatable). "" gives an '
                                    'unconditional sample.')
_PROMPTS_FILE = flags.DEFINE_string('prompts_file', None, 'A text file, one prompt a line.')
_IMAGE = flags.DEFINE_multi_string('image', [], 'Input image (variations, interpolate, '
                                   'text_diff, inpaint).')
_MASK = flags.DEFINE_string('mask', None, 'inpaint: mask image, white = regenerate.')
_NUM = flags.DEFINE_integer('num_images_per_prompt', 1, 'Images per prompt (or per input '
                            'image for variations).', lower_bound=1)
_FRAMES = flags.DEFINE_integer('frames', 8, 'interpolate/text_diff: number of frames.',
                               lower_bound=2)
_MAX_THETA = flags.DEFINE_float('max_theta', 0.5, 'text_diff: the last frame\'s slerp angle '
                                'fraction (the paper goes to 0.5).', lower_bound=0.0,
                                upper_bound=1.0)
_FROM_CAPTION = flags.DEFINE_string('from_caption', None, 'text_diff: caption of the input.')
_TO_CAPTION = flags.DEFINE_string('to_caption', None, 'text_diff: caption to move towards.')
_RESAMPLE = flags.DEFINE_integer('inpaint_resample', 4, 'inpaint: RePaint resampling jumps '
                                 'per step (1 = none).', lower_bound=1)
_SEED = flags.DEFINE_integer('seed', 0, 'Random seed; the same seed gives the same images.')
_PRESET = flags.DEFINE_enum('preset', None, ['fast', 'paper'], 'Steps of prior/decoder/'
                            'upsamplers: fast = 25/25/7, paper = 64/250/27/15. Per-stage '
                            'flags override it.')
_PRIOR_SAMPLER = flags.DEFINE_enum('prior_sampler', None, _SAMPLERS, 'Prior sampler.')
_PRIOR_STEPS = flags.DEFINE_integer('prior_steps', None, 'Prior steps.', lower_bound=1)
_PRIOR_GUIDANCE = flags.DEFINE_float('prior_guidance_scale', None, 'Prior classifier-free '
                                     'guidance scale (1 = none).', lower_bound=0.0)
_PRIOR_INTERVAL = flags.DEFINE_list('prior_guidance_interval', None, 'lo,hi: prior guidance '
                                    'only at timesteps lo <= t < hi of the T training '
                                    'timesteps (0,T = every step).')
_PRIOR_ETA = flags.DEFINE_float('prior_eta', None, 'Prior DDIM eta.', lower_bound=0.0)
_PRIOR_CANDIDATES = flags.DEFINE_integer('prior_num_candidates', None, 'Prior best of N: '
                                         'N image embeddings, the closest to the text '
                                         'embedding is kept.', lower_bound=1)
_DECODER_SAMPLER = flags.DEFINE_enum('decoder_sampler', None, _SAMPLERS, 'Decoder sampler.')
_DECODER_STEPS = flags.DEFINE_integer('decoder_steps', None, 'Decoder steps.', lower_bound=1)
_DECODER_GUIDANCE = flags.DEFINE_float('decoder_guidance_scale', None, 'Decoder '
                                       'classifier-free guidance scale.', lower_bound=0.0)
_DECODER_EMBED_GUIDANCE = flags.DEFINE_float(
    'decoder_image_embed_guidance_scale', None, "Decoder: the CLIP image embedding's own "
    "guidance scale, --decoder_guidance_scale then being the caption's given the embedding "
    '(1 = the embedding unguided; default: config, else one scale for both).',
    lower_bound=0.0)
_DECODER_INTERVAL = flags.DEFINE_list('decoder_guidance_interval', None, 'lo,hi: decoder '
                                      'guidance only at timesteps lo <= t < hi of the T '
                                      'training timesteps (0,T = every step).')
_DECODER_ETA = flags.DEFINE_float('decoder_eta', None, 'Decoder DDIM eta.', lower_bound=0.0)
_DECODER_CANDIDATES = flags.DEFINE_integer('decoder_num_candidates', None, 'Decoder best of '
                                           'N (CLIP reranking): N images, the one whose CLIP '
                                           'image embedding is closest to the prompt is kept. '
                                           'Costs N decoder samples.', lower_bound=1)
_DECODER_RERANK_MIRROR = flags.DEFINE_bool(
    'decoder_rerank_mirror', None, "Decoder best of N also scores each image's mirror image "
    "(flipped left to right) against the prompt with 'left' and 'right' exchanged "
    '(default: config).')
_UPSAMPLER_SAMPLER = flags.DEFINE_enum('upsampler_sampler', None, _SAMPLERS,
                                       'Upsampler sampler (all upsamplers).')
_UPSAMPLER_STEPS = flags.DEFINE_list('upsampler_steps', None, 'Upsampler steps: one value, or '
                                     'one per upsampler stage (e.g. 27,15).')
_UPSAMPLER_ETA = flags.DEFINE_float('upsampler_eta', None, 'Upsampler DDIM eta.',
                                    lower_bound=0.0)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Images per jitted call (0 = all at '
                                   'once); results do not depend on it.', lower_bound=0)
_UPSAMPLE = flags.DEFINE_bool('upsample', True, 'Run the upsampler stages (--noupsample: '
                              'stop at the decoder\'s resolution).')
_DTYPE = flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], 'Compute dtype of every '
                           'stage (default: each stage\'s config).')
_ATTENTION_IMPL = flags.DEFINE_enum(
    'attention_impl', None, ['xla', 'cudnn'], "The prior's and decoder's attention (default: "
    "each stage's config): 'cudnn' is cuDNN's fused flash attention, NVIDIA GPUs in bfloat16.")
_OUTDIR = flags.DEFINE_string('outdir', 'samples', 'Where images, grid.png and samples.jsonl '
                              'go.')


@flags.validator('upsampler_steps', 'must be positive integers, e.g. 27,15')
def _check_upsampler_steps(value):
  return value is None or all(v.strip().isdigit() and int(v) >= 1 for v in value)


@flags.multi_flags_validator(['workdir', 'export'],
                             'give --workdir, or --export STAGE=DIR for every stage')
def _check_source(values):
  return bool(values['workdir']) or bool(values['export'])


@flags.validator('export', 'must be STAGE=DIR, e.g. --export decoder=runs/x/decoder/export')
def _check_export(values):
  return all('=' in v and v.split('=', 1)[0] and v.split('=', 1)[1] for v in values)


def _prompts() -> list[str]:
  prompts = list(_PROMPT.value)
  if _PROMPTS_FILE.value:
    from etils import epath  # pylint: disable=g-import-not-at-top
    path = epath.Path(_PROMPTS_FILE.value)
    if not path.exists():
      raise app.UsageError(f'--prompts_file {path} does not exist.')
    prompts += [line.rstrip('\r') for line in path.read_text().split('\n')
                if line.strip()]
  return prompts


def _check_mode_inputs(prompts):
  """Argument errors for the mode's inputs, raised before anything loads or compiles."""
  mode, images = _MODE.value, _IMAGE.value
  if mode == 'generate' and not prompts:
    raise app.UsageError('Give at least one --prompt or a --prompts_file ("" for an '
                         'unconditional sample).')
  if mode == 'variations' and not images:
    raise app.UsageError('--mode variations needs --image (repeatable).')
  if mode == 'interpolate' and not (len(images) == 2 and not prompts or
                                    len(prompts) == 2 and not images):
    raise app.UsageError('--mode interpolate needs exactly two --image or two --prompt.')
  if mode == 'text_diff' and (len(images) != 1 or _FROM_CAPTION.value is None or
                              _TO_CAPTION.value is None):
    raise app.UsageError('--mode text_diff needs one --image, --from_caption and '
                         '--to_caption.')
  if mode == 'inpaint' and (len(images) != 1 or not _MASK.value or len(prompts) > 1):
    raise app.UsageError('--mode inpaint needs one --image, a --mask and at most one '
                         '--prompt.')


def _settings(unclip):
  """Config defaults, then --preset, then per-stage flags; validated against the stages."""
  from dalle2_jax import sampling  # pylint: disable=g-import-not-at-top
  settings = unclip.default_settings(_MODE.value)
  try:
    if _PRESET.value:
      settings = settings.with_preset(_PRESET.value)
    settings = settings.replace_stage(
        'prior', sampler=_PRIOR_SAMPLER.value, steps=_PRIOR_STEPS.value,
        guidance_scale=_PRIOR_GUIDANCE.value, eta=_PRIOR_ETA.value,
        num_candidates=_PRIOR_CANDIDATES.value,
        guidance_interval=sampling.parse_interval(_PRIOR_INTERVAL.value,
                                                 'prior_guidance_interval'))
    settings = settings.replace_stage(
        'decoder', sampler=_DECODER_SAMPLER.value, steps=_DECODER_STEPS.value,
        guidance_scale=_DECODER_GUIDANCE.value, eta=_DECODER_ETA.value,
        image_embed_guidance_scale=_DECODER_EMBED_GUIDANCE.value,
        num_candidates=_DECODER_CANDIDATES.value,
        rerank_mirror=_DECODER_RERANK_MIRROR.value,
        guidance_interval=sampling.parse_interval(_DECODER_INTERVAL.value,
                                                 'decoder_guidance_interval'))
    settings = settings.replace_stage('upsamplers', sampler=_UPSAMPLER_SAMPLER.value,
                                      eta=_UPSAMPLER_ETA.value)
    if _UPSAMPLER_STEPS.value:
      settings = settings.with_upsampler_steps([int(v) for v in _UPSAMPLER_STEPS.value])
    unclip.validate(settings)
    if _MODE.value == 'inpaint' and settings.decoder.sampler not in ('ddim', 'ddpm'):
      raise ValueError(f'--mode inpaint needs --decoder_sampler ddim or ddpm (the decoder '
                       f'samples with {settings.decoder.sampler!r}).')
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  return settings


def _progress(done, total, seconds):
  print(f'sampled {done}/{total} images ({seconds:.1f} s)', flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  prompts = _prompts()
  _check_mode_inputs(prompts)

  # pylint: disable=g-import-not-at-top
  import numpy as np
  from dalle2_jax import sampling
  # pylint: enable=g-import-not-at-top

  exports = dict(v.split('=', 1) for v in _EXPORT.value)
  t0 = time.time()
  try:
    unclip = sampling.UnCLIP.from_workdir(_WORKDIR.value, exports=exports,
                                          dtype=_DTYPE.value,
                                          attention_impl=_ATTENTION_IMPL.value,
                                          upsamplers=_UPSAMPLE.value)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  settings = _settings(unclip)
  print(f'loaded stages {unclip.stage_names} in {time.time() - t0:.1f} s; '
        f'{len(unclip.devices)} device(s)', flush=True)

  mode, seed, num = _MODE.value, _SEED.value, _NUM.value
  try:   # input files are read (and named if unreadable) before anything compiles
    inputs = [unclip.load_image(path) for path in _IMAGE.value]
    mask = unclip.load_mask(_MASK.value) if mode == 'inpaint' else None
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'sampling ({mode}); the first batch compiles the chain', flush=True)
  common = dict(seed=seed, settings=settings, progress=_progress,
                batch_size=_BATCH_SIZE.value or None)
  base = {'mode': mode, 'seed': seed, 'settings': settings.to_dict(),
          'dtype': unclip.dtypes, 'attention_impl': unclip.attention_impls}
  records, ncols = [], None
  if mode == 'generate':
    images = unclip(prompts, num_images_per_prompt=num, **common)
    for p, prompt in enumerate(prompts):
      for k in range(num):
        records.append({**base, 'prompt': prompt, 'prompt_index': p, 'sample_index': k,
                        'index': p * num + k})
  elif mode == 'variations':
    images = unclip.variations(np.stack(inputs), num_variations=num, **common)
    for p, path in enumerate(_IMAGE.value):
      for k in range(num):
        records.append({**base, 'image': path, 'image_index': p, 'sample_index': k,
                        'index': p * num + k})
  elif mode == 'interpolate':
    ends = prompts if prompts else inputs
    names = prompts if prompts else _IMAGE.value
    images = unclip.interpolate(ends[0], ends[1], frames=_FRAMES.value, **common)
    for k in range(_FRAMES.value):
      records.append({**base, 'from': names[0], 'to': names[1], 'frame': k,
                      't': k / (_FRAMES.value - 1), 'index': k})
    ncols = _FRAMES.value
  elif mode == 'text_diff':
    thetas = np.linspace(0.0, _MAX_THETA.value, _FRAMES.value)
    images = unclip.text_diff(inputs[0], _FROM_CAPTION.value, _TO_CAPTION.value,
                              thetas=thetas, **common)
    for k, theta in enumerate(thetas):
      records.append({**base, 'image': _IMAGE.value[0], 'from_caption': _FROM_CAPTION.value,
                      'to_caption': _TO_CAPTION.value, 'theta': float(theta), 'index': k})
    ncols = _FRAMES.value
  else:  # inpaint
    prompt = prompts[0] if prompts else ''
    images = unclip.inpaint(inputs[0], mask, prompt, num_images=num,
                            resample=_RESAMPLE.value, **common)
    for k in range(num):
      records.append({**base, 'image': _IMAGE.value[0], 'mask': _MASK.value,
                      'prompt': prompt, 'sample_index': k, 'index': k})
  if mode in ('generate', 'variations', 'inpaint') and num > 1:
    ncols = num
  paths = sampling.write_samples(_OUTDIR.value, np.asarray(images), records, ncols=ncols)
  print(f'wrote {len(paths)} images, grid.png and samples.jsonl to {_OUTDIR.value} '
        f'({time.time() - t0:.1f} s in all)', flush=True)
  return 0


if __name__ == '__main__':
  from dalle2_jax import cpu_flags  # pylint: disable=g-import-not-at-top
  cpu_flags.use_sampling_flags()
  app.run(main)
