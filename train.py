r"""Trains the unCLIP stages of a config, in order.

  python train.py --config configs/tiny.py --workdir runs/tiny [--stage clip]
  python train.py --config configs/shapes.py --config.decoder.steps=1000 --workdir runs/shapes

Each stage writes into <workdir>/<stage> (checkpoints, export, metrics.jsonl, tensorboard)
and resumes from there when restarted. SIGTERM saves a checkpoint and exits with status 0.

Multi-host: run the same command on every host with --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (or config.distributed / JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID); on Cloud TPU --distributed alone is enough.
"""

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and logs go '
                               '(a local path or anything etils.epath reads, e.g. gs://).')
_STAGE = flags.DEFINE_multi_string('stage', None, 'Train only these stages '
                                   '(default: all of config.stages, in order).')
_DISTRIBUTED = flags.DEFINE_bool('distributed', None, 'Call jax.distributed.initialize() '
                                 '(automatic on Cloud TPU); default: config.distributed.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'Multi-host coordinator '
                                   'HOST:PORT (process 0).')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-host process count.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process (0..num_processes-1).')
_CACHE_DIR = flags.DEFINE_string('compilation_cache_dir', None, 'Persistent XLA compilation '
                                 'cache directory; default: config.compilation_cache_dir.')
flags.mark_flags_as_required(['config', 'workdir'])


class _QuietOrbax:
  """Drops orbax's per-save INFO lines (dozens per checkpoint); its warnings still show."""

  def filter(self, record):
    return record.levelno > logging.converter.STANDARD_INFO or 'orbax' not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietOrbax())
  # pylint: disable=g-import-not-at-top
  import jax
  from dalle2_jax.training import loop
  from dalle2_jax.training import runtime
  # pylint: enable=g-import-not-at-top
  config = _CONFIG.value
  runtime.set_num_cpu_devices(int(config.get('num_cpu_devices', 0)))
  settings = runtime.distributed_settings(
      config, coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value)
  if settings is None and _DISTRIBUTED.value:
    settings = {}   # automatic cluster detection
  runtime.initialize_distributed(settings)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)   # only process 0 logs
  cache_dir = _CACHE_DIR.value
  if cache_dir is None:
    cache_dir = config.get('compilation_cache_dir', '')
  runtime.set_compilation_cache(cache_dir)
  try:
    summaries = loop.run(config, _WORKDIR.value, stages=_STAGE.value)
    minutes = {stage: s['wall_time'] / 60 for stage, s in summaries.items()}
    logging.info('Trained in %.1f min: %s.', sum(minutes.values()),
                 ', '.join(f'{stage} {m:.1f} min' for stage, m in minutes.items()))
  except loop.Preempted as e:
    logging.warning('%s Restart the same command to resume.', e)
    sys.exit(0)


if __name__ == '__main__':
  from dalle2_jax import cpu_flags  # pylint: disable=g-import-not-at-top
  cpu_flags.keep_host_memory()   # before JAX starts any thread
  app.run(main)
