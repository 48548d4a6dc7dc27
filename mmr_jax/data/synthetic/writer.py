"""Writes the catalogue folder: products.jsonl, images/, queries.jsonl, qrels.tsv, ground_truth.jsonl.

`generate_folder` ties the parts together: per product, latents -> text -> image (PNG-encoded and written
in a thread while the next product renders), then the queries and labels over the whole catalogue.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import struct
import time
import zlib
from typing import Any

import numpy as np
import tqdm

from mmr_jax.data.synthetic.config import SyntheticConfig
from mmr_jax.data.synthetic.latents import PRODUCT_STREAM, sample_latents
from mmr_jax.data.synthetic.queries import generate_queries
from mmr_jax.data.synthetic.renderer import Renderer
from mmr_jax.data.synthetic.text import product_text


def encode_png(image: np.ndarray, level: int = 1) -> bytes:
  """Returns PNG bytes of a uint8 [H, W, 3] image.

  A minimal encoder (one IDAT, "Up" filter on every row): PIL's encoder costs more than rendering a
  64 px image. Deterministic for a given zlib; any PNG reader decodes it.
  """
  h, w, _ = image.shape
  raw = image.reshape(h, w * 3)
  up = np.empty((h, w * 3 + 1), np.uint8)
  up[:, 0] = 2  # filter type Up
  up[0, 1:] = raw[0]
  np.subtract(raw[1:], raw[:-1], out=up[1:, 1:])  # uint8 wraps mod 256, as PNG wants

  def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

  header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  # After the Up filter, noise-dominated rows gain little from LZ77 matching: Huffman-only coding is
  # ~2x faster than level 1 and smaller.
  z = zlib.compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
  data = z.compress(up.tobytes()) + z.flush()
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _jsonl(record: dict[str, Any]) -> str:
  """Returns one JSON Lines row (UTF-8 text kept as is, as real catalogues write it)."""
  return json.dumps(record, ensure_ascii=False) + "\n"


def generate_folder(out_dir: str | os.PathLike, config: SyntheticConfig, progress: bool = True) -> dict[str, Any]:
  """Returns generation stats after writing the catalogue folder (see the package docstring) into out_dir.

  out_dir is created if needed; existing files of the same names are overwritten.
  """
  cfg = config
  t0 = time.perf_counter()
  out_dir = os.fspath(out_dir)
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  renderer = Renderer(cfg.image_size)
  width = max(6, len(str(cfg.num_products)))
  ids = [f"p{i + 1:0{width}d}" for i in range(cfg.num_products)]
  gts: list[dict[str, Any]] = []
  bar = None
  if progress:
    bar = tqdm.tqdm(total=cfg.num_products, desc="synthetic products", unit="it", mininterval=1.0,
                    dynamic_ncols=True)
  # PNG encoding (zlib) and file creation release the GIL: a writer thread overlaps them with rendering.
  # Threads, not processes: the file contents do not depend on the order they are written in.
  pending: collections.deque = collections.deque()

  def write_image(path, image):
    with open(path, "wb") as f:
      f.write(encode_png(image))

  with open(os.path.join(out_dir, "products.jsonl"), "w", encoding="utf-8") as fp, \
       open(os.path.join(out_dir, "ground_truth.jsonl"), "w", encoding="utf-8") as fg, \
       concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="png") as pool:
    for i, pid in enumerate(ids):
      # Product i depends on (seed, i) only: catalogues of different sizes share their prefix.
      rng = np.random.default_rng([cfg.seed, PRODUCT_STREAM, i])
      gt = sample_latents(rng, cfg)
      title, description, attributes = product_text(rng, gt, cfg)
      image = renderer.render(rng, gt, cfg.occlusion_rate, cfg.noise_sigma_max)
      rel = f"images/{pid}.png"
      pending.append(pool.submit(write_image, os.path.join(out_dir, rel), image))
      while len(pending) > 64 or (pending and pending[0].done()):
        pending.popleft().result()  # re-raises a failed write here
      fp.write(_jsonl({"id": pid, "title": title, "description": description, "attributes": attributes,
                       "image": rel, "language": gt["language"]}))
      fg.write(_jsonl({"id": pid, **gt}))
      gts.append(gt)
      if bar is not None and (i + 1) % 256 == 0:
        bar.update(256)
    while pending:
      pending.popleft().result()
  if bar is not None:
    bar.update(cfg.num_products - bar.n)
    bar.close()
  t_products = time.perf_counter() - t0

  queries, qrels, qstats = generate_queries(gts, ids, cfg)
  with open(os.path.join(out_dir, "queries.jsonl"), "w", encoding="utf-8") as f:
    for q in queries:
      f.write(_jsonl({k: v for k, v in q.items() if not k.startswith("_")}))
  with open(os.path.join(out_dir, "qrels.tsv"), "w", encoding="utf-8") as f:
    for qid, pid, grade in qrels:
      f.write(f"{qid}\t{pid}\t{grade}\n")

  n = cfg.num_products
  languages = dict(collections.Counter(g["language"] for g in gts))
  grades = {g: 0 for g in "ESCI"}
  for _, _, g in qrels:
    grades[g] += 1
  splits = {s: sum(q["split"] == s for q in queries) for s in ("train", "validation", "test")}
  return {
      "num_products": n,
      "num_queries": splits,
      "num_qrels": grades,
      "sparse_fraction": sum(g["sparse_title"] for g in gts) / n,
      "noisy_fraction": sum(g["noisy"] for g in gts) / n,
      "languages": languages,
      **qstats,
      "seconds": time.perf_counter() - t0,
      "products_per_second": n / max(t_products, 1e-9),
  }


def read_ground_truth(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
  """Returns {product id: ground-truth record} from a ground_truth.jsonl."""
  out = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      out[rec["id"]] = rec
  return out
