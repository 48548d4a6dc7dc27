"""Human-readable reports of retrieval results: Markdown tables and the Recall@K plot."""

from __future__ import annotations

from typing import Sequence

import numpy as np


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
  fusion = results.get("fusion")
  systems = [("overall", "ScaNN"), ("exact", "exact")]
  if fusion:
    systems += [("bm25", "BM25"), ("hybrid", f"hybrid ({fusion['method']}, learned weight {fusion['weight']:g})")]
  body = []
  for split, r in results["splits"].items():
    for name, label in systems:
      m = r[name]["overall"] if name in ("bm25", "hybrid") else r[name]
      body.append([split, label, *(fmt(m.get(c)) for c in cols), m["num_queries"],
                   fmt(r["scann_recall_vs_exact"]) if name == "overall" else ""])
  lines = [f"# {title}", "", f"{n} products; metrics in %; ScaNN recall vs exact at k={results['k']}.{note}", "",
           markdown_table(["split", "search", *cols, "queries", "ScaNN recall vs exact"], body).rstrip("\n")]
  if fusion:
    tuned = (f"tuned on the {fusion['tuned_on']} queries by the mean of their R@100 and NDCG@10"
             if fusion.get("tuned_on") else "not tuned (no validation queries)")
    lines += ["", f"BM25: keyword search over title + description + attributes (`mmr_jax/evals/keyword.py`). Hybrid: "
              f"the learned ranking fused with BM25's per query, {tuned}."]
  for split, r in results["splits"].items():
    body = []
    for gname, key in (("tag", "by_tag"), ("sparsity", "by_sparsity")):
      for g, m in r[key].items():
        body.append([f"{gname}: {g}", *(fmt(m.get(c)) for c in cols), m["num_queries"]])
        for name, label in systems[2:]:
          mm = r[name][key].get(g, {})
          body.append([f"{gname}: {g} ({label.split()[0]})", *(fmt(mm.get(c)) for c in cols),
                       mm.get("num_queries", 0)])
    lines += ["", f"## {split}: by query tag and product-text sparsity (ScaNN)", "",
              markdown_table(["group", *cols, "queries"], body).rstrip("\n")]
  return "\n".join(lines) + "\n"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
  """Returns a Markdown table of cells (str() of each), one line per row ("|" inside a cell escaped).

  The one table writer: evaluation reports, the ablation and sweep results use it.
  """
  row = lambda cells: "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"  # noqa: E731
  return "\n".join([row(header), "|" + "---|" * len(header)] + [row(cells) for cells in rows]) + "\n"


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


