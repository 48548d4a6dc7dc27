r"""Export a trained workdir for serving: SavedModels, catalogue embeddings and a ScaNN index.

  python -m mmr_jax.export --workdir DIR --out OUT [--data DATA_DIR] [--k 100]

writes
  OUT/query_tower/          SavedModel: raw UTF-8 query strings -> L2-normalised query embeddings
  OUT/product_tower/        SavedModel: title, description, attributes, image bytes -> product embeddings
  OUT/serving/              SavedModel: raw query strings -> top-K product ids and scores (query tower and
                            the ScaNN searcher inside one graph)
  OUT/embeddings/           the catalogue embedded by the JAX model (format below) and its ScaNN index
  OUT/export_summary.json   what was written, from which checkpoint, measured parity, timings, versions

The towers are the JAX model converted with jax2tf (native serialisation: StableHLO inside an
`XlaCallModule` op, lowered for `--platforms`, default cpu and cuda), batch dimension polymorphic, run
as one XLA cluster. XLA compiles that cluster once per input shape (a B-size query tower: ~1.8 s on
CPU, a stall for the request that brings a new shape), so a request's batch is padded with zero rows to
the next of `--batch_buckets` (default BATCH_BUCKETS: 1, 2, 4, ..., 1024; beyond the last, a multiple of
it) and the padding rows are dropped from the output: batches up to the last bucket compile at most once
per bucket (larger ones once per multiple), and batch 1 and 64 run unpadded. The padding's TF ops cost
~2.5% of the demo serving model's batch-1 call and 6-10% of the bare demo query tower's (~0.9 ms), 2-3%
at batch 64 (old and new export timed alternately in one process; nothing measurable at a B-size tower).
Every SavedModel carries TF Serving's warm-up file, `assets.extra/tf_serving_warmup_requests`
(PredictionLog records: a `serving_default` request per bucket up to `--warmup_max_batch`), so TF
Serving compiles them while loading the model (a TF Serving build with ScaNN's and tensorflow-text's
custom ops and XLA is needed to serve these models at all; no such server was run here).

The parameters are `tf.Variable`s on the exported `tf.Module` (in `variables/`, not constants in the
graph): the leaves the tower computes with, in `m.params`, a dict of variables: each leaf over 64 KiB
(the matrices) is a variable of its own, the small ones (biases, norms) are concatenated into one flat
variable per dtype, because every variable a call reads costs CPU latency while slicing a packed matrix
costs a copy per call (see PACK_MAX_BYTES); the JSON `m.param_layout` names them and
`unflatten_params(m.params, m.param_layout.numpy())` returns {"query_tower/...": array}. Everything that
happens to an input before the model runs happens inside the graph, so a client sends the raw strings
and bytes:

* Text: SentencePiece (tensorflow-text) with the run's tokenizer (`pipeline.tokenizer_path`: the catalogue's
  `tokenizer.model`, or `config.data.tokenizer.path` for a pretrained checkpoint's; also shipped as a SavedModel
  asset under `assets/`); ids truncated to `config.data.query_len` / `product_len` and padded with 0 (or with
  `config.data.tokenizer`'s eos / pad / lowercase conventions), exactly as `Tokenizer.encode` does in training
  and evaluation. Invalid UTF-8 bytes become
  U+FFFD first (what Python's `bytes.decode("utf-8", errors="replace")` gives); valid strings are
  unchanged. Empty strings are valid input (all-padding tokens).
* Product text: `title`, `description`, `attributes` are combined in the graph the way
  `catalog.product_text` does (whitespace runs collapsed per field, Python `str.split()` whitespace, empty
  fields dropped, " | " between fields). `attributes` is the RENDERED string "key: value; key: value"
  with keys sorted, as stored in the products table; render a mapping with
  `mmr_jax.data.catalog.render_attributes(dict)`.
* Images: encoded bytes (JPEG, PNG, GIF, BMP, WebP). The graph reproduces `pipeline.decode_image`
  (Pillow) bit for bit: libjpeg DCT-domain downscaling as in Pillow's `draft()` (decode_jpeg `ratio`,
  accurate integer IDCT), then Pillow's two-pass antialiased bilinear resampling of the whole image to
  `image_size` x `image_size` in Pillow's fixed-point arithmetic, horizontal pass first except where
  Pillow >= 13 runs the vertical one first (height shrinks by more than twice the width's shrink). The
  pass order follows the Pillow installed at export time.
  Empty bytes, bytes that do not decode, and images over Pillow's decompression-bomb limit give a zero
  image and has_image=False, like training; the rest of the batch is unaffected.

Measured parity (tests/test_export.py; `export_summary.json` records the numbers of each export; an export
whose embeddings differ by more than `--parity_tol`, default PARITY_TOL, or whose in-graph tokens or has_image
differ, exits with status 1 naming the model, unless `--allow_parity_mismatch`):
* query tower vs jitted JAX on the same strings (empty, emoji, CJK/Arabic/Cyrillic, 100 KB): max |diff|
  ~1e-7 (asserted <= 1e-5, float32);
* product tower vs JAX on identical preprocessed inputs: ~1e-7 (asserted <= 1e-5);
* in-graph image preprocessing vs `pipeline.decode_image`: 0 pixels differ on JPEG (baseline,
  progressive, grayscale, CMYK, every draft scale, EXIF orientations 2-8 in either byte order), PNG (RGB,
  RGBA, LA, palette, 1/2/4-bit palettes and greys, transparent colours, 16-bit grey and RGBA), GIF, BMP
  and WebP (with alpha too), 1x1 to 700x700 px,
  so the end-to-end bytes->embedding test holds the same 1e-5. Raw images are turned upright and
  transparency is composited on white (`catalog.to_rgb`), as the importer does before training, so a
  cut-out PNG or a phone photo embeds like its imported copy (up to the importer's JPEG re-encoding).
  Known differences: TIFF and other formats TF cannot decode give has_image=False here (Pillow would
  decode them; the importer re-encodes every catalogue image to JPEG, so catalogue embeddings are
  unaffected); a GIF's transparent colour is not composited (TF's GIF decoder has no alpha); EXIF
  orientation is read from JPEGs only, and not from XMP; a 16-bit RGB PNG's tRNS colour is applied here
  (Pillow never matches it); an animated WebP gives has_image=False (Pillow takes its first frame); lossy
  WebP may differ by libwebp version.
* cuda: the exported module's cuda lowering, run with jax.export on an H100, gives the CPU embeddings
  within 1.6e-4 (f32 matmuls in TF32 there, XLA's default; CPU-to-CPU parity is the 1e-5 above).

Latency (tools/bench_export.py: the serving SavedModel called from Python vs numpy tokenisation + jitted
JAX tower + `ScannIndex.search`, timed alternately in one process, medians; "graph" is the SavedModel
under TF's graph runtime, Session.run, what TF Serving's C++ server does per request; 2 shared CPU cores;
B-size six runs over two sessions, demo-size four):
  B-size query tower (configs/demo.py text=B, 12 x 768, 2.7 GFLOP per query; 300 products):
    batch 1:  SavedModel 54-59 / JAX 45-47 ms -> ratio 1.17-1.27 (graph 1.11-1.19)
    batch 64: SavedModel 710-753 / JAX 732-780 ms -> ratio 0.94-1.00 (graph 0.95-0.98)
  demo-size tower (2 x 64, 3.4 MFLOP per query; 3000 products):
    batch 1:  SavedModel 1.3-1.5 / JAX 0.7-0.9 ms -> ratio 1.62-1.85 (graph 1.46-1.56)
    batch 64: ratio 1.21-1.31 (graph 1.06-1.16)
  (four runs over two sessions; the upper ends are the two runs with batch bucketing)
The demo tower's batch-1 time is runtime overhead, not work: TF's function call alone (a signature
that returns its input) costs 0.2 ms under Session.run and 0.3 ms eager against ~0.03 ms for a jitted
JAX call, and TF's XLA cluster launch ~0.1 ms more than JAX's. Neither can be changed from inside a
SavedModel, nor can the caller-side thread settings that help a little (tf.config.threading inter/intra
op 1). At a production-size tower the work dominates, and the matrices matter: they are variables of
their own (PACK_MAX_BYTES), which took the B-size batch-1 query from 85 to 56 ms; the rest of the gap is
the compiler: TF 2.20's XLA makes the same StableHLO into Eigen matmul calls, LayerNorm reductions split
in two (reduce-window + reduce) and thread-split GELUs, where JAX 0.10's XLA emits YNNPACK fusions with
bias and activation inside the matmul (a bare [16, 768] x [768, 3072] matmul chain is only ~5% slower in
TF). ScaNN 1.4.2's TF ops pin TF at 2.20.

Embeddings (OUT/embeddings/):
  embeddings.npy   float32 [N, D], row i = product index i (the DATA_DIR products table's row order),
                   L2-normalised, computed by the JAX model as evaluation does
  ids.txt          N lines, UTF-8, line i = the product id of row i (ids never contain tab or newline;
                   split on "\n" only)
  index/           ScaNN searcher (`mmr_jax.index.ScannIndex.save` format; `ScannIndex.load`), built with
                   the evaluation's parameters when WORKDIR/index/ exists (reused as is when its
                   embeddings are identical), else `index.SCANN_DEFAULTS`
  info.json        {"num_products", "dim", "dtype", "step", "workdir", "data_dir", "index": {...},
                   "fingerprint": export_fingerprint(...)}: a rerun into the same OUT keeps embeddings.npy and
                   index/ only when step, data_dir and the fingerprint of the weights and config all match
The embedding pass is resumable and multi-host: every process embeds its contiguous slice of the
catalogue (`pipeline.make_eval_iterator`) and writes `shards/process_{p}-of-{P}/shard_{j}.npz` (plus the
grain iterator state after it); a rerun skips finished shards (all processes restart from the shard
every process has finished), process 0 merges them, then deletes the shards. OUT must be a path every
process sees (local disk for one host; NFS or a FUSE-mounted bucket for several). Process 0 writes the
SavedModels.

Serving signature (`saved_model_cli show --dir OUT/serving --all`, trimmed):

  signature_def['serving_default']:
    The given SavedModel SignatureDef contains the following input(s):
      inputs['queries'] tensor_info:
          dtype: DT_STRING
          shape: (-1)
          name: serving_default_queries:0
    The given SavedModel SignatureDef contains the following output(s):
      outputs['ids'] tensor_info:
          dtype: DT_STRING
          shape: (-1, 100)
          name: StatefulPartitionedCall:0
      outputs['indices'] tensor_info:
          dtype: DT_INT64
          shape: (-1, 100)
          name: StatefulPartitionedCall:1
      outputs['scores'] tensor_info:
          dtype: DT_FLOAT
          shape: (-1, 100)
          name: StatefulPartitionedCall:2
    Method name is: tensorflow/serving/predict

Outputs are best first; ties in score rank the lower product index first (as `ScannIndex.search`);
with fewer than K products the tail is padded with id "", index -1, score -inf. The query tower has
`serving_default(queries) -> {"embedding" [B, D]}` plus `tokenize` and `embed_tokens`; the product
tower `serving_default(title, description, attributes, image) -> {"embedding", "has_image"}` plus
`preprocess` and `embed_preprocessed`. Load with `import scann, tensorflow_text` first (their custom
ops), then `tf.saved_model.load(path)`.

Bad input: an empty batch returns empty outputs; an undecodable image gives has_image=False; an
over-long string is tokenised whole and truncated like training; inputs of the wrong dtype or
product fields with different batch sizes are rejected with an error naming the inputs. Signature
shapes are not enforced by TF when a function is called: a scalar string is served as a batch of one.
An empty or whitespace-only text has no tokens and, as in JAX, embeds to the zero vector (every product
then scores 0 and ties go to the lowest product indexes).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sys
import time
import uuid
from typing import Any, Mapping, Sequence

import numpy as np
from etils import epath

from mmr_jax import fileio

log = logging.getLogger("mmr_jax.export")

DEFAULT_PLATFORMS = ("cpu", "cuda")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
TOKENIZER_ASSET = "tokenizer.model"
SUMMARY_FILE = "export_summary.json"
# Pillow's fixed-point precision for 8-bit resampling (src/libImaging/Resample.c, PRECISION_BITS).
_PRECISION_BITS = 32 - 8 - 2
# Characters Python's str.split() treats as whitespace (str.isspace()), which catalog.product_text
# collapses; RE2's \s would miss most of them.
_PY_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
                  "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def _ws_class() -> str:
  return "[" + "".join(f"\\x{{{ord(c):x}}}" for c in _PY_WHITESPACE) + "]"


def _pillow_max_pixels() -> int | None:
  """Returns the pixel count over which Pillow refuses to open an image (DecompressionBombError).

  decode_image then gives has_image=False; the graph applies the limit of the Pillow present at export.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)


def _pillow_vertical_first() -> bool:
  """Returns whether the installed Pillow may run the vertical resampling pass first (Pillow >= 13)."""
  import PIL  # pylint: disable=g-import-not-at-top
  return int(PIL.__version__.split(".")[0]) >= 13


# ------------------------------------------------------------------------------------ TF preprocessing


def tf_sanitize_utf8(texts):
  """Returns tf.string `texts` with invalid UTF-8 replaced by U+FFFD (valid strings unchanged)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.strings.unicode_transcode(texts, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)


def tf_product_text(title, description, attributes):
  """Returns tf.string [B]: `catalog.product_text(title, description, attributes)` in TF ops."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  ws = _ws_class()
  parts = tf.stack([title, description, attributes], axis=1)  # [B, 3]
  parts = tf.strings.regex_replace(parts, f"^{ws}+|{ws}+$", "")
  parts = tf.strings.regex_replace(parts, f"{ws}+", " ")
  kept = tf.ragged.boolean_mask(parts, tf.strings.length(parts) > 0)  # [B, (<=3)]
  return tf.strings.reduce_join(kept, axis=1, separator=" | ")


def _pil_coefficients(in_size, out_size: int):
  """Returns (positions [out, K] int32, fixed-point weights [out, K] int32, K) of Pillow's bilinear filter.

  Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` (src/libImaging/Resample.c) for the whole image
  (box = (0, in_size)), in float64 with the same operation order, so the integer weights are Pillow's.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  scale = tf.cast(in_size, tf.float64) / float(out_size)
  filterscale = tf.maximum(scale, 1.0)
  support = filterscale  # bilinear support 1.0, widened by the downscale factor (antialiasing)
  ksize = tf.cast(tf.math.ceil(support), tf.int32) * 2 + 1
  center = (tf.range(out_size, dtype=tf.float64) + 0.5) * scale
  ss = 1.0 / filterscale
  # C's (int) cast truncates toward zero, as tf.cast does.
  xmin = tf.maximum(tf.cast(center - support + 0.5, tf.int32), 0)
  xmax = tf.minimum(tf.cast(center + support + 0.5, tf.int32), in_size) - xmin
  x = tf.range(ksize)
  pos = xmin[:, None] + x[None, :]  # [out, K]
  arg = tf.abs((tf.cast(pos, tf.float64) - center[:, None] + 0.5) * ss)
  w = tf.where((arg < 1.0) & (x[None, :] < xmax[:, None]), 1.0 - arg, 0.0)
  # Pillow sums the weights left to right; cumsum keeps that order (the total's last bit can matter).
  total = tf.cumsum(w, axis=1)[:, -1:]
  w = tf.where(total != 0.0, w / total, w)
  kk = tf.cast(tf.floor(0.5 + w * float(1 << _PRECISION_BITS)), tf.int32)
  return tf.minimum(pos, in_size - 1), kk, ksize


def _pil_resample_axis(x, axis: int, out_size: int):
  """Returns int32 x resampled along `axis` (0: rows, 1: columns) to out_size, Pillow 8-bit semantics."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  pos, kk, ksize = _pil_coefficients(tf.shape(x)[axis], out_size)
  shape = tf.tensor_scatter_nd_update(tf.shape(x), [[axis]], [out_size])
  acc = tf.fill(shape, tf.constant(1 << (_PRECISION_BITS - 1), tf.int32))  # Pillow's rounding term

  def body(k, acc):
    # One tap at a time keeps memory at one output-sized tensor; integer sums are exact in any order
    # (255 * 2**22 * taps stays below 2**31 because the weights sum to 2**22).
    w = kk[:, k]
    w = w[None, :, None] if axis == 1 else w[:, None, None]
    return k + 1, acc + tf.gather(x, pos[:, k], axis=axis) * w

  _, acc = tf.while_loop(lambda k, _: k < ksize, body, (tf.constant(0), acc))
  return tf.clip_by_value(tf.bitwise.right_shift(acc, _PRECISION_BITS), 0, 255)


def tf_pil_resize(image, size: int, vertical_first_rule: bool = True):
  """Returns uint8 [size, size, 3]: Pillow's `img.resize((size, size), BILINEAR)` of uint8 [H, W, 3]."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  x = tf.cast(image, tf.int32)
  h, w = tf.shape(x)[0], tf.shape(x)[1]

  def horizontal(x):
    return tf.cond(tf.shape(x)[1] != size, lambda: _pil_resample_axis(x, 1, size), lambda: x)

  def vertical(x):
    return tf.cond(tf.shape(x)[0] != size, lambda: _pil_resample_axis(x, 0, size), lambda: x)

  # Pillow >= 13 (python-pillow/Pillow#9549) resamples vertically first when the height shrinks by more
  # than twice as many pixels as the width; the 8-bit intermediate makes the order visible.
  v_first = tf.logical_and(h > size, 2 * (w - size) < h - size) if vertical_first_rule else tf.constant(False)
  out = tf.cond(v_first, lambda: horizontal(vertical(x)), lambda: vertical(horizontal(x)))
  return tf.cast(out, tf.uint8)


def _png_header(data):
  """Returns (width, height, bit_depth, color_type) int32 scalars from a PNG's IHDR chunk."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  wh = tf.io.decode_raw(tf.strings.substr(data, 16, 8), tf.int32, little_endian=False)
  depth = tf.io.decode_raw(tf.strings.substr(data, 24, 2), tf.uint8)
  return wh[0], wh[1], tf.cast(depth[0], tf.int32), tf.cast(depth[1], tf.int32)


def _jpeg_orientation(data):
  """Returns the EXIF orientation (int32, 1..8; 1 if none) of JPEG bytes, as Pillow's getexif() reads it:
  the first IFD0 tag 0x0112 (SHORT, SSHORT or LONG) of the first "Exif" APP1 segment before the scan data,
  read only within that segment. (Pillow also reads an XMP orientation; that is not done here.)"""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  n = tf.strings.length(data)
  padded = tf.strings.join([data, b"\0" * 16])  # reads past the end see zeros, never an error

  def byte(pos, end=None):
    v = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, tf.clip_by_value(pos, 0, n), 1), tf.uint8)[0],
                tf.int32)
    return v if end is None else tf.where(tf.logical_and(pos >= 0, pos < end), v, 0)

  def read(pos, size, little, end=None):  # unsigned 16/32-bit integer at pos (bytes past `end` read as 0)
    b = [byte(pos + i, end) for i in range(size)]
    b = b if little else b[::-1]
    return sum(v * (1 << (8 * i)) for i, v in enumerate(b))

  def segment(i, pos, tiff, end, stop):
    marker, length = byte(pos + 1), read(pos + 2, 2, False)
    fill = tf.equal(marker, 0xFF)  # 0xFF fill bytes may precede a marker
    exif = tf.logical_and(tf.equal(marker, 0xE1), tf.equal(tf.strings.substr(padded, pos + 4, 6), b"Exif\0\0"))
    stop = tf.logical_or(tf.not_equal(byte(pos), 0xFF), tf.logical_or(tf.equal(marker, 0xDA), marker == 0xD9))
    found = tf.logical_and(exif, tf.logical_not(stop))
    return (i + 1, tf.where(fill, pos + 1, pos + 2 + length), tf.where(found, pos + 10, tiff),
            tf.where(found, tf.minimum(pos + 2 + length, n), end), tf.logical_or(stop, found))

  _, _, tiff, end, _ = tf.while_loop(lambda i, pos, tiff, end, stop: tf.logical_and(
      tf.logical_and(i < 256, pos + 4 <= n), tf.logical_not(stop)), segment,
      (tf.constant(0), tf.constant(2), tf.constant(-1), tf.constant(0), tf.constant(False)))
  order = tf.strings.substr(padded, tf.maximum(tiff, 0), 2)
  little = tf.equal(order, b"II")
  r16 = lambda pos: tf.where(little, read(pos, 2, True, end), read(pos, 2, False, end))  # noqa: E731
  r32 = lambda pos: tf.where(little, read(pos, 4, True, end), read(pos, 4, False, end))  # noqa: E731
  valid = tf.logical_and(tf.logical_and(tiff >= 0, tf.logical_or(little, tf.equal(order, b"MM"))),
                         tf.equal(r16(tiff + 2), 42))  # TIFF magic
  ifd = tiff + r32(tiff + 4)
  count = tf.where(valid, tf.minimum(r16(ifd), 512), 0)

  def entry(k, orientation, found):
    e = ifd + 2 + 12 * k
    kind = r16(e + 2)  # 3 SHORT, 8 SSHORT (the same two bytes), 4 LONG
    hit = tf.logical_and(tf.logical_and(tf.equal(r16(e), 0x0112), tf.logical_not(found)),
                         tf.logical_or(tf.logical_or(kind == 3, kind == 8), kind == 4))
    value = tf.where(kind == 4, r32(e + 8), r16(e + 8))
    return k + 1, tf.where(hit, value, orientation), tf.logical_or(found, hit)  # the first entry wins

  _, orientation, _ = tf.while_loop(lambda k, o, f: k < count, entry,
                                    (tf.constant(0), tf.constant(1), tf.constant(False)))
  return tf.where(tf.logical_and(orientation >= 1, orientation <= 8), orientation, 1)


def _exif_transpose(img, orientation):
  """Returns [H', W', C]: `img` turned upright as Pillow's ImageOps.exif_transpose does for `orientation`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  t = lambda x: tf.transpose(x, [1, 0, 2])  # noqa: E731
  return tf.switch_case(orientation - 1, [
      lambda: img, lambda: img[:, ::-1], lambda: img[::-1, ::-1], lambda: img[::-1],  # 1-4
      lambda: t(img), lambda: t(img[::-1]), lambda: t(img[::-1, ::-1]), lambda: t(img[:, ::-1])])  # 5-8


def _on_white(rgba):
  """Returns uint8 [H, W, 3]: RGBA composited on white exactly as Pillow's paste(rgba, mask=alpha) does."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  x = tf.cast(rgba, tf.int32)
  a = x[..., 3:]
  blend = 255 * (255 - a) + x[..., :3] * a + 128  # Pillow's BLEND, then DIV255: ((t >> 8) + t) >> 8
  return tf.cast(tf.bitwise.right_shift(tf.bitwise.right_shift(blend, 8) + blend, 8), tf.uint8)


def _png_has_trns(data):
  """Returns whether a PNG has a tRNS (transparent colour) chunk before its image data."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  n = tf.strings.length(data)
  padded = tf.strings.join([data, b"\0" * 8])

  def chunk(i, pos, found, stop):
    length = tf.io.decode_raw(tf.strings.substr(padded, pos, 4), tf.int32, little_endian=False)[0]
    kind = tf.strings.substr(padded, pos + 4, 4)
    return (i + 1, pos + 12 + tf.maximum(length, 0), tf.logical_or(found, tf.equal(kind, b"tRNS")),
            tf.logical_or(tf.equal(kind, b"IDAT"), length < 0))

  _, _, found, _ = tf.while_loop(
      lambda i, pos, found, stop: tf.logical_and(tf.logical_and(i < 1024, pos + 8 <= n),
                                                 tf.logical_not(tf.logical_or(found, stop))),
      chunk, (tf.constant(0), tf.constant(8), tf.constant(False), tf.constant(False)))
  return found


def tf_decode_image(data, size: int, vertical_first_rule: bool = True):
  """Returns uint8 [size, size, 3]: `pipeline.decode_image(data, size)`'s pixels; raises if undecodable."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  max_pixels = _pillow_max_pixels()

  def too_big(w, h):
    if max_pixels is None:
      return tf.no_op()
    return tf.debugging.assert_less_equal(
        tf.cast(w, tf.int64) * tf.cast(h, tf.int64), tf.constant(max_pixels, tf.int64),
        message="image exceeds Pillow's decompression-bomb limit")

  def jpeg():
    shape = tf.io.extract_jpeg_shape(data)  # [H, W, C]
    with tf.control_dependencies([too_big(shape[1], shape[0])]):
      # Pillow's draft(): the largest libjpeg scale 1/s (s in 8, 4, 2, 1) keeping both sides >= size + 1.
      scale = tf.minimum(shape[1] // (size + 1), shape[0] // (size + 1))
      branch = tf.cast(scale >= 2, tf.int32) + tf.cast(scale >= 4, tf.int32) + tf.cast(scale >= 8, tf.int32)
      img = tf.switch_case(branch, [
          (lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r, dct_method="INTEGER_ACCURATE"))
          for r in (1, 2, 4, 8)])
      return _exif_transpose(img, _jpeg_orientation(data))

  def png():
    w, h, depth, color_type = _png_header(data)
    with tf.control_dependencies([too_big(w, h)]):
      # Pillow opens 16-bit grayscale as mode "I;16"; catalog.to_rgb maps it by round(v / 257) unless
      # every value fits 8 bits. Every other PNG: TF's RGBA decode equals Pillow's convert("RGBA") (alpha
      # channel, or tRNS transparent colour), composited on white like to_rgb.
      def gray16():
        g = tf.cast(tf.io.decode_png(data, channels=1, dtype=tf.uint16), tf.int32)
        g = tf.cond(tf.reduce_max(g) > 255, lambda: (g + 128) // 257, lambda: g)
        return tf.tile(tf.cast(g, tf.uint8), [1, 1, 3])
      # Only images with transparency take the RGBA path: for palette/grey PNGs of 1-4 bits without a tRNS
      # chunk, TF's 4-channel decode fills alpha with 2**depth - 1 instead of 255 (near-white results).
      has_alpha = tf.logical_or(tf.logical_or(color_type == 4, color_type == 6), _png_has_trns(data))
      return tf.case([(tf.logical_and(depth == 16, color_type == 0), gray16),
                      (has_alpha, lambda: _on_white(tf.io.decode_png(data, channels=4)))],
                     default=lambda: tf.io.decode_png(data, channels=3))

  def webp():
    img = tf.io.decode_image(data, expand_animations=False)  # its own channels: 3, or 4 with alpha
    with tf.control_dependencies([too_big(tf.shape(img)[1], tf.shape(img)[0])]):
      return tf.cond(tf.shape(img)[2] == 4, lambda: _on_white(img), lambda: img[..., :3])

  def other():
    img = tf.io.decode_image(data, channels=3, expand_animations=False)  # GIF: first frame
    with tf.control_dependencies([too_big(tf.shape(img)[1], tf.shape(img)[0])]):
      return tf.identity(img)

  is_png = tf.equal(tf.strings.substr(data, 0, 8), b"\x89PNG\r\n\x1a\n")
  # A still WebP (an animated one, VP8X with the animation flag, crashes TF's decoder unless channels=3 is
  # asked for, which refuses it cleanly: other() does).
  head = tf.strings.join([data, b"\0" * 21])  # header reads never run past the end
  vp8x_flags = tf.io.decode_raw(tf.strings.substr(head, 20, 1), tf.uint8)[0]
  animated = tf.logical_and(tf.equal(tf.strings.substr(head, 12, 4), b"VP8X"),
                            tf.not_equal(tf.bitwise.bitwise_and(vp8x_flags, 2), 0))
  is_webp = tf.logical_and(tf.logical_and(tf.equal(tf.strings.substr(head, 0, 4), b"RIFF"),
                                          tf.equal(tf.strings.substr(head, 8, 4), b"WEBP")),
                           tf.logical_not(animated))
  img = tf.case([(tf.io.is_jpeg(data), jpeg), (is_png, png), (is_webp, webp)], default=other)
  img = tf.ensure_shape(img, [None, None, 3])
  return tf_pil_resize(img, size, vertical_first_rule)


def tf_decode_images(images, size: int, vertical_first_rule: bool = True):
  """Returns (uint8 [B, size, size, 3], has_image bool [B]) for encoded image bytes [B].

  Empty or undecodable bytes give a zero image and has_image=False (decode_image's contract). TF decode
  ops raise on bad data and graph ops cannot catch; tf.data's ignore_errors() drops the failing rows,
  which are then told apart by their index.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  n = tf.shape(images)[0]
  ds = tf.data.Dataset.from_tensor_slices((tf.range(n), images))
  ds = ds.filter(lambda i, b: tf.strings.length(b) > 0)
  ds = ds.map(lambda i, b: (i, tf_decode_image(b, size, vertical_first_rule)),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=False)
  ds = ds.ignore_errors()
  # A sentinel row keeps the batch non-empty when nothing decodes.
  ds = ds.concatenate(tf.data.Dataset.from_tensors((tf.constant(-1), tf.zeros([size, size, 3], tf.uint8))))
  idx, decoded = ds.batch(tf.cast(n, tf.int64) + 1).get_single_element()
  ok = idx >= 0
  where = tf.boolean_mask(idx, ok)[:, None]
  out = tf.scatter_nd(where, tf.boolean_mask(decoded, ok), tf.stack([n, size, size, 3]))
  has_image = tf.scatter_nd(where, tf.ones_like(where[:, 0]), [n]) > 0
  return out, has_image


def tf_tokenizer(tokenizer_path: str, max_len: int, conventions=None):
  """Returns `tokenizer.tf_encode`'s module for the model file, with the file tracked as a SavedModel asset.

  tensorflow-text's SentencePiece op takes the model proto as an op attribute, so the graph always
  holds a copy; the asset (`assets/tokenizer.model`) ships the file itself next to the graph, for clients
  that tokenise outside TF and to record which tokenizer the model was exported with.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mmr_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  proto = epath.Path(tokenizer_path).read_bytes()
  enc = tok_lib.tf_encode(proto, max_len, conventions)
  enc.model_file = tf.saved_model.Asset(tokenizer_path)
  return enc


# --------------------------------------------------------------------------------------- JAX -> TF


def _host_params(params):
  """Returns the parameter tree as numpy arrays on this host (whole arrays, however they are sharded).

  Gathering a sharded parameter across processes is a collective: every process must call this.
  """
  import jax  # pylint: disable=g-import-not-at-top

  def to_host(x):
    if not isinstance(x, jax.Array):
      return np.asarray(x)
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(to_host, params)


def export_fingerprint(host_params, config) -> dict:
  """Returns sha256 digests of the weights (each leaf's path, dtype, shape and bytes) and of the config.

  Step and data_dir do not identify an export: another run, variant or seed at the same step embeds the
  catalogue differently, so OUT/embeddings is reused only when these match exactly.
  """
  import jax  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_flatten_with_path(host_params)[0]:
    x = np.ascontiguousarray(x)
    h.update(f"{jax.tree_util.keystr(path)}|{x.dtype.str}|{x.shape}\n".encode())
    h.update(x.reshape(-1).view(np.uint8))
  config_json = json.dumps(config.to_dict(), sort_keys=True, default=str)
  return {"params_sha256": h.hexdigest(), "config_sha256": hashlib.sha256(config_json.encode()).hexdigest()}


def _check_platforms(platforms: Sequence[str]) -> tuple[str, ...]:
  platforms = tuple(p.strip().lower() for p in platforms if p.strip())
  bad = [p for p in platforms if p not in PLATFORMS]
  if bad or not platforms:
    raise ValueError(f"platforms {bad or platforms} not supported; choose from {PLATFORMS}")
  return platforms


# Leaves up to this size are packed into one flat variable per dtype; larger ones get their own variable.
# Reading a variable costs a compiled call ~6 us on CPU (37 small leaves were a third of the demo query
# tower's latency), while a slice of a packed variable that feeds a matmul is a copy XLA makes on every
# call, and copying 64 KiB takes about as long as one read. Measured at a B-size query tower (340 MB of
# matrices), batch 1: all packed 85 ms per query in TF (124 ms for the same function in JAX), matrices
# as variables of their own 56 ms (JAX with its usual parameter tree: 47-54 ms).
PACK_MAX_BYTES = 64 * 1024
# Batch sizes the towers' XLA programs are compiled for: a request's batch is padded up to the next one
# (above the last, to a multiple of it); see _run_bucketed.
BATCH_BUCKETS = tuple(2 ** i for i in range(11))  # 1, 2, 4, ..., 1024
# TF Serving's warm-up file in each SavedModel: one request per bucket up to this batch size.
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
WARMUP_MAX_BATCH = 64
MAX_WARMUP_RECORDS = 1000  # TF Serving fails to load a model whose warm-up file has more records
MAX_BATCH_BUCKET = 1 << 20  # bucket sizes are int32 in the graph; a bound far below that keeps sums exact


@dataclasses.dataclass
class _Converted:
  """A model method as a TF function of its parameters: `fn(variables, *inputs) -> emb`."""
  fn: Any
  variables: dict  # {key: tf.Variable}: "packed_<dtype>" (small leaves, concatenated) or "leaf_<i>" (one leaf)
  layout: list  # [{"name", "dtype", "shape", "variable"[, "offset" into a packed variable]}] per used leaf
  jax_fn: Any  # the JAX function jax2tf converted: jax_fn({key: array}, *inputs) -> emb


def _convert(model, params, method: str, examples: Sequence[np.ndarray], poly: Sequence[str],
             platforms: Sequence[str]) -> _Converted:
  """Returns `model.<method>(*inputs)["emb"]` converted by jax2tf, batch-polymorphic per `poly`.

  The parameters stay tf.Variables (in `variables/`, not constants in the graph), but only the leaves
  the method computes with: leaves of at most PACK_MAX_BYTES concatenated into one flat variable per
  dtype, larger ones a variable each (`layout` maps them back to names; `unflatten_params` does it).
  Leaves the method does not compute with are closed over, which flax's parameter lookup needs and XLA
  drops as unused.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top

  host = _host_params(params)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(host)

  def apply(p, *inputs):
    return model.apply({"params": p}, *inputs, train=False, method=method)["emb"]

  closed = jax.make_jaxpr(apply)(host, *examples)
  invars = closed.jaxpr.invars[:len(leaves)]
  read = {id(v) for e in closed.jaxpr.eqns for v in e.invars} | {id(v) for v in closed.jaxpr.outvars}
  layout, slots, offsets, arrays = [], [], {}, {}
  for (path, x), v in zip(leaves, invars):
    if id(v) not in read:
      slots.append(x)
      continue
    dt = np.dtype(x.dtype).name
    entry = {"name": "/".join(str(getattr(k, "key", k)) for k in path), "dtype": dt, "shape": list(x.shape)}
    if x.nbytes > PACK_MAX_BYTES:
      entry["variable"] = f"leaf_{len(layout):04d}"
      arrays[entry["variable"]] = [np.asarray(x)]
    else:
      entry["variable"] = f"packed_{dt}"
      entry["offset"] = offsets.get(dt, 0)
      offsets[dt] = entry["offset"] + x.size
      arrays.setdefault(entry["variable"], []).append(np.ravel(x))
    layout.append(entry)
    slots.append(entry)

  def fn(variables, *inputs):
    flat = [_layout_leaf(variables, e) if isinstance(e, dict) else e for e in slots]
    return apply(jax.tree_util.tree_unflatten(treedef, flat), *inputs)

  tf_fn = jax2tf.convert(fn, polymorphic_shapes=[None, *poly], with_gradient=False,
                         native_serialization_platforms=tuple(platforms))
  variables = {key: tf.Variable(a[0] if key.startswith("leaf_") else np.concatenate(a), trainable=False,
                                name=key) for key, a in arrays.items()}
  return _Converted(tf_fn, variables, layout, fn)


def _layout_leaf(variables: Mapping[str, Any], e: Mapping[str, Any]):
  """Returns the leaf `e` (a layout entry) from `variables` (arrays or tf.Variables, by key)."""
  v = variables[e.get("variable", e["dtype"])]  # exports before per-leaf variables keyed by dtype only
  if "offset" in e:
    v = v[e["offset"]:e["offset"] + math.prod(e["shape"])]
  return v.reshape(e["shape"])


def unflatten_params(variables: Mapping[str, Any], layout_json) -> dict[str, np.ndarray]:
  """Returns {"path/of/leaf": array} from an exported tower's `params` and `param_layout`.

  For a loaded SavedModel m: `unflatten_params(m.params, m.param_layout.numpy())`.
  """
  layout = json.loads(layout_json.decode() if isinstance(layout_json, bytes) else layout_json)
  arrays = {key: np.asarray(v) for key, v in variables.items()}
  return {e["name"]: _layout_leaf(arrays, e) for e in layout}


def check_batch_buckets(buckets) -> tuple[int, ...]:
  """Returns `buckets` (ints, or strings of ints) as a tuple of ints; ValueError unless they increase
  from >= 1 to <= MAX_BATCH_BUCKET."""
  msg = f"batch_buckets must be integers in increasing order from 1 to {MAX_BATCH_BUCKET}, got {buckets!r}"
  out = []
  for b in buckets:
    if isinstance(b, str) and b.strip().isdigit():
      b = int(b)
    if not isinstance(b, (int, np.integer)) or isinstance(b, bool):
      raise ValueError(msg)
    out.append(int(b))
  if not out or out[0] < 1 or out[-1] > MAX_BATCH_BUCKET or any(a >= b for a, b in zip(out, out[1:])):
    raise ValueError(msg)
  return tuple(out)


def check_warmup(buckets: Sequence[int], max_batch: int) -> list[int]:
  """Returns the batch sizes to warm up; ValueError if TF Serving would refuse that many records."""
  sizes = _warmup_batches(buckets, max_batch)
  if len(sizes) > MAX_WARMUP_RECORDS:
    raise ValueError(f"warmup_max_batch={max_batch} gives {len(sizes)} warm-up requests; TF Serving refuses to load "
                     f"a model with more than {MAX_WARMUP_RECORDS}: lower it or use fewer batch_buckets")
  return sizes


def batch_bucket(n: int, buckets: Sequence[int] = BATCH_BUCKETS) -> int:
  """Returns the batch size a request of n rows is padded to: the smallest of `buckets` that is
  >= max(n, 1); above the largest, the next multiple of it. `tf_batch_bucket` in TF ops."""
  last = buckets[-1]
  return next((b for b in buckets if b >= max(n, 1)), -(-n // last) * last)


def tf_batch_bucket(n, buckets: Sequence[int] = BATCH_BUCKETS):
  """Returns `batch_bucket(n, buckets)` for an int32 scalar tensor n, in TF ops."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  table = tf.constant(buckets, tf.int32)
  last = buckets[-1]
  i = tf.minimum(tf.searchsorted(table, tf.reshape(n, [1]))[0], len(buckets) - 1)
  return tf.where(n > last, (n + last - 1) // last * last, tf.gather(table, i))


def _run_bucketed(fn, buckets: Sequence[int], *inputs):
  """Returns fn(*inputs) (one output), with the batch padded to `tf_batch_bucket` rows and sliced back.

  `fn` is a jit-compiled function, which XLA compiles once per input shape: at a B-size tower that is
  ~2 s per batch size never seen before (measured on CPU), a stall for the request that brings it and
  one more executable kept in memory. Padding to the buckets bounds the shapes up to the last bucket.
  It also gives an empty batch one row: jax2tf's shape polymorphism assumes dimensions >= 1. Rows are
  independent in the towers, so the padding rows (zeros) change nothing in the others.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  n = tf.shape(inputs[0])[0]
  rows = tf_batch_bucket(n, buckets)
  padded = [tf.pad(x, [[0, rows - n]] + [[0, 0]] * (x.shape.rank - 1)) for x in inputs]
  return fn(*padded)[:n]


def _conventions(tm):
  """Returns the eos / pad / lowercase conventions the workdir's model was trained with."""
  from mmr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.tokenizer_conventions(tm.config.data)


def _make_query_tower(tm, tokenizer_path: str, platforms: Sequence[str], buckets: Sequence[int] = BATCH_BUCKETS):
  """Returns a tf.Module: raw query strings -> L2-normalised embeddings (see module doc)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mmr_jax.models import two_tower  # pylint: disable=g-import-not-at-top
  q_len = int(tm.config.data.query_len)
  dim = two_tower.embedding_dim(tm.config.model)
  conv = _convert(tm.model, tm.params, "embed_query", [np.ones((1, q_len), np.int32)], ["(b, _)"], platforms)

  class QueryTower(tf.Module):
    """Query tower: SentencePiece in the graph, then the converted JAX query encoder."""

    def __init__(self):
      super().__init__(name="query_tower")
      self.params = conv.variables
      self.param_layout = tf.Variable(json.dumps(conv.layout), trainable=False)
      self.tokenizer = tf_tokenizer(tokenizer_path, q_len, _conventions(tm))
      self.query_len, self.dim = q_len, dim

    @tf.function(jit_compile=True, autograph=False)
    def _model(self, tokens):
      # One XLA cluster per input shape (variables read inside it): measured 0.1-0.25 ms less per call
      # on CPU than the bare XlaCallModule op fed by ReadVariableOps (XLA's on-demand path).
      emb = conv.fn(self.params, tokens)
      emb.set_shape([None, dim])  # static only: no EnsureShape op per request
      return emb

    def embed_ids(self, tokens):
      return _run_bucketed(self._model, buckets, tokens)

    def embed(self, queries):
      return self.embed_ids(self.tokenizer(tf_sanitize_utf8(queries)))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="queries")], autograph=False)
    def serve(self, queries):
      return {"embedding": self.embed(queries)}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="queries")], autograph=False)
    def tokenize(self, queries):
      return {"query_tokens": self.tokenizer(tf_sanitize_utf8(queries))}

    @tf.function(input_signature=[tf.TensorSpec([None, q_len], tf.int32, name="query_tokens")],
                 autograph=False)
    def embed_tokens(self, query_tokens):
      return {"embedding": self.embed_ids(query_tokens)}

  return QueryTower()


def _check_same_batch(**tensors):
  """Returns assertions that every named [B] input has the same B (error names the fields)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  names = list(tensors)
  first = names[0]
  return [tf.debugging.assert_equal(tf.shape(tensors[n])[0], tf.shape(tensors[first])[0],
                                    message=f"inputs {first} and {n} must have the same batch size")
          for n in names[1:]]


def _make_product_tower(tm, tokenizer_path: str, platforms: Sequence[str],
                        buckets: Sequence[int] = BATCH_BUCKETS):
  """Returns a tf.Module: product fields + image bytes -> product embeddings (see module doc)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mmr_jax.models import two_tower  # pylint: disable=g-import-not-at-top
  p_len, size = int(tm.config.data.product_len), int(tm.config.data.image_size)
  dim = two_tower.embedding_dim(tm.config.model)
  examples = [np.ones((1, p_len), np.int32), np.zeros((1, size, size, 3), np.uint8), np.ones((1,), bool)]
  conv = _convert(tm.model, tm.params, "embed_product", examples, ["(b, _)", "(b, _, _, _)", "(b,)"], platforms)
  v_first = _pillow_vertical_first()
  text_spec = lambda name: tf.TensorSpec([None], tf.string, name=name)  # pylint: disable=unnecessary-lambda-assignment
  raw_sig = [text_spec("title"), text_spec("description"), text_spec("attributes"), text_spec("image")]

  class ProductTower(tf.Module):
    """Product tower: text assembly, SentencePiece and Pillow-exact image decoding in the graph."""

    def __init__(self):
      super().__init__(name="product_tower")
      self.params = conv.variables
      self.param_layout = tf.Variable(json.dumps(conv.layout), trainable=False)
      self.tokenizer = tf_tokenizer(tokenizer_path, p_len, _conventions(tm))
      self.product_len, self.image_size, self.dim = p_len, size, dim

    def _preprocess(self, title, description, attributes, image):
      with tf.control_dependencies(_check_same_batch(title=title, description=description,
                                                     attributes=attributes, image=image)):
        text = tf_product_text(*(tf_sanitize_utf8(t) for t in (title, description, attributes)))
        tokens = self.tokenizer(text)
        pixels, has_image = tf_decode_images(image, size, v_first)
      return tokens, pixels, has_image

    @tf.function(jit_compile=True, autograph=False)
    def _model(self, tokens, pixels, has_image):
      # jit_compile: see QueryTower._model.
      emb = conv.fn(self.params, tokens, pixels, has_image)
      emb.set_shape([None, dim])
      return emb

    def _embed(self, tokens, pixels, has_image):
      return _run_bucketed(self._model, buckets, tokens, pixels, has_image)

    @tf.function(input_signature=raw_sig, autograph=False)
    def serve(self, title, description, attributes, image):
      tokens, pixels, has_image = self._preprocess(title, description, attributes, image)
      return {"embedding": self._embed(tokens, pixels, has_image), "has_image": has_image}

    @tf.function(input_signature=raw_sig, autograph=False)
    def preprocess(self, title, description, attributes, image):
      tokens, pixels, has_image = self._preprocess(title, description, attributes, image)
      return {"product_tokens": tokens, "image": pixels, "has_image": has_image}

    @tf.function(input_signature=[tf.TensorSpec([None, p_len], tf.int32, name="product_tokens"),
                                  tf.TensorSpec([None, size, size, 3], tf.uint8, name="image"),
                                  tf.TensorSpec([None], tf.bool, name="has_image")], autograph=False)
    def embed_preprocessed(self, product_tokens, image, has_image):
      with tf.control_dependencies(_check_same_batch(product_tokens=product_tokens, image=image,
                                                     has_image=has_image)):
        return {"embedding": self._embed(tf.identity(product_tokens), image, has_image)}

  return ProductTower()


# ------------------------------------------------------------------------------------------- ScaNN


_SCANN_ASSETS = (  # ScannState's tensors, in tensors_to_scann's order, and the file ScannIndex.save writes
    ("scann_config", "scann_config.pb"), ("serialized_partitioner", "serialized_partitioner.pb"),
    ("datapoint_to_token", "datapoint_to_token.npy"), ("ah_codebook", "ah_codebook.pb"),
    ("hashed_dataset", "hashed_dataset.npy"), ("int8_dataset", "int8_dataset.npy"),
    ("int8_multipliers", "int8_multipliers.npy"), ("dp_norms", "dp_norms.npy"), ("dataset", "dataset.npy"))
_SCANN_DTYPES = {"datapoint_to_token": np.int32, "hashed_dataset": np.uint8, "int8_dataset": np.int8,
                 "int8_multipliers": np.float32, "dp_norms": np.float32, "dataset": np.float32}


def scann_tensors(index_dir: str) -> list:
  """Returns the 9 tensors `scann_ops.ScannState` holds, read from a `ScannIndex.save` directory.

  The TF searcher is rebuilt from the very files the Python index uses, so both search the same
  partitions and codebooks (a second build could train different k-means centres). Assets the index
  does not use are scalars, as `scann_to_tensors` gives them.
  """
  out = []
  for name, fname in _SCANN_ASSETS:
    path = epath.Path(index_dir) / fname
    if fname.endswith(".pb"):
      if path.exists():
        out.append(np.array([path.read_bytes()], dtype=object))
      elif name == "scann_config":
        raise FileNotFoundError(f"{path} not found: {index_dir} is not a ScannIndex.save directory")
      else:
        out.append(np.array(b"", dtype=object))
    else:
      out.append(_load_npy(path) if path.exists() else np.zeros((), _SCANN_DTYPES[name]))
  return out


def _sort_by_score_then_index(idx, scores):
  """Returns (idx, scores) [B, K] sorted per row by descending score, then ascending index.

  One sort: the float32 score maps to an int32 of the same order (flip the magnitude bits of negatives;
  -0.0 counts as 0.0, a tie as in numpy's sort), complemented for descending order, and is packed above
  the (non-negative, < 2**32) index.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  bits = tf.bitcast(tf.where(scores == 0.0, 0.0, scores), tf.int32)
  ordered = tf.bitwise.bitwise_xor(bits, tf.bitwise.bitwise_and(tf.bitwise.right_shift(bits, 31), 0x7FFFFFFF))
  key = tf.cast(tf.bitwise.invert(ordered), tf.int64) * (1 << 32) + tf.maximum(idx, 0)
  order = tf.argsort(key, axis=1)
  return tf.gather(idx, order, batch_dims=1), tf.gather(scores, order, batch_dims=1)


def _make_serving(query_tower, index_dir: str, ids: Sequence[str], k: int):
  """Returns a tf.Module: query strings -> top-k (ids, scores, indices), query tower + ScaNN in one graph.

  The graph is kept to the few ops a request needs (tokeniser, one XLA cluster, ScaNN, a handful of
  small ops): at batch 1 on CPU, TF's per-op scheduling and thread handoffs cost about as much as the
  work itself (see the module doc's latency notes).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import scann  # pylint: disable=g-import-not-at-top,unused-import
  from scann.scann_ops.py import scann_ops  # pylint: disable=g-import-not-at-top
  from mmr_jax import index as index_lib  # pylint: disable=g-import-not-at-top

  py_index = index_lib.ScannIndex.load(index_dir)
  params = py_index.params
  if params.get("soar_lambda") is not None:
    raise ValueError(f"{index_dir} was built with SOAR (soar_lambda={params['soar_lambda']}), which ScaNN's "
                     "TF ops cannot serve; rebuild the index without soar_lambda")
  n = py_index.size
  if len(ids) != n:
    raise ValueError(f"{len(ids)} product ids but the index at {index_dir} holds {n} products")
  # The same (k, pre-reorder, leaves) ScannIndex.search passes, so serving returns its top-k.
  k, k_eff, pre, leaves = py_index._search_args(k, None, None)  # pylint: disable=protected-access
  pad = k - k_eff
  # The searcher is a resource shared by name within a process: a per-export name keeps two exported
  # models (or a model and its re-export) loaded side by side apart.
  shared_name = f"mmr-scann-{uuid.uuid4().hex}"
  tensors = scann_tensors(index_dir)
  # Tensors of at most 1 KiB (the config, and the scalars that stand for assets the index does not use)
  # enter the graph as constants, so the serving function captures only the searcher's data variables:
  # each captured variable costs ~3 us per call from Python. ScannState still holds all nine
  # (scann_ops.searcher_from_module works on it).
  nbytes = lambda t: sum(map(len, t.reshape(-1))) if t.dtype == object else t.nbytes  # pylint: disable=unnecessary-lambda-assignment
  small = {name: t for (name, _), t in zip(_SCANN_ASSETS, tensors) if nbytes(t) <= 1024}

  class Serving(tf.Module):
    """Query strings -> top-k products: the query tower, then ScaNN's TF searcher."""

    def __init__(self):
      super().__init__(name="serving")
      self.query_tower = query_tower
      self.scann = scann_ops.ScannState(tensors)
      # One extra "" entry: index n stands for "no product" (padding) in a single gather.
      self.product_ids = tf.Variable(np.asarray(list(ids) + [""], dtype=object), dtype=tf.string,
                                     trainable=False)
      self.k = k

    def _search(self, emb):
      handle = scann_ops.tensors_to_scann(
          *(tf.constant(small[name]) if name in small else getattr(self.scann, name) for name in (
              "dataset", "scann_config", "serialized_partitioner", "datapoint_to_token", "ah_codebook",
              "hashed_dataset", "int8_dataset", "int8_multipliers", "dp_norms")), shared_name=shared_name)
      # The batched-parallel search, as ScannIndex.search runs it; unlike the sequential op it also takes
      # an empty batch (giving [0, 0]). Its rows are [b, m]: m is the most neighbours any row found, less
      # than k_eff when the searched leaves hold fewer points, and shorter rows are filled with index 0 and
      # a NaN score. Both kinds of unfilled slot become padding (-1, -inf), as in ScannIndex.search.
      idx, scores = scann_ops.scann_search_batched(handle, emb, k_eff, pre, leaves, True)
      missing = [[0, 0], [0, k_eff - tf.shape(idx)[1]]]
      idx = tf.pad(tf.cast(idx, tf.int64), missing, constant_values=-1)
      scores = tf.pad(scores, missing, constant_values=np.nan)
      pad = (idx < 0) | tf.math.is_nan(scores)
      idx = tf.where(pad, tf.constant(-1, tf.int64), idx)
      scores = tf.where(pad, -np.inf, scores)
      # ScaNN returns rows by descending score; as in ScannIndex._finish, only a batch with a tie (or
      # anything out of order) is re-sorted to put the lower index first.
      tied = tf.reduce_any(scores[:, 1:] >= scores[:, :-1])
      return tf.cond(tied, lambda: _sort_by_score_then_index(idx, scores), lambda: (idx, scores))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="queries")], autograph=False)
    def serve(self, queries):
      idx, scores = self._search(self.query_tower.embed(queries))
      if pad:  # fewer products than k: known when exporting
        b = tf.shape(idx)[0]
        idx = tf.concat([idx, tf.fill([b, pad], tf.constant(-1, tf.int64))], axis=1)
        scores = tf.concat([scores, tf.fill([b, pad], tf.constant(-np.inf, tf.float32))], axis=1)
      out = {"ids": tf.gather(self.product_ids, tf.where(idx >= 0, idx, n)), "scores": scores, "indices": idx}
      for t in out.values():
        t.set_shape([None, k])  # static only: no EnsureShape op per request
      return out

  return Serving()


# --------------------------------------------------------------------------------------------- save


def write_warmup_requests(path: str, requests: Sequence[Mapping[str, np.ndarray]],
                          signature: str = "serving_default") -> None:
  """Writes TF Serving's warm-up file: a TFRecord of PredictionLog, one predict request per input dict.

  TF Serving runs these requests when it loads the model (`assets.extra/tf_serving_warmup_requests`),
  so the XLA compile of each batch bucket happens before traffic arrives, not in a user's request.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow_serving.apis import predict_pb2, prediction_log_pb2  # pylint: disable=g-import-not-at-top
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  with tf.io.TFRecordWriter(path) as w:
    for inputs in requests:
      req = predict_pb2.PredictRequest()
      req.model_spec.signature_name = signature
      for name, value in inputs.items():
        req.inputs[name].CopyFrom(tf.make_tensor_proto(value))
      w.write(prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=req))
              .SerializeToString())


def _warmup_batches(buckets: Sequence[int], max_batch: int) -> list[int]:
  """Returns the bucket sizes to warm up: those up to max_batch (none when max_batch <= 0)."""
  return [b for b in buckets if b <= max_batch]


def _query_warmup(buckets, max_batch):
  return [{"queries": np.asarray(["warmup"] * b, object)} for b in check_warmup(buckets, max_batch)]


def _product_warmup(buckets, max_batch):
  text = lambda s, b: np.asarray([s] * b, object)  # pylint: disable=unnecessary-lambda-assignment
  return [{"title": text("warmup", b), "description": text("", b), "attributes": text("", b), "image": text(b"", b)}
          for b in check_warmup(buckets, max_batch)]


def _save(module, out_dir: str, signatures: Mapping[str, Any], warmup: Sequence[Mapping[str, Any]] = ()) -> str:
  """Writes the SavedModel (and its warm-up requests for `serving_default`, if any) atomically to out_dir.

  On gs:// (no atomic folder rename) it is written locally and copied up; export_summary.json, written
  last, says the export is complete.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out_dir = os.fspath(out_dir)
  if fileio.is_remote(out_dir):
    import tempfile  # pylint: disable=g-import-not-at-top
    with tempfile.TemporaryDirectory(prefix="mmr_export_") as local:
      _save(module, os.path.join(local, "model"), signatures, warmup)
      fileio.upload_dir(os.path.join(local, "model"), out_dir)
    return out_dir
  tmp = out_dir + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  tf.saved_model.save(module, tmp, signatures=signatures)
  if warmup:
    write_warmup_requests(os.path.join(tmp, WARMUP_FILE), warmup)
  shutil.rmtree(out_dir, ignore_errors=True)
  os.replace(tmp, out_dir)
  return out_dir


def export_query_tower(tm, tokenizer_path: str, out_dir: str, platforms: Sequence[str] = DEFAULT_PLATFORMS,
                       batch_buckets: Sequence[int] = BATCH_BUCKETS, warmup_max_batch: int = WARMUP_MAX_BATCH):
  """Writes the query-tower SavedModel to out_dir; returns out_dir."""
  buckets = check_batch_buckets(batch_buckets)
  m = _make_query_tower(tm, tokenizer_path, _check_platforms(platforms), buckets)
  return _save(m, out_dir, {"serving_default": m.serve, "tokenize": m.tokenize, "embed_tokens": m.embed_tokens},
               _query_warmup(buckets, warmup_max_batch))


def export_product_tower(tm, tokenizer_path: str, out_dir: str, platforms: Sequence[str] = DEFAULT_PLATFORMS,
                         batch_buckets: Sequence[int] = BATCH_BUCKETS, warmup_max_batch: int = WARMUP_MAX_BATCH):
  """Writes the product-tower SavedModel to out_dir; returns out_dir."""
  buckets = check_batch_buckets(batch_buckets)
  m = _make_product_tower(tm, tokenizer_path, _check_platforms(platforms), buckets)
  return _save(m, out_dir, {"serving_default": m.serve, "preprocess": m.preprocess,
                            "embed_preprocessed": m.embed_preprocessed}, _product_warmup(buckets, warmup_max_batch))


def export_serving(tm, tokenizer_path: str, index_dir: str, ids: Sequence[str], out_dir: str, k: int = 100,
                   platforms: Sequence[str] = DEFAULT_PLATFORMS, batch_buckets: Sequence[int] = BATCH_BUCKETS,
                   warmup_max_batch: int = WARMUP_MAX_BATCH):
  """Writes the serving SavedModel (query strings -> top-k ids, scores, indices) to out_dir; returns out_dir."""
  buckets = check_batch_buckets(batch_buckets)
  q = _make_query_tower(tm, tokenizer_path, _check_platforms(platforms), buckets)
  m = _make_serving(q, index_dir, ids, k)
  return _save(m, out_dir, {"serving_default": m.serve}, _query_warmup(buckets, warmup_max_batch))


def load_saved_model(path: str):
  """Returns `tf.saved_model.load(path)` after importing the custom-op libraries the models need."""
  import scann  # pylint: disable=g-import-not-at-top,unused-import
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_text  # pylint: disable=g-import-not-at-top,unused-import
  if not (epath.Path(path) / "saved_model.pb").is_file():
    raise FileNotFoundError(f"{path}/saved_model.pb not found: not a SavedModel directory")
  return tf.saved_model.load(path)


# --------------------------------------------------------------------------------------- embeddings


def _local_embed_fn(tm):
  """Returns fn(host batch) -> this host's rows of the product embeddings [B_local, D] (numpy)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from mmr_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  keys = ("product_tokens", "image", "has_image")

  def fn(params, tokens, image, has_image):
    return tm.model.apply({"params": params}, tokens, image, has_image, train=False,
                          method="embed_product")["emb"]

  jitted = jax.jit(fn, out_shardings=shd.batch_sharding(tm.mesh, 2))

  def call(batch):
    arrays = shd.host_batch_to_global({k: batch[k] for k in keys}, tm.mesh)
    out = jitted(tm.params, *(arrays[k] for k in keys))
    if jax.process_count() == 1:
      return np.asarray(out)
    # The inverse of host_batch_to_global: this host's rows, in its batch order.
    return np.asarray(multihost_utils.global_array_to_host_local_array(out, tm.mesh, P(shd.BATCH_AXES)))

  return call


def _barrier(name: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def _min_over_processes(value: int) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.min(multihost_utils.process_allgather(np.asarray([value], np.int64))))


def _write_atomic(path: str, write) -> None:
  fileio.write_atomic(path, write)


def _load_npy(path) -> np.ndarray:
  """Returns the .npy or .npz (then a dict of arrays) at a local or gs:// path."""
  data = np.load(io.BytesIO(epath.Path(path).read_bytes()), allow_pickle=False)
  if isinstance(data, np.lib.npyio.NpzFile):
    with data:
      return {k: data[k] for k in data.files}
  return data


def _abspath(path) -> str:
  return os.fspath(path) if fileio.is_remote(path) else os.path.abspath(path)


def _finished_shards(shard_dir: str, num_shards: int) -> int:
  """Returns how many shards from the first one on are complete (npz + state json)."""
  done = 0
  while done < num_shards and all((epath.Path(shard_dir) / f"shard_{done:05d}{ext}").is_file()
                                  for ext in (".npz", ".json")):
    done += 1
  return done


def product_ids(data_dir: str) -> list[str]:
  """Returns the product ids in product-index order."""
  from mmr_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  src = tfds_builder.load_source(data_dir, "products", "all")
  out = []
  for i in range(len(src)):
    v = src[i]["id"]
    out.append(v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v))
  return out


def embed_catalogue(tm, data_dir: str, out_dir: str, *, batch_size: int = 256, shard_batches: int = 16,
                    progress: bool = True, fingerprint: Mapping[str, str] | None = None) -> np.ndarray | None:
  """Embeds every product, resumably; returns embeddings [N, D] on process 0 (None elsewhere).

  Each process embeds its contiguous slice of the catalogue and writes shards under
  out_dir/shards/process_{p}-of-{P}/ (see module doc); process 0 merges them in product-index order.
  Shards left by an export with another `fingerprint` (export_fingerprint) are discarded, not resumed.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  from mmr_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from mmr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mmr_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top

  p, num_p = jax.process_index(), jax.process_count()
  dp = shd.data_parallel_size(tm.mesh)
  if batch_size < 1 or shard_batches < 1:
    raise ValueError(f"batch_size={batch_size} and shard_batches={shard_batches} must be >= 1")
  batch_size = max(dp, batch_size // dp * dp)  # the global batch must split over the data axes
  n = len(tfds_builder.load_source(data_dir, "products", "all"))
  if n == 0:
    raise ValueError(f"{data_dir}: the products table is empty")
  start, stop, num_batches = pipeline.eval_host_slice(n, batch_size, p, num_p)
  num_shards = -(-num_batches // shard_batches)
  shards_root = os.path.join(out_dir, "shards")
  shard_dir = os.path.join(shards_root, f"process_{p}-of-{num_p}")
  epath.Path(shard_dir).mkdir(parents=True, exist_ok=True)
  manifest = {"num_products": n, "batch_size": batch_size, "shard_batches": shard_batches,
              "process_count": num_p, "step": int(tm.step), "data_dir": _abspath(data_dir),
              "fingerprint": dict(fingerprint or {})}
  man_path = os.path.join(shard_dir, "manifest.json")
  if epath.Path(man_path).is_file():
    old = json.loads(epath.Path(man_path).read_text())
    if old != manifest:
      log.warning("%s: shards were written with %s, now %s; starting over", shard_dir, old, manifest)
      epath.Path(shard_dir).rmtree()
      epath.Path(shard_dir).mkdir(parents=True)
  fileio.write_text(man_path, json.dumps(manifest, indent=2))
  # Every process must run the same number of (collective) steps: restart where all of them are.
  done = _min_over_processes(_finished_shards(shard_dir, num_shards))
  it = pipeline.make_eval_iterator(data_dir, "products", "all", tm.config.data, batch_size)
  rows_done = 0
  if done:
    state = json.loads((epath.Path(shard_dir) / f"shard_{done - 1:05d}.json").read_text())
    it.set_state(state["iterator_state"])
    rows_done = int(state["rows_total"])
    log.info("resuming after %d finished shard(s) (%d rows) in %s", done, rows_done, shard_dir)
  embed = _local_embed_fn(tm)
  with tqdm(total=stop - start, initial=rows_done, desc=f"embed products (process {p})", unit="row",
            file=sys.stderr, disable=not progress, mininterval=1.0) as bar:
    for j in range(done, num_shards):
      embs, idxs = [], []
      for _ in range(min(shard_batches, num_batches - j * shard_batches)):
        batch = next(it)
        mask = np.asarray(batch["mask"], bool)
        e = embed(batch)
        embs.append(e[mask])
        idxs.append(np.asarray(batch["product_index"], np.int64)[mask])
        bar.update(int(mask.sum()))
      emb = np.concatenate(embs).astype(np.float32)
      idx = np.concatenate(idxs)
      rows_done += len(idx)
      base = os.path.join(shard_dir, f"shard_{j:05d}")

      def write_npz(t, emb=emb, idx=idx):
        with open(t, "wb") as f:
          np.savez(f, embeddings=emb, product_index=idx)

      _write_atomic(base + ".npz", write_npz)
      state = {"iterator_state": it.get_state(), "rows": len(idx), "rows_total": rows_done}
      fileio.write_text(base + ".json", json.dumps(state))
  _barrier("mmr_export_embedded")
  if p != 0:
    return None
  dim = None
  out = None
  seen = np.zeros(n, bool)
  for q in range(num_p):
    d = os.path.join(shards_root, f"process_{q}-of-{num_p}")
    for j in range(_finished_shards(d, num_shards)):
      z = _load_npy(os.path.join(d, f"shard_{j:05d}.npz"))
      emb, idx = z["embeddings"], z["product_index"]
      if out is None:
        dim = emb.shape[1]
        out = np.zeros((n, dim), np.float32)
      out[idx] = emb
      seen[idx] = True
  if out is None or not seen.all():
    missing = np.nonzero(~seen)[0]
    raise RuntimeError(f"embedding shards under {shards_root} miss {len(missing)} of {n} products "
                       f"(first: {missing[:5].tolist()}); rerun to resume")
  return out


def _build_index(emb: np.ndarray, workdir: str, out_index: str, rebuild: bool,
                 scann_overrides: Mapping[str, Any] | None) -> dict:
  """Writes out_index (the evaluation's index reused, or one built with its parameters); returns its record."""
  from mmr_jax import index as index_lib  # pylint: disable=g-import-not-at-top
  eval_dir = os.path.join(workdir, "index")
  eval_emb = os.path.join(workdir, "product_embeddings.npy")
  cfg_path = os.path.join(eval_dir, index_lib.SCANN_CONFIG_FILE)
  if epath.Path(out_index).exists():
    epath.Path(out_index).rmtree()
  params = None
  if epath.Path(cfg_path).is_file() and not scann_overrides:
    eval_params = json.loads(epath.Path(cfg_path).read_text())["params"]
    if int(eval_params.get("n", -1)) == emb.shape[0] and int(eval_params.get("d", -1)) == emb.shape[1]:
      if not rebuild and epath.Path(eval_emb).is_file() and np.array_equal(_load_npy(eval_emb), emb):
        with fileio.local_dir(eval_dir) as local:
          fileio.upload_dir(local, out_index)
        index_lib.ScannIndex.load(out_index)  # validates the copy
        return {"source": "reused", "from": eval_dir, **index_lib.ScannIndex.load(out_index).config()}
      params = {k: v for k, v in eval_params.items() if k in index_lib.SCANN_DEFAULTS}
  if scann_overrides:
    params = dict(scann_overrides)
  t0 = time.time()
  idx = index_lib.ScannIndex.build(emb, params)
  idx.save(out_index)
  source = "built with the evaluation's parameters" if params and not scann_overrides else (
      "built with --scann overrides" if scann_overrides else "built with index.SCANN_DEFAULTS")
  return {"source": source, "build_s": time.time() - t0, **idx.config()}


# ---------------------------------------------------------------------------------------- parity


UNUSUAL_QUERIES = ("", "   ", "😀👍 emoji only", "ünïcödé straße", "日本語の検索クエリ", "بحث عربي",
                   "поиск товара", "a" * 5000, "red dress " * 2000, "tab\tand\nnewline", "\x00nul")


def measure_parity(out: str, tm, data_dir: str, sample: int = 32) -> dict:
  """Returns max |SavedModel - JAX| for queries and products on a catalogue sample (and image pixel diffs)."""
  from mmr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mmr_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  text, raw = pipeline._text, pipeline._bytes  # pylint: disable=protected-access
  cfg = tm.config.data
  tok = pipeline.load_tokenizer(data_dir, cfg)
  qsrc = tfds_builder.load_source(data_dir, "queries", "test")
  queries = [text(qsrc[i], "text") for i in range(min(sample, len(qsrc)))] + list(UNUSUAL_QUERIES)
  qt = load_saved_model(os.path.join(out, "query_tower"))
  sm_q = qt.signatures["serving_default"](queries=np.asarray(queries, object))["embedding"].numpy()
  jax_q = tm.embed_queries({"query_tokens": tok.encode(queries, int(cfg.query_len))})
  psrc = tfds_builder.load_source(data_dir, "products", "all")
  rows = [psrc[i] for i in range(min(sample, len(psrc)))]
  fields = {k: np.asarray([text(r, k) for r in rows], object) for k in ("title", "description", "attributes")}
  fields["image"] = np.asarray([raw(r, "image") if bool(np.asarray(r["has_image"])) else b"" for r in rows],
                               object)
  pt = load_saved_model(os.path.join(out, "product_tower"))
  pre = pt.signatures["preprocess"](**fields)
  ref = [pipeline.decode_image(b, int(cfg.image_size)) for b in fields["image"]]
  ref_img = np.stack([r[0] for r in ref])
  ref_tokens = tok.encode([text(r, "text") for r in rows], int(cfg.product_len))
  batch = {"product_tokens": ref_tokens, "image": ref_img, "has_image": np.asarray([r[1] for r in ref])}
  jax_p = tm.embed_products(batch)
  sm_p = pt.signatures["embed_preprocessed"](**batch)["embedding"].numpy()
  sm_e2e = pt.signatures["serving_default"](**fields)["embedding"].numpy()
  pix = np.abs(pre["image"].numpy().astype(int) - ref_img.astype(int))
  return {
      "queries": len(queries), "products": len(rows),
      "query_max_abs_diff": float(np.abs(sm_q - jax_q).max()),
      "product_preprocessed_max_abs_diff": float(np.abs(sm_p - jax_p).max()),
      "product_end_to_end_max_abs_diff": float(np.abs(sm_e2e - jax_p).max()),
      "product_tokens_equal": bool(np.array_equal(pre["product_tokens"].numpy(), ref_tokens)),
      "has_image_equal": bool(np.array_equal(pre["has_image"].numpy(), batch["has_image"])),
      "image_pixels_differing": float((pix > 0).mean()), "image_max_abs_diff": int(pix.max(initial=0)),
  }


# Largest |SavedModel - JAX| embedding difference an export accepts (measured ~1e-7 on CPU; GPUs computing
# f32 matmuls in TF32 may need --parity_tol). A wrong tokenizer or preprocessing differs by ~1e-1.
PARITY_TOL = 1e-4
_PARITY_MODELS = {"query_max_abs_diff": "query_tower",
                  "product_preprocessed_max_abs_diff": "product_tower (embed_preprocessed)",
                  "product_end_to_end_max_abs_diff": "product_tower (serving_default, raw bytes)"}


class ParityError(RuntimeError):
  """Raised when an exported SavedModel's outputs differ from the JAX model's beyond the tolerance."""


def parity_failures(parity: Mapping[str, Any] | None, tol: float) -> list[str]:
  """Returns one line per SavedModel whose measured parity (measure_parity's dict) is outside `tol`."""
  if not parity or "skipped" in parity:
    return []
  out = [f"{model}: max |SavedModel - JAX| {parity[key]:.3g} > tolerance {tol:g}"
         for key, model in _PARITY_MODELS.items() if not parity[key] <= tol]  # NaN fails too
  if not parity["product_tokens_equal"]:
    out.append("product_tower (preprocess): product tokens differ from the training tokenizer's")
  if not parity["has_image_equal"]:
    out.append("product_tower (preprocess): has_image differs from the training pipeline's decoding")
  return out


# ------------------------------------------------------------------------------------------ driver


def _versions() -> dict:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  out = {}
  for pkg in ("jax", "jaxlib", "flax", "tensorflow", "tensorflow-text", "scann", "pillow"):
    try:
      out[pkg] = metadata.version(pkg)
    except metadata.PackageNotFoundError:
      out[pkg] = None
  return out


def export_workdir(workdir: str, out: str, data_dir: str | None = None, **kwargs) -> dict | None:
  """Exports a trained workdir into `out` (layout in the module doc); returns the summary on process 0.

  The workdir and `out` are locked (fileio.WorkdirLock) for the export: a trainer still writing the workdir,
  or a second export into `out`, is refused. Keyword arguments: see `_export_workdir`.
  Raises ParityError (after writing everything, the summary included) when the measured parity is outside
  `parity_tol`, unless `allow_parity_mismatch`, which logs a warning instead.
  """
  import jax  # pylint: disable=g-import-not-at-top
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:
      stack.enter_context(fileio.WorkdirLock(workdir, "export"))
      stack.enter_context(fileio.WorkdirLock(out, "export"))
    return _export_workdir(workdir, out, data_dir, **kwargs)


def _export_workdir(workdir: str, out: str, data_dir: str | None = None, *, k: int = 100,
                    platforms: Sequence[str] = DEFAULT_PLATFORMS, batch_size: int = 256,
                    shard_batches: int = 16, scann_overrides: Mapping[str, Any] | None = None,
                    rebuild_index: bool = False, parity: bool = True, progress: bool = True,
                    batch_buckets: Sequence[int] = BATCH_BUCKETS, warmup_max_batch: int = WARMUP_MAX_BATCH,
                    parity_tol: float = PARITY_TOL, allow_parity_mismatch: bool = False) -> dict | None:
  import jax  # pylint: disable=g-import-not-at-top
  from mmr_jax.evals import embedding  # pylint: disable=g-import-not-at-top
  from mmr_jax.models import two_tower  # pylint: disable=g-import-not-at-top

  if int(k) != k or k < 1:
    raise ValueError(f"k must be a positive integer, got {k!r}")
  platforms = _check_platforms(platforms)
  batch_buckets = check_batch_buckets(batch_buckets)
  warmup_sizes = check_warmup(batch_buckets, warmup_max_batch)  # before the long work, not after it
  t_start = time.time()
  timings = {}

  def step(name: str) -> None:
    if progress and jax.process_index() == 0:
      print(f"[export] {name}", file=sys.stderr, flush=True)

  step(f"loading {workdir}")
  tm = embedding.load_trained(workdir, data_dir)
  data_dir = tm.config.data.dir
  from mmr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  try:
    tokenizer_path = pipeline.tokenizer_path(data_dir, tm.config.data)  # the run's own (config.json)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{e}: --data must be the DATA_DIR the model was trained on") from None
  emb_dir = os.path.join(out, "embeddings")
  epath.Path(emb_dir).mkdir(parents=True, exist_ok=True)

  # The SavedModels are written by process 0 from whole (gathered) parameters; gathering is collective.
  tm_host = dataclasses.replace(tm, params=_host_params(tm.params))
  fingerprint = export_fingerprint(tm_host.params, tm.config)
  t0 = time.time()
  info_path = os.path.join(emb_dir, "info.json")
  info = json.loads(epath.Path(info_path).read_text()) if epath.Path(info_path).is_file() else None
  up_to_date = (info is not None and info.get("step") == int(tm.step) and info.get("data_dir") ==
                _abspath(data_dir) and info.get("fingerprint") == fingerprint
                and epath.Path(emb_dir, "embeddings.npy").is_file()
                and not rebuild_index and not scann_overrides)
  # Every process must take the same branch (embedding is collective).
  up_to_date = bool(_min_over_processes(int(up_to_date)))
  emb = None
  if up_to_date:
    step("embeddings: up to date (same weights, config and data), kept")
    if jax.process_index() == 0:
      emb = _load_npy(os.path.join(emb_dir, "embeddings.npy"))
  else:
    step("embedding the catalogue (resumable)")
    emb = embed_catalogue(tm, data_dir, emb_dir, batch_size=batch_size, shard_batches=shard_batches,
                          progress=progress, fingerprint=fingerprint)
  timings["embed_s"] = time.time() - t0
  summary = None
  if jax.process_index() == 0:
    ids = product_ids(data_dir)
    if not up_to_date:
      # info.json is the "done" marker of this folder: a rerun trusts embeddings.npy only when it exists,
      # so everything else is complete (and each file whole) before it is written.
      if epath.Path(info_path).exists():
        epath.Path(info_path).unlink()
      fileio.write_atomic(os.path.join(emb_dir, "embeddings.npy"), lambda t: np.save(t, emb))
      fileio.write_text(os.path.join(emb_dir, "ids.txt"), "".join(f"{i}\n" for i in ids))
      step("building the ScaNN index")
      t0 = time.time()
      index_info = _build_index(emb, workdir, os.path.join(emb_dir, "index"), rebuild_index, scann_overrides)
      timings["index_s"] = time.time() - t0
      info = {"num_products": int(emb.shape[0]), "dim": int(emb.shape[1]), "dtype": "float32",
              "step": int(tm.step), "workdir": _abspath(workdir), "data_dir": _abspath(data_dir),
              "normalised": True, "index": index_info, "fingerprint": fingerprint}
      fileio.write_json(info_path, info)
      if epath.Path(emb_dir, "shards").exists():
        epath.Path(emb_dir, "shards").rmtree()

    shapes = {"batch_buckets": batch_buckets, "warmup_max_batch": warmup_max_batch}
    for name, fn in (("query_tower", lambda p: export_query_tower(tm_host, tokenizer_path, p, platforms, **shapes)),
                     ("product_tower", lambda p: export_product_tower(tm_host, tokenizer_path, p, platforms,
                                                                      **shapes)),
                     ("serving", lambda p: export_serving(tm_host, tokenizer_path, os.path.join(emb_dir, "index"),
                                                          ids, p, k, platforms, **shapes))):
      step(f"writing {name} SavedModel")
      t0 = time.time()
      fn(os.path.join(out, name))
      timings[f"{name}_s"] = time.time() - t0
    parity_res = None
    if parity and jax.process_count() > 1:
      # The JAX reference runs on the global mesh (a collective) while only process 0 holds the models.
      parity_res = {"skipped": "multi-process export; run the export on one process to measure parity"}
    elif parity:
      step("measuring SavedModel vs JAX parity")
      t0 = time.time()
      parity_res = measure_parity(out, tm, data_dir)
      timings["parity_s"] = time.time() - t0
    timings["total_s"] = time.time() - t_start
    mismatches = parity_failures(parity_res, parity_tol)
    summary = {
        "workdir": _abspath(workdir), "data_dir": _abspath(data_dir), "step": int(tm.step),
        "variant": tm.config.model.variant, "embedding_dim": int(two_tower.embedding_dim(tm.config.model)),
        "num_products": int(info["num_products"]), "k": int(k), "platforms": list(platforms),
        "batch_buckets": list(batch_buckets),
        "warmup_batch_sizes": warmup_sizes,
        "inputs": {"query_len": int(tm.config.data.query_len), "product_len": int(tm.config.data.product_len),
                   "image_size": int(tm.config.data.image_size)},
        "paths": {name: os.path.join(_abspath(out), name)
                  for name in ("query_tower", "product_tower", "serving", "embeddings")},
        "index": info["index"], "parity": parity_res, "parity_tolerance": parity_tol,
        "parity_failures": mismatches, "pillow_vertical_first": _pillow_vertical_first(),
        "timings": timings, "versions": _versions()}
    fileio.write_json(os.path.join(out, SUMMARY_FILE), summary)
    step(f"done in {timings['total_s']:.0f} s: {out}")
  _barrier("mmr_export_done")
  if summary is not None and summary["parity_failures"]:
    msg = (f"{out}: the SavedModels do not match the JAX model: " + "; ".join(summary["parity_failures"]) +
           f" (details in {SUMMARY_FILE})")
    if not allow_parity_mismatch:
      raise ParityError(msg + "; --allow_parity_mismatch keeps the export with a warning")
    log.warning("%s; kept because of --allow_parity_mismatch", msg)
  return summary


def main(argv=None):
  p = argparse.ArgumentParser(
      prog="python -m mmr_jax.export", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Export a trained workdir: query/product tower SavedModels, a serving SavedModel (query "
                  "strings -> top-K product ids) and the embedded catalogue with its ScaNN index.",
      epilog="Writes OUT/query_tower, OUT/product_tower, OUT/serving, OUT/embeddings/ and "
             "OUT/export_summary.json; see the docstring of mmr_jax/export.py for formats and signatures.")
  p.add_argument("--workdir", required=True, help="trained workdir (config.json + checkpoints/)")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--data", default=None, help="DATA_DIR (default: the one the workdir was trained on)")
  p.add_argument("--k", type=int, default=100, help="results per query in the serving model (default 100)")
  p.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS),
                 help=f"comma-separated jax2tf lowering platforms from {PLATFORMS} (default cpu,cuda)")
  p.add_argument("--batch_size", type=int, default=256, help="global batch for embedding the catalogue")
  p.add_argument("--shard_batches", type=int, default=16, help="batches per resumable embedding shard")
  p.add_argument("--scann", default=None, help='JSON dict of ScaNN parameter overrides, e.g. \'{"num_leaves": 100}\'')
  p.add_argument("--rebuild_index", action="store_true",
                 help="re-embed and rebuild the index even if OUT/embeddings or WORKDIR/index can be reused")
  p.add_argument("--no_parity", action="store_true", help="skip the SavedModel vs JAX parity measurement")
  p.add_argument("--parity_tol", type=float, default=PARITY_TOL,
                 help=f"largest |SavedModel - JAX| embedding difference accepted (default {PARITY_TOL:g}); above it "
                      "the export exits with status 1")
  p.add_argument("--allow_parity_mismatch", action="store_true",
                 help="a parity above --parity_tol is a warning, not an error (exit status 0)")
  p.add_argument("--no_progress", action="store_true", help="no progress output")
  p.add_argument("--batch_buckets", default=",".join(map(str, BATCH_BUCKETS)),
                 help="comma-separated increasing batch sizes the towers' XLA programs are compiled for; a "
                      "request is padded to the next one (above the last, to a multiple of it). Default: "
                      "powers of two to 1024")
  p.add_argument("--warmup_max_batch", type=int, default=WARMUP_MAX_BATCH,
                 help="write TF Serving warm-up requests (assets.extra/tf_serving_warmup_requests) for every "
                      f"bucket up to this batch size (default {WARMUP_MAX_BATCH}; 0: none)")
  args = p.parse_args(argv)
  try:
    buckets = check_batch_buckets(args.batch_buckets.split(","))
  except ValueError as e:
    p.error(f"--batch_buckets: {e}")
  try:
    check_warmup(buckets, args.warmup_max_batch)
  except ValueError as e:
    p.error(f"--warmup_max_batch: {e}")
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  from mmr_jax import runtime  # pylint: disable=g-import-not-at-top
  runtime.maybe_initialize_distributed()
  try:
    summary = export_workdir(args.workdir, args.out, args.data, k=args.k, platforms=args.platforms.split(","),
                             batch_size=args.batch_size, shard_batches=args.shard_batches,
                             scann_overrides=json.loads(args.scann) if args.scann else None,
                             rebuild_index=args.rebuild_index, parity=not args.no_parity,
                             progress=not args.no_progress, batch_buckets=buckets,
                             warmup_max_batch=args.warmup_max_batch, parity_tol=args.parity_tol,
                             allow_parity_mismatch=args.allow_parity_mismatch)
  except ParityError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if summary is not None:
    print(json.dumps({k: summary[k] for k in ("paths", "num_products", "k", "parity", "timings")},
                     indent=2, default=float))


if __name__ == "__main__":
  main()
