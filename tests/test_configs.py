"""Every config in configs/ builds, is locked, documents its command and passes the engine's
checks, so a config a user forks is always valid."""

import importlib.util
import pathlib
import re

import ml_collections
import pytest

from dalle2_jax import tasks
from dalle2_jax.training import loop

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'
CONFIGS = sorted(p for p in CONFIG_DIR.glob('*.py') if not p.name.startswith('_'))
VARIANTS = {'shapes.py': (None, 'quick')}


def load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_configs_found():
  assert {'tiny.py', 'shapes.py', 'coco64.py', 'dalle2_paper.py'} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: p.name)
def test_config_builds_and_passes_engine_checks(path):
  module = load(path)
  doc = (module.__doc__ or '').strip().splitlines()
  commands = [l for l in (module.__doc__ or '').splitlines() if 'train.py' in l]
  assert doc and commands, f'{path.name}: the docstring must start with the command that runs it'
  assert re.search(rf'--config configs/{path.name}', commands[0]), commands[0]
  for arg in VARIANTS.get(path.name, (None,)):
    c = module.get_config(arg)
    assert isinstance(c, ml_collections.ConfigDict)
    with pytest.raises((AttributeError, KeyError)):
      c.no_such_field_anywhere = 1   # locked: a typo in an override fails
    assert c.stages, 'config.stages lists the stages to train'
    for stage in c.stages:
      loop.check_stage_config(c, stage)
      kind = c[stage].get('task', stage)
      assert kind in tasks._TASKS, (stage, kind)   # pylint: disable=protected-access
