"""Training objectives: what each alignment stage optimises, given a model's embedding methods.

The trainer knows nothing of towers or losses: it asks `OBJECTIVES[stage]` for example batches
(shapes for compilation) and for `loss(model, params, batch, config, train, rng) -> (loss, metrics)`.

- stage 1 (domain alignment): image <-> title contrastive over products, so the image tower
  learns what the catalogue's colours, patterns and styles look like from titles that name them
  (with `loss.image_words`, also by predicting each product's words from its image);
  with `data.stage1_pseudo_queries`, also pseudo-query <-> product text (the text towers learn the
  catalogue's vocabulary from its own text, without query logs); with `data.stage1_source="pairs"`, over
  stage 2's stream, also query <-> product text on the labelled and pseudo-queries.
- stage 2 (query <-> product): query <-> fused product, plus optional query <-> image-only and
  query <-> text-only auxiliary terms (the paper's alignment of the query with both modalities).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from mmr_jax import batch_spec
from mmr_jax.training import losses
from mmr_jax.training import sharded_loss


def _contrastive(config, a, b, logit, pos_mask, weights):
  """Returns (loss, metrics) of the configured contrastive loss (sharded over the mesh, dense or row-chunked).

  `pos_mask` is the (product_index, positives) pair, so no form of the loss needs an [N, N] mask array.
  """
  kind, chunk = config.loss.kind, int(config.loss.chunk_size)
  params = losses.logit_params(kind, logit)
  how = sharded_loss.method(config.loss.sharded, a.shape[0])
  if how != "none":
    return sharded_loss.LOSSES[kind](a, b, *params, pos_mask, weights, method=how)
  if chunk:
    return losses.CHUNKED_LOSSES[kind](a, b, *params, pos_mask, weights, chunk_size=chunk)
  return losses.LOSSES[kind](a, b, *params, pos_mask, weights)


def init_batch(config, b: int = 2) -> dict:
  """Returns a batch with every model input (so `model.init` creates every parameter)."""
  return batch_spec.model_init_batch(batch_spec.Lens.from_config(config.data), b)


@dataclasses.dataclass(frozen=True)
class Objective:
  example_batch: Callable  # (config, global_batch) -> numpy batch with the pipeline's keys and shapes
  loss: Callable  # (model, params, batch, config, train, rng) -> (loss, metrics)


def _example(stage):
  """Returns fn(config, b) -> a fake batch of `b` rows with the pipeline's keys and shapes for `stage`."""
  return lambda config, b: batch_spec.fake_batch(batch_spec.from_config(stage, config.data, b))


def _stage1_loss(model, params, batch, config, train, rng):
  out = model.apply({"params": params}, batch["title_tokens"], batch["image"], batch["has_image"], train=train,
                    method="embed_title_image", rngs={"dropout": rng})
  logit = model.apply({"params": params}, method="logit_params")
  # Products without an image have nothing to align: they carry zero weight.
  weights = batch["has_image"].astype(jnp.float32)
  pos = (batch["product_index"], None)
  title = out["title_emb"]
  if config.loss.stage1_lock_text:
    title = jax.lax.stop_gradient(title)
  loss, m = _contrastive(config, out["image_emb"], title, logit, pos, weights)
  metrics = {f"i2t/{k}": v for k, v in m.items() if k != "loss"}
  metrics["i2t/loss"] = loss
  if config.loss.image_words > 0:
    words = words_loss(out["image_word_logits"], batch["title_tokens"], weights, int(config.data.tokenizer.pad_id),
                       config.model.get("image_words_activation", "softmax"))
    loss = loss + config.loss.image_words * words
    metrics["words/loss"] = words
  if "query_tokens" in batch:
    # Text-side domain alignment: a query <-> its product's text embedding, so the text towers learn the
    # catalogue's vocabulary before stage 2. The queries are each product's own terms
    # (data.stage1_pseudo_queries) or stage 2's labelled and pseudo-queries (data.stage1_source="pairs",
    # whose batches carry every relevant product of each query in `positives`).
    q = model.apply({"params": params}, batch["query_tokens"], train=train, method="embed_query", rngs={"dropout": rng})
    p = model.apply({"params": params}, batch["product_tokens"], train=train, method="embed_text_product",
                    rngs={"dropout": rng})
    text_pos = (batch["product_index"], batch.get("positives"))
    text_loss, tm = _contrastive(config, q["emb"], p["emb"], logit, text_pos, None)
    loss = loss + config.loss.stage1_text * text_loss
    metrics["q2t/loss"] = text_loss
    metrics["q2t/acc_a2b"] = tm["acc_a2b"]
  return loss, metrics


def words_loss(logits, tokens, weights, pad_id: int, activation: str = "softmax"):
  """Returns the weighted mean over rows of how well `logits` [B, V] predict each row's bag of words: the
  distinct ids of `tokens` [B, L] other than `pad_id` (rows without one weigh 0).

  "softmax": the cross-entropy of softmax(logits) against the bag, each word 1/count. "sigmoid": the binary
  cross-entropy of every word's sigmoid(logit) against "it is in the bag", summed over the vocabulary and divided
  by the bag's size (a multi-label classifier; the division keeps long and short titles on one scale).
  """
  b, v = logits.shape
  tokens = jnp.asarray(tokens)
  valid = (tokens != pad_id) & (tokens >= 0) & (tokens < v)
  rows = jnp.arange(b)[:, None]
  bag = jnp.zeros((b, v), jnp.float32).at[rows, jnp.clip(tokens, 0, v - 1)].max(valid.astype(jnp.float32))
  count = jnp.sum(bag, axis=-1)
  if activation == "sigmoid":
    bce = optax.sigmoid_binary_cross_entropy(logits, bag)
    per_row = jnp.sum(bce, axis=-1) / jnp.maximum(count, 1.0)
  elif activation == "softmax":
    target = bag / jnp.maximum(count, 1.0)[:, None]
    per_row = -jnp.sum(target * jax.nn.log_softmax(logits, axis=-1), axis=-1)
  else:
    raise ValueError(f"words_loss: activation={activation!r}, expected 'softmax' or 'sigmoid'")
  w = weights * (count > 0)
  return jnp.sum(per_row * w) / jnp.maximum(jnp.sum(w), 1.0)


def _stage2_loss(model, params, batch, config, train, rng):
  variables = {"params": params}
  rngs = {"dropout": rng}
  q = model.apply(variables, batch["query_tokens"], train=train, method="embed_query", rngs=rngs)
  p = model.apply(variables, batch["product_tokens"], batch["image"], batch["has_image"], train=train,
                  method="embed_product", rngs=rngs)
  logit = model.apply(variables, method="logit_params")
  pos = (batch["product_index"], batch["positives"])
  weights = batch["grade"] if config.loss.grade_weighted else None
  loss, m = _contrastive(config, q["emb"], p["emb"], logit, pos, weights)
  metrics = {f"q2p/{k}": v for k, v in m.items() if k != "loss"}
  metrics["q2p/loss"] = loss
  # Auxiliary terms align the query with each modality on its own, and with the fused representation alone
  # (q2f: it learns even while the fusion gate leans on the text, which otherwise starves it). fusion_qw's
  # query is a weighted
  # concat of segments, so its aux terms use the plain per-segment unit vectors of the query instead.
  for name, key, weight in (("q2i", "image_emb", config.loss.aux_query_image),
                            ("q2t", "text_emb", config.loss.aux_query_text),
                            ("q2f", "fused_emb", config.loss.aux_query_fused)):
    if weight > 0 and key in p:
      qd = q.get("dense_emb", q["emb"])  # the lexical segment has no counterpart in one modality
      qa = qd if qd.shape[-1] == p[key].shape[-1] else _segment(q, key)
      aux, am = _contrastive(config, qa, p[key], logit, pos, weights)
      loss = loss + weight * aux
      metrics[f"{name}/loss"] = aux
      metrics[f"{name}/acc_a2b"] = am["acc_a2b"]
  if "gate" in p:
    has = batch["has_image"].astype(jnp.float32)
    metrics["gate/mean_with_image"] = jnp.sum(p["gate"] * has) / jnp.maximum(jnp.sum(has), 1.0)
  return loss, metrics


def _segment(q, key):
  """Returns the unit query segment matching a product modality (fusion_qw: [fused, text, image])."""
  emb = q["emb"]
  d = emb.shape[-1] // 3
  k = {"fused_emb": 0, "text_emb": 1, "image_emb": 2}[key]
  seg = emb[:, k * d:(k + 1) * d]
  return seg / jnp.maximum(jnp.linalg.norm(seg, axis=-1, keepdims=True), 1e-12)


OBJECTIVES = {
    1: Objective(_example(1), _stage1_loss),
    2: Objective(_example(2), _stage2_loss),
}


def get(stage: int) -> Objective:
  if stage not in OBJECTIVES:
    raise KeyError(f"config.stage={stage!r}; known stages: {sorted(OBJECTIVES)}")
  return OBJECTIVES[stage]
