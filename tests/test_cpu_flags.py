"""dalle2_jax.cpu_flags: the sampling entry points' XLA:CPU flags never override the user's."""

import os

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
