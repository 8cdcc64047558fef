"""Test setup: 8 simulated CPU devices for every test.

Tests that need "1 device" build their mesh from `jax.devices()[:1]`; tests that compare
1 and 8 devices use both meshes in one process.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_platforms', 'cpu')
