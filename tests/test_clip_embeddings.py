"""Precomputed CLIP embeddings (dalle2_jax/tasks/clip_embeddings.py)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from dalle2_jax.models import clip as clip_lib
from dalle2_jax.tasks import clip as clip_task
from dalle2_jax.tasks import clip_embeddings
from dalle2_jax.training import export

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  w = tmp_path_factory.mktemp('work')
  c = tiny.get_config()
  c.unlock()
  c.data.data_dir = str(w / 'tfds')
  c.data.shapes.update(num_train=24, num_test=8, num_heldout=8)
  task = clip_task.ClipTask(c, 'clip', str(w))
  batch = dict(image=np.zeros((2, 32, 32, 3), np.float32),
               tokens=np.zeros((2, c.tokenizer.context_length), np.int32))
  export.save_export(w / 'clip' / 'export', c, 'clip', task.init(jax.random.PRNGKey(0), batch))
  return w, c


def test_precompute_matches_online_clip(workdir):
  w, c = workdir
  out = str(w / 'emb')
  meta = clip_embeddings.precompute(c, str(w / 'clip' / 'export'), 'train', out,
                                    batch_size=16)
  assert meta['count'] == 24
  stored = clip_embeddings.load(out)
  frozen = clip_lib.FrozenClip.load(w / 'clip' / 'export')
  from dalle2_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  data = pipeline.load_examples(c, 'train', 24)
  emb = clip_lib.encode_image(frozen.config, frozen.params, data['image'] / 127.5 - 1.0)
  np.testing.assert_allclose(stored['image_embed'], emb, rtol=1e-4, atol=1e-5)
  text, enc, mask = clip_lib.encode_text(frozen.config, frozen.params, stored['tokens'])
  np.testing.assert_allclose(stored['text_embed'], text, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stored['text_encodings'], enc, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(stored['text_mask'], mask)
  assert stored['text_encodings'].shape == (24, c.tokenizer.context_length,
                                            c.clip.model.text.width)
  with pytest.raises(FileNotFoundError, match='clip_embeddings'):
    clip_embeddings.load(str(w / 'nothing'))


def test_command_line(workdir):
  w, _ = workdir
  r = subprocess.run([sys.executable, '-m', 'dalle2_jax.tasks.clip_embeddings', '--workdir',
                      str(w), '--split', 'test', '--text_encodings=false'], cwd=ROOT,
                     capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS=''))
  assert r.returncode == 0, r.stderr[-3000:]
  stored = clip_embeddings.load(str(w / 'clip_embeddings' / 'test'))
  assert stored['meta']['count'] == 8 and 'text_encodings' not in stored
  assert stored['image_embed'].shape == (8, 32)
