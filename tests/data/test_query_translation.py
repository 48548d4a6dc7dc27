"""The query translation table: fitted from the labelled training pairs, for query tokens no product uses."""

import json

import numpy as np
import pytest

from mmr_jax import config as config_lib
from mmr_jax.data import import_catalog
from mmr_jax.data import query_translation
from mmr_jax.data import sources
from mmr_jax.data import transforms

COLOURS = ("grey", "blue", "red", "green")
ITEMS = ("lamp", "sofa", "mug", "chair", "table", "rug")
# What shoppers say for the catalogue's colours; "red" is the catalogue's own word.
SAID = {"gray": "grey", "azure": "blue", "red": "red"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, catalog_writer):
  root = tmp_path_factory.mktemp("translation")
  products = [{"id": f"{c}-{item}-{size}", "title": f"{c} {item}", "description": f"a fine {c} {item} for every home",
               "attributes": {"colour": c, "size": size}}
              for c in COLOURS for item in ITEMS for size in ("small", "large")]
  queries, qrels = [], []
  for said, colour in SAID.items():
    for item in ITEMS:
      qid = f"{said}-{item}"
      queries.append({"id": qid, "text": f"{said} {item}", "split": "train"})
      qrels += [(qid, f"{colour}-{item}-{size}", "E") for size in ("small", "large")]
      qrels.append((qid, f"{colour}-{ITEMS[(ITEMS.index(item) + 1) % len(ITEMS)]}-small", "S"))
  # Shoppers' words in one training query only, and in test queries only: too little (or no) evidence.
  queries += [{"id": "once", "text": "crimson lamp", "split": "train"},
              {"id": "held", "text": "navy sofa", "split": "test"}]
  qrels += [("once", "red-lamp-small", "E"), ("held", "blue-sofa-small", "E")]
  src = catalog_writer(root / "src", products, queries, qrels)
  import_catalog.import_catalog(src, root / "data", novel_product_fraction=0.0, vocab_size=380, progress=False,
                                verbose=False)
  return str(root / "data")


def _config():
  cfg = config_lib.base_config().data
  cfg.update(dict(query_len=8, product_len=24))
  return cfg


def _pieces(data_dir):
  """Returns (tokenizer, fn(word) -> its token ids, the ids any product's text uses)."""
  tok = sources.load_tokenizer(data_dir)
  products = sources.open_source(data_dir, "products", "all")
  used = set()
  for i in range(len(products)):
    used.update(transforms.product_tokens(products[i], tok, 24).tolist())  # as training reads them
  return tok, lambda word: [int(t) for t in tok.encode([word], 8)[0] if t], used


def test_a_query_word_no_product_uses_maps_to_the_words_of_its_labelled_products(data_dir):
  tok, ids, used = _pieces(data_dir)
  # SentencePiece keeps the catalogue's words whole; a shopper's word of a few queries falls into pieces, of
  # which those no product uses are the ones to translate (the word's own).
  (grey,), (blue,), (red,) = ids("grey"), ids("blue"), ids("red")
  gray, azure, crimson = ([t for t in ids(w) if t not in used] for w in ("gray", "azure", "crimson"))
  assert gray and azure and crimson and not set(gray) & set(azure) and not set(gray + azure) & set(crimson)
  targets, report = query_translation.fit(data_dir, _config(), tok.vocab_size, 2)
  assert targets.shape == (tok.vocab_size, 2) and targets.dtype == np.int32
  # Every best product of a "gray ..." query says "grey"; the item and the boilerplate ("a fine ... for every
  # home") are either in too few of them or as common everywhere, so "grey" is the one translation.
  for t in gray:
    np.testing.assert_array_equal(targets[t], [grey, query_translation.NONE])
  for t in azure:
    np.testing.assert_array_equal(targets[t], [blue, query_translation.NONE])
  # Only those rows are filled: not the tokens products use ("red", "lamp"), nor the pieces of a word of one
  # training query (min_queries=2), nor those of a word only test queries use ("navy").
  assert sorted(np.flatnonzero((targets != query_translation.NONE).any(1)).tolist()) == sorted(gray + azure)
  assert report["translated"] == len(gray + azure) and report["train_queries"] == 19
  entry = {e["id"]: e for e in report["entries"]}[gray[0]]
  assert entry["queries"] == len(ITEMS) and entry["token"] == tok.id_to_piece(gray[0])
  # grey is in 12 of the 48 products and in every best product of those queries: p 1, lift 4.
  assert entry["targets"] == [{"token": tok.id_to_piece(grey), "id": grey, "p": 1.0, "lift": 4.0}]
  json.dumps(report)  # written to the workdir as JSON
  # One query is evidence enough with min_queries=1: "crimson lamp" brings "red" (and "lamp", in a sixth of the
  # catalogue); a stricter lift keeps nothing.
  once, _ = query_translation.fit(data_dir, _config(), tok.vocab_size, 2, min_queries=1)
  assert all(red in once[t] for t in crimson)
  strict, report = query_translation.fit(data_dir, _config(), tok.vocab_size, 2, min_lift=5.0)
  assert np.all(strict == query_translation.NONE) and report["translated"] == 0


@pytest.mark.parametrize("kw,msg", [({"k": 0}, "k=0 must be > 0"), ({"min_prob": 0.0}, "min_prob=0.0"),
                                    ({"min_lift": 0.5}, "min_lift=0.5"), ({"min_queries": 0}, "min_queries=0")])
def test_bad_settings_are_named(data_dir, kw, msg):
  kw = {"k": 2, **kw}
  with pytest.raises(ValueError, match=msg):
    query_translation.fit(data_dir, _config(), 380, kw.pop("k"), **kw)
