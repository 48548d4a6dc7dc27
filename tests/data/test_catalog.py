"""Tests for mmr_jax.data.catalog: text rendering, validation, skips, splits, images."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from mmr_jax.data import catalog

C = catalog


def _good_products(n):
  return [{"id": f"p{i}", "title": f"product {i}"} for i in range(n)]


def _scan(catalog_writer, tmp_path, products=None, queries=None, qrels=None, **kwargs):
  src = catalog_writer(tmp_path / "src",
                       products if products is not None else _good_products(3),
                       queries if queries is not None else [{"id": "q0", "text": "a", "split": "train"}],
                       qrels if qrels is not None else [("q0", "p0", "E")])
  return C.scan_catalog(src, **kwargs)


# ------------------------------------------------------------------------------- text


def test_product_text_renders_sorted_attributes_and_skips_empty_parts():
  attrs = {"size": [38, 40.0, "XL"], "colour": "dark   red", "eco": True, "none": None, "w": 1.5}
  text = C.product_text("Dress", "", attrs)
  assert text == "Dress | colour: dark red; eco: true; size: 38, 40, XL; w: 1.5"
  # Key order of the input mapping must not matter.
  assert C.product_text("Dress", "", dict(reversed(list(attrs.items())))) == text
  # An already rendered attribute string is used as is.
  assert C.product_text("Dress", "long  text", "a: b") == "Dress | long text | a: b"
  assert C.product_text("Dress") == "Dress"


def test_render_attributes_rejects_unsupported_values():
  with pytest.raises(TypeError, match="object"):
    C.render_attributes({"x": object()})


def test_normalize_query_and_grades():
  assert C.normalize_query("  Red \t Floral\nDRESS ") == "red floral dress"
  assert [C.parse_grade(g) for g in ("E", "s", " C ", "Irrelevant", "exact", "X", "")] == [
      "E", "S", "C", "I", "E", None, None]


def test_count_words():
  assert C.count_words("a b", "", "c: d; e: f") == 6
  # Unspaced scripts count a word per character; spaced ones (Hangul, Latin) count runs.
  assert C.count_words("红色连衣裙 夏季") == 7
  assert C.count_words("ワンピース 赤 cotton") == 7
  assert C.count_words("빨간 원피스", "Kleid, rot!") == 4
  assert C.count_words("  ", "") == 0


# ------------------------------------------------------------------------------- bad input


def test_missing_required_file_names_it(catalog_writer, tmp_path):
  src = catalog_writer(tmp_path / "src", _good_products(1), [], [])
  os.remove(src / "qrels.tsv")
  with pytest.raises(C.CatalogError, match="qrels.tsv"):
    C.scan_catalog(src)
  with pytest.raises(C.CatalogError, match="does not exist"):
    C.scan_catalog(tmp_path / "nowhere")


def test_malformed_json_and_non_utf8_lines_are_skipped_with_file_and_line(catalog_writer, tmp_path):
  products = [{"id": "p0", "title": "ok"}, '{"id": "p1", "title": ', b'{"id": "p2", "title": "caf\xe9"}',
              "[1, 2]", {"id": "p3", "title": "also ok"}]
  plan = _scan(catalog_writer, tmp_path, products=products)
  assert plan.num_products == 2
  assert list(plan.product_lines) == [1, 5]  # Product index -> line in products.jsonl.
  refs = plan.skips.as_dict()
  assert [r.split(":")[:2] for r in refs[C.MALFORMED_JSON]] == [["products.jsonl", "2"], ["products.jsonl", "4"]]
  assert refs[C.NON_UTF8] == ["products.jsonl:3: byte 27 is not UTF-8"]


def test_lone_surrogates_are_skipped_and_escaped_emoji_kept(catalog_writer, tmp_path):
  # JSON may spell half an emoji ("\ud83d"): valid JSON, not text, and unwritable as UTF-8 later.
  products = [{"id": "p0", "title": "ok"}, '{"id": "p1", "title": "broken \\ud83d"}',
              '{"id": "p2", "title": "smile \\ud83d\\ude00"}']
  queries = [{"id": "q0", "text": "a", "split": "train"}, '{"id": "q1", "text": "caf\\udce9", "split": "test"}']
  plan = _scan(catalog_writer, tmp_path, products=products, queries=queries)
  refs = plan.skips.refs(C.NON_UTF8)
  assert [r.split(":")[:2] for r in refs] == [["products.jsonl", "2"], ["queries.jsonl", "2"]]
  assert "surrogate" in refs[0]
  assert [p.title for _, p in plan.iter_products()] == ["ok", "smile \U0001f600"]
  assert plan.queries["test"] == []


def test_empty_and_missing_fields_are_skipped(catalog_writer, tmp_path):
  products = [{"id": "p0", "title": "ok"}, {"id": "p1", "title": "   "}, {"id": "p2"},
              {"id": "p3", "title": 5}, {"title": "no id"}, {"id": "p4", "title": "t", "attributes": [1]},
              {"id": 7, "title": "numeric id is fine"}]
  queries = [{"id": "q0", "text": "a", "split": "train"}, {"id": "q1", "text": "", "split": "test"},
             {"id": "q2", "text": "x", "split": "test", "tags": [1]}]
  plan = _scan(catalog_writer, tmp_path, products=products, queries=queries)
  counts = plan.skips.counts()
  assert counts[C.EMPTY_TEXT] == 2  # p1 title, q1 text
  assert counts[C.MISSING_FIELD] == 2  # p2 title, id
  assert counts[C.INVALID_FIELD] == 3  # p3 title, p4 attributes, q2 tags
  assert plan.num_products == 2
  assert any(r.startswith("queries.jsonl:2:") and "text" in r for r in plan.skips.refs(C.EMPTY_TEXT))
  assert [q.id for q in plan.queries["train"]] == ["q0"] and plan.queries["test"] == []


def test_duplicate_ids_keep_the_first(catalog_writer, tmp_path):
  products = [{"id": "p0", "title": "first"}, {"id": "p1", "title": "b"}, {"id": "p0", "title": "second"}]
  queries = [{"id": "q0", "text": "first", "split": "train"}, {"id": "q0", "text": "again", "split": "test"}]
  plan = _scan(catalog_writer, tmp_path, products=products, queries=queries)
  assert plan.skips.refs(C.DUPLICATE_PRODUCT_ID) == ["products.jsonl:3: id=p0 first seen on line 1"]
  assert plan.skips.refs(C.DUPLICATE_QUERY_ID) == ["queries.jsonl:2: id=q0"]
  assert [p.title for _, p in plan.iter_products()] == ["first", "b"]
  assert plan.queries["train"][0].text == "first" and plan.queries["test"] == []


def test_qrels_problems_are_skipped_and_counted(catalog_writer, tmp_path):
  qrels = [("q0", "p0", "E"), ("q0", "p9", "E"), ("q9", "p0", "E"), ("q0", "p1", "X"),
           ("q0", "p0", "S"), "q0\tp1", ("q0", "p2", "substitute"), b"q0\tp1\t\xff"]
  plan = _scan(catalog_writer, tmp_path, qrels=qrels)
  counts = plan.skips.counts()
  assert counts == {C.UNKNOWN_PRODUCT: 1, C.UNKNOWN_QUERY: 1, C.INVALID_GRADE: 1, C.DUPLICATE_QREL: 1,
                    C.MALFORMED_QREL: 1, C.NON_UTF8: 1}
  # Line numbers count the header line.
  assert plan.skips.refs(C.UNKNOWN_PRODUCT) == ["qrels.tsv:3: product id=p9"]
  assert plan.num_qrels == 2
  assert plan.queries["train"][0].labels == [(0, "E"), (2, "S")]


def test_qrels_without_header(catalog_writer, tmp_path):
  src = catalog_writer(tmp_path / "src", _good_products(2), [{"id": "q0", "text": "a", "split": "train"}],
                       [("q0", "p0", "E"), ("q0", "p1", "C")], qrels_header=False)
  plan = C.scan_catalog(src)
  assert plan.num_qrels == 2 and plan.skips.total() == 0


def test_quoted_qrels_fields_as_spreadsheets_write_them(catalog_writer, tmp_path):
  src = catalog_writer(tmp_path / "src", _good_products(2), [{"id": "q0", "text": "a", "split": "train"}],
                       ['"q0"\t"p0"\t"E"', 'q0\t"p1"\tC'], qrels_header=False)
  plan = C.scan_catalog(src)
  assert plan.num_qrels == 2 and plan.skips.total() == 0
  assert plan.queries["train"][0].labels == [(0, "E"), (1, "C")]


def test_unknown_split_is_an_error_naming_the_line(catalog_writer, tmp_path):
  queries = [{"id": "q0", "text": "a", "split": "train"}, {"id": "q1", "text": "b", "split": "val"}]
  with pytest.raises(C.CatalogError, match=r"queries.jsonl:2: unknown split 'val'"):
    _scan(catalog_writer, tmp_path, queries=queries)
  with pytest.raises(C.CatalogError, match="test_novel_query"):
    _scan(catalog_writer, tmp_path, queries=[{"id": "q0", "text": "a", "split": "test_novel_query"}])


def test_no_usable_products_is_an_error(catalog_writer, tmp_path):
  with pytest.raises(C.CatalogError, match="no usable product"):
    _scan(catalog_writer, tmp_path, products=["not json", {"id": "p0"}])


def test_bad_options_are_errors(catalog_writer, tmp_path):
  with pytest.raises(C.CatalogError, match="pair_grades"):
    _scan(catalog_writer, tmp_path, pair_grades=("E", "I"))
  with pytest.raises(C.CatalogError, match="novel_product_fraction"):
    _scan(catalog_writer, tmp_path, novel_product_fraction=1.5)


# ------------------------------------------------------------------------------- splits


def _split_catalog(catalog_writer, tmp_path, **kwargs):
  products = _good_products(20)
  queries = ([{"id": f"t{i}", "text": f"Train  Query {i}", "split": "train"} for i in range(5)]
             + [{"id": "v0", "text": "val query", "split": "validation"}]
             + [{"id": f"x{i}", "text": f"train query {i}" if i < 2 else f"new query {i}", "split": "test"}
                for i in range(6)])
  qrels = ([(f"t{i}", f"p{i}", "E") for i in range(5)] + [(f"t{i}", f"p{10 + i}", "E") for i in range(5)]
           + [("t0", "p11", "S"), ("v0", "p12", "E"), ("v0", "p0", "E")]
           + [(f"x{i}", f"p{10 + i}", "E") for i in range(6)] + [("x0", "p19", "S")])
  src = catalog_writer(tmp_path / "src", products, queries, qrels)
  return C.scan_catalog(src, **kwargs)


def test_novel_query_split_uses_normalised_text(catalog_writer, tmp_path):
  plan = _split_catalog(catalog_writer, tmp_path)
  # x0/x1 repeat train queries up to case and whitespace.
  assert [q.id for q in plan.queries["test_novel_query"]] == ["x2", "x3", "x4", "x5"]


def test_heldout_products_are_seeded_and_dropped_from_pairs(catalog_writer, tmp_path):
  plan = _split_catalog(catalog_writer, tmp_path, novel_product_fraction=0.5, seed=3)
  heldout = set(np.flatnonzero(plan.heldout))
  test_exact = {10, 11, 12, 13, 14, 15}
  assert len(heldout) == 3 and heldout <= test_exact  # S label p19 is never a candidate.
  again = _split_catalog(catalog_writer, tmp_path / "again", novel_product_fraction=0.5, seed=3)
  assert set(np.flatnonzero(again.heldout)) == heldout
  others = [set(np.flatnonzero(_split_catalog(catalog_writer, tmp_path / f"s{s}", novel_product_fraction=0.5,
                                              seed=s).heldout)) for s in range(4, 8)]
  assert any(o != heldout for o in others)  # The seed matters.

  for split in C.PAIR_SPLITS:
    for row in plan.iter_pairs(split):
      assert row["product_index"] not in heldout
      assert row["grade"] == 1.0
  train_pairs = list(plan.iter_pairs("train"))
  assert len(train_pairs) == 10 - len(heldout & {10, 11, 12, 13, 14})
  # positives list all E products of the query (duplicate masking), held out or not.
  t1 = [r for r in plan.iter_pairs("train") if r["query_index"] == 1][0]
  assert t1["positives"] == [1, 11]
  novel = [q.id for q in plan.queries["test_novel_product"]]
  assert novel == [f"x{i}" for i in range(6) if 10 + i in heldout]


def test_pair_grades_e_and_s(catalog_writer, tmp_path):
  plan = _split_catalog(catalog_writer, tmp_path, novel_product_fraction=0.0, pair_grades=("E", "S"))
  rows = [r for r in plan.iter_pairs("train") if r["query_index"] == 0]
  assert [(r["product_index"], r["grade"]) for r in rows] == [(0, 1.0), (10, 1.0), (11, 0.1)]
  assert rows[2]["positives"] == [0, 10]
  assert not plan.heldout.any() and plan.queries["test_novel_product"] == []


def test_relevant_labels_exclude_irrelevant(catalog_writer, tmp_path):
  plan = _scan(catalog_writer, tmp_path, qrels=[("q0", "p0", "E"), ("q0", "p1", "I"), ("q0", "p2", "C")])
  q = plan.queries["train"][0]
  assert q.relevant_index == [0, 2]
  assert q.relevant_grade == [1.0, 0.01]
  assert q.positives == [0]


# ------------------------------------------------------------------------------- images


def _decode(jpeg):
  img = Image.open(io.BytesIO(jpeg))
  assert img.format == "JPEG"
  return img


def test_load_image_resizes_and_reencodes(tmp_path):
  Image.fromarray(np.zeros((300, 1000, 3), np.uint8)).save(tmp_path / "big.png")
  jpeg, reason, _ = C.load_image(tmp_path, "big.png", max_side=128)
  assert reason is None
  assert _decode(jpeg).size == (128, 38)
  Image.fromarray(np.zeros((20, 10, 3), np.uint8)).save(tmp_path / "small.jpg")
  jpeg, reason, _ = C.load_image(tmp_path, "small.jpg", max_side=128)
  assert reason is None and _decode(jpeg).size == (10, 20)  # Never upscaled.


def test_load_image_composites_transparency_on_white(tmp_path):
  rgba = np.zeros((8, 8, 4), np.uint8)  # Fully transparent black.
  Image.fromarray(rgba, "RGBA").save(tmp_path / "cutout.png")
  jpeg, reason, _ = C.load_image(tmp_path, "cutout.png", max_side=64)
  assert reason is None
  pixels = np.asarray(_decode(jpeg))
  assert pixels.shape == (8, 8, 3) and pixels.min() > 245


def test_load_image_applies_exif_rotation(tmp_path):
  img = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display.
  img.save(tmp_path / "phone.jpg", exif=exif)
  jpeg, reason, _ = C.load_image(tmp_path, "phone.jpg", max_side=64)
  assert reason is None and _decode(jpeg).size == (10, 30)


def test_load_image_failures(tmp_path):
  (tmp_path / "cat").mkdir()
  (tmp_path / "cat" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "outside.png")
  buf = io.BytesIO()
  Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, format="PNG")
  (tmp_path / "cat" / "truncated.png").write_bytes(buf.getvalue()[:60])
  os.symlink(tmp_path / "outside.png", tmp_path / "cat" / "link.png")
  cases = {
      "corrupt.jpg": C.IMAGE_CORRUPT,
      "truncated.png": C.IMAGE_CORRUPT,
      "gone.jpg": C.IMAGE_MISSING,
      "": C.IMAGE_MISSING,
      "../outside.png": C.IMAGE_PATH_REFUSED,
      str(tmp_path / "outside.png"): C.IMAGE_PATH_REFUSED,
      "link.png": C.IMAGE_PATH_REFUSED,
      "http://example.com/x.jpg": C.IMAGE_PATH_REFUSED,
      "..\\outside.png": C.IMAGE_PATH_REFUSED,  # a Windows separator does not escape either
  }
  for rel, want in cases.items():
    jpeg, reason, detail = C.load_image(tmp_path / "cat", rel, max_side=32)
    assert (jpeg, reason) == (b"", want), (rel, detail)
    assert detail


def test_wide_greyscale_images_keep_their_brightness(tmp_path):
  # 16-bit and float greyscale map their type's range to 8 bits (not the picture's own maximum, not clipped).
  dark16 = np.full((8, 8), 12850, np.uint16)  # 20% of 65535
  Image.fromarray(dark16).save(tmp_path / "dark16.png")
  Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "half.tiff")
  Image.fromarray(np.full((8, 8), 200, np.int32)).save(tmp_path / "int8range.tiff")  # 8-bit values, 32-bit type
  for name, want in (("dark16.png", 50), ("half.tiff", 128), ("int8range.tiff", 200)):
    jpeg, reason, _ = C.load_image(tmp_path, name, max_side=32)
    assert reason is None, name
    assert abs(np.asarray(Image.open(io.BytesIO(jpeg))).mean() - want) <= 2, name


def test_windows_separators_in_image_paths(tmp_path):
  (tmp_path / "images").mkdir()
  Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "images" / "p1.png")
  jpeg, reason, _ = C.load_image(tmp_path, "images\\p1.png", max_side=32)
  assert reason is None and jpeg[:2] == b"\xff\xd8"


def test_product_chunks_cover_every_product_once(catalog_writer, tmp_path):
  products = [{"id": "p0", "title": "a"}, "garbage", {"id": "p1", "title": "b"}, "", {"id": "p0", "title": "dup"},
              {"id": "p2", "title": "c"}, {"id": "p3", "title": "d"}, b'{"id": "p4", "title": "\xff"}',
              {"id": "p5", "title": "e"}]
  plan = _scan(catalog_writer, tmp_path, products=products)
  sequential = [(i, p.id, p.lineno) for i, p in plan.iter_products()]
  assert [s[1] for s in sequential] == ["p0", "p1", "p2", "p3", "p5"]
  for rows in (1, 2, 3, 10):
    chunks = plan.product_chunks(rows)
    assert len(chunks) == -(-5 // rows)
    assert sum(c.num_rows for c in chunks) == 5
    # Chunks are read independently and in any order (Beam workers).
    got = [(i, p.id, p.lineno) for c in reversed(chunks) for i, p in C.iter_chunk_products(plan.src_dir, c)]
    assert sorted(got) == sequential, rows
