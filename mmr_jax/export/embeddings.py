"""The catalogue embedded by the JAX model, resumably and on every host, and its ScaNN index (OUT/embeddings/).

  embeddings.npy   float32 [N, D], row i = product index i (the DATA_DIR products table's row order),
                   L2-normalised, computed by the JAX model as evaluation does
  ids.txt          N lines, UTF-8, line i = the product id of row i (ids never contain tab or newline;
                   split on "\n" only)
  index/           ScaNN searcher (`mmr_jax.evals.index.ScannIndex.save` format; `ScannIndex.load`), built with
                   the evaluation's parameters when WORKDIR/index/ exists (reused as is when its
                   embeddings are identical), else `index.SCANN_DEFAULTS`
  info.json        {"num_products", "dim", "dtype", "step", "workdir", "data_dir", "index": {...},
                   "fingerprint": export_fingerprint(...)}: a rerun into the same OUT keeps embeddings.npy and
                   index/ only when step, data_dir and the fingerprint of the weights and config all match

The catalogue is embedded by the JAX model rather than the SavedModel: it is the computation evaluation
measured, and it runs sharded over every host's devices. The pass is resumable and multi-host: every
process embeds its contiguous slice of the catalogue (`pipeline.make_eval_iterator`) and writes
`shards/process_{p}-of-{P}/shard_{j}.npz` (plus the grain iterator state after it); a rerun skips
finished shards (all processes restart from the shard every process has finished), process 0 merges
them, then deletes the shards. OUT must be a path every process sees (local disk for one host; NFS or a
FUSE-mounted bucket for several).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sys
import time
from typing import Any, Mapping

from etils import epath
import jax
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P
import numpy as np
from tqdm import tqdm

from mmr_jax.data import pipeline
from mmr_jax.data import tfds_builder
from mmr_jax.evals import index as index_lib
from mmr_jax import fileio
from mmr_jax import runtime
from mmr_jax import sharding as shd

log = logging.getLogger("mmr_jax.export")


def export_fingerprint(host_params, config) -> dict:
  """Returns sha256 digests of the weights (each leaf's path, dtype, shape and bytes) and of the config.

  Step and data_dir do not identify an export: another run, variant or seed at the same step embeds the
  catalogue differently, so OUT/embeddings is reused only when these match exactly.
  """
  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_flatten_with_path(host_params)[0]:
    x = np.ascontiguousarray(x)
    h.update(f"{jax.tree_util.keystr(path)}|{x.dtype.str}|{x.shape}\n".encode())
    h.update(x.reshape(-1).view(np.uint8))
  config_json = json.dumps(config.to_dict(), sort_keys=True, default=str)
  return {"params_sha256": h.hexdigest(), "config_sha256": hashlib.sha256(config_json.encode()).hexdigest()}


def _local_embed_fn(tm):
  """Returns fn(host batch) -> this host's rows of the product embeddings [B_local, D] (numpy)."""
  keys = ("product_tokens", "image", "has_image")

  def fn(params, tokens, image, has_image):
    return tm.model.apply({"params": params}, tokens, image, has_image, train=False,
                          method="embed_product")["emb"]

  jitted = jax.jit(fn, out_shardings=shd.batch_sharding(tm.mesh, 2))

  def call(batch):
    arrays = shd.host_batch_to_global({k: batch[k] for k in keys}, tm.mesh)
    out = jitted(tm.params, *(arrays[k] for k in keys))
    if jax.process_count() == 1:
      return np.asarray(out)
    # The inverse of host_batch_to_global: this host's rows, in its batch order.
    return np.asarray(multihost_utils.global_array_to_host_local_array(out, tm.mesh, P(shd.BATCH_AXES)))

  return call


def min_over_processes(value: int) -> int:
  """Returns the smallest `value` any process passed (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return value
  return int(np.min(multihost_utils.process_allgather(np.asarray([value], np.int64))))


def load_npy(path) -> np.ndarray:
  """Returns the .npy or .npz (then a dict of arrays) at a local or gs:// path."""
  data = np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False)
  if isinstance(data, np.lib.npyio.NpzFile):
    with data:
      return {k: data[k] for k in data.files}
  return data


def abspath(path) -> str:
  """Returns `path` made absolute, as recorded in info.json and the summary (gs:// URLs as they are)."""
  return os.fspath(path) if fileio.is_remote(path) else os.path.abspath(path)


def _finished_shards(shard_dir: str, num_shards: int) -> int:
  """Returns how many shards from the first one on are complete (npz + state json)."""
  done = 0
  while done < num_shards and all((epath.Path(shard_dir) / f"shard_{done:05d}{ext}").is_file()
                                  for ext in (".npz", ".json")):
    done += 1
  return done


def product_ids(data_dir: str) -> list[str]:
  """Returns the product ids in product-index order."""
  src = tfds_builder.load_source(data_dir, "products", "all")
  out = []
  for i in range(len(src)):
    v = src[i]["id"]
    out.append(v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v))
  return out


def embed_catalogue(tm, data_dir: str, out_dir: str, *, batch_size: int = 256, shard_batches: int = 16,
                    progress: bool = True, fingerprint: Mapping[str, str] | None = None) -> np.ndarray | None:
  """Embeds every product, resumably; returns embeddings [N, D] on process 0 (None elsewhere).

  Each process embeds its contiguous slice of the catalogue and writes shards under
  out_dir/shards/process_{p}-of-{P}/ (see module doc); process 0 merges them in product-index order.
  Shards left by an export with another `fingerprint` (export_fingerprint) are discarded, not resumed.
  """

  p, num_p = jax.process_index(), jax.process_count()
  if batch_size < 1 or shard_batches < 1:
    raise ValueError(f"batch_size={batch_size} and shard_batches={shard_batches} must be >= 1")
  batch_size = shd.data_parallel_batch(batch_size, tm.mesh)
  n = len(tfds_builder.load_source(data_dir, "products", "all"))
  if n == 0:
    raise ValueError(f"{data_dir}: the products table is empty")
  start, stop, num_batches = pipeline.eval_host_slice(n, batch_size, p, num_p)
  num_shards = -(-num_batches // shard_batches)
  shards_root = os.path.join(out_dir, "shards")
  shard_dir = os.path.join(shards_root, f"process_{p}-of-{num_p}")
  epath.Path(shard_dir).mkdir(parents=True, exist_ok=True)
  manifest = {"num_products": n, "batch_size": batch_size, "shard_batches": shard_batches,
              "process_count": num_p, "step": int(tm.step), "data_dir": abspath(data_dir),
              "fingerprint": dict(fingerprint or {})}
  man_path = os.path.join(shard_dir, "manifest.json")
  if epath.Path(man_path).is_file():
    old = json.loads(epath.Path(man_path).read_text())
    if old != manifest:
      log.warning("%s: shards were written with %s, now %s; starting over", shard_dir, old, manifest)
      epath.Path(shard_dir).rmtree()
      epath.Path(shard_dir).mkdir(parents=True)
  fileio.write_text(man_path, json.dumps(manifest, indent=2))
  # Every process must run the same number of (collective) steps: restart where all of them are.
  done = min_over_processes(_finished_shards(shard_dir, num_shards))
  it = pipeline.make_eval_iterator(data_dir, "products", "all", tm.config.data, batch_size)
  rows_done = 0
  if done:
    state = json.loads((epath.Path(shard_dir) / f"shard_{done - 1:05d}.json").read_text())
    it.set_state(state["iterator_state"])
    rows_done = int(state["rows_total"])
    log.info("resuming after %d finished shard(s) (%d rows) in %s", done, rows_done, shard_dir)
  embed = _local_embed_fn(tm)
  with tqdm(total=stop - start, initial=rows_done, desc=f"embed products (process {p})", unit="row",
            file=sys.stderr, disable=not progress, mininterval=1.0) as bar:
    for j in range(done, num_shards):
      embs, idxs = [], []
      for _ in range(min(shard_batches, num_batches - j * shard_batches)):
        batch = next(it)
        mask = np.asarray(batch["mask"], bool)
        e = embed(batch)
        embs.append(e[mask])
        idxs.append(np.asarray(batch["product_index"], np.int64)[mask])
        bar.update(int(mask.sum()))
      emb = np.concatenate(embs).astype(np.float32)
      idx = np.concatenate(idxs)
      rows_done += len(idx)
      base = os.path.join(shard_dir, f"shard_{j:05d}")

      def write_npz(t, emb=emb, idx=idx):
        with open(t, "wb") as f:
          np.savez(f, embeddings=emb, product_index=idx)

      fileio.write_atomic(base + ".npz", write_npz)
      state = {"iterator_state": it.get_state(), "rows": len(idx), "rows_total": rows_done}
      fileio.write_text(base + ".json", json.dumps(state))
  runtime.barrier("mmr_export_embedded")
  if p != 0:
    return None
  dim = None
  out = None
  seen = np.zeros(n, bool)
  for q in range(num_p):
    d = os.path.join(shards_root, f"process_{q}-of-{num_p}")
    for j in range(_finished_shards(d, num_shards)):
      z = load_npy(os.path.join(d, f"shard_{j:05d}.npz"))
      emb, idx = z["embeddings"], z["product_index"]
      if out is None:
        dim = emb.shape[1]
        out = np.zeros((n, dim), np.float32)
      out[idx] = emb
      seen[idx] = True
  if out is None or not seen.all():
    missing = np.nonzero(~seen)[0]
    raise RuntimeError(f"embedding shards under {shards_root} miss {len(missing)} of {n} products "
                       f"(first: {missing[:5].tolist()}); rerun to resume")
  return out


def build_index(emb: np.ndarray, workdir: str, out_index: str, rebuild: bool,
                 scann_overrides: Mapping[str, Any] | None) -> dict:
  """Writes out_index (the evaluation's index reused, or one built with its parameters); returns its record."""
  eval_dir = os.path.join(workdir, "index")
  eval_emb = os.path.join(workdir, "product_embeddings.npy")
  cfg_path = os.path.join(eval_dir, index_lib.SCANN_CONFIG_FILE)
  if epath.Path(out_index).exists():
    epath.Path(out_index).rmtree()
  params = None
  if epath.Path(cfg_path).is_file() and not scann_overrides:
    eval_params = json.loads(epath.Path(cfg_path).read_text())["params"]
    if int(eval_params.get("n", -1)) == emb.shape[0] and int(eval_params.get("d", -1)) == emb.shape[1]:
      if not rebuild and epath.Path(eval_emb).is_file() and np.array_equal(load_npy(eval_emb), emb):
        with fileio.local_dir(eval_dir) as local:
          fileio.upload_dir(local, out_index)
        index_lib.ScannIndex.load(out_index)  # validates the copy
        return {"source": "reused", "from": eval_dir, **index_lib.ScannIndex.load(out_index).config()}
      params = {k: v for k, v in eval_params.items() if k in index_lib.SCANN_DEFAULTS}
  if scann_overrides:
    params = dict(scann_overrides)
  t0 = time.time()
  idx = index_lib.ScannIndex.build(emb, params)
  idx.save(out_index)
  source = "built with the evaluation's parameters" if params and not scann_overrides else (
      "built with --scann overrides" if scann_overrides else "built with index.SCANN_DEFAULTS")
  return {"source": source, "build_s": time.time() - t0, **idx.config()}
