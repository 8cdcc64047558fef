"""The training engine across real processes: kill and resume, SIGTERM, two hosts.

Each test runs `tests/training_toy.py` (the toy task) in subprocesses and compares with the
same config trained in this process.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dalle2_jax.training import checkpoint
from dalle2_jax.training import loop
from dalle2_jax.training import writers
import training_toy as toy


@pytest.fixture(autouse=True, scope='module')
def fast_compile():
  """Less XLA optimisation: these tests compile far more than they run."""
  previous = jax.config.values['jax_disable_most_optimizations']
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'tests' / 'training_toy.py'


def start(workdir, *args, devices=8):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu',
             JAX_DISABLE_MOST_OPTIMIZATIONS='true',   # as in this process (fast_compile)
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return subprocess.Popen([sys.executable, str(SCRIPT), '--workdir', str(workdir),
                           '--devices', str(devices), *map(str, args)],
                          env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def wait_for_step(proc, stage_dir, step, timeout=120):
  """Polls the metrics JSONL until `step` is logged (or fails if the process ends)."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f'process ended early:\n{proc.stdout.read()}')
    if max(writers.read_metrics(stage_dir), default=0) >= step:
      return
    time.sleep(0.05)
  proc.kill()
  raise AssertionError(f'step {step} not reached in {timeout} s')


def reference_losses(tmp_path, steps, ckpt_every):
  config = toy.toy_config(steps=steps, ckpt_every=ckpt_every)
  loop.run(config, tmp_path / 'reference', task_fn=toy.toy_task_fn,
           input_fn=toy.fake_input_fn())
  m = writers.read_metrics(tmp_path / 'reference' / 'toy')
  return config, [m[s]['loss'] for s in range(1, steps + 1)]


def test_sigkill_and_sigterm_then_resume_give_identical_losses(tmp_path):
  steps, every = 12, 3
  workdir = tmp_path / 'run'
  stage_dir = workdir / 'toy'
  args = ('--steps', steps, '--ckpt_every', every)
  # 1. SIGKILL mid-run (possibly mid-save).
  proc = start(workdir, *args, '--sleep', 0.3)
  wait_for_step(proc, stage_dir, 5)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(writers.read_metrics(stage_dir))
  assert killed_at < steps
  # 2. Resume, then SIGTERM (preemption): saves and exits cleanly.
  proc = start(workdir, *args, '--sleep', 0.3)
  wait_for_step(proc, stage_dir, killed_at + 2)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert 'PREEMPTED' in out, out
  preempted_at = checkpoint.Checkpointer(stage_dir, keep=0).latest_step()
  assert killed_at < preempted_at < steps, (killed_at, preempted_at)
  # 3. Resume to the end.
  proc = start(workdir, *args)
  out, _ = proc.communicate(timeout=180)
  assert proc.returncode == 0 and 'DONE' in out, out
  metrics = writers.read_metrics(stage_dir)
  # Steps were logged more than once (re-run after resuming), and the later line wins.
  lines = (stage_dir / writers.METRICS_FILE).read_text().splitlines()
  assert len(lines) >= steps
  _, expected = reference_losses(tmp_path, steps, every)
  got = [metrics[s]['loss'] for s in range(1, steps + 1)]
  assert got == expected   # bit-identical on CPU


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
  steps, every = 4, 2
  workdir = tmp_path / 'two'
  port = _free_port()
  procs = [start(workdir, '--steps', steps, '--ckpt_every', every, '--num_processes', 2,
                 '--process_id', i, '--port', port, devices=4) for i in range(2)]
  outs = [p.communicate(timeout=240)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0 and 'DONE' in out, out
  config, expected = reference_losses(tmp_path, steps, every)
  metrics = writers.read_metrics(workdir / 'toy')   # written by process 0 only
  np.testing.assert_allclose([metrics[s]['loss'] for s in range(1, steps + 1)], expected,
                             rtol=1e-6)
  # The checkpoints hold the same state, and each process's iterator state.
  from test_training import restore_state  # pylint: disable=g-import-not-at-top
  two, data_two = restore_state(workdir, config)
  one, data_one = restore_state(tmp_path / 'reference', config)
  assert [s['index'] for s in data_two] == [steps] * 2
  assert [s['index'] for s in data_one] == [steps]
  for a, b in zip(jax.tree.leaves(two), jax.tree.leaves(one)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  _, exported = checkpoint.load_stage(workdir, 'toy')
  np.testing.assert_allclose(exported['Dense_0']['kernel'],
                             np.asarray(one.ema_params['Dense_0']['kernel']), rtol=1e-5,
                             atol=1e-7)
