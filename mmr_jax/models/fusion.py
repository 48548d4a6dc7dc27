"""Cross-attention fusion of product-text tokens and image patch tokens, with a learned gate.

Two streams of width `width` (text tokens, image patches) run through `depth` blocks of
  self-attention per stream -> cross-attention in BOTH directions (text queries attend to image
  patches, image queries attend to text tokens) -> MLP per stream,
then each stream is pooled. A gate g in [0, 1] (per product) says how much of the product
embedding comes from the fused representation versus the text-only one (`two_tower.py`).

Products without an image: image keys are masked out of text->image attention AND the update
is zeroed (masking alone would fall back to uniform attention over the garbage patches), the
pooled image stream is replaced by a learned `missing_image` vector, and the gate is forced to
0. Hence a product without an image gets the same fused output whatever pixels are passed.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from mmr_jax.models import layers

Dtype = Any


def get_config(**overrides) -> ml_collections.ConfigDict:
  """Returns the fusion ConfigDict (`config.model.fusion`)."""
  cfg = ml_collections.ConfigDict(dict(
      width=64, depth=1, num_heads=2, mlp_ratio=4.0, dropout=0.0,
      # sigmoid(-2) = 0.12: the gate starts mostly on text (see Fusion.gate_init_bias).
      gate_init_bias=-2.0, gate_hidden=64,
      remat=False, remat_policy="nothing_saveable", scan_layers=False,
      attention_impl="flax"))  # see layers.attention
  cfg.update(overrides)
  return cfg


class FusionBlock(layers.BlockOptions):
  """One bidirectional text<->image block; scan-compatible `(carry, *args) -> (carry, None)`."""

  @nn.compact
  def __call__(self, carry, text_mask, has_image, deterministic):
    """Returns ((text [B, L, D], image [B, N, D]), None)."""
    t, v = carry
    b, n, _ = v.shape
    ln = lambda name: layers.layer_norm(name, self.dtype, self.param_dtype)
    att = lambda name: layers.attention(self.num_heads, self.dropout, self.dtype,
                                        self.param_dtype, name, self.attention_impl)
    mlp = lambda name: layers.MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.param_dtype,
                                       name=name)
    drop = lambda y: nn.Dropout(rate=self.dropout)(y, deterministic)
    text_keys = text_mask[:, None, None, :]  # [B, 1, 1, L]
    image_keys = jnp.broadcast_to(has_image[:, None, None, None], (b, 1, 1, n))  # [B, 1, 1, N]
    act = ("batch", "length", "embed")

    y = ln("text_ln_sa")(t)
    t = t + drop(att("text_self_attn")(y, y, mask=text_keys, deterministic=deterministic))
    y = ln("image_ln_sa")(v)
    v = v + drop(att("image_self_attn")(y, y, deterministic=deterministic))

    # Both directions read the same (pre-update) states so neither stream sees the other twice.
    tq, vq = ln("text_ln_ca")(t), ln("image_ln_ca")(v)
    t_upd = att("text_to_image")(tq, vq, mask=image_keys, deterministic=deterministic)
    v_upd = att("image_to_text")(vq, tq, mask=text_keys, deterministic=deterministic)
    t = t + jnp.where(has_image[:, None, None], drop(t_upd), jnp.zeros_like(t_upd))
    v = v + drop(v_upd)

    t = nn.with_logical_constraint(t + drop(mlp("text_mlp")(ln("text_ln_mlp")(t))), act)
    v = nn.with_logical_constraint(v + drop(mlp("image_mlp")(ln("image_ln_mlp")(v))), act)
    return (t, v), None


class Fusion(layers.Tower):
  """Returns {"text": [B, W], "image": [B, W], "gate": [B] (if gate)} from both token sets."""
  width: int = 64
  depth: int = 1
  num_heads: int = 2
  mlp_ratio: float = 4.0
  gate: bool = True
  # Why start on text: at the start of stage 2 the fusion layers are random, while the text
  # tower carries most of the query-matching signal (titles name brand, type, size; many
  # catalogues have missing or generic images). A gate starting at 0.5 would mix a random
  # vector into every product embedding and wreck early retrieval; starting near text lets
  # the gate open per product only as the fused branch earns it.
  gate_init_bias: float = -2.0
  gate_hidden: int = 64

  @nn.compact
  def __call__(self, text_tokens, text_mask, image_tokens, has_image, *, train=False):
    """Fuses text [B, L, Wt] (mask [B, L]) with image patches [B, N, Wi]; has_image [B] bool."""
    has_image = has_image.astype(bool)
    dense = lambda name, names: nn.Dense(
        self.width, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        kernel_init=layers.logical(nn.initializers.lecun_normal(), names),
        bias_init=layers.logical(nn.initializers.zeros, ("embed",)))
    t = dense("text_in", (None, "embed"))(text_tokens)   # [B, L, W]
    v = dense("image_in", (None, "embed"))(image_tokens)  # [B, N, W]
    t, v = layers.repeat_blocks(
        FusionBlock, self.depth, (t, v), text_mask, has_image, not train,
        num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        **layers.stack_options(self))
    t = layers.layer_norm("text_norm", self.dtype, self.param_dtype)(t)
    v = layers.layer_norm("image_norm", self.dtype, self.param_dtype)(v)
    text_pooled = layers.masked_mean(t, text_mask)  # [B, W] f32
    image_pooled = jnp.mean(v.astype(jnp.float32), axis=1)  # [B, W]
    missing = self.param("missing_image",
                         layers.logical(nn.initializers.normal(stddev=0.02), ("embed",)),
                         (self.width,), self.param_dtype)
    image_pooled = jnp.where(has_image[:, None], image_pooled,
                             missing.astype(jnp.float32)[None, :])
    out = {"text": text_pooled, "image": image_pooled}
    if self.gate:
      num_tokens = jnp.sum(text_mask, axis=1).astype(jnp.float32)  # [B]
      hi = has_image.astype(jnp.float32)
      # Length features: text-poor products (few tokens, or none) should lean on the image.
      feats = jnp.concatenate([
          text_pooled, image_pooled, hi[:, None],
          jnp.log1p(num_tokens)[:, None] / 4.0, (num_tokens == 0).astype(jnp.float32)[:, None],
      ], axis=-1)
      h = nn.gelu(nn.Dense(self.gate_hidden, param_dtype=self.param_dtype, name="gate_hidden",
                           kernel_init=layers.logical(nn.initializers.lecun_normal(),
                                                      (None, "mlp")),
                           bias_init=layers.logical(nn.initializers.zeros, ("mlp",)))(feats))
      # Zero kernel: every product starts at exactly sigmoid(gate_init_bias); the kernel
      # still gets gradients through the (non-zero) hidden layer.
      logit = nn.Dense(1, param_dtype=self.param_dtype, name="gate_out",
                       kernel_init=layers.logical(nn.initializers.zeros, ("mlp", None)),
                       bias_init=layers.logical(nn.initializers.constant(self.gate_init_bias),
                                                (None,)))(h)[:, 0]
      out["gate"] = nn.sigmoid(logit) * hi  # Forced to text (0) without an image.
    return out


def from_config(cfg: ml_collections.ConfigDict, *, gate: bool, dtype: Dtype = jnp.float32,
                param_dtype: Dtype = jnp.float32, name: str | None = None) -> Fusion:
  """Returns a Fusion module built from a `get_config()`-style ConfigDict."""
  return layers.module_from_config(Fusion, cfg, "config.model.fusion", gate=gate, dtype=dtype,
                                   param_dtype=param_dtype, name=name)
