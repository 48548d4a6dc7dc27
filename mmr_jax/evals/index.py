"""Nearest-neighbour search over product embeddings: exact (JAX) and ScaNN.

Scores are dot products (embeddings are L2-normalised, so this is cosine similarity);
larger is better. Both searches return `(indices [Q, k] int64, scores [Q, k] float32)`,
best first, padded with (-1, -inf) when the database holds fewer than k products.

Tie-break: among equal scores the lower product index ranks first. `exact_search`
guarantees it for ties in the computed float32 scores (XLA's top_k is stable and chunks
are merged in index order). `ScannIndex.search` re-sorts what ScaNN returns by
(-score, index), so the order within its top k is deterministic; which of several tied
products at the k-th place ScaNN returns is ScaNN's choice.

Every approximate result should be reported with `recall_vs_exact` so the approximation
loss is never hidden.
"""

from __future__ import annotations

import json
import math
from importlib import metadata
import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from mmr_jax import fileio
from mmr_jax import runtime

SCANN_CONFIG_FILE = "mmr_index_config.json"


def _as_matrix(x, name: str, dim: int | None = None) -> np.ndarray:
  """Returns x as a C-contiguous float32 [N, D] array after shape/finiteness checks."""
  x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
  if x.ndim != 2:
    raise ValueError(f"{name} must be 2-D [num, dim], got shape {x.shape}")
  if dim is not None and x.shape[1] != dim:
    raise ValueError(f"{name} has dimension {x.shape[1]} but the database has {dim}")
  if not np.isfinite(x).all():
    row = int(np.nonzero(~np.isfinite(x).all(axis=1))[0][0])
    raise ValueError(f"{name}[{row}] contains NaN or inf")
  return x


def _check_k(k) -> int:
  if int(k) != k or int(k) < 1:
    raise ValueError(f"k must be a positive integer, got {k!r}")
  return int(k)


def _pad_results(idx: np.ndarray, scores: np.ndarray, k: int):
  """Returns (idx, scores) widened to k columns with (-1, -inf)."""
  q, have = idx.shape
  if have >= k:
    return idx, scores
  pad_i = np.full((q, k - have), -1, np.int64)
  pad_s = np.full((q, k - have), -np.inf, np.float32)
  return np.concatenate([idx, pad_i], 1), np.concatenate([scores, pad_s], 1)


def _sort_by_score_then_index(idx: np.ndarray, scores: np.ndarray):
  """Returns (idx, scores) sorted per row by descending score, then ascending index."""
  # Padding (-1) has score -inf so it sorts last regardless of its index.
  order = np.lexsort((idx, -scores), axis=-1)
  return np.take_along_axis(idx, order, 1), np.take_along_axis(scores, order, 1)


# ----------------------------------------------------------------------------- exact


_EXACT_STEP_CACHE: dict[tuple[int, int], Any] = {}


def _exact_step(k_chunk: int, k_out: int):
  """Returns a jitted (q, chunk, offset, n_valid, run_s, run_i) -> (run_s, run_i) merge."""
  key = (k_chunk, k_out)
  if key not in _EXACT_STEP_CACHE:
    @jax.jit
    def step(q, chunk, offset, n_valid, run_s, run_i):
      # HIGHEST: the reference must be exact on GPUs (TF32 by default) and TPUs (bf16 passes) too.
      s = jnp.matmul(q, chunk.T, precision=jax.lax.Precision.HIGHEST)  # [Qb, C]
      valid = jnp.arange(chunk.shape[0]) < n_valid
      s = jnp.where(valid[None, :], s, -jnp.inf)
      cs, ci = jax.lax.top_k(s, k_chunk)  # [Qb, kc]
      # Running results hold lower indexes than this chunk and come first, so the stable
      # top_k keeps "lower index first" among equal scores across chunks too.
      all_s = jnp.concatenate([run_s, cs], axis=1)
      all_i = jnp.concatenate([run_i, ci + offset], axis=1)
      top_s, pos = jax.lax.top_k(all_s, k_out)
      return top_s, jnp.take_along_axis(all_i, pos, axis=1)

    _EXACT_STEP_CACHE[key] = step
  return _EXACT_STEP_CACHE[key]


def exact_search(queries, db, k: int, *, query_batch: int = 256, db_chunk: int = 131072):
  """Returns (indices [Q, k] int64, scores [Q, k] float32): exact top-k by dot product.

  Brute force in JAX, batched over queries and chunked over the database so peak memory
  is about query_batch * db_chunk * 4 bytes of scores (128 MiB by default) on top of one
  device copy of `db`. Equal scores rank the lower product index first.
  """
  k = _check_k(k)
  db = _as_matrix(db, "db")
  queries = _as_matrix(queries, "queries", db.shape[1])
  if query_batch < 1 or db_chunk < 1:
    raise ValueError(f"query_batch and db_chunk must be >= 1, got {query_batch}, {db_chunk}")
  num_q, n = queries.shape[0], db.shape[0]
  if n == 0 or num_q == 0:
    return _pad_results(np.zeros((num_q, 0), np.int64), np.zeros((num_q, 0), np.float32), k)
  if n >= 2**31 - 1:
    raise ValueError(f"db has {n} rows; int32 indices on device limit it to < 2**31 - 1")

  k_out = min(k, n)
  chunk = min(max(db_chunk, k_out), n)
  chunks = []  # (device chunk [C, D], offset, n_valid); last one zero-padded to C rows
  for start in range(0, n, chunk):
    part = db[start:start + chunk]
    n_valid = part.shape[0]
    if n_valid < chunk:
      part = np.concatenate([part, np.zeros((chunk - n_valid, db.shape[1]), np.float32)])
    chunks.append((jax.device_put(part), np.int32(start), np.int32(n_valid)))

  qb = min(query_batch, num_q)
  step = _exact_step(min(k_out, chunk), k_out)
  out_i = np.empty((num_q, k_out), np.int64)
  out_s = np.empty((num_q, k_out), np.float32)
  for qs in range(0, num_q, qb):
    qpart = queries[qs:qs + qb]
    m = qpart.shape[0]
    if m < qb:
      qpart = np.concatenate([qpart, np.zeros((qb - m, qpart.shape[1]), np.float32)])
    qdev = jax.device_put(qpart)
    run_s = jnp.full((qb, k_out), -jnp.inf, jnp.float32)
    run_i = jnp.full((qb, k_out), -1, jnp.int32)
    for cdev, offset, n_valid in chunks:
      run_s, run_i = step(qdev, cdev, offset, n_valid, run_s, run_i)
    out_s[qs:qs + m] = np.asarray(run_s)[:m]
    out_i[qs:qs + m] = np.asarray(run_i)[:m]
  return _pad_results(out_i, out_s, k)


def recall_vs_exact(approx_idx, exact_idx, k: int | None = None) -> float:
  """Returns the fraction of the exact top-k found in the approximate top-k, pooled over all queries
  (found / wanted summed over queries; the mean over queries whenever every exact row is full).

  Padding (-1) in `exact_idx` is not counted, so a database smaller than k still scores 1.0
  when everything is found.
  """
  approx_idx = np.asarray(approx_idx)
  exact_idx = np.asarray(exact_idx)
  if approx_idx.ndim != 2 or exact_idx.ndim != 2 or approx_idx.shape[0] != exact_idx.shape[0]:
    raise ValueError(f"expected [Q, k] arrays with equal Q, got {approx_idx.shape} and {exact_idx.shape}")
  if k is None:
    k = exact_idx.shape[1]
  k = _check_k(k)
  if k > approx_idx.shape[1] or k > exact_idx.shape[1]:
    raise ValueError(f"k={k} exceeds the result width (approx {approx_idx.shape[1]}, "
                     f"exact {exact_idx.shape[1]})")
  a = approx_idx[:, :k].astype(np.int64)
  e = exact_idx[:, :k].astype(np.int64)
  # One key per (query, product) keeps memory O(Q k) (a [Q, k, k] comparison would not).
  width = int(max(a.max(initial=0), e.max(initial=0))) + 2
  rows = np.arange(a.shape[0], dtype=np.int64)[:, None] * width
  found = np.isin(rows + e, (rows + a)[a >= 0]) & (e >= 0)  # [Q, k]
  denom = (e >= 0).sum()
  return float(found.sum() / denom) if denom else 1.0


# ----------------------------------------------------------------------------- ScaNN


# ScaNN's recipe for dot-product search (Guo et al., 2020; ScaNN's algorithms.md): a
# spherical k-means tree with ~sqrt(N) leaves (ScaNN's rule of thumb), 4-bit anisotropic
# product quantisation (threshold 0.2 for normalised data), then exact float re-scoring.
# Choices measured with tools/bench_ann.py on clustered unit vectors (128-d, 200k and 1M):
# - spherical partitioning: recall@100 0.95 vs 0.88 for generic k-means at equal cost;
# - 1 dim per 4-bit block (not 2): ranks candidates well enough that ~150 re-scored reach
#   recall@100 0.96 at 1M, where 2 dims per block need ~300; re-scoring random rows is the
#   dominant cost (~150 ns per candidate on a 2-core VM);
# - defaults favour accuracy (evaluation uses them): 3% of the leaves (>= 10) and 200
#   re-scored gave recall@100 vs exact 0.96 at 200k and 0.99 at 1M; tools/bench_ann.py tunes
#   leaves_to_search / reorder per call for speed (~0.5% of leaves, 150 at 1M).
# - a small catalogue's few, small leaves hold too few candidates at 3%: the leaves searched
#   must hold at least min_candidates_per_k * search_k products on average. On the demo
#   (3,000 products, model embeddings with the lexical segment, 55 leaves), 10 leaves gave
#   recall@100 vs exact 0.93-0.97 and the floor's 19 leaves 0.97-0.99; at 200k and 1M the
#   3% rule already searches more than the floor asks.
SCANN_DEFAULTS: dict[str, Any] = {
    "num_leaves": None,  # None: round(leaves_per_sqrt_n * sqrt(N)), leaves >= min_partition_size
    "leaves_per_sqrt_n": 1.0,
    # None: max(ceil(leaves_search_fraction * leaves), min_leaves_to_search,
    #           ceil(min_candidates_per_k * search_k * leaves / N))
    "num_leaves_to_search": None,
    "leaves_search_fraction": 0.03,
    "min_leaves_to_search": 10,
    "min_candidates_per_k": 10,  # 0: no floor from the catalogue's size
    "search_k": 100,  # the k that floor is sized for (evaluation's)
    "training_sample_size": None,  # None: min(N, 250_000)
    "min_partition_size": 50,
    "training_iterations": 12,
    "spherical": True,  # partition on the unit sphere, the geometry of normalised embeddings
    "dims_per_block": 1,
    "anisotropic_quantization_threshold": 0.2,
    "hash_type": "lut16",
    "reorder": 200,  # candidates re-scored exactly (pre_reorder_num_neighbors)
    "brute_force_below": 2048,  # below this N a tree does not pay off: exact brute force in ScaNN
    "training_threads": 0,  # 0: all cores
    "search_threads": 0,  # 0: ScaNN's default (all cores) for batched search
    "soar_lambda": None,  # SOAR spilling (e.g. 1.5): better recall per leaf, ~2x build time
}


def derive_scann_params(n: int, d: int, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Returns the full ScaNN parameter dict for an [n, d] database, `overrides` applied last."""
  overrides = dict(overrides or {})
  unknown = set(overrides) - set(SCANN_DEFAULTS)
  if unknown:
    raise ValueError(f"unknown ScaNN parameter(s) {sorted(unknown)}; known: {sorted(SCANN_DEFAULTS)}")
  p = {**SCANN_DEFAULTS, **overrides}
  if n < 1 or d < 1:
    raise ValueError(f"database must be non-empty, got shape ({n}, {d})")
  p["brute_force"] = n < int(p["brute_force_below"])
  if p["num_leaves"] is None:
    max_leaves = max(2, n // max(1, int(p["min_partition_size"])))
    p["num_leaves"] = int(min(max(2, round(p["leaves_per_sqrt_n"] * math.sqrt(n))), max_leaves))
  if p["min_candidates_per_k"] < 0 or int(p["search_k"]) < 1:
    raise ValueError(f"min_candidates_per_k must be >= 0 and search_k >= 1, got {p['min_candidates_per_k']} "
                     f"and {p['search_k']}")
  if p["num_leaves_to_search"] is None:
    floor = math.ceil(float(p["min_candidates_per_k"]) * int(p["search_k"]) * p["num_leaves"] / n)
    p["num_leaves_to_search"] = max(int(math.ceil(p["leaves_search_fraction"] * p["num_leaves"])),
                                    int(p["min_leaves_to_search"]), floor, 1)
  p["num_leaves_to_search"] = int(min(p["num_leaves_to_search"], p["num_leaves"]))
  if p["training_sample_size"] is None:
    p["training_sample_size"] = int(min(n, 250_000))
  if p["dims_per_block"] < 1 or p["dims_per_block"] > d:
    raise ValueError(f"dims_per_block must be in [1, {d}], got {p['dims_per_block']}")
  if p["hash_type"] not in ("lut16", "lut256"):
    raise ValueError(f"hash_type must be 'lut16' or 'lut256', got {p['hash_type']!r}")
  p["n"], p["d"] = int(n), int(d)
  return p


def _scann_ops():
  # Imported lazily: `import scann` pulls in TensorFlow (seconds), which exact search and
  # metrics never need.
  from scann.scann_ops.py import scann_ops_pybind
  return scann_ops_pybind


class ScannIndex:
  """ScaNN searcher over a fixed [N, D] database (dot product), with its config kept beside it.

  `params` is the full dict from `derive_scann_params` (what `config` records); any key of
  `SCANN_DEFAULTS` can be overridden at build time.
  """

  def __init__(self, searcher, params: dict[str, Any], build_s: float | None = None):
    self.searcher = searcher
    self.params = params
    self.build_s = build_s
    if params.get("search_threads"):
      searcher.set_num_threads(int(params["search_threads"]))

  @classmethod
  def build(cls, db, params: Mapping[str, Any] | None = None) -> "ScannIndex":
    """Returns an index trained and built on `db [N, D]` (row i = product index i)."""
    db = _as_matrix(db, "db")
    p = derive_scann_params(db.shape[0], db.shape[1], params)
    ops = _scann_ops()
    t0 = time.perf_counter()
    # num_neighbors is only ScaNN's default; every search passes k explicitly.
    builder = ops.builder(db, min(100, db.shape[0]), "dot_product")
    if p["brute_force"]:
      builder = builder.score_brute_force()
    else:
      builder = builder.tree(
          num_leaves=p["num_leaves"],
          num_leaves_to_search=p["num_leaves_to_search"],
          training_sample_size=p["training_sample_size"],
          min_partition_size=p["min_partition_size"],
          training_iterations=p["training_iterations"],
          spherical=bool(p["spherical"]),
          soar_lambda=p["soar_lambda"],
      ).score_ah(
          p["dims_per_block"],
          anisotropic_quantization_threshold=p["anisotropic_quantization_threshold"],
          training_sample_size=p["training_sample_size"],
          hash_type=p["hash_type"],
      ).reorder(int(p["reorder"]))
    with runtime.native_logs():  # ScaNN's C++ builder logs partitioning details on stderr
      searcher = builder.set_n_training_threads(int(p["training_threads"])).build()
    return cls(searcher, p, build_s=time.perf_counter() - t0)

  @property
  def size(self) -> int:
    return int(self.params["n"])

  def _search_args(self, k, leaves_to_search, reorder):
    k = _check_k(k)
    k_eff = min(k, self.size)
    if self.params["brute_force"]:
      return k, k_eff, -1, -1
    leaves = int(leaves_to_search or self.params["num_leaves_to_search"])
    pre = max(int(reorder or self.params["reorder"]), k_eff)
    return k, k_eff, pre, min(leaves, self.params["num_leaves"])

  def _finish(self, idx, scores, k):
    idx = np.asarray(idx).astype(np.int64)
    scores = np.asarray(scores, np.float32)
    if idx.ndim == 1:
      idx, scores = idx[None], scores[None]
    # Slots the searched leaves could not fill: the sequential search marks them with index -1, the
    # batched one with index 0 and a NaN score. Both become padding (-1, -inf).
    pad = (idx < 0) | np.isnan(scores)
    idx = np.where(pad, -1, idx)
    scores = np.where(pad, -np.inf, scores).astype(np.float32)
    # ScaNN returns rows sorted by score; only rows with equal neighbours (or out of order,
    # to be safe) need the (score, index) re-sort, which keeps the batched path cheap.
    with np.errstate(invalid="ignore"):  # -inf - -inf between padding slots
      d = np.diff(scores, axis=1)
    fix = ((d >= 0) & np.isfinite(scores[:, 1:])).any(axis=1)
    if fix.any():
      idx[fix], scores[fix] = _sort_by_score_then_index(idx[fix], scores[fix])
    return _pad_results(idx, scores, k)

  def search(self, queries, k: int, *, leaves_to_search: int | None = None,
             reorder: int | None = None):
    """Returns (indices [Q, k] int64, scores [Q, k] float32), batched and multi-threaded.

    `leaves_to_search` / `reorder` override the built defaults for this call.
    """
    queries = _as_matrix(queries, "queries", self.params["d"])
    k, k_eff, pre, leaves = self._search_args(k, leaves_to_search, reorder)
    if queries.shape[0] == 0:
      return _pad_results(np.zeros((0, 0), np.int64), np.zeros((0, 0), np.float32), k)
    idx, scores = self.searcher.search_batched_parallel(
        queries, final_num_neighbors=k_eff, pre_reorder_num_neighbors=pre,
        leaves_to_search=leaves)
    return self._finish(idx, scores, k)

  def search_one(self, query, k: int, *, leaves_to_search: int | None = None,
                 reorder: int | None = None):
    """Returns (indices [k] int64, scores [k] float32) for one query [D] (latency path)."""
    query = _as_matrix(np.asarray(query)[None], "query", self.params["d"])[0]
    k, k_eff, pre, leaves = self._search_args(k, leaves_to_search, reorder)
    idx, scores = self.searcher.search(query, k_eff, pre, leaves)
    idx, scores = self._finish(idx, scores, k)
    return idx[0], scores[0]

  def config(self) -> dict[str, Any]:
    """Returns the JSON-serialisable record of how this index was built."""
    try:
      version = metadata.version("scann")
    except metadata.PackageNotFoundError:
      version = "unknown"
    return {"params": self.params, "build_s": self.build_s, "scann_version": version,
            "distance": "dot_product"}

  def save(self, directory: str) -> None:
    """Writes ScaNN's own serialized searcher plus `mmr_index_config.json` into `directory` (local or gs://)."""
    if fileio.is_remote(directory):  # ScaNN writes local files only: serialise here, then copy up
      with tempfile.TemporaryDirectory(prefix="mmr_index_") as tmp:
        self.save(tmp)
        fileio.upload_dir(tmp, directory)
      return
    os.makedirs(directory, exist_ok=True)
    # relative_path: the assets file then names siblings, so the folder can be moved or copied.
    self.searcher.serialize(directory, relative_path=True)
    with open(os.path.join(directory, SCANN_CONFIG_FILE), "w") as f:
      json.dump(self.config(), f, indent=2, sort_keys=True)

  @classmethod
  def load(cls, directory: str) -> "ScannIndex":
    """Returns the index saved by `save` in `directory` (local or gs://)."""
    cfg_path = epath.Path(directory) / SCANN_CONFIG_FILE
    if not cfg_path.is_file():
      raise FileNotFoundError(f"{cfg_path} not found: not a directory written by ScannIndex.save")
    cfg = json.loads(cfg_path.read_text())
    if "params" not in cfg:
      raise ValueError(f"{cfg_path} has no 'params' entry")
    with fileio.local_dir(directory) as local:  # ScaNN reads local files only
      searcher = _scann_ops().load_searcher(local, assets_backcompat_shim=False)
    if searcher.size() != cfg["params"]["n"]:
      raise ValueError(f"{directory}: searcher holds {searcher.size()} points but "
                       f"{SCANN_CONFIG_FILE} says {cfg['params']['n']}")
    return cls(searcher, cfg["params"], build_s=cfg.get("build_s"))
