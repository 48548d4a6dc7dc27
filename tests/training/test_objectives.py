"""Stage objectives: the auxiliary query<->modality terms and grade weighting add what they say."""

import flax.linen as nn
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
  cfg = tiny_config(tiny_data, variant="fusion")
  cfg.loss.aux_query_fused = 0.0  # each test turns on the terms it checks
  cfg = train.resolve_config(cfg)
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
  # loss.stage1_text weighs the text term against the image terms; the term itself is the same.
  c3 = cfg.copy_and_resolve_references()
  c3.loss.stage1_text = 3.0
  both3, m3 = objectives.get(1).loss(model, params, dict(s1, query_tokens=batch["query_tokens"]), c3, train=False,
                                     rng=jax.random.PRNGKey(0))
  np.testing.assert_allclose(float(m3["q2t/loss"]), float(m2["q2t/loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(both3), float(loss) + 3.0 * float(m2["q2t/loss"]), rtol=1e-5)
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


def test_words_loss_is_the_cross_entropy_against_each_rows_bag_of_words():
  logits = np.log(np.asarray([[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1]], np.float32))
  tokens = np.asarray([[2, 3, 3, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.int32)  # pad 0; a repeat counts once
  weights = np.asarray([1.0, 0.5, 1.0], np.float32)
  got = float(objectives.words_loss(logits, tokens, weights, pad_id=0))
  row0 = -(0.5 * np.log(0.3) + 0.5 * np.log(0.4))
  row1 = -np.log(0.25)
  np.testing.assert_allclose(got, (row0 + 0.5 * row1) / 1.5, rtol=1e-5)  # the empty row has no weight
  # Another pad id (SigLIP pads with its eos, 1): those ids leave the bag and 0 becomes a word.
  got1 = float(objectives.words_loss(logits, tokens, np.ones(3, np.float32), pad_id=1))
  want1 = np.mean([-np.mean(np.log([0.1, 0.3, 0.4])), -np.log(0.25), -np.log(0.7)])
  np.testing.assert_allclose(got1, want1, rtol=1e-5)


def test_sigmoid_words_loss_is_each_words_binary_cross_entropy_per_word_of_the_bag():
  logits = np.asarray([[2.0, -1.0, 0.5, -3.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
  tokens = np.asarray([[2, 3, 3, 0], [1, 0, 0, 0], [0, 0, 0, 0]], np.int32)  # pad 0; a repeat counts once
  weights = np.asarray([1.0, 0.5, 1.0], np.float32)
  got = float(objectives.words_loss(logits, tokens, weights, pad_id=0, activation="sigmoid"))

  def bce(x, y):
    p = 1.0 / (1.0 + np.exp(-x))
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))
  row0 = np.sum(bce(logits[0], np.array([0, 0, 1, 1]))) / 2  # words 2 and 3, each word of the vocabulary scored
  row1 = np.sum(bce(logits[1], np.array([0, 1, 0, 0]))) / 1
  np.testing.assert_allclose(got, (row0 + 0.5 * row1) / 1.5, rtol=1e-5)  # the empty row has no weight
  # Unlike the softmax's, the term falls towards 0 as the head grows sure of each word on its own.
  sure = np.where(np.array([[0, 0, 1, 1]]), 20.0, -20.0).astype(np.float32)
  assert float(objectives.words_loss(sure, tokens[:1], np.ones(1, np.float32), 0, "sigmoid")) < 1e-6
  assert float(objectives.words_loss(sure, tokens[:1], np.ones(1, np.float32), 0, "softmax")) > 0.69
  with pytest.raises(ValueError, match="activation='tanh'"):
    objectives.words_loss(logits, tokens, weights, pad_id=0, activation="tanh")


def test_stage1_image_words_term_trains_a_head_that_only_stage1_runs_have(tiny_data):
  cfg = tiny_config(tiny_data, stage=1, variant="fusion")
  cfg.loss.image_words = 0.5
  cfg = train.resolve_config(cfg)
  assert cfg.model.image_words
  model = models.create_model(cfg)
  params = model.init(jax.random.PRNGKey(0), objectives.init_batch(cfg), train=False)["params"]
  assert "image_words" in params["heads"]
  rng = np.random.default_rng(0)
  batch = objectives.get(1).example_batch(cfg, 8)
  batch["title_tokens"] = rng.integers(4, 50, batch["title_tokens"].shape).astype(np.int32)
  batch["image"] = rng.integers(0, 256, batch["image"].shape).astype(np.uint8)
  loss, m = objectives.get(1).loss(model, params, batch, cfg, train=False, rng=jax.random.PRNGKey(0))
  v = {"params": params}
  out = model.apply(v, batch["title_tokens"], batch["image"], batch["has_image"], method="embed_title_image")
  want = objectives.words_loss(out["image_word_logits"], batch["title_tokens"],
                               batch["has_image"].astype(np.float32), cfg.data.tokenizer.pad_id,
                               cfg.model.image_words_activation)
  np.testing.assert_allclose(float(m["words/loss"]), float(want), rtol=1e-5)
  # The demo's stage 1 reads pairs: its query <-> text term.
  text = float(m.get("q2t/loss", 0.0))
  np.testing.assert_allclose(float(loss), float(m["i2t/loss"]) + cfg.loss.stage1_text * text + 0.5 * float(want),
                             rtol=1e-5)
  # Stage 2 without the image's words in the lexical segment has no such head: its parameters and exports
  # are unchanged. With them (model.image_expansion_k, the demo's stage 2) the head is there to be loaded.
  s2 = tiny_config(tiny_data, stage=2, variant="fusion")
  s2.model.image_expansion_k = 0
  s2 = train.resolve_config(s2)
  assert not s2.model.image_words
  s2_params = models.create_model(s2).init(jax.random.PRNGKey(0), objectives.init_batch(s2), train=False)["params"]
  assert "image_words" not in s2_params["heads"]
  s2x = tiny_config(tiny_data, stage=2, variant="fusion")
  s2x.model.image_expansion_k = 4
  s2x = train.resolve_config(s2x)
  s2x_params = models.create_model(s2x).init(jax.random.PRNGKey(0), objectives.init_batch(s2x), train=False)["params"]
  assert "image_words" in s2x_params["heads"]


def test_aux_query_fused_trains_the_fused_branch_whatever_the_gate(model_and_batch):
  cfg, model, params, batch = model_and_batch
  base, m0 = _loss(cfg, model, params, batch)
  assert "q2f/loss" not in m0
  total, m = _loss(cfg, model, params, batch, aux_query_fused=0.5)
  v = {"params": params}
  q = model.apply(v, batch["query_tokens"], method="embed_query")
  p = model.apply(v, batch["product_tokens"], batch["image"], batch["has_image"], method="embed_product")
  scale = model.apply(v, method="logit_params")["logit_scale"]
  want, _ = losses.softmax_contrastive(q.get("dense_emb", q["emb"]), p["fused_emb"], scale,
                                       (batch["product_index"], batch["positives"]))
  np.testing.assert_allclose(float(m["q2f/loss"]), float(want), rtol=1e-5)
  np.testing.assert_allclose(float(total), float(base) + 0.5 * float(want), rtol=1e-5)
  # The term trains the fusion network and does not depend on the gate (a shut gate does not starve it).
  grad = jax.grad(lambda p_: _loss(cfg, model, p_, batch, aux_query_fused=0.5)[1]["q2f/loss"])(params)
  norm = lambda tree: float(sum(np.abs(np.asarray(g)).sum() for g in jax.tree.leaves(tree)))  # noqa: E731
  assert norm({k: v for k, v in grad["fusion"].items() if not k.startswith("gate")}) > 0
  assert norm({k: v for k, v in grad["fusion"].items() if k.startswith("gate")}) == 0


def test_stage1_lock_text_keeps_the_image_title_term_off_the_text_side(model_and_batch):
  cfg, model, params, batch = model_and_batch
  s1 = {k: batch[k] for k in ("image", "has_image", "title_tokens", "product_index")}  # image <-> title only

  def grads(lock):
    c = cfg.copy_and_resolve_references()
    c.loss.stage1_lock_text = lock
    fn = lambda p: objectives.get(1).loss(model, p, s1, c, train=False, rng=jax.random.PRNGKey(0))[0]  # noqa: E731
    return jax.value_and_grad(fn)(params)

  (free, g_free), (locked, g_locked) = grads(False), grads(True)
  np.testing.assert_allclose(float(locked), float(free), rtol=1e-6)  # the same term, only its gradient differs
  text = lambda g: max(float(np.abs(x).max()) for x in jax.tree.leaves(  # noqa: E731
      (g["product_text_tower"], g["heads"]["product_text"])))
  assert text(g_free) > 1e-6 and text(g_locked) == 0.0
  for a, b in zip(jax.tree.leaves(g_free["image_tower"]), jax.tree.leaves(g_locked["image_tower"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-8)


