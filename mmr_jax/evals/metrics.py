"""Retrieval metrics over ranked product lists (pure numpy; works on any ranking).

Conventions shared with `index.py` and `evaluate.py`:
- `ranked [Q, K]` int: product indexes per query, best first, padded with -1 (a padded slot
  is a miss). A product may appear at most once per row.
- `labels`: one entry per query, either a mapping {product_index: gain} or a sequence of
  (product_index, gain) pairs. Gains follow ESCI (E 1.0 / S 0.1 / C 0.01 / I 0); products
  without a label have gain 0. A product is *relevant* (for recall / MRR) when its gain is
  >= `relevant_gain` (default 1.0, i.e. Exact).
- Ties among equal scores are broken by the search functions (lower product index first,
  see `index.exact_search`); metrics take the ranking as given.

Per-query values are returned alongside the averages (`per_query_metrics`) so that any
breakdown (query tag, sparsity bin, novel products) is an exact average over its queries,
not an average of averages, and two systems on the same queries can be compared query by query
(`paired_bootstrap`: the difference's confidence interval).

Undefined per-query values are NaN and excluded from averages:
- recall@k and MRR: queries with no relevant (E) product;
- nDCG@k: queries whose ideal DCG@k is 0 (no positive gain at all).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

import numpy as np

GAIN_E = 1.0
GAIN_S = 0.1
GAIN_C = 0.01
GAIN_I = 0.0
ESCI_GAINS = {"E": GAIN_E, "S": GAIN_S, "C": GAIN_C, "I": GAIN_I}

QueryLabels = Union[Mapping[int, float], Sequence[tuple[int, float]]]

DEFAULT_KS = (10, 50, 100)
DEFAULT_NDCG_KS = (10,)
# What the ablation's choices on validation queries rank by (its chosen rows, the hybrid's learned row, the hybrid's
# fusion method and weight): the mean of these. Either alone can pick badly: NDCG@10 a ranking that orders the top
# ten well and finds fewer of the relevant products in the hundred a re-ranker or a shopper scrolls through,
# Recall@100 one that finds them and orders the top badly.
SELECTION_METRICS = ("recall@100", "ndcg@10")


def _flatten_labels(labels: Sequence[QueryLabels], num_queries: int):
  """Returns (query_row [M], product [M], gain [M]) flattened, validated labels."""
  if len(labels) != num_queries:
    raise ValueError(
        f"labels has {len(labels)} entries but ranked has {num_queries} rows (one per query)")
  rows, prods, gains = [], [], []
  for q, lab in enumerate(labels):
    items = lab.items() if isinstance(lab, Mapping) else lab
    seen = set()
    for item in items:
      try:
        p, g = item
      except (TypeError, ValueError) as e:
        raise ValueError(f"labels[{q}]: expected (product_index, gain) pairs, got {item!r}") from e
      p = int(p)
      g = float(g)
      if p < 0:
        raise ValueError(f"labels[{q}]: negative product index {p}")
      if not np.isfinite(g) or g < 0:
        raise ValueError(f"labels[{q}]: gain for product {p} must be finite and >= 0, got {g}")
      if p in seen:
        raise ValueError(f"labels[{q}]: product {p} is labelled more than once")
      seen.add(p)
      rows.append(q)
      prods.append(p)
      gains.append(g)
  return (np.asarray(rows, np.int64), np.asarray(prods, np.int64),
          np.asarray(gains, np.float64))


def _validate_ranked(ranked) -> np.ndarray:
  """Returns `ranked` as int64 [Q, K] after checking padding and duplicates."""
  ranked = np.asarray(ranked)
  if ranked.ndim != 2:
    raise ValueError(f"ranked must be [num_queries, K], got shape {ranked.shape}")
  if ranked.size and not np.issubdtype(ranked.dtype, np.integer):
    raise ValueError(f"ranked must hold integer product indexes, got dtype {ranked.dtype}")
  ranked = ranked.astype(np.int64)
  if ranked.size and ranked.min() < -1:
    row = int(np.nonzero((ranked < -1).any(axis=1))[0][0])
    raise ValueError(f"ranked[{row}] has an index < -1 (only -1 is allowed, as padding)")
  if ranked.shape[1] > 1:
    s = np.sort(ranked, axis=1)
    dup = (s[:, 1:] == s[:, :-1]) & (s[:, 1:] >= 0)
    if dup.any():
      row = int(np.nonzero(dup.any(axis=1))[0][0])
      raise ValueError(f"ranked[{row}] lists a product more than once")
  return ranked


def _gain_matrix(ranked, rows, prods, gains) -> np.ndarray:
  """Returns gain [Q, K] of every ranked slot (0 for unlabelled or padding)."""
  num_q, k = ranked.shape
  out = np.zeros((num_q, k), np.float64)
  if rows.size == 0 or ranked.size == 0:
    return out
  # One sorted key per (query, product) turns the lookup into a single searchsorted.
  width = int(max(prods.max(), ranked.max())) + 2
  label_keys = rows * width + prods
  order = np.argsort(label_keys)
  label_keys, label_gains = label_keys[order], gains[order]
  slot_keys = np.arange(num_q, dtype=np.int64)[:, None] * width + ranked
  pos = np.searchsorted(label_keys, slot_keys)
  pos_c = np.minimum(pos, label_keys.size - 1)
  hit = (label_keys[pos_c] == slot_keys) & (ranked >= 0)
  out[hit] = label_gains[pos_c[hit]]
  return out


def per_query_metrics(ranked,
                      labels: Sequence[QueryLabels],
                      ks: Sequence[int] = DEFAULT_KS,
                      ndcg_ks: Sequence[int] = DEFAULT_NDCG_KS,
                      relevant_gain: float = GAIN_E) -> dict[str, np.ndarray]:
  """Returns {metric: [Q] float64} per-query values (NaN where undefined, see module doc).

  Keys: `recall@k` for k in ks, `ndcg@k` for k in ndcg_ks, `mrr`, and the counts
  `num_relevant` (E products labelled) and `ideal_dcg_positive` (bool as float) used
  to tell which queries are judged.

  recall@k = |relevant in top k| / |relevant| (so it stays < 1 when a query has more
  relevant products than k). nDCG@k uses DCG = sum_i gain_i / log2(i + 1), i = 1-based
  rank, and the ideal DCG from the query's own labels sorted by gain. MRR is over the
  whole ranked row (cut off at K).
  """
  ranked = _validate_ranked(ranked)
  num_q, width = ranked.shape
  if width < 1:
    raise ValueError("ranked has no columns: retrieve at least one product per query")
  for k in tuple(ks) + tuple(ndcg_ks):
    if int(k) < 1:
      raise ValueError(f"cutoffs must be >= 1, got {k}")
    if int(k) > width:
      # Silently scoring recall@100 on a top-50 list would understate it.
      raise ValueError(f"cutoff {k} exceeds the ranked list length {width}; retrieve >= {k}")
  rows, prods, gains = _flatten_labels(labels, num_q)

  gain = _gain_matrix(ranked, rows, prods, gains)  # [Q, K]
  is_rel = gain >= relevant_gain  # [Q, K]
  num_rel = np.bincount(rows[gains >= relevant_gain], minlength=num_q).astype(np.float64)
  judged = num_rel > 0

  out: dict[str, np.ndarray] = {}
  hits_cum = np.cumsum(is_rel, axis=1)  # [Q, K]
  for k in ks:
    with np.errstate(invalid="ignore", divide="ignore"):
      out[f"recall@{k}"] = np.where(judged, hits_cum[:, k - 1] / num_rel, np.nan)

  discount = 1.0 / np.log2(np.arange(2, width + 2, dtype=np.float64))  # [K]
  dcg_cum = np.cumsum(gain * discount, axis=1)  # [Q, K]
  # Ideal gains per query, sorted descending, padded with zeros to the longest cutoff.
  max_ndcg_k = max(ndcg_ks) if len(ndcg_ks) else 0
  ideal = np.zeros((num_q, max(max_ndcg_k, 1)), np.float64)
  if rows.size:
    order = np.lexsort((-gains, rows))
    r_sorted, g_sorted = rows[order], gains[order]
    starts = np.searchsorted(r_sorted, np.arange(num_q))
    rank_in_q = np.arange(r_sorted.size) - starts[r_sorted]
    keep = rank_in_q < ideal.shape[1]
    ideal[r_sorted[keep], rank_in_q[keep]] = g_sorted[keep]
  ideal_cum = np.cumsum(ideal * discount[:ideal.shape[1]], axis=1)
  for k in ndcg_ks:
    idcg = ideal_cum[:, k - 1]
    with np.errstate(invalid="ignore", divide="ignore"):
      out[f"ndcg@{k}"] = np.where(idcg > 0, dcg_cum[:, k - 1] / idcg, np.nan)

  any_rel = is_rel.any(axis=1)
  first = np.argmax(is_rel, axis=1)  # first True, 0 when none
  rr = np.where(any_rel, 1.0 / (first + 1.0), 0.0)
  out["mrr"] = np.where(judged, rr, np.nan)

  out["num_relevant"] = num_rel
  out["ideal_dcg_positive"] = (np.bincount(rows[gains > 0], minlength=num_q) > 0).astype(np.float64)
  return out


_COUNT_KEYS = ("num_relevant", "ideal_dcg_positive")


def aggregate(per_query: Mapping[str, np.ndarray], mask=None) -> dict[str, float]:
  """Returns {metric: mean over defined queries} plus `num_queries` and `num_judged`.

  `mask [Q]` bool restricts the average to a subset (exact: averages per-query values).
  `num_queries` counts queries in the subset, `num_judged` those with >= 1 relevant
  product (the denominator of recall and MRR). Metrics with no defined value are NaN.
  """
  sizes = {v.shape for v in per_query.values()}
  if len(sizes) != 1:
    raise ValueError(f"per-query arrays have different shapes: {sorted(sizes)}")
  (shape,) = sizes
  if mask is None:
    mask = np.ones(shape, bool)
  mask = np.asarray(mask)
  if mask.dtype != bool or mask.shape != shape:
    raise ValueError(f"mask must be bool of shape {shape}, got {mask.dtype} {mask.shape}")
  out: dict[str, float] = {}
  for name, values in per_query.items():
    if name in _COUNT_KEYS:
      continue
    v = values[mask]
    v = v[~np.isnan(v)]
    out[name] = float(v.mean()) if v.size else float("nan")
  out["num_queries"] = int(mask.sum())
  if "num_relevant" in per_query:
    out["num_judged"] = int((per_query["num_relevant"][mask] > 0).sum())
  return out


def compute_metrics(ranked,
                    labels: Sequence[QueryLabels],
                    ks: Sequence[int] = DEFAULT_KS,
                    ndcg_ks: Sequence[int] = DEFAULT_NDCG_KS,
                    relevant_gain: float = GAIN_E) -> dict[str, float]:
  """Returns {"recall@k"..., "ndcg@k"..., "mrr", "num_queries", "num_judged"} averages.

  See `per_query_metrics` for definitions; use it plus `breakdown` for subsets.
  """
  return aggregate(per_query_metrics(ranked, labels, ks, ndcg_ks, relevant_gain))


def selection_score(m: Mapping[str, float]) -> float:
  """Returns the mean of `m`'s SELECTION_METRICS (NaN when one is undefined, e.g. no judged query)."""
  return float(np.mean([m[k] for k in SELECTION_METRICS]))


def breakdown(per_query: Mapping[str, np.ndarray],
              groups: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
  """Returns {group name: aggregate(...) over the queries where that group's mask is True}."""
  out = {}
  for name, mask in groups.items():
    try:
      out[name] = aggregate(per_query, mask)
    except ValueError as e:
      raise ValueError(f"breakdown group {name!r}: {e}") from e
  return out


def paired_bootstrap(a, b, *, level: float = 0.95, num_resamples: int = 2000, seed: int = 0) -> dict:
  """Returns how far apart two systems are on the same queries: mean(a - b) and its confidence interval.

  `a`, `b` [Q]: per-query values of one metric (`per_query_metrics`) for two rankings of the same queries, in
  the same order; queries where either is NaN (undefined) are left out. The interval is the percentile
  bootstrap over queries (resampled with replacement, the same draw for both systems: paired), the usual
  test in IR evaluation. A difference whose interval holds 0 is not told apart from which queries happened
  to be sampled. Deterministic: the resamples come from `seed`.

  Returns {"mean", "low", "high", "num_queries"} (the first three NaN when no query is defined in both).
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired_bootstrap needs two [Q] arrays of the same queries, got shapes {a.shape} and {b.shape}")
  if not 0 < level < 1:
    raise ValueError(f"level must lie in (0, 1), got {level}")
  d = (a - b)[~(np.isnan(a) | np.isnan(b))]
  if not d.size:
    return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "num_queries": 0}
  draws = np.random.default_rng(seed).integers(0, d.size, size=(int(num_resamples), d.size))
  means = d[draws].mean(axis=1)
  tail = 100 * (1 - level) / 2
  low, high = np.percentile(means, [tail, 100 - tail])
  return {"mean": float(d.mean()), "low": float(low), "high": float(high), "num_queries": int(d.size)}


def labels_from_arrays(relevant_index: Sequence, relevant_grade: Sequence) -> list[dict[int, float]]:
  """Returns per-query {product_index: gain} from the queries table's parallel sequences."""
  if len(relevant_index) != len(relevant_grade):
    raise ValueError(f"relevant_index has {len(relevant_index)} queries but relevant_grade "
                     f"has {len(relevant_grade)}")
  out = []
  for q, (idx, grade) in enumerate(zip(relevant_index, relevant_grade)):
    idx = np.asarray(idx).reshape(-1)
    grade = np.asarray(grade).reshape(-1)
    if idx.shape != grade.shape:
      raise ValueError(f"query {q}: relevant_index has {idx.size} entries, relevant_grade {grade.size}")
    lab = {int(i): float(g) for i, g in zip(idx, grade)}
    if len(lab) != idx.size:
      raise ValueError(f"query {q}: relevant_index lists a product more than once")
    out.append(lab)
  return out


def headline_keys(flat_keys: Sequence[str]) -> list[str]:
  """Returns the keys of a flattened ("a/b/c") metrics.json worth a headline, in order.

  evaluate.py writes `splits/<split>/overall/<metric>`: the test split's overall metrics first (else
  another split's), then a top-level `overall/<metric>` layout, else the top-level scalars.
  """
  splits = sorted({k.split("/")[1] for k in flat_keys if k.startswith("splits/") and k.count("/") == 3},
                  key=lambda s: (s != "test", s))
  for prefix in [f"splits/{s}/overall/" for s in splits] + ["overall/"]:
    head = [k for k in flat_keys if k.startswith(prefix) and "/" not in k[len(prefix):]]
    if head:
      return head
  return [k for k in flat_keys if "/" not in k]


def flatten(d: Mapping, sep: str = "/", prefix: str = "", keep_empty: bool = False) -> dict:
  """Returns a nested dict (metrics.json, config.json) as {"a/b/c": leaf} (`sep` between the keys).

  An empty dict leaves no key, unless `keep_empty` makes it a leaf of its own (a summary that shows
  every field, `tools/status.py`).
  """
  out = {}
  for k, v in d.items():
    key = f"{prefix}{sep}{k}" if prefix else str(k)
    if isinstance(v, Mapping) and (v or not keep_empty):
      out.update(flatten(v, sep, key, keep_empty))
    else:
      out[key] = v
  return out
