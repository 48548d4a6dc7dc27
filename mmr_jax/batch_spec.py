"""The batch layout, written once: each stage's keys, per-example shapes and dtypes, from `config.data`.

The grain pipeline yields these batches (numpy dicts, leading dim = per-host batch), the objectives
compile against them, models initialise from them and export and tests fake them; all of them read
the layout here. Nothing here reads data files, and models may import it (it imports nothing of
mmr_jax).

Token ids are int32 with pad id 0 (the tokenizer's conventions may pad with another id); images are
uint8 [B, H, W, 3], normalised on device.
- stage 1: image, has_image, title_tokens [B, Lt], product_tokens [B, Lp], product_index; with
  `data.stage1_pseudo_queries` also query_tokens [B, Lq].
- stage 2: stage 1's keys, query_tokens, query_index, grade (float32), positives [B, K] (pad -1). Stage 1
  with `data.stage1_source="pairs"` reads stage 2's stream and has its layout.
- eval products: product_tokens, image, has_image, product_index, mask (False on padding rows).
- eval queries: query_tokens, query_index, mask.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

STAGES = (1, 2, "eval_products", "eval_queries")
# What the models read from a batch: a batch with these keys creates every parameter at init.
MODEL_INPUTS = ("query_tokens", "product_tokens", "title_tokens", "image", "has_image")
PAD_INDEX = -1  # product/query index (and positives) of padding rows

Spec = dict[str, tuple[tuple[int, ...], Any]]  # key -> (shape, numpy scalar type)


@dataclasses.dataclass(frozen=True)
class Lens:
  """Per-example sizes of a batch: image side, token lengths, positives per query."""
  image_size: int
  query_len: int
  product_len: int
  title_len: int
  positives_k: int

  @classmethod
  def from_config(cls, config: Any) -> "Lens":
    """Returns the sizes of `config.data`; raises ValueError for one that is not positive."""
    lens = cls(image_size=int(config.image_size), query_len=int(config.query_len),
               product_len=int(config.product_len), title_len=int(config.title_len),
               positives_k=int(config.positives_k or 8))  # 0 takes the base config's 8
    for field in dataclasses.fields(lens):
      if getattr(lens, field.name) <= 0:
        raise ValueError(f"config.data.{field.name}={getattr(lens, field.name)} must be positive")
    return lens


def example_spec(stage: int | str, lens: Lens, *, pseudo_queries: bool = False) -> Spec:
  """Returns {key: (shape of one example, dtype)} of a stage's rows (no batch dim).

  stage: one of STAGES. pseudo_queries: stage 1 also carries query_tokens (data.stage1_pseudo_queries).
  """
  s = lens.image_size
  product = {"product_tokens": ((lens.product_len,), np.int32),
             "image": ((s, s, 3), np.uint8),
             "has_image": ((), np.bool_),
             "product_index": ((), np.int32)}
  if stage == 1:
    spec = {**product, "title_tokens": ((lens.title_len,), np.int32)}
    if pseudo_queries:
      spec["query_tokens"] = ((lens.query_len,), np.int32)
    return spec
  if stage == 2:
    return {**product, "title_tokens": ((lens.title_len,), np.int32),
            "query_tokens": ((lens.query_len,), np.int32),
            "query_index": ((), np.int32), "grade": ((), np.float32),
            "positives": ((lens.positives_k,), np.int32)}
  if stage == "eval_products":
    return {**product, "mask": ((), np.bool_)}
  if stage == "eval_queries":
    return {"query_tokens": ((lens.query_len,), np.int32),
            "query_index": ((), np.int32), "mask": ((), np.bool_)}
  raise ValueError(f"stage={stage!r}; expected one of {STAGES}")


STAGE1_SOURCES = ("products", "pairs")


def stage1_reads_pairs(config: Any) -> bool:
  """Returns whether stage 1 iterates over stage 2's pairs (`config.data.stage1_source`, `config` = config.data).

  Its batches then have stage 2's layout. Raises ValueError for an unknown source.
  """
  source = config.get("stage1_source", "products")
  if source not in STAGE1_SOURCES:
    raise ValueError(f"config.data.stage1_source={source!r}; expected one of {STAGE1_SOURCES}")
  return source == "pairs"


def from_config(stage: int | str, config: Any, batch_size: int) -> Spec:
  """Returns {key: (shape, dtype)} of a batch of `batch_size` rows of `config.data` (`config`)."""
  if stage == 1 and stage1_reads_pairs(config):
    stage = 2
  spec = example_spec(stage, Lens.from_config(config),
                      pseudo_queries=stage == 1 and bool(config.stage1_pseudo_queries))
  return {k: ((batch_size, *shape), dtype) for k, (shape, dtype) in spec.items()}


def fake_batch(spec: Spec) -> dict[str, np.ndarray]:
  """Returns a numpy batch of `spec` (with its batch dim) for compilation, init and tests.

  Tokens are 1 (not the pad id, so text towers see text); images black and present; indices distinct
  (0..B-1, so no row is another's positive); grades 1; positives all padding.
  """
  out = {}
  for key, (shape, dtype) in spec.items():
    if key.endswith("_index"):
      out[key] = np.arange(shape[0], dtype=dtype)
    elif key == "positives":
      out[key] = np.full(shape, PAD_INDEX, dtype)
    elif key == "image":
      out[key] = np.zeros(shape, dtype)
    else:  # tokens, has_image, mask, grade
      out[key] = np.ones(shape, dtype)
  return out


def pad_example(spec: Spec) -> dict[str, np.ndarray]:
  """Returns one padding row of an example spec: zeros, False, and PAD_INDEX for indices."""
  return {key: np.full(shape, PAD_INDEX if key.endswith("_index") else 0, dtype)
          for key, (shape, dtype) in spec.items()}


def model_init_batch(lens: Lens, batch_size: int = 2) -> dict[str, np.ndarray]:
  """Returns a fake batch with every model input (MODEL_INPUTS), so `model.init` creates every parameter."""
  spec = example_spec(2, lens)
  return fake_batch({k: ((batch_size, *spec[k][0]), spec[k][1]) for k in MODEL_INPUTS})
