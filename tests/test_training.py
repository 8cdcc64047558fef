"""The training engine on a toy task: SPMD equivalence, optimisation, faults, checkpoints."""

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax
import pytest

from dalle2_jax.training import checkpoint
from dalle2_jax.training import loop
from dalle2_jax.training import optimizer
from dalle2_jax.training import sharding
from dalle2_jax.training import state as state_lib
from dalle2_jax.training import writers
import training_toy as toy


@pytest.fixture(autouse=True, scope='module')
def fast_compile():
  """Less XLA optimisation: these tests compile far more than they run."""
  previous = jax.config.values['jax_disable_most_optimizations']
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


def train(tmp_path, name, config, devices=None, **input_kw):
  workdir = tmp_path / name
  summary = loop.run(config, workdir, task_fn=toy.toy_task_fn,
                     input_fn=toy.fake_input_fn(**input_kw), devices=devices)
  return workdir, summary['toy'], writers.read_metrics(workdir / 'toy')


def losses(metrics):
  return np.array([metrics[s]['loss'] for s in sorted(metrics)])


def restore_state(workdir, config, step=None):
  """The saved TrainState of the toy stage, restored onto all devices."""
  mesh = sharding.make_mesh(config)
  task = toy.ToyTask(config, 'toy', str(workdir))
  tx, _ = optimizer.make_optimizer(config.toy.optim, config.toy.steps)
  shapes = {'image': jax.ShapeDtypeStruct((8, 8, 8, 3), jnp.float32),
            'tokens': jax.ShapeDtypeStruct((8, toy.CONTEXT), jnp.int32)}
  spec = state_lib.make_state_spec(task, tx, shapes, mesh, sharding.axis_rules(config))
  ckpt = checkpoint.Checkpointer(workdir / 'toy', keep=0)
  step = ckpt.latest_step() if step is None else step
  restored = ckpt.restore_state(step, spec.abstract, spec.shardings)
  data_states = ckpt.restore_data(step)
  ckpt.close()
  return restored, data_states


def test_mesh_shapes_and_errors():
  assert sharding.mesh_shape({'data': -1, 'fsdp': 1}, 8) == {'data': 8, 'fsdp': 1}
  assert sharding.mesh_shape({'data': 2, 'fsdp': -1}, 8) == {'data': 2, 'fsdp': 4}
  mesh = sharding.make_mesh(toy.toy_config(mesh=dict(data=2, fsdp=4)))
  assert dict(mesh.shape) == {'data': 2, 'fsdp': 4}
  with pytest.raises(ValueError, match=r'config\.mesh.*data=3.*divide'):
    sharding.mesh_shape({'data': 3, 'fsdp': -1}, 8)
  with pytest.raises(ValueError, match=r'config\.mesh.*data=2 x fsdp=2 = 4.*8'):
    sharding.mesh_shape({'data': 2, 'fsdp': 2}, 8)
  with pytest.raises(ValueError, match=r'config\.mesh.*unknown axes.*model'):
    sharding.mesh_shape({'data': -1, 'model': 2}, 8)


def test_bad_config_fails_before_compiling(tmp_path, monkeypatch):
  def no_task(*args):
    raise AssertionError('the task was built: validation came too late')
  monkeypatch.setattr(toy, 'toy_task_fn', no_task)
  cases = [
      (dict(mesh=dict(data=3, fsdp=-1)), r'config\.mesh'),
      (dict(batch_size=12), r'config\.toy\.batch_size=12.*divisible.*8'),
      (dict(batch_size=16, optim=dict(grad_accum=4)), r'config\.toy\.batch_size=16.*32'),
      (dict(dtype='float16'), r'config\.toy\.dtype'),
  ]
  for overrides, message in cases:
    with pytest.raises(ValueError, match=message):
      train(tmp_path, 'bad', toy.toy_config(**overrides))
  config = toy.toy_config()
  config.toy.optim.unlock()
  config.toy.optim.warmup_step = 3   # a typo of warmup_steps
  with pytest.raises(ValueError, match=r"config\.toy\.optim has unknown fields \['warmup_step'\]"):
    train(tmp_path, 'bad', config)


def test_fsdp_shards_params_and_optimizer_state():
  config = toy.toy_config(mesh=dict(data=2, fsdp=4))
  mesh = sharding.make_mesh(config)
  task = toy.ToyTask(config, 'toy', '')
  tx, _ = optimizer.make_optimizer(config.toy.optim, 8)
  shapes = {'image': jax.ShapeDtypeStruct((16, 8, 8, 3), jnp.float32),
            'tokens': jax.ShapeDtypeStruct((16, toy.CONTEXT), jnp.int32)}
  spec = state_lib.make_state_spec(task, tx, shapes, mesh, sharding.axis_rules(config))
  assert spec.shardings.params['Dense_0']['kernel'].spec == P(None, 'fsdp')
  assert spec.shardings.params['block0']['Dense_0']['kernel'].spec == P('fsdp', None)
  assert spec.shardings.params['Embed_0']['embedding'].spec == P(None, 'fsdp')
  adam = spec.shardings.opt_state[1][0]   # chain(clip, adamw) -> adamw's ScaleByAdamState
  assert adam.mu['Dense_0']['kernel'].spec == P(None, 'fsdp')
  state = spec.init_fn(jax.random.key(0))   # born sharded
  kernel = state.params['Dense_0']['kernel']
  assert kernel.sharding.spec == P(None, 'fsdp')
  assert kernel.addressable_shards[0].data.shape == (8 * 8 * 3, 32 // 4)
  assert state.params['Dense_0']['kernel'].dtype == jnp.float32


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  """The toy config trained 6 steps on 8 devices, data parallel (shared by several tests)."""
  return train(tmp_path_factory.mktemp('reference'), 'dp', toy.toy_config(steps=6, ckpt_every=0))


def test_same_losses_on_1_and_8_devices_data_parallel_and_fsdp(tmp_path, reference_run):
  _, s8, m8 = reference_run
  kw = dict(steps=6, ckpt_every=0)
  _, s1, m1 = train(tmp_path, 'one', toy.toy_config(**kw), devices=jax.devices()[:1])
  _, sf, mf = train(tmp_path, 'fsdp', toy.toy_config(mesh=dict(data=2, fsdp=4), **kw))
  assert s1['mesh'] == {'data': 1, 'fsdp': 1} and s8['mesh'] == {'data': 8, 'fsdp': 1}
  assert sf['mesh'] == {'data': 2, 'fsdp': 4}
  l1, l8, lf = losses(m1), losses(m8), losses(mf)
  assert len(l1) == 6
  np.testing.assert_allclose(l8, l1, rtol=2e-5)
  np.testing.assert_allclose(lf, l1, rtol=2e-5)
  np.testing.assert_allclose([m8[s]['grad_norm'] for s in m8],
                             [m1[s]['grad_norm'] for s in m1], rtol=2e-5)
  assert l1[-1] < 0.6 * l1[0], l1   # it learns
  assert s8['compile_time'] > 0 and s8['step_time'] > 0
  assert s8['wall_time'] > s8['compile_time'] + 6 * s8['step_time']


def test_grad_accumulation_matches_one_big_batch(tmp_path):
  # No input noise, so the loss does not depend on how the rng is split over micro-batches.
  kw = dict(steps=3, ckpt_every=0, model=dict(noise=0.0))
  _, _, m1 = train(tmp_path, 'a1', toy.toy_config(**kw), devices=jax.devices()[:1])
  _, _, m2 = train(tmp_path, 'a2', toy.toy_config(mesh=dict(data=2, fsdp=4),
                                                  optim=dict(grad_accum=2), **kw))
  np.testing.assert_allclose(losses(m2), losses(m1), rtol=2e-5)


def test_bfloat16_compute_with_remat_keeps_float32_params(tmp_path, reference_run):
  _, _, m32 = reference_run
  workdir, _, m16 = train(tmp_path, 'bf16', toy.toy_config(steps=6, ckpt_every=0,
                                                            dtype='bfloat16', remat=True))
  np.testing.assert_allclose(losses(m16), losses(m32), rtol=0.05)
  _, params = checkpoint.load_stage(workdir, 'toy')
  assert params['Dense_0']['kernel'].dtype == np.float32


def test_optimizer_schedule_and_weight_decay_mask():
  optim = ml_collections.ConfigDict(dict(
      lr=1.0, warmup_steps=10, schedule='cosine', end_lr_factor=0.1, b1=0.9, b2=0.99,
      eps=1e-8, weight_decay=0.1, grad_clip=1.0, grad_accum=1))
  schedule = optimizer.learning_rate_schedule(optim, 110)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10), schedule(60),
                              schedule(110)], [0.0, 0.5, 1.0, 0.55, 0.1], atol=1e-6)
  optim.schedule = 'linear'
  schedule = optimizer.learning_rate_schedule(optim, 110)
  np.testing.assert_allclose([schedule(60), schedule(110)], [0.55, 0.1], atol=1e-6)
  params = {'Dense_0': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones(4)},
            'LayerNorm_0': {'scale': jnp.ones(4)}, 'Embed_0': {'embedding': jnp.ones((5, 4))},
            'positional_embedding': jnp.ones((7, 4)), 'Conv_0': {'kernel': jnp.ones((3, 3, 2, 4))}}
  assert optimizer.weight_decay_mask(params) == {
      'Dense_0': {'kernel': True, 'bias': False}, 'LayerNorm_0': {'scale': False},
      'Embed_0': {'embedding': False}, 'positional_embedding': False,
      'Conv_0': {'kernel': True}}
  # Decay moves only the masked-in leaves (zero gradients, lr 1 after warmup).
  optim.warmup_steps = 0
  tx, _ = optimizer.make_optimizer(optim, 10)
  updates, _ = jax.jit(lambda p: tx.update(jax.tree.map(jnp.zeros_like, p), tx.init(p), p))(
      params)
  assert float(jnp.abs(updates['Dense_0']['kernel']).max()) > 0
  assert float(jnp.abs(updates['Dense_0']['bias']).max()) == 0
  assert float(jnp.abs(updates['Embed_0']['embedding']).max()) == 0


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path):
  config = toy.toy_config(steps=12, ckpt_every=4, max_nonfinite=3)
  # Batch 1 (step 2) is NaN: skipped. Batches 5, 6, 7 (steps 6-8): three in a row -> stop.
  with pytest.raises(loop.NonFiniteError, match=r'3 consecutive steps.*max_nonfinite=3.*/4'):
    train(tmp_path, 'nan', config, nan_at=(1, 5, 6, 7))
  workdir = tmp_path / 'nan'
  m = writers.read_metrics(workdir / 'toy')
  assert m[2]['nonfinite'] == 1 and m[2]['nonfinite_total'] == 1
  assert m[2]['param_norm'] == m[1]['param_norm']   # params unchanged by the bad step
  assert m[3]['nonfinite'] == 0 and m[3]['nonfinite_run'] == 0
  assert math.isfinite(m[5]['loss']) and m[8]['nonfinite_run'] == 3
  assert m[8]['param_norm'] == m[5]['param_norm']
  # The last good checkpoint (step 4) is intact and restores; nothing was saved after.
  assert checkpoint.Checkpointer(workdir / 'toy', keep=0).all_steps() == [4]
  restored, data_state = restore_state(workdir, config)
  assert int(restored.step) == 4 and [s['index'] for s in data_state] == [4]
  assert int(restored.nonfinite_total) == 1
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored.params))


def test_checkpoints_export_logs_and_resume_skip(tmp_path):
  config = toy.toy_config(steps=8, ckpt_every=4, keep=1, sample_every=4)
  workdir, summary, metrics = train(tmp_path, 'ck', config)
  assert summary['final_step'] == 8 and sorted(metrics) == list(range(1, 9))
  assert {'loss', 'learning_rate', 'grad_norm', 'param_norm', 'steps_per_s',
          'examples_per_s', 'tflops_per_s', 'mse_mean'} <= set(metrics[8])
  ckpt = checkpoint.Checkpointer(workdir / 'toy', keep=1)
  assert ckpt.all_steps() == [8]   # keep=1
  saved_config = ckpt.restore_config()
  ckpt.close()
  assert saved_config.toy.model.width == 32 and saved_config.toy.steps == 8
  assert saved_config.mesh.to_dict() == {'data': -1, 'fsdp': 1}
  # The export holds the EMA params of the checkpoint, and the config.
  restored, _ = restore_state(workdir, config)
  export_config, params = checkpoint.load_stage(workdir, 'toy')
  assert export_config.toy.model.width == 32
  np.testing.assert_array_equal(params['block1']['Dense_1']['kernel'],
                                np.asarray(restored.ema_params['block1']['Dense_1']['kernel']))
  assert not np.array_equal(params['block1']['Dense_1']['kernel'],
                            np.asarray(restored.params['block1']['Dense_1']['kernel']))
  events = list((workdir / 'toy' / 'tensorboard').glob('events.out.tfevents.*'))
  assert events and events[0].stat().st_size > 1000   # scalars and two sample grids
  grids = sorted(p.name for p in (workdir / 'toy' / 'samples').glob('*.png'))
  assert grids == ['samples_0000004.png', 'samples_0000008.png']
  # A half-written checkpoint (a save that crashed) is never taken for the latest.
  junk = workdir / 'toy' / 'checkpoints' / '12.orbax-checkpoint-tmp-1234'
  junk.mkdir()
  (junk / 'state').write_text('garbage')
  # Running a finished stage again resumes at its end and trains nothing.
  _, summary, _ = train(tmp_path, 'ck', config)
  assert summary['start_step'] == 8 and summary['final_step'] == 8
  with pytest.raises(FileNotFoundError, match='train stage'):
    checkpoint.load_stage(workdir, 'prior')


def test_resuming_with_another_seed(tmp_path):
  """A finished stage is reused whatever the run's seed (another run's stage linked in); a
  stage resumed halfway with another seed fails with an error that names the seed."""
  config = toy.toy_config(steps=4, ckpt_every=4)
  train(tmp_path, 'seed', config)
  config.seed = 1
  _, summary, _ = train(tmp_path, 'seed', config)
  assert summary['start_step'] == 4 and summary['final_step'] == 4
  config.toy.steps = 8
  with pytest.raises(ValueError, match=r'cannot resume.*config\.seed'):
    train(tmp_path, 'seed', config)


def test_image_grid():
  images = np.stack([np.full((2, 2, 3), v) for v in (-1.0, 0.0, 1.0)])
  grid = writers.image_grid(images)
  assert grid.shape == (4, 4, 3) and grid.dtype == np.uint8
  assert grid[0, 0, 0] == 0 and grid[0, 2, 0] == 128 and grid[2, 0, 0] == 255


def test_distributed_settings_flags_over_config_over_environment(monkeypatch):
  from dalle2_jax.training import runtime  # pylint: disable=g-import-not-at-top
  config = toy.toy_config()
  config.distributed = dict(enabled=False, coordinator_address='', num_processes=0,
                            process_id=-1)
  assert runtime.distributed_settings(config) is None   # single process
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'env:1')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '4')
  monkeypatch.setenv('JAX_PROCESS_ID', '3')
  assert runtime.distributed_settings(config) == dict(
      coordinator_address='env:1', num_processes=4, process_id=3)
  config.distributed.update(coordinator_address='cfg:2', num_processes=2, process_id=1)
  assert runtime.distributed_settings(config, process_id=0) == dict(
      coordinator_address='cfg:2', num_processes=2, process_id=0)
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS')
  config.distributed.update(coordinator_address='', num_processes=0, process_id=-1,
                            enabled=True)   # e.g. Cloud TPU: JAX finds the cluster
  assert runtime.distributed_settings(config) == dict(
      coordinator_address=None, num_processes=4, process_id=3)
  config.distributed.port = 1
  with pytest.raises(ValueError, match=r"config\.distributed has unknown fields \['port'\]"):
    runtime.distributed_settings(config)


def test_write_images_saves_a_png_grid(tmp_path):
  from PIL import Image
  images = np.stack([np.full((4, 4, 3), v) for v in (-1.0, 0.0, 1.0, 0.5)])
  w = writers.MetricWriter(tmp_path / 'decoder', 'decoder', 10, console=False)
  w.write_images(7, 'samples', images)
  w.close()
  png = np.asarray(Image.open(tmp_path / 'decoder' / writers.SAMPLES_DIR / 'samples_0000007.png'))
  np.testing.assert_array_equal(png, writers.image_grid(images))
  assert png.shape == (8, 8, 3) and png[0, 4, 0] == 128 and png[4, 0, 0] == 255


def test_num_cpu_devices_splits_the_host_before_jax_starts():
  """train.py's order (the engine imported, then the device count set) gives that many CPU
  devices, so nothing the engine imports starts JAX's backends; a count forced through
  XLA_FLAGS (as this test suite does) wins; once JAX has started it is ignored, with a
  warning, not an error."""
  code = ('import jax\n'
          'from dalle2_jax.training import loop, runtime\n'
          'runtime.set_num_cpu_devices(3)\n'
          'print(jax.device_count())\n'
          'runtime.set_num_cpu_devices(2)\n'
          'print(jax.device_count())\n')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['JAX_PLATFORMS'] = 'cpu'
  run = lambda env: subprocess.run([sys.executable, '-c', code], env=env, text=True,
                                   capture_output=True, timeout=300, check=True)
  proc = run(env)
  assert proc.stdout.split() == ['3', '3']
  assert 'num_cpu_devices=2 ignored: JAX had already started' in proc.stderr
  proc = run(dict(env, XLA_FLAGS='--xla_force_host_platform_device_count=5'))
  assert proc.stdout.split() == ['5', '5']
  from dalle2_jax.training import runtime  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match='config.num_cpu_devices=-1'):
    runtime.set_num_cpu_devices(-1)
