r"""Writes tests/fixtures/clip_tokenizer_openai.npz: token ids from OpenAI's own tokenizer.

Uses `clip/simple_tokenizer.py` from the clip-anytorch wheel (OpenAI's CLIP code, MIT) as the
reference, with the same `bpe_simple_vocab_16e6.txt.gz` the package ships; `clip.tokenize`'s
layout (SOT, tokens, EOT, zero padding, context 77). Run with any python that has `regex`
(e.g. the reference venv); if `ftfy` is missing a stub is used (identity on the clean texts
below):

  pip download --no-deps -d /tmp/w clip-anytorch && unzip -o /tmp/w/clip_anytorch-*.whl -d /tmp/w/x
  /work/refvenv/bin/python scripts/make_tokenizer_fixture.py /tmp/w/x
"""

import importlib.util
import os
import sys
import types

import numpy as np

TEXTS = [
    'a photo of a cat',
    'a large red circle in the top left',
    'there is a small blue square to the left of a green triangle',
    'A Photo  Of  Two DOGS!!',
    "it's a cat's toy, isn't it? we'll see...",
    'the year 2021 had 365 days',
    'naïve café crème brûlée',
    'emoji 🙂 and symbols #$%&',
    '',
    'magenta cyan yellow triangle square circle',
]


def main(unzipped_wheel):
  if 'ftfy' not in sys.modules:
    try:
      import ftfy  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
    except ImportError:
      sys.modules['ftfy'] = types.SimpleNamespace(fix_text=lambda s: s)
  path = os.path.join(unzipped_wheel, 'clip', 'simple_tokenizer.py')
  spec = importlib.util.spec_from_file_location('simple_tokenizer', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  here = os.path.dirname(os.path.abspath(__file__))
  bpe = os.path.join(here, '..', 'dalle2_jax', 'assets', 'bpe_simple_vocab_16e6.txt.gz')
  tok = mod.SimpleTokenizer(bpe)
  sot, eot = tok.encoder['<|startoftext|>'], tok.encoder['<|endoftext|>']
  ids = np.zeros((len(TEXTS), 77), np.int32)
  for i, t in enumerate(TEXTS):
    seq = [sot] + tok.encode(t) + [eot]
    ids[i, :len(seq)] = seq
  out = os.path.join(here, '..', 'tests', 'fixtures', 'clip_tokenizer_openai.npz')
  np.savez(out, texts=np.array(TEXTS), ids=ids)
  print('wrote', out)
  for t, row in zip(TEXTS, ids):
    print(repr(t), row[:int((row > 0).sum())].tolist())


if __name__ == '__main__':
  main(sys.argv[1])
