"""Stages: one module per unCLIP stage, all implementing `base.Task`."""

import importlib

_TASKS = {
    'clip': 'dalle2_jax.tasks.clip:ClipTask',
    'prior': 'dalle2_jax.tasks.prior:PriorTask',
    'decoder': 'dalle2_jax.tasks.decoder:DecoderTask',
    'upsampler': 'dalle2_jax.tasks.upsampler:UpsamplerTask',
}
# The order in which a run trains and samples the tasks: each needs the ones before it.
TASK_ORDER = tuple(_TASKS)


def get_task(config, stage, workdir):
  """Builds the task of `config[stage].task` for stage section `stage`."""
  if stage not in config:
    raise ValueError(f'Stage {stage!r} has no section in the config; '
                     f'config.stages is {tuple(config.stages)}.')
  kind = config[stage].get('task', stage)
  if kind not in _TASKS:
    raise ValueError(f'config.{stage}.task={kind!r} is not a known task; '
                     f'choose one of {sorted(_TASKS)}.')
  module, cls = _TASKS[kind].split(':')
  return getattr(importlib.import_module(module), cls)(config, stage, workdir)
