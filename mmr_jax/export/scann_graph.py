"""The serving model: raw query strings -> top-K product ids and scores, query tower and ScaNN in one graph.

  serving_default(queries [B] string) -> {"ids" string [B, K], "scores" float32 [B, K], "indices" int64 [B, K]}

`saved_model_cli show --dir OUT/serving --all`, trimmed:

  signature_def['serving_default']:
    The given SavedModel SignatureDef contains the following input(s):
      inputs['queries'] tensor_info:
          dtype: DT_STRING
          shape: (-1)
          name: serving_default_queries:0
    The given SavedModel SignatureDef contains the following output(s):
      outputs['ids'] tensor_info:
          dtype: DT_STRING
          shape: (-1, 100)
          name: StatefulPartitionedCall:0
      outputs['indices'] tensor_info:
          dtype: DT_INT64
          shape: (-1, 100)
          name: StatefulPartitionedCall:1
      outputs['scores'] tensor_info:
          dtype: DT_FLOAT
          shape: (-1, 100)
          name: StatefulPartitionedCall:2
    Method name is: tensorflow/serving/predict

The searcher is ScaNN's TF op, rebuilt from the files of the exported `ScannIndex` (OUT/embeddings/index)
and searched with the parameters `ScannIndex.search` uses, so serving returns the Python index's top-K.
Outputs are best first; ties in score rank the lower product index first (as `ScannIndex.search`); with
fewer than K products the tail is padded with id "", index -1, score -inf. An empty or whitespace-only
query embeds to the zero vector, so every product scores 0 and ties go to the lowest product indexes.
"""

from __future__ import annotations

import io
import uuid
from typing import Sequence

from etils import epath
import numpy as np
from scann.scann_ops.py import scann_ops
import tensorflow as tf

from mmr_jax.evals import index as index_lib


_SCANN_ASSETS = (  # ScannState's tensors, in tensors_to_scann's order, and the file ScannIndex.save writes
    ("scann_config", "scann_config.pb"), ("serialized_partitioner", "serialized_partitioner.pb"),
    ("datapoint_to_token", "datapoint_to_token.npy"), ("ah_codebook", "ah_codebook.pb"),
    ("hashed_dataset", "hashed_dataset.npy"), ("int8_dataset", "int8_dataset.npy"),
    ("int8_multipliers", "int8_multipliers.npy"), ("dp_norms", "dp_norms.npy"), ("dataset", "dataset.npy"))
_SCANN_DTYPES = {"datapoint_to_token": np.int32, "hashed_dataset": np.uint8, "int8_dataset": np.int8,
                 "int8_multipliers": np.float32, "dp_norms": np.float32, "dataset": np.float32}


def scann_tensors(index_dir: str) -> list:
  """Returns the 9 tensors `scann_ops.ScannState` holds, read from a `ScannIndex.save` directory.

  The TF searcher is rebuilt from the very files the Python index uses, so both search the same
  partitions and codebooks (a second build could train different k-means centres). Assets the index
  does not use are scalars, as `scann_to_tensors` gives them.
  """
  out = []
  for name, fname in _SCANN_ASSETS:
    path = epath.Path(index_dir) / fname
    if fname.endswith(".pb"):
      if path.exists():
        out.append(np.array([path.read_bytes()], dtype=object))
      elif name == "scann_config":
        raise FileNotFoundError(f"{path} not found: {index_dir} is not a ScannIndex.save directory")
      else:
        out.append(np.array(b"", dtype=object))
    elif path.exists():
      out.append(np.load(io.BytesIO(path.read_bytes()), allow_pickle=False))
    else:
      out.append(np.zeros((), _SCANN_DTYPES[name]))
  return out


def _sort_by_score_then_index(idx, scores):
  """Returns (idx, scores) [B, K] sorted per row by descending score, then ascending index.

  One sort: the float32 score maps to an int32 of the same order (flip the magnitude bits of negatives;
  -0.0 counts as 0.0, a tie as in numpy's sort), complemented for descending order, and is packed above
  the (non-negative, < 2**32) index.
  """
  bits = tf.bitcast(tf.where(scores == 0.0, 0.0, scores), tf.int32)
  ordered = tf.bitwise.bitwise_xor(bits, tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 31), 0x7FFFFFFF))
  key = tf.cast(tf.bitwise.invert(ordered), tf.int64) * (1 << 32) + tf.maximum(idx, 0)
  order = tf.argsort(key, axis=1)
  return tf.gather(idx, order, batch_dims=1), tf.gather(scores, order, batch_dims=1)


def make_serving(query_tower, index_dir: str, ids: Sequence[str], k: int):
  """Returns a tf.Module: query strings -> top-k (ids, scores, indices), query tower + ScaNN in one graph.

  The graph is kept to the few ops a request needs (tokeniser, one XLA cluster, ScaNN, a handful of
  small ops): at batch 1 on CPU, TF's per-op scheduling and thread handoffs cost about as much as the
  work itself.
  """
  py_index = index_lib.ScannIndex.load(index_dir)
  params = py_index.params
  if params.get("soar_lambda") is not None:
    raise ValueError(f"{index_dir} was built with SOAR (soar_lambda={params['soar_lambda']}), which ScaNN's "
                     "TF ops cannot serve; rebuild the index without soar_lambda")
  n = py_index.size
  if len(ids) != n:
    raise ValueError(f"{len(ids)} product ids but the index at {index_dir} holds {n} products")
  # The same (k, pre-reorder, leaves) ScannIndex.search passes, so serving returns its top-k.
  k, k_eff, pre, leaves = py_index._search_args(k, None, None)  # pylint: disable=protected-access
  pad = k - k_eff
  # The searcher is a resource shared by name within a process: a per-export name keeps two exported
  # models (or a model and its re-export) loaded side by side apart.
  shared_name = f"mmr-scann-{uuid.uuid4().hex}"
  tensors = scann_tensors(index_dir)
  # Tensors of at most 1 KiB (the config, and the scalars that stand for assets the index does not use)
  # enter the graph as constants, so the serving function captures only the searcher's data variables:
  # each captured variable adds to the cost of every call from Python. ScannState still holds all nine
  # (scann_ops.searcher_from_module works on it).
  nbytes = lambda t: sum(map(len, t.reshape(-1))) if t.dtype == object else t.nbytes  # pylint: disable=unnecessary-lambda-assignment
  small = {name: t for (name, _), t in zip(_SCANN_ASSETS, tensors) if nbytes(t) <= 1024}

  class Serving(tf.Module):
    """Query strings -> top-k products: the query tower, then ScaNN's TF searcher."""

    def __init__(self):
      super().__init__(name="serving")
      self.query_tower = query_tower
      self.scann = scann_ops.ScannState(tensors)
      # One extra "" entry: index n stands for "no product" (padding) in a single gather.
      self.product_ids = tf.Variable(np.asarray(list(ids) + [""], dtype=object), dtype=tf.string,
                                     trainable=False)
      self.k = k

    def _search(self, emb):
      handle = scann_ops.tensors_to_scann(
          *(tf.constant(small[name]) if name in small else getattr(self.scann, name) for name in (
              "dataset", "scann_config", "serialized_partitioner", "datapoint_to_token", "ah_codebook",
              "hashed_dataset", "int8_dataset", "int8_multipliers", "dp_norms")), shared_name=shared_name)
      # The batched-parallel search, as ScannIndex.search runs it; unlike the sequential op it also takes
      # an empty batch (giving [0, 0]). Its rows are [b, m]: m is the most neighbours any row found, less
      # than k_eff when the searched leaves hold fewer points, and shorter rows are filled with index 0 and
      # a NaN score. Both kinds of unfilled slot become padding (-1, -inf), as in ScannIndex.search.
      idx, scores = scann_ops.scann_search_batched(handle, emb, k_eff, pre, leaves, True)
      missing = [[0, 0], [0, k_eff - tf.shape(idx)[1]]]
      idx = tf.pad(tf.cast(idx, tf.int64), missing, constant_values=-1)
      scores = tf.pad(scores, missing, constant_values=np.nan)
      pad = (idx < 0) | tf.math.is_nan(scores)
      idx = tf.where(pad, tf.constant(-1, tf.int64), idx)
      scores = tf.where(pad, -np.inf, scores)
      # ScaNN returns rows by descending score; as in ScannIndex._finish, only a batch with a tie (or
      # anything out of order) is re-sorted to put the lower index first.
      tied = tf.reduce_any(scores[:, 1:] >= scores[:, :-1])
      return tf.cond(tied, lambda: _sort_by_score_then_index(idx, scores), lambda: (idx, scores))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="queries")], autograph=False)
    def serve(self, queries):
      idx, scores = self._search(self.query_tower.embed(queries))
      if pad:  # fewer products than k: known when exporting
        b = tf.shape(idx)[0]
        idx = tf.concat([idx, tf.fill([b, pad], tf.constant(-1, tf.int64))], axis=1)
        scores = tf.concat([scores, tf.fill([b, pad], tf.constant(-np.inf, tf.float32))], axis=1)
      out = {"ids": tf.gather(self.product_ids, tf.where(idx >= 0, idx, n)), "scores": scores, "indices": idx}
      for t in out.values():
        t.set_shape([None, k])  # static only: no EnsureShape op per request
      return out

  return Serving()
