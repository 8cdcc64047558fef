"""The device mesh and the logical-axis -> mesh-axis mapping.

Params and activations are annotated with logical axis names ('batch', 'embed', 'mlp',
'heads', 'kv', 'vocab', 'length', 'conv_in', 'conv_out'); `config.axis_rules` maps them to
the mesh axes ('data', 'fsdp'). Data parallel is `mesh.fsdp=1`; FSDP is `mesh.fsdp>1` with
a rule such as ('embed', 'fsdp'): a config change, not a code change.

  mesh = make_mesh(config)                          # from config.mesh
  with use_mesh(mesh, config.axis_rules):           # activations' logical constraints
    shardings = logical_shardings(abstract_params, mesh, config.axis_rules)
  batch_sharding(mesh)                              # dim 0 over ('data', 'fsdp')
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec
import numpy as np

MESH_AXES = ('data', 'fsdp')
BATCH_AXES = ('data', 'fsdp')   # the batch dimension is sharded over both mesh axes


def mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Resolves `config.mesh` (sizes, at most one -1 = "the rest") against a device count.

  Raises ValueError naming the field when the sizes cannot tile `num_devices`.
  """
  sizes = dict(mesh_config)
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f'config.mesh has unknown axes {unknown}; the mesh axes are '
                     f'{MESH_AXES}.')
  sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
  free = [a for a, s in sizes.items() if s == -1]
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ValueError(f'config.mesh.{a}={s}: a mesh size is a positive integer or -1 '
                       f'(the rest of the devices).')
  if len(free) > 1:
    raise ValueError(f'config.mesh: only one axis may be -1, got {free} both -1.')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(
          f'config.mesh: {", ".join(f"{a}={s}" for a, s in sizes.items() if s != -1)} '
          f'does not divide the {num_devices} devices; choose config.mesh sizes whose '
          f'product divides the device count.')
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f'config.mesh: data={sizes["data"]} x fsdp={sizes["fsdp"]} = {fixed} devices, but '
        f'{num_devices} are available; set one of config.mesh.data / config.mesh.fsdp to -1 '
        f'or make their product {num_devices}.')
  return sizes


def make_mesh(config, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The ('data', 'fsdp') mesh of `config.mesh` over `devices` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(config.mesh, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:   # topology-aware order on TPU/GPU
    from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
    device_array = mesh_utils.create_device_mesh(shape, devices)
  except Exception:  # pylint: disable=broad-except
    device_array = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def axis_rules(config) -> tuple[tuple[str, Any], ...]:
  """`config.axis_rules` as the tuple-of-pairs flax expects (JSON round-trips give lists)."""
  rules = []
  for rule in config.axis_rules:
    name, target = rule
    if isinstance(target, list):
      target = tuple(target)
    if target is not None:
      for t in (target if isinstance(target, tuple) else (target,)):
        if t not in MESH_AXES:
          raise ValueError(f'config.axis_rules: {name!r} -> {t!r} is not a mesh axis; '
                           f'use one of {MESH_AXES} or None.')
    rules.append((name, target))
  return tuple(rules)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules):
  """Context (inside or outside jit) in which modules' `nn.with_logical_constraint` uses `mesh`."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


def batch_size_per_shard(mesh: Mesh) -> int:
  """How many ways the batch dimension is split."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Dim 0 over ('data', 'fsdp'), the rest replicated."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def logical_specs(boxed_tree: Any) -> Any:
  """Logical PartitionSpecs of a (possibly nn.Partitioned-boxed) tree; () where unboxed."""
  return nn.get_partition_spec(boxed_tree)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedShardings of a boxed (abstract) tree: its logical names mapped by `rules`.

  Leaves without logical names are replicated. The result has the structure of
  `nn.unbox(boxed_tree)`. A dimension is only sharded when the mesh axes divide it;
  otherwise it stays replicated (small or odd-sized params).
  """
  specs = logical_specs(boxed_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  values = nn.unbox(boxed_tree)
  return jax.tree.map(lambda s, v: _divisible_or_replicated(s, v.shape, mesh),
                      shardings, values)


def _divisible_or_replicated(sharding: NamedSharding, shape, mesh: Mesh) -> NamedSharding:
  spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
  fixed = []
  for dim, axes in zip(shape, spec):
    if axes is None:
      fixed.append(None)
      continue
    size = math.prod(mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
    fixed.append(axes if dim % size == 0 else None)
  return NamedSharding(mesh, PartitionSpec(*fixed))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
  """Host numpy batch (the global batch, identical on every process) -> global jax.Arrays.

  For tests and single-process tools; the input pipeline builds global arrays from each
  process's own shard with `jax.make_array_from_process_local_data`.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda i: x[i]), batch)


def check_batch_size(stage: str, batch_size: int, grad_accum: int, mesh: Mesh):
  """Raises ValueError naming the field unless the batch splits evenly over the mesh."""
  shards = batch_size_per_shard(mesh)
  if grad_accum < 1:
    raise ValueError(f'config.{stage}.optim.grad_accum={grad_accum} must be >= 1.')
  if batch_size % (shards * grad_accum):
    raise ValueError(
        f'config.{stage}.batch_size={batch_size} must be divisible by the batch shards '
        f'(mesh data x fsdp = {shards}) times config.{stage}.optim.grad_accum={grad_accum}, '
        f'i.e. by {shards * grad_accum}.')
