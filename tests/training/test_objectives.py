"""Stage objectives: the auxiliary query<->modality terms and grade weighting add what they say."""

import jax
import numpy as np
import pytest

from conftest import tiny_config
from mmr_jax import models
from mmr_jax import train
from mmr_jax.training import losses
from mmr_jax.training import objectives


@pytest.fixture(scope="module")
def model_and_batch(tiny_data):
  cfg = train.resolve_config(tiny_config(tiny_data, variant="fusion"))
  model = models.create_model(cfg)
  params = model.init(jax.random.PRNGKey(0), objectives.init_batch(cfg), train=False)["params"]
  rng = np.random.default_rng(0)
  batch = objectives.get(2).example_batch(cfg, 8)
  batch["query_tokens"] = rng.integers(4, 50, batch["query_tokens"].shape).astype(np.int32)
  batch["product_tokens"] = rng.integers(4, 50, batch["product_tokens"].shape).astype(np.int32)
  batch["image"] = rng.integers(0, 256, batch["image"].shape).astype(np.uint8)
  batch["grade"] = np.asarray([1.0, 0.1, 1.0, 0.01, 1.0, 1.0, 0.1, 1.0], np.float32)
  return cfg, model, jax.tree.map(lambda x: x, params), batch


def _loss(cfg, model, params, batch, **loss_cfg):
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    for k, v in loss_cfg.items():
      cfg.loss[k] = v
  return objectives.get(2).loss(model, params, batch, cfg, train=False, rng=jax.random.PRNGKey(0))


def test_aux_terms_add_their_weighted_query_modality_losses(model_and_batch):
  cfg, model, params, batch = model_and_batch
  base, m0 = _loss(cfg, model, params, batch)
  assert "q2i/loss" not in m0 and "q2t/loss" not in m0  # off by default
  both, m = _loss(cfg, model, params, batch, aux_query_image=0.5, aux_query_text=0.25)
  assert float(m["q2i/loss"]) > 0 and float(m["q2t/loss"]) > 0
  np.testing.assert_allclose(float(both), float(base) + 0.5 * float(m["q2i/loss"]) + 0.25 * float(m["q2t/loss"]),
                             rtol=1e-5)
  # Each aux term is the plain contrastive loss of the query against that modality's own embedding.
  v = {"params": params}
  q = model.apply(v, batch["query_tokens"], method="embed_query")
  q = q.get("dense_emb", q["emb"])  # a lexical segment has no counterpart in the image embedding
  p = model.apply(v, batch["product_tokens"], batch["image"], batch["has_image"], method="embed_product")
  scale = model.apply(v, method="logit_params")["logit_scale"]
  pos = (batch["product_index"], batch["positives"])
  want, _ = losses.softmax_contrastive(q, p["image_emb"], scale, pos)
  np.testing.assert_allclose(float(m["q2i/loss"]), float(want), rtol=1e-5)


def test_grade_weighting_weighs_each_pair_by_its_gain(model_and_batch):
  cfg, model, params, batch = model_and_batch
  plain, _ = _loss(cfg, model, params, batch)
  weighted, _ = _loss(cfg, model, params, batch, grade_weighted=True)
  v = {"params": params}
  q = model.apply(v, batch["query_tokens"], method="embed_query")["emb"]
  p = model.apply(v, batch["product_tokens"], batch["image"], batch["has_image"], method="embed_product")["emb"]
  scale = model.apply(v, method="logit_params")["logit_scale"]
  pos = (batch["product_index"], batch["positives"])
  want, _ = losses.softmax_contrastive(q, p, scale, pos, batch["grade"])
  np.testing.assert_allclose(float(weighted), float(want), rtol=1e-5)
  assert abs(float(weighted) - float(plain)) > 1e-4  # the grades change the loss


def test_stage1_adds_the_pseudo_query_text_term_when_its_batch_has_queries(model_and_batch):
  cfg, model, params, batch = model_and_batch
  s1 = {k: batch[k] for k in ("image", "has_image", "title_tokens", "product_tokens", "product_index")}
  loss, m = objectives.get(1).loss(model, params, s1, cfg, train=False, rng=jax.random.PRNGKey(0))
  assert "q2t/loss" not in m
  both, m2 = objectives.get(1).loss(model, params, dict(s1, query_tokens=batch["query_tokens"]), cfg, train=False,
                                    rng=jax.random.PRNGKey(0))
  np.testing.assert_allclose(float(both), float(loss) + float(m2["q2t/loss"]), rtol=1e-5)
  v = {"params": params}
  q = model.apply(v, batch["query_tokens"], method="embed_query")["emb"]
  p = model.apply(v, batch["product_tokens"], method="embed_text_product")["emb"]
  scale = model.apply(v, method="logit_params")["logit_scale"]
  want, _ = losses.softmax_contrastive(q, p, scale, (batch["product_index"], None))
  np.testing.assert_allclose(float(m2["q2t/loss"]), float(want), rtol=1e-5)


def test_stage1_over_pairs_counts_every_relevant_product_of_a_query_in_the_text_term(model_and_batch):
  # data.stage1_source="pairs": stage-1 batches carry stage 2's `positives`; a query's other relevant products
  # in the batch are not its negatives (as in stage 2), while image <-> title still pairs each row's product.
  cfg, model, params, batch = model_and_batch
  batch = dict(batch, positives=np.full_like(batch["positives"], -1))
  batch["positives"][0, 0] = batch["product_index"][1]  # row 1's product is relevant to row 0's query too
  loss, m = objectives.get(1).loss(model, params, batch, cfg, train=False, rng=jax.random.PRNGKey(0))
  v = {"params": params}
  q = model.apply(v, batch["query_tokens"], method="embed_query")["emb"]
  p = model.apply(v, batch["product_tokens"], method="embed_text_product")["emb"]
  scale = model.apply(v, method="logit_params")["logit_scale"]
  want, _ = losses.softmax_contrastive(q, p, scale, (batch["product_index"], batch["positives"]))
  unmasked, _ = losses.softmax_contrastive(q, p, scale, (batch["product_index"], None))
  np.testing.assert_allclose(float(m["q2t/loss"]), float(want), rtol=1e-5)
  assert abs(float(want) - float(unmasked)) > 1e-4  # the positives change the term
  np.testing.assert_allclose(float(loss), float(m["i2t/loss"]) + float(want), rtol=1e-5)
