"""Measures of a model: the evaluators the trainer runs every `train.eval_every` steps and the `evaluate` /
`ablation` commands run at the end, and the retrieval machinery they share.

An evaluator has `metric_names() -> set[str]` (what it logs, known before it runs: `train.keep_best` checks
its metric against them at start) and `run(params) -> {name: float}`. The trainer builds its list from
`config.train` (the objective always; retrieval in stage 2 when `train.eval_retrieval` and there are
validation queries) and knows nothing else of them; evaluation functions take embedding functions or matrices, never a
particular model.

  embedding.py   a model's parameters as embedding functions (`Embedder`, `load_trained`), `embed_table`
  retrieval.py   search + scoring of any embeddings, BM25 / hybrid rows; `RetrievalEvaluator`
  objective.py   the training objective's metrics on validation batches; `ObjectiveEvaluator`
  metrics.py     Recall@K, NDCG@K with graded gains, MRR, breakdowns (numpy)
  index.py       the ScaNN index (approximate) and exact search (the reference)
  keyword.py     BM25 over product text and its per-query fusion with a learned ranking
  report.py      Markdown tables and the Recall@K plot

Submodules are imported by name (`from mmr_jax.evals import metrics`): the package imports nothing, so
light users (launch/, tools/status.py) do not load the data pipeline.
"""
