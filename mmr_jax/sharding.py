"""Device mesh, logical-axis rules and the one place where host batches become global arrays.

Everything runs through a `jax.sharding.Mesh`, also on one CPU device, so the code that trains on
a laptop is the code that trains on a pod: only the mesh shape in the config changes.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils

MESH_AXES = ("dcn", "data", "fsdp", "tensor")
# The batch dimension is split over every axis that carries data parallelism.
BATCH_AXES = ("dcn", "data", "fsdp")


def mesh_shape(shape_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Returns {axis: size} with one -1 entry filled so the product equals `num_devices`."""
  shape = {a: int(shape_cfg.get(a, 1)) for a in MESH_AXES}
  unknown = set(shape_cfg) - set(MESH_AXES)
  if unknown:
    raise KeyError(f"unknown mesh axes {sorted(unknown)}; known: {MESH_AXES}")
  fill = [a for a, s in shape.items() if s == -1]
  if len(fill) > 1:
    raise ValueError(f"only one mesh axis may be -1, got {fill}")
  known = math.prod(s for s in shape.values() if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"{num_devices} devices do not divide by the fixed mesh axes {shape}")
    shape[fill[0]] = num_devices // known
  if math.prod(shape.values()) != num_devices:
    raise ValueError(f"mesh {shape} needs {math.prod(shape.values())} devices, have {num_devices}")
  return shape


def make_mesh(shape_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Returns a Mesh with axes MESH_AXES; `dcn` is the outer (slice / host-group) axis."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(shape_cfg, len(devices))
  sizes = tuple(shape[a] for a in MESH_AXES)
  if shape["dcn"] > 1 and hasattr(devices[0], "slice_index"):
    ici = (1,) + sizes[1:]
    dcn = (shape["dcn"], 1, 1, 1)
    arr = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    try:
      arr = mesh_utils.create_device_mesh(sizes, devices)
    except (ValueError, NotImplementedError, AssertionError):
      arr = np.asarray(devices).reshape(sizes)
  return Mesh(arr, MESH_AXES)


def logical_rules(config_rules) -> tuple[tuple[str, Any], ...]:
  """Returns the rules as the tuple of pairs flax expects (tuples, not lists, for hashing)."""
  out = []
  for name, axes in config_rules:
    out.append((name, tuple(axes) if isinstance(axes, list) else axes))
  return tuple(out)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Returns `spec` without the mesh axes of any dimension they do not divide (that dim is replicated).

  Real tokenizers have vocabularies like 731 or 32_001 rows: rather than refuse tensor parallelism
  (or pad the model), such a dimension stays whole on every device and the others stay sharded.
  """
  if not shape:  # scalars carry no split
    return P()
  out = []
  for i, dim in enumerate(shape):
    axes = spec[i] if i < len(spec) else None
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    out.append(axes if dim % math.prod(mesh.shape[a] for a in names) == 0 else None)
  while out and out[-1] is None:
    out.pop()
  return P(*out)


def logical_to_shardings(tree, mesh: Mesh, rules):
  """Returns NamedShardings for a tree of `nn.Partitioned` / logical PartitionSpecs (eval_shape output).

  Mesh axes that do not divide a dimension are dropped from it (see `fit_spec`).
  """
  specs = nn.get_partition_spec(tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  shapes = jax.tree.map(lambda x: tuple(np.shape(x)), nn.meta.unbox(tree))
  is_spec = lambda x: isinstance(x, P)  # pylint: disable=unnecessary-lambda-assignment
  return jax.tree.map(lambda s, shape: NamedSharding(mesh, fit_spec(s, shape, mesh)), mesh_specs, shapes,
                      is_leaf=is_spec)


def _dict_keys(path) -> tuple:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def param_like_shardings(tree, params, param_shardings, default):
  """Returns shardings for `tree` (e.g. an optimizer state): a param's sharding where a leaf is one.

  A leaf "is" a parameter when the dict keys of its path end with that parameter's path and the
  shapes agree (Adam's mu/nu, masked per-tower states of multi_transform alike); every other leaf
  (step counts, scalars) gets `default`. Matching by path keeps FSDP's sharding of the optimizer
  state explicit instead of leaving it to XLA, which replicates the zeros that `tx.init` creates.
  """
  by_path = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(
      param_shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))):
    by_path[_dict_keys(path)] = (tuple(np.shape(leaf)), sharding)
  longest = max((len(k) for k in by_path), default=0)

  def pick(path, leaf):
    keys = _dict_keys(path)
    for n in range(min(longest, len(keys)), 0, -1):
      hit = by_path.get(keys[-n:])
      if hit is not None and hit[0] == tuple(np.shape(leaf)):
        return hit[1]
    return default

  return jax.tree_util.tree_map_with_path(pick, tree)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch array: leading dim over the data axes, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """Returns the mesh's data-parallel axes (those of BATCH_AXES it has), outer first."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def data_parallel_size(mesh: Mesh | None) -> int:
  """Returns the number of data-parallel shards of a batch on `mesh` (1 without a mesh)."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh)) if mesh is not None else 1


def data_parallel_batch(batch_size: int, mesh: Mesh | None) -> int:
  """Returns `batch_size` rounded down to a multiple of the data-parallel size (at least one row per shard),
  so a global batch splits evenly over the data axes."""
  dp = data_parallel_size(mesh)
  return max(dp, batch_size // dp * dp)


def host_batch_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Returns global jax.Arrays from this host's slice of the global batch.

  Every host passes its own rows (per-host batch = global batch / process count); the global array's
  leading dim is the concatenation over hosts in process order. This is the only function that turns
  host data into device arrays, so multi-host input handling lives in one place.
  """
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_process_local_data(batch_sharding(mesh, v.ndim), v)
  return out


def global_to_host(x: jax.Array) -> np.ndarray:
  """Returns the full value of a (possibly multi-host sharded) array on every host."""
  if jax.process_count() == 1 or x.is_fully_replicated:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
