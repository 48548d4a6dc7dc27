"""TFDS builder `MmrCatalog` (configs products / queries / pairs) and random-access readers.

Written by `import_catalog` from a `catalog.CatalogPlan`; read by everything else through
`load_source(data_dir, table, split)` (a `tfds.data_sources` ArrayRecord source: `len(src)`,
`src[i]` -> dict of numpy / bytes) and `catalog_info(data_dir)`.

Layout: DATA_DIR/mmr_catalog/{products,queries,pairs}/1.0.0/, file_format=array_record,
disable_shuffling=True so row i of products is product index i (generation order).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from mmr_jax.data import catalog

BUILDER_NAME = "mmr_catalog"
VERSION = "1.0.0"
TABLES = ("products", "queries", "pairs")
SPLITS = {
    "products": (catalog.PRODUCT_SPLIT,),
    "queries": catalog.QUERY_SPLITS,
    "pairs": catalog.PAIR_SPLITS,
}
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
        "tags": tfds.features.Sequence(text),
        "relevant_index": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.int64)),
        "relevant_grade": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.float32)),
    })
  if table == "pairs":
    return tfds.features.FeaturesDict({
        "query_index": tfds.features.Tensor(shape=(), dtype=np.int64),
        "query_text": text,
        "product_index": tfds.features.Tensor(shape=(), dtype=np.int64),
        "grade": tfds.features.Tensor(shape=(), dtype=np.float32),
        "positives": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.int64)),
    })
  raise ValueError(f"unknown table {table!r}; expected one of {TABLES}")


def _ordered_keys(num_rows: int) -> Iterator[int]:
  """Yields one sort key per row, increasing, spread evenly over [0, 2**128).

  With disable_shuffling TFDS sorts rows by their raw key and buckets them by
  floor(key * 1000 / 2**128). Keys 0..N-1 would all land in bucket 0, which TFDS reads back
  whole into memory once a table passes 1 GB; spreading the keys keeps each bucket ~1/1000 of
  the table, so writing a catalogue of any size needs bounded memory.
  """
  step = (1 << 128) // max(num_rows, 1)
  for i in range(num_rows):
    yield i * step


class MmrCatalog(tfds.core.GeneratorBasedBuilder):
  """A validated catalogue: products (split all), queries (5 splits), pairs (train, validation)."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {VERSION: "Products, queries (with novel-query/product test splits), pairs."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="products", description="One row per product; row = product index."),
      tfds.core.BuilderConfig(name="queries", description="Queries with resolved relevance labels."),
      tfds.core.BuilderConfig(name="pairs", description="(query, product) training pairs."),
  ]

  def __init__(self, *, plan: catalog.CatalogPlan | None = None, image_max_side: int = 256,
               jpeg_quality: int = 90, **kwargs):
    # Set before super().__init__, which calls _info().
    self._plan = plan
    self._image_max_side = int(image_max_side)
    self._jpeg_quality = int(jpeg_quality)
    self.image_skips = catalog.SkipLog()
    self.num_with_image = 0
    super().__init__(**kwargs)

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
      return {catalog.PRODUCT_SPLIT: self._generate_products(plan)}
    # TFDS refuses to write a split with no rows, so empty splits are left out; catalog_info.json
    # still lists them with 0 rows and load_source returns an empty source for them.
    if table == "queries":
      return {s: self._generate_queries(plan, s) for s in catalog.QUERY_SPLITS if plan.queries[s]}
    return {s: self._generate_pairs(plan, s) for s in catalog.PAIR_SPLITS if plan.num_pairs(s)}

  def _generate_examples(self, **kwargs):
    raise NotImplementedError("splits are generated by _split_generators' own generators")

  def _generate_products(self, plan: catalog.CatalogPlan):
    keys = _ordered_keys(plan.num_products)
    for index, product in plan.iter_products():
      image, reason, detail = catalog.load_image(plan.src_dir, product.image, self._image_max_side,
                                                 self._jpeg_quality)
      if reason is not None:
        self.image_skips.add(reason, f"{catalog.PRODUCTS_FILE}:{product.lineno}: id={product.id}: {detail}")
      else:
        self.num_with_image += 1
      yield next(keys), {
          "id": product.id,
          "title": product.title,
          "description": product.description,
          "attributes": product.attributes,
          "text": product.text,
          "image": image,
          "has_image": reason is None,
          "language": product.language,
          "num_words": product.num_words,
          "heldout": bool(plan.heldout[index]),
      }

  def _generate_queries(self, plan: catalog.CatalogPlan, split: str):
    rows = plan.queries[split]
    for key, q in zip(_ordered_keys(len(rows)), rows):
      yield key, {
          "id": q.id,
          "text": q.text,
          "tags": list(q.tags),
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
      }


def build_table(plan: catalog.CatalogPlan, data_dir: str | os.PathLike, table: str, *,
                image_max_side: int = 256, jpeg_quality: int = 90) -> MmrCatalog:
  """Returns the builder after writing one table of the catalogue under data_dir."""
  builder = MmrCatalog(plan=plan, image_max_side=image_max_side, jpeg_quality=jpeg_quality,
                       data_dir=os.fspath(data_dir), config=table)
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(
          try_download_gcs=False,
          compute_stats=tfds.download.ComputeStatsMode.SKIP,
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
      ),
  )
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


def table_dir(data_dir: str | os.PathLike, table: str) -> pathlib.Path:
  """Returns DATA_DIR/mmr_catalog/<table>/<version>."""
  return pathlib.Path(data_dir) / BUILDER_NAME / table / VERSION


def catalog_info(data_dir: str | os.PathLike) -> dict[str, Any]:
  """Returns DATA_DIR/catalog_info.json as a dict; raises FileNotFoundError with a hint."""
  path = pathlib.Path(data_dir) / CATALOG_INFO_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: {data_dir!s} is not an imported catalogue "
                            "(run python -m mmr_jax.data.import_catalog SRC_DIR --out DATA_DIR)")
  return json.loads(path.read_text(encoding="utf-8"))


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
  if split not in builder.info.splits:
    return EmptySource(table, split)
  return builder.as_data_source(split=split)
