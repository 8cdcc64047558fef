"""Process settings for XLA:CPU that the entry points apply before JAX starts.

Sampling flags (sample.py, dalle2_jax.evaluate): YNNPACK's dot and convolution fusion
(`--xla_cpu_experimental_ynn_fusion_type=dot`) makes the forward passes of sampling faster
on CPU: the fast-preset pipeline of bench/matched.py took 2.21 s instead of 2.78 s (python
bench/xla_flags.py, bench/results/xla_flags_cpu.json). Training steps are not faster with
it (decoder_s 1.11 s vs 1.00 s), so train.py leaves XLA's defaults. XLA reads its flags
once, when the backend starts, so this runs before anything touches a device. A ynn
setting already in XLA_FLAGS wins; the flag only affects XLA:CPU.

Host memory (train.py): XLA:CPU allocates each execution's temporary buffer with malloc from
its device threads, and glibc serves an allocation that large (the shapes config's CLIP
step: 350 MB on each of 2 CPU devices) with a fresh mmap, freed with munmap when the step
ends, because a thread's own arena cannot hold it. Every step then faults in every page
again: 170,000 page faults and about a third of the CLIP stage's time in the kernel.
`keep_host_memory` has glibc keep such blocks in one heap and reuse them: one arena, no
mmap, no trimming (glibc's M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD). On 2 cores the CLIP
steps took 14% less time, the upsampler's 13%, the decoder's the same; the prior's short
steps (55 ms) about 20% more, as one arena serialises small allocations; peak memory 0.1-0.9
GB more, held until the process ends. Sampling (dalle2_jax.evaluate) was no faster with it,
so sample.py and evaluate leave glibc's defaults (docs/shapes_experiments.md, 2026-12-07).
The numbers computed do not change; only where the memory comes from. It must run before JAX
(or anything) starts threads, and leaves malloc alone where the user has tuned it already
(GLIBC_TUNABLES with a glibc.malloc setting, or a MALLOC_* variable; e.g.
GLIBC_TUNABLES=glibc.malloc.tcache_count=7, glibc's default, keeps glibc's behaviour) or
where the C library is not glibc.
"""

import ctypes
import os
import platform

SAMPLING_FLAGS = '--xla_cpu_experimental_ynn_fusion_type=dot'

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_INT_MAX = 2 ** 31 - 1


def use_sampling_flags() -> None:
  flags = os.environ.get('XLA_FLAGS', '')
  if 'xla_cpu_experimental_ynn_fusion_type' not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} {SAMPLING_FLAGS}'.strip()


def keep_host_memory() -> bool:
  """Makes glibc malloc reuse large freed blocks (see the module doc); True if it did."""
  if 'glibc.malloc' in os.environ.get('GLIBC_TUNABLES', ''):
    return False
  if any(k.startswith('MALLOC_') for k in os.environ):   # MALLOC_ARENA_MAX, ..._
    return False
  if platform.system() != 'Linux' or platform.libc_ver()[0] != 'glibc':
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return all([mallopt(_M_ARENA_MAX, 1), mallopt(_M_MMAP_MAX, 0),
              mallopt(_M_TRIM_THRESHOLD, _INT_MAX)])
