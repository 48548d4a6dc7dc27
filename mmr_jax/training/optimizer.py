"""The optax optimizer: AdamW, warmup + cosine, clipping, decay masks, per-tower lr multipliers."""

from __future__ import annotations

from typing import Any

import jax
import optax
from flax import traverse_util

NO_DECAY_NAMES = ("bias", "scale", "pos_embedding", "cls", "probe", "logit_scale", "logit_bias", "embedding_missing",
                 "targets")  # targets: query_translation's table of token ids, never a weight to decay


def schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  """Returns linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""
  warmup = min(int(optim_cfg.warmup_steps), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim_cfg.lr * optim_cfg.min_lr_ratio)


def decay_mask(params) -> Any:
  """Returns a bool tree: True for weight matrices, False for norms, biases, embeddings-as-offsets, temperatures."""
  flat = traverse_util.flatten_dict(params)
  mask = {k: (k[-1] not in NO_DECAY_NAMES and getattr(v, "ndim", 0) > 1) for k, v in flat.items()}
  return traverse_util.unflatten_dict(mask)


def tower_labels(params, lr_mult) -> Any:
  """Returns a tree labelling each parameter by its top-level module name (the unit of lr multipliers)."""
  def label(path, _):
    top = path[0].key if hasattr(path[0], "key") else str(path[0])
    if top not in lr_mult:
      raise KeyError(f"parameter subtree {top!r} has no entry in optim.lr_mult (known: {sorted(lr_mult)})")
    return top
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(optim_cfg, total_steps: int, params, initialised=()
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns (tx, schedule). `params` may be abstract (ShapeDtypeStructs); only its structure is used.

  `initialised`: top-level parameter names loaded from earlier training (stage 1, pretrained weights);
  their lr_mult is scaled by `optim.init_lr_mult.<name>` (1 when not listed), so e.g. a domain-adapted image
  tower moves slowly while the same tower trained from scratch in another run gets the full rate.
  """
  sched = schedule(optim_cfg, total_steps)
  lr_mult = dict(optim_cfg.lr_mult)
  for name in initialised:
    if name in lr_mult:
      lr_mult[name] = lr_mult[name] * float(dict(optim_cfg.get("init_lr_mult", {})).get(name, 1.0))
  def inner(mult: float) -> optax.GradientTransformation:
    if mult == 0.0:
      return optax.set_to_zero()  # frozen: no update, no optimizer state.
    return optax.adamw(lambda s: sched(s) * mult, b1=optim_cfg.b1, b2=optim_cfg.b2,
                       weight_decay=optim_cfg.weight_decay, mask=decay_mask)
  labels = tower_labels(params, lr_mult)
  used = sorted(set(jax.tree.leaves(labels)))
  tx = optax.chain(
      optax.clip_by_global_norm(optim_cfg.grad_clip) if optim_cfg.grad_clip > 0 else optax.identity(),
      optax.multi_transform({name: inner(float(lr_mult[name])) for name in used}, labels),
  )
  return tx, sched
