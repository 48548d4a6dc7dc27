"""The whole export of a trained workdir: embeddings and index, three SavedModels, parity, the summary.

`export_workdir(workdir, out, data_dir)` writes the layout the package docstring lists, in an order
that makes a rerun cheap and an interrupted run safe: the catalogue embeddings first (resumable, and
kept when OUT/embeddings already holds those of the same weights, config and data), then the ScaNN
index, the SavedModels, the parity measurement, and last `export_summary.json`, which says the export
is complete. Every process embeds its slice of the catalogue; process 0 writes everything else.

export_summary.json: {"workdir", "data_dir", "step", "variant", "embedding_dim", "num_products", "k",
"platforms", "batch_buckets", "warmup_batch_sizes", "inputs": {"query_len", "product_len", "image_size"},
"paths", "index", "parity" (parity.measure_parity's dict), "parity_tolerance", "parity_failures",
"pillow_vertical_first", "timings", "versions"}.
"""

from __future__ import annotations

import contextlib
import dataclasses
from importlib import metadata
import json
import logging
import os
import sys
import time
from typing import Any, Mapping, Sequence

from etils import epath
import jax
import numpy as np

from mmr_jax.data import sources
from mmr_jax.evals import embedding
from mmr_jax.export import convert
from mmr_jax.export import embeddings
from mmr_jax.export import parity as parity_lib
from mmr_jax.export import preprocess
from mmr_jax.export import saving
from mmr_jax.export import towers
from mmr_jax import fileio
from mmr_jax import runtime
from mmr_jax.models import two_tower

log = logging.getLogger("mmr_jax.export")

SUMMARY_FILE = "export_summary.json"


def versions() -> dict:
  """Returns {package: version or None} of the libraries an export's numbers depend on."""
  out = {}
  for pkg in ("jax", "jaxlib", "flax", "tensorflow", "tensorflow-text", "scann", "pillow"):
    try:
      out[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      out[pkg] = None
  return out


def export_workdir(workdir: str, out: str, data_dir: str | None = None, **kwargs) -> dict | None:
  """Exports a trained workdir into `out` (layout in the module doc); returns the summary on process 0.

  The workdir and `out` are locked (fileio.WorkdirLock) for the export: a trainer still writing the workdir,
  or a second export into `out`, is refused. Keyword arguments: see `_export_workdir`.
  Raises ParityError (after writing everything, the summary included) when the measured parity is outside
  `parity_tol`, unless `allow_parity_mismatch`, which logs a warning instead.
  """
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:
      stack.enter_context(fileio.WorkdirLock(workdir, "export"))
      stack.enter_context(fileio.WorkdirLock(out, "export"))
    return _export_workdir(workdir, out, data_dir, **kwargs)


def _export_workdir(workdir: str, out: str, data_dir: str | None = None, *, k: int = 100,
                    platforms: Sequence[str] = convert.DEFAULT_PLATFORMS, batch_size: int = 256,
                    shard_batches: int = 16, scann_overrides: Mapping[str, Any] | None = None,
                    rebuild_index: bool = False, parity: bool = True, progress: bool = True,
                    batch_buckets: Sequence[int] = towers.BATCH_BUCKETS,
                    warmup_max_batch: int = saving.WARMUP_MAX_BATCH,
                    parity_tol: float = parity_lib.PARITY_TOL, allow_parity_mismatch: bool = False) -> dict | None:
  """Runs the export (export_workdir holds the locks). The keyword arguments are cli.py's flags: k results per
  query, jax2tf platforms, the catalogue's batch_size and shard_batches, scann_overrides (--scann),
  rebuild_index, parity (not --no_parity), progress, batch_buckets, warmup_max_batch, parity_tol and
  allow_parity_mismatch."""
  if int(k) != k or k < 1:
    raise ValueError(f"k must be a positive integer, got {k!r}")
  platforms = convert.check_platforms(platforms)
  batch_buckets = towers.check_batch_buckets(batch_buckets)
  warmup_sizes = saving.check_warmup(batch_buckets, warmup_max_batch)  # before the long work, not after it
  t_start = time.time()
  timings = {}

  def step(name: str) -> None:
    if progress and jax.process_index() == 0:
      print(f"[export] {name}", file=sys.stderr, flush=True)

  step(f"loading {workdir}")
  tm = embedding.load_trained(workdir, data_dir)
  data_dir = tm.config.data.dir
  try:
    tokenizer_path = sources.tokenizer_path(data_dir, tm.config.data)  # the run's own (config.json)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e}: --data must be the DATA_DIR the model was trained on") from None
  emb_dir = os.path.join(out, "embeddings")
  epath.Path(emb_dir).mkdir(parents=True, exist_ok=True)

  # The SavedModels are written by process 0 from whole (gathered) parameters; gathering is collective.
  tm_host = dataclasses.replace(tm, params=convert.host_params(tm.params))
  fingerprint = embeddings.export_fingerprint(tm_host.params, tm.config)
  t0 = time.time()
  info_path = os.path.join(emb_dir, "info.json")
  info = json.loads(epath.Path(info_path).read_text()) if epath.Path(info_path).is_file() else None
  up_to_date = (info is not None and info.get("step") == int(tm.step) and info.get("data_dir") ==
                embeddings.abspath(data_dir) and info.get("fingerprint") == fingerprint
                and epath.Path(emb_dir, "embeddings.npy").is_file()
                and not rebuild_index and not scann_overrides)
  # Every process must take the same branch (embedding is collective).
  up_to_date = bool(embeddings.min_over_processes(int(up_to_date)))
  emb = None
  if up_to_date:
    step("embeddings: up to date (same weights, config and data), kept")
    if jax.process_index() == 0:
      emb = embeddings.load_npy(os.path.join(emb_dir, "embeddings.npy"))
  else:
    step("embedding the catalogue (resumable)")
    emb = embeddings.embed_catalogue(tm, data_dir, emb_dir, batch_size=batch_size, shard_batches=shard_batches,
                          progress=progress, fingerprint=fingerprint)
  timings["embed_s"] = time.time() - t0
  summary = None
  if jax.process_index() == 0:
    ids = embeddings.product_ids(data_dir)
    if not up_to_date:
      # info.json is the "done" marker of this folder: a rerun trusts embeddings.npy only when it exists,
      # so everything else is complete (and each file whole) before it is written.
      if epath.Path(info_path).exists():
        epath.Path(info_path).unlink()
      fileio.write_atomic(os.path.join(emb_dir, "embeddings.npy"), lambda t: np.save(t, emb))
      fileio.write_text(os.path.join(emb_dir, "ids.txt"), "".join(f"{i}\n" for i in ids))
      step("building the ScaNN index")
      t0 = time.time()
      index_info = embeddings.build_index(emb, workdir, os.path.join(emb_dir, "index"), rebuild_index, scann_overrides)
      timings["index_s"] = time.time() - t0
      info = {"num_products": int(emb.shape[0]), "dim": int(emb.shape[1]), "dtype": "float32",
              "step": int(tm.step), "workdir": embeddings.abspath(workdir), "data_dir": embeddings.abspath(data_dir),
              "normalised": True, "index": index_info, "fingerprint": fingerprint}
      fileio.write_json(info_path, info)
      if epath.Path(emb_dir, "shards").exists():
        epath.Path(emb_dir, "shards").rmtree()

    opts = {"platforms": platforms, "batch_buckets": batch_buckets, "warmup_max_batch": warmup_max_batch}
    index_dir = os.path.join(emb_dir, "index")
    for name, fn in (
        ("query_tower", lambda p: saving.export_query_tower(tm_host, tokenizer_path, p, **opts)),
        ("product_tower", lambda p: saving.export_product_tower(tm_host, tokenizer_path, p, **opts)),
        ("serving", lambda p: saving.export_serving(tm_host, tokenizer_path, index_dir, ids, p, k, **opts))):
      step(f"writing {name} SavedModel")
      t0 = time.time()
      fn(os.path.join(out, name))
      timings[f"{name}_s"] = time.time() - t0
    parity_res = None
    if parity and jax.process_count() > 1:
      # The JAX reference runs on the global mesh (a collective) while only process 0 holds the models.
      parity_res = {"skipped": "multi-process export; run the export on one process to measure parity"}
    elif parity:
      step("measuring SavedModel vs JAX parity")
      t0 = time.time()
      parity_res = parity_lib.measure_parity(out, tm, data_dir)
      timings["parity_s"] = time.time() - t0
    timings["total_s"] = time.time() - t_start
    mismatches = parity_lib.parity_failures(parity_res, parity_tol)
    summary = {
        "workdir": embeddings.abspath(workdir), "data_dir": embeddings.abspath(data_dir), "step": int(tm.step),
        "variant": tm.config.model.variant, "embedding_dim": int(two_tower.embedding_dim(tm.config.model)),
        "num_products": int(info["num_products"]), "k": int(k), "platforms": list(platforms),
        "batch_buckets": list(batch_buckets),
        "warmup_batch_sizes": warmup_sizes,
        "inputs": {"query_len": int(tm.config.data.query_len), "product_len": int(tm.config.data.product_len),
                   "image_size": int(tm.config.data.image_size)},
        "paths": {name: os.path.join(embeddings.abspath(out), name)
                  for name in ("query_tower", "product_tower", "serving", "embeddings")},
        "index": info["index"], "parity": parity_res, "parity_tolerance": parity_tol,
        "parity_failures": mismatches, "pillow_vertical_first": preprocess.pillow_vertical_first(),
        "timings": timings, "versions": versions()}
    fileio.write_json(os.path.join(out, SUMMARY_FILE), summary)
    step(f"done in {timings['total_s']:.0f} s: {out}")
  runtime.barrier("mmr_export_done")
  if summary is not None and summary["parity_failures"]:
    msg = (f"{out}: the SavedModels do not match the JAX model: " + "; ".join(summary["parity_failures"]) +
           f" (details in {SUMMARY_FILE})")
    if not allow_parity_mismatch:
      raise parity_lib.ParityError(msg + "; --allow_parity_mismatch keeps the export with a warning")
    log.warning("%s; kept because of --allow_parity_mismatch", msg)
  return summary
