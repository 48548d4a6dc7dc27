"""Retrieval evaluation of any embedding functions: search the catalogue, score the rankings.

`evaluate_embeddings` works on embedding matrices alone (any model, not only this project's): ScaNN ranking
(what serving returns) and exact ranking (the reference), Recall@10/50/100 (E-labelled products relevant),
NDCG@10 with ESCI gains, MRR, ScaNN's recall against exact search, breakdowns by query tag and by the
text sparsity of the query's relevant products, and BM25 / hybrid rows beside the learned one.
`RetrievalEvaluator` is the same measure as a plug-in the trainer runs on the validation queries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Callable, Mapping, Sequence

import numpy as np

from mmr_jax.data import pipeline
from mmr_jax.data import tfds_builder
from mmr_jax.evals import embedding
from mmr_jax.evals import index as index_lib
from mmr_jax.evals import keyword
from mmr_jax.evals import metrics as metrics_lib
from mmr_jax import sharding as shd

log = logging.getLogger("mmr_jax.evals.retrieval")

EVAL_SPLITS = ("test", "test_novel_query", "test_novel_product")
FUSION_SPLIT = "validation"  # where the hybrid's fusion weight is chosen
K_MAX = 100


def query_groups(tags: Sequence[Sequence[str]], labels: Sequence[Mapping[int, float]],
                 product_sparse: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Returns ({tag: mask}, {sparsity bin: mask}) over queries.

  A query falls in the `sparse_products` bin when most of its E products have sparse text, `dense_products`
  otherwise (queries without E products are in neither).
  """
  q = len(tags)
  tag_groups: dict[str, np.ndarray] = {}
  for i, ts in enumerate(tags):
    for t in ts:
      tag_groups.setdefault(str(t), np.zeros(q, bool))[i] = True
  sparse = np.zeros(q, bool)
  dense = np.zeros(q, bool)
  for i, lab in enumerate(labels):
    e = [p for p, g in lab.items() if g >= metrics_lib.GAIN_E]
    if not e:
      continue
    if np.mean(product_sparse[e]) > 0.5:
      sparse[i] = True
    else:
      dense[i] = True
  return dict(sorted(tag_groups.items())), {"sparse_products": sparse, "dense_products": dense}


def sparse_threshold(num_words: np.ndarray, quantile: float = 0.25) -> float:
  """Returns the word count at or below which a product's text counts as sparse (a catalogue quantile).

  A quantile, not a fixed count, so the bins mean the same on any catalogue, whatever its language and style.
  """
  return float(np.quantile(num_words, quantile))


# The headline metrics kept per query (the ablation's margins and their confidence intervals pair them by query).
PER_QUERY_KEYS = ("recall@100", "ndcg@10")


def score_ranking(ranked: np.ndarray, labels, tag_groups: Mapping[str, np.ndarray],
                  sparsity_groups: Mapping[str, np.ndarray], ks: Sequence[int], ndcg_k: int) -> dict:
  """Returns {"overall", "by_tag", "by_sparsity", "per_query"} metrics of one ranking [Q, K] (any search system).

  "per_query": {metric: [Q] list, NaN where undefined} for the `PER_QUERY_KEYS` the ranking is long enough for.
  """
  per_q = metrics_lib.per_query_metrics(ranked, labels, ks=ks, ndcg_ks=(ndcg_k,))
  return {"overall": metrics_lib.aggregate(per_q), "by_tag": metrics_lib.breakdown(per_q, tag_groups),
          "by_sparsity": metrics_lib.breakdown(per_q, sparsity_groups),
          "per_query": {m: [round(float(v), 6) for v in per_q[m]] for m in PER_QUERY_KEYS if m in per_q}}


def query_fingerprint(labels: Sequence[Mapping[int, float]]) -> str:
  """Returns a short hash of a split's queries (their labelled products and gains, in order): two rankings' per-query
  values pair up only when they score the same queries in the same order."""
  h = hashlib.sha256()
  for lab in labels:
    h.update(json.dumps(sorted((int(p), float(g)) for p, g in lab.items())).encode() + b"\n")
  return h.hexdigest()[:16]


def evaluate_embeddings(product_emb: np.ndarray, queries: Mapping[str, dict], product_num_words: np.ndarray,
                        *, k: int = K_MAX, scann_params: Mapping | None = None, index=None,
                        sparse_quantile: float = 0.25, keyword_rankings: Mapping[str, tuple] | None = None,
                        fusion_split: str = FUSION_SPLIT) -> dict:
  """Returns metrics for every split in `queries` ({split: {"emb", "labels", "tags"}}).

  `index`: a prebuilt ScannIndex over product_emb (else one is built). Per split: "overall", "by_tag",
  "by_sparsity" (ScaNN ranking: what serving returns), "exact", "by_tag_exact", "by_sparsity_exact" (exact
  ranking: the model's own quality), "scann_recall_vs_exact" (recall@k of ScaNN's top k against exact top k),
  "per_query_exact" (the exact ranking's `PER_QUERY_KEYS` per query) and "query_groups" (the queries' fingerprint
  and each tag's and sparsity bin's query indexes), so rows can be compared query by query.
  ScaNN trains its partitions and quantiser with randomness it does not let us seed: the same embeddings
  rank differently from one build to the next (on a few thousand products, a point or two of recall@100),
  so compare models by the exact ranking (the ablation does) and the index by its recall against it.

  `keyword_rankings` ({split: (idx [Q, k], scores [Q, k])}, e.g. `keyword.BM25.search`): each split also
  gets "bm25" (that ranking) and "hybrid" (the exact ranking fused with it, `keyword.fuse`), each with
  "overall", "by_tag" and "by_sparsity". The fusion is tuned on `fusion_split` when it is among the
  queries (recorded as results["fusion"]), else z-score fusion with weight 0.5.
  """
  n = product_emb.shape[0]
  if index is None:
    index = index_lib.ScannIndex.build(product_emb, scann_params)
  thr = sparse_threshold(product_num_words, sparse_quantile)
  product_sparse = product_num_words <= thr
  # Rankings are k long whatever the catalogue size: past the last product they are padded with -1 (a
  # miss), so on a catalogue of fewer than k products recall@k is over the whole catalogue (every
  # judged query finds all its E products) and the keys are the same on every catalogue.
  k_found = min(k, n)  # what a search can return
  out = {"num_products": int(n), "k": int(k_found), "sparse_words_threshold": thr, "index": index.config(),
         "splits": {}}
  ks = tuple(x for x in (10, 50, 100) if x <= k) or (k,)
  ndcg_k = min(10, k)
  searched = {}
  for split, q in queries.items():
    if len(q["labels"]) == 0:
      log.warning("split %s has no queries; skipped", split)
      continue
    t0 = time.time()
    idx, scores = index.search(q["emb"], k)
    t_scann = time.time() - t0
    t0 = time.time()
    exact_idx, exact_scores = index_lib.exact_search(q["emb"], product_emb, k)
    searched[split] = (idx, t_scann, exact_idx, exact_scores, time.time() - t0)
  if keyword_rankings is not None:
    if fusion_split in searched:
      _, _, e_idx, e_scores, _ = searched[fusion_split]
      out["fusion"] = dict(keyword.tune_fusion(e_idx, e_scores, *keyword_rankings[fusion_split],
                                               queries[fusion_split]["labels"]), tuned_on=fusion_split)
    else:
      log.warning("no %s queries to tune the hybrid's fusion on: z-score fusion with weight 0.5", fusion_split)
      out["fusion"] = {"method": "zscore", "weight": 0.5, "tuned_on": None}
  for split, (approx_idx, t_scann, exact_idx, exact_scores, t_exact) in searched.items():
    q = queries[split]
    tags, bins = query_groups(q["tags"], q["labels"], product_sparse)
    approx = score_ranking(approx_idx, q["labels"], tags, bins, ks, ndcg_k)
    exact = score_ranking(exact_idx, q["labels"], tags, bins, ks, ndcg_k)
    r = out["splits"][split] = {
        "overall": approx["overall"],
        "exact": exact["overall"],
        "by_tag": approx["by_tag"],
        "by_tag_exact": exact["by_tag"],
        "by_sparsity": approx["by_sparsity"],
        "by_sparsity_exact": exact["by_sparsity"],
        "scann_recall_vs_exact": index_lib.recall_vs_exact(approx_idx, exact_idx, k_found),
        "search_s": {"scann": t_scann, "exact": t_exact},
        "recall_curve": _recall_curve(approx_idx, exact_idx, q["labels"], k_found),
        "per_query_exact": exact["per_query"],
        "query_groups": {"fingerprint": query_fingerprint(q["labels"]),
                         "by_tag": {t: np.flatnonzero(m).tolist() for t, m in tags.items()},
                         "by_sparsity": {t: np.flatnonzero(m).tolist() for t, m in bins.items()}},
    }
    if keyword_rankings is not None:
      kw_idx, kw_scores = keyword_rankings[split]
      r["bm25"] = score_ranking(kw_idx, q["labels"], tags, bins, ks, ndcg_k)
      fused = keyword.fuse(exact_idx, exact_scores, kw_idx, kw_scores, weight=out["fusion"]["weight"],
                           method=out["fusion"]["method"], k=k)
      r["hybrid"] = score_ranking(fused, q["labels"], tags, bins, ks, ndcg_k)
  return out


PER_QUERY_FIELDS = ("per_query_exact", "query_groups")  # a split's per-query fields; bm25 / hybrid: "per_query"


def split_per_query(results: dict) -> tuple[dict, dict]:
  """Returns (`results` without its per-query fields, {split: those fields}): `evaluate` writes the first as
  metrics.json (the summary sweeps and status read) and the second as metrics_per_query.json. `join_per_query`
  undoes it."""
  summary = json.loads(json.dumps(results, default=float))  # a deep copy
  per_query = {}
  for split, r in summary.get("splits", {}).items():
    pq = {f: r.pop(f) for f in PER_QUERY_FIELDS if f in r}
    pq.update({f"{system}_per_query": r[system].pop("per_query") for system in ("bm25", "hybrid")
               if "per_query" in r.get(system, {})})
    if pq:
      per_query[split] = pq
  return summary, per_query


def join_per_query(summary: dict, per_query: dict) -> dict:
  """Returns `summary` (metrics.json) with metrics_per_query.json's fields put back where `evaluate_embeddings` had
  them."""
  out = json.loads(json.dumps(summary, default=float))
  for split, pq in per_query.items():
    r = out.get("splits", {}).get(split)
    if r is None:
      continue
    for f, v in pq.items():
      system = f[:-len("_per_query")] if f.endswith("_per_query") else None
      if system is None:
        r[f] = v
      elif system in r:
        r[system]["per_query"] = v
  return out


def _recall_curve(approx_idx, exact_idx, labels, k) -> dict:
  ks = sorted({1, 2, 5, 10, 20, 50, 100, k} & set(range(1, k + 1)))
  pa = metrics_lib.per_query_metrics(approx_idx, labels, ks=ks, ndcg_ks=(1,))
  pe = metrics_lib.per_query_metrics(exact_idx, labels, ks=ks, ndcg_ks=(1,))
  return {"k": ks, "scann": [metrics_lib.aggregate(pa)[f"recall@{x}"] for x in ks],
          "exact": [metrics_lib.aggregate(pe)[f"recall@{x}"] for x in ks]}


def retrieval_metrics(embed_queries: Callable[[dict], np.ndarray], embed_products: Callable[[dict], np.ndarray],
                      data_dir: str, data_config, split: str = FUSION_SPLIT, batch_size: int = 256,
                      k: int = K_MAX) -> dict[str, float]:
  """Returns {"recall@10", "recall@50", "recall@100", "ndcg@10", "mrr"} of `split`'s queries over the whole
  catalogue, by exact search: the retrieval evaluator the trainer runs every `train.eval_every` steps.

  Works on any embedding functions (batch dict -> [B, D]), like `evaluate_embeddings`.
  """
  q = load_queries(data_dir, split)
  if not q["num"]:
    raise ValueError(f"{data_dir} has no {split} queries to score retrieval on")
  products = pipeline.make_eval_iterator(data_dir, "products", "all", data_config, batch_size)
  prod_emb, _ = embedding.embed_table(embed_products, products, desc=f"{split} retrieval: embed products")
  queries = pipeline.make_eval_iterator(data_dir, "queries", split, data_config, batch_size)
  q_emb, _ = embedding.embed_table(embed_queries, queries, desc=f"{split} queries")
  k = min(k, prod_emb.shape[0])
  ranked, _ = index_lib.exact_search(q_emb, prod_emb, k)
  ks = tuple(x for x in (10, 50, 100) if x <= k) or (k,)
  m = metrics_lib.compute_metrics(ranked, q["labels"], ks=ks, ndcg_ks=(min(10, k),))
  return {key: v for key, v in m.items() if not key.startswith("num_")}


def _str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_queries(data_dir: str, split: str) -> dict:
  """Returns {"labels": [{product_index: gain}], "tags": [[str]], "text": [str], "num": Q} for a queries split."""
  src = tfds_builder.load_source(data_dir, "queries", split)
  idx, grades, tags, texts = [], [], [], []
  for i in range(len(src)):
    row = src[i]
    idx.append(np.asarray(row["relevant_index"]))
    grades.append(np.asarray(row["relevant_grade"]))
    tags.append([_str(t) for t in row["tags"]])
    texts.append(_str(row["text"]))
  return {"labels": metrics_lib.labels_from_arrays(idx, grades), "tags": tags, "text": texts, "num": len(src)}


def load_products(data_dir: str) -> tuple[np.ndarray, list[str]]:
  """Returns (num_words int64 [N], product texts [N]) of the catalogue, in product-index order."""
  src = tfds_builder.load_source(data_dir, "products", "all")
  rows = [src[i] for i in range(len(src))]
  return np.asarray([int(r["num_words"]) for r in rows], np.int64), [_str(r["text"]) for r in rows]


def bm25_rankings(product_texts: Sequence[str], queries: Mapping[str, dict],
                  k: int = K_MAX) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Returns {split: BM25 (idx [Q, k], scores [Q, k])} for queries carrying "text"."""
  bm25 = keyword.BM25(product_texts)
  return {split: bm25.search(q["text"], k) for split, q in queries.items()}


class RetrievalEvaluator:
  """`retrieval_metrics` of one queries split as a trainer plug-in: `run(params)` -> {"val/ndcg@10": ...}.

  Holds one `Embedder` for the run, so its jitted functions compile once however often it runs. The
  caller runs it inside its mesh and logical-axis-rules context (the model's sharding annotations need both).
  """

  METRICS = ("recall@10", "recall@50", "recall@100", "ndcg@10", "mrr")

  def __init__(self, config, model, mesh, split: str = FUSION_SPLIT, batch_size: int = 256, prefix: str = "val/"):
    self.config, self.split, self.prefix = config, split, prefix
    self._embedder = embedding.Embedder(config=config, model=model, params=None, step=0, mesh=mesh)
    self.batch_size = shd.data_parallel_batch(batch_size, mesh)

  def metric_names(self) -> set[str]:
    return {self.prefix + k for k in self.METRICS}

  def run(self, params) -> dict[str, float]:
    self._embedder.params = params
    m = retrieval_metrics(self._embedder.embed_queries, self._embedder.embed_products, self.config.data.dir,
                          self.config.data, self.split, self.batch_size)
    return {self.prefix + k: v for k, v in m.items()}
