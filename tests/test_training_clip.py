"""The training engine on the real CLIP stage of configs/tiny.py, with the real input."""

import jax
import numpy as np
import pytest

from configs import tiny
from dalle2_jax import tasks
from dalle2_jax.training import checkpoint
from dalle2_jax.training import loop
from dalle2_jax.training import writers


@pytest.fixture(autouse=True, scope='module')
def fast_compile():
  """Less XLA optimisation: these tests compile far more than they run."""
  previous = jax.config.values['jax_disable_most_optimizations']
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


def test_tiny_clip_stage_trains_fsdp_and_rebuilds_from_workdir(tmp_path):
  c = tiny.get_config()
  c.unlock()
  c.data.data_dir = str(tmp_path / 'tfds')
  c.data.shapes.update(num_train=32, num_test=8, num_heldout=8)
  c.mesh.update(data=2, fsdp=4)   # FSDP over 4 devices, data parallel over 2
  c.clip.update(steps=3, ckpt_every=2)
  workdir = tmp_path / 'work'
  summary = loop.run(c, workdir, stages=['clip'])['clip']
  assert summary['final_step'] == 3 and summary['compile_time'] > 0
  metrics = writers.read_metrics(workdir / 'clip')
  assert sorted(metrics) == [1, 2, 3]
  assert all(np.isfinite(m['loss']) and m['nonfinite'] == 0 for m in metrics.values())
  # Sampling and later stages rebuild the model from the workdir alone.
  config, params = checkpoint.load_stage(workdir, 'clip')
  task = tasks.get_task(config, 'clip', str(workdir))
  batch = {'image': np.zeros((2, 32, 32, 3), np.float32),
           'tokens': np.zeros((2, config.tokenizer.context_length), np.int32)}
  loss, _ = task.loss(params, batch, jax.random.key(0), train=False)
  assert np.isfinite(float(loss))
