"""A translation table from the shoppers' words to the catalogue's, estimated from the labelled training pairs.

A query word that no product uses ("gray", "pants", "plaid" against a catalogue that says "grey", "trousers",
"checked") can never match a product's words, so keyword search and the model's lexical segment both miss it.
The training queries show what such a word stands for: the products labelled relevant to the queries that use
it. For each token id t of the training queries that occurs in no product (counted as the lexical idf counts:
the products outside the novel-product split, tokenised as training sees them, on a sample of `sample` of them in
a bigger catalogue), and that `min_queries` or more training queries use, the table keeps up to `k` product
tokens v with

    p(v | t) >= min_prob    the share of those queries whose best-graded products contain v (each query's
                            products sharing one vote; the novel-product split's products, test products, do
                            not vote)
    lift = p(v | t) / (df(v) / N) >= min_lift   v is that much more common there than in the catalogue

ranked by p log(lift): a translation model estimated from relevance labels (Berger and Lafferty 1999), kept to
the words that need one. Tokens that products use are never translated: they match as they are, and adding
their neighbours' words only blurs the query. Nothing here knows a language or a category: the labels decide.

The model adds the translations to the query's lexical segment (model.query_translation_k, the top-level
`query_translation` module); the trainer fits the table at initialisation and writes this report.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from typing import Any

import numpy as np

from mmr_jax.data import pipeline
from mmr_jax.data import sources

_log = logging.getLogger(__name__)

NONE = -1  # an empty slot of the table


def fit(data_dir: str, config: Any, vocab_size: int, k: int, *, min_prob: float = 0.3, min_lift: float = 3.0,
        min_queries: int = 2, sample: int = 100_000, seed: int = 0) -> tuple[np.ndarray, dict]:
  """Returns (targets int32 [vocab_size, k], NONE where empty; a JSON-able report) for DATA_DIR's train queries.

  `config` is `config.data` (query_len, product_len, the tokenizer). `sample` and `seed` bound the product
  frequency count as in `pipeline.token_document_frequency`.
  """
  if k <= 0:
    raise ValueError(f"query translation k={k} must be > 0")
  if not 0.0 < min_prob <= 1.0 or min_lift < 1.0 or min_queries < 1:
    raise ValueError(f"query translation thresholds min_prob={min_prob} (in (0, 1]), min_lift={min_lift} (>= 1), "
                     f"min_queries={min_queries} (>= 1)")
  df, docs = pipeline.token_document_frequency(data_dir, config, vocab_size, sample, seed)
  tok = sources.load_tokenizer(data_dir, config)
  # Ids that stand for no word (padding, unknown, bos, eos) are never translated.
  special = {tok.conventions.pad_id, tok.bos_id, tok.eos_id, tok.unk_id}
  queries = sources.open_source(data_dir, "queries", "train")
  products = sources.open_source(data_dir, "products", "all")
  product_tokens: dict[int, np.ndarray] = {}

  def tokens_of(index: int) -> np.ndarray:
    if index not in product_tokens:
      product_tokens[index] = pipeline.product_token_set(tok, products[index], config)
    return product_tokens[index]

  uses = collections.Counter()  # t -> training queries that use it (and have a labelled product)
  together = collections.defaultdict(collections.Counter)  # t -> v -> votes
  start = last = time.monotonic()
  for i in range(len(queries)):
    row = queries[i]
    ids = tok.encode([sources.row_text(row, "text")], int(config.query_len))[0]
    unmatched = [int(t) for t in np.unique(ids) if t not in special and t < vocab_size and df[t] == 0]
    if not unmatched:
      continue
    # The novel-product split's products are test products: no training signal comes from their text.
    index = np.asarray(row["relevant_index"], np.int64)
    grades = np.asarray(row["relevant_grade"], np.float64)
    keep = np.asarray([not bool(np.asarray(products[int(p)]["heldout"])) for p in index], bool)
    index, grades = index[keep], grades[keep]
    if not grades.size:
      continue
    best = index[grades == grades.max()]
    for t in unmatched:
      uses[t] += 1
      for p in best:
        for v in tokens_of(int(p)):
          together[t][int(v)] += 1.0 / len(best)
    if time.monotonic() - last > 30:
      last = time.monotonic()
      _log.info("query translation: %d / %d training queries (%.0f s)", i + 1, len(queries), last - start)

  targets = np.full((vocab_size, k), NONE, np.int32)
  entries = []
  for t, n in sorted(uses.items(), key=lambda kv: (-kv[1], kv[0])):
    if n < min_queries:
      continue
    kept = []
    for v, votes in together[t].items():
      p = votes / n
      lift = p * docs / max(int(df[v]), 1)
      if v < vocab_size and df[v] > 0 and p >= min_prob and lift >= min_lift:
        kept.append((-p * math.log(lift), v, p, lift))
    kept = sorted(kept)[:k]
    if not kept:
      continue
    targets[t, :len(kept)] = [v for _, v, _, _ in kept]
    entries.append({"token": tok.id_to_piece(t), "id": t, "queries": n,
                    "targets": [{"token": tok.id_to_piece(v), "id": v, "p": round(p, 4), "lift": round(lift, 2)}
                                for _, v, p, lift in kept]})
  report = {"translated": len(entries), "unmatched_query_tokens": len(uses), "train_queries": len(queries),
            "products_counted": int(docs), "k": k, "min_prob": min_prob, "min_lift": min_lift,
            "min_queries": min_queries, "entries": entries}
  return targets, report
