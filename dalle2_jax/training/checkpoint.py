"""Checkpoints of a stage: orbax CheckpointManager behind one small class.

A checkpoint at <workdir>/<stage>/checkpoints/<step>/ holds three items, saved together:
  state   the TrainState (params, optimizer state, EMA params, counters), sharded arrays
  data    the input iterator state of every process (JSON, one entry per process)
  config  the whole experiment config (JSON), so later stages and sampling rebuild the
          model from the workdir alone
Saves are asynchronous; orbax writes into a temporary directory and renames it when
complete, so a crash during a save leaves the previous checkpoint the latest good one.

For sampling, `load_stage(workdir, stage)` reads the params-only export (the EMA params,
<workdir>/<stage>/export, written by training at every checkpoint and at the end).
"""

from __future__ import annotations

import json
from typing import Any

from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from dalle2_jax.training import export

CHECKPOINT_DIR = 'checkpoints'
EXPORT_DIR = 'export'


def config_to_json_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def _gather_json(obj: Any) -> list[Any]:
  """Every process's JSON-serialisable `obj`, in process order (a collective)."""
  if jax.process_count() == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))
  padded = np.zeros(int(np.max(lengths)), np.uint8)
  padded[:data.size] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  lengths = np.asarray(lengths).reshape(-1)
  return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, lengths)]


# Replica-parallel saving (each replica writes a slice of a replicated array) pays off only
# for large arrays; for small ones its per-slice device ops cost more than they save.
_MIN_BYTES_FOR_REPLICA_PARALLEL = 1 << 20


def _type_handler_registry():
  th = ocp.type_handlers
  return th.create_type_handler_registry(
      (int, th.ScalarHandler()), (float, th.ScalarHandler()),
      (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()),
      (str, th.StringHandler()),
      (jax.Array, th.ArrayHandler(
          min_slice_bytes_for_replica_parallel=_MIN_BYTES_FOR_REPLICA_PARALLEL)))


class Checkpointer:
  """Async keep-last-K checkpoints of one stage."""

  def __init__(self, stage_dir, *, keep: int, async_save: bool = True):
    self.directory = epath.Path(stage_dir) / CHECKPOINT_DIR
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(keep) if keep else None,
        enable_async_checkpointing=async_save,
        create=True,
        cleanup_tmp_directories=True)   # leftovers of a save that crashed
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.PyTreeCheckpointHandler(
                           type_handler_registry=_type_handler_registry()),
                       'data': ocp.JsonCheckpointHandler(),
                       'config': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any,
           config: ml_collections.ConfigDict) -> None:
    """Starts an async save (returns once the arrays are copied off the devices)."""
    data_states = _gather_json(data_state)
    self.manager.save(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.PyTreeSave(state),
            data=ocp.args.JsonSave({'processes': data_states}),
            config=ocp.args.JsonSave(config_to_json_dict(config))),
        force=True)

  def restore(self, step: int, abstract_state: Any, shardings: Any) -> tuple[Any, Any]:
    """Returns (state with the given shardings, this process's data iterator state)."""
    processes = self.restore_data(step)
    if len(processes) != jax.process_count():
      raise ValueError(
          f'{self.directory}/{step} was written by {len(processes)} processes, but this run '
          f'has {jax.process_count()}; the input iterator state cannot be resumed. Resume '
          f'with {len(processes)} processes or start a new workdir.')
    return self.restore_state(step, abstract_state, shardings), processes[jax.process_index()]

  def restore_state(self, step: int, abstract_state: Any, shardings: Any) -> Any:
    """The train state of checkpoint `step`, placed with `shardings`."""
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state, shardings)
    restored = self.manager.restore(
        int(step),
        args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target))))
    return restored.state

  def restore_data(self, step: int) -> list[Any]:
    """The input iterator states of checkpoint `step`, one per process."""
    restored = self.manager.restore(
        int(step), args=ocp.args.Composite(data=ocp.args.JsonRestore()))
    return restored.data['processes']

  def restore_config(self, step: int | None = None) -> ml_collections.ConfigDict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    restored = self.manager.restore(
        int(step), args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(restored.config)

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def export_dir(workdir, stage: str) -> epath.Path:
  return epath.Path(workdir) / stage / EXPORT_DIR


def write_export(workdir, stage: str, config: ml_collections.ConfigDict, params: Any) -> None:
  """Writes the params-only export (a collective: every process calls it; process 0 writes)."""
  if jax.process_count() > 1:
    params = multihost_utils.process_allgather(params, tiled=True)
  else:
    params = jax.device_get(params)
  if jax.process_index() == 0:
    export.save_export(export_dir(workdir, stage), config, stage, params)


def load_stage(workdir, stage: str) -> tuple[ml_collections.ConfigDict, dict]:
  """(config, EMA params) of a trained stage: what sampling and later stages load.

  Reads <workdir>/<stage>/export, written by training at every checkpoint and at the end.
  """
  directory = export_dir(workdir, stage)
  if not (directory / export.PARAMS_FILE).exists():
    raise FileNotFoundError(
        f'{directory} holds no export: train stage {stage!r} first '
        f'(python train.py --config ... --workdir {workdir} --stage {stage}).')
  config, exported_stage, params = export.load_export(directory)
  if exported_stage != stage:
    raise ValueError(f'{directory} holds stage {exported_stage!r}, not {stage!r}.')
  return config, params
