"""tools/components.py: a trained workdir scored with each part of its product embedding switched off."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from mmr_jax.data import pipeline
from mmr_jax.evals import embedding
from mmr_jax.evals import index as index_lib
from mmr_jax.evals import metrics
from mmr_jax.evals import retrieval
from mmr_jax.models import two_tower

REPO = pathlib.Path(__file__).resolve().parents[2]


def _tool():
  spec = importlib.util.spec_from_file_location("components_tool", REPO / "tools" / "components.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_components_scores_the_trained_model_and_each_part_switched_off(tiny_workdir, tiny_data, tmp_path, capsys):
  tool = _tool()
  report = tool.main(["--workdir", tiny_workdir, "--data", tiny_data, "--out", str(tmp_path)])
  saved = json.loads((tmp_path / "components.json").read_text())
  assert json.loads(capsys.readouterr().out) == saved
  assert saved["metrics"] == ["recall@100", "ndcg@10"]
  tm = embedding.load_trained(tiny_workdir, tiny_data)
  parts = two_tower.embedding_parts(tm.config.model)
  assert parts == ("image_words", "query_translation", "fused_branch", "text_branch", "lexical",
                   "dense")  # the demo's fusion model
  assert set(saved["results"]) == {"full"} | {f"without_{p}" for p in parts}
  # "full" is the model's own exact ranking, and "without_lexical" the same embeddings' dense segments ranked
  # alone (the mix scales every dense segment alike): recomputed here from the embeddings.
  q = retrieval.load_queries(tiny_data, "test")
  q_emb, _ = embedding.embed_table(tm.embed_queries, pipeline.make_eval_iterator(tiny_data, "queries", "test",
                                                                                 tm.config.data, 8))
  p_emb, _ = embedding.embed_table(tm.embed_products, pipeline.make_eval_iterator(tiny_data, "products", "all",
                                                                                  tm.config.data, 8))
  d = tm.config.model.embed_dim
  for name, (qe, pe) in (("full", (q_emb, p_emb)), ("without_lexical", (q_emb[:, :d], p_emb[:, :d]))):
    ranked, _ = index_lib.exact_search(np.ascontiguousarray(qe), np.ascontiguousarray(pe), 100)
    want = metrics.compute_metrics(ranked, q["labels"])
    for k in ("recall@100", "ndcg@10"):
      assert saved["results"][name]["overall"][k] == pytest.approx(want[k], abs=1e-6), (name, k)
  # Switching the whole lexical segment off changes the ranking (it is most of the demo model's score); the
  # margins are full minus without, per tag too.
  assert saved["results"]["without_lexical"]["overall"] != saved["results"]["full"]["overall"]
  for part in parts:
    m = saved["minus"][part]
    assert set(m) == {"overall"} | {f"tag:{t}" for t in saved["results"]["full"]["by_tag"]}
    assert m["overall"]["ndcg@10"] == pytest.approx(
        100 * (saved["results"]["full"]["overall"]["ndcg@10"]
               - saved["results"][f"without_{part}"]["overall"]["ndcg@10"]), abs=0.01)
  md = (tmp_path / "components.md").read_text()
  assert md.startswith("# What each part adds") and "| without_image_words |" in md
  assert report["step"] == tm.step
  assert not os.path.exists(os.path.join(tiny_workdir, "components.json"))  # --out, not the workdir


def test_components_help():
  r = subprocess.run([sys.executable, str(REPO / "tools" / "components.py"), "--help"], capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0, r.stderr
  assert "--workdir" in r.stdout and "image_words" in r.stdout
