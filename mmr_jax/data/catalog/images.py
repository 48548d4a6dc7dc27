"""Catalogue images: safe path resolution, the RGB conversion shared with the pipeline and export, and
the import-time re-encoding to JPEG.

`to_rgb` is the one place that decides how transparency and wide greyscale become RGB: the importer
(`load_image`), the training pipeline and the exported product tower all call it (or mirror it in TF
ops, mmr_jax/export/), so an image embeds alike wherever it enters.
"""

from __future__ import annotations

import io
import pathlib

import numpy as np
from PIL import Image, ImageOps

from mmr_jax.data.catalog.schema import IMAGE_CORRUPT, IMAGE_MISSING, IMAGE_PATH_REFUSED, Skip


def resolve_image_path(src_dir: pathlib.Path, rel: str) -> pathlib.Path:
  """Returns the absolute image path inside src_dir; raises Skip(IMAGE_PATH_REFUSED) otherwise."""
  if "://" in rel:
    raise Skip(IMAGE_PATH_REFUSED, f"{rel!r} is a URL; images must be files inside the folder")
  if "\x00" in rel:
    raise Skip(IMAGE_PATH_REFUSED, f"{rel!r} contains a NUL byte")
  if "\\" in rel and not (src_dir / rel).exists():
    rel = rel.replace("\\", "/")  # written on Windows (images\p1.jpg); a literal backslash name wins
  p = pathlib.PurePath(rel)
  if p.is_absolute() or pathlib.PureWindowsPath(rel).is_absolute():
    raise Skip(IMAGE_PATH_REFUSED, f"{rel!r} is absolute; paths must be relative to the folder")
  root = src_dir.resolve()
  # resolve() follows symlinks too, so a link pointing outside the folder is refused as well.
  full = (root / p).resolve()
  if not full.is_relative_to(root):
    raise Skip(IMAGE_PATH_REFUSED, f"{rel!r} escapes the catalogue folder")
  return full


def to_rgb(img):
  """Returns a Pillow image as RGB the way the importer, the training pipeline and the exported product
  tower agree on: transparency (alpha, or a PNG/GIF transparent colour) composited on white, as shop
  cut-outs are shown; 16-bit/32-bit/float greyscale mapped to 8 bits by its type's range (Pillow's own
  convert clips them to white or black); anything else by `convert("RGB")`.
  """
  if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
    top = float(arr.max(initial=0.0))
    if img.mode == "F":
      hi = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else top
      arr = (arr * (255.0 / hi)).round()
    elif top > 255.0:  # (8-bit data in a wide container stays as it is)
      arr = (arr + 128) // 257 if top <= 65535.0 else (arr * (255.0 / top)).round()  # round(v / 257), exact
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8)).convert("RGB")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out
  return img.convert("RGB")


def load_image(src_dir: pathlib.Path, rel: str, max_side: int,
               jpeg_quality: int = 90) -> tuple[bytes, str | None, str]:
  """Returns (JPEG bytes or b"", skip reason or None, detail) for one product image.

  The image is decoded fully (so truncated files are caught), EXIF-rotated (phone photos),
  composited on white if it has transparency (cut-out product shots), converted to RGB,
  shrunk so its longest side <= max_side and re-encoded as JPEG.
  """
  if not rel:
    return b"", IMAGE_MISSING, "no image given"
  try:
    path = resolve_image_path(src_dir, rel)
  except Skip as e:
    return b"", e.reason, e.detail
  if not path.is_file():
    return b"", IMAGE_MISSING, f"{rel}: {'is a directory' if path.is_dir() else 'file not found'}"
  try:
    with Image.open(path) as img:
      # draft() lets the JPEG decoder downscale by 1/2..1/8 while decoding: big photos cost far less.
      img.draft("RGB", (max_side, max_side))
      img = ImageOps.exif_transpose(img)
      img = to_rgb(img)
      if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
      buf = io.BytesIO()
      img.save(buf, format="JPEG", quality=jpeg_quality)
  except Exception as e:  # pylint: disable=broad-except
    # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, struct.error, ...
    # depending on the codec; any of them means "this file is not a usable image".
    return b"", IMAGE_CORRUPT, f"{rel}: {type(e).__name__}: {e}"
  return buf.getvalue(), None, ""

