"""A catalogue nothing like the synthetic one, through the documented commands.

Furniture, electronics and groceries in Chinese, Japanese, Arabic, German and emoji; images in the
awkward variants real catalogues hold (alpha, palette, 16-bit, CMYK, progressive, EXIF-rotated,
WebP, GIF, a PNG named .jpg, truncated files); labels with the mistakes real exports make. Each test
guards a promise of README's "Bring your own catalogue", evaluation or ablation sections.
"""

import io
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time
import types
import unicodedata

import numpy as np
import pytest
from PIL import Image

from conftest import suggested_overrides
from mmr_jax import ablation
from mmr_jax import config as config_lib
from mmr_jax.data import catalog
from mmr_jax.data import import_catalog as importer
from mmr_jax.data import pipeline
from mmr_jax.data import tfds_builder
from mmr_jax.data import tokenizer as tokenizer_lib
from mmr_jax.evals import embedding
from mmr_jax.evals import report
from mmr_jax.evals import retrieval
from mmr_jax import evaluate

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _photo(w, h, seed=0):
  """Returns a smooth RGB test image (smooth so JPEG round trips stay close)."""
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.random.default_rng(seed).integers(0, 128, 3)
  return Image.fromarray(np.stack([(base[c] + xx * (c + 1) + yy * (3 - c)) % 256 for c in range(3)],
                                  -1).astype(np.uint8))


def _save(fmt, **kw):
  def write(img, path):
    img.save(path, fmt, **kw)
  return write


def _rgba(path):
  a = np.asarray(_photo(40, 30).convert("RGBA")).copy()
  a[..., 3] = 0  # Transparent everywhere but a centre patch: a cut-out product shot.
  a[10:20, 10:30, 3] = 255
  Image.fromarray(a).save(path)


def _palette_transparent(path):
  img = _photo(30, 30, 1).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
  img.save(path, transparency=0)


def _png16(path):
  Image.fromarray(np.linspace(0, 65535, 24 * 32).reshape(24, 32).astype(np.uint16)).save(path)


def _exif_rotated(path):
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees (phone photo held upright).
  _photo(40, 20, 2).save(path, "JPEG", exif=exif.tobytes())


def _gif(path):
  frames = [_photo(24, 24, s).convert("P") for s in range(3)]
  frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)


def _truncated(path):
  buf = io.BytesIO()
  _photo(64, 64, 3).save(buf, "JPEG")
  path.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])


# image path -> (writer(path), kept with has_image, decoded (width, height) at image_max_side=32 or None)
IMAGES = {
    "images/rgba.png": (_rgba, True, (32, 24)),
    "images/palette.png": (lambda p: _photo(30, 30, 4).convert("P").save(p), True, (30, 30)),
    "images/palette_t.png": (_palette_transparent, True, (30, 30)),
    "images/png16.png": (_png16, True, (32, 24)),
    "images/la.png": (lambda p: _photo(20, 20, 5).convert("LA").save(p), True, (20, 20)),
    "images/bit1.png": (lambda p: _photo(20, 20, 6).convert("1").save(p), True, (20, 20)),
    "images/gray.jpg": (lambda p: _photo(20, 16, 7).convert("L").save(p, "JPEG"), True, (20, 16)),
    "images/cmyk.jpg": (lambda p: _photo(20, 16, 8).convert("CMYK").save(p, "JPEG", quality=95), True, (20, 16)),
    "images/progressive.jpg": (lambda p: _photo(48, 36, 9).save(p, "JPEG", progressive=True), True, (32, 24)),
    "images/exif6.jpg": (_exif_rotated, True, (16, 32)),  # 40x20 stored, portrait after rotation.
    "images/tiny8.png": (lambda p: _photo(8, 8, 10).save(p), True, (8, 8)),
    "images/tall.png": (lambda p: _photo(2, 300, 11).save(p), True, (1, 32)),
    "images/photo.webp": (lambda p: _photo(24, 24, 12).save(p, "WEBP"), True, (24, 24)),
    "images/anim.gif": (_gif, True, (24, 24)),
    "images/photo.bmp": (lambda p: _photo(24, 20, 13).save(p, "BMP"), True, (24, 20)),
    "images/UPPER.JPG": (lambda p: _photo(24, 20, 14).save(p, "JPEG"), True, (24, 20)),
    "images/sub dir/椅子 1.jpg": (lambda p: _photo(24, 20, 15).save(p, "JPEG"), True, (24, 20)),
    "images/actually_png.jpg": (lambda p: _photo(24, 24, 16).save(p, "PNG"), True, (24, 24)),
    "images/truncated.jpg": (_truncated, False, None),
    "images/empty.jpg": (lambda p: p.write_bytes(b""), False, None),
    "images/": (None, False, None),  # A directory, not a file.
    "images/missing.jpg": (None, False, None),
}

TITLES = ["橡木餐桌 1.6米", "北欧布艺沙发 三人位", "无线蓝牙耳机 降噪 🎧", "有机绿茶 250克", "木製チェスト 5段",
          "ワイヤレスマウス 静音", "抹茶 京都宇治産 100g", "４Ｋ液晶テレビ ５５型", "كرسي خشبي للمطبخ", "سماعات لاسلكية",
          "تمر مجهول ١ كغ", "Schreibtisch höhenverstellbar", "Kühlschrank Größe XL", "Bio Müsli Früchte 750 g",
          "Kaffeemaschine mit Mahlwerk ☕", "Bücherregal ÖKO weiß", "USB-C cable 2 m 🔌", "Organic bananas 🍌🍌",
          "Family pack 👨‍👩‍👧‍👦 snacks", "🛋️", "Gewürzregal aus Buche", "Sourdough bread loaf"]
assert len(TITLES) == len(IMAGES)


def _products():
  rows = []
  for i, (title, rel) in enumerate(zip(TITLES, IMAGES)):
    row = {"id": f"SKU-{i:03d}" if i % 4 else 5000 + i, "title": title, "image": rel, "category": "extra field"}
    if i % 3:
      row["description"] = "" if i % 2 else f"beschreibung {i} — الوصف"
      row["attributes"] = {} if i % 5 == 0 else {"颜色": "黑色", "Größe": [36, 38], "bio": True}
    rows.append(row)
  return rows


def _pid(i):
  return str(5000 + i) if i % 4 == 0 else f"SKU-{i:03d}"


QUERIES = [("餐桌", "train", [0, 1]), ("耳机", "train", [2]), ("お茶", "train", [3, 6]), ("チェスト", "train", [4]),
           ("كرسي", "train", [8]), ("Schreibtisch", "train", [11]), ("kühlschrank", "train", [12]),
           ("usb c", "train", [16]), ("bananas 🍌", "train", [17]), ("Müsli", "train", [13]),
           ("マウス", "validation", [5]), ("تمر", "validation", [10]),
           ("テレビ", "test", [7]), ("Kaffee", "test", [14]), ("Regal", "test", [15, 20]), ("سماعات", "test", [9]),
           ("sofa 🛋️", "test", [19, 1]), ("snacks", "test", [18]), ("bread", "test", [21]), ("no labels", "test", [])]


def write_unseen_catalog(src: pathlib.Path) -> pathlib.Path:
  """Returns src after writing the awkward multilingual catalogue folder."""
  for rel, (writer, _, _) in IMAGES.items():
    path = src / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if writer is not None:
      writer(path)
  with open(src / "products.jsonl", "w", encoding="utf-8", newline="") as f:
    f.write("\ufeff")  # Windows editors' BOM.
    for i, row in enumerate(_products()):
      f.write(json.dumps(row, ensure_ascii=i % 2 == 0) + ("\r\n" if i % 3 == 0 else "\n"))
  with open(src / "queries.jsonl", "w", encoding="utf-8") as f, open(src / "qrels.tsv", "w", encoding="utf-8") as g:
    g.write("query_id\tproduct_id\tgrade\n")
    for q, (text, split, labels) in enumerate(QUERIES):
      f.write(json.dumps({"id": f"q{q}", "text": text, "split": split, "tags": ["多语言"] if q % 2 else []},
                         ensure_ascii=False) + "\n")
      for j, p in enumerate(labels):
        g.write(f"q{q}\t{_pid(p)}\t{'E' if j == 0 else 'substitute'}\n")
    g.write(f"q0\t{_pid(0)}\tS\n")  # Conflicts with the E above.
    g.write("q0\tSKU-UNKNOWN\tE\n")
  return src


@pytest.fixture(scope="module")
def unseen(tmp_path_factory):
  """Returns (src, data_dir, summary); DATA_DIR's path holds a comma and a space, as user paths may."""
  root = tmp_path_factory.mktemp("unseen")
  src = write_unseen_catalog(root / "src")
  data_dir = root / "catalogue, v2" / "data"
  summary = importer.import_catalog(src, data_dir, image_max_side=32, vocab_size=300, progress=False,
                                    verbose=False)
  return src, data_dir, summary


def _s(v):
  return v.decode("utf-8") if isinstance(v, bytes) else v


def test_awkward_images_are_decoded_or_counted(unseen):
  _, data_dir, summary = unseen
  products = tfds_builder.load_source(data_dir, "products", "all")
  assert len(products) == len(IMAGES)
  for i, (rel, (_, kept, size)) in enumerate(IMAGES.items()):
    row = products[i]
    assert bool(row["has_image"]) == kept, rel
    if kept:
      img = Image.open(io.BytesIO(row["image"]))
      assert (img.format, img.mode, img.size) == ("JPEG", "RGB", size), rel
  pixels = lambda rel: np.asarray(Image.open(io.BytesIO(products[list(IMAGES).index(rel)]["image"]))).astype(int)
  assert (pixels("images/rgba.png")[0, 0] > 240).all()  # Transparency composited on white.
  assert 80 < pixels("images/png16.png").mean() < 170  # 16-bit scaled to 8 bits, not clipped to white.
  cmyk = pixels("images/cmyk.jpg")
  assert np.abs(cmyk - np.asarray(_photo(20, 16, 8)).astype(int)).mean() < 12  # Colours survive CMYK.
  skipped = summary["skipped"]
  corrupt = skipped[catalog.IMAGE_CORRUPT]
  assert len(corrupt) == 2 and "images/truncated.jpg" in corrupt[0] and "images/empty.jpg" in corrupt[1]
  assert any("images/: is a directory" in r for r in skipped[catalog.IMAGE_MISSING])
  assert any("images/missing.jpg: file not found" in r for r in skipped[catalog.IMAGE_MISSING])
  assert summary["products_with_image"] == sum(kept for _, kept, _ in IMAGES.values())


def test_multilingual_text_round_trips(unseen):
  _, data_dir, summary = unseen
  products = tfds_builder.load_source(data_dir, "products", "all")
  assert [_s(products[i]["title"]) for i in range(len(products))] == TITLES
  assert _s(products[0]["id"]) == "5000"  # Numeric ids become text, as qrels.tsv spells them.
  test = tfds_builder.load_source(data_dir, "queries", "test")
  assert [_s(test[i]["text"]) for i in range(len(test))] == [q for q, s, _ in QUERIES if s == "test"]
  assert summary["skipped_counts"][catalog.DUPLICATE_QREL] == 1
  assert summary["skipped_counts"][catalog.UNKNOWN_PRODUCT] == 1


def test_vocabulary_grows_to_hold_the_catalogue_characters(unseen, tmp_path):
  _, data_dir, _ = unseen
  info = tfds_builder.catalog_info(data_dir)
  # 300 pieces cannot hold this catalogue's Han, kana, Arabic, umlaut and emoji characters plus the
  # 260 byte/special pieces: the import grows the vocabulary instead of failing inside SentencePiece.
  assert info["requested_vocab_size"] == 300 and info["vocab_size"] > 300
  with pytest.raises(tokenizer_lib.VocabTooSmallError) as e:
    tokenizer_lib.train_tokenizer(TITLES, str(tmp_path / "tok"), vocab_size=300)
  assert e.value.required > 300 and "vocab_size >=" in str(e.value)
  path = tokenizer_lib.train_tokenizer(TITLES, str(tmp_path / "tok"), vocab_size=e.value.required)
  tok = tokenizer_lib.Tokenizer(path)
  # SentencePiece's NFKC normalisation maps full-width "４Ｋ" to "4K" (lowercased: "4k"); nothing becomes <unk>.
  assert tok.decode(tok.encode(TITLES, max_len=64)) == [unicodedata.normalize("NFKC", t).lower() for t in TITLES]


def test_conflicting_duplicate_label_names_the_grade_kept(unseen):
  _, _, summary = unseen
  ref, = summary["skipped"][catalog.DUPLICATE_QREL]
  assert ref.endswith(f"(q0, {_pid(0)}) already labelled E; this line's S is ignored"), ref


def test_qrels_with_no_usable_line_is_an_error(catalog_writer, tmp_path):
  products = [{"id": "p0", "title": "Tisch"}, {"id": "p1", "title": "椅子"}]
  queries = [{"id": "q0", "text": "tisch", "split": "train"}]
  # Space-separated instead of tab-separated: every label would be dropped, and training find no pairs.
  src = catalog_writer(tmp_path / "spaces", products, queries, ["q0 p0 E", "q0 p1 S"])
  with pytest.raises(catalog.CatalogError, match=r"qrels.tsv: none of its 2 lines.*malformed_qrel.*<TAB>"):
    catalog.scan_catalog(src)
  # Ids from another export: every product unknown.
  src = catalog_writer(tmp_path / "ids", products, queries, [("q0", "P-0", "E")])
  with pytest.raises(catalog.CatalogError, match="unknown_product"):
    catalog.scan_catalog(src)
  # A header alone is no mistake (labels may come later): nothing to reject.
  src = catalog_writer(tmp_path / "header", products, queries, [])
  assert catalog.scan_catalog(src).num_qrels == 0


def _slow_import(src, out, ready):
  """Starts `mmr_jax.data.import_catalog --overwrite` in a subprocess that stalls (writing `ready`) in the table writing."""
  script = (
      "import pathlib, sys, time\n"
      "from mmr_jax.data import import_catalog as importer, tfds_builder\n"
      "def slow(*args, **kwargs):\n"
      f"  pathlib.Path({str(ready)!r}).write_text('writing')\n"
      "  time.sleep(120)\n"
      "tfds_builder.build_table = slow\n"
      f"sys.exit(importer.main([{str(src)!r}, '--out', {str(out)!r}, '--overwrite', '--no_progress',"
      " '--vocab_size', '300']))\n")
  proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  deadline = time.time() + 120
  while not ready.exists():
    if proc.poll() is not None or time.time() > deadline:
      proc.kill()
      raise AssertionError(f"the import never reached the table writing: {proc.stdout.read().decode()}")
    time.sleep(0.1)
  return proc


def _interrupted_import(catalog_writer, tmp_path):
  """Returns (src, DATA_DIR, its file list, a running re-import of it stalled while writing)."""
  src = catalog_writer(tmp_path / "src", [{"id": "p0", "title": "first"}],
                       [{"id": "q0", "text": "query", "split": "train"}], [("q0", "p0", "E")])
  out = tmp_path / "data"
  importer.import_catalog(src, out, vocab_size=300, progress=False, verbose=False)
  before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
  proc = _slow_import(src, out, tmp_path / "ready")
  return src, out, before, proc


def test_sigterm_during_import_leaves_no_temporary_folder(catalog_writer, tmp_path):
  _, out, before, proc = _interrupted_import(catalog_writer, tmp_path)
  try:
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert rc == 128 + signal.SIGTERM
  assert sorted(os.listdir(tmp_path)) == ["data", "ready", "src"]  # No .data.importing-* left behind.
  assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before


def test_urls_are_refused_before_anything_is_written(catalog_writer, tmp_path, monkeypatch):
  src = catalog_writer(tmp_path / "src", [{"id": "p0", "title": "first"}],
                       [{"id": "q0", "text": "query", "split": "train"}], [("q0", "p0", "E")])
  monkeypatch.chdir(tmp_path)
  with pytest.raises(catalog.CatalogError, match=r"output DATA_DIR 'gs://bucket/data' is a URL"):
    importer.import_catalog(src, "gs://bucket/data", vocab_size=300, progress=False, verbose=False)
  with pytest.raises(catalog.CatalogError, match=r"catalogue folder 's3://bucket/cat' is a URL"):
    importer.import_catalog("s3://bucket/cat", tmp_path / "data", vocab_size=300, progress=False, verbose=False)
  assert sorted(os.listdir(tmp_path)) == ["src"]  # no local ./gs: folder


def test_next_import_removes_what_a_hard_kill_left(catalog_writer, tmp_path):
  src, out, before, proc = _interrupted_import(catalog_writer, tmp_path)
  proc.kill()  # SIGKILL: no handler runs, the temporary folder stays
  proc.wait(timeout=60)
  left = [p for p in tmp_path.iterdir() if p.name.startswith(".data.importing-")]
  assert len(left) == 1 and sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
  assert (left[0] / importer._LOCK_FILE).exists()  # pylint: disable=protected-access
  host = socket.gethostname()
  # A held lock means a live import, whatever its name says (e.g. a container with its own pids).
  locked = tmp_path / f".data.importing-{proc.pid}-abcd1234-{host}"
  # Without a lock file: only a folder naming a process of this host that is gone is stale.
  live = tmp_path / f".data.importing-{os.getppid()}-abcd1234-{host}"
  elsewhere = tmp_path / f".data.importing-{proc.pid}-abcd1234-not-{host}"
  odd_name = tmp_path / ".data.importing-\u00b2-abcd1234-x"
  for d in (locked, live, elsewhere, odd_name):
    d.mkdir()
  fd = importer._lock(locked)  # pylint: disable=protected-access
  try:
    importer.import_catalog(src, out, vocab_size=300, progress=False, verbose=False, overwrite=True)
  finally:
    os.close(fd)
  assert not left[0].exists()
  assert locked.exists() and live.exists() and elsewhere.exists() and odd_name.exists()
  assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
  assert not (out / importer._LOCK_FILE).exists()  # pylint: disable=protected-access


def _pipeline_config(data_dir, **kw):
  cfg = config_lib.base_config().data
  cfg.update(dict(dir=str(data_dir), batch_size=2, image_size=16, query_len=8, product_len=8, title_len=8,
                  num_workers=0, **kw))
  return cfg


def test_stage1_without_a_usable_product_fails_instead_of_waiting_forever(catalog_writer, tmp_path, caplog):
  products = [{"id": f"p{i}", "title": t} for i, t in enumerate(["Tisch", "椅子", "كرسي"])]
  queries = [{"id": f"t{i}", "text": p["title"], "split": "test"} for i, p in enumerate(products)]
  src = catalog_writer(tmp_path / "src", products, queries, [(f"t{i}", f"p{i}", "E") for i in range(3)])
  held = tmp_path / "held"
  importer.import_catalog(src, held, novel_product_fraction=1.0, vocab_size=300, progress=False, verbose=False)
  with pytest.raises(ValueError, match="all 3 products are held out"):
    pipeline.make_train_iterator(str(held), 1, _pipeline_config(held), seed=0, process_index=0, process_count=1)
  plain = tmp_path / "plain"  # No product has an image.
  importer.import_catalog(src, plain, novel_product_fraction=0.0, vocab_size=300, progress=False, verbose=False)
  with pytest.raises(ValueError, match="stage1_skip_no_image") as error:
    pipeline.make_train_iterator(str(plain), 1, _pipeline_config(plain, stage1_skip_no_image=True), seed=0,
                                 process_index=0, process_count=1)
  assert suggested_overrides(str(error.value)) == [("data.stage1_skip_no_image", "True")]  # a valid --config. flag
  with caplog.at_level("WARNING"):
    it = pipeline.make_train_iterator(str(plain), 1, _pipeline_config(plain), seed=0, process_index=0,
                                      process_count=1)
  assert not next(it)["has_image"].any()  # Kept (masked in the loss) when images are not required.
  assert "no product has an image" in caplog.text  # ... and the run says stage 1 has nothing to learn


def _random_results(num_products, labels, tags=None):
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  products = unit(rng.normal(size=(num_products, 8))).astype(np.float32)
  queries = unit(rng.normal(size=(len(labels), 8))).astype(np.float32)
  return retrieval.evaluate_embeddings(
      products, {"test": {"emb": queries, "labels": labels, "tags": tags or [[] for _ in labels]}},
      np.arange(num_products))


def test_catalogue_smaller_than_the_cutoffs_reports_every_metric():
  res = _random_results(30, [{0: 1.0, 7: 1.0}, {3: 1.0, 4: 0.1}, {}])
  r = res["splits"]["test"]
  for name in ("overall", "exact"):
    m = r[name]
    assert {"recall@10", "recall@50", "recall@100", "ndcg@10", "mrr"} <= set(m), m.keys()
    assert m["recall@50"] == m["recall@100"] == 1.0  # The whole catalogue is ranked.
    assert m["num_queries"] == 3
  assert r["scann_recall_vs_exact"] == 1.0
  md = report.markdown_report(res)
  assert "rank every product" in md and "| test | ScaNN |" in md and "| 100.0 |" in md


def _stub_training(monkeypatch, seen):
  """Replaces training and workdir evaluation by stand-ins that record the config (no JAX work)."""
  from mmr_jax import train  # pylint: disable=g-import-not-at-top

  def fake_train(cfg, workdir):
    seen.append((cfg.stage, cfg.data.dir))
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)

  def fake_evaluate(workdir, data_dir, *args, **kwargs):
    res = _random_results(22, [{0: 1.0}, {5: 1.0, 6: 0.1}], tags=[["多语言"], []])
    (pathlib.Path(workdir) / "metrics.json").write_text(json.dumps(res, default=float))
    return res

  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  monkeypatch.setattr(evaluate, "evaluate_workdir", fake_evaluate)


def test_ablation_takes_any_data_dir_and_explains_small_catalogues(unseen, tmp_path, monkeypatch):
  _, data_dir, _ = unseen
  seen = []
  _stub_training(monkeypatch, seen)
  rows = ablation.run(str(tmp_path / "abl"), str(data_dir), str(ROOT / "configs" / "demo.py"),
                      rows=("text_only", "fusion_ft"), steps=1, stage1_steps=1, batch=4)
  # The comma did not split it. Stage 1, text_only, fusion_ft and the run fusion_ft is chosen against.
  assert seen == [(1, str(data_dir))] + [(2, str(data_dir))] * 3
  assert all(r["overall"]["recall@100"] == 1.0 for r in rows)
  md = (tmp_path / "abl" / "ablation.md").read_text(encoding="utf-8")
  assert f"The catalogue has {len(IMAGES)} products, so R@100 ranks all of them" in md
  assert "nan" not in md
  # The run fusion_ft is chosen against, asked for by name, is a row of its own: nothing chosen.
  rows = ablation.run(str(tmp_path / "abl2"), str(data_dir), str(ROOT / "configs" / "demo.py"),
                      rows=("fusion_ft", "fusion_ft_no_q2f"), steps=1, stage1_steps=1, batch=4)
  assert [r["row"] for r in rows] == ["fusion_ft", "fusion_ft_no_q2f"] and len(seen) == 4 + 3
  assert not any("chosen" in r for r in rows)


def test_ablation_refuses_a_catalogue_without_test_queries_before_training(catalog_writer, tmp_path, monkeypatch):
  src = catalog_writer(tmp_path / "src", [{"id": "p0", "title": "Tisch"}],
                       [{"id": "q0", "text": "tisch", "split": "train"}], [("q0", "p0", "E")])
  data_dir = tmp_path / "data"
  importer.import_catalog(src, data_dir, vocab_size=300, progress=False, verbose=False)
  seen = []
  _stub_training(monkeypatch, seen)
  with pytest.raises(ValueError, match="no test queries"):
    ablation.run(str(tmp_path / "abl"), str(data_dir), str(ROOT / "configs" / "demo.py"), steps=1)
  assert not seen


def test_ablation_without_validation_queries_trains_a_chosen_row_as_configured(catalog_writer, tmp_path,
                                                                                 monkeypatch, caplog):
  src = catalog_writer(tmp_path / "src", [{"id": "p0", "title": "Tisch"}, {"id": "p1", "title": "Stuhl"}],
                       [{"id": "q0", "text": "tisch", "split": "train"}, {"id": "q1", "text": "stuhl", "split": "test"}],
                       [("q0", "p0", "E"), ("q1", "p1", "E")])
  data_dir = tmp_path / "data"
  importer.import_catalog(src, data_dir, vocab_size=300, progress=False, verbose=False)
  seen = []
  _stub_training(monkeypatch, seen)
  rows = ablation.run(str(tmp_path / "abl"), str(data_dir), str(ROOT / "configs" / "demo.py"), rows=("fusion_ft",),
                      steps=1, stage1_steps=1, batch=4)
  # Nothing to choose on: stage 1 and fusion_ft as configured, not the run it would be chosen against.
  assert seen == [(1, str(data_dir)), (2, str(data_dir))] and not (tmp_path / "abl" / "fusion_ft_no_q2f").exists()
  assert "chosen" not in rows[0] and "no validation queries" in caplog.text


def test_evaluate_workdir_without_queries_fails_before_embedding(catalog_writer, tmp_path, monkeypatch):
  src = catalog_writer(tmp_path / "src", [{"id": "p0", "title": "Tisch"}],
                       [{"id": "q0", "text": "tisch", "split": "train"}], [("q0", "p0", "E")])
  data_dir = tmp_path / "data"
  importer.import_catalog(src, data_dir, vocab_size=300, progress=False, verbose=False)
  trained = types.SimpleNamespace(config=types.SimpleNamespace(data=types.SimpleNamespace(dir=str(data_dir))),
                                  mesh=None, step=0)
  monkeypatch.setattr(embedding, "load_trained", lambda workdir, data_dir=None: trained)
  monkeypatch.setattr(retrieval.index_lib.ScannIndex, "build", None)  # Never reached.
  from mmr_jax import sharding  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sharding, "data_parallel_size", lambda mesh: 1)
  with pytest.raises(ValueError, match="no queries in the split"):
    evaluate.evaluate_workdir(str(tmp_path / "wd"), str(data_dir))
  assert not (tmp_path / "wd").exists()


@pytest.mark.slow
def test_unseen_catalogue_trains_evaluates_and_ablates(unseen, tmp_path):
  _, data_dir, _ = unseen
  rows = ablation.run(str(tmp_path / "abl"), str(data_dir), str(ROOT / "configs" / "demo.py"), rows=("fusion_ft",),
                      steps=2, stage1_steps=2, batch=8, config_arg="runlocal=True",
                      overrides={"train.eval_every": 0})  # No validation compiles: keeps it under a minute.
  row, bm25, hybrid = rows
  assert (bm25["row"], hybrid["row"], hybrid["learned_row"]) == ("bm25", "hybrid", "fusion_ft")
  assert row["overall"]["num_queries"] == bm25["overall"]["num_queries"] == sum(s == "test" for _, s, _ in QUERIES)
  assert set(bm25["by_tag"]) == set(row["by_tag"])  # keyword search scored on the same tags, any script
  assert 0 <= row["overall"]["ndcg@10"] <= 1 and row["overall"]["recall@100"] == 1.0
  assert "多语言" in row["by_tag"]
  metrics = json.loads((tmp_path / "abl" / "fusion_ft" / "metrics.json").read_text())
  assert metrics["num_products"] == len(IMAGES)
