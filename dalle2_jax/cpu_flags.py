"""XLA:CPU flags for the sampling entry points (sample.py, dalle2_jax.evaluate).

YNNPACK's dot and convolution fusion (`--xla_cpu_experimental_ynn_fusion_type=dot`) makes the
forward passes of sampling faster on CPU: the fast-preset pipeline of bench/matched.py took
2.21 s instead of 2.78 s (python bench/xla_flags.py, bench/results/xla_flags_cpu.json).
Training steps are not faster with it (decoder_s 1.11 s vs 1.00 s), so train.py leaves XLA's
defaults. XLA reads its flags once, when the backend starts, so this runs before anything
touches a device. A ynn setting already in XLA_FLAGS wins; the flag only affects XLA:CPU.
"""

import os

SAMPLING_FLAGS = '--xla_cpu_experimental_ynn_fusion_type=dot'


def use_sampling_flags() -> None:
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_experimental_ynn_fusion_type' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {SAMPLING_FLAGS}'.strip()
