"""Mesh construction and the mapping from logical parameter axes to mesh axes.

`config.mesh` names the mesh axis sizes (`data`, `fsdp`, `tensor`; -1 on one axis fills the
remaining devices). On several TPU slices (multi-slice, devices with distinct `slice_index`),
`config.mesh` is the mesh inside one slice (ICI) and `config.dcn_mesh` the sizes of the same axes
across slices (DCN; default data=-1: data parallel across slices): each mesh axis is the product of
both, built by `mesh_utils.create_hybrid_device_mesh`.
Parameters carry logical axis names (`vosr_jax.models.layers`);
`config.sharding_rules` maps each name to a mesh axis (or None), e.g. ('embed', 'fsdp') shards the
model width over the FSDP axis, so one config line moves a model from data parallelism to FSDP.
A dimension that the mapped mesh axes do not divide stays replicated (tiny test models).
The batch axis is sharded over ('data', 'fsdp') together; inside a step wrapped by `with_mesh`,
`constrain_batch` keeps activations batch-sharded (the networks call it at a few places).
"""
import functools
import math

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config, num_devices, key="config.mesh"):
  """Resolves the axis sizes of `config.mesh` (one -1 fills) for `num_devices` devices.

  Returns:
    A tuple of sizes in `MESH_AXES` order.
  Raises:
    ValueError: naming `key` (the config field) when the sizes do not match the device count.
  """
  sizes = [int(mesh_config[name]) for name in MESH_AXES]
  fill = [i for i, s in enumerate(sizes) if s == -1]
  if len(fill) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"{key}={dict(mesh_config)}: sizes must be positive, with at most one "
                     "-1 (fill the remaining devices)")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"{key}={dict(mesh_config)}: the fixed axes ({known} devices) do not "
                       f"divide the {num_devices} available devices; change {key}")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"{key}={dict(mesh_config)} needs {math.prod(sizes)} devices but "
                     f"{num_devices} are available; change {key} (e.g. data=-1)")
  return tuple(sizes)


def num_slices(devices):
  """The number of TPU slices `devices` span (distinct `slice_index`; 1 for other devices)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(mesh_config, devices=None, dcn_config=None):
  """A `Mesh` with axes ('data', 'fsdp', 'tensor') over `devices` (default: all devices).

  On devices of one slice the mesh is `mesh_config` over them. On several slices `mesh_config`
  is the mesh inside each slice and `dcn_config` (`config.dcn_mesh`; None: data parallel across
  slices) the mesh across slices, combined by `mesh_utils.create_hybrid_device_mesh`.
  """
  devices = jax.devices() if devices is None else devices
  slices = num_slices(devices)
  if slices == 1:
    shape = mesh_shape(mesh_config, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
  if dcn_config is None:
    dcn_config = {"data": -1, "fsdp": 1, "tensor": 1}
  dcn = mesh_shape(dcn_config, slices, key="config.dcn_mesh")
  ici = mesh_shape(mesh_config, len(devices) // slices)
  return Mesh(mesh_utils.create_hybrid_device_mesh(ici, dcn, devices), MESH_AXES)


def batch_size_per_step(mesh):
  """The number of ways the batch axis is split (data x fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_size(global_batch, mesh, key="config.batch_size"):
  """Raises a ValueError naming `key` unless the batch divides over the mesh and the processes."""
  ways = batch_size_per_step(mesh)
  if global_batch % ways or global_batch % jax.process_count():
    raise ValueError(f"{key}={global_batch} must be divisible by the data-parallel size "
                     f"data*fsdp={ways} and by the process count {jax.process_count()}")


def logical_to_spec(logical_axes, shape, mesh, rules):
  """PartitionSpec for one array from its logical axis names.

  Args:
    logical_axes: tuple of logical names (or None) per dimension, or None (replicated).
    shape: the array shape.
    mesh: the Mesh.
    rules: sequence of (logical name, mesh axis name or None).
  Returns:
    A PartitionSpec; a dimension stays unsharded when its mesh axis has size 1, is already used by
    another dimension, or does not divide it.
  """
  if logical_axes is None:
    return P()
  table = dict(rules)
  used, spec = set(), []
  for name, dim in zip(logical_axes, shape):
    axis = table.get(name) if name is not None else None
    if axis is None or axis in used or mesh.shape[axis] == 1 or dim % mesh.shape[axis]:
      spec.append(None)
    else:
      used.add(axis)
      spec.append(axis)
  return P(*spec)


def param_shardings(abstract_state, mesh, rules):
  """NamedShardings (as a pure dict) for an `nnx.State` of parameters with logical-axis metadata."""
  specs = nnx.get_partition_spec(abstract_state).to_pure_dict()
  shapes = abstract_state.to_pure_dict()
  return jax.tree.map(
      lambda spec, s: NamedSharding(mesh, logical_to_spec(tuple(spec), s.shape, mesh, rules)),
      specs, shapes, is_leaf=lambda x: isinstance(x, P))


def replicated(mesh):
  """A fully replicated NamedSharding."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh):
  """The sharding of batched data: leading axis over ('data', 'fsdp')."""
  return NamedSharding(mesh, P(BATCH_AXES))


def with_mesh(fn, mesh):
  """`fn` traced with `mesh` as the abstract mesh, which turns on `constrain_batch` inside it."""
  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return wrapped


def constrain_batch(x):
  """Constrains `x`'s leading (batch) axis to be sharded over `BATCH_AXES`.

  Without it, FSDP lets XLA shard activations like the weights ('embed' over 'fsdp') or
  replicate them, instead of all-gathering the weights. A no-op outside `with_mesh` (sampling,
  tests, one device) and when the batch does not divide over the batch axes.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  ways = math.prod(mesh.shape[name] for name in BATCH_AXES)
  if ways == 1 or x.shape[0] % ways:
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def shard_batch(local_batch, mesh):
  """Builds global arrays from this process's slice of the batch.

  Args:
    local_batch: pytree of numpy arrays with a leading per-process batch axis.
    mesh: the Mesh.
  Returns:
    The same pytree of global jax.Arrays sharded with `batch_sharding(mesh)`.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
