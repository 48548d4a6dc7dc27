"""Tests for mmr_jax.data.pipeline (grain) over a tiny imported DATA_DIR."""

import io
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from conftest import suggested_overrides
from mmr_jax import batch_spec
from mmr_jax import config as config_lib
from mmr_jax.data import catalog
from mmr_jax.data import pipeline
from mmr_jax.data import sources
from mmr_jax.data import tfds_builder
from mmr_jax.data import tokenizer as tokenizer_lib
from mmr_jax.data import transforms

NUM_PRODUCTS = 40
NUM_QUERIES = 24
NO_IMAGE = 5  # product without an image
IMAGE_SIZE = 16
WORDS = ["rouge", "écharpe", "laine", "日本", "кружка", "bottle", "lamp", "sofa"]


def _write_folder(src: pathlib.Path) -> None:
  """Writes a tiny catalogue folder: odd-sized photos in mixed modes."""
  (src / "images").mkdir(parents=True)
  rng = np.random.default_rng(0)
  with open(src / "products.jsonl", "w", encoding="utf-8") as f:
    for i in range(NUM_PRODUCTS):
      obj = {"id": f"p{i}", "title": f"{WORDS[i % 8]} item {i}",
             "description": " ".join(WORDS[(i + k) % 8] for k in range(i % 5)),
             "attributes": {"colour": WORDS[i % 3]}}
      if i != NO_IMAGE:
        w, h = int(rng.integers(20, 90)), int(rng.integers(20, 90))
        arr = np.full((h, w, 3), (i * 10) % 256, np.uint8)
        arr[:, : w // 3] = 255  # asymmetric, so a flip is visible
        img = Image.fromarray(arr)
        img = img.convert("L") if i % 7 == 1 else img
        img.save(src / "images" / f"p{i}.png")
        obj["image"] = f"images/p{i}.png"
      f.write(json.dumps(obj, ensure_ascii=False) + "\n")
  with open(src / "queries.jsonl", "w", encoding="utf-8") as f, \
      open(src / "qrels.tsv", "w", encoding="utf-8") as g:
    for q in range(NUM_QUERIES):
      split = "train" if q < 16 else ("validation" if q < 19 else "test")
      f.write(json.dumps({"id": f"q{q}", "text": f"{WORDS[q % 8]} query {q}",
                          "split": split}, ensure_ascii=False) + "\n")
      g.write(f"q{q}\tp{q}\tE\n")
      g.write(f"q{q}\tp{q + 16}\tE\n")
      g.write(f"q{q}\tp{(q + 3) % NUM_PRODUCTS}\tS\n")
      if split == "train" and q % 2 == 0:  # judged irrelevant: hard negatives of the labelled pairs
        g.write(f"q{q}\tp{(q + 7) % NUM_PRODUCTS}\tI\n")
        g.write(f"q{q}\tp{(q + 9) % NUM_PRODUCTS}\tI\n")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from mmr_jax.data import import_catalog  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("catalog")
  _write_folder(root / "src")
  import_catalog.import_catalog(root / "src", root / "data",
                                novel_product_fraction=0.5, image_max_side=64,
                                progress=False, verbose=False)
  return str(root / "data")


def _config(**overrides):
  """Returns `config.data` of the base config (locked: the pipeline reads no key it lacks), shrunk."""
  cfg = config_lib.base_config().data
  cfg.update(dict(
      dir="", batch_size=4, image_size=IMAGE_SIZE, query_len=8, product_len=16,
      title_len=8, num_workers=0, positives_k=3,
      augment=dict(random_crop=False, crop_scale_min=0.5, flip=False)))
  cfg.update(overrides)
  cfg.lock()
  return cfg


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
      assert x[k].tobytes() == y[k].tobytes(), k


def _pairs(data_dir, split="train"):
  src = tfds_builder.load_source(data_dir, "pairs", split)
  return [src[i] for i in range(len(src))]


def _pair_key(batch, row):
  return int(batch["query_index"][row]), int(batch["product_index"][row])


def test_stage1_batches(data_dir):
  cfg = _config(batch_size=8)
  it = pipeline.make_train_iterator(data_dir, 1, cfg, seed=0, process_index=0,
                                    process_count=1)
  batches = _take(it, 10)
  spec = batch_spec.from_config(1, cfg, 8)
  for b in batches:
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == spec
  products = tfds_builder.load_source(data_dir, "products", "all")
  heldout = {i for i in range(len(products)) if products[i]["heldout"]}
  assert heldout  # the fixture holds some products out
  seen = np.concatenate([b["product_index"] for b in batches])
  assert not heldout & set(seen.tolist())
  # 80 examples over 10 epochs' worth of candidates: every kept product shows.
  assert set(seen.tolist()) == set(range(NUM_PRODUCTS)) - heldout
  # Stage-1 validation scores the held-out products only: products no stage trains on.
  val = _take(pipeline.make_train_iterator(data_dir, 1, cfg, seed=0, process_index=0, process_count=1,
                                           split="validation", augment=False), 3)
  assert set(np.concatenate([b["product_index"] for b in val]).tolist()) == heldout
  tok = sources.load_tokenizer(data_dir)
  b = batches[0]
  for row, idx in enumerate(b["product_index"]):
    p = products[int(idx)]
    np.testing.assert_array_equal(
        b["title_tokens"][row], tok.encode([p["title"].decode()], 8)[0])
    fields = catalog.product_fields(*(p[k].decode() for k in ("title", "description", "attributes")))
    np.testing.assert_array_equal(b["product_tokens"][row], tok.encode_fields(fields, 16))
  for b in batches:
    missing = b["product_index"] == NO_IMAGE
    assert np.all(b["has_image"] == ~missing)
    assert np.all(b["image"][missing] == 0)
    assert np.all(b["image"][~missing].reshape(int((~missing).sum()), -1)
                  .max(axis=1) > 0)


def test_stage1_can_skip_products_without_image(data_dir):
  it = pipeline.make_train_iterator(data_dir, 1, _config(stage1_skip_no_image=True),
                                    seed=0, process_index=0, process_count=1)
  batches = _take(it, 12)
  assert all(b["has_image"].all() for b in batches)
  assert NO_IMAGE not in np.concatenate([b["product_index"] for b in batches])


def test_stage2_batches_match_pairs(data_dir):
  cfg = _config()
  it = pipeline.make_train_iterator(data_dir, 2, cfg, seed=1, process_index=0,
                                    process_count=1)
  b = next(it)
  assert ({k: (v.shape, v.dtype) for k, v in b.items()}
          == batch_spec.from_config(2, cfg, 4))
  pairs = {(int(p["query_index"]), int(p["product_index"])): p
           for p in _pairs(data_dir)}
  tok = sources.load_tokenizer(data_dir)
  for row in range(4):
    pair = pairs[_pair_key(b, row)]
    np.testing.assert_array_equal(
        b["query_tokens"][row], tok.encode([pair["query_text"].decode()], 8)[0])
    assert b["grade"][row] == pytest.approx(pair["grade"])
    positives = list(pair["positives"])[:3]
    assert list(b["positives"][row][:len(positives)]) == positives
    assert np.all(b["positives"][row][len(positives):] == batch_spec.PAD_INDEX)
    assert int(b["product_index"][row]) in positives


def test_positives_k_below_the_catalogues_most_positives_warns(data_dir, caplog):
  assert tfds_builder.catalog_info(data_dir)["max_positives"] == {"train": 2, "validation": 2}  # two E labels each
  with caplog.at_level("WARNING", logger="mmr_jax.data.pipeline"):
    pipeline.make_train_iterator(data_dir, 2, _config(positives_k=2), seed=0)
    assert "positives_k" not in caplog.text
    pipeline.make_train_iterator(data_dir, 2, _config(positives_k=1), seed=0)
  assert "a train query has 2 E-labelled products but config.data.positives_k=1" in caplog.text
  assert "positives_k=2 to mask them all" in caplog.text
  assert ("data.positives_k", "2") in suggested_overrides(caplog.text)


def test_a_batch_larger_than_the_training_pairs_warns(data_dir, caplog):
  n = len(_pairs(data_dir))
  with caplog.at_level("WARNING", logger="mmr_jax.data.pipeline"):
    pipeline.make_train_iterator(data_dir, 2, _config(batch_size=4), seed=0)
    assert "batches repeat" not in caplog.text
    pipeline.make_train_iterator(data_dir, 2, _config(batch_size=2 * n), seed=0)
  assert f"pairs/train has {n} rows for a batch of {2 * n}: batches repeat" in caplog.text


def test_order_depends_on_seed_and_shuffle_seed(data_dir):
  def order(**kw):
    seed = kw.pop("seed", 0)
    it = pipeline.make_train_iterator(data_dir, 2, _config(**kw), seed=seed,
                                      process_index=0, process_count=1)
    return [_pair_key(b, r) for b in _take(it, 3) for r in range(4)]
  assert order(seed=0) == order(seed=0)
  assert order(seed=0) != order(seed=1)
  assert order(seed=0, shuffle_seed=7) == order(seed=1, shuffle_seed=7)


@pytest.mark.parametrize("hosts", [1, 2])
def test_an_offset_stream_is_the_same_stream_started_later(data_dir, hosts):
  cfg = _config(pseudo_queries=0.5, augment=dict(random_crop=True, crop_scale_min=0.3, flip=True))
  for host in range(hosts):
    make = lambda offset: pipeline.make_train_iterator(  # noqa: E731
        data_dir, 2, cfg, seed=3, process_index=host, process_count=hosts, offset=offset)  # pylint: disable=cell-var-from-loop
    whole = _take(make(0), 7)  # crosses epoch boundaries (12 pairs / 4 per batch)
    # Batch b of the offset stream is batch 5 + b of the whole one: order, pseudo-queries and augmentation.
    _assert_batches_equal(whole[5:], _take(make(5), 2))
    assert any(x["query_tokens"].tobytes() != y["query_tokens"].tobytes() for x, y in zip(whole[:2], whole[5:]))
  with pytest.raises(ValueError, match="stream offset -1"):
    pipeline.make_train_iterator(data_dir, 2, cfg, seed=3, offset=-1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_state_is_exact(data_dir, num_workers):
  cfg = _config(num_workers=num_workers,
                augment=dict(random_crop=True, crop_scale_min=0.3, flip=True))
  make = lambda: pipeline.make_train_iterator(
      data_dir, 2, cfg, seed=3, process_index=0, process_count=1)
  it = make()
  _take(it, 5)  # crosses an epoch boundary (12 pairs / 4 per batch)
  state = it.get_state()
  json.dumps(state)  # what grain's Orbax handler writes
  expected = _take(it, 4)
  it.close()
  resumed = make()
  resumed.set_state(state)
  got = _take(resumed, 4)
  resumed.close()
  _assert_batches_equal(expected, got)
  if num_workers:
    return  # the in-process case below already checks set_state matters
  # Restoring really moved the iterator: a fresh one starts elsewhere.
  fresh = make()
  first = _take(fresh, 4)
  fresh.close()
  assert any(x["image"].tobytes() != y["image"].tobytes()
             or x["query_index"].tobytes() != y["query_index"].tobytes()
             for x, y in zip(first, expected))


def test_hosts_are_disjoint_and_cover_each_epoch(data_dir):
  keys = {(int(p["query_index"]), int(p["product_index"]))
          for p in _pairs(data_dir)}
  n = len(keys)
  epochs = {}
  for host in range(2):
    # Global batch 2 -> 1 row per host: batches are exactly examples.
    it = pipeline.make_train_iterator(data_dir, 2, _config(batch_size=2),
                                      seed=0, process_index=host,
                                      process_count=2)
    per_epoch = len(range(host, n, 2))
    stream = [_pair_key(b, 0) for b in _take(it, 2 * per_epoch)]
    epochs[host] = (stream[:per_epoch], stream[per_epoch:])
  for e in range(2):
    a, b = epochs[0][e], epochs[1][e]
    assert len(set(a)) == len(a) and len(set(b)) == len(b)
    assert not set(a) & set(b)
    assert set(a) | set(b) == keys
  # Each epoch is reshuffled.
  assert epochs[0][0] + epochs[1][0] != epochs[0][1] + epochs[1][1]


def test_augmentation_is_deterministic_and_changes_images(data_dir):
  def images(seed, **augment):
    cfg = _config(augment={**dict(random_crop=False, crop_scale_min=0.3,
                                  flip=False), **augment})
    cfg.shuffle_seed = 0  # same order; augmentation noise follows `seed`
    it = pipeline.make_train_iterator(data_dir, 1, cfg, seed=seed,
                                      process_index=0, process_count=1)
    return np.concatenate([b["image"] for b in _take(it, 4)])
  plain = images(0)
  flipped = images(0, flip=True)
  assert np.array_equal(flipped, images(0, flip=True))
  assert not np.array_equal(flipped, images(1, flip=True))
  is_flip = [np.array_equal(f, p[:, ::-1]) and not np.array_equal(f, p)
             for f, p in zip(flipped, plain)]
  assert 0 < sum(is_flip) < len(is_flip)
  cropped = images(0, random_crop=True)
  assert cropped.shape == plain.shape and not np.array_equal(cropped, plain)


def _eval_rows(data_dir, table, split, batch_size, hosts, key, workers=0):
  out = []
  for host in range(hosts):
    it = pipeline.make_eval_iterator(data_dir, table, split,
                                     _config(num_workers=workers), batch_size,
                                     process_index=host, process_count=hosts)
    out.append([{k: np.array(v) for k, v in b.items()} for b in it])
    it.close()
  assert len({len(batches) for batches in out}) == 1  # same count per host
  rows = []
  for batches in out:
    for b in batches:
      assert b["mask"].shape == (batch_size // hosts,)
      assert np.all(b[key][~b["mask"]] == batch_spec.PAD_INDEX)
      rows.extend(b[key][b["mask"]].tolist())
  return out, rows


@pytest.mark.parametrize("hosts,batch_size,workers",
                         [(1, 8, 0), (2, 6, 0), (3, 3, 0), (1, 6, 2)])
def test_eval_products_cover_all_rows_in_order(data_dir, hosts, batch_size,
                                               workers):
  out, rows = _eval_rows(data_dir, "products", "all", batch_size, hosts,
                         "product_index", workers)
  assert rows == list(range(NUM_PRODUCTS))
  b = out[0][0]
  assert ({k: (v.shape, v.dtype) for k, v in b.items()}
          == batch_spec.from_config("eval_products", _config(),
                                 batch_size // hosts))
  last = out[-1][-1]
  assert np.all(last["image"][~last["mask"]] == 0)
  assert not last["has_image"][~last["mask"]].any()
  assert np.all(last["product_tokens"][~last["mask"]] == 0)


def test_eval_images_are_squashed_whole(data_dir):
  products = tfds_builder.load_source(data_dir, "products", "all")
  (b,) = [b for b in pipeline.make_eval_iterator(
      data_dir, "products", "all", _config(), 64, 0, 1)]
  for i in (0, 1, 8):
    expected, ok = transforms.decode_image(products[i]["image"], IMAGE_SIZE)
    assert ok and b["has_image"][i]
    np.testing.assert_array_equal(b["image"][i], expected)
  assert not b["has_image"][NO_IMAGE]


def test_eval_queries(data_dir):
  queries = tfds_builder.load_source(data_dir, "queries", "train")
  out, rows = _eval_rows(data_dir, "queries", "train", 4, 2, "query_index")
  assert rows == list(range(len(queries)))
  tok = sources.load_tokenizer(data_dir)
  b = out[1][0]
  assert set(b) == {"query_tokens", "query_index", "mask"}
  i = int(b["query_index"][0])
  np.testing.assert_array_equal(
      b["query_tokens"][0], tok.encode([queries[i]["text"].decode()], 8)[0])


def test_empty_split_gives_no_batches(data_dir):
  # With 5 test queries and fraction 0.5 some are novel; validation pairs may
  # be empty, but queries/test_novel_query always exists as a split.
  it = pipeline.make_eval_iterator(data_dir, "queries", "test_novel_query",
                                   _config(), 4, 0, 1)
  n = len(tfds_builder.load_source(data_dir, "queries", "test_novel_query"))
  assert sum(int(b["mask"].sum()) for b in it) == n


def _encode(img, fmt, **kw):
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def test_decode_image_modes_and_bad_bytes():
  rgb = Image.fromarray(np.full((300, 120, 3), 200, np.uint8))
  cases = {
      "jpeg": _encode(rgb, "JPEG"),
      "gray": _encode(rgb.convert("L"), "PNG"),
      "rgba": _encode(rgb.convert("RGBA"), "PNG"),
      "cmyk": _encode(rgb.convert("CMYK"), "JPEG"),
      "palette": _encode(rgb.convert("P"), "PNG"),
  }
  for name, data in cases.items():
    img, ok = transforms.decode_image(data, 24)
    assert ok, name
    assert img.shape == (24, 24, 3) and img.dtype == np.uint8, name
    assert abs(int(img.mean()) - 200) < 8, name
  for bad in (b"", b"not an image", cases["jpeg"][:40]):
    img, ok = transforms.decode_image(bad, 24)
    assert not ok and img.shape == (24, 24, 3) and not img.any()


def test_bad_config_is_named(data_dir):
  with pytest.raises(ValueError, match="batch_size"):
    pipeline.make_train_iterator(data_dir, 2, _config(batch_size=5), seed=0,
                                 process_index=0, process_count=2)
  with pytest.raises(ValueError, match="stage"):
    pipeline.make_train_iterator(data_dir, 3, _config(), seed=0,
                                 process_index=0, process_count=1)
  with pytest.raises(ValueError, match="query_len"):
    pipeline.make_train_iterator(data_dir, 2, _config(query_len=0), seed=0,
                                 process_index=0, process_count=1)
  with pytest.raises(ValueError, match="table"):
    pipeline.make_eval_iterator(data_dir, "pairs", "train", _config(), 4, 0, 1)
  with pytest.raises(FileNotFoundError, match="tokenizer.model"):
    pipeline.make_train_iterator(data_dir + "/nope", 2, _config(), seed=0,
                                 process_index=0, process_count=1)


def test_orbax_checkpoint_roundtrip(data_dir, tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  make = lambda: pipeline.make_train_iterator(
      data_dir, 1, _config(), seed=0, process_index=0, process_count=1)
  it = make()
  _take(it, 3)
  with ocp.CheckpointManager(
      tmp_path / "ckpt",
      item_handlers={"data": pipeline.CheckpointHandler()}) as mngr:
    mngr.save(7, args=ocp.args.Composite(data=pipeline.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = _take(it, 2)
  with ocp.CheckpointManager(
      tmp_path / "ckpt",
      item_handlers={"data": pipeline.CheckpointHandler()}) as mngr:
    restored = mngr.restore(7, args=ocp.args.Composite(
        data=pipeline.CheckpointRestore(make()))).data
  _assert_batches_equal(expected, _take(restored, 2))


def test_validation_split_without_augmentation(data_dir):
  cfg = _config(augment=dict(random_crop=True, crop_scale_min=0.3, flip=True))
  it = pipeline.make_train_iterator(data_dir, 2, cfg, seed=0, process_index=0,
                                    process_count=1, split="validation",
                                    augment=False)
  val = {(int(p["query_index"]), int(p["product_index"]))
         for p in _pairs(data_dir, "validation")}
  products = tfds_builder.load_source(data_dir, "products", "all")
  for b in _take(it, 3):
    for row in range(4):
      assert _pair_key(b, row) in val
      p = int(b["product_index"][row])
      if b["has_image"][row]:
        expected, _ = transforms.decode_image(products[p]["image"], IMAGE_SIZE)
        np.testing.assert_array_equal(b["image"][row], expected)


def test_pseudo_query_terms_come_from_the_products_own_title_and_attributes():
  from mmr_jax.data import pseudo_queries  # pylint: disable=g-import-not-at-top
  assert pseudo_queries.attribute_values("color: navy blue; size: M, L; care: machine washable") == [
      "navy blue", "M", "L", "machine washable"]
  terms = pseudo_queries.candidate_terms("Men's T-Shirt Navy", "color: navy blue; material: cotton")
  assert terms == ["men's", "t-shirt", "navy", "navy blue", "cotton"]
  assert pseudo_queries.candidate_terms("", "", "soft wool scarf") == ["soft", "wool", "scarf"]
  rng = np.random.default_rng(0)
  for _ in range(50):
    q = pseudo_queries.sample("Men's T-Shirt Navy", "color: navy blue; material: cotton", "", rng)
    parts = q.split(" ")
    assert 1 <= len(parts) <= 2 * pseudo_queries.MAX_TERMS and set(parts) <= {"men's", "t-shirt", "navy",
                                                                              "blue", "cotton"}
  assert pseudo_queries.sample("", "", "", rng) == ""


def test_stage2_pseudo_queries_pair_products_with_their_own_terms(data_dir):
  from mmr_jax.data import pseudo_queries  # pylint: disable=g-import-not-at-top
  cfg = _config(pseudo_queries=0.5, batch_size=16, query_len=32)  # long enough for any pseudo-query
  b = next(pipeline.make_train_iterator(data_dir, 2, cfg, seed=3, process_index=0, process_count=1))
  pseudo = b["query_index"] == batch_spec.PAD_INDEX
  assert 0 < pseudo.sum() < 16  # about half the rows
  products = tfds_builder.load_source(data_dir, "products", "all")
  tok = sources.load_tokenizer(data_dir)
  for row in np.flatnonzero(pseudo):
    p = products[int(b["product_index"][row])]
    assert not bool(p["heldout"])  # the novel-product split stays unseen
    assert list(b["positives"][row]) == [b["product_index"][row]] + [batch_spec.PAD_INDEX] * 2
    words = tok.decode(b["query_tokens"][row:row + 1])[0].split(" ")
    allowed = " ".join(pseudo_queries.candidate_terms(p["title"].decode(), p["attributes"].decode(),
                                                      p["description"].decode())).split(" ")
    assert words and set(words) <= set(allowed)
  # Validation batches score the labelled pairs only.
  v = next(pipeline.make_train_iterator(data_dir, 2, cfg, seed=3, process_index=0, process_count=1,
                                        split="validation"))
  assert np.all(v["query_index"] != batch_spec.PAD_INDEX)
  with pytest.raises(ValueError, match="pseudo_queries=1.0"):
    pipeline.make_train_iterator(data_dir, 2, _config(pseudo_queries=1.0), seed=0, process_index=0,
                                 process_count=1)


def test_product_truncation_names_the_fields_cut(data_dir):
  tok = sources.load_tokenizer(data_dir)
  products = tfds_builder.load_source(data_dir, "products", "all")
  lengths = [tok.num_tokens(products[i]["text"].decode()) for i in range(len(products))]
  full = pipeline.product_truncation(data_dir, _config(product_len=max(lengths)))
  assert full["truncated"] == 0 and full["tokens"]["max"] == max(lengths)
  assert full["sampled"] == len(products)
  names = ("title", "description", "attributes")
  for product_len in (4, 16):
    short = pipeline.product_truncation(data_dir, _config(product_len=product_len))
    assert short["truncated"] == pytest.approx(np.mean(np.asarray(lengths) > product_len))
    # A field counts as cut where the product's tokens keep less of it than it has.
    for j, name in enumerate(names):
      lose = [tok.fields_kept(catalog.product_fields(*(products[i][k].decode() for k in names)), product_len)[j]
              for i in range(len(products))]
      assert short["by_field"][name] == pytest.approx(np.mean([kept < have for have, kept in lose])), name
    assert 0 < short["by_field"]["description"] and short["by_field"]["title"] <= short["truncated"]


def test_token_idf_is_bm25s_idf_over_the_trainable_products(data_dir):
  cfg = _config(product_len=32)
  tok = sources.load_tokenizer(data_dir)
  products = tfds_builder.load_source(data_dir, "products", "all")
  rows = [products[i] for i in range(len(products))]
  fields = lambda r: catalog.product_fields(*(r[k].decode() for k in ("title", "description", "attributes")))  # noqa: E731
  kept = [set(tok.encode_fields(fields(r), 32).tolist()) - {0} for r in rows if not r["heldout"]]
  idf = pipeline.token_idf(data_dir, cfg, tok.vocab_size)
  assert idf.shape == (tok.vocab_size,) and idf.dtype == np.float32
  n = len(kept)
  for t in range(tok.vocab_size):
    df = sum(t in k for k in kept)
    assert idf[t] == pytest.approx(np.log1p((n - df + 0.5) / (df + 0.5)), rel=1e-5), t
  assert 0 < n < len(rows)  # the held-out products (the novel-product split) are not counted
  assert idf[0] == pytest.approx(np.log(2 * n + 2))  # the pad id is in no product
  common = max(range(1, tok.vocab_size), key=lambda t: sum(t in k for k in kept))
  assert idf[common] < np.median(idf)
  # A sample estimates it on fewer products; a vocabulary that does not cover the tokenizer is named.
  assert not np.allclose(pipeline.token_idf(data_dir, cfg, tok.vocab_size, sample=10), idf)
  with pytest.raises(ValueError, match="config.model.text.vocab_size"):
    pipeline.token_idf(data_dir, cfg, 5)


def test_stage1_pseudo_queries_come_with_each_product(data_dir):
  from mmr_jax.data import pseudo_queries  # pylint: disable=g-import-not-at-top
  cfg = _config(stage1_pseudo_queries=True, query_len=32)
  b = next(pipeline.make_train_iterator(data_dir, 1, cfg, seed=0, process_index=0, process_count=1))
  assert {k: (v.shape, v.dtype) for k, v in b.items()} == batch_spec.from_config(1, cfg, 4)
  products = tfds_builder.load_source(data_dir, "products", "all")
  tok = sources.load_tokenizer(data_dir)
  for row, idx in enumerate(b["product_index"]):
    p = products[int(idx)]
    words = tok.decode(b["query_tokens"][row:row + 1])[0].split(" ")
    allowed = " ".join(pseudo_queries.candidate_terms(p["title"].decode(), p["attributes"].decode(),
                                                      p["description"].decode())).split(" ")
    assert words and set(words) <= set(allowed)
  assert "query_tokens" not in next(pipeline.make_train_iterator(data_dir, 1, _config(), seed=0, process_index=0,
                                                                 process_count=1))


def test_stage1_over_pairs_reads_stage2s_stream(data_dir):
  cfg = _config(stage1_source="pairs", pseudo_queries=0.5)
  it = lambda stage, split="train": pipeline.make_train_iterator(  # noqa: E731
      data_dir, stage, cfg, seed=0, process_index=0, process_count=1, split=split)
  s1, s2 = next(it(1)), next(it(2))
  assert {k: (v.shape, v.dtype) for k, v in s1.items()} == batch_spec.from_config(1, cfg, 4)
  assert batch_spec.from_config(1, cfg, 4) == batch_spec.from_config(2, cfg, 4)
  for key in s2:  # the same examples, labelled pairs and pseudo-queries alike
    np.testing.assert_array_equal(s1[key], s2[key])
  val = next(it(1, "validation"))
  assert np.all(val["query_index"] >= 0)  # validation scores labelled pairs only
  with pytest.raises(ValueError, match="stage1_source='bogus'"):
    pipeline.make_train_iterator(data_dir, 1, _config(stage1_source="bogus"), seed=0, process_index=0,
                                 process_count=1)


def test_hard_negative_neighbours_are_bm25s_best_and_skip_heldout(data_dir):
  from mmr_jax.data import hard_negatives  # pylint: disable=g-import-not-at-top
  from mmr_jax.evals import keyword  # pylint: disable=g-import-not-at-top
  products = tfds_builder.load_source(data_dir, "products", "all")
  rows = [products[i] for i in range(len(products))]
  heldout = np.array([bool(r["heldout"]) for r in rows])
  nb = hard_negatives.neighbours(products, pool=3)
  assert nb.shape == (len(rows), 3) and nb.dtype == np.int32
  assert np.all(nb[heldout] == -1)  # held-out products are never trained on
  bm25 = keyword.BM25([r["text"].decode() for r in rows])
  for i in np.flatnonzero(~heldout):
    got = nb[i][nb[i] >= 0]
    assert len(got) == 3 and i not in got and not heldout[got].any()
    # The best-scoring trainable products for the product's title and attribute values, best first.
    scores = bm25.scores(hard_negatives.mining_text(rows[i]))
    others = [j for j in np.flatnonzero(~heldout) if j != i]
    assert np.all(np.diff(scores[got]) <= 0)
    assert scores[got[-1]] >= max(scores[j] for j in others if j not in got)
  with pytest.raises(ValueError, match="hard_negative_pool=0"):
    hard_negatives.neighbours(products, pool=0)


def test_hard_negative_positives_hold_every_query_word():
  from mmr_jax.data import hard_negatives  # pylint: disable=g-import-not-at-top
  docs = [hard_negatives.words(t) for t in ("Red Wool Scarf", "red cotton scarf", "Blue wool hat", "赤いスカーフ")]
  assert hard_negatives.positives("red scarf", docs) == [0, 1]
  assert hard_negatives.positives("WOOL", docs) == [0, 2]
  assert hard_negatives.positives("スカーフ", docs) == [3]  # unspaced scripts match by character
  assert hard_negatives.positives("red hat", docs) == []
  assert hard_negatives.positives("", docs) == []


def test_hard_negative_batches_group_each_example_with_neighbours(data_dir):
  from mmr_jax.data import hard_negatives  # pylint: disable=g-import-not-at-top
  cfg = _config(hard_negatives=1, hard_negative_pool=4, pseudo_queries=0.5, batch_size=8, query_len=32)
  make = lambda: pipeline.make_train_iterator(data_dir, 2, cfg, seed=1, process_index=0,  # noqa: E731
                                              process_count=1)
  products = tfds_builder.load_source(data_dir, "products", "all")
  nb = hard_negatives.neighbours(products, pool=4)
  tok = sources.load_tokenizer(data_dir)
  labelled = {(int(p["query_index"]), int(p["product_index"])): sorted(int(x) for x in p["positives"])
              for p in _pairs(data_dir)}
  it = make()
  batches = _take(it, 6)
  assert {k: (v.shape, v.dtype) for k, v in batches[0].items()} == batch_spec.from_config(2, cfg, 8)
  anchors_labelled = 0
  for b in batches:
    for g in range(0, 8, 2):
      anchor, other = int(b["product_index"][g]), int(b["product_index"][g + 1])
      assert other in nb[anchor]  # the pool holds 4 products sharing words with each trainable product
      assert b["query_index"][g + 1] == batch_spec.PAD_INDEX  # the neighbour comes with a pseudo-query
      group_words = [hard_negatives.words(products[p]["text"].decode()) for p in (anchor, other)]
      for row in (g, g + 1):
        pos = [int(x) for x in b["positives"][row] if x >= 0]
        if b["query_index"][row] >= 0:  # a labelled pair keeps its labels
          anchors_labelled += 1
          key = (int(b["query_index"][row]), anchor)
          assert sorted(pos) == labelled[key]  # (at most positives_k of them here)
          continue
        query = tok.decode(b["query_tokens"][row:row + 1])[0]
        own = int(b["product_index"][row])
        expected = [own] + [p for p, w in zip((anchor, other), group_words)
                            if p != own and hard_negatives.words(query) <= w]
        assert pos == expected, (query, pos, expected)
  assert 0 < anchors_labelled < 24
  # The iterator state still resumes exactly.
  state = it.get_state()
  expected = _take(it, 2)
  resumed = make()
  resumed.set_state(state)
  _assert_batches_equal(expected, _take(resumed, 2))
  # Validation batches are the labelled pairs, ungrouped; stage 1 over products has no groups.
  assert pipeline.group_size(1, cfg) == 1 and pipeline.group_size(2, cfg) == 2
  assert pipeline.group_size(1, _config(hard_negatives=1, stage1_source="pairs")) == 2
  with pytest.raises(ValueError, match=r"multiple of 1 \+ hard_negatives = 3"):
    pipeline.make_train_iterator(data_dir, 2, _config(hard_negatives=2), seed=0, process_index=0,
                                 process_count=1)


def test_hard_negative_groups_fill_a_short_pool_with_random_trainable_products(data_dir):
  from mmr_jax.data import hard_negatives  # pylint: disable=g-import-not-at-top
  cfg = _config(hard_negatives=3, hard_negative_pool=1, batch_size=8)
  products = tfds_builder.load_source(data_dir, "products", "all")
  nb = hard_negatives.neighbours(products, pool=1)
  it = pipeline.make_train_iterator(data_dir, 2, cfg, seed=3, process_index=0, process_count=1)
  for b in _take(it, 3):
    for g in range(0, 8, 4):
      group = [int(x) for x in b["product_index"][g:g + 4]]
      assert len(set(group)) == 4  # one neighbour, then two distinct random products
      assert group[1] in nb[group[0]]
      for p in group[1:]:
        assert not bool(products[p]["heldout"]) and products[p]["title"]
        assert b["query_index"][g + group.index(p)] == batch_spec.PAD_INDEX


def test_hard_negative_groups_take_a_labelled_pairs_i_labelled_products_first(data_dir):
  from mmr_jax.data import hard_negatives  # pylint: disable=g-import-not-at-top
  products = tfds_builder.load_source(data_dir, "products", "all")
  heldout = {i for i in range(len(products)) if products[i]["heldout"]}
  pairs = _pairs(data_dir)
  judged = {int(p["query_index"]): sorted(int(x) for x in p["negatives"]) for p in pairs}
  positives = {int(p["query_index"]): sorted(int(x) for x in p["positives"]) for p in pairs}
  # The import keeps every I label of a train query that is not held out, and only those.
  for q, got in judged.items():
    want = sorted(i for i in ((q + 7) % NUM_PRODUCTS, (q + 9) % NUM_PRODUCTS) if q % 2 == 0 and i not in heldout)
    assert got == want, q
  assert sum(map(len, judged.values())) >= 8 and heldout & {(q + k) % NUM_PRODUCTS for q in range(0, 16, 2)
                                                            for k in (7, 9)}
  nb = hard_negatives.neighbours(products, pool=4)
  seen = {True: 0, False: 0}
  for labelled_negatives in (True, False):
    cfg = _config(hard_negatives=2, hard_negative_pool=4, pseudo_queries=0.0, batch_size=6,
                  labelled_negatives=labelled_negatives)
    it = pipeline.make_train_iterator(data_dir, 2, cfg, seed=2, process_index=0, process_count=1)
    for b in _take(it, 8):
      for g in range(0, 6, 3):
        q, anchor = int(b["query_index"][g]), int(b["product_index"][g])
        others = [int(x) for x in b["product_index"][g + 1:g + 3]]
        assert len({anchor, *others}) == 3
        # The labelled pair keeps its labels: an I-labelled product is never its positive.
        assert sorted(int(x) for x in b["positives"][g] if x >= 0) == positives[q][:3]
        if labelled_negatives and judged[q]:
          seen[True] += 1
          n = len(judged[q])
          assert sorted(others[:n]) == judged[q][:2]  # both slots when it has two, then BM25 neighbours
          assert all(o in nb[anchor] for o in others[n:])
        else:
          seen[False] += labelled_negatives is False and bool(judged[q])
          assert all(o in nb[anchor] for o in others)
  assert seen[True] > 0 and seen[False] > 0


def test_model_mined_neighbours_are_the_nearest_trainable_products_by_embedding(tmp_path):
  from mmr_jax.data import hard_negatives  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(12, 4)).astype(np.float32)
  emb[7] = emb[3]  # a duplicate: each is the other's nearest
  heldout = np.zeros(12, bool)
  heldout[[2, 9]] = True
  nb = hard_negatives.nearest_by_embedding(emb, heldout, pool=3)
  assert nb.shape == (12, 3) and nb.dtype == np.int32
  assert (nb[[2, 9]] == -1).all()
  scores = emb @ emb.T
  for i in np.flatnonzero(~heldout):
    cand = [j for j in np.argsort(-scores[i], kind="stable") if j != i and not heldout[j]]
    assert list(nb[i]) == cand[:3], i
  assert nb[3][0] == 7 and nb[7][0] == 3
  assert (hard_negatives.nearest_by_embedding(emb[:3], np.array([False, True, True]), 2) == -1).all()
  with pytest.raises(ValueError, match="hard_negative_pool=0"):
    hard_negatives.nearest_by_embedding(emb, heldout, pool=0)
  # The embeddings file is checked against the catalogue, naming the setting and the file.
  path = tmp_path / "product_embeddings.npy"
  with pytest.raises(FileNotFoundError, match="hard_negative_embeddings=.*products_only"):
    hard_negatives.load_embeddings(str(path), 12)
  np.save(path, emb)
  np.testing.assert_array_equal(hard_negatives.load_embeddings(str(path), 12), emb)
  with pytest.raises(ValueError, match=r"shape \(12, 4\).*\[13, D\]"):
    hard_negatives.load_embeddings(str(path), 13)
  bad = emb.copy()
  bad[5, 1] = np.nan
  np.save(path, bad)
  with pytest.raises(ValueError, match="NaN"):
    hard_negatives.load_embeddings(str(path), 12)
  path.write_bytes(b"not numpy")
  with pytest.raises(ValueError, match="not a .npy"):
    hard_negatives.load_embeddings(str(path), 12)
  path.write_bytes(b"")
  with pytest.raises(ValueError, match="hard_negative_embeddings=.*not a .npy"):
    hard_negatives.load_embeddings(str(path), 12)
  np.savez(tmp_path / "archive.npz", emb=emb)
  with pytest.raises(ValueError, match="hard_negative_embeddings=.*npz"):
    hard_negatives.load_embeddings(str(tmp_path / "archive.npz"), 12)
  # Embeddings from a run trained on another catalogue of the same size are refused.
  np.save(path, emb)
  (tmp_path / "data_fingerprint.json").write_text(json.dumps({"products_sha256": "a" * 64}))
  np.testing.assert_array_equal(hard_negatives.load_embeddings(str(path), 12, "a" * 64), emb)
  with pytest.raises(ValueError, match="trained on another catalogue"):
    hard_negatives.load_embeddings(str(path), 12, "b" * 64)


def test_a_pairs_table_imported_without_negatives_warns_and_groups_from_the_pool(data_dir, monkeypatch, caplog):
  from mmr_jax.data import hard_negatives  # pylint: disable=g-import-not-at-top

  class OlderPairs:  # a pairs table from before the import kept I labels: rows without `negatives`
    def __init__(self, src):
      self._src = src

    def __len__(self):
      return len(self._src)

    def __getitem__(self, i):
      return {k: v for k, v in self._src[i].items() if k != "negatives"}

  opened = sources.open_source
  monkeypatch.setattr(sources, "open_source", lambda d, table, split: (
      OlderPairs(opened(d, table, split)) if table == "pairs" else opened(d, table, split)))
  cfg = _config(hard_negatives=1, hard_negative_pool=4, pseudo_queries=0.0, batch_size=8, labelled_negatives=True)
  with caplog.at_level("WARNING", logger="mmr_jax.data.pipeline"):
    it = pipeline.make_train_iterator(data_dir, 2, cfg, seed=2, process_index=0, process_count=1)
    b = next(it)
  assert "has no `negatives` (imported by an older mmr_jax)" in caplog.text and "re-import" in caplog.text
  nb = hard_negatives.neighbours(tfds_builder.load_source(data_dir, "products", "all"), pool=4)
  for g in range(0, 8, 2):
    assert int(b["product_index"][g + 1]) in nb[int(b["product_index"][g])]
