"""Tests for mmr_jax.evals.metrics against values worked out by hand."""

import math
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

from mmr_jax.evals import metrics

E, S, C, I = 1.0, 0.1, 0.01, 0.0

# q0: graded labels, E found at rank 2.
# q1: four E products, three of them retrieved at ranks 1, 3, 5.
# q2: one E at rank 3.
# q3: only S / C labels: no E (recall and MRR undefined, nDCG defined).
# q4: no labels at all (every metric undefined).
RANKED = np.array([
    [3, 5, 8, 7, -1],
    [1, 10, 3, 11, 4],
    [21, 22, 20, 23, 24],
    [30, 31, 32, 33, 34],
    [40, 41, 42, 43, 44],
])
LABELS = [
    {5: E, 3: S, 7: C, 9: I},
    [(1, E), (2, E), (3, E), (4, E)],
    {20: E},
    {32: S, 35: C},
    {},
]


def _per_query():
  return metrics.per_query_metrics(RANKED, LABELS, ks=(1, 3, 5), ndcg_ks=(3, 5))


def test_graded_ndcg_matches_hand_computation():
  pq = _per_query()
  dcg5 = S / math.log2(2) + E / math.log2(3) + C / math.log2(5)
  idcg5 = E / math.log2(2) + S / math.log2(3) + C / math.log2(4)
  assert pq["ndcg@5"][0] == pytest.approx(dcg5 / idcg5, rel=1e-12)
  assert pq["ndcg@5"][0] == pytest.approx(0.688364, abs=1e-6)
  dcg3 = S + E / math.log2(3)
  idcg3 = E + S / math.log2(3) + C / 2
  assert pq["ndcg@3"][0] == pytest.approx(dcg3 / idcg3, rel=1e-12)
  # q3: S at rank 3, C (product 35) never retrieved.
  assert pq["ndcg@5"][3] == pytest.approx((S / 2) / (S + C / math.log2(3)), rel=1e-12)
  # q1: E at 1, 3, 5 out of 4 E; ideal puts E at ranks 1..4 (cut at 5).
  dcg = 1 + 1 / 2 + 1 / math.log2(6)
  idcg = 1 + 1 / math.log2(3) + 1 / 2 + 1 / math.log2(5)
  assert pq["ndcg@5"][1] == pytest.approx(dcg / idcg, rel=1e-12)
  assert np.isnan(pq["ndcg@5"][4])


def test_recall_with_several_relevant_items():
  pq = _per_query()
  np.testing.assert_allclose(pq["recall@1"][:3], [0.0, 0.25, 0.0])
  np.testing.assert_allclose(pq["recall@3"][:3], [1.0, 0.5, 1.0])
  np.testing.assert_allclose(pq["recall@5"][:3], [1.0, 0.75, 1.0])
  assert np.isnan(pq["recall@5"][3]) and np.isnan(pq["recall@5"][4])


def test_mrr_and_queries_without_exact_are_excluded():
  pq = _per_query()
  np.testing.assert_allclose(pq["mrr"][:3], [0.5, 1.0, 1 / 3])
  assert np.isnan(pq["mrr"][3]) and np.isnan(pq["mrr"][4])
  summary = metrics.compute_metrics(RANKED, LABELS, ks=(1, 3, 5), ndcg_ks=(5,))
  assert summary["mrr"] == pytest.approx((0.5 + 1.0 + 1 / 3) / 3)
  assert summary["recall@5"] == pytest.approx((1.0 + 0.75 + 1.0) / 3)
  # nDCG averages over the 4 queries with any positive gain (q3 included, q4 not).
  assert summary["ndcg@5"] == pytest.approx(np.mean(pq["ndcg@5"][:4]))
  assert summary["num_queries"] == 5 and summary["num_judged"] == 3


def test_default_keys():
  ranked = np.tile(np.arange(100), (2, 1))
  labels = [{0: E}, {150: E, 99: S}]
  out = metrics.compute_metrics(ranked, labels)
  assert {"recall@10", "recall@50", "recall@100", "ndcg@10", "mrr"} <= set(out)
  assert out["recall@100"] == pytest.approx(0.5)  # q1's E never retrieved
  assert out["mrr"] == pytest.approx(0.5)


def test_tied_gains_in_ideal_ranking_and_ranking_taken_as_given():
  # Two E products: either order is ideal, so both rankings score nDCG 1.
  labels = [{1: E, 2: E}, {1: E, 2: E}]
  pq = metrics.per_query_metrics(np.array([[1, 2, 3], [2, 1, 3]]), labels, ks=(2,), ndcg_ks=(3,))
  np.testing.assert_allclose(pq["ndcg@3"], [1.0, 1.0])
  # A relevant item after an irrelevant one scores less: position matters, not score.
  pq = metrics.per_query_metrics(np.array([[3, 1, 2]]), [{1: E, 2: E}], ks=(2,), ndcg_ks=(3,))
  assert pq["ndcg@3"][0] == pytest.approx((1 / math.log2(3) + 0.5) / (1 + 1 / math.log2(3)))
  assert pq["recall@2"][0] == pytest.approx(0.5)


def test_exact_search_tie_break_feeds_metrics_deterministically():
  from mmr_jax.evals import index
  db = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.5, 0.0]], np.float32)  # 0 and 2 tie
  ranked, _ = index.exact_search(np.array([[1.0, 0.0]], np.float32), db, 3)
  np.testing.assert_array_equal(ranked, [[0, 2, 3]])
  # Only product 2 is E: with lower-index-first ties it sits at rank 2.
  out = metrics.compute_metrics(ranked, [{2: E}], ks=(1, 2), ndcg_ks=(1,))
  assert out["mrr"] == 0.5 and out["recall@1"] == 0.0 and out["recall@2"] == 1.0


def test_breakdown_is_exact_average_of_members():
  pq = _per_query()
  groups = {"a": np.array([True, True, False, False, False]),
            "b": np.array([False, False, True, True, True]),
            "empty": np.zeros(5, bool)}
  out = metrics.breakdown(pq, groups)
  assert out["a"]["recall@5"] == pytest.approx((1.0 + 0.75) / 2)
  assert out["a"]["mrr"] == pytest.approx(0.75)
  assert out["b"]["recall@5"] == pytest.approx(1.0)  # only q2 judged in b
  assert out["b"]["num_queries"] == 3 and out["b"]["num_judged"] == 1
  assert out["b"]["ndcg@5"] == pytest.approx(np.mean([pq["ndcg@5"][2], pq["ndcg@5"][3]]))
  assert np.isnan(out["empty"]["mrr"]) and out["empty"]["num_queries"] == 0
  with pytest.raises(ValueError, match="group 'bad'"):
    metrics.breakdown(pq, {"bad": np.ones(4, bool)})


def test_labels_from_arrays():
  labels = metrics.labels_from_arrays([np.array([4, 2]), np.array([], np.int64)],
                                      [np.array([1.0, 0.1], np.float32), np.array([], np.float32)])
  assert labels == [{4: 1.0, 2: pytest.approx(0.1)}, {}]
  with pytest.raises(ValueError, match="query 0"):
    metrics.labels_from_arrays([[1, 1]], [[1.0, 1.0]])


@pytest.mark.parametrize("ranked,labels,match", [
    (np.array([[1, 2, 1]]), [{1: E}], r"ranked\[0\] lists a product more than once"),
    (np.array([[1, -2, 3]]), [{1: E}], "index < -1"),
    (np.array([[1, 2, 3]]), [{1: E}, {}], "labels has 2 entries"),
    (np.array([[1.0, 2.0, 3.0]]), [{1: E}], "integer"),
    (np.array([[1, 2, 3]]), [{1: -1.0}], r"labels\[0\].*>= 0"),
    (np.array([[1, 2, 3]]), [[(1, E), (1, S)]], "more than once"),
])
def test_bad_input_is_named(ranked, labels, match):
  with pytest.raises(ValueError, match=match):
    metrics.per_query_metrics(ranked, labels, ks=(1,), ndcg_ks=(1,))


def test_cutoff_longer_than_ranking_raises():
  with pytest.raises(ValueError, match="cutoff 10 exceeds"):
    metrics.compute_metrics(np.array([[1, 2, 3]]), [{1: E}], ks=(10,), ndcg_ks=(1,))


def test_padding_counts_as_miss():
  pq = metrics.per_query_metrics(np.array([[-1, -1, 7]]), [{7: E}], ks=(2, 3), ndcg_ks=(3,))
  assert pq["recall@2"][0] == 0.0 and pq["recall@3"][0] == 1.0
  assert pq["mrr"][0] == pytest.approx(1 / 3)
  assert pq["ndcg@3"][0] == pytest.approx(0.5)


def test_paired_bootstrap_interval_of_a_difference_between_two_systems():
  rng = np.random.default_rng(0)
  b = rng.uniform(size=400)
  # The same system twice: no difference, and no interval around it.
  same = metrics.paired_bootstrap(b, b)
  assert (same["mean"], same["low"], same["high"], same["num_queries"]) == (0.0, 0.0, 0.0, 400)
  # Better on every query by 0.1: pairing sees it however noisy the queries are.
  assert metrics.paired_bootstrap(b + 0.1, b)["low"] == pytest.approx(0.1)
  # Per-query differences of mean 0.05, spread 0.2: the interval holds the mean, about 1.96 standard errors each side.
  d = 0.05 + 0.2 * rng.standard_normal(400)
  ci = metrics.paired_bootstrap(b + d, b)
  assert ci["mean"] == pytest.approx(d.mean()) and ci["low"] < d.mean() < ci["high"]
  assert ci["high"] - ci["low"] == pytest.approx(2 * 1.96 * d.std() / np.sqrt(400), rel=0.15)
  assert ci["low"] > 0  # at 400 queries this margin is told apart from 0 ...
  few = metrics.paired_bootstrap((b + d)[:20], b[:20])
  assert few["low"] < 0 < few["high"]  # ... at 20 it is not
  assert metrics.paired_bootstrap(b + d, b) == ci  # seeded: the same interval every time
  # Undefined queries (NaN in either system) are left out.
  a = b.copy()
  a[:3], b2 = np.nan, b.copy()
  b2[5] = np.nan
  assert metrics.paired_bootstrap(a, b2)["num_queries"] == 396
  empty = metrics.paired_bootstrap([np.nan], [0.5])
  assert empty["num_queries"] == 0 and math.isnan(empty["mean"])
  with pytest.raises(ValueError, match="same queries"):
    metrics.paired_bootstrap(b[:3], b[:4])
