"""Parity of the exported SavedModels with the JAX model, measured on every export.

An export runs the SavedModels it wrote and the JAX model on the same inputs and records the largest
differences in export_summary.json: the query tower on a sample of test queries plus UNUSUAL_QUERIES
(empty, emoji, CJK/Arabic/Cyrillic, very long strings, control characters); the product tower on a
catalogue sample, once on identical preprocessed inputs (the model alone) and once end to end from raw
fields and image bytes (the in-graph preprocessing too), with the tokens and pixels the graph produced
compared against `Tokenizer.encode` and `transforms.decode_image`. An export whose embeddings differ by
more than `--parity_tol` (default PARITY_TOL), or whose in-graph tokens or has_image differ, exits with
status 1 naming the model, unless `--allow_parity_mismatch`. tests/export/test_export.py asserts float32 parity
within 1e-5 for every SavedModel output and 0 differing pixels.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from mmr_jax.data import sources
from mmr_jax.data import tfds_builder
from mmr_jax.data import transforms
from mmr_jax.export import saving


UNUSUAL_QUERIES = ("", "   ", "😀👍 emoji only", "ünïcödé straße", "日本語の検索クエリ", "بحث عربي",
                   "поиск товара", "a" * 5000, "red dress " * 2000, "tab\tand\nnewline", "\x00nul")


def measure_parity(out: str, tm, data_dir: str, sample: int = 32) -> dict:
  """Returns max |SavedModel - JAX| for queries and products on a catalogue sample (and image pixel diffs)."""
  text, raw = sources.row_text, sources.row_bytes
  cfg = tm.config.data
  tok = sources.load_tokenizer(data_dir, cfg)
  qsrc = tfds_builder.load_source(data_dir, "queries", "test")
  queries = [text(qsrc[i], "text") for i in range(min(sample, len(qsrc)))] + list(UNUSUAL_QUERIES)
  qt = saving.load_saved_model(os.path.join(out, "query_tower"))
  sm_q = qt.signatures["serving_default"](queries=np.asarray(queries, object))["embedding"].numpy()
  jax_q = tm.embed_queries({"query_tokens": tok.encode(queries, int(cfg.query_len))})
  psrc = tfds_builder.load_source(data_dir, "products", "all")
  rows = [psrc[i] for i in range(min(sample, len(psrc)))]
  fields = {k: np.asarray([text(r, k) for r in rows], object) for k in ("title", "description", "attributes")}
  fields["image"] = np.asarray([raw(r, "image") if bool(np.asarray(r["has_image"])) else b"" for r in rows],
                               object)
  pt = saving.load_saved_model(os.path.join(out, "product_tower"))
  pre = pt.signatures["preprocess"](**fields)
  ref = [transforms.decode_image(b, int(cfg.image_size)) for b in fields["image"]]
  ref_img = np.stack([r[0] for r in ref])
  ref_tokens = np.stack([transforms.product_tokens(r, tok, int(cfg.product_len)) for r in rows])
  batch = {"product_tokens": ref_tokens, "image": ref_img, "has_image": np.asarray([r[1] for r in ref])}
  jax_p = tm.embed_products(batch)
  sm_p = pt.signatures["embed_preprocessed"](**batch)["embedding"].numpy()
  sm_e2e = pt.signatures["serving_default"](**fields)["embedding"].numpy()
  pix = np.abs(pre["image"].numpy().astype(int) - ref_img.astype(int))
  return {
      "queries": len(queries), "products": len(rows),
      "query_max_abs_diff": float(np.abs(sm_q - jax_q).max()),
      "product_preprocessed_max_abs_diff": float(np.abs(sm_p - jax_p).max()),
      "product_end_to_end_max_abs_diff": float(np.abs(sm_e2e - jax_p).max()),
      "product_tokens_equal": bool(np.array_equal(pre["product_tokens"].numpy(), ref_tokens)),
      "has_image_equal": bool(np.array_equal(pre["has_image"].numpy(), batch["has_image"])),
      "image_pixels_differing": float((pix > 0).mean()), "image_max_abs_diff": int(pix.max(initial=0)),
  }


# Largest |SavedModel - JAX| embedding difference an export accepts: float32 rounding on CPU stays orders
# of magnitude below it and a wrong tokenizer or preprocessing orders of magnitude above; GPUs computing
# f32 matmuls in TF32 may need a larger --parity_tol.
PARITY_TOL = 1e-4
_PARITY_MODELS = {"query_max_abs_diff": "query_tower",
                  "product_preprocessed_max_abs_diff": "product_tower (embed_preprocessed)",
                  "product_end_to_end_max_abs_diff": "product_tower (serving_default, raw bytes)"}


class ParityError(RuntimeError):
  """Raised when an exported SavedModel's outputs differ from the JAX model's beyond the tolerance."""


def parity_failures(parity: Mapping[str, Any] | None, tol: float) -> list[str]:
  """Returns one line per SavedModel whose measured parity (measure_parity's dict) is outside `tol`."""
  if not parity or "skipped" in parity:
    return []
  out = [f"{model}: max |SavedModel - JAX| {parity[key]:.3g} > tolerance {tol:g}"
         for key, model in _PARITY_MODELS.items() if not parity[key] <= tol]  # NaN fails too
  if not parity["product_tokens_equal"]:
    out.append("product_tower (preprocess): product tokens differ from the training tokenizer's")
  if not parity["has_image_equal"]:
    out.append("product_tower (preprocess): has_image differs from the training pipeline's decoding")
  return out
