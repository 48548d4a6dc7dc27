"""TFDS builder `MmrCatalog` (configs products / queries / pairs) and random-access readers.

Written by `import_catalog` from a `catalog.CatalogPlan`; read by everything else through
`load_source(data_dir, table, split)` (a `tfds.data_sources` ArrayRecord source: `len(src)`,
`src[i]` -> dict of numpy / bytes) and `catalog_info(data_dir)`.

Layout: DATA_DIR/mmr_catalog/{products,queries,pairs}/1.0.0/, file_format=array_record,
disable_shuffling=True so row i of products is product index i (generation order).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import pathlib
import shutil
from typing import Any, Iterator

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from mmr_jax.data import catalog

BUILDER_NAME = "mmr_catalog"
DATASET_VERSION = "1.0.0"
TABLES = ("products", "queries", "pairs")
SPLITS = {
    "products": (catalog.PRODUCT_SPLIT,),
    "queries": catalog.QUERY_SPLITS,
    "pairs": catalog.PAIR_SPLITS,
}
# TFDS reserves the split name "all" (the union of all splits), so the one products split is stored
# as "products"; asking TFDS or load_source for "all" returns exactly it.
PRODUCTS_STORED_SPLIT = "products"
CATALOG_INFO_FILE = "catalog_info.json"
IMPORT_SUMMARY_FILE = "import_summary.json"
TOKENIZER_FILE = "tokenizer.model"


def _features(table: str) -> tfds.features.FeaturesDict:
  """Returns the TFDS feature spec of one table (see DESIGN.md)."""
  text = tfds.features.Text()
  if table == "products":
    return tfds.features.FeaturesDict({
        "id": text,
        "title": text,
        "description": text,
        "attributes": text,
        "text": text,
        # Raw encoded JPEG (b"" when has_image is False): the input pipeline decodes it, so
        # the table stays small and readers choose their own resolution.
        "image": tfds.features.Tensor(shape=(), dtype=np.object_),
        "has_image": tfds.features.Tensor(shape=(), dtype=np.bool_),
        "language": text,
        "num_words": tfds.features.Tensor(shape=(), dtype=np.int32),
        "heldout": tfds.features.Tensor(shape=(), dtype=np.bool_),
    })
  if table == "queries":
    return tfds.features.FeaturesDict({
        "id": text,
        "text": text,
        # Variable-length Tensors rather than Sequence(...): they decode to numpy arrays
        # (Sequence decodes to Python lists of scalars), same serialized content.
        "tags": tfds.features.Tensor(shape=(None,), dtype=np.object_),
        "relevant_index": tfds.features.Tensor(shape=(None,), dtype=np.int64),
        "relevant_grade": tfds.features.Tensor(shape=(None,), dtype=np.float32),
    })
  if table == "pairs":
    return tfds.features.FeaturesDict({
        "query_index": tfds.features.Tensor(shape=(), dtype=np.int64),
        "query_text": text,
        "product_index": tfds.features.Tensor(shape=(), dtype=np.int64),
        "grade": tfds.features.Tensor(shape=(), dtype=np.float32),
        "positives": tfds.features.Tensor(shape=(None,), dtype=np.int64),
        # The query's I-labelled products (not held out); catalogues imported before this field have none.
        "negatives": tfds.features.Tensor(shape=(None,), dtype=np.int64),
    })
  raise ValueError(f"unknown table {table!r}; expected one of {TABLES}")


def _key_step(num_rows: int) -> int:
  """Returns the gap between consecutive row keys (see _ordered_keys)."""
  return (1 << 128) // max(num_rows, 1)


def _ordered_keys(num_rows: int) -> Iterator[int]:
  """Yields one sort key per row, increasing, spread evenly over [0, 2**128).

  With disable_shuffling TFDS sorts rows by their raw key and buckets them by
  floor(key * 1000 / 2**128). Keys 0..N-1 would all land in bucket 0, which TFDS reads back
  whole into memory once a table passes 1 GB; spreading the keys keeps each bucket ~1/1000 of
  the table, so writing a catalogue of any size needs bounded memory.
  """
  step = _key_step(num_rows)
  for i in range(num_rows):
    yield i * step


class MmrCatalog(tfds.core.GeneratorBasedBuilder):
  """A validated catalogue: products (split all), queries (5 splits), pairs (train, validation)."""

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: "Products, queries (with novel-query/product test splits), pairs."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="products", description="One row per product; row = product index."),
      tfds.core.BuilderConfig(name="queries", description="Queries with resolved relevance labels."),
      tfds.core.BuilderConfig(name="pairs", description="(query, product) training pairs."),
  ]

  def __init__(self, *, plan: catalog.CatalogPlan | None = None, image_max_side: int = 256,
               jpeg_quality: int = 90, beam_skips_dir: str | None = None,
               beam_rows_per_chunk: int | None = None, **kwargs):
    """Builder of one table.

    Args:
      plan: the scanned catalogue (needed to write; not to read).
      image_max_side: longest image side after import.
      jpeg_quality: quality of the re-encoded images.
      beam_skips_dir: if set, products are written by an Apache Beam pipeline (download_config's
        beam_runner), and per-image skips go to JSON lines files in this directory (which every
        worker must be able to write), collected with `read_beam_image_skips`. Otherwise products
        are written in this process and skips land in `self.image_skips`.
      beam_rows_per_chunk: products per Beam work item.
      **kwargs: tfds.core.GeneratorBasedBuilder's (data_dir, config, ...).
    """
    # Set before super().__init__, which calls _info().
    self._plan = plan
    self._image_max_side = int(image_max_side)
    self._jpeg_quality = int(jpeg_quality)
    self._beam_skips_dir = beam_skips_dir
    self._beam_rows_per_chunk = int(beam_rows_per_chunk or BEAM_ROWS_PER_CHUNK)
    self.image_skips = catalog.SkipLog()
    self.num_with_image = 0
    super().__init__(**kwargs)

  # TFDS 4.9.10's code_path needs the `importlib_resources` backport (only declared for
  # Python < 3.9) for any builder defined in a package; its own fallback is this file's path.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=_features(self.builder_config.name),
        disable_shuffling=True,
        description=__doc__,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The plan says where the catalogue lives; nothing is downloaded.
    plan = self._plan
    if plan is None:
      raise ValueError("MmrCatalog is written by mmr_jax.data.import_catalog (it needs a CatalogPlan); "
                       "to read a prepared one use tfds_builder.load_source / tfds.builder_from_directory")
    table = self.builder_config.name
    if table == "products":
      if self._beam_skips_dir is not None:
        return {PRODUCTS_STORED_SPLIT: _beam_products(
            plan, self._beam_skips_dir, self._beam_rows_per_chunk, self._image_max_side,
            self._jpeg_quality)}
      return {PRODUCTS_STORED_SPLIT: self._generate_examples(plan, PRODUCTS_STORED_SPLIT)}
    # TFDS refuses to write a split with no rows, so empty splits are left out; catalog_info.json
    # still lists them with 0 rows and load_source returns an empty source for them.
    if table == "queries":
      splits = [s for s in catalog.QUERY_SPLITS if plan.queries[s]]
    else:
      splits = [s for s in catalog.PAIR_SPLITS if plan.num_pairs(s)]
    return {s: self._generate_examples(plan, s) for s in splits}

  def _generate_examples(self, plan: catalog.CatalogPlan, split: str):
    """Yields (key, row) of one split of this builder's table, in row order."""
    table = self.builder_config.name
    if table == "products":
      return self._generate_products(plan)
    if table == "queries":
      return self._generate_queries(plan, split)
    return self._generate_pairs(plan, split)

  def _generate_products(self, plan: catalog.CatalogPlan):
    keys = _ordered_keys(plan.num_products)
    for index, product in plan.iter_products():
      example, skip_ref = _product_example(plan.src_dir, product, bool(plan.heldout[index]),
                                           self._image_max_side, self._jpeg_quality)
      if skip_ref is not None:
        self.image_skips.add(*skip_ref)
      else:
        self.num_with_image += 1
      yield next(keys), example

  def _generate_queries(self, plan: catalog.CatalogPlan, split: str):
    rows = plan.queries[split]
    for key, q in zip(_ordered_keys(len(rows)), rows):
      yield key, {
          "id": q.id,
          "text": q.text,
          "tags": np.asarray(q.tags, np.object_),
          "relevant_index": np.asarray(q.relevant_index, np.int64),
          "relevant_grade": np.asarray(q.relevant_grade, np.float32),
      }

  def _generate_pairs(self, plan: catalog.CatalogPlan, split: str):
    keys = _ordered_keys(plan.num_pairs(split))
    for row in plan.iter_pairs(split):
      yield next(keys), {
          "query_index": row["query_index"],
          "query_text": row["query_text"],
          "product_index": row["product_index"],
          "grade": row["grade"],
          "positives": np.asarray(row["positives"], np.int64),
          "negatives": np.asarray(row["negatives"], np.int64),
      }


def _product_example(src_dir: pathlib.Path, product: catalog.Product, heldout: bool, image_max_side: int,
                     jpeg_quality: int) -> tuple[dict[str, Any], tuple[str, str] | None]:
  """Returns (products row, (skip reason, ref) if the image is unusable else None)."""
  image, reason, detail = catalog.load_image(src_dir, product.image, image_max_side, jpeg_quality)
  example = {
      "id": product.id,
      "title": product.title,
      "description": product.description,
      "attributes": product.attributes,
      "text": product.text,
      "image": image,
      "has_image": reason is None,
      "language": product.language,
      "num_words": product.num_words,
      "heldout": heldout,
  }
  if reason is None:
    return example, None
  return example, (reason, f"{catalog.PRODUCTS_FILE}:{product.lineno}: id={product.id}: {detail}")


_BEAM_SKIPS_PREFIX = "image_skips"
# Products per Beam work item: big enough to amortise per-element overhead, small enough that
# a few thousand products spread over all workers.
BEAM_ROWS_PER_CHUNK = 256


def _beam_product_rows(chunk: catalog.ProductChunk, *, src_dir: str, heldout: frozenset[int], step: int,
                       image_max_side: int, jpeg_quality: int):
  """Yields (key, products row) for one chunk, and TaggedOutput("skips", json line) per bad image."""
  from apache_beam import pvalue  # pylint: disable=g-import-not-at-top
  src = pathlib.Path(src_dir)
  for index, product in catalog.iter_chunk_products(src, chunk):
    example, skip_ref = _product_example(src, product, index in heldout, image_max_side, jpeg_quality)
    if skip_ref is not None:
      yield pvalue.TaggedOutput("skips", json.dumps({"index": index, "reason": skip_ref[0], "ref": skip_ref[1]},
                                                    ensure_ascii=False))
    yield index * step, example


@functools.lru_cache(maxsize=None)
def _beam_products_transform():
  """Returns the products PTransform class (defined lazily: apache_beam is optional)."""
  beam = tfds.core.lazy_imports.apache_beam

  class BeamProducts(beam.PTransform):
    """Reads, validates and re-encodes products in parallel chunks; bad images to a side output."""

    def __init__(self, plan, skips_dir, rows_per_chunk, image_max_side, jpeg_quality):
      super().__init__()
      # Only chunk boundaries (a few ints per chunk) and the held-out indexes travel with the
      # pipeline; workers read products.jsonl themselves, so it must be on a shared filesystem.
      self._chunks = plan.product_chunks(rows_per_chunk)
      self._skips_dir = skips_dir
      self._kwargs = dict(src_dir=str(plan.src_dir), heldout=frozenset(np.flatnonzero(plan.heldout).tolist()),
                          step=_key_step(plan.num_products), image_max_side=image_max_side,
                          jpeg_quality=jpeg_quality)

    def expand(self, pbegin):
      results = (pbegin
                 | "Chunks" >> beam.Create(self._chunks)
                 | "Spread" >> beam.Reshuffle()
                 | "Products" >> beam.FlatMap(_beam_product_rows, **self._kwargs).with_outputs("skips", main="rows"))
      _ = results.skips | "WriteSkips" >> beam.io.WriteToText(
          os.path.join(self._skips_dir, _BEAM_SKIPS_PREFIX), file_name_suffix=".jsonl")
      return results.rows

  return BeamProducts


def _beam_products(*args, **kwargs):
  """Returns the Beam PTransform writing the products split (see _beam_products_transform)."""
  return _beam_products_transform()(*args, **kwargs)


def read_beam_image_skips(skips_dir: str | os.PathLike) -> catalog.SkipLog:
  """Returns the image skips a Beam products build wrote, in product index order."""
  records = []
  for path in sorted(pathlib.Path(skips_dir).glob(f"{_BEAM_SKIPS_PREFIX}*.jsonl")):
    with open(path, encoding="utf-8") as f:
      records.extend(json.loads(line) for line in f if line.strip())
  log = catalog.SkipLog()
  for r in sorted(records, key=lambda r: r["index"]):
    log.add(r["reason"], r["ref"])
  return log


def build_table(plan: catalog.CatalogPlan, data_dir: str | os.PathLike, table: str, *,
                image_max_side: int = 256, jpeg_quality: int = 90, beam_runner: Any = None,
                beam_options: Any = None) -> MmrCatalog:
  """Returns the builder after writing one table of the catalogue under data_dir.

  With beam_runner (a runner name such as "DirectRunner", or a runner object) the products table
  is written by an Apache Beam pipeline and its image skips are already merged into
  `builder.image_skips` on return. beam_options: a `PipelineOptions` or a list of flags.
  """
  skips_dir = None
  if beam_runner is not None and table == "products":
    beam = tfds.core.lazy_imports.apache_beam
    if beam_options is None or isinstance(beam_options, (list, tuple)):
      beam_options = beam.options.pipeline_options.PipelineOptions(list(beam_options or []))
    skips_dir = os.path.join(os.fspath(data_dir), "_beam_image_skips")
  builder = MmrCatalog(plan=plan, image_max_side=image_max_side, jpeg_quality=jpeg_quality,
                       beam_skips_dir=skips_dir, data_dir=os.fspath(data_dir), config=table)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(
          try_download_gcs=False,
          compute_stats=tfds.download.ComputeStatsMode.SKIP,
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
          beam_runner=beam_runner if skips_dir else None,
          beam_options=beam_options if skips_dir else None,
      ),
  )
  if skips_dir is not None:
    builder.image_skips = read_beam_image_skips(skips_dir)
    builder.num_with_image = plan.num_products - builder.image_skips.total()
    shutil.rmtree(skips_dir, ignore_errors=True)
  return builder


class EmptySource:
  """Random-access source of a split that has no rows (len 0)."""

  def __init__(self, table: str, split: str):
    self.table, self.split = table, split

  def __len__(self) -> int:
    return 0

  def __getitem__(self, index):
    raise IndexError(f"{self.table}/{self.split} is empty (the catalogue has no rows for it)")

  def __getitems__(self, indices):
    if list(indices):
      raise IndexError(f"{self.table}/{self.split} is empty (the catalogue has no rows for it)")
    return []

  def __iter__(self):
    return iter(())

  def __repr__(self) -> str:
    return f"EmptySource({self.table}/{self.split})"


def table_dir(data_dir: str | os.PathLike, table: str) -> epath.Path:
  """Returns DATA_DIR/mmr_catalog/<table>/<version> (local or gs://)."""
  return epath.Path(data_dir) / BUILDER_NAME / table / DATASET_VERSION


def catalog_info(data_dir: str | os.PathLike) -> dict[str, Any]:
  """Returns DATA_DIR/catalog_info.json as a dict; raises FileNotFoundError with a hint."""
  path = epath.Path(data_dir) / CATALOG_INFO_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: {data_dir!s} is not an imported catalogue "
                            "(run python -m mmr_jax.data.import_catalog SRC_DIR --out DATA_DIR)")
  return json.loads(path.read_text(encoding="utf-8"))


def data_fingerprint(data_dir: str | os.PathLike) -> dict[str, Any]:
  """Returns what identifies an imported DATA_DIR's contents, cheaply (no table is read).

  sha256 of tokenizer.model and of catalog_info.json (which holds the row counts and, from the importer,
  `products_sha256`, a hash of the product ids in index order), plus those two fields readable.
  """
  root = epath.Path(os.fspath(data_dir))
  info_path = root / CATALOG_INFO_FILE
  info_bytes = info_path.read_bytes() if info_path.exists() else b"{}"  # hand-built tables (tests) have none
  info = json.loads(info_bytes.decode("utf-8"))
  return {"tokenizer_sha256": hashlib.sha256((root / TOKENIZER_FILE).read_bytes()).hexdigest(),
          "catalog_info_sha256": hashlib.sha256(info_bytes).hexdigest(),
          "num_products": info.get("num_products"), "products_sha256": info.get("products_sha256")}


def load_source(data_dir: str | os.PathLike, table: str, split: str | None = None):
  """Returns a random-access source of one split: `len(src)`, `src[i]` -> dict of numpy / bytes.

  Args:
    data_dir: an imported DATA_DIR.
    table: "products", "queries" or "pairs".
    split: a split of that table (products: "all", the default for products).
  """
  if table not in SPLITS:
    raise ValueError(f"unknown table {table!r}; expected one of {TABLES}")
  if split is None:
    if table != "products":
      raise ValueError(f"pass a split for {table}: one of {SPLITS[table]}")
    split = catalog.PRODUCT_SPLIT
  if split not in SPLITS[table]:
    raise ValueError(f"unknown split {split!r} for {table}; expected one of {SPLITS[table]}")
  path = table_dir(data_dir, table)
  if not (path / "dataset_info.json").is_file():
    raise FileNotFoundError(f"{path} holds no prepared {table} table: is {data_dir!s} an imported "
                            "catalogue (python -m mmr_jax.data.import_catalog SRC_DIR --out DATA_DIR)?")
  builder = tfds.builder_from_directory(os.fspath(path))
  if table == "products":
    split = PRODUCTS_STORED_SPLIT
  if split not in builder.info.splits:
    return EmptySource(table, split)
  return builder.as_data_source(split=split)
