r"""Retrieval evaluation: embed the catalogue, search it with ScaNN (and exactly), score the rankings.

  python -m mmr_jax.evaluate --workdir DIR [--data DATA_DIR] [--split test]

Writes into the workdir: metrics.json, metrics.md (tables), recall_at_k.png, and the ScaNN index
(index/, ScaNN's own serialisation, reusable by export). The core, `evaluate_embeddings`, works on any
embedding matrices, so it serves any model, not only this project's.

Reported: Recall@10/50/100 (E-labelled products relevant), NDCG@10 with ESCI gains, MRR — from the
ScaNN ranking (what serving returns) and from exact search (the reference), ScaNN's recall@100 against
exact search, and breakdowns by query tag and by the text sparsity of the query's relevant products.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from etils import epath

from mmr_jax import fileio
from mmr_jax import index as index_lib
from mmr_jax import keyword
from mmr_jax import metrics as metrics_lib

log = logging.getLogger("mmr_jax.evaluate")

EVAL_SPLITS = ("test", "test_novel_query", "test_novel_product")
FUSION_SPLIT = "validation"  # where the hybrid's fusion weight is chosen
K_MAX = 100


def embed_table(embed_fn: Callable[[dict], np.ndarray], batches: Iterable[dict], total: int | None = None,
                desc: str = "embed") -> tuple[np.ndarray, np.ndarray]:
  """Returns (embeddings [N, D] float32, row indexes [N]) of the unpadded rows of `batches`.

  Batches carry a `mask` [B] (False on padding rows) and an index key (`product_index` / `query_index`);
  rows are returned sorted by that index, so the result lines up with the table.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  embs, idxs = [], []
  with tqdm(total=total, desc=desc, unit="row", file=sys.stderr, disable=total is not None and total < 1,
            mininterval=1.0) as bar:
    for batch in batches:
      key = "product_index" if "product_index" in batch else "query_index"
      e = np.asarray(embed_fn(batch), np.float32)
      m = np.asarray(batch["mask"], bool)
      idx = np.asarray(batch[key])
      if e.shape[0] != m.shape[0]:
        # Multi-host: the embedding function returned the global batch (every host's rows, in process
        # order); gather the host-local masks and indexes the same way so rows line up.
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        m = np.asarray(multihost_utils.process_allgather(m, tiled=True))
        idx = np.asarray(multihost_utils.process_allgather(idx, tiled=True))
      embs.append(e[m])
      idxs.append(idx[m])
      bar.update(int(m.sum()))
  if not embs:
    raise ValueError(f"{desc}: no rows to embed")
  emb, idx = np.concatenate(embs), np.concatenate(idxs)
  order = np.argsort(idx, kind="stable")
  return emb[order], idx[order]


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


def score_ranking(ranked: np.ndarray, labels, tag_groups: Mapping[str, np.ndarray],
                  sparsity_groups: Mapping[str, np.ndarray], ks: Sequence[int], ndcg_k: int) -> dict:
  """Returns {"overall", "by_tag", "by_sparsity"} metrics of one ranking [Q, K] (any search system)."""
  per_q = metrics_lib.per_query_metrics(ranked, labels, ks=ks, ndcg_ks=(ndcg_k,))
  return {"overall": metrics_lib.aggregate(per_q), "by_tag": metrics_lib.breakdown(per_q, tag_groups),
          "by_sparsity": metrics_lib.breakdown(per_q, sparsity_groups)}


def evaluate_embeddings(product_emb: np.ndarray, queries: Mapping[str, dict], product_num_words: np.ndarray,
                        *, k: int = K_MAX, scann_params: Mapping | None = None, index=None,
                        sparse_quantile: float = 0.25, keyword_rankings: Mapping[str, tuple] | None = None,
                        fusion_split: str = FUSION_SPLIT) -> dict:
  """Returns metrics for every split in `queries` ({split: {"emb", "labels", "tags"}}).

  `index`: a prebuilt ScannIndex over product_emb (else one is built). Per split: "overall" (ScaNN
  ranking), "exact" (exact ranking), "by_tag", "by_sparsity" (ScaNN ranking) and
  "scann_recall_vs_exact" (recall@k of ScaNN's top k against exact top k).

  `keyword_rankings` ({split: (idx [Q, k], scores [Q, k])}, e.g. `keyword.BM25.search`): each split also
  gets "bm25" (that ranking) and "hybrid" (ScaNN's ranking fused with it, `keyword.fuse`), each with
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
    searched[split] = (idx, scores, time.time() - t0)
  if keyword_rankings is not None:
    if fusion_split in searched:
      a_idx, a_scores, _ = searched[fusion_split]
      out["fusion"] = dict(keyword.tune_fusion(a_idx, a_scores, *keyword_rankings[fusion_split],
                                               queries[fusion_split]["labels"]), tuned_on=fusion_split)
    else:
      log.warning("no %s queries to tune the hybrid's fusion on: z-score fusion with weight 0.5", fusion_split)
      out["fusion"] = {"method": "zscore", "weight": 0.5, "tuned_on": None}
  for split, (approx_idx, approx_scores, t_scann) in searched.items():
    q = queries[split]
    t0 = time.time()
    exact_idx, _ = index_lib.exact_search(q["emb"], product_emb, k)
    t_exact = time.time() - t0
    tags, bins = query_groups(q["tags"], q["labels"], product_sparse)
    approx = score_ranking(approx_idx, q["labels"], tags, bins, ks, ndcg_k)
    exact = score_ranking(exact_idx, q["labels"], tags, bins, ks, ndcg_k)
    r = out["splits"][split] = {
        "overall": approx["overall"],
        "exact": exact["overall"],
        "by_tag": approx["by_tag"],
        "by_tag_exact": exact["by_tag"],
        "by_sparsity": approx["by_sparsity"],
        "scann_recall_vs_exact": index_lib.recall_vs_exact(approx_idx, exact_idx, k_found),
        "search_s": {"scann": t_scann, "exact": t_exact},
        "recall_curve": _recall_curve(approx_idx, exact_idx, q["labels"], k_found),
    }
    if keyword_rankings is not None:
      kw_idx, kw_scores = keyword_rankings[split]
      r["bm25"] = score_ranking(kw_idx, q["labels"], tags, bins, ks, ndcg_k)
      fused = keyword.fuse(approx_idx, approx_scores, kw_idx, kw_scores, weight=out["fusion"]["weight"],
                           method=out["fusion"]["method"], k=k)
      r["hybrid"] = score_ranking(fused, q["labels"], tags, bins, ks, ndcg_k)
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
  from mmr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  q = load_queries(data_dir, split)
  if not q["num"]:
    raise ValueError(f"{data_dir} has no {split} queries to score retrieval on")
  prod_emb, _ = embed_table(embed_products, pipeline.make_eval_iterator(data_dir, "products", "all", data_config,
                                                                        batch_size),
                            desc=f"{split} retrieval: embed products")
  q_emb, _ = embed_table(embed_queries, pipeline.make_eval_iterator(data_dir, "queries", split, data_config,
                                                                    batch_size), desc=f"{split} queries")
  k = min(k, prod_emb.shape[0])
  ranked, _ = index_lib.exact_search(q_emb, prod_emb, k)
  ks = tuple(x for x in (10, 50, 100) if x <= k) or (k,)
  m = metrics_lib.compute_metrics(ranked, q["labels"], ks=ks, ndcg_ks=(min(10, k),))
  return {key: v for key, v in m.items() if not key.startswith("num_")}


# ------------------------------------------------------------------------------------------ reports


def markdown_report(results: dict, title: str = "Retrieval metrics") -> str:
  """Returns Markdown tables: one row per split (ScaNN and exact), then per tag and sparsity bin."""
  cols = ["recall@10", "recall@50", "recall@100", "ndcg@10", "mrr"]
  fmt = lambda v: "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}"
  n = results["num_products"]
  small = [c for c in cols if c.startswith("recall@") and int(c.split("@")[1]) >= n]
  note = f" Cutoffs at or past the catalogue size ({', '.join(small)}) rank every product." if small else ""
  params = (results.get("index") or {}).get("params") or {}
  if params.get("brute_force"):
    note += (f" ScaNN searched by brute force (fewer than brute_force_below={params.get('brute_force_below')} "
             "products), so it equals exact search; `--scann '{\"brute_force_below\": 0}'` builds a tree.")
  lines = [f"# {title}", "", f"{n} products; metrics in %; ScaNN recall vs exact at k={results['k']}.{note}",
           "", "| split | search | " + " | ".join(cols) + " | queries | ScaNN recall vs exact |",
           "|---|---|" + "---|" * (len(cols) + 2)]
  fusion = results.get("fusion")
  systems = [("overall", "ScaNN"), ("exact", "exact")]
  if fusion:
    systems += [("bm25", "BM25"), ("hybrid", f"hybrid ({fusion['method']}, learned weight {fusion['weight']:g})")]
  for split, r in results["splits"].items():
    for name, label in systems:
      m = r[name]["overall"] if name in ("bm25", "hybrid") else r[name]
      lines.append(f"| {split} | {label} | " + " | ".join(fmt(m.get(c)) for c in cols) +
                   f" | {m['num_queries']} | {fmt(r['scann_recall_vs_exact']) if name == 'overall' else ''} |")
  if fusion:
    tuned = (f"tuned on the {fusion['tuned_on']} queries by NDCG@10" if fusion.get("tuned_on") else
             "not tuned (no validation queries)")
    lines += ["", f"BM25: keyword search over title + description + attributes (`mmr_jax/keyword.py`). Hybrid: "
              f"the learned ranking fused with BM25's per query, {tuned}."]
  for split, r in results["splits"].items():
    lines += ["", f"## {split}: by query tag and product-text sparsity (ScaNN)", "",
              "| group | " + " | ".join(cols) + " | queries |", "|---|" + "---|" * (len(cols) + 1)]
    for gname, key in (("tag", "by_tag"), ("sparsity", "by_sparsity")):
      for g, m in r[key].items():
        lines.append(f"| {gname}: {g} | " + " | ".join(fmt(m.get(c)) for c in cols) + f" | {m['num_queries']} |")
        for name, label in systems[2:]:
          mm = r[name][key].get(g, {})
          lines.append(f"| {gname}: {g} ({label.split()[0]}) | " + " | ".join(fmt(mm.get(c)) for c in cols) +
                       f" | {mm.get('num_queries', 0)} |")
  return "\n".join(lines) + "\n"


def plot_recall(results: dict, path: str) -> None:
  """Writes a Recall@K plot (ScaNN solid, exact dashed) per split."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for split, r in results["splits"].items():
    c = r["recall_curve"]
    line, = ax.plot(c["k"], c["scann"], marker="o", label=f"{split} (ScaNN)")
    ax.plot(c["k"], c["exact"], linestyle="--", color=line.get_color(), label=f"{split} (exact)")
  ax.set_xscale("log")
  ax.set_xlabel("K")
  ax.set_ylabel("Recall@K (E products)")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


# ------------------------------------------------------------------------------------- whole workdir


def _str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load_queries(data_dir: str, split: str) -> dict:
  """Returns {"labels": [{product_index: gain}], "tags": [[str]], "text": [str], "num": Q} for a queries split."""
  from mmr_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
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
  from mmr_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  src = tfds_builder.load_source(data_dir, "products", "all")
  rows = [src[i] for i in range(len(src))]
  return np.asarray([int(r["num_words"]) for r in rows], np.int64), [_str(r["text"]) for r in rows]


def bm25_rankings(product_texts: Sequence[str], queries: Mapping[str, dict], k: int = K_MAX
                     ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Returns {split: BM25 (idx [Q, k], scores [Q, k])} for queries carrying "text"."""
  bm25 = keyword.BM25(product_texts)
  return {split: bm25.search(q["text"], k) for split, q in queries.items()}


def evaluate_workdir(workdir: str, data_dir: str | None = None, splits: Sequence[str] = EVAL_SPLITS,
                     batch_size: int = 256, scann_params: Mapping | None = None, save_index: bool = True,
                     out_name: str = "metrics", keyword_search: bool = True) -> dict:
  """Evaluates a trained workdir end to end; writes metrics.json/.md, recall_at_k.png and index/; returns results.

  `keyword_search`: also score BM25 and the hybrid (learned + BM25, fused with a weight tuned on the
  validation queries, which are then evaluated too) on the same queries.
  """
  import jax  # pylint: disable=g-import-not-at-top
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:  # re-entrant: `train --evaluate` already holds it
      stack.enter_context(fileio.WorkdirLock(workdir, "evaluate"))
    return _evaluate_workdir(workdir, data_dir, splits, batch_size, scann_params, save_index, out_name,
                             keyword_search)


def _evaluate_workdir(workdir, data_dir, splits, batch_size, scann_params, save_index, out_name,
                      keyword_search) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  from mmr_jax import inference  # pylint: disable=g-import-not-at-top
  from mmr_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from mmr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  tm = inference.load_trained(workdir, data_dir)
  if int(getattr(tm.config, "stage", 2)) == 1:
    log.warning("%s is a stage-1 run (image <-> title): its query tower was never trained, so these numbers "
                "say little; evaluate the stage-2 workdir", workdir)
  data_dir = tm.config.data.dir
  dp = shd.data_parallel_size(tm.mesh)
  batch_size = max(dp, batch_size // dp * dp)
  queries = {split: load_queries(data_dir, split) for split in splits}
  queries = {split: q for split, q in queries.items() if q["num"]}
  if not queries:
    raise ValueError(f"{data_dir} has no queries in the split(s) {', '.join(splits)}: nothing to score "
                     "(give queries.jsonl lines with \"split\": \"test\" and their qrels, then re-import)")
  if keyword_search and FUSION_SPLIT not in queries:
    from mmr_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
    if tfds_builder.catalog_info(data_dir)["num_queries"].get(FUSION_SPLIT):
      queries[FUSION_SPLIT] = load_queries(data_dir, FUSION_SPLIT)
  num_words, product_texts = load_products(data_dir)
  t0 = time.time()
  prod_emb, prod_idx = embed_table(
      tm.embed_products,
      pipeline.make_eval_iterator(data_dir, "products", "all", tm.config.data, batch_size),
      total=len(num_words), desc="embed products")
  if not np.array_equal(prod_idx, np.arange(len(num_words))):
    raise RuntimeError(f"embedded {len(prod_idx)} products but the catalogue has {len(num_words)}")
  for split, q in queries.items():
    q["emb"], _ = embed_table(tm.embed_queries,
                              pipeline.make_eval_iterator(data_dir, "queries", split, tm.config.data, batch_size),
                              total=q["num"], desc=f"embed {split}")
  embed_s = time.time() - t0
  index = index_lib.ScannIndex.build(prod_emb, scann_params)
  kw = bm25_rankings(product_texts, queries) if keyword_search else None
  results = evaluate_embeddings(prod_emb, queries, num_words, index=index, keyword_rankings=kw,
                                fusion_split=FUSION_SPLIT)
  results.update(step=tm.step, embed_s=embed_s, workdir=str(workdir), data_dir=str(data_dir))
  if jax.process_index() == 0:
    out = epath.Path(workdir)
    if save_index:
      index.save(str(out / "index"))
      fileio.write_atomic(out / "product_embeddings.npy", lambda p: np.save(p, prod_emb))
    fileio.write_atomic(out / "recall_at_k.png", lambda p: plot_recall(results, p))
    fileio.write_text(out / f"{out_name}.md", markdown_report(results, f"Retrieval metrics: {out.name}"))
    # Last: metrics.json marks the evaluation done (sweeps and the ablation skip a point that has it).
    fileio.write_json(out / f"{out_name}.json", results)
  return results


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Writes metrics.json/.md and a plot.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="trained workdir (config.json + checkpoints/)")
  p.add_argument("--data", default=None, help="DATA_DIR (default: the one the workdir was trained on)")
  p.add_argument("--split", action="append", default=None,
                 help=f"queries split(s) to evaluate (repeatable; default: {', '.join(EVAL_SPLITS)})")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--scann", default=None, help='JSON dict of ScaNN parameter overrides, e.g. \'{"num_leaves": 100}\'')
  p.add_argument("--no_keyword", action="store_true",
                 help="skip the BM25 and hybrid (learned + BM25) rows scored beside the model")
  args = p.parse_args(argv)
  from mmr_jax import train  # pylint: disable=g-import-not-at-top
  train.setup_logging()
  train.enable_compilation_cache()
  res = evaluate_workdir(args.workdir, args.data, tuple(args.split or EVAL_SPLITS), args.batch_size,
                         json.loads(args.scann) if args.scann else None, keyword_search=not args.no_keyword)
  print(markdown_report(res))


if __name__ == "__main__":
  main()
