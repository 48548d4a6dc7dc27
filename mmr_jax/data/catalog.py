"""Catalogue folder format: schema, validation, product text rendering, scanning.

A catalogue folder (what users bring) holds:

```
products.jsonl   {"id": "p1", "title": "...", "description": "...", "attributes": {...},
                  "image": "images/p1.jpg", "language": "en"}   (description/attributes/language/image optional)
queries.jsonl    {"id": "q1", "text": "red floral dress", "split": "train|validation|test",
                  "tags": ["visual"]}                            (tags optional)
qrels.tsv        query_id <TAB> product_id <TAB> E|S|C|I         (header line optional)
images/          JPEG or PNG (anything Pillow decodes), paths relative to the folder
```

`scan_catalog` reads the three files once, streaming, and returns a `CatalogPlan`: which products.jsonl
lines become which product index, the query rows of every split with their labels, the held-out
(novel) products, and every skipped line with its reason. Images are not decoded here: that happens
once, while the TFDS products table is written (`load_image`).

Bad input never crashes later: a line that cannot be used is skipped and logged under a reason with
its `file:line` reference (`SkipLog`), a product whose image is unusable is kept with has_image=False
and logged, and problems that make the whole catalogue unusable (missing file, unknown split, no
products) raise `CatalogError` naming the file.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import io
import json
import math
import os
import pathlib
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

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


class _Skip(Exception):
  """One line is unusable: carries the skip reason and a human-readable detail."""

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


# ----------------------------------------------------------------------------------------------
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


def product_text(title: str, description: str = "",
                 attributes: Mapping[str, Any] | str | None = None) -> str:
  """Returns the product text every tower reads: title | description | attributes (non-empty parts).

  `attributes` may be the raw mapping or an already rendered string (as stored in the products table).
  The " | " separator gives the tokenizer a stable field boundary without relying on punctuation
  the catalogue may or may not have.
  """
  attrs = attributes if isinstance(attributes, str) else render_attributes(attributes)
  parts = [" ".join(p.split()) for p in (title, description or "", attrs)]
  return " | ".join(p for p in parts if p)


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


# ----------------------------------------------------------------------------------------------
# Line readers.


def _iter_lines(path: pathlib.Path, skips: SkipLog | None) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, decoded line) for non-blank lines; logs non-UTF-8 lines."""
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        if skips is not None:
          skips.add(NON_UTF8, f"{path.name}:{lineno}: byte {e.start + 1} is not UTF-8")
        continue
      if lineno == 1:
        line = line.lstrip("\ufeff")  # Editors on Windows prepend a BOM.
      line = line.rstrip("\r\n")
      if line.strip():
        yield lineno, line


def _iter_jsonl(path: pathlib.Path, skips: SkipLog | None) -> Iterator[tuple[int, dict]]:
  """Yields (line number, object) for lines holding a JSON object; logs the others."""
  for lineno, line in _iter_lines(path, skips):
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      if skips is not None:
        skips.add(MALFORMED_JSON, f"{path.name}:{lineno}: {e.msg} (column {e.colno})")
      continue
    if not isinstance(obj, dict):
      if skips is not None:
        skips.add(MALFORMED_JSON, f"{path.name}:{lineno}: expected a JSON object, got {type(obj).__name__}")
      continue
    if "\\u" in line:  # JSON escapes can spell a lone UTF-16 surrogate (an emoji cut in half), not text
      try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
      except UnicodeEncodeError as e:
        if skips is not None:
          skips.add(NON_UTF8, f"{path.name}:{lineno}: {e.object[e.start]!r} is a lone UTF-16 surrogate, not text "
                    "(a character cut in half?)")
        continue
    yield lineno, obj


def _get_id(obj: dict, field: str = "id") -> str:
  if field not in obj or obj[field] is None:
    raise _Skip(MISSING_FIELD, f"'{field}' is missing")
  value = obj[field]
  # Numeric ids are common in real exports; qrels.tsv spells them as text anyway.
  if isinstance(value, int) and not isinstance(value, bool):
    value = str(value)
  if not isinstance(value, str):
    raise _Skip(INVALID_FIELD, f"'{field}' must be a string, got {type(value).__name__}")
  value = value.strip()
  if not value:
    raise _Skip(EMPTY_TEXT, f"'{field}' is empty")
  if "\t" in value or "\n" in value:
    raise _Skip(INVALID_FIELD, f"'{field}' contains a tab or newline")
  return value


def _get_text(obj: dict, field: str, required: bool) -> str:
  value = obj.get(field)
  if value is None:
    if required:
      raise _Skip(MISSING_FIELD, f"'{field}' is missing")
    return ""
  if not isinstance(value, str):
    raise _Skip(INVALID_FIELD, f"'{field}' must be a string, got {type(value).__name__}")
  value = value.strip()
  if required and not value:
    raise _Skip(EMPTY_TEXT, f"'{field}' is empty")
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
  """Returns the validated Product of one products.jsonl object; raises _Skip if unusable."""
  pid = _get_id(obj)
  try:
    title = _get_text(obj, "title", required=True)
    description = _get_text(obj, "description", required=False)
    attributes = obj.get("attributes")
    if attributes is not None and not isinstance(attributes, Mapping):
      raise _Skip(INVALID_FIELD, f"'attributes' must be an object, got {type(attributes).__name__}")
    try:
      rendered = render_attributes(attributes)
    except TypeError as e:
      raise _Skip(INVALID_FIELD, f"'attributes': {e}") from None
    language = _get_text(obj, "language", required=False) or DEFAULT_LANGUAGE
    image = _get_text(obj, "image", required=False)
  except _Skip as e:
    raise _Skip(e.reason, f"{e.detail} (id={pid})") from None
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
  """Returns the validated Query; raises _Skip if unusable, CatalogError on an unknown split."""
  qid = _get_id(obj)
  try:
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
      raise _Skip(INVALID_FIELD, "'tags' must be a list of strings")
  except _Skip as e:
    raise _Skip(e.reason, f"{e.detail} (id={qid})") from None
  if split not in SOURCE_QUERY_SPLITS:
    # Not a skip: a misspelt split ("val", "dev") would otherwise silently empty a whole split.
    raise CatalogError(f"{QUERIES_FILE}:{lineno}: unknown split {split!r} for query {qid!r}; "
                       f"expected one of {', '.join(SOURCE_QUERY_SPLITS)} (test_novel_* splits are "
                       "derived at import, not given)")
  return Query(id=qid, text=text, split=split, tags=tags, lineno=lineno)


# ----------------------------------------------------------------------------------------------
# Images.


def _unquote(field: str) -> str:
  """Returns a TSV field without the double quotes spreadsheet and pandas exports may put around it."""
  if len(field) >= 2 and field[0] == field[-1] == '"':
    return field[1:-1].replace('""', '"')
  return field


def resolve_image_path(src_dir: pathlib.Path, rel: str) -> pathlib.Path:
  """Returns the absolute image path inside src_dir; raises _Skip(IMAGE_PATH_REFUSED) otherwise."""
  if "://" in rel:
    raise _Skip(IMAGE_PATH_REFUSED, f"{rel!r} is a URL; images must be files inside the folder")
  if "\x00" in rel:
    raise _Skip(IMAGE_PATH_REFUSED, f"{rel!r} contains a NUL byte")
  if "\\" in rel and not (src_dir / rel).exists():
    rel = rel.replace("\\", "/")  # written on Windows (images\p1.jpg); a literal backslash name wins
  p = pathlib.PurePath(rel)
  if p.is_absolute() or pathlib.PureWindowsPath(rel).is_absolute():
    raise _Skip(IMAGE_PATH_REFUSED, f"{rel!r} is absolute; paths must be relative to the folder")
  root = src_dir.resolve()
  # resolve() follows symlinks too, so a link pointing outside the folder is refused as well.
  full = (root / p).resolve()
  if not full.is_relative_to(root):
    raise _Skip(IMAGE_PATH_REFUSED, f"{rel!r} escapes the catalogue folder")
  return full


def to_rgb(img):
  """Returns a Pillow image as RGB the way the importer, the training pipeline and the exported product
  tower agree on: transparency (alpha, or a PNG/GIF transparent colour) composited on white, as shop
  cut-outs are shown; 16-bit/32-bit/float greyscale mapped to 8 bits by its type's range (Pillow's own
  convert clips them to white or black); anything else by `convert("RGB")`.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
    top = float(arr.max(initial=0.0))
    if img.mode == "F":
      hi = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else top
      arr = (arr * (255.0 / hi)).round()
    elif top > 255.0:  # (8-bit data in a wide container stays as it is)
      arr = (arr + 128) // 257 if top <= 65535.0 else (arr * (255.0 / top)).round()  # round(v / 257), exact
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8)).convert("RGB")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out
  return img.convert("RGB")


def load_image(src_dir: pathlib.Path, rel: str, max_side: int,
               jpeg_quality: int = 90) -> tuple[bytes, str | None, str]:
  """Returns (JPEG bytes or b"", skip reason or None, detail) for one product image.

  The image is decoded fully (so truncated files are caught), EXIF-rotated (phone photos),
  composited on white if it has transparency (cut-out product shots), converted to RGB,
  shrunk so its longest side <= max_side and re-encoded as JPEG.
  """
  from PIL import Image, ImageOps  # pylint: disable=g-import-not-at-top

  if not rel:
    return b"", IMAGE_MISSING, "no image given"
  try:
    path = resolve_image_path(src_dir, rel)
  except _Skip as e:
    return b"", e.reason, e.detail
  if not path.is_file():
    return b"", IMAGE_MISSING, f"{rel}: {'is a directory' if path.is_dir() else 'file not found'}"
  try:
    with Image.open(path) as img:
      # draft() lets the JPEG decoder downscale by 1/2..1/8 while decoding: big photos cost far less.
      img.draft("RGB", (max_side, max_side))
      img = ImageOps.exif_transpose(img)
      img = to_rgb(img)
      if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
      buf = io.BytesIO()
      img.save(buf, format="JPEG", quality=jpeg_quality)
  except Exception as e:  # pylint: disable=broad-except
    # Pillow raises OSError, SyntaxError, ValueError, DecompressionBombError, struct.error, ...
    # depending on the codec; any of them means "this file is not a usable image".
    return b"", IMAGE_CORRUPT, f"{rel}: {type(e).__name__}: {e}"
  return buf.getvalue(), None, ""


# ----------------------------------------------------------------------------------------------
# Scan.


@dataclasses.dataclass
class QueryRow:
  """One row of a queries split (labels resolved to product indexes)."""
  id: str
  text: str
  tags: tuple[str, ...]
  labels: list[tuple[int, str]]  # (product index, grade letter) in qrels order, I included.

  @property
  def relevant_index(self) -> list[int]:
    return [p for p, g in self.labels if g != "I"]

  @property
  def relevant_grade(self) -> list[float]:
    return [GRADE_GAIN[g] for _, g in self.labels if g != "I"]

  @property
  def positives(self) -> list[int]:
    return [p for p, g in self.labels if g == "E"]


@dataclasses.dataclass
class CatalogPlan:
  """Everything the TFDS builder needs besides the images, decided by one scan of the folder."""
  src_dir: pathlib.Path
  product_lines: np.ndarray  # [N] int64: products.jsonl line number of product index i.
  heldout: np.ndarray  # [N] bool
  queries: dict[str, list[QueryRow]]  # Every split in QUERY_SPLITS.
  pair_grades: tuple[str, ...]
  num_qrels: int
  skips: SkipLog
  novel_product_fraction: float
  seed: int

  @property
  def num_products(self) -> int:
    return len(self.product_lines)

  def iter_products(self) -> Iterator[tuple[int, Product]]:
    """Yields (product index, Product) in index order by re-reading products.jsonl."""
    wanted = self.product_lines
    index = 0
    for lineno, obj in _iter_jsonl(self.src_dir / PRODUCTS_FILE, skips=None):
      if index >= len(wanted):
        break
      if lineno != wanted[index]:
        continue
      yield index, parse_product(obj, lineno)
      index += 1
    if index != len(wanted):
      raise CatalogError(f"{self.src_dir / PRODUCTS_FILE} changed while importing "
                         f"({index} of {len(wanted)} products found on re-read)")

  def product_chunks(self, rows_per_chunk: int) -> list["ProductChunk"]:
    """Returns the products split into chunks of consecutive indexes that workers read alone."""
    lines = self.product_lines
    firsts = list(range(0, len(lines), rows_per_chunk))
    wanted = {int(lines[i]): i for i in firsts}
    offsets = {}
    pos = 0
    with open(self.src_dir / PRODUCTS_FILE, "rb") as f:
      for lineno, raw in enumerate(f, start=1):
        if lineno in wanted:
          offsets[lineno] = pos
        pos += len(raw)
    chunks = []
    for first in firsts:
      segment = lines[first:first + rows_per_chunk]
      # Runs of consecutive line numbers: one run per chunk unless lines were skipped.
      breaks = np.flatnonzero(np.diff(segment) != 1) + 1
      runs = tuple((int(r[0]), int(r[-1])) for r in np.split(segment, breaks))
      chunks.append(ProductChunk(first_index=first, start_byte=offsets[int(segment[0])],
                                 first_lineno=int(segment[0]), line_runs=runs))
    return chunks

  def iter_pairs(self, split: str) -> Iterator[dict]:
    """Yields pair rows for a pairs split: (query, product) with grade in pair_grades, not held out."""
    for qi, q in enumerate(self.queries[split]):
      positives = q.positives
      for p, g in q.labels:
        if g in self.pair_grades and not self.heldout[p]:
          yield {"query_index": qi, "query_text": q.text, "product_index": p,
                 "grade": GRADE_GAIN[g], "positives": positives}

  def num_pairs(self, split: str) -> int:
    return sum(1 for _ in self.iter_pairs(split))


@dataclasses.dataclass(frozen=True)
class ProductChunk:
  """Consecutive products a worker can read on its own (Beam): where they start in products.jsonl."""
  first_index: int
  start_byte: int  # Offset of line first_lineno.
  first_lineno: int
  line_runs: tuple[tuple[int, int], ...]  # Inclusive runs of line numbers holding kept products.

  @property
  def num_rows(self) -> int:
    return sum(hi - lo + 1 for lo, hi in self.line_runs)


def iter_chunk_products(src_dir: str | os.PathLike, chunk: ProductChunk) -> Iterator[tuple[int, Product]]:
  """Yields (product index, Product) for one chunk, reading only its part of products.jsonl."""
  runs = iter(chunk.line_runs)
  lo, hi = next(runs)
  index = chunk.first_index
  path = pathlib.Path(src_dir) / PRODUCTS_FILE
  with open(path, "rb") as f:
    f.seek(chunk.start_byte)
    for lineno, raw in enumerate(f, start=chunk.first_lineno):
      if lineno > hi:
        nxt = next(runs, None)
        if nxt is None:
          return
        lo, hi = nxt
      if lineno < lo:
        continue
      try:
        line = raw.decode("utf-8")
        if lineno == 1:
          line = line.lstrip("\ufeff")
        yield index, parse_product(json.loads(line), lineno)
      except (UnicodeDecodeError, json.JSONDecodeError, _Skip) as e:
        raise CatalogError(f"{path}:{lineno} changed while importing ({e})") from None
      index += 1
  if index != chunk.first_index + chunk.num_rows:
    raise CatalogError(f"{path} changed while importing (ends before line {hi})")


def check_folder(src_dir: str | os.PathLike) -> pathlib.Path:
  """Returns the catalogue folder as a Path; raises CatalogError if it or a required file is missing."""
  src = pathlib.Path(src_dir).expanduser()
  if not src.is_dir():
    raise CatalogError(f"catalogue folder {str(src)!r} does not exist or is not a directory")
  for name in REQUIRED_FILES:
    if not (src / name).is_file():
      raise CatalogError(f"required file {name!r} is missing from the catalogue folder {str(src)!r} "
                         f"(expected: {', '.join(REQUIRED_FILES)}, images/)")
  return src


def scan_catalog(src_dir: str | os.PathLike, *, novel_product_fraction: float = 0.1, seed: int = 0,
                 pair_grades: Sequence[str] = ("E",),
                 on_product: Callable[[int, Product], None] | None = None,
                 progress: bool = False) -> CatalogPlan:
  """Returns the CatalogPlan of a catalogue folder (validates every line; no image decoding).

  Args:
    src_dir: the catalogue folder.
    novel_product_fraction: fraction of products with an E label on a test query that are held
      out of every train/validation pair (the novel-product split).
    seed: seeds the held-out product draw.
    pair_grades: grades that make a training pair (subset of E, S, C).
    on_product: called with (index, Product) for every kept product, in index order (the importer
      uses it to stream product text into the tokenizer corpus without holding it in memory).
    progress: show tqdm progress bars.
  """
  src = check_folder(src_dir)
  if not 0.0 <= novel_product_fraction <= 1.0:
    raise CatalogError(f"novel_product_fraction must be in [0, 1], got {novel_product_fraction}")
  grades = []
  for g in pair_grades:
    letter = parse_grade(g)
    if letter is None or letter == "I":
      raise CatalogError(f"pair_grades must be drawn from E, S, C; got {g!r}")
    grades.append(letter)
  pair_grades = tuple(dict.fromkeys(grades))
  skips = SkipLog()

  def bar(it, desc):
    if not progress:
      return it
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    return tqdm(it, desc=desc, unit=" lines", mininterval=1.0)

  # Products: only the id -> index map and line numbers stay in memory.
  product_index: dict[str, int] = {}
  product_lines = array.array("q")  # 8 bytes a product, not a Python int object each.
  for lineno, obj in bar(_iter_jsonl(src / PRODUCTS_FILE, skips), f"scan {PRODUCTS_FILE}"):
    try:
      product = parse_product(obj, lineno)
    except _Skip as e:
      skips.add(e.reason, f"{PRODUCTS_FILE}:{lineno}: {e.detail}")
      continue
    if product.id in product_index:
      skips.add(DUPLICATE_PRODUCT_ID, f"{PRODUCTS_FILE}:{lineno}: id={product.id} first seen on line "
                f"{product_lines[product_index[product.id]]}")
      continue
    index = len(product_lines)
    product_index[product.id] = index
    product_lines.append(lineno)
    if on_product is not None:
      on_product(index, product)
  if not product_lines:
    raise CatalogError(f"{src / PRODUCTS_FILE}: no usable product lines "
                       f"(skipped: {skips.counts() or 'file is empty'})")

  # Queries.
  query_slot: dict[str, tuple[str, int, int]] = {}  # id -> (split, row in split, ordinal)
  rows: dict[str, list[QueryRow]] = {s: [] for s in SOURCE_QUERY_SPLITS}
  for lineno, obj in bar(_iter_jsonl(src / QUERIES_FILE, skips), f"scan {QUERIES_FILE}"):
    try:
      query = parse_query(obj, lineno)
    except _Skip as e:
      skips.add(e.reason, f"{QUERIES_FILE}:{lineno}: {e.detail}")
      continue
    if query.id in query_slot:
      skips.add(DUPLICATE_QUERY_ID, f"{QUERIES_FILE}:{lineno}: id={query.id}")
      continue
    query_slot[query.id] = (query.split, len(rows[query.split]), len(query_slot))
    rows[query.split].append(QueryRow(id=query.id, text=query.text, tags=query.tags, labels=[]))
  if not query_slot:
    raise CatalogError(f"{src / QUERIES_FILE}: no usable query lines "
                       f"(skipped: {skips.counts() or 'file is empty'})")

  # Qrels.
  num_qrels = 0
  num_products = len(product_lines)
  seen_pairs: set[int] = set()  # query ordinal * num_products + product index
  num_label_lines = 0  # Non-header lines, usable or not.
  first = True
  for lineno, line in bar(_iter_lines(src / QRELS_FILE, skips), f"scan {QRELS_FILE}"):
    fields = [_unquote(f.strip()) for f in line.split("\t")]
    was_first, first = first, False
    if len(fields) != 3:
      num_label_lines += 1
      skips.add(MALFORMED_QREL, f"{QRELS_FILE}:{lineno}: expected 3 tab-separated fields, got {len(fields)}")
      continue
    qid, pid, grade_text = fields
    grade = parse_grade(grade_text)
    if was_first and grade is None and qid not in query_slot:
      continue  # Header line.
    num_label_lines += 1
    if grade is None:
      skips.add(INVALID_GRADE, f"{QRELS_FILE}:{lineno}: grade {grade_text!r} is not one of E, S, C, I")
      continue
    if qid not in query_slot:
      skips.add(UNKNOWN_QUERY, f"{QRELS_FILE}:{lineno}: query id={qid}")
      continue
    if pid not in product_index:
      skips.add(UNKNOWN_PRODUCT, f"{QRELS_FILE}:{lineno}: product id={pid}")
      continue
    p = product_index[pid]
    split, row, ordinal = query_slot[qid]
    if ordinal * num_products + p in seen_pairs:
      kept = next(g for q, g in rows[split][row].labels if q == p)
      skips.add(DUPLICATE_QREL, f"{QRELS_FILE}:{lineno}: ({qid}, {pid}) already labelled {kept}"
                + ("" if grade == kept else f"; this line's {grade} is ignored"))
      continue
    seen_pairs.add(ordinal * num_products + p)
    rows[split][row].labels.append((p, grade))
    num_qrels += 1
  del seen_pairs
  if num_label_lines and not num_qrels:
    # Every label rejected is a format problem (spaces for tabs, ids from another export), not bad lines.
    qrel_reasons = (MALFORMED_QREL, INVALID_GRADE, UNKNOWN_QUERY, UNKNOWN_PRODUCT, DUPLICATE_QREL)
    counts = {r: n for r, n in skips.counts().items() if r in qrel_reasons}
    raise CatalogError(f"{src / QRELS_FILE}: none of its {num_label_lines} lines is a usable label "
                       f"(skipped: {counts}); each line must be query_id<TAB>product_id<TAB>E|S|C|I with ids "
                       f"from {QUERIES_FILE} and {PRODUCTS_FILE}")

  # Novel products: a seeded draw among products that are an exact match for some test query.
  heldout = np.zeros([num_products], bool)
  candidates = sorted({p for q in rows["test"] for p, g in q.labels if g == "E"})
  num_heldout = int(round(novel_product_fraction * len(candidates)))
  if num_heldout:
    rng = np.random.default_rng(seed)
    heldout[rng.choice(np.asarray(candidates, np.int64), size=num_heldout, replace=False)] = True

  train_texts = {normalize_query(q.text) for q in rows["train"]}
  rows["test_novel_query"] = [q for q in rows["test"] if normalize_query(q.text) not in train_texts]
  rows["test_novel_product"] = [q for q in rows["test"] if any(g == "E" and heldout[p] for p, g in q.labels)]

  return CatalogPlan(src_dir=src, product_lines=np.frombuffer(product_lines, np.int64).copy(), heldout=heldout,
                     queries=rows, pair_grades=pair_grades, num_qrels=num_qrels, skips=skips,
                     novel_product_fraction=float(novel_product_fraction), seed=int(seed))
