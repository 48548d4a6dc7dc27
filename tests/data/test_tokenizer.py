"""Tests for mmr_jax.data.tokenizer: training, numpy encoding, TF parity."""

import os
import pickle

import numpy as np
import pytest

from mmr_jax.data import tokenizer as tokenizer_lib

# Latin-only corpus: every non-Latin script below is unseen at training time.
CORPUS = [
    "red cotton t-shirt for men, soft and breathable, size M",
    "wireless bluetooth headphones with noise cancelling and 40h battery",
    "stainless steel water bottle 750ml, insulated, keeps drinks cold",
    "women's floral summer dress, knee length, viscose",
    "ergonomic office chair with lumbar support and adjustable armrests",
    "kids' running shoes, breathable mesh, size 32",
    "ceramic coffee mug 350 ml, dishwasher safe",
    "leather wallet with rfid blocking, brown",
] * 8

UNUSUAL = [
    "",
    "   ",
    "\t\n",
    "🎉🔥👟 sneakers 🎉",
    "日本語の商品説明テキスト",
    "مرحبا بالعالم حقيبة جلدية",
    "Привет мир, кружка керамическая",
    "mixed: shoes 靴 обувь حذاء 👟 42EU",
    "red  cotton\tshirt\nnew line",
    "Café crème brûlée — naïve façade",
    "x" * 3000,
    "wireless " * 400,
]

MAX_LEN = 24


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  out = tmp_path_factory.mktemp("tok") / "tokenizer"
  return tokenizer_lib.train_tokenizer(iter(CORPUS), str(out), vocab_size=8000)


@pytest.fixture(scope="module")
def tok(model_path):
  return tokenizer_lib.Tokenizer(model_path)


def test_train_writes_model_with_special_ids(model_path, tok):
  assert model_path.endswith(".model") and os.path.exists(model_path)
  # hard_vocab_limit=False: a tiny corpus gets a small vocab, not an error.
  assert 260 < tok.vocab_size < 8000
  assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>",
                                                    "</s>"]


def test_encode_shape_padding_no_bos_eos(tok):
  ids = tok.encode(["red cotton t-shirt", "", "wireless " * 100], MAX_LEN)
  assert ids.shape == (3, MAX_LEN) and ids.dtype == np.int32
  row0 = ids[0][ids[0] != 0]
  assert 0 < len(row0) < MAX_LEN
  assert np.all(ids[0, len(row0):] == 0)  # right padded
  assert tokenizer_lib.BOS_ID not in ids and tokenizer_lib.EOS_ID not in ids
  assert np.all(ids[1] == 0)
  assert np.all(ids[2] != 0)  # truncated, not padded
  assert tok.decode(ids[:1]) == ["red cotton t-shirt"]
  assert tok.encode([], MAX_LEN).shape == (0, MAX_LEN)


def test_byte_fallback_for_unseen_scripts(tok):
  for text in ["日本語", "مرحبا", "Привет", "🎉"]:
    ids = tok.encode([text], MAX_LEN)[0]
    ids = ids[ids != 0]
    assert len(ids) > 0, text
    assert tokenizer_lib.UNK_ID not in ids, text
    # The text survives the round trip (case-folded: the tokenizer is uncased), so distinct queries stay distinct.
    assert tok.decode(ids[None]) == [text.lower()]
  assert not np.array_equal(tok.encode(["日本"], MAX_LEN),
                            tok.encode(["中国"], MAX_LEN))


def test_numpy_tf_parity(tok):
  ids_np = tok.encode(UNUSUAL, MAX_LEN)
  encode = tokenizer_lib.tf_encode(tok.model_proto, MAX_LEN)
  ids_tf = encode(UNUSUAL).numpy()
  assert ids_tf.dtype == np.int32 and ids_tf.shape == (len(UNUSUAL), MAX_LEN)
  np.testing.assert_array_equal(ids_np, ids_tf)
  # A long text really was truncated on both sides (not just all padding).
  assert np.all(ids_tf[-2] != 0) and np.all(ids_tf[-1] != 0)
  assert encode([]).numpy().shape == (0, MAX_LEN)


def test_field_budgets_keep_short_fields_whole_and_share_the_rest():
  assert tokenizer_lib.field_budgets([5, 100, 8], 30) == [5, 17, 8]
  assert tokenizer_lib.field_budgets([0, 50, 3], 10) == [0, 7, 3]  # an empty field takes nothing
  assert tokenizer_lib.field_budgets([20, 20, 20], 10) == [3, 3, 4]  # ties: the later field keeps the odd id
  assert tokenizer_lib.field_budgets([4, 6], 100) == [4, 6]


def test_encode_fields_cuts_a_long_description_not_the_attributes(tok):
  title, attrs = "red cotton t-shirt", "material: cotton; care: machine wash"
  fields = [title, "wireless " * 100, attrs]
  # Room for three times the longer short field: both stay whole, the description takes the rest.
  max_len = 3 * max(tok.num_tokens(title), tok.num_tokens(attrs)) + 2 * tok.num_tokens("|") + 6
  ids = tok.encode_fields(fields, max_len)
  text = tok.decode(ids[None])[0]
  assert text.startswith(title + " | wireless") and text.endswith(" | " + attrs)
  assert 0 not in ids  # the room is used
  # Cut at its end, the same text loses the attributes entirely.
  assert "material" not in tok.decode(tok.encode([" | ".join(fields)], max_len))[0]
  kept = tok.fields_kept(fields, max_len)
  assert kept[0] == (tok.num_tokens(title),) * 2 and kept[2] == (tok.num_tokens(attrs),) * 2
  assert kept[1][1] < kept[1][0] == tok.num_tokens(fields[1])
  # A text that fits is encoded as the joined text; empty fields are left out with their separator.
  short = [title, "", attrs]
  np.testing.assert_array_equal(tok.encode_fields(short, max_len), tok.encode([title + " | " + attrs], max_len)[0])
  assert [k for _, k in tok.fields_kept(short, max_len)] == [tok.num_tokens(title), 0, tok.num_tokens(attrs)]


def test_fields_kept_where_the_room_is_too_small_to_cut_per_field(model_path):
  fields = ["red cotton t-shirt", "soft", "size m"]
  plain = tokenizer_lib.Tokenizer(model_path)
  lengths = [plain.num_tokens(f) for f in fields]
  assert lengths[0] > 3
  for conventions, max_len in ((dict(), 2), (dict(eos="sticky"), 3), (dict(eos="sticky", bos=True), 2)):
    tok = tokenizer_lib.Tokenizer(model_path, conventions=tokenizer_lib.Conventions(**conventions))
    ids = tok.encode_fields(fields, max_len)  # no room for one id of each field: the joined text cut at its end
    title_ids = max_len - int(tok.conventions.bos) - int(tok.conventions.eos == "sticky")
    if title_ids:
      np.testing.assert_array_equal(ids[int(tok.conventions.bos):][:title_ids],
                                    plain.encode([fields[0]], title_ids)[0])
    assert tok.fields_kept(fields, max_len) == [(lengths[0], title_ids), (lengths[1], 0), (lengths[2], 0)]


@pytest.mark.parametrize("conventions", [dict(), dict(eos="sticky", pad_id=3, lower=True), dict(eos="yes", bos=True),
                                         dict(bos=True, eos="sticky")])
def test_encode_fields_numpy_tf_parity(model_path, conventions):
  conv = tokenizer_lib.Conventions(**conventions)
  tok = tokenizer_lib.Tokenizer(model_path, conventions=conv)
  rng = np.random.default_rng(0)
  words = " ".join(CORPUS[:8]).replace(",", "").split() + ["日本語", "Привет", "🎉"]
  field = lambda k: " ".join(rng.choice(words, k)) if k else ""  # noqa: E731
  rows = [[field(rng.integers(1, 12)), field(rng.choice([0, 3, 30, 60])), field(rng.choice([0, 2, 10, 25]))]
          for _ in range(60)] + [["", "", ""], ["a", "", ""], ["", "", "wireless " * 50]]
  for max_len in (3, 5, 8, 16, 40):
    encode = tokenizer_lib.tf_encode(tok.model_proto, max_len, conv)
    want = np.stack([tok.encode_fields(r, max_len) for r in rows])
    np.testing.assert_array_equal(encode.encode_fields(rows).numpy(), want, err_msg=f"max_len={max_len}")
    if max_len >= 16:  # rows cut per field are among them
      assert any(tok.fields_kept(r, max_len)[2][1] == tok.fields_kept(r, max_len)[2][0] and
                 tok.fields_kept(r, max_len)[1][1] < tok.fields_kept(r, max_len)[1][0] for r in rows)


def test_tf_encoder_saves_and_reloads(tok, tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  encode = tokenizer_lib.tf_encode(tok.model_proto, MAX_LEN)
  tf.saved_model.save(encode, str(tmp_path / "enc"))
  loaded = tf.saved_model.load(str(tmp_path / "enc"))
  np.testing.assert_array_equal(loaded(tf.constant(UNUSUAL[:6])).numpy(),
                                tok.encode(UNUSUAL[:6], MAX_LEN))


def test_training_is_deterministic(model_path, tmp_path):
  again = tokenizer_lib.train_tokenizer(CORPUS, str(tmp_path / "again"),
                                        vocab_size=8000)
  a, b = tokenizer_lib.Tokenizer(model_path), tokenizer_lib.Tokenizer(again)
  assert a.vocab_size == b.vocab_size
  sample = CORPUS[:8] + UNUSUAL
  np.testing.assert_array_equal(a.encode(sample, 64), b.encode(sample, 64))


def test_pickle_roundtrip(tok):
  clone = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(clone.encode(UNUSUAL, MAX_LEN),
                                tok.encode(UNUSUAL, MAX_LEN))


def test_bad_inputs(tmp_path, tok):
  with pytest.raises(ValueError, match="no non-empty text"):
    tokenizer_lib.train_tokenizer(["", "  "], str(tmp_path / "t"))
  with pytest.raises(TypeError, match=r"texts\[1\]"):
    tokenizer_lib.train_tokenizer(["ok", 3], str(tmp_path / "t"))
  with pytest.raises(FileNotFoundError, match="no model file"):
    tokenizer_lib.Tokenizer(str(tmp_path / "missing.model"))
  with pytest.raises(ValueError, match="not a SentencePiece model"):
    tokenizer_lib.Tokenizer(model_proto=b"garbage")
  with pytest.raises(TypeError, match="single string"):
    tok.encode("a string", MAX_LEN)


def test_sampled_training_is_deterministic(tmp_path):
  # More sentences than input_sentence_size: the seeded reservoir sample.
  corpus = [f"{w} item {i}" for i, w in enumerate(CORPUS * 5)]
  paths = [tokenizer_lib.train_tokenizer(corpus, str(tmp_path / f"s{k}"),
                                         seed=5, input_sentence_size=120)
           for k in range(2)]
  a, b = (tokenizer_lib.Tokenizer(p) for p in paths)
  np.testing.assert_array_equal(a.encode(corpus, 32), b.encode(corpus, 32))
