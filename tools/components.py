"""What each part of a trained model's embeddings adds: the same model scored with one part switched off at a time.

  python tools/components.py --workdir workdirs/demo/fusion_ft [--data DATA_DIR] [--split test]

A trained stage-2 workdir is scored on the split's queries (exact search: the model's own ranking, as the
ablation scores its rows) as it is ("full"), then once per part it has (`two_tower.PARTS`):
  image_words   the image's words in the product's lexical segment (model.image_expansion_k) at scale 0
  query_translation
                the catalogue's words for the query's words no product uses (model.query_translation_k): an
                empty table
  fused_branch  gate 0 (variant fusion): the dense product embedding is its text embedding
  text_branch   gate 1 for products with an image: the dense product embedding is the fused one
  lexical       the lexical segment off (mix 0, queries and products): dense similarity only
  dense         the dense segment off (mix 1): lexical similarity only
The parameters are edited, not retrained, so a drop is what the trained model leans on that part for.

Prints one JSON object and writes it to OUT/components.json, with OUT/components.md (a table by query tag and
text sparsity); OUT is the workdir unless --out says otherwise:
  {"workdir", "data_dir", "split", "step", "num_queries", "parts": {name: description},
   "metrics": ["recall@100", "ndcg@10"], "results": {"full" | "without_<part>": {"overall", "by_tag",
   "by_sparsity"}}, "minus": {part: {"overall" | "tag:<t>": {metric: full minus without, in points}}}}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmr_jax import fileio  # pylint: disable=g-import-not-at-top
from mmr_jax import sharding as shd  # pylint: disable=g-import-not-at-top
from mmr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from mmr_jax.evals import embedding  # pylint: disable=g-import-not-at-top
from mmr_jax.evals import index as index_lib  # pylint: disable=g-import-not-at-top
from mmr_jax.evals import retrieval  # pylint: disable=g-import-not-at-top
from mmr_jax.models import two_tower  # pylint: disable=g-import-not-at-top


def _log(msg: str) -> None:
  print(f"[components {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _score(tm: embedding.Embedder, queries: dict, num_words: np.ndarray, data_dir: str, split: str,
           batch_size: int) -> dict:
  """Returns {"overall", "by_tag", "by_sparsity"} of the exact ranking of `tm`'s model and parameters."""
  q = dict(queries)
  q["emb"], _ = embedding.embed_table(
      tm.embed_queries, pipeline.make_eval_iterator(data_dir, "queries", split, tm.config.data, batch_size),
      total=q["num"], desc=f"embed {split}")
  prod, idx = embedding.embed_table(
      tm.embed_products, pipeline.make_eval_iterator(data_dir, "products", "all", tm.config.data, batch_size),
      total=len(num_words), desc="embed products")
  if not np.array_equal(idx, np.arange(len(num_words))):
    raise RuntimeError(f"embedded {len(idx)} products but the catalogue has {len(num_words)}")
  ks = _ks(len(num_words))
  ranked, _ = index_lib.exact_search(q["emb"], prod, min(retrieval.K_MAX, len(num_words)))  # MRR over all of it
  # The sparse-text bins and per-query scores are evaluate_embeddings' (the ablation's exact columns).
  product_sparse = num_words <= retrieval.sparse_threshold(num_words, 0.25)
  tags, bins = retrieval.query_groups(q["tags"], q["labels"], product_sparse)
  return retrieval.score_ranking(ranked, q["labels"], tags, bins, ks, min(10, len(num_words)))


def _ks(num_products: int) -> tuple[int, ...]:
  """Returns the recall cut-offs scored (evaluate_embeddings' own): 10, 50, 100, those a catalogue can fill."""
  k = min(retrieval.K_MAX, num_products)
  return tuple(x for x in (10, 50, 100) if x <= k) or (k,)


def components(workdir: str, data_dir: str | None = None, split: str = "test", batch_size: int = 256) -> dict:
  """Returns the report described in the module docstring (nothing written)."""
  tm = embedding.load_trained(workdir, data_dir)
  if int(getattr(tm.config, "stage", 2)) == 1:
    raise ValueError(f"{workdir} is a stage-1 run: its query tower was never trained; give a stage-2 workdir")
  data_dir = tm.config.data.dir
  parts = two_tower.embedding_parts(tm.config.model)
  if not parts:
    raise ValueError(f"{workdir}: its {tm.config.model.variant} model has no part to switch off "
                     f"(parts: {tuple(two_tower.PARTS)})")
  queries = retrieval.load_queries(data_dir, split)
  if not queries["num"]:
    raise ValueError(f"{data_dir} has no queries in the split {split!r}")
  num_words, _ = retrieval.load_products(data_dir)
  batch_size = shd.data_parallel_batch(batch_size, tm.mesh)
  shown = (f"recall@{_ks(len(num_words))[-1]}", f"ndcg@{min(10, len(num_words))}")
  _log(f"{workdir}: full model, then without each of {', '.join(parts)} ({queries['num']} {split} queries)")
  results = {"full": _score(tm, queries, num_words, data_dir, split, batch_size)}
  for part in parts:
    edited = dataclasses.replace(tm, params=two_tower.without_part(tm.params, tm.config.model, part))
    results[f"without_{part}"] = _score(edited, queries, num_words, data_dir, split, batch_size)
    o = results[f"without_{part}"]["overall"]
    _log(f"without {part}: " + ", ".join(f"{k} {100 * o[k]:.1f}" for k in shown))

  def points(full: dict, without: dict) -> dict:
    return {k: round(100 * (full[k] - without[k]), 2) for k in shown}

  full = results["full"]
  minus = {}
  for part in parts:
    w = results[f"without_{part}"]
    minus[part] = {"overall": points(full["overall"], w["overall"])}
    minus[part].update({f"tag:{t}": points(m, w["by_tag"][t]) for t, m in sorted(full["by_tag"].items())})
  return {"workdir": str(workdir), "data_dir": str(data_dir), "split": split, "step": tm.step,
          "num_queries": queries["num"], "metrics": list(shown), "parts": {p: two_tower.PARTS[p] for p in parts},
          "results": results, "minus": minus}


def markdown(report: dict) -> str:
  """Returns a markdown table: the report's metrics (%) per model, overall and per tag and sparsity bin."""
  full, shown = report["results"]["full"], report["metrics"]
  cols = [("overall", None)] + [("by_tag", t) for t in sorted(full["by_tag"])] + [
      ("by_sparsity", b) for b in sorted(full["by_sparsity"])]
  head = ["model", "overall"] + [c[1] if c[0] == "by_tag" else f"{c[1]} text" for c in cols[1:]]
  lines = [f"# What each part adds: {report['workdir']}", "",
           f"Split `{report['split']}` ({report['num_queries']} queries), exact search, {' / '.join(shown)} in %; "
           "each row switches one part off in the trained parameters (tools/components.py).", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for name, res in report["results"].items():
    cells = []
    for kind, key in cols:
      m = res[kind] if key is None else res[kind].get(key)
      cells.append("–" if m is None else " / ".join(f"{100 * m[k]:.1f}" for k in shown))
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", "Parts:"] + [f"- `{p}`: {d}" for p, d in report["parts"].items()]
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  ap.add_argument("--workdir", required=True, help="a trained stage-2 workdir")
  ap.add_argument("--data", default=None, help="DATA_DIR (default: the one the workdir was trained on)")
  ap.add_argument("--split", default="test", help="queries split to score (default: test)")
  ap.add_argument("--batch", type=int, default=256, help="embedding batch")
  ap.add_argument("--out", default=None, help="folder for components.json / .md (default: the workdir)")
  args = ap.parse_args(argv)
  report = components(args.workdir, args.data, args.split, args.batch)
  out = args.out or args.workdir
  os.makedirs(out, exist_ok=True)
  fileio.write_text(os.path.join(out, "components.md"), markdown(report))
  fileio.write_json(os.path.join(out, "components.json"), report)
  print(json.dumps(report))
  _log(f"wrote {os.path.join(out, 'components.json')} and components.md")
  return report


if __name__ == "__main__":
  main()
