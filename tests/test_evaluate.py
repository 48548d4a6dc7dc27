"""Evaluation on any embeddings, on a trained workdir, and the ablation job end to end."""

import json
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

from mmr_jax import ablation
from mmr_jax import config as config_lib
from mmr_jax.evals import embedding
from mmr_jax.evals import report
from mmr_jax.evals import retrieval
from mmr_jax import evaluate
from mmr_jax import sweep_runner

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_evaluate_embeddings_hand_built_case():
  rng = np.random.default_rng(0)
  products = _unit(rng.normal(size=(300, 16)).astype(np.float32))
  # Query 0 is product 5 itself (rank 1); query 1 is far from its relevant product 200.
  queries = np.stack([products[5], -products[200]])
  labels = [{5: 1.0, 6: 0.1}, {200: 1.0}]
  num_words = np.arange(300)  # products 0..74 are the sparse quarter
  res = retrieval.evaluate_embeddings(products, {"test": {"emb": queries, "labels": labels,
                                                         "tags": [["visual"], ["textual"]]}}, num_words)
  r = res["splits"]["test"]
  assert r["exact"]["recall@10"] == pytest.approx(0.5)  # query 0 finds 5, query 1 does not find 200
  assert r["exact"]["mrr"] == pytest.approx(0.5)
  assert r["by_tag_exact"]["visual"]["recall@10"] == 1.0 and r["by_tag_exact"]["textual"]["recall@10"] == 0.0
  assert r["by_sparsity"]["sparse_products"]["num_queries"] == 1  # query 0's E product 5 is sparse, 200 is not
  assert r["by_sparsity"]["dense_products"]["num_queries"] == 1
  assert r["scann_recall_vs_exact"] == pytest.approx(1.0)  # small N: ScaNN is brute force
  assert res["sparse_words_threshold"] == pytest.approx(np.quantile(num_words, 0.25))
  # Each query's values are kept, with the query groups, to pair two rankings of the same queries.
  assert r["per_query_exact"]["recall@100"] == [1.0, 0.0] and r["per_query_exact"]["ndcg@10"][1] == 0.0
  assert np.mean(r["per_query_exact"]["ndcg@10"]) == pytest.approx(r["exact"]["ndcg@10"], abs=1e-6)
  assert r["query_groups"]["by_tag"] == {"textual": [1], "visual": [0]}
  assert r["query_groups"]["by_sparsity"] == {"sparse_products": [0], "dense_products": [1]}
  assert r["query_groups"]["fingerprint"] == retrieval.query_fingerprint(labels)
  assert retrieval.query_fingerprint([{5: 1.0}, {200: 1.0}]) != retrieval.query_fingerprint(labels)
  md = report.markdown_report(res)
  assert "| test | exact | 50.0 |" in md
  assert "ScaNN searched by brute force (fewer than brute_force_below=2048 products)" in md


def test_ablation_rows_compare_models_by_exact_search_whatever_the_index():
  # ScaNN's build is randomised: the same embeddings rank differently from one index to the next. A row of the
  # ablation (and the hybrid) must not move with the index; ScaNN's own metrics sit beside it.
  rng = np.random.default_rng(0)
  centres = _unit(rng.normal(size=(30, 16)))
  products = _unit(centres[rng.integers(30, size=3000)] + 0.3 * rng.normal(size=(3000, 16))).astype(np.float32)
  targets = rng.integers(3000, size=120)
  queries = _unit(products[targets] + 0.3 * rng.normal(size=(120, 16))).astype(np.float32)
  labels = [{int(t): 1.0} for t in targets]
  tags = [["visual"] if i % 2 else ["textual"] for i in range(120)]
  kw = {"test": (rng.permuted(np.tile(np.arange(100), (120, 1)), axis=1), np.tile(np.linspace(9, 0, 100), (120, 1)))}
  num_words = rng.integers(1, 30, size=3000)
  rows, results = [], []
  for leaves in (1, 40):  # a poor index and a good one over the same embeddings
    res = retrieval.evaluate_embeddings(products, {"test": {"emb": queries, "labels": labels, "tags": tags}},
                                        num_words, scann_params={"num_leaves_to_search": leaves},
                                        keyword_rankings=kw)
    results.append(res["splits"]["test"])
    rows.append([ablation.row_summary("m", res)] + ablation.keyword_rows({"m": res}))
  poor, good = results
  assert poor["scann_recall_vs_exact"] < good["scann_recall_vs_exact"]
  assert poor["overall"]["recall@100"] != good["overall"]["recall@100"]  # ScaNN's ranking moved ...
  model_only = lambda r: {k: r[k] for k in ("row", "overall", "by_tag", "by_sparsity")}  # noqa: E731
  assert [model_only(r) for r in rows[0]] == [model_only(r) for r in rows[1]]  # ... the rows did not, hybrid included
  assert [r["row"] for r in rows[0]] == ["m", "bm25", "hybrid"]
  m = rows[0][0]
  assert m["overall"]["recall@100"] == pytest.approx(good["exact"]["recall@100"])
  assert m["by_tag"]["visual"]["ndcg@10"] == pytest.approx(good["by_tag_exact"]["visual"]["ndcg@10"])
  assert {k: v["ndcg@10"] for k, v in m["by_sparsity"].items()} == {
      k: v["ndcg@10"] for k, v in good["by_sparsity_exact"].items()}
  assert m["scann"]["recall@100"] == pytest.approx(poor["overall"]["recall@100"])
  assert "| m |" in ablation.table(rows[0]) and "ScaNN R@100" in ablation.table(rows[0])
  old = {"splits": {"test": {k: v for k, v in poor.items() if k != "by_sparsity_exact"}}}
  with pytest.raises(KeyError, match="older mmr_jax.evaluate"):
    ablation.row_summary("m", old)


def test_evaluate_workdir_writes_reports(tiny_workdir, tiny_data):
  res = evaluate.evaluate_workdir(tiny_workdir, tiny_data, splits=("test", "test_novel_product"))
  wd = pathlib.Path(tiny_workdir)
  saved = json.loads((wd / "metrics.json").read_text())
  # Validation is scored too: the hybrid (learned + BM25) tunes its fusion weight there.
  assert set(saved["splits"]) == {"test", "test_novel_product", "validation"}
  assert saved["fusion"]["tuned_on"] == "validation"
  for split in saved["splits"].values():
    assert split["bm25"]["overall"]["num_queries"] == split["overall"]["num_queries"]
    for k in ("recall@10", "recall@100", "ndcg@10", "mrr"):
      assert 0.0 <= split["overall"][k] <= 1.0
    assert 0.0 <= split["scann_recall_vs_exact"] <= 1.0
    assert split["by_tag"], "no per-tag breakdown"
  # metrics.json is the summary; each query's values are in metrics_per_query.json, and load_results joins them.
  assert "per_query_exact" not in saved["splits"]["test"] and "per_query" not in saved["splits"]["test"]["bm25"]
  per_query = json.loads((wd / "metrics_per_query.json").read_text())
  assert set(per_query) == set(saved["splits"])
  assert set(per_query["test"]) == {"per_query_exact", "query_groups", "bm25_per_query", "hybrid_per_query"}
  loaded = evaluate.load_results(tiny_workdir)["splits"]["test"]
  assert np.nanmean(loaded["per_query_exact"]["ndcg@10"]) == pytest.approx(saved["splits"]["test"]["exact"]["ndcg@10"])
  assert np.nanmean(loaded["bm25"]["per_query"]["recall@100"]) == pytest.approx(
      saved["splits"]["test"]["bm25"]["overall"]["recall@100"])
  assert json.dumps(retrieval.join_per_query(*retrieval.split_per_query(res)), sort_keys=True, default=float) == \
      json.dumps(json.loads(json.dumps(res, default=float)), sort_keys=True, default=float)
  assert (wd / "metrics.md").read_text().startswith("# Retrieval metrics")
  assert (wd / "recall_at_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  emb = np.load(wd / "product_embeddings.npy")
  assert emb.shape[0] == res["num_products"]
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
  from mmr_jax.evals import index as index_lib  # pylint: disable=g-import-not-at-top
  idx = index_lib.ScannIndex.load(str(wd / "index"))
  got, _ = idx.search(emb[:3], 1)
  np.testing.assert_array_equal(got[:, 0], [0, 1, 2])  # each product is its own nearest neighbour
  # The reported numbers are the model's: re-embed the test queries, search the saved product embeddings
  # exactly and score with the labels; BM25's are keyword.BM25's on the catalogue text.
  from mmr_jax.evals import keyword, metrics  # pylint: disable=g-import-not-at-top
  from mmr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  tm = embedding.load_trained(tiny_workdir, tiny_data)
  q = retrieval.load_queries(tiny_data, "test")
  q_emb, _ = embedding.embed_table(tm.embed_queries, pipeline.make_eval_iterator(tiny_data, "queries", "test",
                                                                                 tm.config.data, 8))
  ranked, _ = index_lib.exact_search(q_emb, emb, 100)
  want = metrics.compute_metrics(ranked, q["labels"])
  for k in ("recall@10", "recall@100", "ndcg@10", "mrr"):
    assert saved["splits"]["test"]["exact"][k] == pytest.approx(want[k], abs=1e-6), k
  _, texts = retrieval.load_products(tiny_data)
  bm25_ranked, _ = keyword.BM25(texts).search(q["text"], 100)
  assert saved["splits"]["test"]["bm25"]["overall"]["ndcg@10"] == pytest.approx(
      metrics.compute_metrics(bm25_ranked, q["labels"])["ndcg@10"])
  assert saved["splits"]["test"]["bm25"]["overall"]["ndcg@10"] > 0.2  # keyword search finds the products


def test_model_mined_hard_negatives_come_from_a_runs_product_embeddings(tiny_data, tmp_path, capsys):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from mmr_jax import train  # pylint: disable=g-import-not-at-top
  from mmr_jax.data import hard_negatives, pipeline, tfds_builder  # pylint: disable=g-import-not-at-top
  run = tmp_path / "stage1"  # a stage-1 run: its product tower is what the ablation's rows mine with
  train.train_and_evaluate(tiny_config(tiny_data, stage=1, steps=2, progress=False), str(run))
  mined = run / evaluate.CATALOGUE_EMBEDDINGS
  # The ablation embeds the named run first when its catalogue embeddings are not there yet.
  cfg = tiny_config(tiny_data)
  cfg.data.hard_negative_embeddings = str(mined)
  ablation._InProcess({"row": cfg}, tiny_data)._embed_for_mining(sweep_runner.Point("row", {}))
  emb = np.load(mined)
  tm = embedding.load_trained(str(run), tiny_data)
  want, _ = embedding.embed_table(tm.embed_products, pipeline.make_eval_iterator(tiny_data, "products", "all",
                                                                                 tm.config.data, 64))
  np.testing.assert_allclose(emb, want, atol=1e-5)  # the run's product tower, every product in index order
  assert not (run / "metrics.json").exists() and not (run / "index").exists()  # embeddings only
  assert not (run / "product_embeddings.npy").exists()  # export trusts that one beside an index
  mined.unlink()
  evaluate.main(["--workdir", str(run), "--products_only"])
  assert capsys.readouterr().out.strip() == str(mined)
  np.testing.assert_array_equal(np.load(mined), emb)
  # Training groups then draw each example's companions from the products that model puts nearest.
  data = cfg.data
  data.update(dict(batch_size=8, num_workers=0, hard_negatives=1, hard_negative_pool=3))
  products = tfds_builder.load_source(tiny_data, "products", "all")
  nearest = hard_negatives.nearest_by_embedding(emb, hard_negatives.heldout_flags(products), 3)
  bm25 = hard_negatives.neighbours(products, 3)
  it = pipeline.make_train_iterator(tiny_data, 2, data, seed=0, process_index=0, process_count=1)
  from_bm25 = 0
  for _ in range(3):
    b = next(it)
    for g in range(0, 8, 2):
      anchor, other = int(b["product_index"][g]), int(b["product_index"][g + 1])
      assert other in nearest[anchor]
      from_bm25 += other in bm25[anchor]
  assert from_bm25 < 12  # not BM25's pool


def test_an_ablation_row_that_mines_with_stage_1_still_trains_stage_1s_steps(tiny_data, tmp_path):
  mod = sweep_runner.load_config_module(str(ROOT / "configs" / "demo.py"))
  points, configs = ablation._points(tmp_path, tiny_data, "demo", mod, ("text_only", "text_only_mined", "fusion_ft"),
                                     6, 4, 16, "", {}, "default")
  by = {p.name: p for p in points}
  assert [p.name for p in points] == ["stage1", "text_only", "fusion_ft", "fusion_ft_no_q2f", "text_only_mined"]
  assert by["text_only_mined"].depends == ("stage1",)  # runs after stage 1, whose products it mines with
  mined = configs["text_only_mined"]
  assert mined.data.hard_negative_embeddings == str(tmp_path / "stage1" / evaluate.CATALOGUE_EMBEDDINGS)
  assert mined.data.hard_negatives == 1 and not mined.init.workdir
  # ... but starts from scratch, so it trains the steps text_only does, not fusion_ft's stage-2 share.
  assert mined.train.steps == configs["text_only"].train.steps == 10 and configs["fusion_ft"].train.steps == 6


def test_the_ablations_budget_scales_every_rows_steps_and_reaches_the_config(tiny_data, tmp_path):
  mod = sweep_runner.load_config_module(str(ROOT / "configs" / "demo.py"))
  rows = ("text_only", "fusion_ft")
  _, default = ablation._points(tmp_path, tiny_data, "demo", mod, rows, 6, 4, 16, "", {}, "default")
  _, long = ablation._points(tmp_path, tiny_data, "demo", mod, rows, 6, 4, 16, "", {}, "long")
  assert [long[n].train.steps for n in ("stage1", *rows)] == [20, 50, 30]
  assert [default[n].train.steps for n in ("stage1", *rows)] == [4, 10, 6]
  # The config's own setting for the long budget (configs/demo.py: the fused branch's term at half weight).
  assert (default["fusion_ft"].loss.aux_query_fused, long["fusion_ft"].loss.aux_query_fused) == (1.0, 0.5)
  # Without --steps the config's own counts, multiplied.
  _, own = ablation._points(tmp_path, tiny_data, "demo", mod, ("fusion_ft",), 0, 0, 16, "", {}, "long")
  assert own["fusion_ft"].train.steps == 5 * mod.get_config("stage=2").train.steps
  with pytest.raises(ValueError, match="--budget"):
    ablation._points(tmp_path, tiny_data, "demo", mod, rows, 6, 4, 16, "text=S, budget=long", {}, "default")
  # A config that does not take budget= runs at the default budget, and says so at another.
  plain = types.SimpleNamespace(
      get_config=lambda arg=None: config_lib.apply_budget(
          config_lib.base_config(), config_lib.parse_arg(arg, stage=2, runlocal=False, steps=0, batch=0)),
      get_sweep=lambda arg=None: [{"name": "text_only", "model.variant": "text_only"}])
  _, cfgs = ablation._points(tmp_path, tiny_data, "plain", plain, ("text_only",), 6, 4, 16, "", {}, "default")
  assert cfgs["text_only"].train.steps == 6
  with pytest.raises(ValueError, match="plain's get_config does not take budget="):
    ablation._points(tmp_path, tiny_data, "plain", plain, ("text_only",), 0, 0, 16, "", {}, "long")


def test_text_only_ft_is_the_stage_1_rows_without_an_image_and_the_margins_say_what_the_image_adds(tiny_data,
                                                                                                    tmp_path):
  mod = sweep_runner.load_config_module(str(ROOT / "configs" / "demo.py"))
  points, configs = ablation._points(tmp_path, tiny_data, "demo", mod, ("text_only_ft", "fusion_ft"), 6, 4, 16, "",
                                     {}, "default")
  assert {p.name: p for p in points}["text_only_ft"].depends == ("stage1",)
  control, fusion = configs["text_only_ft"], configs["fusion_ft"]
  assert control.model.variant == "text_only" and control.init.workdir == fusion.init.workdir
  assert tuple(control.init.load) == tuple(fusion.init.load) and control.train.steps == fusion.train.steps == 6

  def row(name, recall, ndcg):
    m = {"recall@100": recall, "ndcg@10": ndcg}
    return {"row": name, "overall": m, "by_tag": {"visual": m}, "by_sparsity": {}, "splits": {},
            "scann_recall_vs_exact": 1.0}
  rows = [row("text_only_ft", 0.70, 0.50), row("fusion_ft", 0.76, 0.49), row("concat_ft", 0.68, 0.55)]
  ablation._write_reports(tmp_path, tiny_data, "demo", {"num_products": 300}, rows, {})
  adds = json.loads((tmp_path / "ablation_margins.json").read_text())["image_adds"]
  assert adds["fusion_ft"]["overall"] == pytest.approx({"recall@100": 6.0, "ndcg@10": -1.0})
  assert adds["concat_ft"]["tag:visual"] == pytest.approx({"recall@100": -2.0, "ndcg@10": 5.0})
  md = (tmp_path / "ablation.md").read_text()
  assert "What the image adds" in md and "- fusion_ft: overall: R@100 +6.0, NDCG@10 -1.0" in md
  # Without the control row there is nothing to subtract.
  ablation._write_reports(tmp_path, tiny_data, "demo", {"num_products": 300}, rows[1:], {})
  assert json.loads((tmp_path / "ablation_margins.json").read_text())["image_adds"] == {}
  assert "What the image adds" not in (tmp_path / "ablation.md").read_text()


def test_a_row_chosen_on_validation_brings_its_alternative_unless_set_makes_them_the_same_run(tiny_data, tmp_path):
  mod = sweep_runner.load_config_module(str(ROOT / "configs" / "demo.py"))
  points, configs = ablation._points(tmp_path, tiny_data, "demo", mod, ("text_only", "fusion_ft"), 6, 4, 16, "", {},
                                     "default")
  by = {p.name: p for p in points}
  assert [p.name for p in points] == ["stage1", "text_only", "fusion_ft", "fusion_ft_no_q2f"]
  assert by["fusion_ft_no_q2f"].depends == ("stage1",)
  row, alt = configs["fusion_ft"], configs["fusion_ft_no_q2f"]
  assert (row.loss.aux_query_fused, alt.loss.aux_query_fused) == (1.0, 0.0)
  # The same run otherwise: same stage 1, steps, stream and settings.
  assert ablation._setting_differences(configs, {"fusion_ft": ("fusion_ft_no_q2f",)}) == {
      "fusion_ft": {"loss.aux_query_fused": {"fusion_ft": 1.0, "fusion_ft_no_q2f": 0.0}}}
  # --set that gives the row the alternative's setting leaves nothing to choose between: trained once.
  points, configs = ablation._points(tmp_path, tiny_data, "demo", mod, ("fusion_ft",), 6, 4, 16, "",
                                     {"loss.aux_query_fused": "0"}, "default")
  assert [p.name for p in points] == ["stage1", "fusion_ft"] and "fusion_ft_no_q2f" not in configs
  # A choice naming a row the sweep lacks is refused, naming it.
  broken = types.SimpleNamespace(get_config=mod.get_config, get_sweep=mod.get_sweep,
                                 CHOSEN_ON_VALIDATION={"fusion_ft": ("fusion_ft_nope",)})
  with pytest.raises(KeyError, match="fusion_ft_nope"):
    ablation._points(tmp_path, tiny_data, "broken", broken, ("fusion_ft",), 6, 4, 16, "", {}, "default")
  # ... as is a row among its own alternatives, or an alternative of two rows.
  for bad in ({"fusion_ft": ("fusion_ft",)}, {"fusion_ft": ("text_only_ft",), "concat_ft": ("text_only_ft",)}):
    broken.CHOSEN_ON_VALIDATION = bad
    with pytest.raises(ValueError, match="alternative of one row only"):
      ablation._points(tmp_path, tiny_data, "broken", broken, ("fusion_ft",), 6, 4, 16, "", {}, "default")


def test_hybrid_fuses_the_row_with_the_best_validation_mean_of_recall_and_ndcg(monkeypatch):
  monkeypatch.setattr(ablation, "row_summary", lambda name, results, split, system="exact": {"row": name,
                                                                                            "from": results["name"]})
  def results(name, val):
    return {"name": name, "fusion": {"method": "zscore", "weight": 0.5},
            "splits": {"test": {"bm25": {}}, "validation": {"exact": {"recall@100": val[0], "ndcg@10": val[1],
                                                                      "num_queries": 50}}}}
  # fusion_ft has the best validation NDCG@10, concat_ft the best mean of R@100 and NDCG@10: concat_ft is fused.
  rows = {"text_only": results("text_only", (0.70, 0.60)), "concat_ft": results("concat_ft", (0.90, 0.70)),
          "fusion_ft": results("fusion_ft", (0.80, 0.72))}
  bm25, hybrid = ablation.keyword_rows(rows)
  assert (bm25["row"], hybrid["row"], hybrid["learned_row"], hybrid["from"]) == ("bm25", "hybrid", "concat_ft",
                                                                                 "concat_ft")
  # Without validation queries: the last row.
  for r in rows.values():
    del r["splits"]["validation"]
  assert ablation.keyword_rows(rows)[1]["learned_row"] == "fusion_ft"


def test_choose_on_validation_takes_the_run_the_validation_queries_rank_best_and_says_so(tmp_path):
  def results(val, test):
    split = lambda m: {"exact": {"recall@100": m[0], "ndcg@10": m[1], "num_queries": 50}}  # noqa: E731
    return {"splits": {"test": split(test)} | ({"validation": split(val)} if val else {})}
  choices = {"fusion_ft": ("fusion_ft_no_q2f",)}
  settings = {"fusion_ft": {"loss.aux_query_fused": {"fusion_ft": 1.0, "fusion_ft_no_q2f": 0.0}}}
  base = {"text_only": results((0.7, 0.6), (0.7, 0.6))}
  # The alternative ranks the validation queries better (R@100 +3, NDCG@10 -1): it is the row.
  out, chosen = ablation.choose_on_validation(
      base | {"fusion_ft": results((0.80, 0.70), (0.9, 0.5)), "fusion_ft_no_q2f": results((0.83, 0.69), (0.1, 0.1))},
      choices, settings)
  assert list(out) == ["text_only", "fusion_ft"] and out["fusion_ft"]["splits"]["test"]["exact"]["ndcg@10"] == 0.1
  assert chosen["fusion_ft"]["run"] == "fusion_ft_no_q2f"
  assert chosen["fusion_ft"]["validation"]["fusion_ft"]["score"] == pytest.approx(0.75)
  # By the mean of the two metrics, not by R@100 alone (+1 R@100, -5 NDCG@10: the row stays).
  _, chosen = ablation.choose_on_validation(
      base | {"fusion_ft": results((0.80, 0.75), (0.1, 0.1)), "fusion_ft_no_q2f": results((0.81, 0.70), (0.9, 0.9))},
      choices)
  assert chosen["fusion_ft"]["run"] == "fusion_ft"
  # ... not by the test queries, and the row itself on a tie.
  out, chosen = ablation.choose_on_validation(
      base | {"fusion_ft": results((0.80, 0.70), (0.1, 0.1)), "fusion_ft_no_q2f": results((0.70, 0.80), (0.9, 0.9))},
      choices)
  assert chosen["fusion_ft"]["run"] == "fusion_ft" and out["fusion_ft"]["splits"]["test"]["exact"]["ndcg@10"] == 0.1
  # Without validation queries there is nothing to choose on: the row as configured.
  out, chosen = ablation.choose_on_validation(
      base | {"fusion_ft": results(None, (0.1, 0.1)), "fusion_ft_no_q2f": results(None, (0.9, 0.9))}, choices)
  assert chosen["fusion_ft"]["run"] == "fusion_ft" and chosen["fusion_ft"]["validation"]["fusion_ft"] is None
  # A row run without its alternative (or an alternative without its row) is left as it is.
  assert ablation.choose_on_validation(base | {"fusion_ft": results((0.8, 0.7), (0.1, 0.1))}, choices)[1] == {}
  alone = base | {"fusion_ft_no_q2f": results((0.8, 0.7), (0.1, 0.1))}
  assert ablation.choose_on_validation(alone, choices) == (alone, {})
  # ablation.md says which run the row is, what each scored on the validation queries and how they differ.
  out, chosen = ablation.choose_on_validation(
      base | {"fusion_ft": results((0.80, 0.70), (0.9, 0.5)), "fusion_ft_no_q2f": results((0.83, 0.69), (0.1, 0.1))},
      choices, settings)
  m = {"recall@100": 0.5, "ndcg@10": 0.5}
  rows = [{"row": n, "overall": m, "by_tag": {}, "by_sparsity": {}, "splits": {}, "scann_recall_vs_exact": 1.0}
          | ({"chosen": chosen[n]} if n in chosen else {}) for n in out]
  ablation._write_reports(tmp_path, "DATA", "demo", {"num_products": 300}, rows, {})
  assert ("- fusion_ft: fusion_ft_no_q2f (validation R@100 / NDCG@10 83.0 / 69.0; fusion_ft 80.0 / 70.0; they differ "
          "in loss.aux_query_fused: fusion_ft 1.0, fusion_ft_no_q2f 0.0)") in (tmp_path / "ablation.md").read_text()
  saved = json.loads((tmp_path / "ablation.json").read_text())
  assert saved[1]["chosen"]["run"] == "fusion_ft_no_q2f"


def test_margins_carry_a_paired_interval_over_the_queries_and_pool_it_over_seeds(tmp_path):
  rng = np.random.default_rng(0)
  centres = _unit(rng.normal(size=(30, 16)))
  products = _unit(centres[rng.integers(30, size=1000)] + 0.3 * rng.normal(size=(1000, 16))).astype(np.float32)
  targets = rng.integers(1000, size=200)
  queries = _unit(products[targets] + 0.3 * rng.normal(size=(200, 16))).astype(np.float32)
  split = {"emb": queries, "labels": [{int(t): 1.0} for t in targets],
           "tags": [["visual"] if i % 2 else ["textual"] for i in range(200)]}
  blurred = _unit(products + 0.6 * rng.normal(size=products.shape)).astype(np.float32)

  def row(name, emb, q=split):
    return ablation.row_summary(name, retrieval.evaluate_embeddings(emb, {"test": q}, np.arange(1000)))

  good, worse = row("fusion_ft", products), row("text_only", blurred)
  g = ablation.margins([worse, good])
  for group in ("overall", "tag:visual", "tag:textual"):
    for m in ("recall@100", "ndcg@10"):
      low, high = g[group]["ci95"][m]
      assert 0 < low <= g[group][m] <= high, (group, m)  # sharper embeddings win, and 200 queries say so
  # The same ranking twice: margin 0, interval [0, 0].
  assert ablation.margins([row("text_only", products), good])["overall"]["ci95"]["ndcg@10"] == [0.0, 0.0]
  # Rows of other queries, or without per-query values (evaluated before they were kept), get no interval.
  other = dict(split, labels=[{int(t) + 1: 1.0} for t in targets])
  assert "ci95" not in ablation.margins([row("text_only", blurred, other), good])["overall"]
  assert "ci95" not in ablation.margins([dict(worse, per_query=None), good])["overall"]
  ablation._write_reports(tmp_path, "DATA", "demo", {"num_products": 1000}, [worse, good], {})
  saved = json.loads((tmp_path / "ablation_margins.json").read_text())["fusion_ft_minus_text_only"]
  assert saved["overall"]["ci95"]["ndcg@10"] == pytest.approx(g["overall"]["ci95"]["ndcg@10"])
  o = g["overall"]
  assert (f"overall: R@100 {o['recall@100']:+.1f} [{o['ci95']['recall@100'][0]:+.1f}, "
          f"{o['ci95']['recall@100'][1]:+.1f}]") in (tmp_path / "ablation.md").read_text()
  # Over seeds, each query's margin is averaged over the seeds first: two identical seeds give one seed's interval,
  # and a seed with no margin halves it.
  summary = ablation.seed_summary({0: [worse, good], 1: [worse, good]})
  assert summary["fusion_ft_minus_text_only"]["overall"]["ndcg@10"]["ci95"] == pytest.approx(o["ci95"]["ndcg@10"])
  level = ablation.seed_summary({0: [worse, good], 1: [dict(good, row="text_only"), good]})
  assert level["fusion_ft_minus_text_only"]["overall"]["ndcg@10"]["ci95"] == pytest.approx(
      [x / 2 for x in o["ci95"]["ndcg@10"]])
  # fusion_ft - concat_ft (what the fusion network adds) is followed the same way, where the run has concat_ft.
  assert level["fusion_ft_minus_concat_ft"] == {}
  with_concat = ablation.seed_summary({s: [worse, good, dict(worse, row="concat_ft")] for s in (0, 1)})
  assert with_concat["fusion_ft_minus_concat_ft"]["overall"]["ndcg@10"]["ci95"] == pytest.approx(o["ci95"]["ndcg@10"])
  rows = [worse, good, dict(worse, row="concat_ft")]
  ablation._write_reports(tmp_path, "DATA", "demo", {"num_products": 1000}, rows, {})
  saved = json.loads((tmp_path / "ablation_margins.json").read_text())["fusion_ft_minus_concat_ft"]
  want = ablation.margins(rows, "fusion_ft", "concat_ft")["overall"]["ndcg@10"]
  assert saved["overall"]["ndcg@10"] == pytest.approx(want)
  assert "fusion_ft minus concat_ft (what the fusion network adds" in (tmp_path / "ablation.md").read_text()


def test_evaluate_cli_help():
  r = subprocess.run([sys.executable, "-m", "mmr_jax.evaluate", "--help"], cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 0 and "--workdir" in r.stdout


@pytest.mark.slow
def test_ablation_end_to_end(tiny_data, tmp_path):
  rows = ablation.run(str(tmp_path / "abl"), tiny_data, str(ROOT / "configs" / "demo.py"),
                      rows=("text_only", "fusion_ft"), steps=6, stage1_steps=4, batch=16)
  out = json.loads((tmp_path / "abl" / "ablation.json").read_text())
  assert [r["row"] for r in out] == ["text_only", "fusion_ft", "bm25", "hybrid"] == [r["row"] for r in rows]
  by = {r["row"]: r for r in out}
  # BM25 and the hybrid are scored on the same test queries, with the same breakdowns.
  assert by["bm25"]["by_tag"].keys() == by["text_only"]["by_tag"].keys()
  assert by["bm25"]["overall"]["num_queries"] == by["text_only"]["overall"]["num_queries"]
  assert by["hybrid"]["learned_row"] in ("text_only", "fusion_ft")
  assert by["hybrid"]["fusion"]["tuned_on"] == "validation"
  minus = json.loads((tmp_path / "abl" / "ablation_margins.json").read_text())["minus_bm25"]
  assert minus["fusion_ft"]["overall"]["ndcg@10"] == pytest.approx(
      100 * (by["fusion_ft"]["overall"]["ndcg@10"] - by["bm25"]["overall"]["ndcg@10"]))
  assert "| hybrid (" in (tmp_path / "abl" / "ablation.md").read_text()
  for r in out[:2]:
    # The table's row is the row's own evaluation of the test split: exact search, ScaNN beside it.
    test = json.loads((tmp_path / "abl" / r["row"] / "metrics.json").read_text())["splits"]["test"]
    for m in ("recall@100", "ndcg@10", "mrr"):
      assert r["overall"][m] == test["exact"][m] and r["scann"][m] == test["overall"][m]
    assert r["by_tag"] and r["by_tag"].keys() == test["by_tag_exact"].keys()
    for tag, got in r["by_tag"].items():
      assert got["ndcg@10"] == test["by_tag_exact"][tag]["ndcg@10"]
    assert r["scann_recall_vs_exact"] == test["scann_recall_vs_exact"] > 0.9
  assert (tmp_path / "abl" / "stage1" / "DONE").exists()
  cfg = json.loads((tmp_path / "abl" / "fusion_ft" / "config.json").read_text())
  assert cfg["init"]["workdir"] == str(tmp_path / "abl" / "stage1")
  # Stage 1 read stage 2's pairs: fusion_ft's stage 2 read them on from where stage 1 stopped, text_only from the start.
  assert cfg["data"]["stream_offset"] == 4
  # fusion_ft was trained with and without the query <-> fused term; the row is the one validation ranked best.
  choice = by["fusion_ft"]["chosen"]
  assert set(choice["validation"]) == {"fusion_ft", "fusion_ft_no_q2f"}
  scores = {n: v["score"] for n, v in choice["validation"].items()}
  assert choice["run"] == max(scores, key=scores.get)
  picked = evaluate.load_results(str(tmp_path / "abl" / choice["run"]))["splits"]["test"]["exact"]
  assert by["fusion_ft"]["overall"]["ndcg@10"] == pytest.approx(picked["ndcg@10"])
  assert "Chosen on the validation queries" in (tmp_path / "abl" / "ablation.md").read_text()
  learned = by["hybrid"]["learned_row"]
  assert by["hybrid"]["learned_run"] == (choice["run"] if learned == "fusion_ft" else learned)
  assert json.loads((tmp_path / "abl" / "text_only" / "config.json").read_text())["data"]["stream_offset"] == 0
  assert "| fusion_ft |" in (tmp_path / "abl" / "ablation.md").read_text()
  assert (tmp_path / "abl" / "ablation.png").exists()
  # A re-run skips finished rows and reproduces the same table.
  again = ablation.run(str(tmp_path / "abl"), tiny_data, str(ROOT / "configs" / "demo.py"),
                       rows=("text_only", "fusion_ft"), steps=6, stage1_steps=4, batch=16)
  assert json.dumps(again, default=float) == json.dumps(rows, default=float)
  timings = json.loads((tmp_path / "abl" / "ablation_margins.json").read_text())["timings_s"]
  # Kept from the run that trained them.
  assert set(timings) == {"stage1_s", "text_only", "fusion_ft", "fusion_ft_no_q2f"}
  # Other settings on the same workdir would silently reuse rows trained differently: refused, nothing lost.
  before = (tmp_path / "abl" / "ablation.json").read_text()
  with pytest.raises(ValueError, match=r"stage 1 in .* other settings .*train.steps: 4 -> 5"):
    ablation.run(str(tmp_path / "abl"), tiny_data, str(ROOT / "configs" / "demo.py"),
                 rows=("text_only", "fusion_ft"), steps=6, stage1_steps=5, batch=16)
  with pytest.raises(ValueError, match=r"row text_only .*data.batch_size: 16 -> 8"):
    ablation.run(str(tmp_path / "abl"), tiny_data, str(ROOT / "configs" / "demo.py"),
                 rows=("text_only",), steps=6, stage1_steps=4, batch=8)
  assert (tmp_path / "abl" / "ablation.json").read_text() == before
  # A row without stage 1 gets stage 1's steps whichever rows are asked for (here without any stage-1 row).
  mod = sweep_runner.load_config_module(str(ROOT / "configs" / "demo.py"))
  points, configs = ablation._points(tmp_path / "other", tiny_data, "demo", mod, ("text_only",), 6, 4, 16, "", {},
                                     "default")
  assert [p.name for p in points] == ["text_only"] and configs["text_only"].train.steps == 10
  # A row saved before a config key existed (its config.json lacks it) ran with that key's default: reused.
  saved = tmp_path / "abl" / "text_only" / "config.json"
  older = json.loads(saved.read_text())
  del older["loss"]["image_words"]  # a stage-2 row runs with its default, 0
  del older["data"]["stream_offset"]  # code before the key read every stream from its start, as text_only does
  older["init"]["load"] = ["image_tower"]  # another init.load: inert in a row without init.workdir
  saved.write_text(json.dumps(older))
  again = ablation.run(str(tmp_path / "abl"), tiny_data, str(ROOT / "configs" / "demo.py"),
                       rows=("text_only", "fusion_ft"), steps=6, stage1_steps=4, batch=16)
  assert json.dumps(again, default=float) == json.dumps(rows, default=float)
  # ... which a stage-1 row saved then did not: it replayed stage 1's batches, so it is not reused.
  saved = tmp_path / "abl" / "fusion_ft" / "config.json"
  older = json.loads(saved.read_text())
  loads = older["init"]["load"]
  older["init"]["load"] = loads[:-1]  # ... where init.load decides what the row starts from: refused
  saved.write_text(json.dumps(older))
  with pytest.raises(ValueError, match=r"row fusion_ft .*init.load: "):
    ablation.run(str(tmp_path / "abl"), tiny_data, str(ROOT / "configs" / "demo.py"),
                 rows=("text_only", "fusion_ft"), steps=6, stage1_steps=4, batch=16)
  older["init"]["load"] = loads
  del older["data"]["stream_offset"]
  saved.write_text(json.dumps(older))
  with pytest.raises(ValueError, match=r"row fusion_ft .*data.stream_offset: 0 -> 4"):
    ablation.run(str(tmp_path / "abl"), tiny_data, str(ROOT / "configs" / "demo.py"),
                 rows=("text_only", "fusion_ft"), steps=6, stage1_steps=4, batch=16)


@pytest.mark.slow
def test_learned_row_beats_keyword_search_where_it_should(tmp_path):
  """A model that stopped learning fails here: on a small synthetic catalogue (fixed seed) the demo's
  text_only row, trained 300 steps, must beat BM25 on R@100 and NDCG@10 by a margin, and the hybrid must not
  fall below BM25 (measured: R@100 0.932 vs BM25's 0.79, NDCG@10 0.576 vs 0.54; with the lexical segment at the
  towers' learning rate 0.889 / 0.529); fusion after stage 1, with the same total steps, must end near text_only
  (measured 0.896 / 0.581 with the stage-1 text side at the towers' stage-2 rate; the test passes at the demo's 3x)."""
  from mmr_jax import train  # pylint: disable=g-import-not-at-top
  from mmr_jax.data import make_synthetic, synthetic  # pylint: disable=g-import-not-at-top
  data = tmp_path / "data"
  make_synthetic.make_synthetic(data, synthetic.preset("tiny", num_queries=400), progress=False, verbose=False)
  mod = sweep_runner.load_config_module(str(ROOT / "configs" / "demo.py"))
  cfg = mod.get_config(f"stage=2,variant=text_only,data={data},steps=300,batch=32")
  cfg.train.progress, cfg.train.eval_every = False, 0
  train.train_and_evaluate(cfg, str(tmp_path / "wd"))
  t = evaluate.evaluate_workdir(str(tmp_path / "wd"), save_index=False)["splits"]["test"]
  learned, bm25, hybrid = t["exact"], t["bm25"]["overall"], t["hybrid"]["overall"]
  assert learned["num_queries"] >= 60
  assert learned["recall@100"] >= bm25["recall@100"] + 0.10, (learned, bm25)
  assert learned["ndcg@10"] >= bm25["ndcg@10"] + 0.02, (learned, bm25)
  assert hybrid["ndcg@10"] >= bm25["ndcg@10"] - 0.01, (hybrid, bm25)

  # The same budget split as the ablation's (stage 1, then fusion from it) must end near text_only: a stage 1
  # whose text towers learn less than stage-2 steps would (stage 1 over products alone) leaves fusion_ft
  # behind (measured here, before the lexical segment's own learning rate: text_only 0.889 / 0.529; fusion_ft
  # after stage 1 over pairs 0.932 / 0.531, over products 0.830 / 0.497; on the demo catalogue -15 R@100 / -9
  # NDCG@10 against -1 / -1 over pairs).
  s1 = mod.get_config(f"stage=1,data={data},steps=150,batch=32")
  s1.train.progress, s1.train.eval_every = False, 0
  train.train_and_evaluate(s1, str(tmp_path / "s1"))
  ft = mod.get_config(f"stage=2,variant=fusion,data={data},steps=150,batch=32")
  ft.train.progress, ft.train.eval_every = False, 0
  ft.init.workdir = str(tmp_path / "s1")
  train.train_and_evaluate(ft, str(tmp_path / "ft"))
  fused = evaluate.evaluate_workdir(str(tmp_path / "ft"), save_index=False)["splits"]["test"]["exact"]
  assert fused["recall@100"] >= learned["recall@100"] - 0.05, (fused, learned)
  assert fused["ndcg@10"] >= learned["ndcg@10"] - 0.03, (fused, learned)


def _fake_rows(text_only, fusion_ft, chosen="fusion_ft"):
  """Ablation rows with the given (recall@100, ndcg@10) overall and on a "visual" tag (half the values); fusion_ft
  chosen on validation as the run `chosen`."""
  row = lambda name, r, n: {"row": name, "overall": {"recall@100": r, "ndcg@10": n},  # noqa: E731
                            "by_tag": {"visual": {"recall@100": r / 2, "ndcg@10": n / 2}}}
  return [row("text_only", *text_only), row("fusion_ft", *fusion_ft) | {"chosen": {"run": chosen}}]


def test_ablation_over_seeds_reports_each_rows_spread_and_the_margin_per_seed(tmp_path, monkeypatch):
  per_seed = {0: _fake_rows((0.80, 0.68), (0.88, 0.72)), 1: _fake_rows((0.78, 0.69), (0.86, 0.70), "fusion_ft_b"),
              2: _fake_rows((0.79, 0.68), (0.90, 0.71))}
  calls = []

  def fake_run(workdir, data_dir, config_path, rows, steps, stage1_steps, batch, config_arg, overrides, budget):
    calls.append((workdir, overrides))
    return per_seed[overrides["seed"]]

  monkeypatch.setattr(ablation, "run", fake_run)
  summary = ablation.run_seeds(str(tmp_path / "w"), [0, 1, 2], "DATA", "configs/demo.py",
                               overrides={"optim.lr": "1e-3"})
  # Each seed runs in its own folder with the other overrides kept.
  assert [c[0] for c in calls] == [str(tmp_path / "w" / f"seed_{s}") for s in (0, 1, 2)]
  assert [c[1] for c in calls] == [{"optim.lr": "1e-3", "seed": s} for s in (0, 1, 2)]
  fusion = summary["rows"]["fusion_ft"]["overall"]["ndcg@10"]
  assert fusion["values"] == pytest.approx([0.72, 0.70, 0.71])
  assert fusion["mean"] == pytest.approx(0.71) and fusion["std"] == pytest.approx(np.std([0.72, 0.70, 0.71]))
  assert (fusion["min"], fusion["max"]) == pytest.approx((0.70, 0.72))
  assert summary["rows"]["text_only"]["by_tag"]["visual"]["recall@100"]["mean"] == pytest.approx(0.395)
  # The margin is taken within each seed (fusion_ft - text_only of the same seed), in points.
  margin = summary["fusion_ft_minus_text_only"]["overall"]
  assert margin["ndcg@10"]["values"] == pytest.approx([4.0, 1.0, 3.0])
  assert margin["recall@100"]["mean"] == pytest.approx(np.mean([8.0, 8.0, 11.0]))
  saved = json.loads((tmp_path / "w" / "ablation_seeds.json").read_text())
  assert saved["seeds"] == [0, 1, 2] and saved["rows"]["fusion_ft"]["overall"]["ndcg@10"]["mean"] == pytest.approx(0.71)
  md = (tmp_path / "w" / "ablation_seeds.md").read_text()
  assert "| fusion_ft | 88.0 ± 1.6 (86.0 … 90.0) | 71.0 ± 0.8 (70.0 … 72.0) |" in md
  assert "NDCG@10 +2.7 ± 1.2 (+4.0, +1.0, +3.0)" in md
  assert saved["chosen"] == {"fusion_ft": {"0": "fusion_ft", "1": "fusion_ft_b", "2": "fusion_ft"}}
  assert "seed 0 fusion_ft, seed 1 fusion_ft_b, seed 2 fusion_ft." in md
  # Margins whose rows did not run are left out; with text_only_ft, what the image adds is followed too.
  assert saved["fusion_ft_minus_text_only_ft"] == {} and "minus text_only_ft" not in md
  with_ft = {s: rows + [dict(rows[0], row="text_only_ft", overall={"recall@100": 0.8, "ndcg@10": 0.7})]
             for s, rows in per_seed.items()}
  monkeypatch.setattr(ablation, "run", lambda *a, **k: with_ft[a[-2]["seed"]])
  summary = ablation.run_seeds(str(tmp_path / "w1"), [0, 1, 2], "DATA", "configs/demo.py")
  assert summary["fusion_ft_minus_text_only_ft"]["overall"]["ndcg@10"]["values"] == pytest.approx([2.0, 0.0, 1.0])
  assert summary["text_only_ft_minus_text_only"]["overall"]["recall@100"]["values"] == pytest.approx([0.0, 2.0, 1.0])
  assert "fusion_ft minus text_only_ft (points" in (tmp_path / "w1" / "ablation_seeds.md").read_text()
  # Seeds given twice, or a seed also in --set, are refused before anything runs.
  calls.clear()
  with pytest.raises(ValueError, match="distinct"):
    ablation.run_seeds(str(tmp_path / "w2"), [0, 0], "DATA", "configs/demo.py")
  with pytest.raises(ValueError, match="--seeds only"):
    ablation.run_seeds(str(tmp_path / "w2"), [0, 1], "DATA", "configs/demo.py", overrides={"seed": "3"})
  assert not calls and not (tmp_path / "w2").exists()


def test_ablation_cli_rejects_seeds_that_are_not_integers(tmp_path):
  r = subprocess.run([sys.executable, "-m", "mmr_jax.ablation", "--workdir", str(tmp_path / "w"), "--seeds", "0,x"],
                     cwd=ROOT, capture_output=True, text=True)
  assert r.returncode == 2 and "--seeds '0,x'" in r.stderr
  assert not (tmp_path / "w").exists()  # refused before a log file or folder is written
