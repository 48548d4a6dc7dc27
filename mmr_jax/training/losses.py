"""Contrastive losses over in-batch negatives: softmax (CLIP InfoNCE) and sigmoid (SigLIP).

Pure functions of two embedding matrices a, b [B, D] where (a_i, b_i) is the positive pair.
`pos_mask` [B, B] bool marks pairs (i, j) that are NOT negatives (the same product twice in a
batch, or product j among query i's relevant products): the softmax loss drops off-diagonal
True entries from both denominators, the sigmoid loss labels them +1. Accuracy metrics (in-batch
top-1, each direction) count the diagonal as correct when it beats every true negative.

Each loss comes in two forms with the same value and gradients:
  *  `softmax_contrastive` / `sigmoid_contrastive` materialise the B x B logits;
  *  `*_chunked(..., chunk_size)` scan over row blocks of `a` and keep only a [chunk, B] block
     alive (rematerialised in the backward pass), carrying running column statistics (online
     log-sum-exp). Memory is O(chunk * B) instead of O(B^2). `softmax_block` (one row block's
     row losses + partial column stats) and the associative `merge_softmax_columns` are the
     units a shard_map version distributes: each device runs blocks of its rows against the
     all-gathered `b` and the column stats are merged across devices.
`pos_mask` is either a [B, B] bool array or `(product_index [B], positives [B, K] | None)`, from
which the chunked losses build each block's rows of the mask without an [B, B] array.
`logit_scale` is the log of the logit multiplier (the learned parameter, as in CLIP/SigLIP).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

# Finite stand-in for -inf: exp(NEG - m) underflows to 0 without inf - inf = NaN.
NEG = -1e30
MAX_SCALE = 100.0  # CLIP clips the learned temperature at 100.

PosMask = Any  # [B, B] bool array, or (product_index [B], positives [B, K] or None).


def make_pos_mask(product_index, positives=None, col_product_index=None) -> jax.Array:
  """Returns [B, Bc] bool: True where row i and column j share a product, or j in positives[i].

  Args:
    product_index: [B] int, product of each row (pair).
    positives: optional [B, K] int, all relevant products of row i's query (pad -1).
    col_product_index: [Bc] int, products of the columns (default: `product_index`); lets the
      chunked losses build one [chunk, B] block at a time.
  """
  product_index = jnp.asarray(product_index)
  if product_index.ndim != 1:
    raise ValueError(f"product_index must be [B], got shape {product_index.shape}")
  cols = product_index if col_product_index is None else jnp.asarray(col_product_index)
  mask = product_index[:, None] == cols[None, :]
  if positives is not None:
    positives = jnp.asarray(positives)
    if positives.ndim != 2 or positives.shape[0] != product_index.shape[0]:
      raise ValueError(f"positives must be [B={product_index.shape[0]}, K], "
                       f"got shape {positives.shape}")
    hit = (positives[:, :, None] == cols[None, None, :]) & (positives[:, :, None] >= 0)
    mask = mask | jnp.any(hit, axis=1)
  return mask


def _scale(logit_scale):
  return jnp.minimum(jnp.exp(jnp.asarray(logit_scale, jnp.float32)), MAX_SCALE)


def _check(a, b, pos_mask, weights, name):
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"{name}: a and b must both be [B, D]; got {a.shape} and {b.shape}")
  n = a.shape[0]
  if pos_mask is not None and not isinstance(pos_mask, tuple) and pos_mask.shape != (n, n):
    raise ValueError(f"{name}: pos_mask must be [{n}, {n}], got {pos_mask.shape}")
  if weights is not None and jnp.shape(weights) != (n,):
    raise ValueError(f"{name}: weights must be [{n}], got {jnp.shape(weights)}")


def _dense_mask(pos_mask, n):
  """Returns the [n, n] bool mask (or None) from either accepted pos_mask form."""
  if pos_mask is None:
    return None
  if isinstance(pos_mask, tuple):
    return make_pos_mask(*pos_mask)
  return jnp.asarray(pos_mask, bool)


def _weights(weights, n):
  w = jnp.ones((n,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  return w, jnp.maximum(jnp.sum(w), 1e-12), (w > 0).astype(jnp.float32)


def _acc(correct, valid):
  return jnp.sum(correct.astype(jnp.float32) * valid) / jnp.maximum(jnp.sum(valid), 1.0)


def _dense_logits(a, b, pos_mask):
  """Returns (cosine [B, B], negative mask [B, B], eye) for the unchunked losses."""
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  n = a.shape[0]
  cos = a @ b.T  # [B, B]
  eye = jnp.eye(n, dtype=bool)
  neg = ~eye
  mask = _dense_mask(pos_mask, n)
  if mask is not None:
    neg = neg & ~mask
  return cos, neg, eye


def softmax_contrastive(a, b, logit_scale, pos_mask: PosMask = None, weights=None):
  """Returns (loss, metrics): bidirectional InfoNCE (CLIP) with a learned temperature.

  loss = 1/2 (sum_i w_i CE(row i) + sum_j w_j CE(column j)) / sum w with logits
  min(exp(logit_scale), 100) * <a_i, b_j>; off-diagonal `pos_mask` entries leave both
  denominators. `weights` [B] (e.g. graded relevance) default to 1.
  """
  _check(a, b, pos_mask, weights, "softmax_contrastive")
  n = a.shape[0]
  s = _scale(logit_scale)
  cos, neg, eye = _dense_logits(a, b, pos_mask)
  logits = jnp.where(neg | eye, s * cos, NEG)
  diag = jnp.diagonal(logits)
  loss_a2b = jax.nn.logsumexp(logits, axis=1) - diag  # [B]
  loss_b2a = jax.nn.logsumexp(logits, axis=0) - diag  # [B]
  w, wsum, valid = _weights(weights, n)
  la, lb = jnp.sum(w * loss_a2b) / wsum, jnp.sum(w * loss_b2a) / wsum
  loss = 0.5 * (la + lb)
  only_neg = jnp.where(neg, logits, NEG)
  metrics = dict(
      loss=loss, loss_a2b=la, loss_b2a=lb,
      acc_a2b=_acc(diag > jnp.max(only_neg, axis=1), valid),
      acc_b2a=_acc(diag > jnp.max(only_neg, axis=0), valid),
      **_sim_metrics(cos, neg), scale=s)
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def sigmoid_contrastive(a, b, logit_scale, logit_bias, pos_mask: PosMask = None, weights=None):
  """Returns (loss, metrics): SigLIP pairwise sigmoid loss.

  logits = exp(logit_scale) * <a_i, b_j> + logit_bias; label +1 on the diagonal and on
  `pos_mask` entries, -1 elsewhere; loss = sum_i w_i sum_j -log sigmoid(label * logit) / sum w
  (SigLIP's normalisation by batch size when w = 1). Init logit_scale = log 10, bias = -10.
  """
  _check(a, b, pos_mask, weights, "sigmoid_contrastive")
  n = a.shape[0]
  s = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
  cos, neg, eye = _dense_logits(a, b, pos_mask)
  logits = s * cos + jnp.asarray(logit_bias, jnp.float32)
  labels = jnp.where(neg, -1.0, 1.0)
  row_loss = -jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=1)  # [B]
  w, wsum, valid = _weights(weights, n)
  loss = jnp.sum(w * row_loss) / wsum
  diag = jnp.diagonal(logits)
  only_neg = jnp.where(neg, logits, NEG)
  metrics = dict(
      loss=loss,
      acc_a2b=_acc(diag > jnp.max(only_neg, axis=1), valid),
      acc_b2a=_acc(diag > jnp.max(only_neg, axis=0), valid),
      **_sim_metrics(cos, neg), scale=s, bias=jnp.asarray(logit_bias, jnp.float32))
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def _sim_metrics(cos, neg):
  """Returns mean cosine of positives (diagonal) and of true negatives."""
  negf = neg.astype(jnp.float32)
  return dict(pos_sim=jnp.mean(jnp.diagonal(cos)),
              neg_sim=jnp.sum(cos * negf) / jnp.maximum(jnp.sum(negf), 1.0))


# ---------------------------------------------------------------------------------------------
# Chunked (row-block) versions.


def _blocks(a, pos_mask, weights, chunk_size, name):
  """Returns the row-blocked inputs of the chunked losses.

  Rows are padded to a multiple of `chunk_size` with zero embeddings that are excluded
  everywhere (`valid` False), so any batch size works.
  """
  if chunk_size <= 0:
    raise ValueError(f"{name}: chunk_size must be > 0, got {chunk_size}")
  n, d = a.shape
  c = min(chunk_size, n)
  nb = -(-n // c)
  pad = nb * c - n
  rows = jnp.arange(nb * c)
  xs = dict(a=jnp.pad(a.astype(jnp.float32), ((0, pad), (0, 0))).reshape(nb, c, d),
            rows=rows.reshape(nb, c), valid=(rows < n).reshape(nb, c))
  if isinstance(pos_mask, tuple):  # Built per block from ids: never an [B, B] array.
    pidx, positives = pos_mask
    pidx = jnp.asarray(pidx)
    xs["pidx"] = jnp.pad(pidx, (0, pad), constant_values=-1).reshape(nb, c)
    if positives is not None:
      positives = jnp.asarray(positives)
      xs["positives"] = jnp.pad(positives, ((0, pad), (0, 0)),
                                constant_values=-1).reshape(nb, c, -1)
  elif pos_mask is not None:
    xs["mask"] = jnp.pad(jnp.asarray(pos_mask, bool), ((0, pad), (0, 0))).reshape(nb, c, n)
  w, wsum, valid_w = _weights(weights, n)
  return xs, w, wsum, valid_w


def _block_logits(x, b, pos_mask):
  """Returns (cosine [c, B], true-negative mask [c, B], diagonal mask [c, B]) for one block."""
  n = b.shape[0]
  cos = x["a"] @ b.T  # [c, B]
  diag = x["rows"][:, None] == jnp.arange(n)[None, :]
  neg = ~diag & x["valid"][:, None]
  if "mask" in x:
    neg = neg & ~x["mask"]
  elif "pidx" in x:
    cols = pos_mask[0]
    neg = neg & ~make_pos_mask(x["pidx"], x.get("positives"), col_product_index=cols)
  return cos, neg, diag


def softmax_block(x, b, s, pos_mask):
  """Returns (row outputs, column stats) of the softmax loss for one row block `x` of `a`.

  Row outputs: loss [c] and top-1 correctness [c] of each row (complete within the block).
  Column stats: a partial log-sum-exp per column of `b` plus metric sums, combined across
  blocks (or devices) with the associative `merge_softmax_columns`.
  """
  cos, neg, diag = _block_logits(x, b, pos_mask)
  keep = neg | (diag & x["valid"][:, None])  # Entries in the denominators.
  logits = jnp.where(keep, s * cos, NEG)  # [c, B]
  rows = (jax.nn.logsumexp(logits, axis=1) - x["diag"],
          x["diag"] > jnp.max(jnp.where(neg, logits, NEG), axis=1))
  # The stabiliser carries no gradient: d/dz [m + log sum exp(z - m)] is softmax(z) for any
  # constant m. A column with no kept entry in this block sums exp(0) per entry here, but its
  # max is NEG, so the merge with any real entry (its own diagonal) scales that to 0.
  m = jax.lax.stop_gradient(jnp.max(logits, axis=0))
  negf = neg.astype(jnp.float32)
  cols = dict(col_max=m, col_sum=jnp.sum(jnp.exp(logits - m[None, :]), axis=0),
              col_neg_max=jnp.max(jnp.where(neg, logits, NEG), axis=0),
              neg_sim=jax.lax.stop_gradient(jnp.sum(cos * negf)), neg_cnt=jnp.sum(negf))
  return rows, cols


def merge_softmax_columns(p, q):
  """Returns the column stats of the union of two row sets (online log-sum-exp merge)."""
  m = jax.lax.stop_gradient(jnp.maximum(p["col_max"], q["col_max"]))
  return dict(col_max=m,
              col_sum=(p["col_sum"] * jnp.exp(p["col_max"] - m)
                       + q["col_sum"] * jnp.exp(q["col_max"] - m)),
              col_neg_max=jnp.maximum(p["col_neg_max"], q["col_neg_max"]),
              neg_sim=p["neg_sim"] + q["neg_sim"], neg_cnt=p["neg_cnt"] + q["neg_cnt"])


def softmax_contrastive_chunked(a, b, logit_scale, pos_mask: PosMask = None, weights=None, *,
                                chunk_size: int = 256):
  """Returns (loss, metrics) equal to `softmax_contrastive`, computed over row blocks.

  `pos_mask` may also be `(product_index, positives)` so the mask is built per block.
  """
  _check(a, b, pos_mask, weights, "softmax_contrastive_chunked")
  n = a.shape[0]
  s = _scale(logit_scale)
  b = b.astype(jnp.float32)
  xs, w, wsum, valid_w = _blocks(a, pos_mask, weights, chunk_size, "softmax_contrastive_chunked")
  cos_diag = jnp.sum(a.astype(jnp.float32) * b, axis=-1)  # [B]
  diag_all = s * cos_diag
  xs["diag"] = jnp.pad(diag_all, (0, xs["rows"].size - n)).reshape(xs["rows"].shape)

  def body(carry, x):
    rows, cols = softmax_block(x, b, s, pos_mask)
    return merge_softmax_columns(carry, cols), rows

  init = dict(col_max=jnp.full((n,), NEG, jnp.float32), col_sum=jnp.zeros((n,), jnp.float32),
              col_neg_max=jnp.full((n,), NEG, jnp.float32), neg_sim=jnp.float32(0),
              neg_cnt=jnp.float32(0))
  # Checkpointing the body keeps only the carry and inputs per block for the backward pass;
  # without it scan would save every [c, B] logits block, i.e. the full B x B matrix.
  carry, (row_loss, row_acc) = jax.lax.scan(jax.checkpoint(body), init, xs)
  row_loss = row_loss.reshape(-1)[:n]
  row_acc = row_acc.reshape(-1)[:n]
  col_loss = carry["col_max"] + jnp.log(carry["col_sum"]) - diag_all
  la, lb = jnp.sum(w * row_loss) / wsum, jnp.sum(w * col_loss) / wsum
  loss = 0.5 * (la + lb)
  metrics = dict(
      loss=loss, loss_a2b=la, loss_b2a=lb,
      acc_a2b=_acc(row_acc, valid_w), acc_b2a=_acc(diag_all > carry["col_neg_max"], valid_w),
      pos_sim=jnp.mean(cos_diag),
      neg_sim=carry["neg_sim"] / jnp.maximum(carry["neg_cnt"], 1.0), scale=s)
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


def sigmoid_contrastive_chunked(a, b, logit_scale, logit_bias, pos_mask: PosMask = None,
                                weights=None, *, chunk_size: int = 256):
  """Returns (loss, metrics) equal to `sigmoid_contrastive`, computed over row blocks."""
  _check(a, b, pos_mask, weights, "sigmoid_contrastive_chunked")
  n = a.shape[0]
  s = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
  bias = jnp.asarray(logit_bias, jnp.float32)
  b = b.astype(jnp.float32)
  xs, w, wsum, valid_w = _blocks(a, pos_mask, weights, chunk_size, "sigmoid_contrastive_chunked")

  def body(carry, x):
    cos, neg, diag = _block_logits(x, b, pos_mask)
    logits = s * cos + bias  # [c, B]
    labels = jnp.where(neg, -1.0, 1.0)
    row_loss = -jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=1)  # [c]
    diag_logit = jnp.sum(jnp.where(diag, logits, 0.0), axis=1)
    only_neg = jnp.where(neg, logits, NEG)
    row_acc = diag_logit > jnp.max(only_neg, axis=1)
    negf = neg.astype(jnp.float32)
    carry = dict(
        col_neg_max=jnp.maximum(carry["col_neg_max"], jnp.max(only_neg, axis=0)),
        neg_sim=carry["neg_sim"] + jax.lax.stop_gradient(jnp.sum(cos * negf)),
        neg_cnt=carry["neg_cnt"] + jnp.sum(negf))
    return carry, (row_loss, row_acc)

  init = dict(col_neg_max=jnp.full((n,), NEG, jnp.float32), neg_sim=jnp.float32(0),
              neg_cnt=jnp.float32(0))
  carry, (row_loss, row_acc) = jax.lax.scan(jax.checkpoint(body), init, xs)
  row_loss = row_loss.reshape(-1)[:n]
  row_acc = row_acc.reshape(-1)[:n]
  loss = jnp.sum(w * row_loss) / wsum
  cos_diag = jnp.sum(a.astype(jnp.float32) * b, axis=-1)
  metrics = dict(
      loss=loss, acc_a2b=_acc(row_acc, valid_w),
      acc_b2a=_acc(s * cos_diag + bias > carry["col_neg_max"], valid_w),
      pos_sim=jnp.mean(cos_diag), neg_sim=carry["neg_sim"] / jnp.maximum(carry["neg_cnt"], 1.0),
      scale=s, bias=bias)
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


# loss.kind -> the dense and the row-chunked form; `logit_params` gives both their parameters after (a, b).
LOSSES = {
    "softmax": softmax_contrastive,
    "sigmoid": sigmoid_contrastive,
}
CHUNKED_LOSSES = {
    "softmax": softmax_contrastive_chunked,
    "sigmoid": sigmoid_contrastive_chunked,
}


def logit_params(kind: str, logit) -> tuple:
  """Returns the loss's parameters from the model's `loss` variables: (scale,) for softmax, (scale, bias) for
  sigmoid. Raises ValueError naming loss.kind for an unknown kind."""
  if kind not in LOSSES:
    raise ValueError(f"loss.kind={kind!r}; expected one of {sorted(LOSSES)}")
  return (logit["logit_scale"],) if kind == "softmax" else (logit["logit_scale"], logit["logit_bias"])

