"""Tokenizer: ids equal OpenAI CLIP's own tokenizer (golden fixture), layout, truncation."""

import gzip
import hashlib
import os

import numpy as np
import pytest

from dalle2_jax import tokenizer as tokenizer_lib

FIXTURE = os.path.join(os.path.dirname(__file__), 'fixtures', 'clip_tokenizer_openai.npz')


@pytest.fixture(scope='module')
def tok():
  return tokenizer_lib.Tokenizer()


def test_packaged_vocab_is_openai_clip_bpe():
  with open(tokenizer_lib.BPE_PATH, 'rb') as f:
    assert hashlib.sha256(f.read()).hexdigest() == tokenizer_lib.BPE_SHA256
  licence = os.path.join(tokenizer_lib.ASSETS, 'LICENSE-CLIP-BPE')
  with open(licence) as f:
    text = f.read()
  assert 'MIT' in text and 'OpenAI' in text
  with gzip.open(tokenizer_lib.BPE_PATH) as f:
    assert f.readline().startswith(b'"bpe_simple_vocab_16e6.txt#version')


def test_known_ids(tok):
  ids = tok(['a photo of a cat'])
  assert ids.dtype == np.int32 and ids.shape == (1, 77)
  np.testing.assert_array_equal(ids[0, :7], [49406, 320, 1125, 539, 320, 2368, 49407])
  assert not ids[0, 7:].any()
  assert (tok.sot_id, tok.eot_id, tok.vocab_size, tok.context_length) == (49406, 49407, 49408, 77)


def test_matches_openai_reference(tok):
  # Made by scripts/make_tokenizer_fixture.py with OpenAI's simple_tokenizer.py.
  with np.load(FIXTURE, allow_pickle=False) as f:
    texts, ids = [str(t) for t in f['texts']], f['ids']
  np.testing.assert_array_equal(tok(texts), ids)


def test_truncation_keeps_eot(tok):
  short = tokenizer_lib.Tokenizer(context_length=5)
  ids = short(['a photo of a cat', 'a cat', ''])
  np.testing.assert_array_equal(ids, [[49406, 320, 1125, 539, 49407],
                                      [49406, 320, 2368, 49407, 0],
                                      [49406, 49407, 0, 0, 0]])
  assert short.num_truncated == 1
  assert short.decode(ids[1]) == 'a cat'
  assert tok.decode(tok(['A Photo of a CAT'])[0]) == 'a photo of a cat'


def test_from_config_and_local_hf_dir(tmp_path):
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = ml_collections.ConfigDict({'tokenizer': {'path': '', 'context_length': 16}})
  t = tokenizer_lib.Tokenizer.from_config(cfg)
  assert t(['a cat']).shape == (1, 16)
  # A Hugging Face tokenizer directory on disk works too (save the packaged one, reload).
  tokenizer_lib._load_hf('').save_pretrained(str(tmp_path))  # pylint: disable=protected-access
  cfg.tokenizer.path = str(tmp_path)
  t2 = tokenizer_lib.Tokenizer.from_config(cfg)
  np.testing.assert_array_equal(t2(['a photo of a cat']), t(['a photo of a cat']))
  with pytest.raises(FileNotFoundError, match='config.tokenizer.path'):
    tokenizer_lib.Tokenizer(path=str(tmp_path / 'missing'))
