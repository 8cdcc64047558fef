"""Input pipeline across 2 JAX processes (4 simulated CPU devices each, gloo collectives).

Each process reads its own half of the records; the global batch built from both halves must
be the same in both processes and equal to the per-process batches stacked in process order.
"""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

from dalle2_jax.data import builders
from dalle2_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = textwrap.dedent('''
    import sys
    sys.path.insert(0, {repo!r})
    import jax
    jax.config.update('jax_platforms', 'cpu')
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address='127.0.0.1:{port}', num_processes=2,
                               process_id=int(sys.argv[1]))
    import numpy as np
    from jax.experimental import multihost_utils
    from configs import tiny
    from dalle2_jax.data import pipeline
    c = tiny.get_config()
    c.unlock()
    c.data.data_dir = {data_dir!r}
    c.data.shapes.update(seed=0, num_train=40, num_test=16, num_heldout=16)
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'fsdp'))
    it = pipeline.make_input(c, 'train', global_batch_size=16, mesh=mesh)
    sums = []
    for _ in range(2):
      b = next(it)
      assert b['image'].shape == (16, 64, 64, 3), b['image'].shape
      per_example = jax.jit(lambda x, t: x.sum((1, 2, 3)) + t.sum(1))(b['image'], b['tokens'])
      sums.append(np.asarray(multihost_utils.process_allgather(per_example, tiled=True)))
    np.save({out!r} + sys.argv[1] + '.npy', np.stack(sums))
''')


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_build_one_global_batch(tmp_path, monkeypatch):
  data_dir = str(tmp_path / 'tfds')
  builders.shapes_builder(seed=0, num_train=40, num_test=16, num_heldout=16,
                          data_dir=data_dir).download_and_prepare(file_format='array_record')
  out = str(tmp_path / 'sums')
  code = CHILD.format(repo=REPO, port=_free_port(), data_dir=data_dir, out=out)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu')
  procs = [subprocess.Popen([sys.executable, '-c', code, str(i)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  logs = [p.communicate(timeout=240)[0].decode(errors='replace') for p in procs]
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log[-3000:]
  got = [np.load(f'{out}{i}.npy') for i in range(2)]
  np.testing.assert_array_equal(got[0], got[1])   # both processes see the same global batch

  # Expected: each process's own per-process batches (process_index p of 2), stacked.
  sys.path.insert(0, REPO)
  from configs import tiny  # pylint: disable=g-import-not-at-top
  c = tiny.get_config()
  c.unlock()
  c.data.data_dir = data_dir
  c.data.shapes.update(seed=0, num_train=40, num_test=16, num_heldout=16)
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ('data', 'fsdp'))
  halves = []
  for p in range(2):
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    monkeypatch.setattr(jax, 'process_index', lambda p=p: p)
    it = pipeline.make_input(c, 'train', global_batch_size=16, mesh=mesh,
                             extra_keys=('index',))
    halves.append([it.next_numpy() for _ in range(2)])
  monkeypatch.undo()
  for step in range(2):
    image = np.concatenate([halves[p][step]['image'] for p in range(2)])
    tokens = np.concatenate([halves[p][step]['tokens'] for p in range(2)])
    want = image.sum((1, 2, 3)) + tokens.sum(1)
    np.testing.assert_allclose(got[0][step], want, rtol=1e-5)
  # The two processes read disjoint records (16 of their 20 each: still in epoch one).
  idx = [set(np.concatenate([halves[p][s]['index'] for s in range(2)]).tolist())
         for p in range(2)]
  assert len(idx[0]) == len(idx[1]) == 16 and not idx[0] & idx[1]
