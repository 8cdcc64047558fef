"""The training loop every unCLIP stage runs through.

  run(config, workdir)   trains config.stages in order, each into <workdir>/<stage>/:
      checkpoints/<step>/   orbax: train state + EMA, input iterator state, config (JSON)
      export/               params-only EMA export (what sampling and later stages load)
      metrics.jsonl         one JSON object per logged step
      tensorboard/          TensorBoard event files

A stage is a `dalle2_jax.tasks.base.Task`; everything else is here: mesh, sharded init,
the ahead-of-time compiled train step (state donated), checkpoints and auto-resume,
SIGTERM handling, non-finite step accounting, logging. A stage whose last checkpoint is
at its final step is skipped, so re-running a config resumes where it stopped.
"""

from __future__ import annotations

import os
import signal
import statistics
import threading
import time
from typing import Callable
import zlib

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from dalle2_jax.training import checkpoint as checkpoint_lib
from dalle2_jax.training import optimizer as optimizer_lib
from dalle2_jax.training import sharding as sharding_lib
from dalle2_jax.training import state as state_lib
from dalle2_jax.training import writers as writers_lib

# Fields the engine reads from every stage section (tasks read the rest: model, ...).
STAGE_KEYS = ('task', 'steps', 'batch_size', 'dtype', 'remat', 'optim', 'ema', 'log_every',
              'ckpt_every', 'keep', 'sample_every', 'max_nonfinite')
DTYPES = ('float32', 'bfloat16')


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


class Preempted(Exception):  # noqa: N818
  """SIGTERM (or a cluster preemption notice) arrived; a checkpoint was saved."""


def check_stage_config(config: ml_collections.ConfigDict, stage: str) -> None:
  """Fails before any compilation, naming the field."""
  if stage not in config:
    raise ValueError(f'Stage {stage!r} has no section in the config; '
                     f'config.stages is {tuple(config.stages)}.')
  sc = config[stage]
  missing = [k for k in STAGE_KEYS if k not in sc]
  if missing:
    raise ValueError(f'config.{stage} lacks the engine fields {missing} '
                     f'(see the stage() helper in configs/tiny.py).')
  optimizer_lib.check_optim_config(stage, sc.optim)
  state_lib.check_ema_config(stage, sc.ema)
  if sc.dtype not in DTYPES:
    raise ValueError(f'config.{stage}.dtype={sc.dtype!r}; choose one of {DTYPES}.')
  for key in ('steps', 'batch_size', 'log_every'):
    if int(sc[key]) < 1:
      raise ValueError(f'config.{stage}.{key}={sc[key]} must be >= 1.')
  for key in ('ckpt_every', 'keep', 'sample_every', 'max_nonfinite'):
    if int(sc[key]) < 0:
      raise ValueError(f'config.{stage}.{key}={sc[key]} must be >= 0.')


def default_task_fn(config, stage, workdir):
  from dalle2_jax import tasks  # pylint: disable=g-import-not-at-top
  return tasks.get_task(config, stage, workdir)


def default_input_fn(config, stage, task, mesh, seed):
  from dalle2_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  sc = config[stage]
  return pipeline.make_input(config, config.data.train_split,
                             global_batch_size=int(sc.batch_size), mesh=mesh,
                             image_size=task.input_image_size(), prepare=task.prepare_batch,
                             seed=seed, two_object_repeats=int(sc.get('two_object_repeats', 1)))


def absolute_workdir(workdir) -> str:
  """Local paths become absolute (orbax refuses relative ones); URLs (gs://...) stay."""
  workdir = os.fspath(workdir)
  return workdir if '://' in workdir else os.path.abspath(workdir)


def stage_seed(config, stage: str) -> int:
  return (int(config.get('seed', 0)) + zlib.crc32(stage.encode())) % (2**31)


class _PreemptionWatch:
  """SIGTERM -> save and stop. Multi-process runs use JAX's preemption sync point, so all
  processes stop at the same step."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: saving a checkpoint and stopping.')
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:   # no preemption service
        return False
    return self.requested

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def run(config: ml_collections.ConfigDict, workdir, stages=None, *,
        task_fn: Callable | None = None, input_fn: Callable | None = None,
        devices=None) -> dict[str, dict]:
  """Trains `stages` (default config.stages) in order; returns a summary per stage.

  `task_fn(config, stage, workdir) -> Task` and `input_fn(config, stage, task, mesh, seed)
  -> iterator` default to the real tasks and input pipeline (tests pass small ones);
  `devices` defaults to all devices.
  """
  stages = list(stages or config.stages)
  mesh = sharding_lib.make_mesh(config, devices)
  sharding_lib.axis_rules(config)
  for stage in stages:   # every stage's config is checked before anything compiles
    check_stage_config(config, stage)
    sharding_lib.check_batch_size(stage, int(config[stage].batch_size),
                                  int(config[stage].optim.grad_accum), mesh)
  results = {}
  watch = _PreemptionWatch()
  try:
    for stage in stages:
      results[stage] = train_stage(config, workdir, stage, task_fn=task_fn,
                                   input_fn=input_fn, devices=devices, watch=watch)
  finally:
    watch.close()
  return results


def _fetch(tree):
  return jax.tree.map(lambda x: np.asarray(x).item(), jax.device_get(tree))


def _to_host(x):
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def train_stage(config, workdir, stage: str, *, task_fn=None, input_fn=None, devices=None,
                watch: _PreemptionWatch | None = None) -> dict:
  """Trains one stage into <workdir>/<stage>; see `run`."""
  wall_start = time.perf_counter()
  workdir = absolute_workdir(workdir)
  check_stage_config(config, stage)
  sc = config[stage]
  task_fn = task_fn or default_task_fn
  input_fn = input_fn or default_input_fn
  total_steps = int(sc.steps)
  batch_size = int(sc.batch_size)
  mesh = sharding_lib.make_mesh(config, devices)
  rules = sharding_lib.axis_rules(config)
  sharding_lib.check_batch_size(stage, batch_size, int(sc.optim.grad_accum), mesh)
  stage_dir = epath.Path(workdir) / stage
  if jax.process_index() == 0:
    stage_dir.mkdir(parents=True, exist_ok=True)
  logging.info('Stage %s: mesh %s, batch %d, %d steps, into %s', stage, dict(mesh.shape),
               batch_size, total_steps, stage_dir)

  task = task_fn(config, stage, workdir)
  seed = stage_seed(config, stage)
  data = input_fn(config, stage, task, mesh, seed)
  tx, schedule = optimizer_lib.make_optimizer(sc.optim, total_steps)
  ckpt = checkpoint_lib.Checkpointer(stage_dir, keep=int(sc.keep))
  watch = watch or _PreemptionWatch()

  # Batch shapes for the abstract init: peek at one batch, then rewind the iterator.
  data_start = data.get_state()
  first = next(data)
  batch_shapes = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in first.items()}
  del first
  spec = state_lib.make_state_spec(task, tx, batch_shapes, mesh, rules)

  latest = ckpt.latest_step()
  if latest is not None:
    logging.info('Resuming stage %s from %s/%d', stage, ckpt.directory, latest)
    state, data_state = ckpt.restore(latest, spec.abstract, spec.shardings)
  else:
    state = spec.init_fn(jax.random.key(seed))
    data.set_state(data_start)
  start = int(jax.device_get(state.step))

  frozen = task.frozen_params()
  if frozen is not None:
    frozen = jax.device_put(frozen, state_lib.frozen_shardings(frozen, mesh, rules))
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    frozen = nn.unbox(frozen)

  # wall_time: this call's seconds, from reading the config to the last checkpoint.
  summary = dict(stage=stage, start_step=start, final_step=start, compile_time=0.0,
                 step_time=float('nan'), wall_time=0.0, mesh=dict(mesh.shape),
                 preempted=False)
  if start >= total_steps:
    logging.info('Stage %s is already trained (%d/%d steps).', stage, start, total_steps)
    if not checkpoint_lib.export_dir(workdir, stage).exists():
      checkpoint_lib.write_export(workdir, stage, config, state.ema_params)
    ckpt.close()
    summary['wall_time'] = time.perf_counter() - wall_start
    return summary
  if latest is not None:   # a finished stage needs no input (it may be another run's)
    try:
      data.set_state(data_state)
    except ValueError as e:
      ckpt.close()
      raise ValueError(
          f'Stage {stage}: the input pipeline cannot resume from {ckpt.directory}/{latest}: '
          f'{e} The checkpoint was written with another data order: this run\'s seed '
          '(--config.seed) or data settings differ from those it was trained with (the '
          'checkpoint holds its config). Resume with those, or train into a new --workdir.'
      ) from e

  # One train step, compiled ahead of time; the state is donated (updated in place).
  replicated = sharding_lib.replicated(mesh)
  batch_sharding = sharding_lib.batch_sharding(mesh)
  train_step = state_lib.make_train_step(task, tx, schedule, sc, mesh, rules)
  frozen_sharding = jax.tree.map(lambda x: x.sharding, frozen)
  jitted = jax.jit(train_step,
                   in_shardings=(spec.shardings, batch_sharding, replicated, frozen_sharding),
                   out_shardings=(spec.shardings, replicated), donate_argnums=(0,))
  rng = jax.random.key(seed ^ 0x5EED)
  sample_rng = jax.random.key(seed ^ 0x5A3D1E)
  abstract_state = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), spec.abstract,
      spec.shardings)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sharding)
                    for k, v in batch_shapes.items()}
  t0 = time.perf_counter()
  compiled = jitted.lower(abstract_state, abstract_batch, rng, frozen).compile()
  summary['compile_time'] = time.perf_counter() - t0
  logging.info('Stage %s: train step compiled in %.2f s.', stage, summary['compile_time'])

  try:
    flops = 3.0 * float(task.flops_per_example())   # forward + backward
  except NotImplementedError:
    flops = 0.0
  writer = writers_lib.MetricWriter(stage_dir, stage, total_steps)
  sampler = None
  max_nonfinite = int(sc.max_nonfinite)
  ckpt_every = int(sc.ckpt_every)
  log_every = int(sc.log_every)
  sample_every = int(sc.sample_every)

  def save(step_done: int):
    ckpt.save(step_done, state, data.get_state(), config)
    checkpoint_lib.write_export(workdir, stage, config, state.ema_params)

  step_times = []
  last = {'time': None, 'step': start, 'log_time': time.perf_counter(), 'log_step': start}

  def process(step_done: int, metrics) -> None:
    """Host side of a finished step: counters, logs; raises on too many bad steps."""
    m = _fetch(metrics)
    now = time.perf_counter()
    if last['time'] is not None:
      step_times.append((now - last['time']) / max(step_done - last['step'], 1))
    last['time'], last['step'] = now, step_done
    if m['nonfinite']:
      logging.warning('Stage %s step %d: non-finite loss or gradient (loss=%s, grad_norm=%s);'
                      ' params unchanged (%d in a row, %d in all).', stage, step_done,
                      m['loss'], m['grad_norm'], m['nonfinite_run'], m['nonfinite_total'])
    if step_done % log_every == 0 or step_done == total_steps or m['nonfinite']:
      elapsed = now - last['log_time']
      steps_per_s = (step_done - last['log_step']) / elapsed if elapsed > 0 else 0.0
      last['log_time'], last['log_step'] = now, step_done
      m.update(steps_per_s=steps_per_s, examples_per_s=steps_per_s * batch_size)
      if flops:
        m['tflops_per_s'] = steps_per_s * batch_size * flops / 1e12
      writer.write_scalars(step_done, m)
    if max_nonfinite and m['nonfinite_run'] >= max_nonfinite:
      ckpt.wait()
      raise NonFiniteError(
          f'Stage {stage}: {m["nonfinite_run"]} consecutive steps (up to step {step_done}) had '
          f'a non-finite loss or gradient (config.{stage}.max_nonfinite={max_nonfinite}). '
          f'The last good checkpoint is {ckpt.directory}/{ckpt.latest_step()}. Lower '
          f'config.{stage}.optim.lr, check the data, or use dtype=float32.')

  pending = None
  step = start
  try:
    while step < total_steps:
      if watch.should_stop(step):
        if pending is not None:
          process(*pending)
          pending = None
        logging.warning('Stage %s: preempted at step %d; saving.', stage, step)
        if ckpt.latest_step() != step:
          save(step)
        ckpt.wait()
        summary.update(final_step=step, preempted=True)
        raise Preempted(f'Preempted at stage {stage} step {step}; checkpoint saved.')
      batch = next(data)
      state, metrics = compiled(state, batch, rng, frozen)
      step += 1
      if pending is not None:
        process(*pending)   # the previous step's metrics, while this step runs
      pending = (step, metrics)
      if sample_every and step % sample_every == 0:
        sampler = sampler or _make_sampler(task, mesh, rules)
        images = sampler(state.ema_params, batch, jax.random.fold_in(sample_rng, step), frozen)
        if images is not None:
          writer.write_images(step, 'samples', _to_host(images))
      if (ckpt_every and step % ckpt_every == 0) or step == total_steps:
        process(*pending)
        pending = None
        save(step)
    if pending is not None:
      process(*pending)
  finally:
    writer.close()
    ckpt.close()
    summary['wall_time'] = time.perf_counter() - wall_start
  summary['final_step'] = step
  if step_times:
    summary['step_time'] = statistics.median(step_times)
  logging.info('Stage %s done: %d steps in %.1f min, compile %.2f s, %.4f s/step.', stage,
               step, summary['wall_time'] / 60, summary['compile_time'], summary['step_time'])
  return summary


def _make_sampler(task, mesh, rules):
  def sample(params, batch, rng, frozen):
    with sharding_lib.use_mesh(mesh, rules):
      return task.sample(params, batch, rng, frozen)
  return jax.jit(sample)
