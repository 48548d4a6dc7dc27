"""Mapping pretrained big_vision parameters onto the towers' parameter trees (no file I/O).

(a) big_vision checkpoints, given as flat arrays keyed "Transformer/encoderblock_0/MlpBlock_0/
    Dense_0/kernel", ...: plain ViT checkpoints (AugReg, DeiT-3, i1k), the image and text
    towers of LiT/SigLIP two-tower checkpoints, pre-Linen and old-posemb variants, scanned or
    unrolled layers. Position embeddings are resampled when the patch grid differs
    (fine-tuning at another resolution). `load_vit` / `load_text` fill one tower's params;
    `load_two_tower` loads a whole SigLIP / LiT checkpoint into a TwoTower (below).
(b) `merge_subtree`: put a params subtree from any pytree (e.g. stage 1's `image_tower`
    restored by the trainer with Orbax) into a model's params, checking names and shapes.

Both raise one ValueError naming every missing or mismatched parameter with both shapes.
Reading and writing the `.npz` files is `mmr_jax/training/big_vision_npz.py`.
Our module names match big_vision's, so the name mapping is the identity except:
  embedding/kernel  [p, p, 3, W] Conv  <->  [p*p*3, W] Dense over flattened patches (vit.py)
  X/encoderblock_{i}/...  (unrolled)   <->  X/encoderblock/... stacked on axis 0 (scan_layers)
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Mapping, Sequence

import flax
from flax import traverse_util
from flax.core import meta
import numpy as np
import scipy.ndimage

log = logging.getLogger("mmr_jax.models.pretrained")

Params = Any

_BLOCK = re.compile(r"^(?P<pre>(?:.*/)?)encoderblock_(?P<i>\d+)/(?P<rest>.*)$")
_SCANNED = re.compile(r"^(?P<pre>(?:.*/)?)encoderblock/(?P<rest>.*)$")


def _flat(tree: Mapping[str, Any]) -> dict[str, Any]:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(flax.core.unfreeze(tree)).items()}


def _nested(flat: Mapping[str, Any]) -> dict[str, Any]:
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _value(leaf):
  if isinstance(leaf, meta.Partitioned):
    return leaf.value  # Not unbox(): that adds a sharding constraint under a global mesh.
  return leaf.unbox() if isinstance(leaf, meta.AxisMetadata) else leaf


def _rebox(leaf, value):
  return leaf.replace_boxed(value) if isinstance(leaf, meta.AxisMetadata) else value


def _shape(x) -> tuple[int, ...]:
  return tuple(np.shape(_value(x)))


def _convert_pre_linen(tree: dict[str, Any]) -> dict[str, Any]:
  """Returns the tree with submodules renumbered per type (flax's `convert_pre_linen`).

  Pre-Linen numbered submodules in creation order across types (LayerNorm_0,
  MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3); Linen counts each type from 0.
  Re-implemented (10 lines) to avoid importing flax.training, which pulls in Orbax.
  """
  if not isinstance(tree, dict):
    return tree
  groups: dict[str, list[tuple[int, str]]] = {}
  out = {}
  for k, v in tree.items():
    m = re.fullmatch(r"(.+)_(\d+)", k)
    if m is None:
      out[k] = _convert_pre_linen(v)
    else:
      groups.setdefault(m[1], []).append((int(m[2]), k))
  for prefix, items in groups.items():
    for new_i, (_, k) in enumerate(sorted(items)):
      out[f"{prefix}_{new_i}"] = _convert_pre_linen(tree[k])
  return out


def _fix_old_layouts(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Returns a big_vision checkpoint in the current layout (what big_vision's loaders do)."""
  # Pre-Linen checkpoints numbered submodules globally (MlpBlock_3, LayerNorm_2, ...).
  if any(re.search(r"encoderblock_\d+/MlpBlock_3/", k) for k in flat):
    flat = _flat(_convert_pre_linen(_nested(flat)))
  flat = dict(flat)
  for old in ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding"):
    if old in flat:  # Original ViT / pre-2022 big_vision kept posemb inside the encoder.
      flat["pos_embedding"] = flat.pop(old)
  pe = flat.get("pos_embedding")
  if pe is not None and pe.ndim == 3 and "embedding/kernel" in flat:
    n = pe.shape[1]
    if math.isqrt(n - 1) ** 2 == n - 1 and math.isqrt(n) ** 2 != n:
      # Old ViT added posemb after concatenating [cls]: fold its entry into the cls token.
      flat["pos_embedding"] = pe[:, 1:]
      if "cls" in flat:
        flat["cls"] = flat["cls"] + pe[:, :1]
  if "probe" in flat:  # ViT-G era MAP head was inlined.
    for k in [k for k in flat if k == "probe" or k.split("/")[0] in (
        "MlpBlock_0", "MultiHeadDotProductAttention_0", "LayerNorm_0")]:
      flat["MAPHead_0/" + k] = flat.pop(k)
  extra = flat.pop("Encoder_0/pos_embedding", None)  # Text towers that added posemb twice.
  if extra is not None and "pos_embedding" in flat:
    flat["pos_embedding"] = flat["pos_embedding"] + extra
  return flat


def _unstack_layers(flat: dict[str, Any]) -> dict[str, Any]:
  """Returns params with every scanned `X/encoderblock/...` split into `X/encoderblock_{i}`."""
  out = {}
  for k, v in flat.items():
    m = _SCANNED.match(k)
    if m is None:
      out[k] = v
      continue
    for i in range(np.shape(v)[0]):
      out[f"{m['pre']}encoderblock_{i}/{m['rest']}"] = np.asarray(v)[i]
  return out


def _stack_layers(flat: dict[str, Any], scanned_prefixes: set[str]) -> dict[str, Any]:
  """Returns params with `X/encoderblock_{i}/...` stacked into `X/encoderblock/...`."""
  out, groups = {}, {}
  for k, v in flat.items():
    m = _BLOCK.match(k)
    if m is None or m["pre"] not in scanned_prefixes:
      out[k] = v
    else:
      groups.setdefault(f"{m['pre']}encoderblock/{m['rest']}", {})[int(m["i"])] = v
  for k, layers in groups.items():
    if sorted(layers) != list(range(len(layers))):
      raise ValueError(f"Checkpoint has non-contiguous layers {sorted(layers)} for {k}")
    out[k] = np.stack([np.asarray(layers[i]) for i in range(len(layers))])
  return out


def stack_layers(params: Params) -> Params:
  """Returns unboxed params with every `encoderblock_{i}` stacked (the scan_layers layout)."""
  flat = {k: _value(v) for k, v in _flat(params).items()}
  prefixes = {m["pre"] for k in flat if (m := _BLOCK.match(k))}
  return _nested(_stack_layers(flat, prefixes))


def unstack_layers(params: Params) -> Params:
  """Returns unboxed params with every scanned `encoderblock` split into `encoderblock_{i}`."""
  return _nested(_unstack_layers({k: _value(v) for k, v in _flat(params).items()}))


def _resamplable(old: Sequence[int], new: Sequence[int]) -> bool:
  return (len(old) == len(new) == 3 and old[2] == new[2]
          and math.isqrt(old[1]) ** 2 == old[1] and math.isqrt(new[1]) ** 2 == new[1])


def resample_posemb(old: np.ndarray, new_shape: Sequence[int]) -> np.ndarray:
  """Returns a [1, N, W] position embedding bilinearly resized to `new_shape` [1, N', W]."""
  n_old, n_new = old.shape[1], new_shape[1]
  g_old, g_new = math.isqrt(n_old), math.isqrt(n_new)
  if not _resamplable(old.shape, new_shape):
    raise ValueError(f"pos_embedding: cannot resample {old.shape} to {tuple(new_shape)} "
                     "(needs square patch grids and equal width)")
  log.info("Resampling pos_embedding grid %dx%d -> %dx%d", g_old, g_old, g_new, g_new)
  grid = old.reshape(g_old, g_old, -1)
  grid = scipy.ndimage.zoom(grid, (g_new / g_old, g_new / g_old, 1), order=1)
  return grid.reshape(1, n_new, -1)


def _match_flat(target: Params, source: dict[str, np.ndarray], *, keep_init: Sequence[str],
                convert) -> tuple[dict[str, Any], list[str], dict[str, tuple[int, ...]]]:
  """Returns (flat target with leaves replaced by converted `source[name]`, problems, unused).

  Problems are one line per missing or mis-shaped parameter; unused maps the checkpoint arrays
  the target has no place for (in the target's layer layout) to their shapes.
  """
  tflat = _flat(target)
  scanned = {m["pre"] for k in tflat if (m := _SCANNED.match(k))}
  source = _stack_layers(_unstack_layers(source), scanned)
  problems, out, used = [], {}, set()
  for name, leaf in tflat.items():
    if name not in source:
      if any(name == p or name.startswith(p.rstrip("/") + "/") for p in keep_init):
        out[name] = leaf
        continue
      problems.append(f"  {name}: missing in checkpoint (model shape {_shape(leaf)})")
      continue
    used.add(name)
    tshape = _shape(leaf)
    value = convert(name, np.asarray(source[name]), tshape)
    if tuple(value.shape) != tshape:
      problems.append(f"  {name}: checkpoint shape {tuple(np.shape(source[name]))} "
                      f"!= model shape {tshape}")
      continue
    dtype = getattr(_value(leaf), "dtype", value.dtype)
    out[name] = _rebox(leaf, value.astype(dtype))
  return out, problems, {k: tuple(np.shape(source[k])) for k in sorted(set(source) - used)}


def _load_flat(target: Params, source: dict[str, np.ndarray], *, what: str,
               keep_init: Sequence[str], convert) -> Params:
  """Returns `target` with every leaf replaced by `source[name]` (converted), else errors."""
  out, problems, unused = _match_flat(target, source, keep_init=keep_init, convert=convert)
  if problems:
    raise ValueError(f"Cannot load {what}:\n" + "\n".join(problems))
  if unused:
    log.info("%s: checkpoint parameters not used by the model: %s", what, sorted(unused))
  return _nested(out)


def _convert_vit(name, value, tshape):
  if name == "embedding/kernel" and value.ndim == 4:  # Conv [p, p, C, W] -> [p*p*C, W].
    value = value.reshape(-1, value.shape[-1])
  if name == "pos_embedding" and value.shape != tshape and _resamplable(value.shape, tshape):
    value = resample_posemb(value, tshape)
  return value  # Anything still mis-shaped is reported with all other mismatches.


def _convert_text(name, value, tshape):
  if name == "pos_embedding" and value.ndim == 3 and value.shape[1] > tshape[1]:
    value = value[:, :tshape[1]]
  return value


def load_vit(target: Params, arrays: Mapping[str, np.ndarray], *, what: str = "ViT weights",
             keep_init: Sequence[str] = ()) -> Params:
  """Returns ViT params shaped like `target` (our `image_tower` subtree) from big_vision arrays.

  Args:
    target: the image tower's params (boxed or not, unrolled or scan_layers); only shapes and
      dtypes are read, except for leaves kept at init.
    arrays: a big_vision ViT's flat {"Transformer/encoderblock_0/...": array} (AugReg, DeiT-3,
      i1k, or a LiT/SigLIP two-tower's `img/` subtree without the prefix).
    what: names the weights in errors and logs.
    keep_init: parameter names (or prefixes, e.g. "MAPHead_0") allowed to stay at their
      `target` value when the checkpoint lacks them, e.g. a MAP head on a class-token ViT.
  """
  return _load_flat(target, _fix_old_layouts(dict(arrays)), what=what, keep_init=keep_init,
                    convert=_convert_vit)


def load_text(target: Params, arrays: Mapping[str, np.ndarray], *, what: str = "text weights",
              keep_init: Sequence[str] = ()) -> Params:
  """Returns text-tower params shaped like `target` from a big_vision text_transformer's arrays.

  A longer checkpoint `pos_embedding` is truncated to the model's max_len. The vocabulary must
  be the checkpoint's (its SentencePiece model as config.data.tokenizer.path).
  """
  return _load_flat(target, _fix_old_layouts(dict(arrays)), what=what, keep_init=keep_init,
                    convert=_convert_text)


def get_subtree(params: Params, prefix: str) -> Params:
  """Returns the part of `params` at `prefix` ("image_tower", "heads/image"); ValueError if absent."""
  node = flax.core.unfreeze(params)
  for i, key in enumerate(p for p in prefix.split("/") if p):
    if not isinstance(node, dict) or key not in node:
      have = sorted(node) if isinstance(node, dict) else type(node).__name__
      raise ValueError(f"{prefix!r}: {key!r} not in params; available at that level: {have}")
    node = node[key]
  return node


def to_big_vision(params: Params) -> dict[str, np.ndarray]:
  """Returns the flat big_vision-layout arrays of our ViT or text-tower params (the inverse)."""
  flat = {k: np.asarray(_value(v)) for k, v in _flat(params).items()}
  flat = _unstack_layers(flat)
  k = flat.get("embedding/kernel")
  if k is not None and k.ndim == 2:
    p = math.isqrt(k.shape[0] // 3)
    if 3 * p * p != k.shape[0]:
      raise ValueError(f"embedding/kernel {k.shape} is not [p*p*3, W]")
    flat["embedding/kernel"] = k.reshape(p, p, 3, k.shape[1])
  return flat


def merge_subtree(params: Params, subtree: Params, prefix: str) -> Params:
  """Returns `params` with the subtree at `prefix` ("image_tower", "heads/image") replaced.

  `subtree` must have exactly the same parameter names and shapes as the part it replaces,
  up to the layer layout (unrolled `encoderblock_{i}` vs scan_layers `encoderblock`, converted
  to the target's). Values are cast to the target dtypes; boxes of `params` are kept.
  Raises ValueError naming every missing, unexpected or mis-shaped parameter.
  """
  path = [p for p in prefix.split("/") if p]
  if not path:
    raise ValueError("merge_subtree: empty prefix")
  root = flax.core.unfreeze(params)
  node = root
  for i, key in enumerate(path):
    if not isinstance(node, dict) or key not in node:
      have = sorted(node) if isinstance(node, dict) else type(node).__name__
      raise ValueError(f"merge_subtree: {'/'.join(path[:i + 1])!r} not in params; "
                       f"available at that level: {have}")
    if i < len(path) - 1:
      node = node[key]
  tflat = _flat(node[path[-1]]) if isinstance(node[path[-1]], dict) else {"": node[path[-1]]}
  sflat = _flat(subtree) if isinstance(subtree, Mapping) else {"": subtree}
  # Stage 1 and stage 2 may differ in scan_layers: match the target's layer layout.
  scanned = {m["pre"] for k in tflat if (m := _SCANNED.match(k))}
  sflat = _stack_layers(_unstack_layers({k: _value(v) for k, v in sflat.items()}), scanned)
  problems = []
  for name in sorted(set(tflat) - set(sflat)):
    problems.append(f"  {prefix}/{name}: missing in subtree (model shape {_shape(tflat[name])})")
  for name in sorted(set(sflat) - set(tflat)):
    problems.append(f"  {prefix}/{name}: not in model (subtree shape {_shape(sflat[name])})")
  for name in sorted(set(sflat) & set(tflat)):
    if _shape(sflat[name]) != _shape(tflat[name]):
      problems.append(f"  {prefix}/{name}: subtree shape {_shape(sflat[name])} "
                      f"!= model shape {_shape(tflat[name])}")
  if problems:
    raise ValueError(f"merge_subtree({prefix!r}):\n" + "\n".join(problems))
  merged = {}
  for name, leaf in tflat.items():
    value = _value(sflat[name])
    dtype = getattr(_value(leaf), "dtype", None)
    if dtype is not None:
      value = value.astype(dtype)
    merged[name] = _rebox(leaf, value)
  node[path[-1]] = merged[""] if "" in merged else _nested(merged)
  return root


# ------------------------------------------------------------------------------ two-tower checkpoints

# big_vision's `proj/image_text/two_towers.Model` names its parts `img` (models/vit.py), `txt`
# (proj/image_text/text_transformer.py), `t` (log temperature, [1]) and `b` (sigmoid bias, [1];
# SigLIP only). Where each goes in a TwoTower:
TWO_TOWER_TEXT_TOWERS = ("text_tower", "query_tower", "product_text_tower")
TWO_TOWER_SCALARS = {"t": "loss/logit_scale", "b": "loss/logit_bias"}
# Projection heads that the checkpoint's embeddings pass through unchanged when set to identity.
IDENTITY_HEADS = ("heads/query", "heads/product_text", "heads/image")


def two_tower_arrays(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Returns a big_vision checkpoint's parameter arrays without the container prefix.

  Trainer checkpoints keep params under `params/` (optax state) or `opt/target/` (old flax
  optimizer), next to optimizer state; released ones are often the bare params (as big_vision's
  `utils.load_params` reads them).
  """
  for prefix in ("params/", "opt/target/"):
    sub = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    if sub:
      rest = len(flat) - len(sub)
      if rest:
        log.info("two-tower checkpoint: %d non-parameter arrays (optimizer state) not read", rest)
      return sub
  return dict(flat)


def load_two_tower(params: Params, arrays: Mapping[str, np.ndarray], *, what: str = "checkpoint",
                   identity_heads: bool = True, keep_init: Sequence[str] = ()
                   ) -> tuple[Params, dict[str, list[str]]]:
  """Returns (TwoTower params with a SigLIP / LiT checkpoint loaded, report).

  `img/...` goes into `image_tower`, `txt/...` into every text tower the model has (query and
  product towers both start from it), `t` / `b` into `loss/logit_scale` / `loss/logit_bias`
  (both log-scale temperature and additive bias, as big_vision's sigmoid logits
  `z_img . z_txt * exp(t) + b`). A checkpoint without `b` (LiT) leaves the bias at init.
  With `identity_heads`, the square projections `heads/{query,product_text,image}` become the
  identity, so the initial query, product-text and image embeddings are the checkpoint's own.
  Everything else (fusion, other heads) keeps its init.

  Raises one ValueError listing every model parameter missing from the checkpoint, every
  checkpoint array the model has no place for, and every shape mismatch (both shapes).
  `keep_init`: model parameter names or prefixes (e.g. "image_tower/MAPHead_0") allowed to stay
  at init when the checkpoint lacks them.

  The report: {"loaded": model names from the checkpoint, "identity": heads set to identity,
  "kept_init": model names left at init}.
  """
  arrays = two_tower_arrays(arrays)
  groups: dict[str, dict[str, np.ndarray]] = {"img": {}, "txt": {}}
  problems, loaded = [], []
  for k, v in arrays.items():
    head, _, rest = k.partition("/")
    if head in groups and rest:
      groups[head][rest] = v
    elif k not in TWO_TOWER_SCALARS:
      problems.append(f"  {k}: not a two-tower parameter (checkpoint shape {tuple(np.shape(v))}); "
                      f"expected img/..., txt/..., t, b")
  root = flax.core.unfreeze(params)
  out_flat = _flat(root)
  keep = [p.rstrip("/") for p in keep_init]

  def load_tower(prefix: str, ckpt: str, convert) -> None:
    tflat = _flat(root[prefix])
    local_keep = [p[len(prefix) + 1:] for p in keep if p.startswith(prefix + "/")]
    got, probs, unused = _match_flat(tflat, _fix_old_layouts(groups[ckpt]), keep_init=local_keep,
                                     convert=convert)
    problems.extend(p.replace("  ", f"  {prefix}/", 1) for p in probs)
    for u, shape in unused.items():
      hint = (f" (a head: set model.{'vit' if ckpt == 'img' else 'text'}.head_dim)"
              if u.startswith("head/") else "")
      problems.append(f"  {ckpt}/{u}: in checkpoint, not in model {prefix} (checkpoint shape {shape}){hint}")
    for name, leaf in got.items():
      out_flat[f"{prefix}/{name}"] = leaf
      if leaf is not tflat[name]:
        loaded.append(f"{prefix}/{name}")

  if "image_tower" not in root:
    problems.append("  image_tower: not in model params")
  elif not groups["img"]:
    problems.append("  img/...: no image tower in checkpoint")
  else:
    load_tower("image_tower", "img", _convert_vit)
  text_towers = [t for t in TWO_TOWER_TEXT_TOWERS if t in root]
  if not text_towers:
    problems.append(f"  {'/'.join(TWO_TOWER_TEXT_TOWERS)}: no text tower in model params")
  elif not groups["txt"]:
    problems.append("  txt/...: no text tower in checkpoint")
  else:
    for t in text_towers:
      load_tower(t, "txt", _convert_text)
  for ckpt, name in TWO_TOWER_SCALARS.items():
    if name not in out_flat:
      problems.append(f"  {name}: not in model params")
      continue
    tshape = _shape(out_flat[name])
    if ckpt not in arrays:
      if ckpt == "t" and name not in keep:
        problems.append(f"  {name}: missing in checkpoint as {ckpt!r} (model shape {tshape})")
      continue
    value = np.asarray(arrays[ckpt])
    if value.size != int(np.prod(tshape)):
      problems.append(f"  {name}: checkpoint {ckpt!r} shape {value.shape} != model shape {tshape}")
      continue
    leaf = out_flat[name]
    out_flat[name] = _rebox(leaf, value.reshape(tshape).astype(getattr(_value(leaf), "dtype", value.dtype)))
    loaded.append(name)
  if problems:
    raise ValueError(f"Cannot load two-tower {what} (big_vision img/txt/t/b layout):\n" + "\n".join(problems))

  identity = []
  if identity_heads:
    for head in IDENTITY_HEADS:
      name = f"{head}/kernel"
      if name in out_flat and len(set(_shape(out_flat[name]))) == 1:
        leaf = out_flat[name]
        eye = np.eye(_shape(leaf)[0], dtype=getattr(_value(leaf), "dtype", np.float32))
        out_flat[name] = _rebox(leaf, eye)
        identity.append(name)
  done = set(loaded) | set(identity)
  report = {"loaded": sorted(loaded), "identity": identity,
            "kept_init": sorted(k for k in out_flat if k not in done)}
  log.info("two-tower %s: %d arrays loaded into %s; identity %s; kept at init: %s", what,
               len(loaded), ["image_tower", *text_towers], identity, report["kept_init"])
  return _nested(out_flat), report
