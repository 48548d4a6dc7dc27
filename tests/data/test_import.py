"""End-to-end tests of the importer: catalogue folder -> DATA_DIR -> load_source."""

import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mmr_jax.data import catalog
from mmr_jax.data import import_catalog as importer
from mmr_jax.data import tfds_builder
from mmr_jax.data import tokenizer as tokenizer_lib

TITLES = ["Rotes Kleid Größe 38 – Übergröße", "赤いワンピース 花柄", "Mug ☕ with 🐱 print", "plain lamp",
          "blue shirt", "green hat", "wool scarf", "leather bag"]


def _products():
  rows = []
  for i, title in enumerate(TITLES):
    row = {"id": f"p{i}", "title": title, "image": f"images/p{i}.{'png' if i % 2 else 'jpg'}"}
    if i == 0:
      row.update(description="Sommerkleid aus Baumwolle", language="de",
                 attributes={"Farbe": "rot", "Größen": [36, 38], "bio": True})
    if i == 1:
      row.update(language="ja", attributes={"色": "赤"})
    rows.append(row)
  rows[3]["image"] = "images/missing.jpg"
  rows[5]["image"] = "images/corrupt.jpg"
  rows[6]["image"] = "../escape.jpg"
  del rows[7]["image"]
  rows.append({"id": "p2", "title": "duplicate of p2"})
  rows.append('{"id": "broken"')
  return rows


QUERIES = [
    {"id": "q0", "text": "rotes Kleid", "split": "train", "tags": ["visual", "de"]},
    {"id": "q1", "text": "赤 ワンピース", "split": "train"},
    {"id": "q2", "text": "mug", "split": "train"},
    {"id": "q3", "text": "shirt", "split": "validation"},
    {"id": "q4", "text": "ROTES   kleid", "split": "test"},  # A train query: not novel.
    {"id": "q5", "text": "Katzen Tasse 🐱", "split": "test", "tags": ["emoji"]},
    {"id": "q6", "text": "green hat", "split": "test"},
    {"id": "q7", "text": "", "split": "test"},
]

QRELS = [("q0", "p0", "E"), ("q0", "p1", "S"), ("q1", "p1", "E"), ("q2", "p2", "E"), ("q2", "p3", "C"),
         ("q3", "p4", "E"), ("q3", "p2", "I"), ("q4", "p0", "E"), ("q5", "p2", "E"), ("q6", "p5", "E"),
         ("q6", "p9", "E"), ("q1", "p3", "I"), ("q1", "p2", "I"), ("q1", "p1", "X")]


@pytest.fixture(scope="module")
def imported(tmp_path_factory, catalog_writer):
  """Returns (src, data_dir, summary) of one import shared by the round-trip tests."""
  root = tmp_path_factory.mktemp("imp")
  images = {f"images/p{i}.{'png' if i % 2 else 'jpg'}": (300 + 40 * i, 200) for i in range(8)}
  src = catalog_writer(root / "src", _products(), QUERIES, QRELS, images=images)
  (src / "images" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really")
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / "escape.jpg")
  summary = importer.import_catalog(src, root / "data", novel_product_fraction=1.0, seed=0,
                                    image_max_side=64, vocab_size=8000, progress=False, verbose=False)
  return src, root / "data", summary


def _s(value):
  return value.decode("utf-8") if isinstance(value, bytes) else value


def test_products_round_trip(imported):
  _, data_dir, _ = imported
  products = tfds_builder.load_source(data_dir, "products", "all")
  assert len(products) == 8
  assert [_s(products[i]["id"]) for i in range(8)] == [f"p{i}" for i in range(8)]  # Index = file order.
  assert [_s(products[i]["title"]) for i in range(8)] == TITLES  # Umlauts, Japanese, emoji survive.
  p0 = products[0]
  assert _s(p0["attributes"]) == "Farbe: rot; Größen: 36, 38; bio: true"
  assert _s(p0["text"]) == catalog.product_text(TITLES[0], "Sommerkleid aus Baumwolle", _s(p0["attributes"]))
  assert _s(p0["language"]) == "de" and _s(products[2]["language"]) == "und"
  assert int(p0["num_words"]) == len(TITLES[0].split()) + 3 + 7
  has_image = [bool(products[i]["has_image"]) for i in range(8)]
  assert has_image == [True, True, True, False, True, False, False, False]
  for i in range(8):
    image = products[i]["image"]
    if has_image[i]:
      img = Image.open(io.BytesIO(image))
      assert img.format == "JPEG" and img.mode == "RGB" and max(img.size) == 64
    else:
      assert image == b""
  # The same table through plain TFDS: "all" is the one products split.
  builder = tfds.builder_from_directory(str(tfds_builder.table_dir(data_dir, "products")))
  assert len(builder.as_data_source("all")) == 8


def test_summary_reports_every_skip(imported):
  _, data_dir, summary = imported
  on_disk = json.loads((data_dir / "import_summary.json").read_text(encoding="utf-8"))
  assert on_disk == summary
  assert (summary["products"], summary["queries"], summary["qrels"]) == (8, 7, 12)
  skipped = summary["skipped"]
  assert set(skipped) == {catalog.IMAGE_MISSING, catalog.IMAGE_CORRUPT, catalog.IMAGE_PATH_REFUSED,
                          catalog.DUPLICATE_PRODUCT_ID, catalog.MALFORMED_JSON, catalog.EMPTY_TEXT,
                          catalog.UNKNOWN_PRODUCT, catalog.INVALID_GRADE}
  assert len(skipped[catalog.IMAGE_MISSING]) == 2  # p3 file missing, p7 names no image.
  assert "id=p5" in skipped[catalog.IMAGE_CORRUPT][0]
  assert "escapes" in skipped[catalog.IMAGE_PATH_REFUSED][0]
  assert skipped[catalog.DUPLICATE_PRODUCT_ID][0].startswith("products.jsonl:9:")
  assert skipped[catalog.MALFORMED_JSON][0].startswith("products.jsonl:10:")
  assert skipped[catalog.EMPTY_TEXT][0].startswith("queries.jsonl:8:")
  assert skipped[catalog.UNKNOWN_PRODUCT] == ["qrels.tsv:12: product id=p9"]
  assert summary["skipped_counts"] == {k: len(v) for k, v in skipped.items()}
  assert summary["products_with_image"] == 4
  # How the default data.product_len cuts the product text: these 8 short products keep all of it.
  from mmr_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  tok = tok_lib.Tokenizer(data_dir / "tokenizer.model")
  products = tfds_builder.load_source(data_dir, "products", "all")
  longest = max(tok.num_tokens(_s(products[i]["text"])) for i in range(8))
  assert summary["product_text"]["tokens"]["max"] == longest > 0
  assert summary["product_text"]["sampled"] == 8 and summary["product_text"]["truncated"] == 0.0


def test_queries_splits_and_labels(imported):
  _, data_dir, _ = imported
  info = tfds_builder.catalog_info(data_dir)
  want = {"train": ["q0", "q1", "q2"], "validation": ["q3"], "test": ["q4", "q5", "q6"],
          "test_novel_query": ["q5", "q6"], "test_novel_product": ["q4", "q5", "q6"]}
  for split, ids in want.items():
    src = tfds_builder.load_source(data_dir, "queries", split)
    assert [_s(src[i]["id"]) for i in range(len(src))] == ids, split
    assert info["num_queries"][split] == len(ids)
  train = tfds_builder.load_source(data_dir, "queries", "train")
  q0 = train[0]
  assert [_s(t) for t in q0["tags"]] == ["visual", "de"]
  np.testing.assert_array_equal(q0["relevant_index"], [0, 1])
  np.testing.assert_allclose(q0["relevant_grade"], [1.0, 0.1])
  q3 = tfds_builder.load_source(data_dir, "queries", "validation")[0]
  np.testing.assert_array_equal(q3["relevant_index"], [4])  # The I label is not relevant.
  test = tfds_builder.load_source(data_dir, "queries", "test")
  assert _s(test[1]["text"]) == "Katzen Tasse 🐱"


def test_heldout_and_pairs(imported):
  _, data_dir, _ = imported
  products = tfds_builder.load_source(data_dir, "products", "all")
  heldout = {i for i in range(len(products)) if bool(products[i]["heldout"])}
  assert heldout == {0, 2, 5}  # fraction 1.0: every E product of a test query.
  pairs = tfds_builder.load_source(data_dir, "pairs", "train")
  rows = [pairs[i] for i in range(len(pairs))]
  assert [(int(r["query_index"]), int(r["product_index"])) for r in rows] == [(1, 1)]
  np.testing.assert_array_equal(rows[0]["positives"], [1])
  np.testing.assert_array_equal(rows[0]["negatives"], [3])  # q1's I labels, but p2 is held out
  assert _s(rows[0]["query_text"]) == "赤 ワンピース" and float(rows[0]["grade"]) == 1.0
  validation = tfds_builder.load_source(data_dir, "pairs", "validation")
  assert len(validation) == 1 and int(validation[0]["product_index"]) == 4
  assert validation[0]["negatives"].shape == (0,)  # q3's only I label, p2, is held out
  info = tfds_builder.catalog_info(data_dir)
  assert info["num_pairs"] == {"train": 1, "validation": 1}
  assert info["num_heldout"] == 3 and info["num_products"] == 8


def test_tokenizer_trained_on_catalogue(imported):
  _, data_dir, _ = imported
  tok = tokenizer_lib.Tokenizer(str(data_dir / "tokenizer.model"))
  assert 300 <= tok.vocab_size <= 8000
  ids = tok.encode(["赤いワンピース", "Größe 🐱"], max_len=16)
  assert ids.shape == (2, 16) and (ids[:, 0] != tokenizer_lib.UNK_ID).all()
  assert tok.decode(ids) == ["赤いワンピース", "größe 🐱"]  # uncased: NFKC + case folding
  assert sorted(os.listdir(data_dir)) == ["catalog_info.json", "import_summary.json", "mmr_catalog",
                                          "tokenizer.model", "tokenizer.vocab"]


def test_load_source_errors(imported, tmp_path):
  _, data_dir, _ = imported
  with pytest.raises(ValueError, match="unknown split"):
    tfds_builder.load_source(data_dir, "pairs", "test")
  with pytest.raises(ValueError, match="unknown table"):
    tfds_builder.load_source(data_dir, "things", "all")
  with pytest.raises(FileNotFoundError, match="import_catalog"):
    tfds_builder.load_source(tmp_path, "products", "all")
  with pytest.raises(FileNotFoundError, match="catalog_info.json"):
    tfds_builder.catalog_info(tmp_path)


# ------------------------------------------------------------------------------- overwrite


def _tiny(catalog_writer, src, title="first"):
  return catalog_writer(src, [{"id": "p0", "title": title}, {"id": "p1", "title": "other"}],
                        [{"id": "q0", "text": "query", "split": "train"}], [("q0", "p0", "E")])


def _titles(data_dir):
  src = tfds_builder.load_source(data_dir, "products", "all")
  return [_s(src[i]["title"]) for i in range(len(src))]


def test_existing_dataset_needs_overwrite_and_is_replaced_atomically(catalog_writer, tmp_path, monkeypatch):
  out = tmp_path / "data"
  kw = dict(progress=False, verbose=False, vocab_size=300)
  importer.import_catalog(_tiny(catalog_writer, tmp_path / "a"), out, **kw)
  src_b = _tiny(catalog_writer, tmp_path / "b", title="second")
  with pytest.raises(catalog.CatalogError, match="--overwrite"):
    importer.import_catalog(src_b, out, **kw)
  assert _titles(out) == ["first", "other"]

  # A failure half way through leaves the old DATA_DIR untouched and no temp folder behind.
  def boom(*args, **kwargs):
    raise RuntimeError("disk full")
  real_build = tfds_builder.build_table
  monkeypatch.setattr(tfds_builder, "build_table", boom)
  with pytest.raises(RuntimeError, match="disk full"):
    importer.import_catalog(src_b, out, overwrite=True, **kw)
  monkeypatch.setattr(tfds_builder, "build_table", real_build)
  assert _titles(out) == ["first", "other"]
  assert sorted(os.listdir(tmp_path)) == ["a", "b", "data"]

  importer.import_catalog(src_b, out, overwrite=True, **kw)
  assert _titles(out) == ["second", "other"]
  assert tfds_builder.catalog_info(out)["source"] == str((tmp_path / "b").resolve())
  assert sorted(os.listdir(tmp_path)) == ["a", "b", "data"]


def test_overwrite_through_a_symlinked_data_dir_replaces_the_target(catalog_writer, tmp_path):
  kw = dict(progress=False, verbose=False, vocab_size=300)
  (tmp_path / "disk2").mkdir()
  target, link = tmp_path / "disk2" / "data", tmp_path / "data"
  importer.import_catalog(_tiny(catalog_writer, tmp_path / "a"), target, **kw)
  link.symlink_to(target)
  importer.import_catalog(_tiny(catalog_writer, tmp_path / "b", title="second"), link, overwrite=True, **kw)
  assert link.is_symlink() and link.resolve() == target.resolve()
  assert _titles(link) == ["second", "other"]
  assert sorted(os.listdir(tmp_path)) == ["a", "b", "data", "disk2"] and os.listdir(tmp_path / "disk2") == ["data"]


def test_refuses_unsafe_outputs(catalog_writer, tmp_path):
  src = _tiny(catalog_writer, tmp_path / "src")
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("keep me")
  with pytest.raises(catalog.CatalogError, match="not empty"):
    importer.import_catalog(src, other, overwrite=True, progress=False, verbose=False)
  assert (other / "notes.txt").read_text() == "keep me"
  with pytest.raises(catalog.CatalogError, match="inside the output"):
    importer.import_catalog(src, tmp_path, overwrite=True, progress=False, verbose=False)
  empty = tmp_path / "empty"
  empty.mkdir()
  importer.import_catalog(src, empty, progress=False, verbose=False, vocab_size=300)
  assert _titles(empty) == ["first", "other"]


def test_empty_splits_read_as_empty_sources(catalog_writer, tmp_path):
  out = tmp_path / "data"
  importer.import_catalog(_tiny(catalog_writer, tmp_path / "src"), out, progress=False, verbose=False,
                          vocab_size=300)
  info = tfds_builder.catalog_info(out)
  assert info["num_queries"]["test"] == 0 and info["num_pairs"]["validation"] == 0
  for table, split in [("queries", "test"), ("queries", "test_novel_product"), ("pairs", "validation")]:
    src = tfds_builder.load_source(out, table, split)
    assert len(src) == 0 and list(src) == []
    with pytest.raises(IndexError):
      src[0]
  assert len(tfds_builder.load_source(out, "pairs", "train")) == 1


def test_cli(catalog_writer, tmp_path):
  src = _tiny(catalog_writer, tmp_path / "src")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  run = lambda *args: subprocess.run([sys.executable, "-m", "mmr_jax.data.import_catalog", *args],
                                     capture_output=True, text=True, env=env, timeout=120)
  assert "--novel_product_fraction" in run("--help").stdout
  os.remove(src / "queries.jsonl")
  result = run(str(src), "--out", str(tmp_path / "data"))
  assert result.returncode == 2 and "queries.jsonl" in result.stderr
  assert not (tmp_path / "data").exists()
  _tiny(catalog_writer, src)
  result = run(str(src), "--out", str(tmp_path / "data"), "--vocab_size", "300", "--pair_grades", "E,S",
               "--no_progress")
  assert result.returncode == 0, result.stderr
  assert "products: 2" in result.stdout
  assert tfds_builder.catalog_info(tmp_path / "data")["pair_grades"] == ["E", "S"]


def test_beam_import_runs_in_its_own_venv():
  """tools/test.sh builds .venv-beam (the beam extra) and names its python: the Beam test runs there, not skipped."""
  beam_python = os.environ.get("MMR_BEAM_PYTHON")
  if not beam_python:
    pytest.skip("MMR_BEAM_PYTHON not set: tools/test.sh sets it after building .venv-beam")
  root = pathlib.Path(__file__).resolve().parents[2]
  proc = subprocess.run([beam_python, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         "tests/data/test_import.py::test_beam_products_match_in_process_import"],
                        cwd=root, env=dict(os.environ, MMR_REQUIRE_BEAM="1"), capture_output=True, text=True)
  assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_beam_products_match_in_process_import(imported, tmp_path, monkeypatch):
  if os.environ.get("MMR_REQUIRE_BEAM") == "1":  # run from .venv-beam (test above): it must not skip
    import apache_beam  # pylint: disable=g-import-not-at-top,unused-import
  pytest.importorskip("apache_beam")
  src, data_dir, summary = imported
  monkeypatch.setattr(tfds_builder, "BEAM_ROWS_PER_CHUNK", 3)  # Several chunks, out of order.
  out = tmp_path / "beam"
  beam_summary = importer.import_catalog(src, out, novel_product_fraction=1.0, seed=0, image_max_side=64,
                                         vocab_size=8000, progress=False, verbose=False,
                                         beam_runner="DirectRunner")
  assert beam_summary == summary
  a = tfds_builder.load_source(data_dir, "products", "all")
  b = tfds_builder.load_source(out, "products", "all")
  assert len(a) == len(b)
  for i in range(len(a)):
    assert a[i].keys() == b[i].keys()
    for k in a[i]:
      assert a[i][k] == b[i][k], (i, k)
  assert sorted(os.listdir(out)) == sorted(os.listdir(data_dir))  # No Beam leftovers.


def test_ground_truth_is_carried_over(catalog_writer, tmp_path):
  src = _tiny(catalog_writer, tmp_path / "src")
  (src / "ground_truth.jsonl").write_text('{"id": "p0", "colour": "red"}\n', encoding="utf-8")
  importer.import_catalog(src, tmp_path / "data", progress=False, verbose=False, vocab_size=300)
  assert (tmp_path / "data" / "ground_truth.jsonl").read_text(encoding="utf-8") == '{"id": "p0", "colour": "red"}\n'
