r"""Trains the unCLIP stages of a config, in order.

  python train.py --config configs/tiny.py --workdir runs/tiny [--stage clip]
  python train.py --config configs/shapes.py --config.decoder.steps=1000 --workdir runs/shapes
"""

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Where checkpoints and logs go '
                               '(a local path or anything etils.epath reads, e.g. gs://).')
_STAGE = flags.DEFINE_multi_string('stage', None, 'Train only these stages '
                                   '(default: all of config.stages, in order).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  from dalle2_jax.training import loop  # pylint: disable=g-import-not-at-top
  loop.run(_CONFIG.value, _WORKDIR.value, stages=_STAGE.value)


if __name__ == '__main__':
  app.run(main)
