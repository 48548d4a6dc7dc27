"""big_vision `.npz` checkpoint files: read them into our parameter trees, write ours out.

The file side of `models/pretrained.py`, which maps big_vision parameter names and shapes onto
our params without touching files. Here: reading a local `.npz` (np.savez's bfloat16 recovered,
an optional `key_prefix` subtree such as a two-tower's "img" / "txt", big_vision's "file.npz:img"
spelling) and writing our ViT / text params in big_vision's layout. The trainer calls it for
`config.init.two_tower_npz` and `config.init.vit_npz`.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import ml_dtypes
import numpy as np

from mmr_jax.models import pretrained

Params = Any


def _recover_dtype(a: np.ndarray) -> np.ndarray:
  if a.dtype.type is np.void and a.dtype.itemsize == 2:  # np.savez writes bfloat16 as void.
    return a.view(ml_dtypes.bfloat16)
  return a


def read_npz(path: str | os.PathLike, key_prefix: str = "") -> dict[str, np.ndarray]:
  """Returns the flat {"a/b/c": array} params of a big_vision .npz, below `key_prefix`."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"Pretrained checkpoint {path} does not exist")
  with np.load(path, allow_pickle=False) as z:
    flat = {k: _recover_dtype(z[k]) for k in z.files}
  if key_prefix:
    pre = key_prefix.rstrip("/") + "/"
    sub = {k[len(pre):]: v for k, v in flat.items() if k.startswith(pre)}
    if not sub:
      tops = sorted({k.split("/")[0] for k in flat})
      raise ValueError(f"{path}: no parameters under key_prefix {key_prefix!r}; "
                       f"top-level keys are {tops}")
    flat = sub
  return flat


def save_npz(path: str | os.PathLike, params: Params, *, key_prefix: str = "") -> None:
  """Writes our ViT / text params as a big_vision-layout .npz (e.g. for big_vision tools)."""
  flat = pretrained.to_big_vision(params)
  if key_prefix:
    flat = {f"{key_prefix.rstrip('/')}/{k}": v for k, v in flat.items()}
  with open(path, "wb") as f:
    np.savez(f, **flat)


def load_vit_npz(path: str | os.PathLike, target: Params, *, key_prefix: str = "",
                 keep_init: Sequence[str] = ()) -> Params:
  """Returns ViT params shaped like `target` (our `image_tower` subtree) from a big_vision npz.

  `path`: local .npz (AugReg/big_vision ViT, or a LiT/SigLIP two-tower with key_prefix="img");
  `key_prefix`: its subtree holding the ViT. `target` and `keep_init`: see `pretrained.load_vit`.
  """
  return pretrained.load_vit(target, read_npz(path, key_prefix), what=f"ViT weights from {path}",
                             keep_init=keep_init)


def load_text_npz(path: str | os.PathLike, target: Params, *, key_prefix: str = "txt",
                  keep_init: Sequence[str] = ()) -> Params:
  """Returns text-tower params shaped like `target` from a big_vision text_transformer npz."""
  return pretrained.load_text(target, read_npz(path, key_prefix),
                              what=f"text weights from {path}", keep_init=keep_init)


def _split_key_prefix(path: str | os.PathLike, key_prefix: str) -> tuple[str, str]:
  """Returns (path, key_prefix) from big_vision's "file.npz:img" spelling."""
  path = os.fspath(path)
  if not os.path.exists(path) and ":" in path:
    path, key_prefix = path.rsplit(":", 1)
  return path, key_prefix


def load_vit_npz_into(params: Params, path: str | os.PathLike, *, prefix: str = "image_tower",
                      key_prefix: str = "", keep_init: Sequence[str] = ()) -> Params:
  """Returns model `params` with the ViT at `prefix` loaded from a big_vision .npz.

  `path` may end in ":img" (big_vision's spelling) to select a two-tower checkpoint's subtree.
  """
  path, key_prefix = _split_key_prefix(path, key_prefix)
  loaded = load_vit_npz(path, pretrained.get_subtree(params, prefix), key_prefix=key_prefix,
                        keep_init=keep_init)
  return pretrained.merge_subtree(params, loaded, prefix)


def load_text_npz_into(params: Params, path: str | os.PathLike, *, prefix: str,
                       key_prefix: str = "txt", keep_init: Sequence[str] = ()) -> Params:
  """Returns model `params` with the text tower at `prefix` loaded from a big_vision .npz."""
  path, key_prefix = _split_key_prefix(path, key_prefix)
  loaded = load_text_npz(path, pretrained.get_subtree(params, prefix), key_prefix=key_prefix,
                         keep_init=keep_init)
  return pretrained.merge_subtree(params, loaded, prefix)


def load_two_tower_npz_into(params: Params, path: str | os.PathLike, **kw
                            ) -> tuple[Params, dict[str, list[str]]]:
  """Returns `pretrained.load_two_tower(params, arrays of the local .npz at path, **kw)`."""
  return pretrained.load_two_tower(params, read_npz(path), what=os.fspath(path), **kw)
