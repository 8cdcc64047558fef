"""Parity of our CLIP with Hugging Face's PyTorch CLIPModel through the importer.

Golden fixtures: scripts/make_clip_fixtures.py (transformers + torch, reference venv).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from dalle2_jax.convert import hf_clip
from dalle2_jax.models import clip

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')
NAMES = ('quick_gelu_48', 'gelu_64')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope='module', params=NAMES)
def imported(request, tmp_path_factory):
  name = request.param
  out = tmp_path_factory.mktemp(name) / 'export'
  hf_clip.convert_to_export(os.path.join(FIXTURES, f'clip_{name}'), str(out))
  io = st_numpy.load_file(os.path.join(FIXTURES, f'clip_{name}_io.safetensors'))
  return name, clip.FrozenClip.load(str(out)), io


def test_import_matches_transformers(imported):
  name, frozen, io = imported
  m, params = frozen.config, frozen.params
  model = clip.build_model(m)
  tokens = jnp.asarray(io['input_ids'])
  pixels = jnp.asarray(io['pixel_values'].transpose(0, 2, 3, 1))   # NCHW -> NHWC
  variables = {'params': params}
  text_embed, text_encodings, mask = model.apply(variables, tokens, method=clip.CLIP.encode_text)
  image_embed = model.apply(variables, pixels, method=clip.CLIP.encode_image)
  img_n, txt_n = clip.l2_normalize(image_embed), clip.l2_normalize(text_embed)
  logits = clip.logit_scale(params) * img_n @ txt_n.T
  errs = dict(text=rel_err(text_embed, io['text_embeds']),
              encodings=rel_err(text_encodings, io['text_last_hidden']),
              image=rel_err(image_embed, io['image_embeds']),
              logits=rel_err(logits, io['logits_per_image']))
  print(name, errs)
  assert max(errs.values()) <= 1e-5, errs
  # Projection dims differ from the widths in both fixtures.
  assert text_embed.shape[-1] == m.embed_dim != m.text.width
  # mask: True up to and including the pooled (end-of-text) token.
  if m.text.pool == 'eos':
    first = np.argmax(io['input_ids'] == m.text.eos_token_id, axis=-1)
    # The eos id is not the largest id here, so argmax pooling would pick another token.
    assert (first != np.argmax(io['input_ids'], axis=-1)).any()
  else:
    first = np.argmax(io['input_ids'], axis=-1)
  np.testing.assert_array_equal(mask, np.arange(tokens.shape[1])[None] <= first[:, None])


def test_pure_api_and_frozen_clip(imported):
  name, frozen, io = imported
  del name
  assert frozen.embed_dim == frozen.config.embed_dim
  assert frozen.context_length == io['input_ids'].shape[1]
  text_embed, encodings, mask = clip.encode_text(frozen.config, frozen.params, io['input_ids'])
  assert rel_err(text_embed, io['text_embeds']) <= 1e-5
  assert encodings.shape[:2] == mask.shape == io['input_ids'].shape
  # encode_image takes [-1, 1] images of any size and resizes + normalises them.
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 20, 20, 3), minval=-1, maxval=1)
  emb = jax.jit(lambda p, x: clip.encode_image(frozen.config, p, x))(frozen.params, images)
  assert emb.shape == (2, frozen.embed_dim) and np.isfinite(emb).all()
  # At the model's size, preprocessing is exactly the OpenAI normalisation.
  s = frozen.image_size
  x = jax.random.uniform(jax.random.PRNGKey(1), (1, s, s, 3), minval=-1, maxval=1)
  pix = (np.asarray(x) + 1) / 2
  pix = (pix - np.array(clip.OPENAI_MEAN)) / np.array(clip.OPENAI_STD)
  np.testing.assert_allclose(clip.preprocess_images(frozen.config, x), pix, atol=1e-5)


def test_not_a_clip_directory_fails_clearly(tmp_path):
  src = os.path.join(FIXTURES, 'clip_gelu_64')
  with pytest.raises(hf_clip.NotAClipError, match='missing config.json'):
    hf_clip.convert(str(tmp_path))
  bad = tmp_path / 'bad'
  shutil.copytree(src, bad)
  cfg = json.loads((bad / 'config.json').read_text())
  cfg['model_type'] = 'bert'
  del cfg['vision_config']['patch_size']
  (bad / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(hf_clip.NotAClipError, match=r"'bert'.*patch_size"):
    hf_clip.convert(str(bad))
  # Right config, wrong weights: one missing, one unexpected.
  shutil.copy(os.path.join(src, 'config.json'), bad / 'config.json')
  w = st_numpy.load_file(os.path.join(src, 'model.safetensors'))
  w['pooler.dense.weight'] = w.pop('text_projection.weight')
  st_numpy.save_file(w, str(bad / 'model.safetensors'))
  with pytest.raises(hf_clip.NotAClipError,
                     match=r'missing 1 weights: text_projection.weight.*'
                           r'unexpected 1 weights: pooler.dense.weight'):
    hf_clip.convert(str(bad))
  with pytest.raises(FileNotFoundError, match='dalle2_jax.convert.hf_clip'):
    clip.FrozenClip.load(str(tmp_path / 'nowhere'))


def test_command_line(tmp_path):
  out = tmp_path / 'out'
  r = subprocess.run([sys.executable, '-m', 'dalle2_jax.convert.hf_clip', '--src',
                      os.path.join(FIXTURES, 'clip_quick_gelu_48'), '--out', str(out)],
                     cwd=ROOT, capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))
  assert r.returncode == 0, r.stderr
  assert sorted(os.listdir(out)) == ['config.json', 'params.safetensors', 'stage.txt']
  r = subprocess.run([sys.executable, '-m', 'dalle2_jax.convert.hf_clip', '--src',
                      str(tmp_path), '--out', str(out)],
                     cwd=ROOT, capture_output=True, text=True, timeout=120,
                     env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))
  assert r.returncode != 0 and 'missing config.json' in r.stderr
