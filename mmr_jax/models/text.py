"""Text Transformer encoder (query tower and product text tower).

Layout follows big_vision's `proj/image_text/text_transformer.py` (`Embed_0/embedding`,
`pos_embedding`, `Encoder_0/encoderblock_{i}`, `Encoder_0/encoder_norm`, `MAPHead_0`, `head`)
so LiT/SigLIP text towers load through `models/pretrained.py`. Unlike big_vision it masks padding
(id 0) in attention and pooling by default, because catalogue texts vary from 3 to hundreds of
tokens. A tower initialised from SigLIP/LiT sets `pad_mask=False`, `pool="last"` and `head_dim`:
those checkpoints attend to every position of a row padded with the eos id, and embed the last
one through a `head` Dense (big_vision's `num_classes` / `out_dim`).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmr_jax.models import layers

Dtype = Any
PAD_ID = 0
POOL_TYPES = ("mean", "first", "last", "map")


def get_config(variant: str = "mu", *, vocab_size: int = 32_000, max_len: int = 64,
               **overrides) -> ml_collections.ConfigDict:
  """Returns the text-tower ConfigDict (`config.model.text`) for a size preset ("mu", "S", "B").

  `vocab_size` must match the tokenizer in DATA_DIR (the trainer sets it from tokenizer.model).
  """
  size = variant.split("/")[0]
  d = layers.decode_variant(size)
  cfg = ml_collections.ConfigDict(dict(
      vocab_size=vocab_size, width=d["width"], depth=d["depth"], num_heads=d["num_heads"],
      mlp_ratio=d["mlp_ratio"], max_len=max_len,
      pool="mean",           # "mean" over non-pad tokens | "first" | "last" token | "map" head
      pad_mask=True,         # False: attend to and pool every position (big_vision/SigLIP)
      head_dim=0,            # > 0: a `head` Dense (with bias) after pooling, as big_vision's
      dropout=0.0, remat=False, remat_policy="nothing_saveable", scan_layers=False,
      attention_impl="flax"))  # see layers.attention
  cfg.update(overrides)
  return cfg


class TextEncoder(layers.Tower):
  """Returns (pooled [B, W], tokens [B, L, W], mask [B, L]) for int token ids [B, L]."""
  vocab_size: int = 32_000
  width: int = 512
  depth: int = 12
  num_heads: int = 8
  mlp_ratio: float = 4.0
  max_len: int = 64
  pool: str = "mean"
  pad_mask: bool = True
  head_dim: int = 0

  @nn.compact
  def __call__(self, tokens, *, train=False):
    """Returns (pooled [B, W or head_dim], encoded tokens [B, L, W], mask [B, L] bool).

    The mask is `id != 0`, or all True when `pad_mask` is False.
    """
    if self.pool not in POOL_TYPES:
      raise ValueError(f"text.pool={self.pool!r}; expected one of {POOL_TYPES}")
    if tokens.ndim != 2:
      raise ValueError(f"TextEncoder expects token ids [B, L], got shape {tokens.shape}")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise TypeError(f"TextEncoder expects integer token ids, got {tokens.dtype}")
    _, length = tokens.shape
    if length > self.max_len:
      raise ValueError(f"Token sequence length {length} exceeds text.max_len={self.max_len}; "
                       "raise max_len or truncate in the input pipeline")
    mask = tokens != PAD_ID if self.pad_mask else jnp.ones(tokens.shape, bool)  # [B, L]
    x = nn.Embed(self.vocab_size, self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 embedding_init=layers.logical(nn.initializers.normal(stddev=0.02),
                                               ("vocab", "embed")),
                 name="Embed_0")(tokens)
    pe = self.param("pos_embedding",
                    layers.logical(nn.initializers.normal(stddev=1 / np.sqrt(self.width)),
                                   (None, None, "embed")),
                    (1, self.max_len, self.width), self.param_dtype)
    x = x + pe[:, :length].astype(x.dtype)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = nn.Dropout(rate=self.dropout)(x, not train)
    # Keys only: pad positions still produce (unused) outputs, masked again when pooling.
    attn_mask = mask[:, None, None, :]  # [B, 1, 1, L]
    x = layers.Encoder(depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                       **layers.stack_options(self), name="Encoder_0")(x, attn_mask, not train)
    if self.pool == "mean":
      pooled = layers.masked_mean(x, mask)
    elif self.pool == "first":
      pooled = x[:, 0]
    elif self.pool == "last":
      pooled = x[:, -1]  # The eos of big_vision's "sticky" tokenisation: the row's last position.
    else:
      pooled = layers.MAPHead(self.num_heads, self.mlp_dim, self.dtype, self.param_dtype,
                              self.attention_impl, name="MAPHead_0")(x, attn_mask)
    if self.head_dim:
      pooled = nn.Dense(self.head_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=layers.logical(nn.initializers.lecun_normal(), ("embed", None)),
                        bias_init=layers.logical(nn.initializers.zeros, (None,)), name="head")(pooled)
    return pooled, x, mask


def from_config(cfg: ml_collections.ConfigDict, *, dtype: Dtype = jnp.float32,
                param_dtype: Dtype = jnp.float32, name: str | None = None) -> TextEncoder:
  """Returns a TextEncoder built from a `get_config()`-style ConfigDict."""
  return layers.module_from_config(TextEncoder, cfg, "config.model.text", dtype=dtype,
                                   param_dtype=param_dtype, name=name)
