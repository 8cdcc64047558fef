"""Test setup: 8 simulated CPU devices for every test.

Tests that need "1 device" build their mesh from `jax.devices()[:1]`; tests that compare
1 and 8 devices use both meshes in one process.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

# DALLE2_JAX_TEST_GPU=1 keeps the GPU (tests/test_gpu.py; every other test runs there too).
if os.environ.get('DALLE2_JAX_TEST_GPU') != '1':
  jax.config.update('jax_platforms', 'cpu')


import pytest  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.fixture
def cudnn_attention_on_cpu(monkeypatch):
  """attention_impl='cudnn' without a GPU: the backend is reported as 'gpu' and the fused
  call goes to jax.nn.dot_product_attention's generic XLA implementation with the same
  arguments, so the plumbing and the arguments are tested, not cuDNN. Returns the list of
  each attention call's `fused` argument (None for attention_impl='xla')."""
  from dalle2_jax.models import layers  # pylint: disable=g-import-not-at-top
  calls = []
  attend = layers.attend

  def recording(q, k, v, mask, dtype, fused=None):
    calls.append(fused)
    return attend(q, k, v, mask, dtype, fused='xla' if fused == 'cudnn' else fused)
  monkeypatch.setattr(layers, 'attend', recording)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  return calls
