"""CLIP BPE tokenizer (OpenAI's vocabulary, packaged; or any Hugging Face tokenizer on disk).

  tok = Tokenizer()                     # packaged bpe_simple_vocab_16e6.txt.gz, 77 tokens
  ids = tok(['a photo of a cat'])       # np.int32 [1, 77]:
                                        # 49406 320 1125 539 320 2368 49407 0 0 ...

As OpenAI CLIP: start-of-text, BPE tokens, end-of-text, then zeros. Texts longer than the
context are cut so that the end-of-text token is kept as the last token (with a warning).
Nothing is downloaded: the vocabulary ships in `dalle2_jax/assets/` (MIT, Copyright (c) 2021
OpenAI, see `dalle2_jax/assets/LICENSE-CLIP-BPE`).
"""

from __future__ import annotations

import functools
import gzip
import os
from typing import Sequence

from absl import logging
import numpy as np

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets')
BPE_PATH = os.path.join(ASSETS, 'bpe_simple_vocab_16e6.txt.gz')
BPE_SHA256 = '924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a'
_CACHE_SIZE = 100_000   # texts whose ids are kept (cleared when full)
SOT = '<|startoftext|>'
EOT = '<|endoftext|>'


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP reversible byte -> printable unicode character table."""
  bs = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) +
        list(range(ord('®'), ord('ÿ') + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, [chr(c) for c in cs]))


@functools.lru_cache(maxsize=None)
def clip_vocab_and_merges(bpe_path: str = BPE_PATH):
  """The vocabulary (token -> id) and merges of OpenAI CLIP, built as in OpenAI's
  simple_tokenizer.py from the gzipped merges file (49408 tokens)."""
  with gzip.open(bpe_path) as f:
    lines = f.read().decode('utf-8').split('\n')
  merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]
  vocab = list(_bytes_to_unicode().values())
  vocab = vocab + [v + '</w>' for v in vocab]
  vocab += [''.join(m) for m in merges]
  vocab += [SOT, EOT]
  return {t: i for i, t in enumerate(vocab)}, merges


@functools.lru_cache(maxsize=8)
def _load_hf(path: str):
  """A transformers tokenizer: the packaged CLIP BPE for path '', else a local directory."""
  import transformers  # pylint: disable=g-import-not-at-top
  if not path:
    vocab, merges = clip_vocab_and_merges()
    return transformers.CLIPTokenizer(vocab=dict(vocab), merges=list(merges))
  path = os.path.expanduser(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'Tokenizer directory {path!r} does not exist; set config.tokenizer.path to a Hugging '
        "Face tokenizer directory on disk (tokenizer.json or vocab.json + merges.txt), or '' "
        'for the packaged OpenAI CLIP BPE.')
  try:
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'Cannot load a tokenizer from {path!r} ({e}); config.tokenizer.path must be a Hugging '
        "Face tokenizer directory, or '' for the packaged OpenAI CLIP BPE.") from e


class Tokenizer:
  """Texts -> np.int32 [B, context_length]: SOT, tokens, EOT, zero padding."""

  def __init__(self, path: str = '', context_length: int = 77):
    if context_length < 2:
      raise ValueError(f'config.tokenizer.context_length must be >= 2 (got {context_length}).')
    self.path = path
    self.context_length = int(context_length)
    self._hf = _load_hf(path)
    sot = self._hf.bos_token_id
    eot = self._hf.eos_token_id
    if sot is None:
      sot = self._hf.cls_token_id
    if eot is None:
      eot = self._hf.sep_token_id
    if sot is None or eot is None:
      raise ValueError(f'Tokenizer at {path!r} has no start/end tokens (bos/eos or cls/sep).')
    self.sot_id = int(sot)
    self.eot_id = int(eot)
    self.vocab_size = len(self._hf)
    self.num_truncated = 0   # texts cut to the context length so far
    self._cache = {}         # text -> BPE ids (captions repeat across epochs)

  @classmethod
  def from_config(cls, config) -> 'Tokenizer':
    """From config.tokenizer (path, context_length); accepts the whole config or its section."""
    tc = config.tokenizer if 'tokenizer' in config else config
    return cls(path=tc.get('path', ''), context_length=tc.get('context_length', 77))

  def __getstate__(self):   # pickled into grain workers: rebuild from the (cached) files
    return {'path': self.path, 'context_length': self.context_length}

  def __setstate__(self, state):
    self.__init__(**state)

  def _encode_batch(self, texts: list[str]) -> list[list[int]]:
    backend = getattr(self._hf, 'backend_tokenizer', None)
    if backend is not None:   # the Rust tokenizer directly: skips transformers' wrapping
      return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return self._hf(texts, add_special_tokens=False)['input_ids']

  def encode(self, text: str) -> list[int]:
    """BPE ids of one text without start/end tokens."""
    return self._hf(text, add_special_tokens=False)['input_ids']

  def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
    if isinstance(texts, str):
      texts = [texts]
    texts = [t.decode('utf-8') if isinstance(t, bytes) else str(t) for t in texts]
    L = self.context_length
    out = np.zeros((len(texts), L), np.int32)
    if not texts:
      return out
    cache = self._cache
    missing = list({t for t in texts if t not in cache})
    if missing:
      if len(cache) + len(missing) > _CACHE_SIZE:
        cache.clear()
      for t, seq in zip(missing, self._encode_batch(missing)):
        cache[t] = seq
    cut = 0
    for i, t in enumerate(texts):
      seq = [self.sot_id] + list(cache[t])
      if len(seq) + 1 > L:
        seq = seq[:L - 1]
        cut += 1
      seq.append(self.eot_id)
      out[i, :len(seq)] = seq
    if cut:
      self.num_truncated += cut
      logging.log_every_n_seconds(
          logging.WARNING, 'Tokenizer: %d of %d texts longer than %d tokens were truncated '
          '(end-of-text kept); raise config.tokenizer.context_length to keep them whole.',
          60, cut, len(texts), L)
    return out

  def decode(self, ids: Sequence[int]) -> str:
    """Text of one row of ids (stops at end-of-text, skips start-of-text and padding)."""
    ids = [int(i) for i in ids]
    if ids and ids[0] == self.sot_id:
      ids = ids[1:]
    if self.eot_id in ids:
      ids = ids[:ids.index(self.eot_id)]
    return self._hf.decode(ids, clean_up_tokenization_spaces=False).strip()
