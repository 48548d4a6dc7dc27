"""The synthetic generator's knobs (`SyntheticConfig`) and the named sizes (`PRESETS`).

A config is validated when it is built, so a bad knob fails before minutes of generation.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mmr_jax.data.synthetic.vocabulary import WORDS

@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Every knob of the generator. All randomness derives from `seed`.

  Attributes:
    num_products: catalogue size.
    num_queries: total queries over all splits; None -> max(min_queries, queries_per_product * num_products).
    queries_per_product: query count scale when num_queries is None. Small on purpose: labelled pairs are
      scarce relative to products, as in real logs.
    min_queries: floor so tiny catalogues still have every split populated.
    split_fractions: (train, validation, test) shares of queries.
    query_kind_fractions: (visual, textual, mixed) shares of queries.
    image_size: rendered side in pixels (square PNG).
    sparsity_rate: share of products whose text names the category but no colour, pattern or style.
    noise_rate: share of non-sparse products whose text names a wrong colour.
    second_language_rate: share of products written in one of `second_languages`.
    second_languages: languages (keys of `WORDS`) for those products.
    empty_description_rate: share of products with an empty description (their material, care and size
      are then in the attributes dict).
    style_in_title_rate: chance a non-sparse title names the style (real titles drop words).
    occlusion_rate: share of images with another object partly over the product.
    noise_sigma_max: per-image pixel noise std is uniform in [0, noise_sigma_max] (0-255 scale).
    novel_combination_fraction: share of (category, colour) pairs that no train/validation query uses.
    test_novel_fraction: share of test queries built on such a pair (tag `novel_combination`).
    eval_repeat_fraction: share of the other validation/test queries that repeat a train query's text
      (head queries recur in real logs); the importer's test_novel_query split is the test queries
      whose text no train query has, so this keeps it a proper subset of test.
    train_positives_per_query: at most this many E labels per train query (click-log-like scarcity).
    max_relevant_per_query: queries are made specific (more attributes) until they match at most this
      many products; validation/test queries label all of them. None -> 0.5% of the catalogue, clipped
      to [50, 500] (see `relevant_cap`).
    s_per_query, c_per_query, i_per_query: (train, eval) caps on S / C / I labels per query.
    seed: everything derives from it.
  """
  num_products: int = 1000
  num_queries: int | None = None
  queries_per_product: float = 0.08
  min_queries: int = 40
  split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
  query_kind_fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)
  image_size: int = 64
  sparsity_rate: float = 0.4
  noise_rate: float = 0.05
  second_language_rate: float = 0.1
  second_languages: tuple[str, ...] = ("de", "es")
  empty_description_rate: float = 0.3
  style_in_title_rate: float = 0.7
  occlusion_rate: float = 0.25
  noise_sigma_max: float = 6.0
  novel_combination_fraction: float = 0.1
  test_novel_fraction: float = 0.25
  eval_repeat_fraction: float = 0.3
  train_positives_per_query: int = 5
  max_relevant_per_query: int | None = None
  s_per_query: tuple[int, int] = (3, 10)
  c_per_query: tuple[int, int] = (2, 5)
  i_per_query: tuple[int, int] = (3, 5)
  seed: int = 0

  def __post_init__(self):
    def check(ok, field, msg):
      if not ok:
        raise ValueError(f"SyntheticConfig.{field}: {msg} (got {getattr(self, field)!r})")
    check(self.num_products >= 1, "num_products", "must be >= 1")
    check(self.num_queries is None or self.num_queries >= 3, "num_queries", "must be >= 3 (one per split)")
    check(self.image_size >= 16, "image_size", "must be >= 16")
    for f in ("sparsity_rate", "noise_rate", "second_language_rate", "empty_description_rate",
              "style_in_title_rate", "occlusion_rate", "novel_combination_fraction", "test_novel_fraction",
              "eval_repeat_fraction"):
      check(0.0 <= getattr(self, f) <= 1.0, f, "must be in [0, 1]")
    for f in ("split_fractions", "query_kind_fractions"):
      v = getattr(self, f)
      check(len(v) == 3 and min(v) >= 0 and abs(sum(v) - 1) < 1e-6, f, "must be 3 shares summing to 1")
    check(all(l in WORDS and l != "en" for l in self.second_languages) and self.second_languages,
          "second_languages", f"must be a non-empty subset of {[l for l in WORDS if l != 'en']}")
    check(self.train_positives_per_query >= 1, "train_positives_per_query", "must be >= 1")
    check(self.max_relevant_per_query is None or self.max_relevant_per_query >= 1, "max_relevant_per_query",
          "must be >= 1 or None")
    check(self.min_queries >= 3, "min_queries", "must be >= 3 (one per split)")
    for f in ("s_per_query", "c_per_query", "i_per_query"):
      check(len(getattr(self, f)) == 2 and min(getattr(self, f)) >= 0, f, "must be (train, eval) counts >= 0")

  @property
  def relevant_cap(self) -> int:
    """Returns the most products a query may match (see max_relevant_per_query)."""
    if self.max_relevant_per_query is not None:
      return self.max_relevant_per_query
    return int(min(500, max(50, round(0.005 * self.num_products))))

  @property
  def total_queries(self) -> int:
    """Returns the number of queries over all splits."""
    if self.num_queries is not None:
      return self.num_queries
    return max(self.min_queries, int(round(self.queries_per_product * self.num_products)))


# Sizes from unit tests to a catalogue that stresses the input pipeline.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_products=300, image_size=32, min_queries=40),      # unit tests (seconds)
    "small": dict(num_products=2_000),                                    # smoke runs (seconds)
    # The README's main job: enough labelled queries that every ablation row is measured on ~300
    # test queries, still far fewer labelled pairs than products.
    "demo": dict(num_products=3_000, num_queries=1_200),
    "medium": dict(num_products=20_000),                                  # CPU experiments (~20 s)
    "large": dict(num_products=100_000),                                  # GPU experiments (~2 min)
    "xlarge": dict(num_products=500_000, image_size=96),                  # pipeline scale tests
}


def preset(name: str, **overrides) -> SyntheticConfig:
  """Returns the named preset's SyntheticConfig with `overrides` applied."""
  if name not in PRESETS:
    raise KeyError(f"unknown synthetic preset {name!r}; known: {sorted(PRESETS)}")
  return SyntheticConfig(**{**PRESETS[name], **overrides})

