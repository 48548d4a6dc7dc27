r"""Retrieval evaluation of a trained workdir: embed the catalogue, search it with ScaNN (and exactly),
score the rankings beside BM25 keyword search and the hybrid of both.

  python -m mmr_jax.evaluate --workdir DIR [--data DATA_DIR] [--split test]
  python -m mmr_jax.evaluate --workdir DIR --products_only   # catalogue_embeddings.npy alone (any stage)

Writes into the workdir: metrics.json, metrics.md (tables), metrics_per_query.json (each query's Recall@100 and
NDCG@10 per system, and the query groups: what the ablation's confidence intervals pair), recall_at_k.png,
product_embeddings.npy and the ScaNN index (index/, ScaNN's own serialisation, reusable by export). The measures
themselves live in `mmr_jax.evals` and work on any embedding functions; this module is the command around them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from typing import Mapping, Sequence

import jax
import numpy as np
from etils import epath

from mmr_jax.data import pipeline
from mmr_jax.data import tfds_builder
from mmr_jax.evals import embedding
from mmr_jax.evals import index as index_lib
from mmr_jax.evals import report
from mmr_jax.evals import retrieval
from mmr_jax import fileio
from mmr_jax import runtime
from mmr_jax import sharding as shd

log = logging.getLogger("mmr_jax.evaluate")


def evaluate_workdir(workdir: str, data_dir: str | None = None, splits: Sequence[str] = retrieval.EVAL_SPLITS,
                     batch_size: int = 256, scann_params: Mapping | None = None, save_index: bool = True,
                     out_name: str = "metrics", keyword_search: bool = True) -> dict:
  """Evaluates a trained workdir end to end; writes metrics.json/.md, recall_at_k.png and index/; returns results.

  `keyword_search`: also score BM25 and the hybrid (learned + BM25, fused with a weight tuned on the
  validation queries, which are then evaluated too) on the same queries.
  """
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:  # re-entrant: `train --evaluate` already holds it
      stack.enter_context(fileio.WorkdirLock(workdir, "evaluate"))
    return _evaluate_workdir(workdir, data_dir, splits, batch_size, scann_params, save_index, out_name,
                             keyword_search)


def _evaluate_workdir(workdir, data_dir, splits, batch_size, scann_params, save_index, out_name,
                      keyword_search) -> dict:
  tm = embedding.load_trained(workdir, data_dir)
  if int(getattr(tm.config, "stage", 2)) == 1:
    log.warning("%s is a stage-1 run (image <-> title): its query tower was never trained, so these numbers "
                "say little; evaluate the stage-2 workdir", workdir)
  data_dir = tm.config.data.dir
  batch_size = shd.data_parallel_batch(batch_size, tm.mesh)
  queries = {split: retrieval.load_queries(data_dir, split) for split in splits}
  queries = {split: q for split, q in queries.items() if q["num"]}
  if not queries:
    raise ValueError(f"{data_dir} has no queries in the split(s) {', '.join(splits)}: nothing to score "
                     "(give queries.jsonl lines with \"split\": \"test\" and their qrels, then re-import)")
  if keyword_search and retrieval.FUSION_SPLIT not in queries:
    if tfds_builder.catalog_info(data_dir)["num_queries"].get(retrieval.FUSION_SPLIT):
      queries[retrieval.FUSION_SPLIT] = retrieval.load_queries(data_dir, retrieval.FUSION_SPLIT)
  num_words, product_texts = retrieval.load_products(data_dir)
  t0 = time.time()
  prod_emb = _embed_products(tm, data_dir, batch_size, len(num_words))
  for split, q in queries.items():
    batches = pipeline.make_eval_iterator(data_dir, "queries", split, tm.config.data, batch_size)
    q["emb"], _ = embedding.embed_table(tm.embed_queries, batches, total=q["num"], desc=f"embed {split}")
  embed_s = time.time() - t0
  index = index_lib.ScannIndex.build(prod_emb, scann_params)
  kw = retrieval.bm25_rankings(product_texts, queries) if keyword_search else None
  results = retrieval.evaluate_embeddings(prod_emb, queries, num_words, index=index, keyword_rankings=kw,
                                          fusion_split=retrieval.FUSION_SPLIT)
  results.update(step=tm.step, embed_s=embed_s, workdir=str(workdir), data_dir=str(data_dir))
  if jax.process_index() == 0:
    out = epath.Path(workdir)
    if save_index:
      index.save(str(out / "index"))
      fileio.write_atomic(out / "product_embeddings.npy", lambda p: np.save(p, prod_emb))
    fileio.write_atomic(out / "recall_at_k.png", lambda p: report.plot_recall(results, p))
    fileio.write_text(out / f"{out_name}.md", report.markdown_report(results, f"Retrieval metrics: {out.name}"))
    summary, per_query = retrieval.split_per_query(results)
    fileio.write_json(out / f"{out_name}{PER_QUERY_SUFFIX}", per_query)
    # Last: metrics.json marks the evaluation done (sweeps and the ablation skip a point that has it).
    fileio.write_json(out / f"{out_name}.json", summary)
  return results


PER_QUERY_SUFFIX = "_per_query.json"  # metrics_per_query.json: each query's metrics, beside metrics.json


def load_results(workdir: str, out_name: str = "metrics") -> dict:
  """Returns what `evaluate_workdir` returned for `workdir`: its metrics.json joined with metrics_per_query.json
  (the per-query values; absent from workdirs evaluated before it was written, and then left out)."""
  w = epath.Path(workdir)
  results = json.loads((w / f"{out_name}.json").read_text())
  pq = w / f"{out_name}{PER_QUERY_SUFFIX}"
  return retrieval.join_per_query(results, json.loads(pq.read_text())) if pq.exists() else results


def _embed_products(tm: embedding.Embedder, data_dir: str, batch_size: int, num_products: int) -> np.ndarray:
  """Returns float32 [num_products, D]: the catalogue's product embeddings, in product-index order."""
  prod_emb, prod_idx = embedding.embed_table(
      tm.embed_products,
      pipeline.make_eval_iterator(data_dir, "products", "all", tm.config.data, batch_size),
      total=num_products, desc="embed products")
  if not np.array_equal(prod_idx, np.arange(num_products)):
    raise RuntimeError(f"embedded {len(prod_idx)} products but the catalogue has {num_products}")
  return prod_emb


CATALOGUE_EMBEDDINGS = "catalogue_embeddings.npy"


def embed_catalogue(workdir: str, data_dir: str | None = None, batch_size: int = 256) -> str:
  """Embeds the catalogue with a trained workdir's product tower (any stage) into WORKDIR/catalogue_embeddings.npy
  (what `config.data.hard_negative_embeddings` mines hard negatives from); returns its path. No metrics.

  Not product_embeddings.npy: export reuses the evaluation's index/ when that file matches, and this writes
  no index. A collective on a multi-host run: every process calls it; it returns once the file is written.
  """
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:
      stack.enter_context(fileio.WorkdirLock(workdir, "evaluate"))
    tm = embedding.load_trained(workdir, data_dir)
    data_dir = tm.config.data.dir
    batch_size = shd.data_parallel_batch(batch_size, tm.mesh)
    num_products = len(tfds_builder.load_source(data_dir, "products", "all"))
    prod_emb = _embed_products(tm, data_dir, batch_size, num_products)
    path = epath.Path(workdir) / CATALOGUE_EMBEDDINGS
    if jax.process_index() == 0:
      fileio.write_atomic(path, lambda p: np.save(p, prod_emb))
    log.info("%s: %d product embeddings of step %d", path, num_products, tm.step)
  runtime.barrier("mmr_embed_catalogue")
  return str(path)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] + " Writes metrics.json/.md and a plot.",
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="trained workdir (config.json + checkpoints/)")
  p.add_argument("--data", default=None, help="DATA_DIR (default: the one the workdir was trained on)")
  p.add_argument("--split", action="append", default=None,
                 help=f"queries split(s) to evaluate (repeatable; default: {', '.join(retrieval.EVAL_SPLITS)})")
  p.add_argument("--batch_size", type=int, default=256)
  p.add_argument("--scann", default=None, help='JSON dict of ScaNN parameter overrides, e.g. \'{"num_leaves": 100}\'')
  p.add_argument("--no_keyword", action="store_true",
                 help="skip the BM25 and hybrid (learned + BM25) rows scored beside the model")
  p.add_argument("--products_only", action="store_true",
                 help=f"only embed the catalogue into WORKDIR/{CATALOGUE_EMBEDDINGS} (any stage's run; what "
                 "config.data.hard_negative_embeddings mines hard negatives from), no metrics and no index")
  p.add_argument("--verbosity", type=int, default=0, choices=(0, 1, 2),
                 help="0: progress and warnings; 1: every INFO line; 2: everything, native libraries' logs included "
                 "(WORKDIR/logs/evaluate.log gets INFO and native logs at any level)")
  args = p.parse_args(argv)
  runtime.setup_logging(args.verbosity, headline=("mmr_jax.evaluate",),
                        log_file=runtime.log_file_for(args.workdir, "evaluate"))
  runtime.enable_compilation_cache()
  if args.products_only:
    print(embed_catalogue(args.workdir, args.data, args.batch_size))
    return
  res = evaluate_workdir(args.workdir, args.data, tuple(args.split or retrieval.EVAL_SPLITS), args.batch_size,
                         json.loads(args.scann) if args.scann else None, keyword_search=not args.no_keyword)
  print(report.markdown_report(res))


if __name__ == "__main__":
  main()

