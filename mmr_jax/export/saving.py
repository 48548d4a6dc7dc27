"""Writing the three SavedModels (with TF Serving's warm-up requests) and loading them back.

Every SavedModel carries TF Serving's warm-up file, `assets.extra/tf_serving_warmup_requests`
(PredictionLog records: a `serving_default` request per batch bucket up to `--warmup_max_batch`), so TF
Serving compiles the towers' XLA programs for those buckets while it loads the model, not in a user's
request. Serving these models from TF Serving needs a build with ScaNN's and tensorflow-text's custom
ops and XLA.

A SavedModel is written next to its final place and renamed over it, so a folder that exists is whole;
on gs:// (no atomic folder rename) it is written locally and uploaded, and export_summary.json, written
last, says the export is complete. `load_saved_model` imports the custom-op libraries a model needs
before loading it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Mapping, Sequence

from etils import epath
import numpy as np
import scann  # pylint: disable=unused-import  # registers ScaNN's TF ops for loading
import tensorflow as tf
import tensorflow_text  # pylint: disable=unused-import  # registers SentencePiece's TF ops for loading
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2

from mmr_jax.export import convert
from mmr_jax.export import scann_graph
from mmr_jax.export import towers
from mmr_jax import fileio


# TF Serving's warm-up file in each SavedModel: one request per bucket up to this batch size.
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
WARMUP_MAX_BATCH = 64
MAX_WARMUP_RECORDS = 1000  # TF Serving fails to load a model whose warm-up file has more records


def check_warmup(buckets: Sequence[int], max_batch: int) -> list[int]:
  """Returns the batch sizes to warm up; ValueError if TF Serving would refuse that many records."""
  sizes = _warmup_batches(buckets, max_batch)
  if len(sizes) > MAX_WARMUP_RECORDS:
    raise ValueError(f"warmup_max_batch={max_batch} gives {len(sizes)} warm-up requests; TF Serving refuses to load "
                     f"a model with more than {MAX_WARMUP_RECORDS}: lower it or use fewer batch_buckets")
  return sizes


def write_warmup_requests(path: str, requests: Sequence[Mapping[str, np.ndarray]],
                          signature: str = "serving_default") -> None:
  """Writes TF Serving's warm-up file: a TFRecord of PredictionLog, one predict request per input dict.

  TF Serving runs these requests when it loads the model (`assets.extra/tf_serving_warmup_requests`),
  so the XLA compile of each batch bucket happens before traffic arrives, not in a user's request.
  """
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  with tf.io.TFRecordWriter(path) as w:
    for inputs in requests:
      req = predict_pb2.PredictRequest()
      req.model_spec.signature_name = signature
      for name, value in inputs.items():
        req.inputs[name].CopyFrom(tf.make_tensor_proto(value))
      w.write(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=req))
              .SerializeToString())


def _warmup_batches(buckets: Sequence[int], max_batch: int) -> list[int]:
  """Returns the bucket sizes to warm up: those up to max_batch (none when max_batch <= 0)."""
  return [b for b in buckets if b <= max_batch]


def _query_warmup(buckets, max_batch):
  return [{"queries": np.asarray(["warmup"] * b, object)} for b in check_warmup(buckets, max_batch)]


def _product_warmup(buckets, max_batch):
  text = lambda s, b: np.asarray([s] * b, object)  # pylint: disable=unnecessary-lambda-assignment
  return [{"title": text("warmup", b), "description": text("", b), "attributes": text("", b), "image": text(b"", b)}
          for b in check_warmup(buckets, max_batch)]


def _save(module, out_dir: str, signatures: Mapping[str, Any], warmup: Sequence[Mapping[str, Any]] = ()) -> str:
  """Writes the SavedModel (and its warm-up requests for `serving_default`, if any) atomically to out_dir.

  On gs:// (no atomic folder rename) it is written locally and copied up; export_summary.json, written
  last, says the export is complete.
  """
  out_dir = os.fspath(out_dir)
  if fileio.is_remote(out_dir):
    with tempfile.TemporaryDirectory(prefix="mmr_export_") as local:
      _save(module, os.path.join(local, "model"), signatures, warmup)
      fileio.upload_dir(os.path.join(local, "model"), out_dir)
    return out_dir
  tmp = out_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  tf.saved_model.save(module, tmp, signatures=signatures)
  if warmup:
    write_warmup_requests(os.path.join(tmp, WARMUP_FILE), warmup)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp, out_dir)
  return out_dir


def export_query_tower(tm, tokenizer_path: str, out_dir: str, platforms: Sequence[str] = convert.DEFAULT_PLATFORMS,
                       batch_buckets: Sequence[int] = towers.BATCH_BUCKETS, warmup_max_batch: int = WARMUP_MAX_BATCH):
  """Writes the query-tower SavedModel to out_dir; returns out_dir."""
  buckets = towers.check_batch_buckets(batch_buckets)
  m = towers.make_query_tower(tm, tokenizer_path, convert.check_platforms(platforms), buckets)
  return _save(m, out_dir, {"serving_default": m.serve, "tokenize": m.tokenize, "embed_tokens": m.embed_tokens},
               _query_warmup(buckets, warmup_max_batch))


def export_product_tower(tm, tokenizer_path: str, out_dir: str, platforms: Sequence[str] = convert.DEFAULT_PLATFORMS,
                         batch_buckets: Sequence[int] = towers.BATCH_BUCKETS, warmup_max_batch: int = WARMUP_MAX_BATCH):
  """Writes the product-tower SavedModel to out_dir; returns out_dir."""
  buckets = towers.check_batch_buckets(batch_buckets)
  m = towers.make_product_tower(tm, tokenizer_path, convert.check_platforms(platforms), buckets)
  return _save(m, out_dir, {"serving_default": m.serve, "preprocess": m.preprocess,
                            "embed_preprocessed": m.embed_preprocessed}, _product_warmup(buckets, warmup_max_batch))


def export_serving(tm, tokenizer_path: str, index_dir: str, ids: Sequence[str], out_dir: str, k: int = 100,
                   platforms: Sequence[str] = convert.DEFAULT_PLATFORMS,
                   batch_buckets: Sequence[int] = towers.BATCH_BUCKETS,
                   warmup_max_batch: int = WARMUP_MAX_BATCH):
  """Writes the serving SavedModel (query strings -> top-k ids, scores, indices) to out_dir; returns out_dir."""
  buckets = towers.check_batch_buckets(batch_buckets)
  q = towers.make_query_tower(tm, tokenizer_path, convert.check_platforms(platforms), buckets)
  m = scann_graph.make_serving(q, index_dir, ids, k)
  return _save(m, out_dir, {"serving_default": m.serve}, _query_warmup(buckets, warmup_max_batch))


def load_saved_model(path: str):
  """Returns `tf.saved_model.load(path)` after importing the custom-op libraries the models need."""
  if not (epath.Path(path) / "saved_model.pb").is_file():
    raise FileNotFoundError(f"{path}/saved_model.pb not found: not a SavedModel directory")
  return tf.saved_model.load(path)
