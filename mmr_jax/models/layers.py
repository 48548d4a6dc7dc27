"""Transformer layers shared by the ViT image tower, the text towers and the fusion network.

Attention, MLP and encoder blocks, the block stack (`repeat_blocks`: unrolled or `nn.scan`ned, with
or without remat), the final-norm `Encoder`, pooling (`MAPHead`, `masked_mean`), the size presets and
the logical-axis helpers every parameter is created with. Module names follow big_vision's
`models/vit.py` (`encoderblock_{i}/{LayerNorm_0,MultiHeadDotProductAttention_0,LayerNorm_1,MlpBlock_0}`,
`encoder_norm`, `MAPHead_0`) so public checkpoints load with a near-identity mapping
(`models/pretrained.py`); big_vision's text tower likewise reuses its ViT's `Encoder`.

Parameters carry logical axis names (see DESIGN.md): `embed` model width, `mlp` MLP hidden,
`heads`/`kv` attention heads and head dim, `vocab`, `patch` (flattened patch pixels, the input
axis of the patch-embedding kernel) and `layers` (the stacked axis added by `scan_layers`).
Activations are constrained as (`batch`, `length`, `embed` | `mlp`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

Dtype = Any

# Reference: Table 2 of https://arxiv.org/abs/2106.04560 (as in big_vision), plus tiny
# sizes ("pico", "mu") that run on a laptop CPU in seconds.
_WIDTH = {"pico": 32, "mu": 64, "Ti": 192, "S": 384, "M": 512, "B": 768, "L": 1024,
          "So400m": 1152, "H": 1280}
_DEPTH = {"pico": 1, "mu": 2, "Ti": 12, "S": 12, "M": 12, "B": 12, "L": 24, "So400m": 27,
          "H": 32}
_HEADS = {"pico": 2, "mu": 2, "Ti": 3, "S": 6, "M": 8, "B": 12, "L": 16, "So400m": 16, "H": 16}
_MLP_DIM = {"So400m": 4304}  # Everything else uses 4x width.


def decode_variant(variant: str) -> dict[str, Any]:
  """Returns width/depth/num_heads/mlp_ratio(/patch_size) for a name like "B/16" or "mu"."""
  size, patch = variant, None
  if "/" in variant:
    size, patch = variant.split("/", 1)
  if size not in _WIDTH:
    raise ValueError(f"Unknown ViT size {size!r} in variant {variant!r}; "
                     f"known sizes: {sorted(_WIDTH)}")
  width = _WIDTH[size]
  out = dict(width=width, depth=_DEPTH[size], num_heads=_HEADS[size],
             mlp_ratio=_MLP_DIM.get(size, 4 * width) / width)
  if patch is not None:
    if not patch.isdigit() or int(patch) <= 0:
      raise ValueError(f"Bad patch size {patch!r} in ViT variant {variant!r}")
    out["patch_size"] = int(patch)
  return out


class _LogicalParam(nn.LogicallyPartitioned):
  """LogicalPartitioned that tolerates flax's DenseGeneral init path.

  DenseGeneral calls the initializer with a *flattened* 2-D shape, unboxes it and reshapes the
  value back into the box. Unboxing applies a sharding constraint when a mesh is active, which
  fails for a 3-name spec on the 2-D intermediate; the constraint is applied to the final,
  correctly shaped box instead.
  """

  def unbox(self, apply_constraint=True):
    if len(self.names) != getattr(self.value, "ndim", len(self.names)):
      return self.value
    return super().unbox(apply_constraint)


def logical(init: Callable[..., Any], names: tuple[str | None, ...]):
  """Returns `init` wrapped so the created parameter carries logical axis `names`."""
  def wrapper(*args, **kwargs):
    return _LogicalParam(init(*args, **kwargs), tuple(names))
  return wrapper


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Returns x / ||x|| along the last axis in float32 (zero vectors stay zero, no NaN)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def layer_norm(name: str, dtype: Dtype, param_dtype: Dtype) -> nn.LayerNorm:
  """Returns a LayerNorm whose scale/bias carry the `embed` axis name."""
  return nn.LayerNorm(
      dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=logical(nn.initializers.ones, ("embed",)),
      bias_init=logical(nn.initializers.zeros, ("embed",)))


ATTENTION_IMPLS = ("flax", "xla", "cudnn")


def _jax_attention(query, key, value, bias=None, mask=None, dropout_rate=0.0, deterministic=True,
                   *, implementation: str, pad_odd: bool | None = None):
  """`jax.nn.dot_product_attention` behind flax's `attention_fn` interface ([B, L, heads, kv] layout).

  "cudnn" is cuDNN's fused (flash) attention on NVIDIA GPUs: the [B, heads, L, L] logits are never
  written to memory. It has no attention dropout and raises on unsupported shapes or devices. With a
  mask it needs even query and key lengths in training (JAX raises "Unsupported sequence length" for the
  fusion network's attention to 197 ViT tokens), so `pad_odd` (default: for "cudnn") pads an odd length
  by one: a padded key is masked out, a padded query row repeats row 0's mask and is dropped. Rows with
  every key masked (the fusion network zeroes their update) then average over one more zero key.
  """
  if dropout_rate > 0.0 and not deterministic:
    raise ValueError(f"attention_impl={implementation!r} has no attention dropout; set dropout=0 or "
                     "attention_impl='flax'")
  if pad_odd is None:
    pad_odd = implementation == "cudnn"
  if mask is None or (implementation != "cudnn" and not pad_odd):
    return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask,
                                        implementation=implementation)
  b, t, _, _ = query.shape
  s = key.shape[1]
  # cuDNN takes the mask as a bias of full [B, 1|heads, T, S] shape, not a broadcast [B, 1, 1, S].
  mask = jnp.broadcast_to(mask, (b, mask.shape[1], t, s))
  if not pad_odd or (t % 2 == 0 and s % 2 == 0):
    return jax.nn.dot_product_attention(query, key, value, bias=bias, mask=mask,
                                        implementation=implementation)
  if bias is not None:
    raise NotImplementedError("pad_odd with a bias")
  if s % 2:
    key, value = (jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))) for x in (key, value))
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, 1)), constant_values=False)
  if t % 2:
    query = jnp.pad(query, ((0, 0), (0, 1), (0, 0), (0, 0)))
    mask = jnp.concatenate([mask, mask[:, :, :1]], axis=2)
  out = jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=implementation)
  return out[:, :t]


def attention(num_heads: int, dropout: float, dtype: Dtype, param_dtype: Dtype,
              name: str, impl: str = "flax") -> nn.MultiHeadDotProductAttention:
  """Returns multi-head attention with logically named q/k/v/out kernels.

  `impl`: "flax" (flax's einsum + softmax), "xla" (`jax.nn.dot_product_attention` lowered by XLA) or
  "cudnn" (its cuDNN flash-attention kernel, GPU only). All three compute the same function.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={impl!r}; expected one of {ATTENTION_IMPLS}")
  xavier = nn.initializers.xavier_uniform()
  extra = {} if impl == "flax" else {"attention_fn": functools.partial(_jax_attention, implementation=impl)}
  return nn.MultiHeadDotProductAttention(
      num_heads=num_heads, dropout_rate=dropout, dtype=dtype, param_dtype=param_dtype,
      kernel_init=logical(xavier, ("embed", "heads", "kv")),
      out_kernel_init=logical(xavier, ("heads", "kv", "embed")),
      bias_init=logical(nn.initializers.zeros, ("heads", "kv")),
      out_bias_init=logical(nn.initializers.zeros, ("embed",)),
      name=name, **extra)


class MlpBlock(nn.Module):
  """Transformer feed-forward block."""
  mlp_dim: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    """Returns the MLP output, same shape as `x` [B, L, D]."""
    d = x.shape[-1]
    xavier = nn.initializers.xavier_uniform()
    tiny = nn.initializers.normal(stddev=1e-6)
    x = nn.Dense(self.mlp_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=logical(xavier, ("embed", "mlp")),
                 bias_init=logical(tiny, ("mlp",)), name="Dense_0")(x)
    x = nn.gelu(x)
    x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    return nn.Dense(d, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=logical(xavier, ("mlp", "embed")),
                    bias_init=logical(tiny, ("embed",)), name="Dense_1")(x)


class BlockOptions(nn.Module):
  """Fields of a block that `repeat_blocks` stacks (`Encoder1DBlock`, fusion's `FusionBlock`)."""
  num_heads: int
  mlp_dim: int
  dropout: float = 0.0
  attention_impl: str = "flax"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32


class Encoder1DBlock(BlockOptions):
  """Pre-LayerNorm Transformer block (self-attention + MLP), scan-compatible signature."""

  @nn.compact
  def __call__(self, x, mask, deterministic):
    """Returns (x [B, L, D], None); `mask` [B, 1, 1|L, L] bool or None (all keys valid)."""
    act = ("batch", "length", "embed")
    x = nn.with_logical_constraint(x, act)
    y = layer_norm("LayerNorm_0", self.dtype, self.param_dtype)(x)
    y = attention(self.num_heads, self.dropout, self.dtype, self.param_dtype,
                  "MultiHeadDotProductAttention_0", self.attention_impl)(
                      y, y, mask=mask, deterministic=deterministic)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x = nn.with_logical_constraint(x + y, act)
    y = layer_norm("LayerNorm_1", self.dtype, self.param_dtype)(x)
    y = MlpBlock(self.mlp_dim, self.dropout, self.dtype, self.param_dtype, name="MlpBlock_0")(
        y, deterministic)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    return nn.with_logical_constraint(x + y, act), None


def repeat_blocks(block_cls: type[nn.Module], depth: int, carry: Any, *args: Any,
                  remat: bool, remat_policy: str, scan_layers: bool, **block_kwargs) -> Any:
  """Returns the carry after `depth` blocks; call from inside a compact method.

  Blocks have the signature `block(carry, *args) -> (carry, None)` where the last of `args`
  is the (static) `deterministic` flag. The plain version names blocks `encoderblock_{i}`;
  with `scan_layers` there is one `encoderblock` whose params are stacked on a leading
  `layers` axis (compile time independent of depth). `remat` recomputes each block's
  activations in the backward pass. All four combinations compute the same function.
  """
  static = (1 + len(args),)  # Argument index of `deterministic` (0 is the module).
  policy = None
  if remat:
    policy = getattr(jax.checkpoint_policies, remat_policy, None)
    if policy is None:
      raise ValueError(f"Unknown remat_policy {remat_policy!r}: not in jax.checkpoint_policies")
  if scan_layers:
    # prevent_cse=False is safe (and faster) inside scan, which already blocks CSE.
    blk = nn.remat(block_cls, prevent_cse=False, static_argnums=static,
                   policy=policy) if remat else block_cls
    blk = nn.scan(blk, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                  in_axes=(nn.broadcast,) * len(args), length=depth,
                  metadata_params={nn.PARTITION_NAME: "layers"})
    carry, _ = blk(name="encoderblock", **block_kwargs)(carry, *args)
    return carry
  blk = nn.remat(block_cls, static_argnums=static, policy=policy) if remat else block_cls
  for i in range(depth):
    carry, _ = blk(name=f"encoderblock_{i}", **block_kwargs)(carry, *args)
  return carry


class StackOptions(nn.Module):
  """Fields of every module that stacks blocks: the towers, `Encoder` and the fusion network.

  A base class, not a module to call. Its fields come first in a subclass's dataclass order, so
  subclasses are built with keyword arguments (`from_config` does).
  """
  dropout: float = 0.0
  remat: bool = False      # nn.remat each block (recompute activations in backward)
  remat_policy: str = "nothing_saveable"
  scan_layers: bool = False  # nn.scan over blocks: params stacked on a leading `layers` axis
  attention_impl: str = "flax"  # see `attention`
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32


STACK_OPTIONS = tuple(f.name for f in dataclasses.fields(StackOptions)
                      if f.name not in ("parent", "name"))


def stack_options(module: StackOptions) -> dict[str, Any]:
  """Returns the `StackOptions` fields of `module`, to pass on to `Encoder` or `repeat_blocks`."""
  return {k: getattr(module, k) for k in STACK_OPTIONS}


class Tower(StackOptions):
  """Base of the stacks sized by `width` and `mlp_ratio` fields: ViT, TextEncoder, Fusion."""

  @property
  def mlp_dim(self) -> int:
    """Returns the MLP hidden width (rounded: So400m's 4304 is no whole multiple of 1152)."""
    return int(round(self.width * self.mlp_ratio))


class Encoder(StackOptions, kw_only=True):
  """Stack of Transformer blocks followed by a final LayerNorm (`encoder_norm`)."""
  depth: int
  num_heads: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x, mask=None, deterministic=True):
    """Returns the encoded sequence [B, L, D]; `mask` [B, 1, 1, L] marks valid keys."""
    x = repeat_blocks(Encoder1DBlock, self.depth, x, mask, deterministic, num_heads=self.num_heads,
                      mlp_dim=self.mlp_dim, **stack_options(self))
    return layer_norm("encoder_norm", self.dtype, self.param_dtype)(x)


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens."""
  num_heads: int
  mlp_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = "flax"

  @nn.compact
  def __call__(self, x, mask=None):
    """Returns pooled [B, D] from tokens `x` [B, L, D] (`mask` [B, 1, 1, L] valid keys)."""
    n, _, d = x.shape
    probe = self.param("probe", logical(nn.initializers.xavier_uniform(), (None, None, "embed")),
                       (1, 1, d), self.param_dtype)
    probe = jnp.tile(probe.astype(x.dtype), [n, 1, 1])
    x = attention(self.num_heads, 0.0, self.dtype, self.param_dtype,
                  "MultiHeadDotProductAttention_0", self.attention_impl)(probe, x, mask=mask)
    y = layer_norm("LayerNorm_0", self.dtype, self.param_dtype)(x)
    x = x + MlpBlock(self.mlp_dim, 0.0, self.dtype, self.param_dtype, name="MlpBlock_0")(y)
    return x[:, 0]


def masked_mean(x, mask):
  """Returns the float32 mean of x [B, L, D] over positions where mask [B, L] is True ([B, D]).

  All-padding rows (empty text) give zeros rather than NaN.
  """
  x = x.astype(jnp.float32)  # Sums over long sequences lose too much in bfloat16.
  m = mask.astype(jnp.float32)[..., None]
  return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def module_from_config(cls: type[nn.Module], cfg: ml_collections.ConfigDict, what: str,
                       **fixed: Any) -> nn.Module:
  """Returns `cls(**cfg, **fixed)`; keys of `cfg` that are not settable fields raise ValueError.

  `what` names the config in the message ("config.model.vit"); `fixed` are the arguments the
  caller sets itself (dtype, name, ...), which the config may not.
  """
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"} - set(fixed)
  kw = dict(cfg)
  unknown = sorted(set(kw) - fields)
  if unknown:
    raise ValueError(f"Unknown {what} fields {unknown}; known: {sorted(fields)}")
  return cls(**kw, **fixed)
