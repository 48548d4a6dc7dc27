"""Keyword search (BM25) over product text, and its fusion with a learned ranking (hybrid search).

BM25 is the baseline a search team already has: every learned row is reported beside it, on the same
queries, and a hybrid row fuses the learned ranking with it per query.

Tokenisation (the same for products and queries, any language): Unicode NFKC, case-folded, split into
runs of letters and digits (`\\w` without `_`), and each character of a script written without spaces
(Chinese, Japanese, Thai, ... — `catalog.UNSPACED`) is a token of its own, so CJK text matches by
character as the sparsity bins count it. No stemming and no stop words: both are language-specific.
Scoring is Lucene's BM25 (k1=1.2, b=0.75) from `bm25s`, over title + description + attributes
(`catalog.product_text`).

Fusion (`fuse`): per query, the union of both systems' top-k candidates; each system's scores are
z-normalised over its own list (a candidate it did not return gets its list's lowest score), and
`weight * z_learned + (1 - weight) * z_bm25` ranks the union. Reciprocal-rank fusion (`method="rrf"`)
is the score-free alternative. `tune_fusion` picks the method and weight on validation queries, by the mean of
their Recall@100 and NDCG@10 (`metrics.selection_score`, what the ablation's other choices on validation queries
rank by too).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Mapping, Sequence

import numpy as np

from mmr_jax.data import catalog
from mmr_jax.evals import metrics as metrics_lib

K1, B = 1.2, 0.75
RRF_K = 60  # reciprocal-rank fusion's rank offset (Cormack et al. 2009)
FUSION_WEIGHTS = tuple(round(w, 2) for w in np.linspace(0.1, 0.9, 9))

_TOKEN = re.compile(f"[{catalog.UNSPACED}]|[^\\W_{catalog.UNSPACED}]+")


def tokenize(text: str) -> list[str]:
  """Returns the BM25 terms of `text` (see the module docstring)."""
  return _TOKEN.findall(unicodedata.normalize("NFKC", text).casefold())


class BM25:
  """BM25 over a list of documents; `search` returns padded top-k rankings like `index.exact_search`."""

  def __init__(self, docs: Sequence[str]):
    import bm25s  # pylint: disable=g-import-not-at-top  # scipy-only; loaded only where keyword search runs
    self.num_docs = len(docs)
    if not self.num_docs:
      raise ValueError("BM25 needs at least one document")
    self._bm25 = bm25s.BM25(k1=K1, b=B, method="lucene")
    # An empty document still needs a row: the empty token keeps its term list non-empty.
    self._bm25.index([tokenize(d) or [""] for d in docs], show_progress=False)

  def scores(self, query: str) -> np.ndarray:
    """Returns float32 [num_docs] BM25 scores of one query (all zero when no term occurs in the catalogue)."""
    terms = [t for t in tokenize(query) if t in self._bm25.vocab_dict]
    if not terms:
      return np.zeros(self.num_docs, np.float32)
    return np.asarray(self._bm25.get_scores(terms), np.float32)

  def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Returns (idx int64 [Q, k], scores float32 [Q, k]), best first, ties by lower index.

    Only documents sharing a term with the query are returned; the rest of a row is padding
    (-1, -inf), as a keyword engine returns no result for a query none of whose words occur.
    """
    idx = np.full((len(queries), k), -1, np.int64)
    out = np.full((len(queries), k), -np.inf, np.float32)
    for i, q in enumerate(queries):
      s = self.scores(q)
      hit = np.flatnonzero(s > 0)
      top = hit[np.lexsort((hit, -s[hit]))][:k]
      idx[i, :len(top)] = top
      out[i, :len(top)] = s[top]
    return idx, out


def _znorm(scores: np.ndarray) -> np.ndarray:
  """Returns each row's finite scores z-normalised over that row (padding stays -inf)."""
  ok = np.isfinite(scores)
  s = np.where(ok, scores, 0.0).astype(np.float64)
  n = np.maximum(ok.sum(axis=1, keepdims=True), 1)
  mean = s.sum(axis=1, keepdims=True) / n
  std = np.sqrt((np.where(ok, s - mean, 0.0) ** 2).sum(axis=1, keepdims=True) / n)
  z = (s - mean) / np.where(std > 0, std, 1.0)
  return np.where(ok, z, -np.inf)


def fuse(a_idx: np.ndarray, a_scores: np.ndarray, b_idx: np.ndarray, b_scores: np.ndarray, *,
         weight: float, method: str = "zscore", k: int | None = None) -> np.ndarray:
  """Returns int64 [Q, k] rankings fusing ranking `a` (weight `weight`) with ranking `b` (1 - weight).

  Rankings are [Q, K] product indexes padded with -1 and their scores (higher is better).
  `method`: "zscore" (scores z-normalised per query and list) or "rrf" (reciprocal rank).
  """
  if method not in ("zscore", "rrf"):
    raise ValueError(f"fusion method {method!r}; expected 'zscore' or 'rrf'")
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"fusion weight {weight} not in [0, 1]")
  a_idx, b_idx = np.asarray(a_idx), np.asarray(b_idx)
  k = k or max(a_idx.shape[1], b_idx.shape[1])
  if method == "zscore":
    za, zb = _znorm(np.asarray(a_scores)), _znorm(np.asarray(b_scores))
  else:
    rank = lambda x: np.where(x >= 0, 1.0 / (RRF_K + 1 + np.arange(x.shape[1])), -np.inf)  # noqa: E731
    za, zb = rank(a_idx), rank(b_idx)
  out = np.full((a_idx.shape[0], k), -1, np.int64)
  for q in range(a_idx.shape[0]):
    cand: dict[int, list[float]] = {}
    lists = ((a_idx[q], za[q], weight), (b_idx[q], zb[q], 1.0 - weight))
    for j, (ids, z, _) in enumerate(lists):
      for p, v in zip(ids, z):
        if p >= 0:
          cand.setdefault(int(p), [np.nan, np.nan])[j] = float(v)
    if not cand:
      continue
    floor = [float(np.min(z[ids >= 0])) if (ids >= 0).any() else 0.0 for ids, z, _ in lists]
    if method == "rrf":
      floor = [0.0, 0.0]  # a list that misses a candidate adds nothing for it
    ids = np.fromiter(cand, np.int64, len(cand))
    vals = np.asarray(list(cand.values()))
    vals = np.where(np.isnan(vals), np.asarray(floor)[None, :], vals)
    fused = weight * vals[:, 0] + (1.0 - weight) * vals[:, 1]
    order = np.lexsort((ids, -fused))[:k]
    out[q, :len(order)] = ids[order]
  return out


def tune_fusion(a_idx, a_scores, b_idx, b_scores, labels: Sequence[Mapping[int, float]],
                weights: Sequence[float] = FUSION_WEIGHTS) -> dict:
  """Returns {"method", "weight", "score", "recall@100", "ndcg@10"}: the fusion of `a` and `b` whose ranking of
  `labels`' queries has the best `metrics.selection_score` (the mean of Recall@100 and NDCG@10).

  Ties go to the earlier grid point (z-score before RRF, lower weight first).
  """
  depth = 100  # SELECTION_METRICS' recall@100
  best = None
  for method in ("zscore", "rrf"):
    for w in weights:
      ranked = fuse(a_idx, a_scores, b_idx, b_scores, weight=w, method=method)
      ranked = np.pad(ranked, ((0, 0), (0, max(0, depth - ranked.shape[1]))), constant_values=-1)  # short lists miss
      m = metrics_lib.compute_metrics(ranked, labels, ks=(depth,), ndcg_ks=(10,))
      m = {k: float(m[k]) for k in metrics_lib.SELECTION_METRICS}
      score = metrics_lib.selection_score(m)
      score = -1.0 if np.isnan(score) else score
      if best is None or score > best["score"]:
        best = {"method": method, "weight": float(w), "score": score, **m}
  return best
