"""Params-only exports: what sampling and later stages load.

An export is a directory holding
  config.json        the experiment config the params were trained with (whole config, JSON)
  stage.txt          the stage section name these params belong to (e.g. 'clip')
  params.safetensors the params, flattened to '/'-joined keys, float32 (no pickle)
Training writes one (the EMA params) at <workdir>/<stage>/export; the Hugging Face CLIP
importer writes the same format, so a frozen CLIP can come from either.
"""

from __future__ import annotations

import json
from typing import Any

from etils import epath
import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from safetensors import numpy as st_numpy

CONFIG_FILE = 'config.json'
STAGE_FILE = 'stage.txt'
PARAMS_FILE = 'params.safetensors'


def _flatten(params: Any) -> dict[str, np.ndarray]:
  params = nn.unbox(params)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params), sep='/')
  return {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}


def save_export(directory, config: ml_collections.ConfigDict, stage: str, params: Any):
  """Writes params (any pytree of arrays, boxed or not) and config to `directory`."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  tmp = directory / (PARAMS_FILE + '.tmp')
  tmp.write_bytes(st_numpy.save(_flatten(params)))
  tmp.replace(directory / PARAMS_FILE)   # atomic: a crash never leaves half a file
  (directory / CONFIG_FILE).write_text(config.to_json_best_effort(indent=2))
  (directory / STAGE_FILE).write_text(stage)


def load_config(directory) -> ml_collections.ConfigDict:
  directory = epath.Path(directory)
  path = directory / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path} does not exist: {directory} is not an export directory '
                            f'(train the stage with train.py, or convert weights first).')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_export(directory) -> tuple[ml_collections.ConfigDict, str, dict]:
  """Returns (config, stage, params) of an export directory; params are plain nested dicts."""
  directory = epath.Path(directory)
  config = load_config(directory)
  stage = (directory / STAGE_FILE).read_text().strip()
  flat = st_numpy.load((directory / PARAMS_FILE).read_bytes())
  params = flax.traverse_util.unflatten_dict(flat, sep='/')
  return config, stage, params
