r"""Evaluates a trained unCLIP run: compositional accuracy, CLIP score, CLIP-space FD.

  python -m dalle2_jax.evaluate --workdir runs/shapes [--num_prompts 64] [--out eval.json]

Samples prompts from captioned_shapes' `test` (seen colour-shape pairs) and `heldout` (at
least one held-out pair) distributions in three styles, `full` (one object, every
attribute), `partial` (one object, some attributes) and `two` (two objects and their
relation); draws one image per prompt with the whole chain; and reports, as JSON:

  accuracy      per kind (test, heldout) and style: the spec's scoring rule
                (`dalle2_jax.data.scoring`), per attribute and overall
  two_object_outcomes
                per kind, how the two-object prompts' images went: right, an object
                missing or extra, the relation wrong, attributes swapped between the
                objects or one duplicated (`scoring.TWO_OBJECT_OUTCOMES`)
  summary       seen_overall (test, all styles), heldout_overall (heldout, all styles),
                two_object_overall (two-object prompts of both kinds), each with its target
                on the shapes default (0.90, 0.75, 0.60) and whether it is met
  clip_score    100 * cos(CLIP image, CLIP text) with the run's own CLIP, for the generated
                images and, as a reference, for the prompts' ground-truth renderings
  fd            Fréchet distance between generated images (test prompts) and real `test`
                split images in the run's CLIP image-embedding space

Images are scored at their generated size (the scorer scales its pixel thresholds).

  python -m dalle2_jax.evaluate --workdir runs/shapes --candidates 8 [--candidates_style two]

reports instead where the decoder's best of N loses (`candidates`): for each prompt of one
style, N decoder samples, each scored: how often one sample is right, how often any of the N
is (a perfect reranker) and how often CLIP's pick is.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

from dalle2_jax.evaluation import metrics

KINDS = ('test', 'heldout')
STYLES = ('full', 'partial', 'two')
IMAGE_EMBEDS = ('prior', 'ground_truth')
TARGETS = {'seen_overall': 0.90, 'heldout_overall': 0.75, 'two_object_overall': 0.60}


def real_images(config, split: str, num: int) -> np.ndarray:
  """`num` real images (uint8 [N, H, W, 3]) of a dataset split, through the input pipeline."""
  from dalle2_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  examples = pipeline.load_examples(config, split, num)
  images = np.asarray(examples['image'])
  if images.dtype != np.uint8:   # the pipeline's [-1, 1] floats
    images = np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)
  return images


def evaluate(unclip, *, num_prompts: int = 64, seed: int = 0, prompt_seed: int = 1234,
             settings=None, batch_size: int | None = None, num_real: int | None = None,
             image_embeds: str = 'prior', progress=None) -> dict[str, Any]:
  """Runs the evaluation; returns the JSON-able report (see the module docstring).

  Args:
    unclip: a `sampling.UnCLIP`.
    num_prompts: prompts per (kind, style); 2 kinds x 3 styles x num_prompts images in all.
    seed: sampling seed.
    prompt_seed: seed of the evaluation prompts (distinct from the dataset's).
    settings: `sampling.Settings` (default: the stages' config defaults).
    batch_size: images per jitted call (None = one call per kind).
    num_real: real `test` images for the FD (default: as many as generated test images).
    image_embeds: what the decoder decodes: 'prior' (the whole chain, text -> prior ->
      decoder) or 'ground_truth' (the CLIP image embedding of each prompt's ground-truth
      rendering, with the prompt as the decoder's caption: the decoder and upsamplers alone,
      so the gap between the two is the prior's share of the errors).
    progress: optional callback(done, total, seconds) per batch.
  """
  from dalle2_jax.data import captioned_shapes  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import scoring  # pylint: disable=g-import-not-at-top
  if num_prompts < 1:
    raise ValueError(f'num_prompts must be >= 1, got {num_prompts}.')
  if image_embeds not in IMAGE_EMBEDS:
    raise ValueError(f'image_embeds={image_embeds!r}; choose one of {IMAGE_EMBEDS}.')
  settings = settings or unclip.default_settings()
  unclip.validate(settings)
  t0 = time.time()
  report: dict[str, Any] = {'num_prompts_per_style': num_prompts, 'seed': seed,
                            'prompt_seed': prompt_seed, 'settings': settings.to_dict(),
                            'stages': list(unclip.stage_names), 'image_embeds': image_embeds}
  accuracy, results_by, embeds, outcomes = {}, {}, {}, {}
  clip_scores = {}
  for kind in KINDS:
    prompts = captioned_shapes.eval_prompts(kind, num_prompts, prompt_seed, styles=STYLES)
    captions = list(prompts['caption'])
    truth_embed = unclip.encode_image(np.asarray(prompts['image'], np.uint8))
    if image_embeds == 'prior':
      images = unclip(captions, seed=seed, settings=settings, batch_size=batch_size,
                      progress=progress)
    else:
      images = unclip.decode(truth_embed, seed=seed, prompts=captions, settings=settings,
                             batch_size=batch_size, progress=progress)
    images = np.asarray(images)
    results = scoring.score_images(images, prompts)
    styles = np.asarray(prompts['style'])
    accuracy[kind] = {s: scoring.aggregate([r for r, st in zip(results, styles) if st == s])
                      for s in STYLES}
    accuracy[kind]['all'] = scoring.aggregate(results)
    results_by[kind] = (results, styles)
    outcomes[kind] = scoring.two_object_outcomes(images, prompts)
    image_embed = unclip.encode_image(images)
    text_embed = unclip.encode_text(captions)
    embeds[kind] = image_embed
    clip_scores[kind] = {
        'generated': metrics.clip_score(image_embed, text_embed),
        'ground_truth': metrics.clip_score(truth_embed, text_embed),
    }
  report['accuracy'] = accuracy
  report['two_object_outcomes'] = outcomes

  two = [r for kind in KINDS for r, st in zip(*results_by[kind]) if st == 'two']
  summary = {
      'seen_overall': accuracy['test']['all']['overall'],
      'heldout_overall': accuracy['heldout']['all']['overall'],
      'two_object_overall': scoring.aggregate(two)['overall'],
      'two_object_seen': accuracy['test']['two']['overall'],
      'two_object_heldout': accuracy['heldout']['two']['overall'],
  }
  summary['targets'] = dict(TARGETS)
  summary['meets_targets'] = {k: bool(summary[k] >= v) for k, v in TARGETS.items()}
  report['summary'] = summary
  report['clip_score'] = clip_scores

  num_real = num_real or len(embeds['test'])
  real = real_images(unclip.config, unclip.config.data.get('eval_split', 'test'), num_real)
  real_embed = unclip.encode_image(real)
  report['fd'] = {
      'clip_image_embed_fd': metrics.frechet_distance_from_embeddings(embeds['test'],
                                                                      real_embed),
      'num_generated': int(len(embeds['test'])),
      'num_real': int(len(real_embed)),
      'embed_dim': int(real_embed.shape[-1]),
  }
  report['seconds'] = round(time.time() - t0, 1)
  return report


def candidates(unclip, *, num_candidates: int = 8, num_prompts: int = 64, seed: int = 0,
               prompt_seed: int = 1234, style: str = 'two', settings=None,
               batch_size: int | None = None, image_embeds: str = 'prior',
               progress=None) -> dict[str, Any]:
  """Where the decoder's best of N loses: N decoder samples for each prompt of `style`, each
  scored. The prompts and the prior's noise are `evaluate`'s; the N samples have noise of
  their own. Returns per kind: `per_candidate` (the accuracy of one sample), `any_right`
  (how often at least one of the N is right: what a perfect reranker would score),
  `clip_reranked` (the sample whose CLIP image embedding is closest to the prompt's text
  embedding, as the sampler's best of N picks, here at the final image size; with the
  decoder's rerank_mirror, plus the mirror image's cosine with the mirrored prompt) and, for
  two-object prompts, `outcomes` of all samples and of CLIP's picks.
  """
  from dalle2_jax import sampling  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import captioned_shapes  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import scoring  # pylint: disable=g-import-not-at-top
  if num_candidates < 1 or num_prompts < 1:
    raise ValueError(f'num_candidates and num_prompts must be >= 1, got {num_candidates} '
                     f'and {num_prompts}.')
  if style not in STYLES or image_embeds not in IMAGE_EMBEDS:
    raise ValueError(f'style={style!r}, image_embeds={image_embeds!r}; choose from '
                     f'{STYLES} and {IMAGE_EMBEDS}.')
  settings = (settings or unclip.default_settings()).replace_stage('decoder',
                                                                     num_candidates=1)
  unclip.validate(settings)
  t0 = time.time()
  report: dict[str, Any] = {'num_candidates': num_candidates, 'num_prompts': num_prompts,
                            'style': style, 'seed': seed, 'prompt_seed': prompt_seed,
                            'settings': settings.to_dict(), 'image_embeds': image_embeds}
  for kind in KINDS:
    prompts = captioned_shapes.eval_prompts(kind, num_prompts, prompt_seed, styles=STYLES)
    sel = np.nonzero(np.asarray(prompts['style']) == style)[0]
    captions = [prompts['caption'][i] for i in sel]
    if image_embeds == 'prior':
      embeds = unclip.image_embeddings(captions, seed=seed, settings=settings,
                                       batch_size=batch_size, indices=sel)
    else:
      embeds = unclip.encode_image(np.asarray(prompts['image'], np.uint8)[sel])
    repeat = lambda a: np.repeat(np.asarray(a), num_candidates, axis=0)
    images = np.asarray(unclip.decode(repeat(embeds), seed=seed, prompts=repeat(captions),
                                      settings=settings, batch_size=batch_size,
                                      progress=progress))
    shown = {k: repeat(np.asarray(prompts[k])[sel])
             for k in ('objects', 'num_objects', 'relation', 'names')}
    right = np.array([r['overall'] for r in scoring.score_images(images, shown)],
                     float).reshape(len(sel), num_candidates)
    def cosine(imgs, texts):
      return metrics.cosine(unclip.encode_image(imgs).reshape(len(sel), num_candidates, -1),
                            unclip.encode_text(texts)[:, None])
    sim = cosine(images, captions)
    if settings.decoder.rerank_mirror:
      sim = sim + cosine(images[:, :, ::-1], [sampling.mirror_caption(c) for c in captions])
    picked = sim.argmax(1) + np.arange(len(sel)) * num_candidates
    report[kind] = {'n': int(len(sel)), 'per_candidate': float(right.mean()),
                    'any_right': float(right.max(1).mean()),
                    'clip_reranked': float(right.reshape(-1)[picked].mean())}
    if style == 'two':
      report[kind]['outcomes'] = {
          'all': scoring.two_object_outcomes(images, shown),
          'clip_reranked': scoring.two_object_outcomes(
              images[picked], {k: v[picked] for k, v in shown.items()})}
  report['seconds'] = round(time.time() - t0, 1)
  return report


def main(argv):
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top
  from dalle2_jax import sampling  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    unclip = sampling.UnCLIP.from_workdir(f.workdir, dtype=f.dtype)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  if f.data_dir:
    with unclip.config.unlocked():
      unclip.config.data.data_dir = f.data_dir
  settings = unclip.default_settings()
  try:
    if f.preset:
      settings = settings.with_preset(f.preset)
    if f.prior_steps:
      settings = settings.replace_stage('prior', steps=f.prior_steps)
    if f.decoder_steps:
      settings = settings.replace_stage('decoder', steps=f.decoder_steps)
    settings = settings.replace_stage('prior', guidance_scale=f.prior_guidance_scale,
                                      num_candidates=f.prior_num_candidates,
                                      guidance_interval=sampling.parse_interval(
                                          f.prior_guidance_interval,
                                          'prior_guidance_interval'))
    settings = settings.replace_stage('decoder', guidance_scale=f.decoder_guidance_scale,
                                      image_embed_guidance_scale=(
                                          f.decoder_image_embed_guidance_scale),
                                      num_candidates=f.decoder_num_candidates,
                                      rerank_mirror=f.decoder_rerank_mirror,
                                      sampler=f.decoder_sampler, eta=f.decoder_eta,
                                      guidance_interval=sampling.parse_interval(
                                          f.decoder_guidance_interval,
                                          'decoder_guidance_interval'))
    if f.upsampler_steps:
      settings = settings.with_upsampler_steps([f.upsampler_steps])
    unclip.validate(settings)
  except ValueError as e:
    from absl import app  # pylint: disable=g-import-not-at-top
    raise app.UsageError(str(e)) from e

  def progress(done, total, seconds):
    print(f'  sampled {done}/{total} images ({seconds:.1f} s)', file=sys.stderr, flush=True)

  import contextlib  # pylint: disable=g-import-not-at-top
  with contextlib.redirect_stdout(sys.stderr):   # stdout carries only the JSON report
    if f.candidates:
      report = candidates(unclip, num_candidates=f.candidates, num_prompts=f.num_prompts,
                          seed=f.seed, style=f.candidates_style, settings=settings,
                          batch_size=f.batch_size or None, image_embeds=f.image_embeds,
                          progress=progress)
    else:
      report = evaluate(unclip, num_prompts=f.num_prompts, seed=f.seed, settings=settings,
                        batch_size=f.batch_size or None, image_embeds=f.image_embeds,
                        progress=progress)
  report['workdir'] = f.workdir
  text = json.dumps(report, indent=2)
  print(text)
  if f.out:
    from etils import epath  # pylint: disable=g-import-not-at-top
    epath.Path(f.out).write_text(text + '\n')
  return 0


def _define_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('workdir', None, 'The training workdir (stages in <workdir>/<stage>/export).')
  flags.DEFINE_integer('num_prompts', 64, 'Prompts per (kind, style); 6 x this many images.',
                       lower_bound=1)
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_enum('preset', None, ['fast', 'paper'], 'Steps preset (see sample.py).')
  flags.DEFINE_integer('prior_steps', None, 'Prior steps.', lower_bound=1)
  flags.DEFINE_integer('decoder_steps', None, 'Decoder steps.', lower_bound=1)
  flags.DEFINE_integer('upsampler_steps', None, 'Steps of every upsampler.', lower_bound=1)
  flags.DEFINE_float('prior_guidance_scale', None, 'Prior classifier-free guidance scale.',
                     lower_bound=0.0)
  flags.DEFINE_float('decoder_guidance_scale', None, 'Decoder classifier-free guidance '
                     'scale.', lower_bound=0.0)
  flags.DEFINE_float('decoder_image_embed_guidance_scale', None, "Decoder: the CLIP image "
                     "embedding's own guidance scale, --decoder_guidance_scale then the "
                     "caption's (1 = the caption guided given the embedding).",
                     lower_bound=0.0)
  flags.DEFINE_list('prior_guidance_interval', None, 'lo,hi: prior guidance only at '
                    'timesteps lo <= t < hi (0,T = every step).')
  flags.DEFINE_list('decoder_guidance_interval', None, 'lo,hi: decoder guidance only at '
                    'timesteps lo <= t < hi (0,T = every step).')
  from dalle2_jax import sampling  # pylint: disable=g-import-not-at-top
  flags.DEFINE_enum('decoder_sampler', None, list(sampling.SAMPLERS), 'Decoder sampler.')
  flags.DEFINE_float('decoder_eta', None, 'Decoder DDIM eta (0: deterministic, 1: as '
                     'stochastic as DDPM).', lower_bound=0.0)
  flags.DEFINE_integer('prior_num_candidates', None, 'Prior best of N.', lower_bound=1)
  flags.DEFINE_integer('decoder_num_candidates', None, 'Decoder best of N (CLIP reranking '
                       'against the prompt).', lower_bound=1)
  flags.DEFINE_bool('decoder_rerank_mirror', None, 'Decoder best of N also scores each '
                    "image's mirror image against the mirrored prompt (default: config).")
  flags.DEFINE_enum('image_embeds', 'prior', list(IMAGE_EMBEDS), "What the decoder decodes: "
                    "'prior' (the whole chain) or 'ground_truth' (CLIP image embeddings of "
                    "the prompts' true renderings: the decoder's share of the errors).")
  flags.DEFINE_integer('candidates', 0, 'Instead of the report: this many decoder samples '
                       'per prompt of --candidates_style, each scored (`candidates`: how often '
                       "one, any, and CLIP's pick is right).", lower_bound=0)
  flags.DEFINE_enum('candidates_style', 'two', list(STYLES), 'Prompt style for --candidates.')
  flags.DEFINE_integer('batch_size', 64, 'Images per jitted call (0 = all of a kind at '
                       'once); results do not depend on it.', lower_bound=0)
  flags.DEFINE_enum('dtype', None, ['float32', 'bfloat16'], 'Compute dtype override.')
  flags.DEFINE_string('data_dir', None, 'TFDS data dir of the real images (default: the '
                      "run's config.data.data_dir).")
  flags.DEFINE_string('out', None, 'Also write the JSON report to this file.')
  flags.mark_flag_as_required('workdir')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from dalle2_jax import cpu_flags  # pylint: disable=g-import-not-at-top
  cpu_flags.use_sampling_flags()
  _define_flags()
  app.run(main)
