"""Catalogue folder reading: one streaming scan that validates every line and plans the import.

`scan_catalog` reads products.jsonl, queries.jsonl and qrels.tsv once and returns a `CatalogPlan`:
which products.jsonl lines become which product index, the query rows of every split with their
labels, the held-out (novel) products, and every skipped line with its reason. Only ids and line
numbers stay in memory; products are re-read from the file when the tables are written, whole
(`CatalogPlan.iter_products`) or in chunks Beam workers read alone (`iter_chunk_products`).
"""

from __future__ import annotations

import array
import dataclasses
import json
import os
import pathlib
from typing import Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from mmr_jax.data.catalog.schema import (
    DUPLICATE_PRODUCT_ID, DUPLICATE_QREL, DUPLICATE_QUERY_ID, GRADE_GAIN, INVALID_GRADE, MALFORMED_JSON,
    MALFORMED_QREL, NON_UTF8, PRODUCTS_FILE, QRELS_FILE, QUERIES_FILE, REQUIRED_FILES, SOURCE_QUERY_SPLITS,
    UNKNOWN_PRODUCT, UNKNOWN_QUERY, CatalogError, Product, Skip, SkipLog, normalize_query, parse_grade,
    parse_product, parse_query)


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


def _unquote(field: str) -> str:
  """Returns a TSV field without the double quotes spreadsheet and pandas exports may put around it."""
  if len(field) >= 2 and field[0] == field[-1] == '"':
    return field[1:-1].replace('""', '"')
  return field


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

  @property
  def negatives(self) -> list[int]:
    return [p for p, g in self.labels if g == "I"]


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
    """Yields pair rows for a pairs split: (query, product) with grade in pair_grades, not held out.

    Each row also carries its query's E-labelled products (`positives`) and its I-labelled products that are
    not held out (`negatives`: judged irrelevant, the hardest negatives a query has; data/hard_negatives.py).
    """
    for qi, q in enumerate(self.queries[split]):
      positives = q.positives
      negatives = [p for p in q.negatives if not self.heldout[p]]
      for p, g in q.labels:
        if g in self.pair_grades and not self.heldout[p]:
          yield {"query_index": qi, "query_text": q.text, "product_index": p,
                 "grade": GRADE_GAIN[g], "positives": positives, "negatives": negatives}

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
      except (UnicodeDecodeError, json.JSONDecodeError, Skip) as e:
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
    return tqdm(it, desc=desc, unit=" lines", mininterval=1.0)

  def valid_rows(name, parse):
    """Yields (line number, row) for the lines of `name` that `parse` accepts; logs the others."""
    for lineno, obj in bar(_iter_jsonl(src / name, skips), f"scan {name}"):
      try:
        row = parse(obj, lineno)
      except Skip as e:
        skips.add(e.reason, f"{name}:{lineno}: {e.detail}")
        continue
      yield lineno, row

  # Products: only the id -> index map and line numbers stay in memory.
  product_index: dict[str, int] = {}
  product_lines = array.array("q")  # 8 bytes a product, not a Python int object each.
  for lineno, product in valid_rows(PRODUCTS_FILE, parse_product):
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
  for lineno, query in valid_rows(QUERIES_FILE, parse_query):
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

