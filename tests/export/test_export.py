"""Tests for mmr_jax/export/: SavedModel parity with the JAX model, serving top-K, bad input, files."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mmr_jax.data import catalog
from mmr_jax.data import pipeline
from mmr_jax.data import sources
from mmr_jax.data import transforms
from mmr_jax.evals import embedding
from mmr_jax.export import cli
from mmr_jax.export import convert
from mmr_jax.export import embeddings
from mmr_jax.export import parity
from mmr_jax.export import preprocess
from mmr_jax.export import saving
from mmr_jax.export import towers
from mmr_jax.export import workdir
from mmr_jax.models import two_tower

K = 20
TOL = 1e-5  # float32 parity asserted for every SavedModel output (measured ~1e-7)


@pytest.fixture(scope="module")
def exported(tiny_workdir, tiny_data, tmp_path_factory):
  """Returns (out dir, summary) of one export of the tiny fusion workdir."""
  out = tmp_path_factory.mktemp("export") / "out"
  summary = workdir.export_workdir(tiny_workdir, str(out), tiny_data, k=K, platforms=("cpu",), parity=False,
                                  progress=False)
  return str(out), summary


@pytest.fixture(scope="module")
def trained(tiny_workdir, tiny_data):
  return embedding.load_trained(tiny_workdir, tiny_data)


@pytest.fixture(scope="module")
def tok(tiny_data):
  return sources.load_tokenizer(tiny_data)


@pytest.fixture(scope="module")
def models(exported):
  out, _ = exported
  return {name: saving.load_saved_model(os.path.join(out, name))
          for name in ("query_tower", "product_tower", "serving")}


def _strings(xs):
  return np.asarray(list(xs), dtype=object)


def _queries(data_dir, n=24):
  from mmr_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  src = tfds_builder.load_source(data_dir, "queries", "test")
  return [sources.row_text(src[i], "text") for i in range(min(n, len(src)))]


def _products(data_dir, n=16):
  from mmr_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  src = tfds_builder.load_source(data_dir, "products", "all")
  rows = [src[i] for i in range(n)]
  text, raw = sources.row_text, sources.row_bytes
  fields = {k: [text(r, k) for r in rows] for k in ("title", "description", "attributes", "text")}
  fields["image"] = [raw(r, "image") if bool(np.asarray(r["has_image"])) else b"" for r in rows]
  return fields


# ------------------------------------------------------------------------------------- query tower


UNUSUAL = ["", "   ", "😀👍🏽 emoji only", "ünïcödé STRASSE straße", "日本語の検索クエリ", "بحث عربي عن منتج",
           "поиск товара", "a" * 100_000, "red dress " * 5_000, "tab\tnew\nline\r\n", "\x00nul\x00",
           "\u3000ideographic\u00a0nbsp\u2028sep", "\ufeffbom"]


def test_query_tower_matches_jax_on_unusual_strings(models, trained, tok, tiny_data):
  queries = _queries(tiny_data) + UNUSUAL
  q_len = int(trained.config.data.query_len)
  qt = models["query_tower"]
  tokens = qt.signatures["tokenize"](queries=_strings(queries))["query_tokens"].numpy()
  ref_tokens = tok.encode(queries, q_len)
  np.testing.assert_array_equal(tokens, ref_tokens)  # over-long strings truncated the same way
  emb = qt.signatures["serving_default"](queries=_strings(queries))["embedding"].numpy()
  ref = trained.embed_queries({"query_tokens": ref_tokens})
  assert emb.shape == ref.shape == (len(queries), two_tower.embedding_dim(trained.config.model))
  assert np.isfinite(emb).all()
  np.testing.assert_allclose(emb, ref, atol=TOL, rtol=0)
  # Unit norm, except text without tokens: the masked mean over nothing is the zero vector in JAX too.
  empty = ~ref_tokens.any(axis=1)
  assert empty.sum() == 2  # "" and "   "
  np.testing.assert_allclose(np.linalg.norm(emb, axis=1), np.where(empty, 0.0, 1.0), atol=1e-5)


def test_query_tower_invalid_utf8_is_replaced_like_python(models, trained, tok):
  raw = [b"\xff\xfebad start", b"truncated \xc3", b"surrogate \xed\xa0\x80 x", "valid é".encode()]
  qt = models["query_tower"]
  tokens = qt.signatures["tokenize"](queries=np.asarray(raw, object))["query_tokens"].numpy()
  decoded = [b.decode("utf-8", errors="replace") for b in raw]
  np.testing.assert_array_equal(tokens, tok.encode(decoded, int(trained.config.data.query_len)))


# ----------------------------------------------------------------------------------- product tower


def test_product_tower_matches_jax_on_identical_inputs(models, trained):
  cfg = trained.config.data
  rng = np.random.default_rng(0)
  b, vocab = 16, trained.config.model.text.vocab_size  # the batch size of the bytes test: one compile
  tokens = rng.integers(1, vocab, (b, cfg.product_len)).astype(np.int32)
  tokens[0] = 0  # empty text
  tokens[1, 5:] = 0
  image = rng.integers(0, 256, (b, cfg.image_size, cfg.image_size, 3), dtype=np.uint8)
  has_image = rng.random(b) < 0.7
  has_image[:2] = [True, False]
  batch = {"product_tokens": tokens, "image": image, "has_image": has_image}
  emb = models["product_tower"].signatures["embed_preprocessed"](**batch)["embedding"].numpy()
  np.testing.assert_allclose(emb, trained.embed_products(batch), atol=TOL, rtol=0)


def test_product_tower_bytes_end_to_end_matches_pipeline(models, trained, tok, tiny_data):
  cfg = trained.config.data
  f = _products(tiny_data)
  f["image"][1] = b""  # no image
  f["image"][2] = b"\xff\xd8\xff\xe0 not really a jpeg"  # undecodable
  inputs = {k: _strings(f[k]) for k in ("title", "description", "attributes", "image")}
  pt = models["product_tower"]
  pre = pt.signatures["preprocess"](**inputs)
  # Texts longer than product_len are among them: the graph cuts those per field, as the pipeline does.
  assert any(tok.num_tokens(t) > int(cfg.product_len) for t in f["text"])
  ref_tokens = np.stack([tok.encode_fields(catalog.product_fields(*x), int(cfg.product_len))
                         for x in zip(f["title"], f["description"], f["attributes"])])
  decoded = [transforms.decode_image(b, int(cfg.image_size)) for b in f["image"]]
  ref_image = np.stack([d[0] for d in decoded])
  ref_has = np.array([d[1] for d in decoded])
  np.testing.assert_array_equal(pre["product_tokens"].numpy(), ref_tokens)
  np.testing.assert_array_equal(pre["has_image"].numpy(), ref_has)
  assert not ref_has[1] and not ref_has[2] and ref_has[0]
  # The in-graph decoder reproduces Pillow exactly, so end to end keeps the float32 tolerance.
  np.testing.assert_array_equal(pre["image"].numpy(), ref_image)
  out = pt.signatures["serving_default"](**inputs)
  ref = trained.embed_products({"product_tokens": ref_tokens, "image": ref_image, "has_image": ref_has})
  np.testing.assert_allclose(out["embedding"].numpy(), ref, atol=TOL, rtol=0)
  np.testing.assert_array_equal(out["has_image"].numpy(), ref_has)


def test_product_fields_match_catalog_product_fields():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  cases = [("Red  dress", "", "color: red; size: m"), ("", "", ""), ("  only title\t", "", ""),
           ("a\u3000b\u00a0c", "line1\nline2\u2028x", ""), ("", "desc only", "k: v"),
           ("x\x1cy", "   ", "\u200bzero width stays"), ("日本 語", "Ünï", "größe: 42")]
  out = preprocess.tf_product_fields(*(tf.constant([c[i] for c in cases]) for i in range(3))).numpy()
  assert [[f.decode() for f in row] for row in out] == [catalog.product_fields(*c) for c in cases]


def _encode(arr, fmt, **kw):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  (arr if isinstance(arr, Image.Image) else Image.fromarray(arr)).save(buf, fmt, **kw)
  return buf.getvalue()


def _photo(rng, h, w):
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  base = np.stack([np.sin(6 * xx + 1) * np.cos(4 * yy), np.cos(5 * xx * yy + 2), np.sin(3 * yy - 2 * xx)], -1)
  return np.clip(base * 100 + 128 + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _png16_rgba(rgba: np.ndarray) -> bytes:
  """Returns a 16-bit RGBA PNG of uint16 [H, W, 4] (Pillow cannot write one)."""
  import struct  # pylint: disable=g-import-not-at-top
  import zlib  # pylint: disable=g-import-not-at-top

  def chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
  h, w, _ = rgba.shape
  rows = b"".join(b"\0" + rgba[y].astype(">u2").tobytes() for y in range(h))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 6, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _with_exif(jpeg: bytes, orientation: int, big_endian: bool) -> bytes:
  """Returns the JPEG with an EXIF APP1 segment (a Make entry, then Orientation) after its JFIF segment."""
  import struct  # pylint: disable=g-import-not-at-top
  e = ">" if big_endian else "<"
  tiff = ((b"MM\0*" if big_endian else b"II*\0") + struct.pack(e + "IH", 8, 2)
          + struct.pack(e + "HHI", 0x010F, 2, 1) + b"\0\0\0\0"
          + struct.pack(e + "HHIH", 0x0112, 3, 1, orientation) + b"\0\0" + struct.pack(e + "I", 0))
  payload = b"Exif\0\0" + tiff
  pos = 4 + struct.unpack(">H", jpeg[4:6])[0] if jpeg[2:4] == b"\xff\xe0" else 2
  assert pos > 2, "expected a JFIF segment first"
  return jpeg[:pos] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[pos:]


def test_image_decoding_is_pillow_exact():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  big = Image.fromarray(_photo(rng, 300, 200))
  alpha = rng.integers(0, 256, np.asarray(big).shape[:2], dtype=np.uint8)
  alpha[:50] = 0  # a fully transparent band, as around a cut-out product
  cutout = Image.fromarray(np.dstack([np.asarray(big), alpha]))
  images = [
      _encode(_photo(rng, 32, 32), "JPEG"),                 # no resize
      _encode(_photo(rng, 520, 700), "JPEG", quality=80),   # draft 1/8 at 32 px, 1/2 at 224 px
      _encode(_photo(rng, 150, 90), "JPEG", progressive=True),
      _encode(_photo(rng, 700, 60), "PNG"),                 # tall: Pillow >= 13 resamples rows first
      _encode(_photo(rng, 40, 333), "PNG"),                 # wide
      _encode(big.convert("L"), "JPEG"), _encode(big.convert("CMYK"), "JPEG"),
      _encode(big.convert("RGBA"), "PNG"), _encode(big.convert("LA"), "PNG"), _encode(big.convert("P"), "PNG"),
      _encode(big.convert("P"), "GIF"), _encode(big, "BMP"), _encode(big, "WEBP", lossless=True),
      _encode(Image.fromarray((np.asarray(big.convert("L")).astype(np.uint16) * 257)), "PNG"),  # 16-bit gray
      _encode(Image.fromarray(np.asarray(big.convert("L")).astype(np.uint16)), "PNG"),  # 16-bit, 8-bit values
      # Transparency, composited on white as the importer does: alpha channels and transparent colours.
      _encode(cutout, "PNG"), _encode(cutout.convert("LA"), "PNG"), _encode(cutout, "WEBP", lossless=True),
      _encode(big.convert("P"), "PNG", transparency=3), _encode(big.convert("L"), "PNG", transparency=7),
      _encode(big, "PNG", transparency=tuple(int(v) for v in np.asarray(big)[0, 0])),
      # 1-4 bit palettes and greys, with and without a transparent colour; 16-bit RGBA.
      *(_encode(big.quantize(c), "PNG", bits=b) for c, b in ((2, 1), (4, 2), (16, 4))),
      _encode(big.quantize(16), "PNG", bits=4, transparency=2), _encode(big.convert("1"), "PNG"),
      _encode(big.convert("1"), "PNG", transparency=0),
      _png16_rgba(np.dstack([np.asarray(big), alpha]).astype(np.uint16) * 257 + 100),
      # Phone photos: EXIF orientations 2-8, both byte orders, after the JFIF segment, drafted (1/4).
      *(_with_exif(_encode(_photo(rng, 300, 200), "JPEG"), o, big_endian=o % 2 == 0) for o in range(2, 9)),
      _encode(np.full((1, 1, 3), 200, np.uint8), "PNG"), _encode(_photo(rng, 3, 1000), "JPEG"),
      b"", b"garbage bytes", _encode(_photo(rng, 64, 64), "JPEG")[:300],  # empty, junk, truncated
  ]
  for size in (32, 64):
    v_first = preprocess.pillow_vertical_first()
    pixels, has = preprocess.tf_decode_images(tf.constant(_strings(images)), size, v_first)
    for i, data in enumerate(images):
      ref, ok = transforms.decode_image(data, size)
      assert bool(has[i]) == ok, (i, size)
      np.testing.assert_array_equal(pixels[i].numpy(), ref, err_msg=f"image {i} at {size} px")
  assert not any(has[-3:]) and all(has[:-3])


def test_exif_edge_cases_and_animated_webp_decode_like_pillow():
  """Odd EXIF segments turn the image as Pillow does (or not at all, as Pillow does); an animated WebP is
  refused cleanly (has_image=False) instead of crashing TF's decoder."""
  import struct  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  photo = _photo(rng, 60, 40)
  photo[:20, :30] = 0  # asymmetric: every turn shows
  base = _encode(photo, "JPEG", quality=95)

  def seg(payload, marker=0xE1):
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload

  def exif(entries, e="<", magic=42, ifd=8):
    t = (b"II" if e == "<" else b"MM") + struct.pack(e + "HIH", magic, ifd, len(entries))
    for tag, kind, value in entries:
      v = struct.pack(e + "I", value) if kind == 4 else struct.pack(e + "H", value) + b"\0\0"
      t += struct.pack(e + "HHI", tag, kind, 1) + v
    return b"Exif\0\0" + t + struct.pack(e + "I", 0)

  six = exif([(0x0112, 3, 6)])
  fake_ifd = struct.pack("<HHHI", 1, 0x0112, 3, 1) + struct.pack("<HH", 8, 0) + b"\0" * 4
  cases = {
      "LONG": seg(exif([(0x0112, 4, 6)])), "SSHORT": seg(exif([(0x0112, 8, 3)])),
      "first entry wins": seg(exif([(0x0112, 3, 1), (0x0112, 3, 6)])), "big endian": seg(exif([(0x0112, 3, 5)], ">")),
      "bad TIFF magic": seg(exif([(0x0112, 3, 6)], magic=43)), "after another APP1": seg(b"XMPish\0") + seg(six),
      "fill byte": b"\xff" + seg(six), "truncated IFD": seg(six[:22]), "orientation 9": seg(exif([(0x0112, 3, 9)])),
      "huge entry count": seg(b"Exif\0\0II*\0\x08\0\0\0\xff\xff" + six[16:]),
      "IFD past its segment": seg(b"Exif\0\0II*\0" + struct.pack("<I", 48)) + seg(b"\0" * 32 + fake_ifd, 0xE2),
  }
  images = [base[:2] + extra + base[2:] for extra in cases.values()]
  frames = [Image.fromarray(_photo(rng, 20, 20)) for _ in range(2)]
  buf = io.BytesIO()
  frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:], lossless=True)
  images.append(buf.getvalue())
  pixels, has = preprocess.tf_decode_images(tf.constant(_strings(images)), 32, preprocess.pillow_vertical_first())
  for i, name in enumerate(cases):
    ref, ok = transforms.decode_image(images[i], 32)
    assert ok and bool(has[i]), name
    np.testing.assert_array_equal(pixels[i].numpy(), ref, err_msg=name)
  assert not bool(has[-1])  # animated WebP: refused, and the process is still here


def _png_of_zeros(width, height):
  """Returns a valid 8-bit grayscale PNG of zeros (a few hundred KB for 200 megapixels)."""
  import struct  # pylint: disable=g-import-not-at-top
  import zlib  # pylint: disable=g-import-not-at-top

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

  z = zlib.compressobj(9)
  row = bytes(width + 1)
  idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
          + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_decompression_bomb_is_refused_like_pillow():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  bomb = _png_of_zeros(14_000, 14_000)  # 196 Mpx, over Pillow's 2 * MAX_IMAGE_PIXELS
  small = _png_of_zeros(50, 40)
  assert transforms.decode_image(bomb, 32)[1] is False and transforms.decode_image(small, 32)[1] is True
  # Refused from the header, before TF would allocate the 600 MB image.
  pixels, has = preprocess.tf_decode_images(tf.constant(_strings([bomb, small])), 32)
  assert has.numpy().tolist() == [False, True] and not pixels.numpy()[0].any()


def test_resize_follows_pillow_pass_order():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  v_first = preprocess.pillow_vertical_first()
  # Straddle the vertical-first boundary 2 * (w - s) < h - s (Pillow >= 13) and include enlargements.
  for h, w, s in [(24, 19, 16), (24, 20, 16), (98, 64, 32), (98, 65, 32), (300, 200, 224), (10, 90, 32),
                  (120, 11, 96), (77, 28, 96), (33, 700, 16)]:
    a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(a).resize((s, s), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(preprocess.tf_pil_resize(tf.constant(a), s, v_first).numpy(), ref,
                                  err_msg=f"{h}x{w} -> {s}")


# ----------------------------------------------------------------------------------------- serving


def test_serving_returns_the_python_scann_top_k(models, exported, trained, tok, tiny_data):
  from mmr_jax.evals import index as index_lib  # pylint: disable=g-import-not-at-top
  out, _ = exported
  queries = _queries(tiny_data, 48) + ["", "😀", "x" * 10_000]
  res = models["serving"].signatures["serving_default"](queries=_strings(queries))
  idx, scores, ids = res["indices"].numpy(), res["scores"].numpy(), res["ids"].numpy()
  assert idx.shape == scores.shape == ids.shape == (len(queries), K)
  index = index_lib.ScannIndex.load(os.path.join(out, "embeddings", "index"))
  # Same query vectors -> the very same ranking: both search the files ScannIndex.save wrote.
  q_emb = models["query_tower"].signatures["serving_default"](queries=_strings(queries))["embedding"].numpy()
  ref_idx, ref_scores = index.search(q_emb, K)
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_array_equal(scores, ref_scores)
  # Against the JAX query tower (embeddings ~1e-7 apart) only near-ties may swap places.
  jax_emb = trained.embed_queries({"query_tokens": tok.encode(queries, int(trained.config.data.query_len))})
  jax_idx, jax_scores = index.search(jax_emb, K)
  np.testing.assert_allclose(scores, jax_scores, atol=TOL)
  swapped = idx != jax_idx
  assert (np.abs(scores - jax_scores)[swapped] <= TOL).all()
  for r, c in zip(*np.nonzero(swapped)):  # a swapped product must be tied within TOL with its swap
    assert np.isclose(scores[r, c], scores[r][idx[r] == jax_idx[r, c]], atol=2 * TOL).all()
  with open(os.path.join(out, "embeddings", "ids.txt"), encoding="utf-8") as f:
    all_ids = f.read().split("\n")[:-1]
  assert [[i.decode() for i in row] for row in ids] == [[all_ids[j] for j in row] for row in idx]


def test_serving_pads_and_breaks_ties_like_scann_index(trained, tiny_data, tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mmr_jax.evals import index as index_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  d = two_tower.embedding_dim(trained.config.model)
  base = rng.normal(size=(4, d)).astype(np.float32)
  db = np.concatenate([base, base[::-1], base[:2]])  # 10 rows, exact duplicates -> tied scores
  db /= np.linalg.norm(db, axis=1, keepdims=True)
  index = index_lib.ScannIndex.build(db)
  index.save(str(tmp_path / "index"))
  ids = [f"id-{i}\u00e9" for i in range(len(db))]
  path = saving.export_serving(trained, os.path.join(tiny_data, "tokenizer.model"), str(tmp_path / "index"), ids,
                               str(tmp_path / "serving"), k=15, platforms=("cpu",))
  sv = saving.load_saved_model(path)
  queries = ["red dress", "blue shoes", ""]
  res = sv.signatures["serving_default"](queries=_strings(queries))
  qt_emb = sv.query_tower.serve(tf.constant(queries))["embedding"].numpy()
  ref_idx, ref_scores = index.search(qt_emb, 15)
  np.testing.assert_array_equal(res["indices"].numpy(), ref_idx)
  np.testing.assert_array_equal(res["scores"].numpy(), ref_scores)
  assert (res["indices"].numpy()[:, 10:] == -1).all() and np.isneginf(res["scores"].numpy()[:, 10:]).all()
  assert (res["ids"].numpy()[:, 10:] == b"").all()
  assert res["ids"].numpy()[0, 0].decode() == ids[ref_idx[0, 0]]


def test_serving_pads_slots_scann_leaves_unfilled(trained, tiny_data, tmp_path):
  # A tree index searching one small leaf finds fewer than k products; ScaNN fills the rest with index 0
  # and a NaN score, which must reach the caller as padding ("", -inf, -1), as ScannIndex.search gives it.
  from mmr_jax.evals import index as index_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  db = rng.normal(size=(3000, two_tower.embedding_dim(trained.config.model))).astype(np.float32)
  db /= np.linalg.norm(db, axis=1, keepdims=True)
  index = index_lib.ScannIndex.build(db, {"num_leaves": 300, "num_leaves_to_search": 1, "min_partition_size": 10})
  index.save(str(tmp_path / "index"))
  path = saving.export_serving(trained, os.path.join(tiny_data, "tokenizer.model"), str(tmp_path / "index"),
                               [f"p{i}" for i in range(len(db))], str(tmp_path / "serving"), k=100,
                               platforms=("cpu",))
  sv = saving.load_saved_model(path)
  queries = ["red dress", "blue cotton shirt"]
  res = sv.signatures["serving_default"](queries=_strings(queries))
  ref_idx, ref_scores = index.search(sv.query_tower.serve(_strings(queries))["embedding"].numpy(), 100)
  idx = res["indices"].numpy()
  assert (idx == -1).any(), "the setup must leave slots unfilled"
  np.testing.assert_array_equal(idx, ref_idx)
  np.testing.assert_array_equal(res["scores"].numpy(), ref_scores)
  assert (res["ids"].numpy()[idx < 0] == b"").all() and np.isneginf(res["scores"].numpy()[idx < 0]).all()
  for row in idx:
    assert len(set(row[row >= 0].tolist())) == int((row >= 0).sum())


# -------------------------------------------------------------------------------------- bad input


def test_empty_batches_give_empty_outputs(models, trained):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  empty = tf.constant([], tf.string)
  d = two_tower.embedding_dim(trained.config.model)
  assert models["query_tower"].signatures["serving_default"](queries=empty)["embedding"].shape == (0, d)
  res = models["serving"].signatures["serving_default"](queries=empty)
  assert res["ids"].shape == res["scores"].shape == res["indices"].shape == (0, K)
  out = models["product_tower"].signatures["serving_default"](title=empty, description=empty, attributes=empty,
                                                               image=empty)
  assert out["embedding"].shape == (0, d) and out["has_image"].shape == (0,)


def test_batch_buckets(capsys):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  assert towers.BATCH_BUCKETS == (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
  for n, want in ((0, 1), (1, 1), (2, 2), (3, 4), (5, 8), (63, 64), (64, 64), (65, 128), (1023, 1024),
                  (1024, 1024), (1025, 2048), (2048, 2048), (2049, 3072)):
    assert int(towers.tf_batch_bucket(tf.constant(n))) == towers.batch_bucket(n) == want, n
  for n, want in ((0, 3), (3, 3), (4, 10), (10, 10), (11, 20), (21, 30)):
    assert int(towers.tf_batch_bucket(tf.constant(n), (3, 10))) == towers.batch_bucket(n, (3, 10)) == want, n
  assert towers.check_batch_buckets(["1", "8"]) == (1, 8)
  assert saving._warmup_batches((1, 8, 64, 128), 64) == [1, 8, 64]
  assert not saving._warmup_batches((1, 8), 0)
  for bad in ((), (0, 4), (4, 2), (2, 2), ("a",), (1.5, 3), (True, 2), (1, towers.MAX_BATCH_BUCKET + 1)):
    with pytest.raises(ValueError, match="batch_buckets"):
      towers.check_batch_buckets(bad)
  with pytest.raises(ValueError, match="more than 1000"):  # TF Serving would refuse to load the model
    saving.check_warmup(tuple(range(1, 1102)), 2000)
  with pytest.raises(SystemExit):
    cli.main(["--workdir", "w", "--out", "o", "--batch_buckets", "8,4"])
  assert "--batch_buckets" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["--workdir", "w", "--out", "o", "--batch_buckets", ",".join(map(str, range(1, 1102))),
                 "--warmup_max_batch", "2000"])
  assert "--warmup_max_batch" in capsys.readouterr().err


def test_towers_compile_only_bucketed_batch_sizes(trained, tok, tiny_data, monkeypatch):
  """Each tower's XLA program sees padded batches (one compile per bucket); rows come back unchanged."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  seen = []
  run = towers._run_bucketed
  monkeypatch.setattr(towers, "_run_bucketed",
                      lambda fn, buckets, *x: run(lambda *y: (seen.append(y[0].shape[0]), fn(*y))[1], buckets, *x))
  tokenizer = os.path.join(tiny_data, "tokenizer.model")
  qt = towers.make_query_tower(trained, tokenizer, ("cpu",))
  q_len = int(trained.config.data.query_len)
  for n in (0, 3, 5):
    tokens = tok.encode(["red dress", "", "blue cotton shirt", "wool", "x"][:n], q_len)
    emb = qt.embed_ids(tf.constant(tokens.reshape(n, q_len))).numpy()  # eager: concrete shapes
    assert emb.shape == (n, two_tower.embedding_dim(trained.config.model))
    if n:
      np.testing.assert_allclose(emb, trained.embed_queries({"query_tokens": tokens}), atol=TOL, rtol=0)
  assert seen == [1, 4, 8]
  seen.clear()
  cfg = trained.config.data
  pt = towers.make_product_tower(trained, tokenizer, ("cpu",), buckets=(2, 5))
  rng = np.random.default_rng(1)
  batch = {"product_tokens": rng.integers(1, 50, (3, cfg.product_len)).astype(np.int32),
           "image": rng.integers(0, 256, (3, cfg.image_size, cfg.image_size, 3), dtype=np.uint8),
           "has_image": np.array([True, False, True])}
  emb = pt._embed(*(tf.constant(batch[k]) for k in ("product_tokens", "image", "has_image"))).numpy()
  assert seen == [5]
  np.testing.assert_allclose(emb, trained.embed_products(batch), atol=TOL, rtol=0)


def test_tf_serving_warmup_requests_match_the_signatures(models, exported):
  """Each SavedModel ships TF Serving's warm-up file: one request per bucket up to WARMUP_MAX_BATCH."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow_serving.apis import prediction_log_pb2  # pylint: disable=g-import-not-at-top
  out, summary = exported
  want = [b for b in towers.BATCH_BUCKETS if b <= saving.WARMUP_MAX_BATCH]
  assert summary["warmup_batch_sizes"] == want
  for name, m in models.items():
    path = os.path.join(out, name, "assets.extra", "tf_serving_warmup_requests")  # the name TF Serving reads
    logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy()) for r in tf.data.TFRecordDataset(path)]
    sig = m.signatures["serving_default"]
    sizes = []
    for log in logs:
      req = log.predict_log.request
      assert req.model_spec.signature_name == "serving_default"
      inputs = {k: tf.make_ndarray(v) for k, v in req.inputs.items()}
      assert set(inputs) == set(sig.structured_input_signature[1]), name
      assert len({len(v) for v in inputs.values()}) == 1
      sizes.append(len(next(iter(inputs.values()))))
    assert sizes == want, name
    # What TF Serving does with them: run each through the signature (the smallest and largest here).
    for log in (logs[0], logs[-1]):
      inputs = {k: tf.make_ndarray(v) for k, v in log.predict_log.request.inputs.items()}
      res = sig(**inputs)
      assert all(v.shape[0] == len(next(iter(inputs.values()))) for v in res.values())


def test_bad_requests_fail_cleanly_and_the_model_keeps_serving(models):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  sv = models["serving"].signatures["serving_default"]
  with pytest.raises(tf.errors.InvalidArgumentError, match="string"):
    sv(queries=tf.constant([1, 2]))  # wrong dtype
  # TF does not enforce signature shapes at call time; a scalar is served as a batch of one.
  one = sv(queries=tf.constant("red dress"))
  np.testing.assert_array_equal(one["indices"].numpy(), sv(queries=tf.constant(["red dress"]))["indices"].numpy())
  pt = models["product_tower"].signatures["serving_default"]
  two, one = tf.constant(["a", "b"]), tf.constant(["a"])
  with pytest.raises(tf.errors.InvalidArgumentError, match="inputs title and image must have the same batch size"):
    pt(title=two, description=two, attributes=two, image=one)
  # Still serving after the failures; an undecodable image only clears has_image for its row.
  assert sv(queries=tf.constant(["red dress"]))["ids"].shape == (1, K)
  out = pt(title=two, description=two, attributes=two, image=tf.constant([b"\x89PNG\r\n\x1a\nbroken", b""]))
  assert not out["has_image"].numpy().any()
  same = pt(title=two, description=two, attributes=two, image=tf.constant([b"", b""]))["embedding"].numpy()
  np.testing.assert_allclose(out["embedding"].numpy(), same, atol=TOL)


def test_over_long_query_is_truncated_not_fatal(models, trained, tok):
  q = "wool coat " * 200_000  # 2 MB
  emb = models["query_tower"].signatures["serving_default"](queries=_strings([q]))["embedding"].numpy()
  ref = trained.embed_queries({"query_tokens": tok.encode([q], int(trained.config.data.query_len))})
  np.testing.assert_allclose(emb, ref, atol=TOL, rtol=0)


# ------------------------------------------------------------------------------- files and summary


def test_exported_files(exported, trained, tiny_data):
  out, summary = exported
  emb_dir = os.path.join(out, "embeddings")
  emb = np.load(os.path.join(emb_dir, "embeddings.npy"))
  with open(os.path.join(emb_dir, "ids.txt"), encoding="utf-8") as f:
    ids = f.read().split("\n")[:-1]
  assert ids == embeddings.product_ids(tiny_data) and emb.shape == (len(ids), summary["embedding_dim"])
  # Rows are the JAX product tower in product-index order (what evaluation embeds).
  it = pipeline.make_eval_iterator(tiny_data, "products", "all", trained.config.data, 64)
  batch = next(it)
  np.testing.assert_allclose(emb[:64], trained.embed_products(batch)[batch["mask"]], atol=1e-6)
  info = json.loads(open(os.path.join(emb_dir, "info.json")).read())
  assert info["num_products"] == len(ids) and info["index"]["params"]["n"] == len(ids)
  assert not os.path.exists(os.path.join(emb_dir, "shards"))
  on_disk = json.loads(open(os.path.join(out, workdir.SUMMARY_FILE)).read())
  assert on_disk["k"] == K and on_disk["num_products"] == len(ids) and on_disk["step"] == trained.step
  assert on_disk["batch_buckets"] == list(towers.BATCH_BUCKETS)
  for name in ("query_tower", "product_tower", "serving"):
    d = os.path.join(out, name)
    with open(os.path.join(d, "assets", preprocess.TOKENIZER_ASSET), "rb") as f, \
         open(os.path.join(tiny_data, "tokenizer.model"), "rb") as g:
      assert f.read() == g.read()
    assert os.listdir(os.path.join(d, "variables"))


def test_params_are_variables_not_constants(models, trained, exported):
  import jax  # pylint: disable=g-import-not-at-top
  out, _ = exported
  qt = models["query_tower"]
  named = convert.unflatten_params(qt.params, qt.param_layout.numpy())
  # Only the query tower's own parameters, with the trained values.
  assert named and all(n.startswith(("query_tower/", "text_tower/", "heads/", "lexical/", "lexical_mix/",
                                     "query_translation/")) for n in named)
  # The table goes with the query tower (tiny_workdir's is not empty).
  assert (named["query_translation/targets"] >= 0).any()
  leaves = jax.tree_util.tree_flatten_with_path(convert.host_params(trained.params))[0]
  host = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(x) for path, x in leaves}
  for name, value in named.items():
    np.testing.assert_array_equal(value, host[name])
  pb = open(os.path.join(out, "query_tower", "saved_model.pb"), "rb").read()
  biggest = max(named.values(), key=lambda v: v.size)
  assert biggest.size > 1000 and biggest.tobytes()[:4096] not in pb  # weights are in variables/, not the graph


def test_large_leaves_are_variables_of_their_own(trained, tok, monkeypatch):
  """Matrices are not packed (slicing a packed variable copies it on every call); small leaves are."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(convert, "PACK_MAX_BYTES", 2048)
  q_len = int(trained.config.data.query_len)
  conv = convert.convert_method(trained.model, trained.params, "embed_query", [np.ones((1, q_len), np.int32)],
                                ["(b, _)"], ("cpu",))
  nbytes = lambda e: int(np.prod(e["shape"])) * np.dtype(e["dtype"]).itemsize  # pylint: disable=unnecessary-lambda-assignment
  big = [e for e in conv.layout if nbytes(e) > 2048]
  small = [e for e in conv.layout if nbytes(e) <= 2048]
  assert big and small
  for e in big:
    assert "offset" not in e and e["variable"].startswith("leaf_")
    assert tuple(conv.variables[e["variable"]].shape) == tuple(e["shape"])
  assert len({e["variable"] for e in big}) == len(big)
  assert {e["variable"] for e in small} == {f"packed_{e['dtype']}" for e in small}
  assert len(conv.variables) == len(big) + len({e["dtype"] for e in small})
  tokens = tok.encode(["red dress", "", "blue cotton shirt"], q_len)
  got = conv.fn(dict(conv.variables), tf.constant(tokens)).numpy()
  np.testing.assert_allclose(got, trained.embed_queries({"query_tokens": tokens}), atol=1e-5)
  named = convert.unflatten_params(conv.variables, json.dumps(conv.layout))
  assert set(named) == {e["name"] for e in conv.layout}


def test_embedding_export_resumes_from_shards(trained, tiny_data, tmp_path, monkeypatch):
  calls = []
  real = embeddings._local_embed_fn

  def counting(tm):
    fn = real(tm)
    return lambda batch: calls.append(1) or fn(batch)

  monkeypatch.setattr(embeddings, "_local_embed_fn", counting)
  full = embeddings.embed_catalogue(trained, tiny_data, str(tmp_path), batch_size=64, shard_batches=1, progress=False)
  n_batches = len(calls)
  shard_dir = tmp_path / "shards" / "process_0-of-1"
  last = sorted(shard_dir.glob("shard_*.npz"))[-1]
  last.unlink()  # as if killed while writing the last shard
  calls.clear()
  again = embeddings.embed_catalogue(trained, tiny_data, str(tmp_path), batch_size=64, shard_batches=1, progress=False)
  assert n_batches > 1 and len(calls) == 1  # only the missing shard was embedded again
  np.testing.assert_array_equal(again, full)


def test_index_reuses_or_matches_the_evaluation_index(tmp_path):
  from mmr_jax.evals import index as index_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(3000, 16)).astype(np.float32)
  emb /= np.linalg.norm(emb, axis=1, keepdims=True)
  wd = tmp_path / "wd"
  index_lib.ScannIndex.build(emb, {"num_leaves": 30, "reorder": 150}).save(str(wd / "index"))
  np.save(wd / "product_embeddings.npy", emb)
  build = embeddings.build_index
  info = build(emb, str(wd), str(tmp_path / "a"), rebuild=False, scann_overrides=None)
  assert info["source"] == "reused"
  assert (tmp_path / "a" / "dataset.npy").read_bytes() == (wd / "index" / "dataset.npy").read_bytes()
  # Other embeddings (e.g. another machine): rebuilt, with the evaluation's parameters.
  info = build(emb[::-1].copy(), str(wd), str(tmp_path / "b"), rebuild=False, scann_overrides=None)
  assert info["source"] == "built with the evaluation's parameters"
  assert info["params"]["num_leaves"] == 30 and info["params"]["reorder"] == 150
  info = build(emb, str(tmp_path / "no_eval"), str(tmp_path / "c"), rebuild=False, scann_overrides=None)
  assert info["source"] == "built with index.SCANN_DEFAULTS"


# ------------------------------------------------------------------------------------------- CLI


def test_cli_help():
  r = subprocess.run([sys.executable, "-m", "mmr_jax.export", "--help"], capture_output=True, text=True,
                     timeout=120, check=False)
  assert r.returncode == 0, r.stderr
  for flag in ("--workdir", "--out", "--data", "--k"):
    assert flag in r.stdout


@pytest.mark.slow
def test_cli_end_to_end_with_parity(tiny_workdir, tiny_data, tmp_path):
  out = tmp_path / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "mmr_jax.export", "--workdir", tiny_workdir, "--out", str(out),
                      "--data", tiny_data, "--k", "7", "--no_progress", "--batch_buckets", "1,5"],
                     capture_output=True, text=True,
                     timeout=900, env=env, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads((out / workdir.SUMMARY_FILE).read_text())
  p = summary["parity"]
  assert p["query_max_abs_diff"] <= TOL and p["product_preprocessed_max_abs_diff"] <= TOL
  assert p["product_end_to_end_max_abs_diff"] <= TOL and p["image_max_abs_diff"] == 0
  assert p["product_tokens_equal"] and p["has_image_equal"]
  assert summary["platforms"] == ["cpu", "cuda"] and summary["k"] == 7
  assert summary["batch_buckets"] == [1, 5]  # parity above held with batches padded to multiples of 5
  assert summary["warmup_batch_sizes"] == [1, 5]
  sv = saving.load_saved_model(str(out / "serving"))
  assert sv.signatures["serving_default"](queries=_strings(["dress"]))["ids"].shape == (1, 7)


def _without_saved_models(monkeypatch):
  """Skips the SavedModel conversions (slow) in export_workdir: the tests below check what it decides."""
  for name in ("export_query_tower", "export_product_tower", "export_serving"):
    monkeypatch.setattr(saving, name, lambda *a, **kw: None)


def test_export_reuses_embeddings_only_of_the_same_weights(tiny_workdir, tiny_data, tmp_path, monkeypatch):
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from mmr_jax import train  # pylint: disable=g-import-not-at-top
  other = tmp_path / "other_seed"  # another run, same config but its seed, stopped at the same step
  cfg = tiny_config(tiny_data, progress=False)
  cfg.seed = 7
  train.train_and_evaluate(cfg, str(other))
  assert embedding.load_trained(str(other)).step == embedding.load_trained(tiny_workdir).step
  _without_saved_models(monkeypatch)
  embedded = []
  real = embeddings.embed_catalogue
  monkeypatch.setattr(embeddings, "embed_catalogue", lambda *a, **kw: embedded.append(1) or real(*a, **kw))
  out = tmp_path / "out"

  def run(wd):
    workdir.export_workdir(str(wd), str(out), tiny_data, k=K, platforms=("cpu",), parity=False, progress=False)
    return np.load(out / "embeddings" / "embeddings.npy")

  first = run(tiny_workdir)
  second = run(other)
  assert len(embedded) == 2  # not the first run's embeddings served with the second run's query tower
  assert not np.allclose(first, second)
  np.testing.assert_array_equal(run(other), second)
  assert len(embedded) == 2  # the same weights and config: kept


def test_parity_mismatch_fails_the_export(tiny_workdir, tiny_data, tmp_path, monkeypatch, capsys, caplog):
  _without_saved_models(monkeypatch)
  bad = {"queries": 1, "products": 1, "query_max_abs_diff": 3e-7, "product_preprocessed_max_abs_diff": 2e-7,
         "product_end_to_end_max_abs_diff": 0.02, "product_tokens_equal": True, "has_image_equal": True,
         "image_pixels_differing": 0.0, "image_max_abs_diff": 0}
  monkeypatch.setattr(parity, "measure_parity", lambda *a, **kw: dict(bad))
  argv = ["--workdir", tiny_workdir, "--out", str(tmp_path / "out"), "--data", tiny_data, "--platforms", "cpu",
          "--no_progress"]
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]
  assert err.startswith("error: ") and "product_tower (serving_default, raw bytes): max |SavedModel - JAX| 0.02 " \
      "> tolerance 0.0001" in err and "query_tower" not in err
  summary = json.loads((tmp_path / "out" / workdir.SUMMARY_FILE).read_text())
  assert summary["parity_failures"] and summary["parity"]["product_end_to_end_max_abs_diff"] == 0.02
  cli.main(argv + ["--parity_tol", "0.05"])  # within a looser tolerance
  with caplog.at_level("WARNING", logger="mmr_jax.export"):
    cli.main(argv + ["--allow_parity_mismatch"])  # a warning only
  assert "SavedModels do not match" in caplog.text
