"""Tests for mmr_jax.data.pipeline (grain) over a tiny imported DATA_DIR."""

import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from mmr_jax.data import pipeline

NUM_PRODUCTS = 24
IMAGE_SIZE = 32


def _write_folder(src: pathlib.Path) -> None:
  """Writes a tiny catalogue folder: odd-sized photos, one product without image."""
  (src / "images").mkdir(parents=True)
  rng = np.random.default_rng(0)
  words = ["rouge", "écharpe", "laine", "日本", "кружка", "bottle", "lamp", "sofa"]
  with open(src / "products.jsonl", "w", encoding="utf-8") as f:
    for i in range(NUM_PRODUCTS):
      obj = {"id": f"p{i}", "title": f"{words[i % 8]} item {i}",
             "description": " ".join(words[(i + k) % 8] for k in range(i % 5)),
             "attributes": {"colour": words[i % 3]}}
      if i != 5:  # p5 has no image
        w, h = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        arr = np.full((h, w, 3), (i * 10) % 256, np.uint8)
        arr[: h // 2, : w // 3] = 255  # asymmetric, so flips are visible
        Image.fromarray(arr).save(src / "images" / f"p{i}.png")
        obj["image"] = f"images/p{i}.png"
      f.write(json.dumps(obj, ensure_ascii=False) + "\n")
  with open(src / "queries.jsonl", "w", encoding="utf-8") as f, \
      open(src / "qrels.tsv", "w", encoding="utf-8") as g:
    for q in range(12):
      split = "train" if q < 8 else ("validation" if q < 10 else "test")
      f.write(json.dumps({"id": f"q{q}", "text": f"{words[q % 8]} query {q}",
                          "split": split}, ensure_ascii=False) + "\n")
      for p in (q, q + 12, (q * 7) % NUM_PRODUCTS):
        g.write(f"q{q}\tp{p}\t{'E' if p != (q * 7) % NUM_PRODUCTS else 'S'}\n")
