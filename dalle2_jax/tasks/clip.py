"""Stage `clip`: contrastive image-text pre-training (CLIP) over the global batch.

Loss: the symmetric InfoNCE of CLIP. Image and text embeddings are L2-normalised,
logits = exp(logit_scale) (clamped at 100) * image_embeds @ text_embeds.T over the
*global* batch, and the loss is the mean of the cross-entropies in both directions with the
matching pair as the target. Under `jax.jit` with the batch sharded over the mesh, the
[B, B] similarity is over the global batch: XLA gathers the (small) embeddings, so every
device contrasts against every other device's negatives, and 1 or N devices give the same
loss on the same global batch.

Metrics: loss, logit_scale (the clamped exp), i2t_top1 / t2i_top1 (in-batch retrieval
accuracy: image -> its caption, caption -> its image).

Config (`config.clip`, see configs/tiny.py): image_size, model.embed_dim,
model.logit_scale_init, model.text.{width, depth, heads, vocab_size, activation, ...},
model.vision.{width, depth, heads, patch_size, activation, ...}, dtype, remat, and
recolour_prob (captioned_shapes only: the fraction of examples whose objects get random
off-palette colours and whose caption loses its colour words; see
`tasks/recolour.py`. It makes the image tower's shape and position features independent of
colour, which is what zero-shot accuracy on the held-out pairs needs), and hard_negatives
(captioned_shapes only: NegCLIP's hard negative captions, see `tasks/hard_negatives.py`;
the metric hard_negative_top1 is how often an image scores its caption above its hard
negative), and mirror_negatives (captioned_shapes only: 'left_right' or 'both'; each image
mirrored as a hard negative image for a caption the mirror makes false; metric mirror_top1)
and colour_swap_negatives / relocate_negatives / extra_object_negatives (captioned_shapes
only: a two-object image with its objects' colours exchanged / its second object moved to a
cell that makes the relation false / an image with one object copied into an empty cell, as
that hard negative image instead; counted in mirror_top1).
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import optax

from dalle2_jax.models import clip as clip_lib
from dalle2_jax.tasks import base
from dalle2_jax.tasks import hard_negatives as hard_negatives_lib
from dalle2_jax.tasks import recolour as recolour_lib

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


def _dtype(name: str):
  if name not in DTYPES:
    raise ValueError(f'Unknown dtype {name!r}; choose one of {sorted(DTYPES)} '
                     '(config field clip.dtype).')
  return DTYPES[name]


def contrastive_loss(image_embed: jax.Array, text_embed: jax.Array, scale: jax.Array,
                     negative_embed: jax.Array | None = None,
                     has_negative: jax.Array | None = None,
                     mirror_embed: jax.Array | None = None,
                     has_mirror: jax.Array | None = None
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric CLIP loss over all pairs of the (global) batch; embeddings unnormalised.

  negative_embed [B, D] or [B, K, D]: hard negative captions' text embeddings (NegCLIP),
  appended as extra texts in the image -> text direction only (each image is contrasted with
  B true captions and B x K hard negatives; text -> image gets none). has_negative [B] or [B, K] bool leaves out the
  negatives an example does not have.

  mirror_embed [B, D]: each image mirrored (`config.clip.mirror_negatives`),
  appended in the text -> image direction as one extra image for its own caption only, where
  has_mirror [B] says the mirror is false of the caption (`tasks.hard_negatives.
  MirrorNegatives`); the metric mirror_top1 is how often a caption scores its image above
  the mirror.
  """
  img = clip_lib.l2_normalize(image_embed)
  txt = clip_lib.l2_normalize(text_embed)
  logits = scale * img @ txt.T                       # [B_images, B_texts], float32
  labels = jnp.arange(logits.shape[0])
  i2t = logits
  metrics = {}
  if negative_embed is not None:
    b = negative_embed.shape[0]
    negative_embed = negative_embed.reshape(b, -1, negative_embed.shape[-1])   # [B, K, D]
    k = negative_embed.shape[1]
    neg = scale * img @ clip_lib.l2_normalize(negative_embed.reshape(b * k, -1)).T
    if has_negative is not None:                                      # neg: [B_images, B x K]
      neg = jnp.where(has_negative.reshape(1, b * k), neg, jnp.finfo(neg.dtype).min)
    i2t = jnp.concatenate([logits, neg], axis=1)
    own_neg = jnp.diagonal(neg.reshape(-1, b, k), axis1=0, axis2=1)   # [K, B]: image i, its own
    own = own_neg < jnp.diagonal(logits)[None]
    weight = (jnp.ones_like(own, jnp.float32) if has_negative is None
              else has_negative.reshape(b, k).T.astype(jnp.float32))
    metrics['hard_negative_top1'] = jnp.sum(own * weight) / jnp.maximum(weight.sum(), 1.0)
  t2i = logits.T
  if mirror_embed is not None:
    own_mirror = scale * jnp.sum(txt * clip_lib.l2_normalize(mirror_embed), -1)   # [B]
    has_mirror = (jnp.ones(own_mirror.shape, bool) if has_mirror is None
                  else jnp.asarray(has_mirror, bool))
    t2i = jnp.concatenate(
        [t2i, jnp.where(has_mirror, own_mirror, jnp.finfo(t2i.dtype).min)[:, None]], axis=1)
    beat = (own_mirror < jnp.diagonal(logits)).astype(jnp.float32)
    weight = has_mirror.astype(jnp.float32)
    metrics['mirror_top1'] = jnp.sum(beat * weight) / jnp.maximum(weight.sum(), 1.0)
  loss_i2t = optax.softmax_cross_entropy_with_integer_labels(i2t, labels).mean()
  loss_t2i = optax.softmax_cross_entropy_with_integer_labels(t2i, labels).mean()
  loss = 0.5 * (loss_i2t + loss_t2i)
  metrics.update(
      loss=loss,
      logit_scale=scale,
      i2t_top1=jnp.mean(jnp.argmax(logits, axis=1) == labels),
      t2i_top1=jnp.mean(jnp.argmax(logits, axis=0) == labels),
  )
  return loss, metrics


class ClipTask(base.Task):
  """CLIP pre-training: the text and image towers and the logit scale are trained."""

  name = 'clip'

  def __init__(self, config, stage, workdir):
    super().__init__(config, stage, workdir)
    self.model_config = clip_lib.model_config_from(config, stage)
    sc = self.stage_config
    self._model = clip_lib.build_model(
        self.model_config, dtype=_dtype(sc.get('dtype', 'float32')),
        remat=bool(sc.get('remat', False)))
    self.recolour = recolour_lib.Recolour(config, stage)
    self.hard_negatives = hard_negatives_lib.HardNegatives(config, stage)
    self.converse = hard_negatives_lib.ConverseCaptions(config, stage)
    self.mirror = hard_negatives_lib.MirrorNegatives(config, stage)

  def model(self):
    return self._model

  def init(self, rng, batch):
    tokens, pixels = self._inputs(batch)
    return self._model.init(rng, tokens, pixels)['params']

  def prepare_batch(self, batch: dict) -> dict:
    return self.mirror(self.hard_negatives(self.converse(self.recolour(batch))))

  def _inputs(self, batch: Mapping[str, jax.Array]):
    for key in ('image', 'tokens'):
      if key not in batch:
        raise KeyError(f'The clip stage needs batch[{key!r}]; got keys {sorted(batch)}.')
    pixels = clip_lib.preprocess_images(self.model_config, batch['image'])
    return jnp.asarray(batch['tokens'], jnp.int32), pixels

  def embed(self, params, batch):
    """-> (image_embed, text_embed, scale) of a batch (unnormalised embeddings)."""
    tokens, pixels = self._inputs(batch)
    return self._model.apply({'params': params}, tokens, pixels)

  def loss(self, params, batch, rng, frozen=None, train=True):
    del rng, frozen, train   # no dropout; nothing frozen
    tokens, pixels = self._inputs(batch)
    b = tokens.shape[0]
    negative = batch.get('negative_tokens')
    if negative is not None:   # one text-tower pass over true and hard negative captions
      negative = jnp.asarray(negative, jnp.int32)
      tokens = jnp.concatenate([tokens, negative.reshape(-1, tokens.shape[1])], 0)
    mirror = batch.get('mirror')
    has_mirror = None
    if mirror is not None:   # one image-tower pass over the images and their mirrors
      mirror = jnp.asarray(mirror)
      has_mirror = mirror != hard_negatives_lib.NO_MIRROR
      up_down = (mirror == hard_negatives_lib.UP_DOWN)[:, None, None, None]
      negative_pixels = jnp.where(up_down, pixels[:, ::-1], pixels[:, :, ::-1])
      if 'negative_image' in batch:   # colour_swap, relocate, extra_object negatives
        drawn = jnp.isin(mirror, jnp.array(hard_negatives_lib.DRAWN_KINDS))
        drawn = drawn[:, None, None, None]
        negative_pixels = jnp.where(
            drawn, clip_lib.preprocess_images(self.model_config, batch['negative_image']),
            negative_pixels)
      pixels = jnp.concatenate([pixels, negative_pixels], 0)
    image_embed, text_embed, scale = self._model.apply({'params': params}, tokens, pixels)
    return contrastive_loss(image_embed[:b], text_embed[:b], scale,
                            None if negative is None else text_embed[b:].reshape(
                                *negative.shape[:-1], -1),
                            batch.get('has_negative'),
                            None if has_mirror is None else image_embed[b:], has_mirror)

  def flops_per_example(self) -> float:
    return clip_lib.flops_per_example(
        self.model_config, batch_size=int(self.stage_config.batch_size),
        text_length=int(self.config.tokenizer.context_length))
