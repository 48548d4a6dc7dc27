"""SentencePiece tokenizer: training, numpy encoding, and a TF twin for export.

One model serves both towers. The numpy side (`Tokenizer.encode`) runs in the
training input pipeline, which is kept free of TensorFlow; the TF side
(`tf_encode`) runs inside the exported SavedModel. Both return the same ids.
With a catalogue's own model (the default `Conventions()`): no bos/eos,
truncated to `max_len`, right-padded with pad id 0 (so the model's token mask
is simply `ids != 0`). A pretrained checkpoint's model is used with the
conventions it was trained with (`Conventions`, big_vision's `tokenize` op:
SigLIP lowercases ASCII, appends a "sticky" eos and pads with the eos id 1).
`tests/data/test_tokenizer.py` and `tests/models/test_pretrained_init.py` hold them to that.

The model is a unigram LM with byte fallback: a catalogue in a script the model
never saw (or an emoji in a title) still maps to byte pieces instead of a single
<unk> that would erase the difference between two queries.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
from typing import Any, Iterable, Iterator, Sequence

from etils import epath
import numpy as np
import sentencepiece as spm

from mmr_jax.data.catalog.schema import FIELD_SEPARATOR

PAD_ID = 0
UNK_ID = 1
BOS_ID = 2
EOS_ID = 3

EOS_MODES = ("none", "yes", "sticky")


@dataclasses.dataclass(frozen=True)
class Conventions:
  """How texts become ids around the SentencePiece pieces (big_vision's `tokenize` op arguments).

  eos: "none" (no eos), "yes" (eos appended, lost when the text is truncated) or "sticky" (eos
    appended and kept as the last id of a truncated text: the contrastive text towers of SigLIP /
    LiT pool that last position).
  pad_id: the id filling the row after the text (big_vision SigLIP: 1, the eos id).
  bos: prepend the model's bos id.
  lower: lowercase ASCII letters first (what `tf.strings.lower` does, as big_vision's op).
  """
  eos: str = "none"
  pad_id: int = PAD_ID
  bos: bool = False
  lower: bool = False

  def __post_init__(self):
    if self.eos not in EOS_MODES:
      raise ValueError(f"tokenizer eos={self.eos!r}; expected one of {EOS_MODES}")
    if int(self.pad_id) < 0:
      raise ValueError(f"tokenizer pad_id={self.pad_id} must be >= 0")

  @classmethod
  def from_config(cls, cfg: Any) -> "Conventions":
    """Returns the conventions of a `config.data.tokenizer`-style mapping (missing keys: defaults)."""
    if cfg is None:
      return cls()
    get = cfg.get if hasattr(cfg, "get") else lambda k, d: getattr(cfg, k, d)
    d = cls()
    return cls(eos=str(get("eos", d.eos)), pad_id=int(get("pad_id", d.pad_id)),
               bos=bool(get("bos", d.bos)), lower=bool(get("lower", d.lower)))


def lower_ascii(text: str) -> str:
  """Returns `text` with A-Z lowercased and every other character kept (as `tf.strings.lower`)."""
  return text.encode("utf-8").lower().decode("utf-8")


# SentencePiece drops (not truncates) training sentences longer than this many
# bytes; the encoders only ever read the first `max_len` tokens of a text, so
# feeding the head of each long description loses nothing that matters.
_MAX_SENTENCE_BYTES = 8192


class VocabTooSmallError(ValueError):
  """The catalogue uses more distinct characters than `vocab_size` leaves room for.

  `required` is the smallest vocabulary SentencePiece accepts (every character kept by
  `character_coverage`, plus the special and byte pieces).
  """

  def __init__(self, vocab_size: int, required: int):
    super().__init__(f"vocab_size={vocab_size} is smaller than the {required} pieces the text's "
                     f"characters need alone; use vocab_size >= {required} (more leaves room for words)")
    self.vocab_size = vocab_size
    self.required = required


_REQUIRED_CHARS = re.compile(r"smaller than required_chars\. (\d+) vs (\d+)")


def _clip_utf8(text: str, max_bytes: int) -> str:
  """Returns `text` cut to at most `max_bytes` UTF-8 bytes on a char boundary."""
  raw = text.encode("utf-8")
  if len(raw) <= max_bytes:
    return text
  return raw[:max_bytes].decode("utf-8", errors="ignore")


def _training_sentences(texts: Iterable[str]) -> Iterator[str]:
  """Yields non-empty, single-line, length-capped training sentences."""
  for i, text in enumerate(texts):
    if not isinstance(text, str):
      raise TypeError(
          f"train_tokenizer: texts[{i}] is {type(text).__name__}, expected str")
    # Newlines would be read as sentence separators by some sentencepiece code
    # paths; the normaliser maps them to spaces at encode time anyway.
    text = " ".join(text.split())
    if text:
      yield _clip_utf8(text, _MAX_SENTENCE_BYTES)


def train_tokenizer(
    texts: Iterable[str],
    out_prefix: str,
    vocab_size: int = 8000,
    seed: int = 0,
    *,
    input_sentence_size: int = 2_000_000,
    num_threads: int = 1,
) -> str:
  """Returns the path of `<out_prefix>.model`, a unigram SentencePiece model.

  Args:
    texts: any iterable of strings (streamed: a generator over a huge catalogue
      is fine; at most `input_sentence_size` of them are sampled, reservoir
      style, with the seeded generator).
    out_prefix: writes `<out_prefix>.model` and `<out_prefix>.vocab`.
    vocab_size: target size. `hard_vocab_limit=False`, so a tiny catalogue gets
      a smaller vocabulary instead of an error.
    seed: seeds SentencePiece's global random generator (sentence sampling).
    input_sentence_size: cap on training sentences kept in memory.
    num_threads: 1 keeps training bit-reproducible; more is faster on big
      catalogues.

  Raises:
    VocabTooSmallError: the texts' characters alone need more than vocab_size
      pieces (its `required` says how many).
  """
  if vocab_size < 300:
    # 4 specials + 256 byte pieces are always present with byte_fallback.
    raise ValueError(f"vocab_size={vocab_size} must be >= 300 (byte fallback "
                     "alone takes 260 ids)")
  if input_sentence_size <= 100:
    raise ValueError(f"input_sentence_size={input_sentence_size} must be > 100"
                     " (sentencepiece's limit)")
  out_dir = os.path.dirname(os.path.abspath(out_prefix))
  os.makedirs(out_dir, exist_ok=True)
  sentences = _training_sentences(texts)
  first = list(itertools.islice(sentences, 1))
  if not first:
    raise ValueError("train_tokenizer: no non-empty text to train on")
  errors: list[BaseException] = []

  def feed() -> Iterator[str]:
    # sentencepiece turns an exception raised by the iterator into a bare
    # RuntimeError; keep the original to re-raise it with its message.
    try:
      yield from itertools.chain(first, sentences)
    except Exception as e:
      errors.append(e)
      raise

  spm.set_random_generator_seed(int(seed))
  try:
    _train(feed(), out_prefix, vocab_size, input_sentence_size, num_threads)
  except RuntimeError as e:
    if errors:
      raise errors[0] from None
    # A catalogue in a large script (thousands of distinct CJK characters) needs a vocabulary
    # at least that big; hard_vocab_limit=False does not cover this case.
    m = _REQUIRED_CHARS.search(str(e))
    if m:
      raise VocabTooSmallError(int(m.group(1)), int(m.group(2))) from None
    raise
  return f"{out_prefix}.model"


def _train(sentences: Iterator[str], out_prefix: str, vocab_size: int,
           input_sentence_size: int, num_threads: int) -> None:
  spm.SentencePieceTrainer.train(
      sentence_iterator=sentences,
      model_prefix=out_prefix,
      model_type="unigram",
      vocab_size=int(vocab_size),
      hard_vocab_limit=False,
      character_coverage=0.9995,
      byte_fallback=True,
      # Sizes like "128gb" or "10.5" should not become single rare pieces.
      split_digits=True,
      # NFKC + case folding: queries are typed in any case ("red dress" for a "Red Dress" title), and a
      # cased vocabulary would make the towers learn every word twice from few pairs.
      normalization_rule_name="nmt_nfkc_cf",
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      pad_piece="<pad>", unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
      input_sentence_size=int(input_sentence_size),
      shuffle_input_sentence=True,
      max_sentence_length=_MAX_SENTENCE_BYTES,
      num_threads=int(num_threads),
      minloglevel=2,
  )


def _ids_to_array(ids: Sequence[Sequence[int]], max_len: int, pad_id: int = PAD_ID,
                  sticky_eos: int | None = None) -> np.ndarray:
  """Returns int32 [B, max_len]: `ids` truncated and right-padded with `pad_id`.

  With `sticky_eos`, a truncated row ends in that id (the row's own last id, its eos).
  """
  out = np.full((len(ids), max_len), pad_id, dtype=np.int32)
  for row, seq in enumerate(ids):
    n = min(len(seq), max_len)
    out[row, :n] = seq[:n]
    if sticky_eos is not None and len(seq) > max_len:
      out[row, -1] = sticky_eos
  return out


def field_budgets(lengths: Sequence[int], available: int) -> list[int]:
  """Returns how many of each field's ids to keep so that they sum to at most `available`.

  Water-filling: a field shorter than an equal share of what is left keeps all of its ids, and the fields
  longer than that share it equally, so a long field (a description) is cut before a short one (the
  attributes) loses anything. Ties are cut in field order, a later field keeping the odd id.
  """
  order = sorted(range(len(lengths)), key=lambda i: lengths[i])  # stable: field order among equals
  left, out = int(available), [0] * len(lengths)
  for k, i in enumerate(order):
    out[i] = min(int(lengths[i]), left // (len(lengths) - k))
    left -= out[i]
  return out


class Tokenizer:
  """Numpy-side SentencePiece encoder (picklable, for grain worker processes)."""

  def __init__(self, model_path: str | os.PathLike[str] | None = None, *,
               model_proto: bytes | None = None, conventions: Conventions | None = None):
    self.conventions = conventions or Conventions()
    if (model_path is None) == (model_proto is None):
      raise ValueError("Tokenizer: pass exactly one of model_path, model_proto")
    if model_path is not None:
      # epath: DATA_DIR may be gs://; SentencePiece itself only opens local files.
      model_path = epath.Path(model_path)
      if not model_path.exists():
        raise FileNotFoundError(f"Tokenizer: no model file at {model_path}")
      model_proto = model_path.read_bytes()
    self._init_from_proto(model_proto)

  def _init_from_proto(self, model_proto: bytes) -> None:
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(self._proto)
    except Exception as e:  # sentencepiece raises bare RuntimeError/OSError
      raise ValueError(f"Tokenizer: not a SentencePiece model ({e})") from e
    if self._sp.pad_id() != PAD_ID:
      raise ValueError(f"Tokenizer: model pad_id is {self._sp.pad_id()}, the "
                       f"pipeline's token masks need pad_id={PAD_ID}")
    c = self.conventions
    for flag, name, i in ((c.eos != "none", "eos", self._sp.eos_id()), (c.bos, "bos", self._sp.bos_id())):
      if flag and i < 0:
        raise ValueError(f"Tokenizer: conventions {c} add {name}, but the model has no {name} piece")
    if c.pad_id >= self._sp.get_piece_size():
      raise ValueError(f"Tokenizer: pad_id={c.pad_id} is not an id of this {self._sp.get_piece_size()}-piece model")

  # SentencePieceProcessor is a SWIG object: pickle the proto and rebuild.
  def __getstate__(self) -> dict[str, Any]:
    return {"proto": self._proto, "conventions": dataclasses.asdict(self.conventions)}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.conventions = Conventions(**state.get("conventions", {}))
    self._init_from_proto(state["proto"])

  @property
  def vocab_size(self) -> int:
    """Returns the number of ids (embedding table rows needed)."""
    return self._sp.get_piece_size()

  @property
  def model_proto(self) -> bytes:
    """Returns the serialized ModelProto (what `tf_encode` and export need)."""
    return self._proto

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  def encode(self, texts: Sequence[str], max_len: int) -> np.ndarray:
    """Returns int32 [B, max_len] ids, truncated and padded as `self.conventions` say.

    Default conventions: no bos/eos, padded with 0.
    """
    if isinstance(texts, (str, bytes)):
      raise TypeError("Tokenizer.encode expects a sequence of strings, got a "
                      "single string")
    if max_len <= 0:
      raise ValueError(f"max_len={max_len} must be positive")
    c = self.conventions
    texts = [t.decode("utf-8") if isinstance(t, bytes) else t for t in texts]
    if c.lower:
      texts = [lower_ascii(t) for t in texts]
    if not texts:
      return np.zeros((0, max_len), np.int32)
    kw = dict(out_type=int, add_bos=c.bos, add_eos=c.eos != "none")
    if len(texts) < 32:
      # The list overload starts a thread pool per call (~50 us); the
      # pipeline encodes one text at a time.
      ids = [self._sp.encode(t, **kw) for t in texts]
    else:
      ids = self._sp.encode(texts, **kw)
    return _ids_to_array(ids, max_len, c.pad_id, self.eos_id if c.eos == "sticky" else None)

  def encode_fields(self, fields: Sequence[str], max_len: int, separator: str = FIELD_SEPARATOR) -> np.ndarray:
    """Returns int32 [max_len]: the non-empty `fields` joined by `separator`, encoded as `encode` does, except
    that a text longer than `max_len` is cut per field rather than at its end (`field_budgets`).

    Each field is then encoded on its own (the separator's ids between the kept ones, bos / a sticky eos as
    the conventions say); where `max_len` cannot hold one id of every field, the text is cut at its end.
    `fields` are whitespace-normalised (catalog.product_fields). `tf_encode(...).encode_fields` is the TF twin.
    """
    c = self.conventions
    whole, ids, sep, budgets = self._field_plan(fields, max_len, separator)
    sticky = self.eos_id if c.eos == "sticky" else None
    if budgets is None:
      return _ids_to_array([whole], max_len, c.pad_id, sticky)[0]
    seq = [self.bos_id] if c.bos else []
    for i, b in zip(ids, budgets):
      if b:
        seq += (sep if len(seq) > int(c.bos) else []) + i[:b]
    out = _ids_to_array([seq], max_len, c.pad_id)[0]
    if sticky is not None:
      out[-1] = sticky
    return out

  def fields_kept(self, fields: Sequence[str], max_len: int,
                  separator: str = FIELD_SEPARATOR) -> list[tuple[int, int]]:
    """Returns (ids, ids kept) per field as `encode_fields` encodes them (separators and bos / eos not counted;
    where the text is cut at its end, what of each field comes before `max_len`)."""
    c = self.conventions
    whole, ids, sep, budgets = self._field_plan(fields, max_len, separator, each_field=True)
    if budgets is None:
      # Cut at its end (or not at all): a sticky eos takes the last position of a cut text.
      room = max_len - int(c.eos == "sticky" and len(whole) > max_len)
      pos, budgets = int(c.bos), []
      for i in ids:
        pos += len(sep) if i and pos > int(c.bos) else 0
        budgets.append(min(len(i), max(room - pos, 0)))
        pos += len(i)
    return [(len(i), b) for i, b in zip(ids, budgets)]

  def _field_plan(self, fields: Sequence[str], max_len: int, separator: str, each_field: bool = False):
    """Returns (the joined text's ids, each field's ids, the separator's ids, each field's budget or None where
    the joined text's ids are used: they fit, or max_len cannot hold one id of every field). Where they fit,
    the fields' and separator's ids are None unless `each_field`."""
    if max_len <= 0:
      raise ValueError(f"max_len={max_len} must be positive")
    c = self.conventions
    fields = [f.decode("utf-8") if isinstance(f, bytes) else f for f in fields]
    whole = self._ids(separator.join(f for f in fields if f))
    if len(whole) <= max_len and not each_field:  # the common case: one encode
      return whole, None, None, None
    ids = [self._ids(f, special=False) if f else [] for f in fields]
    sep = self._ids(separator.strip(), special=False)
    if len(whole) <= max_len:
      return whole, ids, sep, None
    n = sum(bool(i) for i in ids)
    available = max_len - int(c.bos) - int(c.eos == "sticky") - len(sep) * (n - 1)
    if available < n:
      return whole, ids, sep, None
    return whole, ids, sep, field_budgets([len(i) for i in ids], available)

  def _ids(self, text: str, special: bool = True) -> list[int]:
    """Returns the ids of one text as `encode` makes them before truncation (lowercased as the conventions say;
    with their bos / eos if `special`)."""
    c = self.conventions
    text = lower_ascii(text) if c.lower else text
    return self._sp.encode(text, out_type=int, add_bos=special and c.bos, add_eos=special and c.eos != "none")

  def num_tokens(self, text: str) -> int:
    """Returns how many ids `text` encodes to under `self.conventions`, before any truncation."""
    return len(self._ids(text)) if text else 0

  def decode(self, ids: np.ndarray) -> list[str]:
    """Returns the texts for int ids [B, L] (pads dropped), for debugging."""
    drop = {PAD_ID, self.conventions.pad_id}
    return [self._sp.decode([int(i) for i in row if i not in drop])
            for row in np.asarray(ids)]

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


def tf_encode(model_proto: Any, max_len: int, conventions: Conventions | None = None, num_fields: int = 3,
              separator: str = FIELD_SEPARATOR):
  """Returns a tf.Module `f` with `f(strings [B] tf.string) -> int32 [B, max_len]`.

  Same ids as `Tokenizer.encode` with the same `conventions`. `f.__call__` is a `tf.function` with a
  polymorphic batch dimension (`[None]` string input; an empty batch gives
  `[0, max_len]`), and `f` tracks the tokenizer resource, so it can be attached
  to a module and saved with `tf.saved_model.save`. `model_proto` may be bytes
  or a scalar tf.string tensor (e.g. `tf.io.read_file` of an asset path).
  `f.encode_fields(fields [B, num_fields] tf.string)` is `Tokenizer.encode_fields` (with `separator`) per row.
  """
  # Imported here so the training input pipeline never loads TensorFlow.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_text as tf_text  # pylint: disable=g-import-not-at-top

  if max_len <= 0:
    raise ValueError(f"max_len={max_len} must be positive")
  c = conventions or Conventions()
  # The special and separator ids, read from the proto where it is given as bytes (a tensor proto: plain encode
  # only, no sticky eos and no encode_fields).
  host = Tokenizer(model_proto=model_proto, conventions=c) if isinstance(model_proto, bytes) else None
  if c.eos == "sticky" and host is None:
    raise ValueError("tf_encode: eos='sticky' needs the model proto as bytes (to read its eos id)")
  eos_id = host.eos_id if c.eos == "sticky" else None
  bos_id, all_eos = (host.bos_id, host.eos_id) if host else (-1, -1)
  sep_ids = host._ids(separator.strip(), special=False) if host else None  # pylint: disable=protected-access

  class TFEncoder(tf.Module):
    """SentencePiece ids padded/truncated to a fixed length, in TF ops."""

    def __init__(self):
      super().__init__(name="sentencepiece_encoder")
      self.max_len = int(max_len)
      self.tokenizer = tf_text.SentencepieceTokenizer(
          model=model_proto, out_type=tf.int32, add_bos=c.bos, add_eos=c.eos != "none")

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def __call__(self, texts):
      return self._encode(texts)[0]

    def _encode(self, texts):
      """Returns (ids [B, max_len], untruncated lengths [B])."""
      if c.lower:
        texts = tf.strings.lower(texts)  # ASCII only, as lower_ascii
      ragged = self.tokenizer.tokenize(texts)  # [B, (n)]
      # to_tensor with an explicit shape both truncates and pads.
      ids = ragged.to_tensor(default_value=c.pad_id,
                             shape=[None, self.max_len])  # [B, max_len]
      if eos_id is None:
        return ids, ragged.row_lengths()
      cut = ragged.row_lengths() > self.max_len  # [B]
      last = tf.where(cut, tf.constant(eos_id, tf.int32), ids[:, -1])
      return tf.concat([ids[:, :-1], last[:, None]], axis=1), ragged.row_lengths()

    @tf.function(input_signature=[tf.TensorSpec([None, num_fields], tf.string)])
    def encode_fields(self, fields):
      if sep_ids is None:
        raise ValueError("tf_encode: encode_fields needs the model proto as bytes (to read the separator's ids)")
      kept = tf.ragged.boolean_mask(fields, tf.strings.length(fields) > 0)
      whole, whole_len = self._encode(tf.strings.reduce_join(kept, axis=1, separator=separator))
      batch = tf.shape(fields)[0]
      flat = tf.reshape(tf.strings.lower(fields) if c.lower else fields, [-1])  # [B * F]
      # The bos / eos the conventions add are dropped (text never encodes to those control ids): a second
      # tokenizer op without them would share the first one's resource and settings.
      ids = self.tokenizer.tokenize(flat)  # [B * F, (n)]
      ids = tf.ragged.boolean_mask(ids, tf.logical_and(tf.not_equal(ids, bos_id), tf.not_equal(ids, all_eos)))
      lengths = tf.reshape(tf.cast(ids.row_lengths(), tf.int32), [batch, num_fields])
      n = tf.reduce_sum(tf.cast(lengths > 0, tf.int32), axis=1)  # [B]
      available = (self.max_len - int(c.bos) - int(c.eos == "sticky")
                   - len(sep_ids) * tf.maximum(n - 1, 0))  # [B]
      # field_budgets, row by row: the fields in order of length, each keeping at most an equal share of what
      # the shorter ones left.
      order = tf.argsort(lengths, axis=1, stable=True)
      left, parts = available, []
      for k in range(num_fields):
        b = tf.minimum(tf.gather(lengths, order[:, k], batch_dims=1), left // (num_fields - k))
        parts.append(b)
        left -= b
      budget = tf.gather(tf.stack(parts, axis=1), tf.argsort(order, axis=1, stable=True), batch_dims=1)
      budget = tf.reshape(budget, [-1])  # [B * F]
      starts = tf.cast(ids.row_starts(), tf.int32)
      kept_ids = tf.gather(ids.values, tf.ragged.range(starts, starts + budget))  # [B * F, (b)]
      # The separator goes before a kept field that follows another kept one of the same row.
      has = tf.reshape(budget > 0, [batch, num_fields])
      before = tf.reshape(tf.logical_and(has, tf.cumsum(tf.cast(has, tf.int32), axis=1, exclusive=True) > 0), [-1])
      seps = tf.gather(tf.constant(sep_ids, tf.int32),
                       tf.ragged.range(tf.where(before, len(sep_ids), 0)))  # [B * F, (0 or len(sep))]
      rows = tf.RaggedTensor.from_uniform_row_length(tf.concat([seps, kept_ids], axis=1), num_fields)
      seq = rows.merge_dims(1, 2)  # [B, (n)]
      if c.bos:
        seq = tf.concat([tf.fill([batch, 1], tf.constant(bos_id, tf.int32)), seq], axis=1)
      out = seq.to_tensor(default_value=c.pad_id, shape=[None, self.max_len])
      if eos_id is not None:
        out = tf.concat([out[:, :-1], tf.fill([batch, 1], tf.constant(eos_id, tf.int32))], axis=1)
      use_fields = tf.logical_and(whole_len > self.max_len, available >= n)
      return tf.where(use_fields[:, None], out, whole)

  return TFEncoder()


# DESIGN.md's layout names it encode_tf.
encode_tf = tf_encode
