"""dalle2_jax.cpu_flags: the entry points' XLA:CPU settings never override the user's, and
keep_host_memory stops XLA:CPU from faulting in its temporary buffers at every step."""

import json
import os
import platform
import subprocess
import sys

import pytest

from dalle2_jax import cpu_flags


def test_adds_the_flag_and_keeps_the_users(monkeypatch):
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  cpu_flags.use_sampling_flags()
  assert cpu_flags.SAMPLING_FLAGS in os.environ['XLA_FLAGS']
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
  cpu_flags.use_sampling_flags()
  assert os.environ['XLA_FLAGS'] == (
      '--xla_force_host_platform_device_count=8 ' + cpu_flags.SAMPLING_FLAGS)
  monkeypatch.setenv('XLA_FLAGS', '--xla_cpu_experimental_ynn_fusion_type=-reduce')
  cpu_flags.use_sampling_flags()
  assert os.environ['XLA_FLAGS'] == '--xla_cpu_experimental_ynn_fusion_type=-reduce'


# A jitted function whose temporaries (64 MB each) are far above glibc's mmap threshold, run
# in a fresh process: the page faults of each call after the first, and the results.
_PROBE = r"""
import json, resource
from dalle2_jax import cpu_flags
kept = cpu_flags.keep_host_memory()
import jax, jax.numpy as jnp
@jax.jit
def f(x):
  y = jnp.sin(x) * 2.0
  return jnp.sum(jnp.square(jnp.cos(y) * y + jnp.tanh(x)))
x = jnp.linspace(-1.0, 1.0, 16 * 1024 * 1024)
values, faults = [float(f(x))], []
for _ in range(30):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  values.append(float(f(x)))
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(dict(kept=kept, faults=faults, values=values)))
"""


def _probe(env_update):
  env = {k: v for k, v in os.environ.items()
         if k != 'GLIBC_TUNABLES' and not k.startswith('MALLOC_')}
  env.update(env_update)
  out = subprocess.run([sys.executable, '-c', _PROBE], env=env, check=True,
                       capture_output=True, text=True, timeout=300).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc',
                    reason='glibc malloc only')
def test_keep_host_memory_stops_the_page_faults_and_changes_no_number():
  kept = _probe({})
  # The user's own malloc tuning wins: the probe then runs with glibc's defaults.
  default = _probe({'GLIBC_TUNABLES': 'glibc.malloc.tcache_count=7'})
  assert kept['kept'] and not default['kept']
  pages = 64 * 1024 * 1024 // 4096   # one temporary
  # Every call faults its temporaries in afresh by default. Kept, the heap grows over the
  # first calls (up to about 15 here), then they reuse it: at most a stray one faults.
  assert min(default['faults']) > pages, default['faults']
  assert sum(f > pages / 4 for f in kept['faults'][-15:]) <= 2, kept['faults']
  assert len(set(kept['values'])) == 1 and len(set(default['values'])) == 1
  assert kept['values'][0] == pytest.approx(default['values'][0], rel=1e-5)
  assert not _probe({'MALLOC_ARENA_MAX': '2'})['kept']
