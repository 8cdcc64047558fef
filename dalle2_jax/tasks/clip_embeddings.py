r"""Precomputes a frozen CLIP's embeddings of a dataset split, once.

  python -m dalle2_jax.tasks.clip_embeddings --workdir runs/shapes [--split train]
  python -m dalle2_jax.tasks.clip_embeddings --workdir W --config configs/x.py --clip EXPORT

Uses the CLIP export <workdir>/clip/export (or --clip), and the dataset of --config (default:
the experiment config stored in the CLIP export). Writes <workdir>/clip_embeddings/<split>/:

  image_embed.npy     float32 [N, D]     CLIP image embeddings (projected, not normalised)
  text_embed.npy      float32 [N, D]     CLIP text embeddings (projected, not normalised)
  text_encodings.npy  float32 [N, L, W]  per-token outputs of the text tower (--text_encodings)
  text_mask.npy       bool    [N, L]     True up to and including the end-of-text token
  tokens.npy          int32   [N, L]
  meta.json           clip export, split, count, dataset

Row i is record i of the split in stored order (as `pipeline.load_examples`), with its first
caption. All files are plain .npy (no pickle); `load(directory)` memory-maps them. Training
does not read them yet: the prior and decoder run the frozen CLIP on every batch (the
decoder's loss takes a batch key 'clip_image_embed' when one is given, but the input
pipeline does not supply it from here).
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from dalle2_jax.models import clip as clip_lib

FILES = ('image_embed', 'text_embed', 'text_encodings', 'text_mask', 'tokens')


def compute(frozen: clip_lib.FrozenClip, images_uint8: np.ndarray, tokens: np.ndarray,
            batch_size: int = 256, text_encodings: bool = True) -> dict[str, np.ndarray]:
  """Embeds N (image, tokens) pairs in fixed-size batches (one compilation)."""
  n = len(tokens)
  if len(images_uint8) != n:
    raise ValueError(f'{len(images_uint8)} images but {n} token rows.')

  @jax.jit
  def embed(params, images, toks):
    image_embed = clip_lib.encode_image(frozen.config, params,
                                        images.astype(jnp.float32) / 127.5 - 1.0)
    text_embed, encodings, mask = clip_lib.encode_text(frozen.config, params, toks)
    return dict(image_embed=image_embed, text_embed=text_embed, text_encodings=encodings,
                text_mask=mask)

  out = {k: [] for k in FILES}
  for start in range(0, n, batch_size):
    imgs = np.asarray(images_uint8[start:start + batch_size])
    toks = np.asarray(tokens[start:start + batch_size], np.int32)
    m = len(toks)
    if m < batch_size:   # pad the last batch: same shapes, no recompilation
      imgs = np.concatenate([imgs, np.zeros((batch_size - m,) + imgs.shape[1:], imgs.dtype)])
      toks = np.concatenate([toks, np.zeros((batch_size - m,) + toks.shape[1:], toks.dtype)])
    res = jax.device_get(embed(frozen.params, imgs, toks))
    for k, v in res.items():
      if k == 'text_encodings' and not text_encodings:
        continue
      out[k].append(np.asarray(v[:m]))
    out['tokens'].append(toks[:m])
  return {k: np.concatenate(v) for k, v in out.items() if v}


def save(directory: str, arrays: dict[str, np.ndarray], meta: dict) -> None:
  os.makedirs(directory, exist_ok=True)
  for k, v in arrays.items():
    np.save(os.path.join(directory, f'{k}.npy'), v, allow_pickle=False)
  with open(os.path.join(directory, 'meta.json'), 'w') as f:
    json.dump(meta, f, indent=2)


def load(directory: str, mmap: bool = True) -> dict[str, np.ndarray]:
  """The arrays of a precomputed directory (memory-mapped), plus 'meta' (a dict)."""
  if not os.path.exists(os.path.join(directory, 'meta.json')):
    raise FileNotFoundError(
        f'{directory} holds no precomputed CLIP embeddings (no meta.json); make them with '
        '`python -m dalle2_jax.tasks.clip_embeddings --workdir W --split SPLIT`.')
  out = {}
  for k in FILES:
    path = os.path.join(directory, f'{k}.npy')
    if os.path.exists(path):
      out[k] = np.load(path, mmap_mode='r' if mmap else None, allow_pickle=False)
  with open(os.path.join(directory, 'meta.json')) as f:
    out['meta'] = json.load(f)
  return out


def precompute(config, clip_path: str, split: str, out_dir: str, num: int | None = None,
               batch_size: int = 256, text_encodings: bool = True) -> dict:
  """Loads `split` of config.data, embeds it with the CLIP at `clip_path`, writes out_dir."""
  from dalle2_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from dalle2_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  frozen = clip_lib.FrozenClip.load(clip_path)
  # Images at the dataset size; encode_image resizes them as it does during training.
  data = pipeline.load_examples(config, split, num or 2 ** 62)
  if len(data['caption']) == 0:
    raise ValueError(f'Split {split!r} of {config.data.name} gave no examples.')
  tok = tokenizer_lib.Tokenizer(path=frozen.tokenizer_path,
                                context_length=frozen.context_length)
  arrays = compute(frozen, data['image'], tok(data['caption']), batch_size, text_encodings)
  meta = dict(clip=os.path.abspath(str(clip_path)), split=split, count=len(data['caption']),
              dataset=str(config.data.name), embed_dim=frozen.embed_dim,
              context_length=frozen.context_length, files=sorted(arrays))
  save(out_dir, arrays, meta)
  return meta


_CONFIG = None
_WORKDIR = None
_CLIP = None
_SPLIT = None
_NUM = None
_OUT = None
_BATCH = None
_TEXT_ENCODINGS = None


def _define_flags():
  """Command-line flags (defined only when run as a program, so that importing
  several modules with flags never clashes)."""
  global _CONFIG, _WORKDIR, _CLIP, _SPLIT, _NUM, _OUT, _BATCH, _TEXT_ENCODINGS
  _CONFIG = config_flags.DEFINE_config_file(
      'config', None, 'Experiment config whose `data` is embedded (default: the config stored '
      'in the CLIP export).', lock_config=False)
  _WORKDIR = flags.DEFINE_string('workdir', None, 'Experiment workdir.')
  _CLIP = flags.DEFINE_string('clip', None, 'CLIP export dir; default <workdir>/clip/export.')
  _SPLIT = flags.DEFINE_string('split', 'train', 'Dataset split.')
  _NUM = flags.DEFINE_integer('num', 0, 'Only the first NUM records (0 = all).')
  _OUT = flags.DEFINE_string('out', None, 'Output dir; default <workdir>/clip_embeddings/<split>.')
  _BATCH = flags.DEFINE_integer('batch_size', 256, 'Examples per CLIP call.')
  _TEXT_ENCODINGS = flags.DEFINE_bool('text_encodings', True,
                                      'Also store per-token text encodings [N, L, W].')


def main(argv):
  del argv
  if not _WORKDIR.value:
    raise app.UsageError('Pass --workdir DIR.')
  clip_path = _CLIP.value or os.path.join(_WORKDIR.value, 'clip', 'export')
  config = _CONFIG.value
  if config is None:
    config = clip_lib.FrozenClip.load(clip_path).experiment_config
    if config is None or 'data' not in config:
      raise app.UsageError(f'The CLIP export {clip_path} stores no dataset config; pass '
                           '--config configs/<experiment>.py.')
  out = _OUT.value or os.path.join(_WORKDIR.value, 'clip_embeddings',
                                   _SPLIT.value.replace('/', '_'))
  meta = precompute(config, clip_path, _SPLIT.value, out, _NUM.value or None, _BATCH.value,
                    _TEXT_ENCODINGS.value)
  logging.info('Wrote %d embeddings to %s', meta['count'], out)
  print(f'Wrote {meta["count"]} CLIP embeddings of split {_SPLIT.value!r} to {out}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
