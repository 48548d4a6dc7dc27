"""JAX -> TF: a model method as a TF function of its parameters, by jax2tf's native serialisation.

jax2tf lowers the method to StableHLO inside one `XlaCallModule` op, for every platform in `--platforms`
(default cpu and cuda; the graph runs on whichever the server has), with the batch dimension
polymorphic. The towers' SavedModels therefore run the model XLA compiled, not a re-implementation in
TF ops, and give JAX's embeddings to float rounding.

The parameters are `tf.Variable`s on the exported `tf.Module` (in `variables/`, not constants in the
graph): the leaves the tower computes with, in `m.params`, a dict of variables. Each leaf over
PACK_MAX_BYTES (the matrices) is a variable of its own and the small ones (biases, norms) are
concatenated into one flat variable per dtype, because every variable a call reads costs CPU latency
while slicing a packed matrix costs a copy per call. The JSON `m.param_layout` names them, and
`unflatten_params(m.params, m.param_layout.numpy())` returns {"query_tower/...": array}.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Sequence

import jax
from jax.experimental import jax2tf
from jax.experimental import multihost_utils
import numpy as np
import tensorflow as tf

DEFAULT_PLATFORMS = ("cpu", "cuda")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def host_params(params):
  """Returns the parameter tree as numpy arrays on this host (whole arrays, however they are sharded).

  Gathering a sharded parameter across processes is a collective: every process must call this.
  """
  def to_host(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(to_host, params)


def check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
  """Returns `platforms` lower-cased without blanks; ValueError unless each is a jax2tf platform."""
  platforms = tuple(p.strip().lower() for p in platforms if p.strip())
  bad = [p for p in platforms if p not in PLATFORMS]
  if bad or not platforms:
    raise ValueError(f"platforms {bad or platforms} not supported; choose from {PLATFORMS}")
  return platforms


# Leaves up to this size are packed into one flat variable per dtype; larger ones get their own variable.
# Each variable a call reads is a compiled read with a fixed cost on CPU, so many small leaves add up,
# while a slice of a packed variable that feeds a matmul is a copy XLA makes on every call: at 64 KiB
# the copy costs about as much as a read, so only leaves up to that size are packed.
PACK_MAX_BYTES = 64 * 1024


@dataclasses.dataclass
class Converted:
  """A model method as a TF function of its parameters: `fn(variables, *inputs) -> emb`."""
  fn: Any
  variables: dict  # {key: tf.Variable}: "packed_<dtype>" (small leaves, concatenated) or "leaf_<i>" (one leaf)
  layout: list  # [{"name", "dtype", "shape", "variable"[, "offset" into a packed variable]}] per used leaf
  jax_fn: Any  # the JAX function jax2tf converted: jax_fn({key: array}, *inputs) -> emb


def convert_method(model, params, method: str, examples: Sequence[np.ndarray], poly: Sequence[str],
                   platforms: Sequence[str]) -> Converted:
  """Returns `model.<method>(*inputs)["emb"]` converted by jax2tf, batch-polymorphic per `poly`.

  The parameters stay tf.Variables (in `variables/`, not constants in the graph), but only the leaves
  the method computes with: leaves of at most PACK_MAX_BYTES concatenated into one flat variable per
  dtype, larger ones a variable each (`layout` maps them back to names; `unflatten_params` does it).
  Leaves the method does not compute with are closed over, which flax's parameter lookup needs and XLA
  drops as unused.
  """
  host = host_params(params)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(host)

  def apply(p, *inputs):
    return model.apply({"params": p}, *inputs, train=False, method=method)["emb"]

  closed = jax.make_jaxpr(apply)(host, *examples)
  invars = closed.jaxpr.invars[:len(leaves)]
  read = {id(v) for e in closed.jaxpr.eqns for v in e.invars} | {id(v) for v in closed.jaxpr.outvars}
  layout, slots, offsets, arrays = [], [], {}, {}
  for (path, x), v in zip(leaves, invars):
    if id(v) not in read:
      slots.append(x)
      continue
    dt = np.dtype(x.dtype).name
    entry = {"name": "/".join(str(getattr(k, "key", k)) for k in path), "dtype": dt, "shape": list(x.shape)}
    if x.nbytes > PACK_MAX_BYTES:
      entry["variable"] = f"leaf_{len(layout):04d}"
      arrays[entry["variable"]] = [np.asarray(x)]
    else:
      entry["variable"] = f"packed_{dt}"
      entry["offset"] = offsets.get(dt, 0)
      offsets[dt] = entry["offset"] + x.size
      arrays.setdefault(entry["variable"], []).append(np.ravel(x))
    layout.append(entry)
    slots.append(entry)

  def fn(variables, *inputs):
    flat = [_layout_leaf(variables, e) if isinstance(e, dict) else e for e in slots]
    return apply(jax.tree_util.tree_unflatten(treedef, flat), *inputs)

  tf_fn = jax2tf.convert(fn, polymorphic_shapes=[None, *poly], with_gradient=False,
                         native_serialization_platforms=tuple(platforms))
  variables = {key: tf.Variable(a[0] if key.startswith("leaf_") else np.concatenate(a), trainable=False,
                                name=key) for key, a in arrays.items()}
  return Converted(tf_fn, variables, layout, fn)


def _layout_leaf(variables: Mapping[str, Any], e: Mapping[str, Any]):
  """Returns the leaf `e` (a layout entry) from `variables` (arrays or tf.Variables, by key)."""
  # A layout without "variable" keys (an export that packed every leaf) names its variables by dtype.
  v = variables[e.get("variable", e["dtype"])]
  if "offset" in e:
    v = v[e["offset"]:e["offset"] + math.prod(e["shape"])]
  return v.reshape(e["shape"])


def unflatten_params(variables: Mapping[str, Any], layout_json) -> dict[str, np.ndarray]:
  """Returns {"path/of/leaf": array} from an exported tower's `params` and `param_layout`.

  For a loaded SavedModel m: `unflatten_params(m.params, m.param_layout.numpy())`.
  """
  layout = json.loads(layout_json.decode() if isinstance(layout_json, bytes) else layout_json)
  arrays = {key: np.asarray(v) for key, v in variables.items()}
  return {e["name"]: _layout_leaf(arrays, e) for e in layout}
