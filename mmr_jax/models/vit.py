"""Vision Transformer image tower.

Module names follow big_vision's `models/vit.py` (`embedding`, `pos_embedding`, `cls`,
`Transformer/encoderblock_{i}/...`, `Transformer/encoder_norm`, `MAPHead_0`, `head`) so public ViT
checkpoints load with a near-identity mapping (`models/pretrained.py`). The Transformer blocks,
pooling head and size presets are `models/layers.py`'s, which the text tower and the fusion
network share. Parameters and activations carry the logical axis names listed there.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmr_jax.models import layers

Dtype = Any

POOL_TYPES = ("tok", "map", "gap")
POSEMB_TYPES = ("learn", "sincos2d")


def get_config(variant: str = "mu/16", **overrides) -> ml_collections.ConfigDict:
  """Returns the image-tower ConfigDict (`config.model.vit`) for a preset like "B/16"."""
  if "/" not in variant:
    variant += "/16"
  cfg = ml_collections.ConfigDict(dict(
      **layers.decode_variant(variant),
      posemb="learn",        # "learn" | "sincos2d"
      pool_type="tok",       # "tok" (class token) | "map" (attention pooling) | "gap"
      head_dim=0,            # > 0: a `head` Dense (with bias) after pooling (big_vision's num_classes)
      dropout=0.0,
      remat=False,           # nn.remat each block (recompute activations in backward)
      remat_policy="nothing_saveable",
      scan_layers=False,     # nn.scan over blocks: params stacked on a leading `layers` axis
      attention_impl="flax",  # "flax" | "xla" | "cudnn" (fused flash attention on NVIDIA GPUs)
  ))
  cfg.update(overrides)
  return cfg


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.,
                     dtype: Dtype = jnp.float32) -> jax.Array:
  """Returns fixed 2-D sin-cos position embeddings [1, h*w, width] (MoCo v3 recipe)."""
  if width % 4:
    raise ValueError(f"sincos2d position embedding needs width % 4 == 0, got width={width}")
  y, x = np.mgrid[:h, :w]
  omega = np.arange(width // 4) / max(width // 4 - 1, 1)
  omega = 1. / (temperature ** omega)
  y = np.einsum("m,d->md", y.flatten(), omega)
  x = np.einsum("m,d->md", x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe, dtype)[None]


def patchify(image: jax.Array, patch_size: int) -> tuple[jax.Array, int, int]:
  """Returns (patches [B, h*w, p*p*C] flattened in (row, col, channel) order, h, w)."""
  b, hh, ww, c = image.shape
  p = patch_size
  if hh % p or ww % p:
    raise ValueError(f"Image size {hh}x{ww} is not divisible by patch_size={p}; resize images "
                     "to a multiple of the patch size in the input pipeline")
  h, w = hh // p, ww // p
  x = image.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * w, p * p * c), h, w


class ViT(layers.Tower):
  """Vision Transformer over uint8 images; returns (pooled [B, W], patch tokens [B, N, W])."""
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  posemb: str = "learn"
  pool_type: str = "tok"
  head_dim: int = 0

  @nn.compact
  def __call__(self, image, *, train=False):
    """Returns (pooled [B, W] float32-or-dtype, tokens [B, N, W]) for uint8 `image` [B, H, W, 3]."""
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f"vit.pool_type={self.pool_type!r}; expected one of {POOL_TYPES}")
    if image.ndim != 4 or image.shape[-1] != 3:
      raise ValueError(f"ViT expects images [B, H, W, 3], got shape {image.shape}")
    if image.dtype != jnp.uint8:
      raise TypeError(f"ViT expects uint8 images (normalised on device), got {image.dtype}")
    # [0, 255] -> [-1, 1], the range big_vision/SigLIP checkpoints were trained with.
    x = image.astype(self.dtype) / 127.5 - 1.0
    x, h, w = patchify(x, self.patch_size)  # [B, N, p*p*3]
    # A Dense over flattened patches equals big_vision's stride-p Conv (kernel reshaped
    # [p, p, 3, W] -> [p*p*3, W]) and gives the kernel a shardable `patch` axis.
    x = nn.Dense(self.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=layers.logical(nn.initializers.lecun_normal(), ("patch", "embed")),
                 bias_init=layers.logical(nn.initializers.zeros, ("embed",)), name="embedding")(x)
    n, num_patches, c = x.shape
    if self.posemb == "learn":
      pe = self.param(
          "pos_embedding",
          layers.logical(nn.initializers.normal(stddev=1 / np.sqrt(c)), (None, None, "embed")),
          (1, num_patches, c), self.param_dtype)
    elif self.posemb == "sincos2d":
      pe = posemb_sincos_2d(h, w, c)
    else:
      raise ValueError(f"vit.posemb={self.posemb!r}; expected one of {POSEMB_TYPES}")
    x = x + pe.astype(x.dtype)
    if self.pool_type == "tok":
      cls = self.param("cls", layers.logical(nn.initializers.zeros, (None, None, "embed")),
                       (1, 1, c), self.param_dtype)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), [n, 1, 1]), x], axis=1)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    x = nn.Dropout(rate=self.dropout)(x, not train)
    x = layers.Encoder(depth=self.depth, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
                       **layers.stack_options(self), name="Transformer")(x, None, not train)
    if self.pool_type == "tok":
      pooled, tokens = x[:, 0], x[:, 1:]
    elif self.pool_type == "map":
      pooled = layers.MAPHead(self.num_heads, self.mlp_dim, self.dtype, self.param_dtype,
                              self.attention_impl, name="MAPHead_0")(x)
      tokens = x
    else:
      pooled, tokens = jnp.mean(x, axis=1), x
    if self.head_dim:
      pooled = nn.Dense(self.head_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                        kernel_init=layers.logical(nn.initializers.lecun_normal(), ("embed", None)),
                        bias_init=layers.logical(nn.initializers.zeros, (None,)), name="head")(pooled)
    return pooled, tokens


def from_config(cfg: ml_collections.ConfigDict, *, dtype: Dtype = jnp.float32,
                param_dtype: Dtype = jnp.float32, name: str | None = None) -> ViT:
  """Returns a ViT built from a `get_config()`-style ConfigDict (unknown keys are an error)."""
  return layers.module_from_config(ViT, cfg, "config.model.vit", dtype=dtype,
                                   param_dtype=param_dtype, name=name)
