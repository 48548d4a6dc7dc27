"""Tests for mmr_jax.evals.index: exact search, ScaNN wrapper, recall vs exact."""

import json
import os
import shutil
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

from mmr_jax.evals import index


def _unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n, d, clusters, seed, num_queries=64):
  rng = np.random.default_rng(seed)
  centers = _unit(rng.standard_normal((clusters, d)))
  db = _unit(centers[rng.integers(clusters, size=n)] + 0.1 * rng.standard_normal((n, d)))
  q = _unit(centers[rng.integers(clusters, size=num_queries)] + 0.1 * rng.standard_normal((num_queries, d)))
  return db, q


def _reference_topk(q, db, k):
  s = q.astype(np.float64) @ db.T.astype(np.float64)
  order = np.lexsort((np.broadcast_to(np.arange(db.shape[0]), s.shape), -s), axis=-1)[:, :k]
  return order, np.take_along_axis(s, order, 1)


@pytest.mark.parametrize("query_batch,db_chunk", [(3, 7), (64, 1000), (5, 37)])
def test_exact_search_matches_numpy_reference(query_batch, db_chunk):
  rng = np.random.default_rng(0)
  db = _unit(rng.standard_normal((150, 16)))
  q = _unit(rng.standard_normal((11, 16)))
  idx, scores = index.exact_search(q, db, 10, query_batch=query_batch, db_chunk=db_chunk)
  ref_idx, ref_s = _reference_topk(q, db, 10)
  assert idx.shape == (11, 10) and idx.dtype == np.int64 and scores.dtype == np.float32
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_allclose(scores, ref_s, rtol=1e-5, atol=1e-6)


def test_exact_search_ties_lower_index_first_across_chunks():
  # Integer-valued vectors make the tied scores exactly equal in any summation order.
  db = np.array([[1, 0], [2, 0], [1, 0], [0, 1], [2, 0], [1, 0], [2, 0]], np.float32)
  q = np.array([[1, 0], [0, 1]], np.float32)
  for chunk in (1, 2, 3, 100):
    idx, scores = index.exact_search(q, db, 5, db_chunk=chunk, query_batch=1)
    np.testing.assert_array_equal(idx[0], [1, 4, 6, 0, 2])
    np.testing.assert_array_equal(scores[0], [2, 2, 2, 1, 1])
    np.testing.assert_array_equal(idx[1], [3, 0, 1, 2, 4])


def test_exact_search_pads_when_k_exceeds_db():
  db = np.eye(3, dtype=np.float32)
  idx, scores = index.exact_search(db[:1], db, 5)
  np.testing.assert_array_equal(idx, [[0, 1, 2, -1, -1]])
  assert np.isneginf(scores[0, 3:]).all() and scores[0, 0] == 1.0


def test_exact_search_rejects_bad_input():
  db = np.eye(3, dtype=np.float32)
  with pytest.raises(ValueError, match="queries has dimension 2"):
    index.exact_search(np.zeros((1, 2)), db, 1)
  with pytest.raises(ValueError, match=r"db\[1\] contains NaN"):
    index.exact_search(db, np.array([[1, 0, 0], [np.nan, 0, 0]]), 1)
  with pytest.raises(ValueError, match="k must be a positive integer"):
    index.exact_search(db, db, 0)


def test_recall_vs_exact():
  exact = np.array([[1, 2, 3, 4], [5, 6, -1, -1]])
  approx = np.array([[2, 9, 1, 8], [6, 5, 7, 0]])
  assert index.recall_vs_exact(approx, exact, 4) == pytest.approx(4 / 6)
  assert index.recall_vs_exact(approx, exact, 2) == pytest.approx(3 / 4)
  assert index.recall_vs_exact(np.array([[-1, 1], [3, -1]]), np.array([[1, 2], [2, 3]]), 2) == 0.5
  with pytest.raises(ValueError, match="exceeds"):
    index.recall_vs_exact(approx[:, :2], exact, 4)


def test_derive_scann_params():
  p = index.derive_scann_params(1_000_000, 128)
  assert p["num_leaves"] == 1000 and not p["brute_force"] and p["num_leaves_to_search"] == 30
  assert index.derive_scann_params(1_000_000, 128, {"leaves_per_sqrt_n": 2})["num_leaves"] == 2000
  assert index.derive_scann_params(20_000, 8)["num_leaves_to_search"] == 10  # the minimum
  # A small catalogue's searched leaves hold >= min_candidates_per_k * search_k products: 55 leaves of ~55.
  assert index.derive_scann_params(3000, 8)["num_leaves_to_search"] == 19  # ceil(10 * 100 * 55 / 3000)
  assert index.derive_scann_params(3000, 8, {"search_k": 10})["num_leaves_to_search"] == 10
  assert index.derive_scann_params(3000, 8, {"min_candidates_per_k": 0})["num_leaves_to_search"] == 10
  with pytest.raises(ValueError, match="min_candidates_per_k"):
    index.derive_scann_params(3000, 8, {"min_candidates_per_k": -1})
  assert 1 <= p["num_leaves_to_search"] < p["num_leaves"]
  assert index.derive_scann_params(500, 8)["brute_force"]
  assert index.derive_scann_params(5000, 8, {"num_leaves_to_search": 9999})["num_leaves_to_search"] == 71
  with pytest.raises(ValueError, match="unknown ScaNN parameter"):
    index.derive_scann_params(5000, 8, {"num_leafs": 3})


def test_scann_small_db_falls_back_to_brute_force_and_is_exact():
  db, q = _clustered(600, 16, 8, seed=1)
  ann = index.ScannIndex.build(db)
  assert ann.params["brute_force"]
  a_idx, a_s = ann.search(q, 20)
  e_idx, e_s = index.exact_search(q, db, 20)
  assert index.recall_vs_exact(a_idx, e_idx) == 1.0
  np.testing.assert_allclose(a_s, e_s, rtol=1e-5, atol=1e-5)


def test_scann_tree_agrees_with_exact_and_round_trips(tmp_path):
  db, q = _clustered(4000, 32, 20, seed=2)
  ann = index.ScannIndex.build(db, {"num_leaves": 40, "num_leaves_to_search": 20, "reorder": 200,
                                    "training_threads": 1})
  assert not ann.params["brute_force"]
  a_idx, a_s = ann.search(q, 50)
  e_idx, _ = index.exact_search(q, db, 50)
  assert index.recall_vs_exact(a_idx, e_idx, 50) >= 0.97
  assert a_idx.shape == (64, 50) and a_idx.dtype == np.int64
  # Sorted by score, then index (re-scored exactly, so the top scores match float dot products).
  assert (np.diff(a_s, axis=1) <= 0).all()
  np.testing.assert_allclose(a_s[:, 0], np.einsum("qd,qd->q", q, db[a_idx[:, 0]]), rtol=1e-5, atol=1e-5)
  one_idx, one_s = ann.search_one(q[3], 50)
  np.testing.assert_array_equal(one_idx, a_idx[3])

  saved = tmp_path / "saved"
  ann.save(str(saved))
  cfg = json.loads((saved / index.SCANN_CONFIG_FILE).read_text())
  assert cfg["params"]["num_leaves"] == 40 and cfg["distance"] == "dot_product"
  moved = tmp_path / "moved"  # relative asset paths: the folder may be moved after saving
  shutil.move(str(saved), str(moved))
  loaded = index.ScannIndex.load(str(moved))
  l_idx, l_s = loaded.search(q, 50)
  np.testing.assert_array_equal(l_idx, a_idx)
  np.testing.assert_array_equal(l_s, a_s)
  assert loaded.params == ann.params


def test_scann_load_missing_config(tmp_path):
  with pytest.raises(FileNotFoundError, match="mmr_index_config.json"):
    index.ScannIndex.load(str(tmp_path))


def test_scann_pads_and_sorts_ties():
  db = np.array([[1, 0], [2, 0], [1, 0], [0, 1]], np.float32)
  ann = index.ScannIndex.build(db)
  idx, scores = ann.search(np.array([[1, 0]], np.float32), 6)
  np.testing.assert_array_equal(idx, [[1, 0, 2, 3, -1, -1]])
  assert np.isneginf(scores[0, 4:]).all()


def test_scann_unfilled_slots_are_padding_in_both_search_paths():
  # One small leaf searched (~10 points): fewer candidates than k. The batched search reports the missing
  # slots as index 0 with a NaN score, the sequential one as -1; both must come back as padding. (The two
  # paths may pick different leaves for a query on a border, so only their form is compared.)
  rng = np.random.default_rng(0)
  db = _unit(rng.standard_normal((3000, 16)))
  q = _unit(db[:4] + 0.01)
  ann = index.ScannIndex.build(db, {"num_leaves": 300, "num_leaves_to_search": 1, "min_partition_size": 10})
  idx, scores = ann.search(q, 100)
  assert (idx == -1).any(axis=1).all(), "the setup must leave slots unfilled"
  assert (idx >= 0).any(), "and find something"
  rows = [(idx[i], scores[i]) for i in range(len(q))] + [ann.search_one(one, 100) for one in q]
  for row, row_s in rows:
    n = int((row >= 0).sum())
    assert n < 100 and (row[n:] == -1).all()  # found ones first, then padding (an empty leaf: all padding)
    assert len(set(row[:n].tolist())) == n  # product 0 is not repeated as filler
    assert np.isneginf(row_s[n:]).all() and np.isfinite(row_s[:n]).all() and (np.diff(row_s[:n]) <= 0).all()


def test_bench_ann_smoke(tmp_path, capsys):
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools", "bench_ann.py")
  spec = importlib.util.spec_from_file_location("bench_ann", path)
  bench = importlib.util.module_from_spec(spec)
  sys.modules["bench_ann"] = bench  # dataclasses resolve annotations through sys.modules
  spec.loader.exec_module(bench)
  out = tmp_path / "ann.json"
  result = bench.main(["--n", "3000", "--d", "16", "--clusters", "20", "--queries", "40",
                       "--single_queries", "5", "--repeats", "1", "--skip_faiss",
                       "--scann_variants", '[{"leaves_per_sqrt_n": 1}]', "--scann_reorder", "150",
                       "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["n"] == 3000 and saved["d"] == 16 and saved["exact"]["qps"] > 0
  assert {"qps", "qps_single", "recall@10", "recall@100", "build_s"} <= set(saved["scann"])
  assert 0.0 < saved["scann"]["recall@100"] <= 1.0
  assert saved["faiss_hnsw"] == {"skipped": "--skip_faiss"}
  assert saved["speedup_scann_vs_exact"] == result["speedup_scann_vs_exact"]
  assert json.loads(capsys.readouterr().out)["n"] == 3000
