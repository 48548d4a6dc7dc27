"""The serving graphs' input preprocessing: training's tokenisation, product text and image decoding in TF ops.

A client sends raw strings and encoded image bytes; these functions turn them into exactly what
`mmr_jax.data.pipeline` feeds the model in training and evaluation, so a SavedModel embeds a request
like the JAX model embeds the same catalogue row:

* Text: SentencePiece (tensorflow-text) with the run's tokenizer (`sources.tokenizer_path`: the
  catalogue's `tokenizer.model`, or `config.data.tokenizer.path` for a pretrained checkpoint's; also
  shipped as a SavedModel asset under `assets/`); ids truncated to `config.data.query_len` /
  `product_len` and padded with 0 (or with `config.data.tokenizer`'s eos / pad / lowercase conventions),
  exactly as `Tokenizer.encode` does. Invalid UTF-8 bytes become U+FFFD first (what Python's
  `bytes.decode("utf-8", errors="replace")` gives); valid strings are unchanged. Empty strings are valid
  input (all-padding tokens).
* Product text: `title`, `description`, `attributes` are combined the way `catalog.product_text` does
  (whitespace runs collapsed per field, Python `str.split()` whitespace, empty fields dropped, " | "
  between fields), and a text longer than `product_len` is cut per field as `Tokenizer.encode_fields` cuts it
  (`tf_encode(...).encode_fields`). `attributes` is the RENDERED string "key: value; key: value" with keys sorted, as
  stored in the products table; render a mapping with `mmr_jax.data.catalog.render_attributes(dict)`.
* Images: encoded bytes (JPEG, PNG, GIF, BMP, WebP). The graph reproduces `transforms.decode_image`
  (Pillow) bit for bit: libjpeg DCT-domain downscaling as in Pillow's `draft()` (decode_jpeg `ratio`,
  accurate integer IDCT), then Pillow's two-pass antialiased bilinear resampling of the whole image to
  `image_size` x `image_size` in Pillow's fixed-point arithmetic, horizontal pass first except where
  Pillow >= 13 runs the vertical one first (height shrinks by more than twice the width's shrink); the
  pass order follows the Pillow installed at export time. Raw images are turned upright by their EXIF
  orientation and transparency is composited on white (`catalog.to_rgb`), as the importer does before
  training, so a cut-out PNG or a phone photo embeds like its imported copy (up to the importer's JPEG
  re-encoding). tests/export/test_export.py checks every pixel on JPEG (baseline, progressive, grayscale, CMYK,
  every draft scale, EXIF orientations 2-8 in either byte order), PNG (RGB, RGBA, LA, palette, 1/2/4-bit
  palettes and greys, transparent colours, 16-bit grey and RGBA), GIF, BMP and WebP (with alpha too).
  Empty bytes, bytes that do not decode, and images over Pillow's decompression-bomb limit give a zero
  image and has_image=False, like training; the rest of the batch is unaffected.

Known differences from Pillow: TIFF and other formats TF cannot decode give has_image=False here (the
importer re-encodes every catalogue image to JPEG, so catalogue embeddings are unaffected); a GIF's
transparent colour is not composited (TF's GIF decoder has no alpha); EXIF orientation is read from
JPEGs only, and not from XMP; a 16-bit RGB PNG's tRNS colour is applied here (Pillow never matches it);
an animated WebP gives has_image=False (Pillow takes its first frame); lossy WebP may differ by libwebp
version.
"""

from __future__ import annotations

from etils import epath
import PIL
from PIL import Image
import tensorflow as tf

from mmr_jax.data import tfds_builder
from mmr_jax.data import tokenizer as tok_lib

# The SavedModels ship the run's SentencePiece model as an asset under DATA_DIR's file name.
TOKENIZER_ASSET = tfds_builder.TOKENIZER_FILE


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
  return None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)


def pillow_vertical_first() -> bool:
  """Returns whether the installed Pillow may run the vertical resampling pass first (Pillow >= 13)."""
  return int(PIL.__version__.split(".")[0]) >= 13


def tf_sanitize_utf8(texts):
  """Returns tf.string `texts` with invalid UTF-8 replaced by U+FFFD (valid strings unchanged)."""
  return tf.strings.unicode_transcode(texts, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD)


def tf_product_fields(title, description, attributes):
  """Returns tf.string [B, 3]: `catalog.product_fields(title, description, attributes)` in TF ops."""
  ws = _ws_class()
  parts = tf.stack([title, description, attributes], axis=1)  # [B, 3]
  parts = tf.strings.regex_replace(parts, f"^{ws}+|{ws}+$", "")
  return tf.strings.regex_replace(parts, f"{ws}+", " ")


def _pil_coefficients(in_size, out_size: int):
  """Returns (positions [out, K] int32, fixed-point weights [out, K] int32, K) of Pillow's bilinear filter.

  Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` (src/libImaging/Resample.c) for the whole image
  (box = (0, in_size)), in float64 with the same operation order, so the integer weights are Pillow's.
  """
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
  wh = tf.io.decode_raw(tf.strings.substr(data, 16, 8), tf.int32, little_endian=False)
  depth = tf.io.decode_raw(tf.strings.substr(data, 24, 2), tf.uint8)
  return wh[0], wh[1], tf.cast(depth[0], tf.int32), tf.cast(depth[1], tf.int32)


def _jpeg_orientation(data):
  """Returns the EXIF orientation (int32, 1..8; 1 if none) of JPEG bytes, as Pillow's getexif() reads it:
  the first IFD0 tag 0x0112 (SHORT, SSHORT or LONG) of the first "Exif" APP1 segment before the scan data,
  read only within that segment. (Pillow also reads an XMP orientation; that is not done here.)"""
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
  t = lambda x: tf.transpose(x, [1, 0, 2])  # noqa: E731
  return tf.switch_case(orientation - 1, [
      lambda: img, lambda: img[:, ::-1], lambda: img[::-1, ::-1], lambda: img[::-1],  # 1-4
      lambda: t(img), lambda: t(img[::-1]), lambda: t(img[::-1, ::-1]), lambda: t(img[:, ::-1])])  # 5-8


def _on_white(rgba):
  """Returns uint8 [H, W, 3]: RGBA composited on white exactly as Pillow's paste(rgba, mask=alpha) does."""
  x = tf.cast(rgba, tf.int32)
  a = x[..., 3:]
  blend = 255 * (255 - a) + x[..., :3] * a + 128  # Pillow's BLEND, then DIV255: ((t >> 8) + t) >> 8
  return tf.cast(tf.bitwise.right_shift(tf.bitwise.right_shift(blend, 8) + blend, 8), tf.uint8)


def _png_has_trns(data):
  """Returns whether a PNG has a tRNS (transparent colour) chunk before its image data."""
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
  """Returns uint8 [size, size, 3]: `transforms.decode_image(data, size)`'s pixels; raises if undecodable."""
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
  proto = epath.Path(tokenizer_path).read_bytes()
  enc = tok_lib.tf_encode(proto, max_len, conventions)
  enc.model_file = tf.saved_model.Asset(tokenizer_path)
  return enc
