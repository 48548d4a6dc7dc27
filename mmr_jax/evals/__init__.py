"""Evaluators: measures of a model that the trainer runs every `train.eval_every` steps and the
`evaluate` / `ablation` commands run at the end.

An evaluator has `metric_names() -> set[str]` (what it logs, known before it runs: `train.keep_best` checks
its metric against them at start) and `run(params) -> {name: float}`. The trainer builds its list from
`config.train` (the objective always, retrieval when `train.eval_retrieval` and there are validation
queries) and knows nothing else of them; evaluation functions take embedding functions or matrices, never a
particular model.

  embedding.py   a model's parameters as embedding functions (`Embedder`, `load_trained`), `embed_table`
  retrieval.py   ScaNN / exact search, Recall@K, NDCG@10, MRR, BM25 and hybrid rows; `RetrievalEvaluator`
  objective.py   the training objective's metrics on validation batches; `ObjectiveEvaluator`
  report.py      Markdown tables and the Recall@K plot
"""

from mmr_jax.evals.objective import ObjectiveEvaluator
from mmr_jax.evals.retrieval import RetrievalEvaluator

__all__ = ["ObjectiveEvaluator", "RetrievalEvaluator"]
