"""Catalogue schema: file names, grades, splits, skip reasons, line validation and product text.

What every part of the importer agrees on, and what the towers share with it: `product_text` renders a
product the same way at import, in the training pipeline and in the exported SavedModel's text ops;
`parse_product` / `parse_query` turn one JSON object into a validated row or raise `Skip` with the
reason it is logged under (`SkipLog`); `CatalogError` is for problems that stop the whole import.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import re
from typing import Any, Iterator, Mapping

PRODUCTS_FILE = "products.jsonl"
QUERIES_FILE = "queries.jsonl"
QRELS_FILE = "qrels.tsv"
REQUIRED_FILES = (PRODUCTS_FILE, QUERIES_FILE, QRELS_FILE)

# ESCI gains (Amazon Shopping Queries): E exact, S substitute, C complement, I irrelevant.
GRADE_GAIN = {"E": 1.0, "S": 0.1, "C": 0.01, "I": 0.0}
_GRADE_ALIASES = {"exact": "E", "substitute": "S", "complement": "C", "irrelevant": "I"}

SOURCE_QUERY_SPLITS = ("train", "validation", "test")
DERIVED_QUERY_SPLITS = ("test_novel_query", "test_novel_product")
QUERY_SPLITS = SOURCE_QUERY_SPLITS + DERIVED_QUERY_SPLITS
PAIR_SPLITS = ("train", "validation")
PRODUCT_SPLIT = "all"

DEFAULT_LANGUAGE = "und"

# Skip reasons (keys of import_summary.json["skipped"]). Image reasons keep the product.
NON_UTF8 = "non_utf8"
MALFORMED_JSON = "malformed_json"
MISSING_FIELD = "missing_field"
INVALID_FIELD = "invalid_field"
EMPTY_TEXT = "empty_text"
DUPLICATE_PRODUCT_ID = "duplicate_product_id"
DUPLICATE_QUERY_ID = "duplicate_query_id"
IMAGE_MISSING = "image_missing"
IMAGE_CORRUPT = "image_corrupt"
IMAGE_PATH_REFUSED = "image_path_refused"
MALFORMED_QREL = "malformed_qrel"
INVALID_GRADE = "invalid_grade"
UNKNOWN_PRODUCT = "unknown_product"
UNKNOWN_QUERY = "unknown_query"
DUPLICATE_QREL = "duplicate_qrel"


class CatalogError(ValueError):
  """The catalogue cannot be imported at all (the message names the file and what to fix)."""


class Skip(Exception):
  """One line or image is unusable: carries the skip reason and a human-readable detail."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason
    self.detail = detail


class SkipLog:
  """Skipped items per reason, each as a `file:line ...` or product-id reference."""

  def __init__(self):
    self._refs: dict[str, list[str]] = collections.defaultdict(list)

  def add(self, reason: str, ref: str) -> None:
    self._refs[reason].append(ref)

  def merge(self, other: "SkipLog") -> None:
    for reason, refs in other._refs.items():
      self._refs[reason].extend(refs)

  def refs(self, reason: str) -> list[str]:
    return list(self._refs.get(reason, ()))

  def counts(self) -> dict[str, int]:
    return {r: len(v) for r, v in sorted(self._refs.items())}

  def as_dict(self) -> dict[str, list[str]]:
    return {r: list(v) for r, v in sorted(self._refs.items())}

  def total(self) -> int:
    return sum(len(v) for v in self._refs.values())


# Text rendering: one deterministic function shared by the importer and every tower.


def _render_value(value: Any) -> str:
  """Returns one attribute value as text (lists joined with ", ", bools as true/false)."""
  if isinstance(value, bool):  # Before int: bool is an int subclass.
    return "true" if value else "false"
  if isinstance(value, str):
    return " ".join(value.split())
  if isinstance(value, int):
    return str(value)
  if isinstance(value, float):
    if math.isfinite(value) and value == int(value) and abs(value) < 1e15:
      return str(int(value))  # 42.0 and 42 render alike: catalogues mix them freely.
    return repr(value)
  if isinstance(value, (list, tuple)):
    return ", ".join(s for s in (_render_value(v) for v in value if v is not None) if s)
  if isinstance(value, Mapping):
    return ", ".join(f"{k}={_render_value(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))
                     if v is not None)
  raise TypeError(f"attribute value of type {type(value).__name__} is not str/number/bool/list/dict")


def render_attributes(attributes: Mapping[str, Any] | None) -> str:
  """Returns attributes as "key: value; key: value" sorted by key (None/empty values dropped)."""
  if not attributes:
    return ""
  parts = []
  for key in sorted(attributes, key=str):
    value = attributes[key]
    if value is None:
      continue
    rendered = _render_value(value)
    if rendered:
      parts.append(f"{' '.join(str(key).split())}: {rendered}")
  return "; ".join(parts)


FIELD_SEPARATOR = " | "


def product_fields(title: str, description: str = "",
                   attributes: Mapping[str, Any] | str | None = None) -> list[str]:
  """Returns [title, description, attributes] as the towers read them: whitespace runs collapsed, "" where empty.

  `attributes` may be the raw mapping or an already rendered string (as stored in the products table).
  """
  attrs = attributes if isinstance(attributes, str) else render_attributes(attributes)
  return [" ".join(p.split()) for p in (title, description or "", attrs)]


def product_text(title: str, description: str = "",
                 attributes: Mapping[str, Any] | str | None = None) -> str:
  """Returns the product text every tower reads: title | description | attributes (non-empty parts).

  The " | " separator gives the tokenizer a stable field boundary without relying on punctuation
  the catalogue may or may not have. A text longer than the towers' `data.product_len` is cut per field
  (`Tokenizer.encode_fields` over `product_fields`), not at its end.
  """
  return FIELD_SEPARATOR.join(p for p in product_fields(title, description, attributes) if p)


# Scripts written without spaces between words: each character counts as a word (Han ideographs, kana,
# Thai, Lao, Khmer, Myanmar; Hangul is spaced). A CJK title of 8 characters is as informative as an
# 8-word English one, not one word.
UNSPACED = ("\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf"
            "\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f")
_WORD = re.compile(f"[{UNSPACED}]|[^\\s{UNSPACED}]+")


def count_words(*texts: str) -> int:
  """Returns the number of words over all texts (text-sparsity bins).

  Words are whitespace-separated runs, except that each character of a script written without spaces
  (Chinese, Japanese, Thai, ...) counts as one word.
  """
  return sum(len(_WORD.findall(t)) for t in texts if t)


def normalize_query(text: str) -> str:
  """Returns text lowercased with whitespace collapsed (novel-query matching)."""
  return " ".join(text.lower().split())


def parse_grade(value: str) -> str | None:
  """Returns the ESCI letter for "E"/"exact"/... (any case), or None if not a grade."""
  v = value.strip()
  if v.upper() in GRADE_GAIN:
    return v.upper()
  return _GRADE_ALIASES.get(v.lower())



# Line validation: one JSON object -> a validated row, or Skip with its reason.


@contextlib.contextmanager
def _naming(item_id: str) -> Iterator[None]:
  """Appends " (id=item_id)" to the detail of a Skip raised inside, so the log names the item."""
  try:
    yield
  except Skip as e:
    raise Skip(e.reason, f"{e.detail} (id={item_id})") from None


def _get_id(obj: dict, field: str = "id") -> str:
  if field not in obj or obj[field] is None:
    raise Skip(MISSING_FIELD, f"'{field}' is missing")
  value = obj[field]
  # Numeric ids are common in real exports; qrels.tsv spells them as text anyway.
  if isinstance(value, int) and not isinstance(value, bool):
    value = str(value)
  if not isinstance(value, str):
    raise Skip(INVALID_FIELD, f"'{field}' must be a string, got {type(value).__name__}")
  value = value.strip()
  if not value:
    raise Skip(EMPTY_TEXT, f"'{field}' is empty")
  if "\t" in value or "\n" in value:
    raise Skip(INVALID_FIELD, f"'{field}' contains a tab or newline")
  return value


def _get_text(obj: dict, field: str, required: bool) -> str:
  value = obj.get(field)
  if value is None:
    if required:
      raise Skip(MISSING_FIELD, f"'{field}' is missing")
    return ""
  if not isinstance(value, str):
    raise Skip(INVALID_FIELD, f"'{field}' must be a string, got {type(value).__name__}")
  value = value.strip()
  if required and not value:
    raise Skip(EMPTY_TEXT, f"'{field}' is empty")
  return value


@dataclasses.dataclass(frozen=True)
class Product:
  """One validated products.jsonl line."""
  id: str
  title: str
  description: str
  attributes: str  # Rendered by render_attributes.
  language: str
  image: str  # Path relative to the catalogue folder, "" when the line names none.
  lineno: int

  @property
  def text(self) -> str:
    return product_text(self.title, self.description, self.attributes)

  @property
  def num_words(self) -> int:
    return count_words(self.title, self.description, self.attributes)


def parse_product(obj: dict, lineno: int) -> Product:
  """Returns the validated Product of one products.jsonl object; raises Skip if unusable."""
  pid = _get_id(obj)
  with _naming(pid):
    title = _get_text(obj, "title", required=True)
    description = _get_text(obj, "description", required=False)
    attributes = obj.get("attributes")
    if attributes is not None and not isinstance(attributes, Mapping):
      raise Skip(INVALID_FIELD, f"'attributes' must be an object, got {type(attributes).__name__}")
    try:
      rendered = render_attributes(attributes)
    except TypeError as e:
      raise Skip(INVALID_FIELD, f"'attributes': {e}") from None
    language = _get_text(obj, "language", required=False) or DEFAULT_LANGUAGE
    image = _get_text(obj, "image", required=False)
  return Product(id=pid, title=title, description=description, attributes=rendered,
                 language=language, image=image, lineno=lineno)


@dataclasses.dataclass(frozen=True)
class Query:
  """One validated queries.jsonl line."""
  id: str
  text: str
  split: str
  tags: tuple[str, ...]
  lineno: int


def parse_query(obj: dict, lineno: int) -> Query:
  """Returns the validated Query; raises Skip if unusable, CatalogError on an unknown split."""
  qid = _get_id(obj)
  with _naming(qid):
    text = _get_text(obj, "text", required=True)
    split = _get_text(obj, "split", required=True)
    tags = obj.get("tags")
    if tags is None:
      tags = ()
    elif isinstance(tags, str):
      tags = (tags,)
    elif isinstance(tags, list) and all(isinstance(t, str) for t in tags):
      tags = tuple(t.strip() for t in tags if t.strip())
    else:
      raise Skip(INVALID_FIELD, "'tags' must be a list of strings")
  if split not in SOURCE_QUERY_SPLITS:
    # Not a skip: a misspelt split ("val", "dev") would otherwise silently empty a whole split.
    raise CatalogError(f"{QUERIES_FILE}:{lineno}: unknown split {split!r} for query {qid!r}; "
                       f"expected one of {', '.join(SOURCE_QUERY_SPLITS)} (test_novel_* splits are "
                       "derived at import, not given)")
  return Query(id=qid, text=text, split=split, tags=tags, lineno=lineno)
