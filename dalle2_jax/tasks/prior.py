"""Stage `prior`: a diffusion prior from CLIP text to CLIP image embeddings (unCLIP Sec. 2.1).

Training: a frozen CLIP (an export directory: `config.prior.clip_checkpoint`, or
<workdir>/clip/export when empty) embeds each batch inside `loss` (the engine passes the CLIP
params as `frozen`): text_embed z_t, text_encodings, text mask and image_embed z_i. The prior
(`models.prior.PriorTransformer`) learns to denoise the normalised z_i conditioned on z_t and
the text encodings, with `config.prior.diffusion` (paper: x0 objective, cosine schedule,
1000 steps), plain MSE. Text conditioning is dropped (replaced by learned null embeddings)
with probability `model.cond_drop_prob` for classifier-free guidance.

Embedding normalisation (`model.embed_norm`), applied to z_i (the diffused variable) and z_t
(the conditioning):
  'l2'           x / |x| * sqrt(D) (DALLE2-pytorch); samples come back as unit vectors.
  'standardize'  (x - mean) / std per dimension (Karlo), with mean/std of z_i and z_t over the
                 first `model.stats_examples` (4096) examples of the training split, computed
                 through the frozen CLIP when the task is built. They are stored *in the
                 params* as params['embed_stats'] = {image_mean, image_std, text_mean,
                 text_std} (1-D, zero gradient: Adam leaves them unchanged and the weight-decay
                 mask skips 1-D leaves), so every checkpoint and export carries them. The
                 prior's own weights are params['prior'].

Metrics (means over the batch; the cosines are in CLIP space over rows whose text was kept):
  loss, mse; cos_pred_image: cos(predicted z_i, true z_i) (the x0 prediction at the sampled
  noise level); cos_text_image: cos(z_t, z_i), the baseline that uses the text embedding as
  the image embedding; cos_pred_text: cos(predicted z_i, z_t).
Sampling (`sample_image_embed`): N candidates per prompt (`sample.num_candidates`, paper 2),
keep the one with the highest dot product with z_t (both unit-normalised), with
`sample.{sampler, steps, guidance_scale, spacing}`. `evaluate` compares sampled embeddings
with the true ones, against the text-embedding baseline.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax import diffusion as diffusion_lib
from dalle2_jax.models import clip as clip_lib
from dalle2_jax.models import layers
from dalle2_jax.models import prior as prior_lib
from dalle2_jax.tasks import base

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
EMBED_NORMS = ('l2', 'standardize')
STATS_KEYS = ('image_mean', 'image_std', 'text_mean', 'text_std')


def cosine(a, b):
  """Row-wise cosine similarity [B] of [B, D] arrays, float32."""
  return jnp.sum(clip_lib.l2_normalize(a) * clip_lib.l2_normalize(b), axis=-1)


def embed_stats(image_embeds, text_embeds, eps: float = 1e-6) -> dict[str, np.ndarray]:
  """Per-dimension mean and std (float32 numpy) of image and text embeddings [N, D]."""
  image_embeds = np.asarray(image_embeds, np.float64)
  text_embeds = np.asarray(text_embeds, np.float64)
  return {'image_mean': image_embeds.mean(0).astype(np.float32),
          'image_std': (image_embeds.std(0) + eps).astype(np.float32),
          'text_mean': text_embeds.mean(0).astype(np.float32),
          'text_std': (text_embeds.std(0) + eps).astype(np.float32)}


class PriorTask(base.Task):
  """The diffusion prior; CLIP is frozen."""

  name = 'prior'

  def __init__(self, config, stage, workdir, frozen_clip: clip_lib.FrozenClip | None = None,
               stats: Mapping[str, Any] | None = None):
    """`frozen_clip` and `stats` override loading the CLIP export / computing statistics
    from the training set (tests, notebooks)."""
    super().__init__(config, stage, workdir)
    sc = self.stage_config
    if frozen_clip is None:
      frozen_clip = clip_lib.FrozenClip.for_stage(sc, workdir)
    self.clip = frozen_clip
    m = sc.model
    self.embed_norm = m.get('embed_norm', 'l2')
    if self.embed_norm not in EMBED_NORMS:
      raise ValueError(f'config.{stage}.model.embed_norm={self.embed_norm!r}; choose one of '
                       f'{EMBED_NORMS}.')
    self.cond_drop_prob = float(m.get('cond_drop_prob', 0.1))
    if not 0.0 <= self.cond_drop_prob < 1.0:
      raise ValueError(f'config.{stage}.model.cond_drop_prob must be in [0, 1).')
    dtype_name = sc.get('dtype', 'float32')
    if dtype_name not in DTYPES:
      raise ValueError(f'config.{stage}.dtype={dtype_name!r}; choose one of {sorted(DTYPES)}.')
    diff_cfg = dict(sc.diffusion.to_dict() if hasattr(sc.diffusion, 'to_dict')
                    else sc.diffusion)
    diff_cfg.setdefault('discretized_nll', False)   # embeddings are not 8-bit pixels
    self.diffusion = diffusion_lib.GaussianDiffusion.from_config(diff_cfg)
    self.embed_dim = self.clip.embed_dim
    self.context_length = int(config.tokenizer.context_length)
    self.text_width = int(self.clip.config.text.width)
    self._model = prior_lib.PriorTransformer(
        embed_dim=self.embed_dim, width=int(m.width), depth=int(m.depth),
        num_heads=int(m.heads), context_length=self.context_length,
        text_width=self.text_width, mlp_dim=m.get('mlp_dim', None),
        activation=m.get('activation', 'gelu'),   # older priors' configs lack the field
        remat=bool(sc.get('remat', False)),
        attention_impl=m.get('attention_impl', 'xla'),
        text_encodings=bool(m.get('text_encodings', True)), dtype=DTYPES[dtype_name])
    layers.check_attention_impl(self._model.attention_impl, self._model.dtype,
                                field=f'config.{stage}.model.attention_impl',
                                dtype_field=f'config.{stage}.dtype')
    self.stats = None
    if self.embed_norm == 'standardize':
      if stats is None:
        stats = self.compute_stats(int(m.get('stats_examples', 4096)))
      self.stats = {k: np.asarray(stats[k], np.float32) for k in STATS_KEYS}
    if 'sample' not in sc:
      raise ValueError(f'config.{stage}.sample is missing (sampler, steps, guidance_scale, '
                       'num_candidates).')

  # --- model ------------------------------------------------------------------------------
  def model(self):
    return self._model

  def init(self, rng, batch):
    b = batch['tokens'].shape[0]
    params = self._model.init(
        rng, jnp.zeros((b, self.embed_dim)), jnp.zeros((b,), jnp.int32),
        jnp.zeros((b, self.embed_dim)), jnp.zeros((b, self.context_length, self.text_width)),
        jnp.ones((b, self.context_length), bool), jnp.zeros((b,), bool))['params']
    out = {'prior': params}
    if self.stats is not None:
      out['embed_stats'] = {k: jnp.asarray(v) for k, v in self.stats.items()}
    return out

  def frozen_params(self):
    return self.clip.params

  # --- embeddings -------------------------------------------------------------------------
  def encode(self, frozen, tokens, images=None):
    """Frozen CLIP -> (text_embed, text_encodings, text_mask, image_embed or None)."""
    frozen = self.clip.params if frozen is None else frozen
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.shape[-1] != self.context_length:
      raise ValueError(f'tokens have length {tokens.shape[-1]}; the prior was built for '
                       f'config.tokenizer.context_length={self.context_length}.')
    text_embed, text_enc, mask = clip_lib.encode_text(self.clip.config, frozen, tokens)
    image_embed = (None if images is None
                   else clip_lib.encode_image(self.clip.config, frozen, images))
    sg = jax.lax.stop_gradient
    return (sg(text_embed), sg(text_enc), mask,
            None if image_embed is None else sg(image_embed))

  def _stats(self, params):
    if self.embed_norm != 'standardize':
      return None
    if 'embed_stats' not in params:
      raise ValueError("embed_norm='standardize' but the params have no 'embed_stats' "
                       '(a checkpoint trained with embed_norm=l2?).')
    return jax.lax.stop_gradient(params['embed_stats'])

  def normalize(self, x, kind: str, stats=None):
    """CLIP space -> the prior's space ('image' or 'text' statistics)."""
    x = jnp.asarray(x, jnp.float32)
    if self.embed_norm == 'l2':
      return clip_lib.l2_normalize(x) * np.sqrt(self.embed_dim)
    return (x - stats[f'{kind}_mean']) / stats[f'{kind}_std']

  def denormalize(self, x, kind: str = 'image', stats=None):
    """The prior's space -> CLIP space ('l2': the unit vector of x)."""
    x = jnp.asarray(x, jnp.float32)
    if self.embed_norm == 'l2':
      return clip_lib.l2_normalize(x)
    return x * stats[f'{kind}_std'] + stats[f'{kind}_mean']

  def compute_stats(self, num: int, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Embedding statistics over the first `num` training examples through the frozen CLIP."""
    from dalle2_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
    from dalle2_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    ex = pipeline.load_examples(self.config, self.config.data.train_split, num,
                                image_size=self.clip.image_size)
    if len(ex['caption']) < 2:
      raise ValueError('Too few training examples for embedding statistics '
                       f'(config.{self.stage}.model.stats_examples, config.data).')
    tok = tokenizer_lib.Tokenizer.from_config(self.config)
    enc = jax.jit(lambda p, t, i: (clip_lib.encode_text(self.clip.config, p, t)[0],
                                   clip_lib.encode_image(self.clip.config, p, i)))
    imgs, txts = [], []
    n = len(ex['caption'])
    for s in range(0, n, batch_size):
      tokens = tok(ex['caption'][s:s + batch_size])
      images = ex['image'][s:s + batch_size].astype(np.float32) / 127.5 - 1.0
      pad = batch_size - len(tokens)   # one compiled shape
      tokens = np.pad(tokens, ((0, pad), (0, 0)))
      images = np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0)))
      t, i = enc(self.clip.params, tokens, images)
      txts.append(np.asarray(t)[:batch_size - pad])
      imgs.append(np.asarray(i)[:batch_size - pad])
    logging.info('Prior embedding statistics from %d training examples.', n)
    return embed_stats(np.concatenate(imgs), np.concatenate(txts))

  # --- training ---------------------------------------------------------------------------
  def _model_fn(self, params, text_embed_n, text_enc, mask, drop):
    """model_fn(x, t[, drop_cond]) of the diffusion API; with guidance the batch is doubled
    and the conditioning repeated to it."""
    def model_fn(x, t, drop_cond=None):
      cond = diffusion_lib.repeat_batch((text_embed_n, text_enc, mask), x.shape[0])
      d = drop if drop_cond is None else drop_cond
      return self._model.apply({'params': params['prior']}, x, t, *cond, d)
    return model_fn

  def loss(self, params, batch, rng, frozen=None, train=True):
    text_embed, text_enc, mask, image_embed = self.encode(frozen, batch['tokens'],
                                                          batch['image'])
    stats = self._stats(params)
    x0 = self.normalize(image_embed, 'image', stats)
    cond = self.normalize(text_embed, 'text', stats)
    b = x0.shape[0]
    rng_t, rng_n, rng_d = jax.random.split(rng, 3)
    t = self.diffusion.sample_timesteps(rng_t, b)
    noise = jax.random.normal(rng_n, x0.shape, jnp.float32)
    if train and self.cond_drop_prob > 0:
      drop = jax.random.bernoulli(rng_d, self.cond_drop_prob, (b,))
    else:
      drop = jnp.zeros((b,), bool)
    per_example, terms = self.diffusion.training_losses(
        self._model_fn(params, cond, text_enc, mask, drop), x0, t, noise)
    pred = self.denormalize(terms['pred_x0'], 'image', stats)
    keep = (~drop).astype(jnp.float32)
    kmean = lambda v: jnp.sum(v * keep) / jnp.maximum(jnp.sum(keep), 1.0)  # noqa: E731
    loss = jnp.mean(per_example)
    metrics = dict(
        loss=loss,
        mse=jnp.mean(terms['mse']),
        cos_pred_image=kmean(cosine(pred, image_embed)),
        cos_text_image=kmean(cosine(text_embed, image_embed)),
        cos_pred_text=kmean(cosine(pred, text_embed)),
    )
    if 'vlb' in terms:
      metrics['vlb'] = jnp.mean(terms['vlb'])
    return loss, metrics

  def flops_per_example(self) -> float:
    m = self.stage_config.model
    return prior_lib.flops_per_example(
        self.embed_dim, int(m.width), int(m.depth), self.context_length, self.text_width,
        m.get('mlp_dim', None), text_encodings=self._model.text_encodings)

  # --- sampling ---------------------------------------------------------------------------
  def sample_image_embed(self, params, frozen, tokens, rng, steps: int | None = None,
                         guidance_scale: float | None = None,
                         num_candidates: int | None = None, sampler: str | None = None,
                         spacing: str | None = None, guidance_interval=None,
                         return_candidates: bool = False):
    """CLIP image embeddings [B, D] for tokens [B, L] (traceable; arguments are static).

    Draws `num_candidates` samples per prompt and keeps the one whose (unit-normalised) dot
    product with the text embedding is highest. None = the value in `config.prior.sample`.
    Returns embeddings in CLIP space (unit norm with embed_norm='l2'), and with
    `return_candidates` also all candidates [B, N, D].
    """
    sc = self.stage_config.sample
    steps = int(steps or sc.get('steps', 64))
    guidance_scale = float(sc.get('guidance_scale', 1.0) if guidance_scale is None
                           else guidance_scale)
    n = int(num_candidates or sc.get('num_candidates', 2))
    sampler = sampler or sc.get('sampler', 'ddim')
    spacing = spacing or sc.get('spacing', 'trailing')
    guidance_interval = guidance_interval or sc.get('guidance_interval')
    text_embed, text_enc, mask, _ = self.encode(frozen, tokens)
    stats = self._stats(params)
    b = text_embed.shape[0]
    rep = lambda a: jnp.repeat(a, n, axis=0)  # noqa: E731  (prompt-major: [p0 x n, p1 x n])
    cond = self.normalize(text_embed, 'text', stats)
    model_fn = self._model_fn(params, rep(cond), rep(text_enc), rep(mask),
                              jnp.zeros((b * n,), bool))
    x = self.diffusion.sample(model_fn, (b * n, self.embed_dim), rng, sampler=sampler,
                              steps=steps, spacing=spacing, guidance_scale=guidance_scale,
                              guidance_interval=guidance_interval)
    cands = self.denormalize(x, 'image', stats).reshape(b, n, self.embed_dim)
    score = jnp.einsum('bnd,bd->bn', clip_lib.l2_normalize(cands), clip_lib.l2_normalize(text_embed))
    best = jnp.argmax(score, axis=1)
    chosen = jnp.take_along_axis(cands, best[:, None, None], axis=1)[:, 0]
    return (chosen, cands) if return_candidates else chosen

  def evaluate(self, params, frozen, batch, rng, mean_image_embed=None, real_embeds=None,
               **sample_kw) -> dict[str, jax.Array]:
    """Per-example cosines [B] of sampled prior embeddings with the true image embeddings.

    cos_pred_image: the prior's sample (best of N) vs the true z_i; cos_text_image: the text
    embedding as the image embedding (the baseline); cos_pred_text; cos_mean_image: a
    text-blind baseline, the mean true image embedding (`mean_image_embed`, default the
    batch's) vs each z_i. CLIP embeddings share a large common direction (and image and
    text embeddings lie in different cones), so beating cos_text_image mostly shows the
    prior lands in the image cone; beating cos_mean_image shows it uses the text. For each
    other batch['<name>_image'] (e.g. swap_image: images the captions are false of) also
    cos_pred_<name> and cos_text_<name>: the sample's and the text embedding's cosines with
    their embeddings. With `real_embeds` (unit true embeddings [M, D] of real images) also
    cos_nearest_real: the sample's cosine with the nearest of them other than its own image
    (batch['index'] [B], its row; -1 for none), how near the sample lies to some real
    image's embedding at all: a sample between real images (a blend of the embeddings the
    caption allows) scores low though its mean cosine may be fine.
    """
    text_embed, _, _, image_embed = self.encode(frozen, batch['tokens'], batch['image'])
    pred = self.sample_image_embed(params, frozen, batch['tokens'], rng, **sample_kw)
    if mean_image_embed is None:
      mean_image_embed = jnp.mean(clip_lib.l2_normalize(image_embed), axis=0)
    mean = jnp.broadcast_to(jnp.asarray(mean_image_embed, jnp.float32), image_embed.shape)
    out = dict(cos_pred_image=cosine(pred, image_embed),
               cos_text_image=cosine(text_embed, image_embed),
               cos_pred_text=cosine(pred, text_embed),
               cos_mean_image=cosine(mean, image_embed))
    if real_embeds is not None:
      sims = clip_lib.l2_normalize(pred) @ jnp.asarray(real_embeds, jnp.float32).T   # [B, M]
      own = batch['index'][:, None] == jnp.arange(sims.shape[1])[None]
      out['cos_nearest_real'] = jnp.max(jnp.where(own, -1.0, sims), axis=-1)
    for key in batch:   # other scenes to compare with (evaluate_split)
      if key.endswith('_image') and key != 'image':
        other = jax.lax.stop_gradient(clip_lib.encode_image(self.clip.config, frozen, batch[key]))
        name = key[:-len('_image')]
        out[f'cos_pred_{name}'] = cosine(pred, other)
        out[f'cos_text_{name}'] = cosine(text_embed, other)
    return out


# --- evaluation on a dataset split ----------------------------------------------------------

def evaluate_split(task: PriorTask, params, split: str, num: int, seed: int = 0,
                   batch_size: int = 128, **sample_kw) -> dict[str, float]:
  """Mean cosines over the first `num` examples of `split`: sampled prior embeddings vs the
  true CLIP image embeddings, and the text-embedding baseline (see `PriorTask.evaluate`);
  cos_nearest_real against the split's other examples, and cos_nearest_real_true, the same
  for the true embeddings (what a prior that draws real images' embeddings would score).

  On captioned_shapes also colour_binding: of the two-object examples whose caption the
  objects' colours swapped would make false (num_colour_binding of them), how often the
  sample is nearer (cosine) the true image's CLIP embedding than the swapped image's; and
  colour_binding_text, the same for the caption's text embedding. 50% is no binding: the
  two embeddings are close, so this tests the detail that decides which object gets which
  colour. And shape_match: of the one-object examples whose caption names the shape
  (num_shape_match; shape_match_partial over those whose caption leaves out an attribute),
  how often the sample is nearer the scene drawn with that shape than with each other
  shape (all three drawn without jitter); shape_match_text for the text embedding. A third
  is chance."""
  from dalle2_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import captioned_shapes  # pylint: disable=g-import-not-at-top
  ex = pipeline.load_examples(task.config, split, num, image_size=task.clip.image_size)
  n = len(ex['caption'])
  if not n:
    raise ValueError(f'Split {split!r} has no examples.')
  tok = tokenizer_lib.Tokenizer.from_config(task.config)
  frozen = task.frozen_params()
  # captioned_shapes: the two-object scenes whose colours, swapped, make the caption false
  # (held-out pairs allowed: nothing here trains)
  swappable = (captioned_shapes.colour_swap_applies(ex['objects'], ex['num_objects'],
                                                    ex['names'], allow_held_out=True)
               if 'objects' in ex else None)
  if swappable is not None:   # one named shape: the scene drawn with each shape
    reshapeable = captioned_shapes.shape_change_applies(ex['num_objects'], ex['names'])
    partial = ~np.asarray(ex['names'], bool).all(-1)
    size = task.clip.image_size
    drawn = np.zeros((n, len(captioned_shapes.SHAPES), size, size, 3), np.uint8)
    for i in np.flatnonzero(reshapeable):
      drawn[i] = [pipeline.decode_image(im, size) for im in
                  captioned_shapes.render_each_shape(ex['objects'][i])]

  def batches(compare: bool = True):   # compare: also the scenes the samples are scored against
    for s in range(0, n, batch_size):
      tokens = tok(ex['caption'][s:s + batch_size])
      images = ex['image'][s:s + batch_size].astype(np.float32) / 127.5 - 1.0
      m = len(tokens)
      pad = batch_size - m     # one compiled shape
      batch = dict(tokens=np.pad(tokens, ((0, pad), (0, 0))),
                   image=np.pad(images, ((0, pad), (0, 0), (0, 0), (0, 0))),
                   index=np.pad(np.arange(s, s + m), (0, pad), constant_values=-1))
      if compare and swappable is not None:
        batch['swap_image'] = captioned_shapes.swap_colours_where(
            batch['image'], ex['objects'][s:s + m], swappable[s:s + m])
        for k in range(drawn.shape[1]):
          batch[f'shape{k}_image'] = np.pad(drawn[s:s + m, k].astype(np.float32) / 127.5 - 1,
                                            ((0, pad), (0, 0), (0, 0), (0, 0)))
      yield s, m, batch

  # the split's (unit) image embeddings: their mean for the text-blind baseline, each
  # sample's nearest for cos_nearest_real (and each true embedding's nearest other one)
  enc = jax.jit(lambda b: clip_lib.l2_normalize(task.encode(frozen, b['tokens'], b['image'])[3]))
  real = np.concatenate([np.asarray(enc(b))[:m] for _, m, b in batches(compare=False)])
  mean = real.mean(0)
  run = jax.jit(lambda p, b, r: task.evaluate(p, frozen, b, r, mean_image_embed=mean,
                                              real_embeds=real if n > 1 else None,
                                              **sample_kw))
  sums: dict[str, float] = {}
  wins = dict.fromkeys(('colour_binding', 'colour_binding_text', 'shape_match',
                        'shape_match_text', 'shape_match_partial'), 0)
  for s, m, batch in batches():
    out = {k: np.asarray(v)[:m] for k, v in
           run(params, batch, jax.random.fold_in(jax.random.PRNGKey(seed), s)).items()}
    if swappable is not None:
      pick = swappable[s:s + m]
      true_shape = ex['objects'][s:s + m, 0, captioned_shapes.SHAPE]
      for kind in ('pred', 'text'):
        suffix = '_text' if kind == 'text' else ''
        win = out[f'cos_{kind}_image'] > out.pop(f'cos_{kind}_swap')
        wins['colour_binding' + suffix] += int(np.sum(win[pick]))
        cos = np.stack([out.pop(f'cos_{kind}_shape{k}') for k in range(drawn.shape[1])], -1)
        right = (np.argmax(cos, -1) == true_shape) & reshapeable[s:s + m]
        wins['shape_match' + suffix] += int(np.sum(right))
        if kind == 'pred':
          wins['shape_match_partial'] += int(np.sum(right & partial[s:s + m]))
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + float(np.sum(v))
  result = {k: v / n for k, v in sums.items()}
  result['gain_over_text_baseline'] = result['cos_pred_image'] - result['cos_text_image']
  result['gain_over_mean_baseline'] = result['cos_pred_image'] - result['cos_mean_image']
  if n > 1:
    sims = real @ real.T
    np.fill_diagonal(sims, -1.0)
    result['cos_nearest_real_true'] = float(sims.max(1).mean())
  result['num_examples'] = n
  if swappable is not None:
    counts = dict(colour_binding=int(swappable.sum()), shape_match=int(reshapeable.sum()),
                  shape_match_partial=int((reshapeable & partial).sum()))
    for key, count in counts.items():
      if count:
        result.update({k: wins[k] / count for k in (key, key + '_text') if k in wins})
        result[f'num_{key}'] = count
  return result


def main(argv):
  """python -m dalle2_jax.tasks.prior --workdir W [--stage prior] [--splits test,heldout]"""
  del argv
  import json  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from dalle2_jax.training import export  # pylint: disable=g-import-not-at-top
  from dalle2_jax import sampling  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  try:
    interval = sampling.parse_interval(f.guidance_interval, 'guidance_interval')
  except ValueError as e:
    from absl import app  # pylint: disable=g-import-not-at-top
    raise app.UsageError(str(e)) from e
  config, stage, params = export.load_export(os.path.join(f.workdir, f.stage, 'export'))
  params = jax.tree.map(jnp.asarray, params)
  task = PriorTask(config, stage, f.workdir, stats=params.get('embed_stats'))
  kw = {k: getattr(f, k) for k in ('steps', 'guidance_scale', 'num_candidates', 'sampler')
        if getattr(f, k) is not None}
  if interval:
    kw['guidance_interval'] = interval
  results = {split: evaluate_split(task, params, split, f.num, **kw)
             for split in f.splits.split(',')}
  print(json.dumps(results, indent=2))


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string('workdir', None, 'Experiment workdir (holds <stage>/export).',
                      required=True)
  flags.DEFINE_string('stage', 'prior', 'Prior stage section name.')
  flags.DEFINE_string('splits', 'test,heldout', 'Comma-separated dataset splits.')
  flags.DEFINE_integer('num', 512, 'Examples per split.')
  flags.DEFINE_integer('steps', None, 'Sampling steps (default: config).')
  flags.DEFINE_float('guidance_scale', None, 'Guidance scale (default: config).')
  flags.DEFINE_integer('num_candidates', None, 'Candidates per prompt (default: config).')
  flags.DEFINE_string('sampler', None, 'ddim | ddpm | dpmpp_2m (default: config).')
  flags.DEFINE_list('guidance_interval', None, 'lo,hi: guidance only at timesteps lo <= t < '
                    'hi (default: config).')
  app.run(main)
