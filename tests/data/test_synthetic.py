"""Tests for the synthetic catalogue (mmr_jax/data/synthetic/) and make_synthetic."""

import collections
import filecmp
import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from mmr_jax.data import synthetic

N = 300
CFG = synthetic.SyntheticConfig(num_products=N, image_size=32, min_queries=60, second_language_rate=0.2,
                                seed=3)


def _read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _read_qrels(path):
  with open(path, encoding="utf-8") as f:
    return [tuple(line.rstrip("\n").split("\t")) for line in f]


def _words(text):
  return set(re.findall(r"[\w'-]+", text.lower()))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic")
  stats = synthetic.generate_folder(out, CFG, progress=False)
  gt = synthetic.read_ground_truth(out / "ground_truth.jsonl")
  products = {p["id"]: p for p in _read_jsonl(out / "products.jsonl")}
  queries = {q["id"]: q for q in _read_jsonl(out / "queries.jsonl")}
  qrels = _read_qrels(out / "qrels.tsv")
  return out, stats, gt, products, queries, qrels


def _image(out, product):
  return np.asarray(Image.open(out / product["image"]).convert("RGB"), np.float32)


def _color_fraction(image, color, dist=40.0):
  """Fraction of pixels within `dist` (RGB euclidean) of the named palette colour."""
  return float((np.linalg.norm(image - np.asarray(synthetic.COLORS[color], np.float32), axis=-1) < dist).mean())


def test_files_and_schema(folder):
  out, stats, gt, products, queries, qrels = folder
  assert len(products) == N and list(gt) == list(products)
  for p in products.values():
    assert set(p) == {"id", "title", "description", "attributes", "image", "language"}
    assert p["title"].strip() and isinstance(p["attributes"], dict)
    assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in p["attributes"].items())
    img = Image.open(out / p["image"])
    assert img.size == (CFG.image_size, CFG.image_size) and img.mode == "RGB"
  assert {q["split"] for q in queries.values()} == {"train", "validation", "test"}
  assert stats["num_products"] == N and sum(stats["num_queries"].values()) == len(queries)


def test_deterministic_and_seed_dependent(folder, tmp_path):
  out = folder[0]
  again = tmp_path / "again"
  synthetic.generate_folder(again, CFG, progress=False)
  names = ["products.jsonl", "queries.jsonl", "qrels.tsv", "ground_truth.jsonl"]
  names += [f"images/{f}" for f in sorted(os.listdir(out / "images"))]
  assert sorted(os.listdir(again / "images")) == sorted(os.listdir(out / "images"))
  match, mismatch, errors = filecmp.cmpfiles(out, again, names, shallow=False)
  assert not mismatch and not errors and len(match) == len(names)

  other = tmp_path / "other"
  synthetic.generate_folder(other, synthetic.SyntheticConfig(**{**CFG.__dict__, "seed": 4}), progress=False)
  for name in ("products.jsonl", "queries.jsonl", "qrels.tsv"):
    assert (out / name).read_bytes() != (other / name).read_bytes()
  differing = sum((out / "images" / f).read_bytes() != (other / "images" / f).read_bytes()
                  for f in sorted(os.listdir(out / "images"))[:20])
  assert differing == 20


def test_products_do_not_depend_on_catalogue_size(folder, tmp_path):
  out = folder[0]
  small = tmp_path / "small"
  synthetic.generate_folder(small, synthetic.SyntheticConfig(**{**CFG.__dict__, "num_products": 50}),
                            progress=False)
  big_lines = (out / "products.jsonl").read_text(encoding="utf-8").splitlines()[:50]
  assert (small / "products.jsonl").read_text(encoding="utf-8").splitlines() == big_lines
  assert (small / "images" / "p000007.png").read_bytes() == (out / "images" / "p000007.png").read_bytes()


def test_named_colour_is_in_the_pixels(folder):
  out, _, gt, products, queries, qrels = folder
  images = {pid: _image(out, p) for pid, p in products.items()}
  # Per colour: products whose body has it vs. products that have it nowhere.
  background = {}
  for color in synthetic.COLORS:
    pos = [_color_fraction(images[i], color) for i in gt if gt[i]["primary_color"] == color]
    neg = [_color_fraction(images[i], color) for i in gt
           if color not in (gt[i]["primary_color"], gt[i]["secondary_color"])]
    assert len(pos) >= 5, color
    assert np.mean(pos) > 0.06 and np.mean(pos) > 5 * np.mean(neg), (color, np.mean(pos), np.mean(neg))
    assert np.mean(np.asarray(pos) > 0.01) >= 0.95, color
    background[color] = np.mean(neg)

  # Visual queries: their E products really show the query colour.
  by_query = collections.defaultdict(list)
  for qid, pid, grade in qrels:
    if grade == "E":
      by_query[qid].append(pid)
  checked = 0
  for qid, q in queries.items():
    named = [c for c in synthetic.COLORS if c in _words(q["text"]) or (c == "grey" and "gray" in _words(q["text"]))]
    if "visual" not in q["tags"] or len(named) != 1:
      continue
    fracs = [_color_fraction(images[p], named[0]) for p in by_query[qid]]
    assert all(f > 0.005 for f in fracs), (q, fracs)
    assert np.mean(fracs) > max(0.015, 2 * background[named[0]]), (q, fracs)
    checked += 1
  assert checked >= 10


def test_noisy_text_names_a_colour_the_image_lacks(folder):
  out, _, gt, products, _, _ = folder
  noisy = [i for i in gt if gt[i]["noisy"]]
  assert noisy, "expected some noisy products at noise_rate=0.05 and 300 products"
  for i in noisy:
    g = gt[i]
    assert g["text_color"] not in (g["primary_color"], g["secondary_color"])
    img = _image(out, products[i])
    assert _color_fraction(img, g["primary_color"]) > _color_fraction(img, g["text_color"])
    title_words = _words(products[i]["title"])
    assert synthetic.words_for(g["language"], "color", g["text_color"]).lower() in title_words


def test_patterns_show_the_secondary_colour(folder):
  out, _, gt, products, _, _ = folder
  frac = collections.defaultdict(list)
  for i, g in gt.items():
    frac[g["pattern"]].append(_color_fraction(_image(out, products[i]), g["secondary_color"]))
  for pattern in ("striped", "dotted", "checked", "floral"):
    assert np.mean(frac[pattern]) > 1.8 * np.mean(frac["solid"]), (pattern, np.mean(frac[pattern]))


def test_sparse_titles_omit_visible_attributes(folder):
  _, stats, gt, products, _, _ = folder
  color_words = set().union(*synthetic.color_words().values())
  pattern_words = {w.lower() for lang in synthetic.WORDS for k, w in synthetic.WORDS[lang]["pattern"].items()
                   if k != "solid"}
  sparse = [i for i in gt if gt[i]["sparse_title"]]
  assert abs(len(sparse) / N - CFG.sparsity_rate) < 0.1
  assert stats["sparse_fraction"] == len(sparse) / N
  for i in sparse:
    p = products[i]
    text = " ".join([p["title"], p["description"], *p["attributes"].values()]).lower()
    assert not (_words(text) & color_words), (p, _words(text) & color_words)
    assert not any(w in text for w in pattern_words), p
    style = synthetic.words_for(gt[i]["language"], "style", gt[i]["style"]).lower()
    assert style not in text, p
    assert synthetic.words_for(gt[i]["language"], "category", gt[i]["category"]).lower() in p["title"].lower()
  # Non-sparse titles name the colour their text claims (the true one unless noisy).
  for i, g in gt.items():
    if not g["sparse_title"]:
      assert synthetic.words_for(g["language"], "color", g["text_color"]).lower() in _words(products[i]["title"])
      if not g["noisy"]:
        assert g["text_color"] == g["primary_color"]


def test_text_only_attributes_appear_in_text(folder):
  _, _, gt, products, _, _ = folder
  empty = 0
  for i, g in gt.items():
    p = products[i]
    text = " ".join([p["title"], p["description"], *p["attributes"].values()]).lower()
    for attr in ("material", "care", "size"):
      assert synthetic.words_for(g["language"], attr, g[attr]).lower() in text, (attr, g, p)
    empty += p["description"] == ""
  assert 0 < empty < N  # descriptions are sometimes empty, not always


def test_second_language_rate(folder):
  _, stats, gt, products, _, _ = folder
  langs = collections.Counter(p["language"] for p in products.values())
  assert set(langs) <= {"en", *CFG.second_languages}
  other = N - langs["en"]
  sd = np.sqrt(N * CFG.second_language_rate * (1 - CFG.second_language_rate))
  assert abs(other - N * CFG.second_language_rate) < 4 * sd
  assert all(langs[l] > 0 for l in CFG.second_languages)
  # A German product's text is German: its category word is the German one.
  de = next(i for i in gt if gt[i]["language"] == "de")
  assert synthetic.WORDS["de"]["category"][gt[de]["category"]].lower() in products[de]["title"].lower()


def test_qrels_are_valid_and_every_query_has_an_exact_match(folder):
  _, _, gt, products, queries, qrels = folder
  assert all(g in "ESCI" and len(g) == 1 for _, _, g in qrels)
  assert all(q in queries and p in products for q, p, _ in qrels)
  assert len({(q, p) for q, p, _ in qrels}) == len(qrels)  # no pair labelled twice
  e_count = collections.Counter(q for q, _, g in qrels if g == "E")
  assert all(e_count[qid] >= 1 for qid in queries)
  for qid, q in queries.items():
    if q["split"] == "train":
      assert e_count[qid] <= CFG.train_positives_per_query


def test_grades_follow_latent_attributes(folder):
  _, _, gt, _, _, qrels = folder
  ids = list(gt)
  queries, rows, _ = synthetic.generate_queries(list(gt.values()), ids, CFG)
  assert [(q, p, g) for q, p, g in rows] == qrels  # same seed, same labels
  attrs = {q["id"]: q["_attrs"] for q in queries}
  for qid, pid, grade in qrels:
    q, g = attrs[qid], gt[pid]
    off = sum(g[a] != v for a, v in q.items() if a != "category")
    if grade == "E":
      assert g["category"] == q["category"] and off == 0
    elif grade == "S":
      assert g["category"] == q["category"] and off == 1
      if len(q) == 2:  # one attribute: only a near value is a substitute (pink for red, not blue)
        (a, v), = [(a, v) for a, v in q.items() if a != "category"]
        assert g[a] in synthetic.NEIGHBOURS.get(a, {}).get(v, ()), (q, g[a])
    elif grade == "C":
      assert g["category"] in synthetic.COMPLEMENTS[q["category"]]
      assert "primary_color" not in q or g["primary_color"] == q["primary_color"]
    else:
      assert g["category"] != q["category"] or off >= 1
  # The query text names the attributes it was built from.
  for q in queries:
    text = q["text"]
    if "primary_color" in q["_attrs"]:
      assert any(w in text for w in synthetic.QUERY_COLOR[q["_attrs"]["primary_color"]])
    if "material" in q["_attrs"]:
      assert q["_attrs"]["material"] in text


def test_query_kinds_tags_and_novelty(folder):
  _, stats, gt, _, queries, qrels = folder
  tags = collections.Counter(t for q in queries.values() for t in q["tags"])
  assert tags["visual"] and tags["textual"] and tags["mixed"]
  assert tags["sparse_text"] > 0
  sparse_e = collections.defaultdict(list)
  for qid, pid, g in qrels:
    if g == "E":
      sparse_e[qid].append(gt[pid]["sparse_title"])
  for qid, q in queries.items():
    assert ("sparse_text" in q["tags"]) == (np.mean(sparse_e[qid]) > 0.5)
  # Visual queries often need the image: many have sparse-titled exact matches.
  visual = [qid for qid, q in queries.items() if "visual" in q["tags"]]
  assert np.mean([any(sparse_e[qid]) for qid in visual]) > 0.3

  # Novel combinations: tagged test queries whose (category, colour) pair no train/validation query uses.
  queries_full, _, _ = synthetic.generate_queries(list(gt.values()), list(gt), CFG)
  held = {tuple(c.split("/")) for c in stats["novel_combinations"]}
  novel = [q for q in queries_full if "novel_combination" in q["tags"]]
  assert novel and all(q["split"] == "test" for q in novel)
  for q in queries_full:
    pair = (q["_attrs"]["category"], q["_attrs"].get("primary_color"))
    assert (pair in held) == ("novel_combination" in q["tags"]), q
  # Some test queries repeat a train query's text (so the importer's novel-query split is a proper subset).
  train_texts = {q["text"] for q in queries.values() if q["split"] == "train"}
  test_texts = [q["text"] for q in queries.values() if q["split"] == "test"]
  assert 0 < sum(t in train_texts for t in test_texts) < len(test_texts)


def test_train_labels_are_scarce():
  cfg = synthetic.SyntheticConfig(num_products=5000, image_size=32)
  gts = [synthetic.sample_latents(np.random.default_rng([cfg.seed, 1, i]), cfg) for i in range(cfg.num_products)]
  queries, qrels, stats = synthetic.generate_queries(gts, [f"p{i}" for i in range(len(gts))], cfg)
  assert len(queries) == cfg.total_queries == 400
  assert stats["train_label_coverage"] < 0.4
  assert len(qrels) < 3 * cfg.num_products
  assert stats["truncated_queries"] == 0


def test_config_validation_names_the_field():
  with pytest.raises(ValueError, match="sparsity_rate"):
    synthetic.SyntheticConfig(sparsity_rate=1.5)
  with pytest.raises(ValueError, match="split_fractions"):
    synthetic.SyntheticConfig(split_fractions=(0.5, 0.1, 0.1))
  with pytest.raises(ValueError, match="second_languages"):
    synthetic.SyntheticConfig(second_languages=("fr",))
  with pytest.raises(KeyError, match="tiny"):
    synthetic.preset("nope")
  assert synthetic.preset("large").num_products >= 100_000


def test_encode_png_round_trips():
  img = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
  back = np.asarray(Image.open(io.BytesIO(synthetic.encode_png(img))))
  np.testing.assert_array_equal(back, img)


def test_make_synthetic_cli_help(capsys):
  from mmr_jax.data import make_synthetic  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as e:
    make_synthetic.main(["--help"])
  assert e.value.code == 0
  assert "--num_products" in capsys.readouterr().out


def test_make_synthetic_writes_a_valid_data_dir(tmp_path):
  from mmr_jax.data import make_synthetic  # pylint: disable=g-import-not-at-top
  out = tmp_path / "data"
  rc = make_synthetic.main(["--out", str(out), "--preset", "tiny", "--seed", "1", "--no_progress",
                            "--vocab_size", "500"])
  assert rc == 0
  summary = json.loads((out / "import_summary.json").read_text())
  assert summary["skipped"] == {} and summary["products"] == 300
  assert summary["products_with_image"] == 300
  info = json.loads((out / "catalog_info.json").read_text())
  nq = info["num_queries"]
  assert nq["train"] > 0 and nq["validation"] > 0 and nq["test"] > 0
  assert 0 < nq["test_novel_query"] < nq["test"]
  gt = synthetic.read_ground_truth(out / "ground_truth.jsonl")
  assert len(gt) == 300
  syn = json.loads((out / make_synthetic.INFO_FILE).read_text())
  assert syn["config"]["seed"] == 1
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # temporary folder removed
  # A second run into the same DATA_DIR needs --overwrite (the importer's rule), reported as an error.
  assert make_synthetic.main(["--out", str(out), "--preset", "tiny", "--no_progress"]) == 2
