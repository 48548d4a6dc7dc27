"""Hard in-batch negatives: training batches in groups of products a query could be confused with.

With random batches almost every in-batch negative differs from the query's product in category and
words, so the towers learn coarse topic matching and little of what ranks the top ten: which of the
products that share the query's words is the right one (often only the image tells: the same "Dress
Women Summer" title in three colours). `config.data.hard_negatives = n` builds each training batch from
groups of 1 + n examples: a stream example (labelled pair or pseudo-query) and pseudo-queries of n other
products. With `config.data.labelled_negatives`, a labelled pair's I-labelled products come first (its
query's judged-irrelevant products, the pairs table's `negatives`); the rest are drawn from the pool of the
example's product: by default its BM25 neighbours (`neighbours`: the products whose text scores highest
against its title and attributes). Each query of a group then has the group's other products as negatives,
and the batch keeps its size, so this costs no compute (DPR's BM25 negatives, without the extra column).

False negatives: a group's products are close by construction, so a pseudo-query of one may describe
another as well. Every product of the group whose text holds all of a pseudo-query's words counts as a
positive of that pseudo-query (`positives`, masked out of its negatives as duplicates are). Labelled
queries keep their labelled positives (an I label outranks shared words).

BM25 reads only product text (title, attributes, description; `evals.keyword`'s tokenisation), so it works
on any catalogue and language. Mining scores every product against every other: seconds for tens of
thousands of products, minutes for a million (progress is logged).

Model-mined pools (`nearest_by_embedding`, `config.data.hard_negative_embeddings`): the products a trained
model places closest to each product, from its product embeddings (`python -m mmr_jax.evaluate --workdir RUN
--products_only` writes RUN/catalogue_embeddings.npy for a run of any stage; an evaluated run's
product_embeddings.npy serves too). They replace BM25's pool: the products a model of the previous round
(stage 1, or a finished run) confuses with the product, whatever words they share (ANCE's negatives, mined
once before the run rather than refreshed during it).
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np
from etils import epath

from mmr_jax.data import pseudo_queries
from mmr_jax.data.sources import Source, row_text
from mmr_jax.evals import index as index_lib
from mmr_jax.evals import keyword

_log = logging.getLogger(__name__)


def mining_text(product) -> str:
  """Returns the text a product's neighbours are mined with: its title and attribute values."""
  return " ".join([row_text(product, "title")] + pseudo_queries.attribute_values(row_text(product, "attributes")))


def _check_pool(pool: int) -> None:
  if pool < 1:
    raise ValueError(f"config.data.hard_negative_pool={pool} must be >= 1")


def neighbours(products: Source, pool: int) -> np.ndarray:
  """Returns int32 [N, pool]: each product's `pool` best BM25 neighbours, best first (pad -1).

  A product's title and attributes are scored against every product's full text (title, description,
  attributes); the product itself and held-out products (which no stage trains on) are never neighbours,
  nor are products that share no word with it. Held-out products get no neighbours.
  """
  _check_pool(pool)
  n = len(products)
  rows = [products[i] for i in range(n)]
  heldout = heldout_flags(rows)
  index = keyword.BM25([row_text(r, "text") for r in rows])
  out = np.full((n, pool), -1, np.int32)
  start = last = time.monotonic()
  for i, row in enumerate(rows):
    if heldout[i]:
      continue
    scores = index.scores(mining_text(row))
    scores[i] = 0.0
    scores[heldout] = 0.0
    hit = np.flatnonzero(scores > 0)
    if len(hit) > pool:
      hit = hit[np.argpartition(-scores[hit], pool - 1)[:pool]]
    top = hit[np.lexsort((hit, -scores[hit]))]
    out[i, :len(top)] = top
    now = time.monotonic()
    if now - last > 30:
      last = now
      _log.info("hard negatives: mined %d / %d products (%.0f s)", i + 1, n, now - start)
  _log.info("hard negatives: %d products, %d nearest each, mined in %.1f s; %.0f%% have a full pool",
            n, pool, time.monotonic() - start, 100.0 * np.mean((out[~heldout] >= 0).all(axis=1)) if
            (~heldout).any() else 0.0)
  return out


def heldout_flags(products: Source | list) -> np.ndarray:
  """Returns bool [N]: which products (a source or its rows) are held out (no stage trains on them)."""
  return np.array([bool(np.asarray(products[i]["heldout"])) for i in range(len(products))], bool)


def nearest_by_embedding(embeddings: np.ndarray, heldout: np.ndarray, pool: int) -> np.ndarray:
  """Returns int32 [N, pool]: each product's `pool` nearest products by inner product of `embeddings`
  [N, D] (a trained model's product embeddings), nearest first (pad -1).

  As `neighbours`: never the product itself nor a held-out product, and held-out products get none.
  Exact search (`evals.index.exact_search`, chunked on device): N^2 D multiply-adds, seconds for a
  hundred thousand products on an accelerator.
  """
  _check_pool(pool)
  heldout = np.asarray(heldout, bool)
  emb = np.asarray(embeddings, np.float32)
  n = len(emb)
  out = np.full((n, pool), -1, np.int32)
  keep = np.flatnonzero(~heldout)
  if len(keep) < 2:
    return out
  start = time.monotonic()
  found, _ = index_lib.exact_search(emb[keep], emb[keep], min(pool + 1, len(keep)))
  for row, i in enumerate(keep):
    got = keep[found[row][found[row] >= 0]]
    got = got[got != i][:pool]
    out[i, :len(got)] = got
  _log.info("hard negatives: %d products, %d nearest each by the model's embeddings, mined in %.1f s",
            n, pool, time.monotonic() - start)
  return out


def load_embeddings(path: str, num_products: int, products_sha256: str = "") -> np.ndarray:
  """Returns float32 [num_products, D] read from the .npy at `path` (config.data.hard_negative_embeddings).

  Raises FileNotFoundError or ValueError naming the file when it is missing or does not hold one finite
  row per product of this catalogue. When the file sits in a trained run's workdir, the catalogue that run
  was trained on (its data_fingerprint.json) must be this one (`products_sha256`, catalog_info.json's).
  """
  what = f"config.data.hard_negative_embeddings={path!r}"
  p = epath.Path(path)
  if not p.exists():
    raise FileNotFoundError(f"{what}: no such file (python -m mmr_jax.evaluate --workdir RUN --products_only "
                            "writes a trained run's RUN/catalogue_embeddings.npy)")
  try:
    with p.open("rb") as f:
      emb = np.load(f, allow_pickle=False)
  except (ValueError, EOFError, OSError) as e:
    raise ValueError(f"{what}: not a .npy array ({type(e).__name__}: {e})") from e
  if not isinstance(emb, np.ndarray):
    raise ValueError(f"{what}: holds {type(emb).__name__} (an .npz archive?), not one .npy array")
  fingerprint = p.parent / "data_fingerprint.json"
  if products_sha256 and fingerprint.exists():
    theirs = json.loads(fingerprint.read_text()).get("products_sha256")
    if theirs and theirs != products_sha256:
      raise ValueError(f"{what}: its run ({fingerprint}) was trained on another catalogue (products_sha256 "
                       f"{theirs[:12]}…, this catalogue's {products_sha256[:12]}…)")
  if emb.ndim != 2 or emb.shape[0] != num_products or not np.issubdtype(emb.dtype, np.floating):
    raise ValueError(f"{what}: holds a {emb.dtype} array of shape {emb.shape}; expected one float row per "
                     f"product of this catalogue, [{num_products}, D] (embeddings of another catalogue?)")
  if not np.isfinite(emb).all():
    raise ValueError(f"{what}: holds NaN or infinite values")
  return emb.astype(np.float32)


def words(text: str) -> frozenset[str]:
  """Returns the BM25 terms of `text` (`keyword.tokenize`: case-folded words, CJK by character)."""
  return frozenset(keyword.tokenize(text))


def positives(query: str, product_words: list[frozenset[str]]) -> list[int]:
  """Returns the positions of the products (by their word sets) that hold every word of `query`."""
  need = words(query)
  if not need:
    return []
  return [j for j, have in enumerate(product_words) if need <= have]
