"""Global-batch contrastive losses over the device mesh: no device ever holds the N x N logits.

The in-batch negatives of a contrastive loss are the whole global batch, so the dense loss needs
an [N, N] logits matrix (and its gradient) on one device: 64k pairs are 16 GiB of f32. Here the
batch stays sharded over the data-parallel mesh axes ("dcn", "data", "fsdp"; P devices, B = N / P
rows each) inside `jax.shard_map`, and the logits are computed block by block:

  * ring (default): the product side `b` travels round the ring of the P devices with `ppermute`
    (as in ring attention / big_vision's chunked SigLIP). At each of the P steps a device meets
    one [B, B] block: it folds the block into its rows' running statistics (online log-sum-exp for
    softmax, a plain sum for sigmoid) and into the column statistics that travel with the block,
    so when a block has gone all the way round and is home again its columns are complete.
    Peak logits memory per device is [B, B] = [N/P, N/P]; the backward pass recomputes each block
    (`jax.checkpoint`), keeping only the circulated `b` blocks, i.e. O(N D) per device.
  * gather: each device all-gathers `b` and computes its [B, N] row block at once; the softmax
    column direction merges partial (max, sum-exp) statistics with pmax + psum_scatter. One big
    matmul instead of P small ones (faster where the [N/P, N] block fits), memory O(N^2 / P).

Both return exactly what `losses.softmax_contrastive` / `losses.sigmoid_contrastive` return
(loss and the same metrics), with the same gradients, for any `pos_mask` form: None, the
`(product_index [N], positives [N, K] | None)` tuple (each block builds its own piece of the mask
with `losses.make_pos_mask(..., col_product_index=...)`), or a dense [N, N] bool (row-sharded).

`method(setting, n, mesh)` resolves config.loss.sharded ("auto" | "ring" | "gather" | "none").
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mmr_jax import sharding as shd
from mmr_jax.training import losses

NEG = losses.NEG
METHODS = ("auto", "ring", "gather", "none")


# --------------------------------------------------------------------------------------- plumbing


def current_mesh(mesh=None):
  """Returns `mesh`, else the mesh of the enclosing `jax.set_mesh` (None when there is none)."""
  if mesh is not None:
    return mesh
  m = jax.sharding.get_abstract_mesh()
  return m if m is not None and m.axis_names else None


def method(setting: str, n: int, mesh=None) -> str:
  """Returns the loss implementation ("none", "ring" or "gather") for a global batch of `n`.

  "auto" shards over the mesh (ring) when there is more than one data-parallel shard and `n`
  divides by their number, else "none" (the single-device losses). An explicit "ring"/"gather"
  on a mesh whose shards do not divide `n` is an error, not a silent fallback.
  """
  if setting not in METHODS:
    raise ValueError(f"loss.sharded={setting!r}; expected one of {METHODS}")
  if setting == "none":
    return "none"
  mesh = current_mesh(mesh)
  p = shd.data_parallel_size(mesh)
  if setting == "auto":
    return "ring" if p > 1 and n % p == 0 else "none"
  if p > 1 and n % p:
    raise ValueError(f"loss.sharded={setting!r}: the global batch of {n} pairs does not divide by "
                     f"the {p} data-parallel shards of mesh {dict(mesh.shape)}")
  return setting if p > 1 else "none"


def _split_mask(pos_mask, n):
  """Returns ({name: array}, form) of the accepted pos_mask forms, for shard_map's in_specs."""
  if pos_mask is None:
    return {}, "none"
  if isinstance(pos_mask, tuple):
    pidx, positives = pos_mask
    pidx = jnp.asarray(pidx)
    if pidx.shape != (n,):
      raise ValueError(f"pos_mask product_index must be [{n}], got {pidx.shape}")
    out = {"pidx": pidx.astype(jnp.int32)}
    if positives is not None:
      positives = jnp.asarray(positives)
      if positives.ndim != 2 or positives.shape[0] != n:
        raise ValueError(f"pos_mask positives must be [{n}, K], got {positives.shape}")
      out["positives"] = positives.astype(jnp.int32)
    return out, "ids"
  mask = jnp.asarray(pos_mask, bool)
  if mask.shape != (n, n):
    raise ValueError(f"pos_mask must be [{n}, {n}], got {mask.shape}")
  return {"mask": mask}, "dense"


def _block_neg(x, rows, cols, col_pidx, mask_cols):
  """Returns (diag [B, C], neg [B, C]): the positive pair and the true negatives of one block.

  rows / cols: global indices of the block's rows and columns; col_pidx: the columns' products
  (id form); mask_cols: the block's columns of the dense mask (dense form).
  """
  diag = rows[:, None] == cols[None, :]
  neg = ~diag
  if "pidx" in x:
    neg = neg & ~losses.make_pos_mask(x["pidx"], x.get("positives"), col_product_index=col_pidx)
  elif mask_cols is not None:
    neg = neg & ~mask_cols
  return diag, neg


def _col_stats(logits, neg, cos):
  """Returns one block's partial softmax column statistics (losses.merge_softmax_columns format)."""
  m = jax.lax.stop_gradient(jnp.max(logits, axis=0))
  negf = neg.astype(jnp.float32)
  return dict(col_max=m, col_sum=jnp.sum(jnp.exp(logits - m[None, :]), axis=0),
              col_neg_max=jax.lax.stop_gradient(jnp.max(jnp.where(neg, logits, NEG), axis=0)),
              neg_sim=jax.lax.stop_gradient(jnp.sum(cos * negf)), neg_cnt=jnp.sum(negf))


def _empty_cols(b):
  return dict(col_max=jnp.full((b,), NEG, jnp.float32), col_sum=jnp.zeros((b,), jnp.float32),
              col_neg_max=jnp.full((b,), NEG, jnp.float32), neg_sim=jnp.float32(0), neg_cnt=jnp.float32(0))


def _varying(tree, axes):
  """Returns `tree` marked as varying over `axes` (scan carries must match the body's outputs)."""
  return jax.tree.map(lambda v: jax.lax.pcast(v, axes, to="varying"), tree)


def _ring(axes, p):
  """Returns the ppermute pairs that pass every shard's block to the next device."""
  return [(i, (i + 1) % p) for i in range(p)]


def _gathered_block(x, a, b, rows, mask, axes):
  """Returns (cos [B, N], diag, neg) of this shard's rows against every column (one side all-gathered)."""
  b_all = jax.lax.all_gather(b, axes, tiled=True)  # [N, D]
  col_pidx = jax.lax.all_gather(x["pidx"], axes, tiled=True) if "pidx" in x else None
  diag, neg = _block_neg(x, rows, jnp.arange(b_all.shape[0]), col_pidx, mask)
  return a @ b_all.T, diag, neg


def _ring_block(x, a, blk, rows, mask):
  """Returns (cos [B, B], diag, neg) of this shard's rows against the ring block `blk` held now."""
  nb = a.shape[0]
  mask_cols = None if mask is None else jax.lax.dynamic_slice_in_dim(mask, blk["src"] * nb, nb, axis=1)
  diag, neg = _block_neg(x, rows, blk["src"] * nb + jnp.arange(nb), blk.get("pidx"), mask_cols)
  return a @ blk["b"].T, diag, neg  # the only logits alive at a time


def _ring_scan(visit, row0, acc0, x, b, *, axes, p):
  """Passes every shard's block once around the ring; returns (row stats, this shard's column stats).

  `visit(row, blk) -> (row, acc)` folds the block held now into the rows' running stats (`row0`) and
  the block's travelling column accumulator `blk["acc"]` (`acc0`); both must be marked varying.
  """
  perm = _ring(axes, p)
  # Rematerialise each visit in the backward pass: otherwise scan keeps every [B, B] block.
  visit = jax.checkpoint(visit)

  def step(carry, _):
    row, blk = carry
    row, acc = visit(row, blk)
    return (row, jax.lax.ppermute(dict(blk, acc=acc), axes, perm)), None

  blk0 = dict(b=b, acc=acc0, src=jax.lax.axis_index(axes))
  if "pidx" in x:
    blk0["pidx"] = x["pidx"]
  (row, blk), _ = jax.lax.scan(step, (row0, blk0), None, length=p - 1)
  row, acc = visit(row, blk)
  # The last block seen belongs to the next device: send only its (now complete) column stats home.
  return row, jax.lax.ppermute(acc, axes, perm)


def _shared_metrics(x, axes, p, cos_diag, diag_logit, row_neg_max, col_neg_max, neg_sim, neg_cnt):
  """Returns (sum of pair weights over the mesh, the metrics both losses report)."""
  w = x["w"]
  wsum = jnp.maximum(jax.lax.psum(jnp.sum(w), axes), 1e-12)
  valid = (w > 0).astype(jnp.float32)
  nvalid = jnp.maximum(jax.lax.psum(jnp.sum(valid), axes), 1.0)
  return wsum, dict(
      acc_a2b=jax.lax.psum(jnp.sum((diag_logit > row_neg_max) * valid), axes) / nvalid,
      acc_b2a=jax.lax.psum(jnp.sum((diag_logit > col_neg_max) * valid), axes) / nvalid,
      pos_sim=jax.lax.psum(jnp.sum(cos_diag), axes) / (cos_diag.shape[0] * p),
      neg_sim=jax.lax.psum(neg_sim, axes) / jnp.maximum(jax.lax.psum(neg_cnt, axes), 1.0))


# ---------------------------------------------------------------------------------------- softmax


def _softmax_local(x, scale, *, axes, p, method_name):
  """Returns (loss, metrics) of one device's shard (runs inside shard_map)."""
  a, b = x["a"].astype(jnp.float32), x["b"].astype(jnp.float32)  # [B, D]
  nb = a.shape[0]
  me = jax.lax.axis_index(axes)
  rows = me * nb + jnp.arange(nb)  # global indices of this shard's pairs
  cos_diag = jnp.sum(a * b, axis=-1)  # [B]
  diag_logit = scale * cos_diag
  mask = x.get("mask")  # [B, N] rows of the dense mask, or None

  if method_name == "gather":
    cos, diag, neg = _gathered_block(x, a, b, rows, mask, axes)
    logits = jnp.where(neg | diag, scale * cos, NEG)
    row_lse = jax.nn.logsumexp(logits, axis=1)
    row_neg_max = jnp.max(jnp.where(neg, logits, NEG), axis=1)
    part = _col_stats(logits, neg, cos)
    # Global column max (a constant for the gradient), then each device keeps its own columns' sum.
    gmax = jax.lax.pmax(part["col_max"], axes)
    col_sum = jax.lax.psum_scatter(part["col_sum"] * jnp.exp(part["col_max"] - gmax), axes,
                                   scatter_dimension=0, tiled=True)  # [B]
    col_lse = jax.lax.dynamic_slice_in_dim(gmax, me * nb, nb) + jnp.log(col_sum)
    col_neg_max = jax.lax.dynamic_slice_in_dim(jax.lax.pmax(part["col_neg_max"], axes), me * nb, nb)
    neg_sim, neg_cnt = part["neg_sim"], part["neg_cnt"]
  else:

    def visit(row, blk):
      """Folds the block held now into the rows' running stats and the block's column stats."""
      cos, diag, neg = _ring_block(x, a, blk, rows, mask)
      logits = jnp.where(neg | diag, scale * cos, NEG)
      m = jnp.maximum(row["m"], jax.lax.stop_gradient(jnp.max(logits, axis=1)))
      row = dict(m=m, s=row["s"] * jnp.exp(row["m"] - m) + jnp.sum(jnp.exp(logits - m[:, None]), axis=1),
                 neg_max=jnp.maximum(row["neg_max"], jnp.max(jnp.where(neg, logits, NEG), axis=1)))
      return row, losses.merge_softmax_columns(blk["acc"], _col_stats(logits, neg, cos))

    row0 = _varying(dict(m=jnp.full((nb,), NEG, jnp.float32), s=jnp.zeros((nb,), jnp.float32),
                         neg_max=jnp.full((nb,), NEG, jnp.float32)), axes)
    row, cols = _ring_scan(visit, row0, _varying(_empty_cols(nb), axes), x, b, axes=axes, p=p)
    row_lse = row["m"] + jnp.log(row["s"])
    row_neg_max = row["neg_max"]
    col_lse = cols["col_max"] + jnp.log(cols["col_sum"])
    col_neg_max = cols["col_neg_max"]
    neg_sim, neg_cnt = cols["neg_sim"], cols["neg_cnt"]

  wsum, shared = _shared_metrics(x, axes, p, cos_diag, diag_logit, row_neg_max, col_neg_max, neg_sim, neg_cnt)
  w = x["w"]
  la = jax.lax.psum(jnp.sum(w * (row_lse - diag_logit)), axes) / wsum
  lb = jax.lax.psum(jnp.sum(w * (col_lse - diag_logit)), axes) / wsum
  loss = 0.5 * (la + lb)
  metrics = dict(loss=loss, loss_a2b=la, loss_b2a=lb, **shared, scale=scale)
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


# ---------------------------------------------------------------------------------------- sigmoid


def _sigmoid_local(x, scale, bias, *, axes, p, method_name):
  """Returns (loss, metrics) of one device's shard (runs inside shard_map)."""
  a, b = x["a"].astype(jnp.float32), x["b"].astype(jnp.float32)
  nb = a.shape[0]
  me = jax.lax.axis_index(axes)
  rows = me * nb + jnp.arange(nb)
  cos_diag = jnp.sum(a * b, axis=-1)
  diag_logit = scale * cos_diag + bias
  mask = x.get("mask")

  def block(cos, diag, neg):
    logits = scale * cos + bias
    labels = jnp.where(neg, -1.0, 1.0)
    only_neg = jax.lax.stop_gradient(jnp.where(neg, logits, NEG))  # metrics only
    return (-jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=1),  # row losses [B]
            jnp.max(only_neg, axis=1), jnp.max(only_neg, axis=0),
            jax.lax.stop_gradient(jnp.sum(cos * neg)), jnp.sum(neg.astype(jnp.float32)))

  if method_name == "gather":
    row_loss, row_neg_max, cmax, neg_sim, neg_cnt = block(*_gathered_block(x, a, b, rows, mask, axes))
    col_neg_max = jax.lax.dynamic_slice_in_dim(jax.lax.pmax(cmax, axes), me * nb, nb)
  else:

    def visit(row, blk):
      rl, rmax, cmax, ns, nc = block(*_ring_block(x, a, blk, rows, mask))
      row = dict(loss=row["loss"] + rl, neg_max=jnp.maximum(row["neg_max"], rmax),
                 neg_sim=row["neg_sim"] + ns, neg_cnt=row["neg_cnt"] + nc)
      return row, jnp.maximum(blk["acc"], cmax)

    row0 = _varying(dict(loss=jnp.zeros((nb,), jnp.float32), neg_max=jnp.full((nb,), NEG, jnp.float32),
                         neg_sim=jnp.float32(0), neg_cnt=jnp.float32(0)), axes)
    row, col_neg_max = _ring_scan(visit, row0, _varying(jnp.full((nb,), NEG, jnp.float32), axes), x, b,
                                  axes=axes, p=p)
    row_loss, row_neg_max = row["loss"], row["neg_max"]
    neg_sim, neg_cnt = row["neg_sim"], row["neg_cnt"]

  wsum, shared = _shared_metrics(x, axes, p, cos_diag, diag_logit, row_neg_max, col_neg_max, neg_sim, neg_cnt)
  loss = jax.lax.psum(jnp.sum(x["w"] * row_loss), axes) / wsum
  metrics = dict(loss=loss, **shared, scale=scale, bias=bias)
  return loss, jax.tree.map(jax.lax.stop_gradient, metrics)


# ------------------------------------------------------------------------------------------ public


def _run(local_fn, a, b, params, pos_mask, weights, *, mesh, how, name):
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"{name}: a and b must both be [N, D]; got {a.shape} and {b.shape}")
  if how not in ("ring", "gather"):
    raise ValueError(f"{name}: method={how!r}; expected 'ring' or 'gather'")
  mesh = current_mesh(mesh)
  if mesh is None:
    raise ValueError(f"{name} needs a mesh: pass mesh= or call it under jax.set_mesh(mesh)")
  n = a.shape[0]
  axes = shd.batch_axes(mesh)
  p = shd.data_parallel_size(mesh)
  if n % p:
    raise ValueError(f"{name}: the global batch of {n} pairs does not divide by the {p} data-parallel "
                     f"shards of mesh {dict(mesh.shape)}")
  w = jnp.ones((n,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  if w.shape != (n,):
    raise ValueError(f"{name}: weights must be [{n}], got {w.shape}")
  x, _ = _split_mask(pos_mask, n)
  x.update(a=a, b=b, w=w)
  specs = {k: P(axes, *([None] * (jnp.ndim(v) - 1))) for k, v in x.items()}
  fn = jax.shard_map(lambda x, *ps: local_fn(x, *ps, axes=axes, p=p, method_name=how),
                     mesh=mesh, in_specs=(specs,) + (P(),) * len(params), out_specs=P())
  return fn(x, *params)


def softmax_contrastive(a, b, logit_scale, pos_mask: losses.PosMask = None, weights=None, *,
                        method: str = "ring", mesh=None):
  """Returns (loss, metrics) equal to `losses.softmax_contrastive`, computed sharded over the mesh.

  a, b: [N, D] global arrays (batch-sharded or not; shard_map lays them out over the data axes).
  method: "ring" (peak logits [N/P, N/P] per device) or "gather" ([N/P, N]).
  mesh: defaults to the mesh of the enclosing `jax.set_mesh`.
  """
  scale = losses._scale(logit_scale)  # pylint: disable=protected-access
  return _run(_softmax_local, a, b, (scale,), pos_mask, weights, mesh=mesh, how=method,
              name="sharded softmax_contrastive")


def sigmoid_contrastive(a, b, logit_scale, logit_bias, pos_mask: losses.PosMask = None, weights=None, *,
                        method: str = "ring", mesh=None):
  """Returns (loss, metrics) equal to `losses.sigmoid_contrastive`, computed sharded over the mesh."""
  scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
  bias = jnp.asarray(logit_bias, jnp.float32)
  return _run(_sigmoid_local, a, b, (scale, bias), pos_mask, weights, mesh=mesh, how=method,
              name="sharded sigmoid_contrastive")


LOSSES: dict[str, Any] = {
    "softmax": softmax_contrastive,
    "sigmoid": sigmoid_contrastive,
}


def loss_grad_temp_bytes(kind: str, how: str, n: int, dim: int, devices) -> int:
  """Returns XLA's per-device temp bytes for loss + gradients at global batch `n` (compiled, never run).

  kind: "softmax" | "sigmoid"; how: "dense" (the unsharded `losses` function) | "ring" | "gather";
  devices: the devices of a 1-D data mesh. Product ids are the positive mask, as in training.
  """
  mesh = shd.make_mesh({"data": len(devices)}, list(devices))
  emb = jax.ShapeDtypeStruct((n, dim), jnp.float32, sharding=NamedSharding(mesh, P(shd.BATCH_AXES, None)))
  ids = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=NamedSharding(mesh, P(shd.BATCH_AXES)))
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))

  def loss(a, b, s, bias, pidx):
    params = losses.logit_params(kind, {"logit_scale": s, "logit_bias": bias})
    if how == "dense":
      return losses.LOSSES[kind](a, b, *params, (pidx, None))[0]
    return LOSSES[kind](a, b, *params, (pidx, None), method=how)[0]

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(emb, emb, scalar, scalar, ids).compile()
  return int(compiled.memory_analysis().temp_size_in_bytes)
