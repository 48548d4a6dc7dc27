"""Grain input pipelines: stage-1 / stage-2 training and exact multi-host eval.

Why grain (not tf.data):
- Sampling is index based: the order of an epoch is a pure function of
  (seed, epoch, position), computed by grain's `index_shuffle`, so a run is
  reproducible and a host's place in the stream is one integer. The iterator
  state (`it.get_state()`, a small JSON-able dict) is saved next to the model
  by Orbax (`CheckpointSave` / `CheckpointRestore` below) and a resumed run
  neither repeats nor skips an example.
- Per-host sharding is a slice of that index space by `jax.process_index()`:
  every epoch is shuffled globally, then host h takes positions h, h+P, ...,
  so hosts read disjoint examples that together cover the epoch.
- No TensorFlow at training time: rows come from the TFDS array_record files
  through random access, JPEGs are decoded with PIL, text is tokenised with the
  SentencePiece Python bindings. Worker processes (`num_workers`) run the same
  Python in parallel.

Batches follow DESIGN.md "Batches". Decisions the contract leaves open:
- Stage 1 iterates over products that are not `heldout` (the novel-product
  split must stay unseen by every stage). Products without an image are kept
  (zeros, `has_image=False`; the loss masks them) unless
  `config.stage1_skip_no_image` is True.
- Images are squashed (whole image resized to image_size x image_size, no
  centre crop, so no part of the product is cut away) with antialiased
  bilinear resampling; training may instead take an Inception-style random
  resized crop and a horizontal flip, seeded by (seed, stream position).
- `seed` drives everything; `config.shuffle_seed`, when not None, overrides
  the sampling order only (same augmentation noise, different order).

Optional `config.data` keys beyond the shared config: `stage1_skip_no_image`
(False), `read_threads` (8, grain threads per process), `prefetch_buffer_size`
(256 examples). A state restores only into an iterator built with the same
data, batch size, host count and `num_workers`. With `num_workers > 0` batch
arrays are grain `SharedMemoryArray`s (np.ndarray subclasses, no copy between
processes); drop them once they are on device.

Checkpointing with Orbax (what checkpoint.py does):
  mngr = ocp.CheckpointManager(dir, item_handlers={
      "state": ..., "data": pipeline.CheckpointHandler()})
  mngr.save(step, args=ocp.args.Composite(..., data=pipeline.CheckpointSave(it)))
  mngr.restore(step, args=ocp.args.Composite(
      ..., data=pipeline.CheckpointRestore(make_train_iterator(...))))
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
from typing import Any, Mapping, Sequence

from etils import epath
import grain
import numpy as np
from PIL import Image, ImageOps

from mmr_jax.data import catalog
from mmr_jax.data import pseudo_queries
from mmr_jax.data.tokenizer import Conventions, Tokenizer

# Orbax checkpoint args for a grain iterator; checkpoint.py registers these in
# its CheckpointManager (item name e.g. "data"). Each host writes
# `process_{i}-of-{n}.json` with its own state.
CheckpointHandler = grain.checkpoint.CheckpointHandler
CheckpointSave = grain.checkpoint.CheckpointSave
CheckpointRestore = grain.checkpoint.CheckpointRestore

TOKENIZER_FILE = "tokenizer.model"
PAD_INDEX = -1  # product/query index (and positives) of padding rows

_log = logging.getLogger(__name__)
_WARNED: set = set()  # (data_dir, split, positives_k) already warned about

# Random access: len(src), src[i] -> dict. grain pickles sources into each
# worker process, which reopens the array_record files there.
_Source = Any


def open_source(data_dir: str, table: str, split: str) -> _Source:
  """Returns the random-access source of DATA_DIR/mmr_catalog/<table>/<split>."""
  from mmr_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  return tfds_builder.load_source(data_dir, table, split)


def tokenizer_path(data_dir: str, config: Any = None) -> str:
  """Returns the SentencePiece model a run tokenises with (every reader of text ids asks here).

  `config` is `config.data`: its `tokenizer.path` (the model shipped with a pretrained checkpoint,
  e.g. SigLIP's c4_en) wins; without one it is the catalogue's own DATA_DIR/tokenizer.model.
  Either may be a gs:// path.
  """
  tok_cfg = _cfg_get(config, "tokenizer") if config is not None else None
  path = _cfg_get(tok_cfg, "path") if tok_cfg is not None else None
  if path:
    path = str(path) if str(path).startswith("gs://") else os.path.expanduser(str(path))
    if not epath.Path(path).is_file():
      raise FileNotFoundError(f"config.data.tokenizer.path={path!r} is not a file (the SentencePiece "
                              ".model that goes with the pretrained checkpoint)")
    return path
  path = epath.Path(data_dir) / TOKENIZER_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: DATA_DIR must be written by import_catalog / "
        "make_synthetic")
  return str(path)


def tokenizer_conventions(config: Any = None) -> Conventions:
  """Returns the eos / pad / bos / lowercase conventions of `config.data.tokenizer` (defaults: ours)."""
  return Conventions.from_config(_cfg_get(config, "tokenizer") if config is not None else None)


def load_tokenizer(data_dir: str, config: Any = None) -> Tokenizer:
  """Returns the run's Tokenizer: `tokenizer_path(data_dir, config)` with its conventions."""
  return Tokenizer(tokenizer_path(data_dir, config), conventions=tokenizer_conventions(config))


# ----------------------------------------------------------------------------
# Row fields.


def _text(row: Mapping[str, Any], key: str) -> str:
  """Returns row[key] as str (TFDS numpy decoding gives bytes)."""
  try:
    value = row[key]
  except KeyError:
    raise KeyError(f"row has no field {key!r} (fields: {sorted(row)})") from None
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return _text({key: value.item()}, key)
  return str(value)


def _bytes(row: Mapping[str, Any], key: str) -> bytes:
  value = row[key]
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, str):
    raise TypeError(f"field {key!r} must hold encoded image bytes, got str")
  return bytes(value)


# ----------------------------------------------------------------------------
# Images.


@dataclasses.dataclass(frozen=True)
class Augment:
  """Training image augmentation (config.augment)."""
  random_crop: bool = False
  crop_scale_min: float = 0.35
  flip: bool = False

  @classmethod
  def from_config(cls, cfg: Any) -> "Augment":
    if cfg is None:
      return cls()
    get = cfg.get if hasattr(cfg, "get") else lambda k, d: getattr(cfg, k, d)
    aug = cls(random_crop=bool(get("random_crop", False)),
              crop_scale_min=float(get("crop_scale_min", 0.35)),
              flip=bool(get("flip", False)))
    if not 0.0 < aug.crop_scale_min <= 1.0:
      raise ValueError(f"config.data.augment.crop_scale_min="
                       f"{aug.crop_scale_min} must be in (0, 1]")
    return aug


def _random_box(width: int, height: int, scale_min: float,
                rng: np.random.Generator) -> tuple[int, int, int, int]:
  """Returns an Inception-style crop box (left, top, right, bottom)."""
  area = width * height
  log_ratio = (math.log(3 / 4), math.log(4 / 3))
  for _ in range(10):
    target = area * rng.uniform(scale_min, 1.0)
    ratio = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * ratio)))
    h = int(round(math.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  return 0, 0, width, height


def decode_image(data: bytes, size: int, *, augment: Augment | None = None,
                 rng: np.random.Generator | None = None,
                 ) -> tuple[np.ndarray, bool]:
  """Returns (uint8 [size, size, 3], ok); (zeros, False) if empty or corrupt.

  Without augmentation the whole image is resized to a square (what eval and
  export see). Any mode (L, P, RGBA, CMYK, 16-bit) becomes RGB as the importer
  converts it (`catalog.to_rgb`: transparency composited on white).
  """
  blank = np.zeros((size, size, 3), np.uint8)
  if not data:
    return blank, False
  augment = augment or Augment()
  crop = augment.random_crop and rng is not None
  try:
    img = Image.open(io.BytesIO(data))
    # JPEG DCT-domain downscaling: a 4000 px photo decodes at ~1/8 the cost.
    # Keep enough pixels for the smallest random crop to still fill `size`.
    need = size / math.sqrt(augment.crop_scale_min) if crop else size
    img.draft("RGB", (int(need) + 1, int(need) + 1))
    if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation (phone photos): upright, as imported
      img = ImageOps.exif_transpose(img)
    img = catalog.to_rgb(img)  # as the importer converts: transparency on white, wide greyscale scaled
    box = (0, 0, img.width, img.height)
    if crop:
      box = _random_box(img.width, img.height, augment.crop_scale_min, rng)
    img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    out = np.asarray(img, dtype=np.uint8)
  except Exception as e:  # PIL raises many types for bad data
    _log.warning("undecodable image (%d bytes): %s", len(data), e)
    return blank, False
  if augment.flip and rng is not None and rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out), True


# ----------------------------------------------------------------------------
# Per-example transforms (module level so grain can pickle them to workers).


@dataclasses.dataclass(frozen=True)
class _Lens:
  image_size: int
  query_len: int
  product_len: int
  title_len: int
  positives_k: int


def _product_features(product: Mapping[str, Any], tok: Tokenizer, lens: _Lens,
                      augment: Augment | None, rng: np.random.Generator | None,
                      with_title: bool) -> dict[str, np.ndarray]:
  """Returns tokens + image features of one products row."""
  has_image = bool(np.asarray(product["has_image"]))
  image, ok = decode_image(_bytes(product, "image") if has_image else b"",
                           lens.image_size, augment=augment, rng=rng)
  out = {
      "product_tokens": tok.encode([_text(product, "text")],
                                   lens.product_len)[0],  # [Lp]
      "image": image,  # [H, W, 3]
      "has_image": np.bool_(has_image and ok),
  }
  if with_title:
    out["title_tokens"] = tok.encode([_text(product, "title")],
                                     lens.title_len)[0]  # [Lt]
  return out


class _Stage1Example(grain.transforms.RandomMap):
  """Product index -> stage-1 example, None for skipped products.

  Training takes the products that are not held out; validation (`heldout=True`) the held-out ones,
  which no stage trains on, so the stage-1 validation loss is measured on unseen products.
  """

  def __init__(self, products: _Source, tok: Tokenizer, lens: _Lens,
               augment: Augment, skip_no_image: bool, heldout: bool = False,
               pseudo_queries: bool = False):
    self._products, self._tok, self._lens = products, tok, lens
    self._augment, self._skip_no_image = augment, skip_no_image
    self._heldout, self._pseudo_queries = heldout, pseudo_queries

  def random_map(self, index, rng: np.random.Generator):
    index = int(index)
    product = self._products[index]
    if bool(np.asarray(product["heldout"])) != self._heldout:
      return None
    if self._skip_no_image and not bool(np.asarray(product["has_image"])):
      return None
    out = _product_features(product, self._tok, self._lens, self._augment, rng,
                            with_title=True)
    out["product_index"] = np.int32(index)
    if self._pseudo_queries:  # text-side domain alignment: the product's own terms as its query
      text = pseudo_queries.sample(_text(product, "title"), _text(product, "attributes"),
                                   _text(product, "description"), rng)
      out["query_tokens"] = self._tok.encode([text], self._lens.query_len)[0]  # [Lq]
    return out


def _pad_positives(values: Any, k: int) -> np.ndarray:
  """Returns int32 [k]: the first k values, padded with PAD_INDEX."""
  values = np.asarray(values, dtype=np.int64).reshape(-1)[:k]
  out = np.full((k,), PAD_INDEX, np.int32)
  out[:len(values)] = values
  return out


class _Stage2Example(grain.transforms.RandomMap):
  """Pair index -> stage-2 example (the product row fetched by index).

  With probability `pseudo_rate` the pair is replaced by a pseudo-query of a
  random product that is not held out (`pseudo_queries.sample`; query_index
  PAD_INDEX, the product its only positive).
  """

  def __init__(self, pairs: _Source, products: _Source, tok: Tokenizer,
               lens: _Lens, augment: Augment, pseudo_rate: float = 0.0):
    self._pairs, self._products, self._tok = pairs, products, tok
    self._lens, self._augment = lens, augment
    self._num_products = len(products)
    self._pseudo_rate = pseudo_rate

  def _pseudo_pair(self, rng: np.random.Generator):
    # Rejection sampling: held-out products are a small fraction of any catalogue that trains.
    for _ in range(64):
      index = int(rng.integers(self._num_products))
      product = self._products[index]
      if bool(np.asarray(product["heldout"])):
        continue
      text = pseudo_queries.sample(_text(product, "title"), _text(product, "attributes"),
                                   _text(product, "description"), rng)
      if text:
        return index, product, text
    return None

  def random_map(self, index, rng: np.random.Generator):
    if self._pseudo_rate and rng.random() < self._pseudo_rate:
      pseudo = self._pseudo_pair(rng)
      if pseudo is not None:
        product_index, product, text = pseudo
        out = _product_features(product, self._tok, self._lens, self._augment, rng, with_title=True)
        out.update(query_tokens=self._tok.encode([text], self._lens.query_len)[0],
                   product_index=np.int32(product_index), query_index=np.int32(PAD_INDEX),
                   grade=np.float32(1.0), positives=_pad_positives([product_index], self._lens.positives_k))
        return out
    pair = self._pairs[int(index)]
    product_index = int(np.asarray(pair["product_index"]))
    if not 0 <= product_index < self._num_products:
      raise IndexError(f"pairs row {int(index)}: product_index={product_index}"
                       f" outside [0, {self._num_products})")
    product = self._products[product_index]
    out = _product_features(product, self._tok, self._lens, self._augment, rng,
                            with_title=True)
    out.update(
        query_tokens=self._tok.encode([_text(pair, "query_text")],
                                      self._lens.query_len)[0],  # [Lq]
        product_index=np.int32(product_index),
        query_index=np.int32(np.asarray(pair["query_index"])),
        grade=np.float32(np.asarray(pair["grade"])),
        positives=_pad_positives(pair["positives"],
                                 self._lens.positives_k),  # [K]
    )
    return out


def _pad_product(lens: _Lens) -> dict[str, np.ndarray]:
  return {
      "product_tokens": np.zeros((lens.product_len,), np.int32),
      "image": np.zeros((lens.image_size, lens.image_size, 3), np.uint8),
      "has_image": np.bool_(False),
      "product_index": np.int32(PAD_INDEX),
      "mask": np.bool_(False),
  }


class _EvalProduct(grain.transforms.Map):
  """Local position -> eval products example (or a masked pad row)."""

  def __init__(self, products: _Source, tok: Tokenizer, lens: _Lens,
               start: int, stop: int):
    self._products, self._tok, self._lens = products, tok, lens
    self._start, self._stop = start, stop

  def map(self, position):
    index = self._start + int(position)
    if index >= self._stop:
      return _pad_product(self._lens)
    out = _product_features(self._products[index], self._tok, self._lens,
                            augment=None, rng=None, with_title=False)
    out.update(product_index=np.int32(index), mask=np.bool_(True))
    return out


class _EvalQuery(grain.transforms.Map):
  """Local position -> eval queries example (or a masked pad row)."""

  def __init__(self, queries: _Source, tok: Tokenizer, lens: _Lens,
               start: int, stop: int):
    self._queries, self._tok, self._lens = queries, tok, lens
    self._start, self._stop = start, stop

  def map(self, position):
    index = self._start + int(position)
    if index >= self._stop:
      return {"query_tokens": np.zeros((self._lens.query_len,), np.int32),
              "query_index": np.int32(PAD_INDEX), "mask": np.bool_(False)}
    tokens = self._tok.encode([_text(self._queries[index], "text")],
                              self._lens.query_len)[0]
    return {"query_tokens": tokens, "query_index": np.int32(index),
            "mask": np.bool_(True)}


def _stack(examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Returns the examples stacked on a new leading batch axis."""
  return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


# ----------------------------------------------------------------------------
# Config and host helpers.


def _catalog_info(data_dir: str) -> dict:
  """Returns catalog_info.json, or {} for tables without one (hand-built in tests): nothing to warn about."""
  from mmr_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  try:
    return tfds_builder.catalog_info(data_dir)
  except FileNotFoundError:
    return {}


def _cfg_get(config: Any, key: str, default: Any = None) -> Any:
  if hasattr(config, "get"):
    return config.get(key, default)
  return getattr(config, key, default)


def _cfg_require(config: Any, key: str) -> Any:
  value = _cfg_get(config, key)
  if value is None:
    raise ValueError(f"config.data.{key} is required")
  return value


def _lens(config: Any) -> _Lens:
  lens = _Lens(image_size=int(_cfg_require(config, "image_size")),
               query_len=int(_cfg_require(config, "query_len")),
               product_len=int(_cfg_require(config, "product_len")),
               title_len=int(_cfg_require(config, "title_len")),
               positives_k=int(_cfg_get(config, "positives_k", 8) or 8))
  for field in dataclasses.fields(lens):
    if getattr(lens, field.name) <= 0:
      raise ValueError(f"config.data.{field.name}="
                       f"{getattr(lens, field.name)} must be positive")
  return lens


def _host(process_index: int | None, process_count: int | None
          ) -> tuple[int, int]:
  """Returns (process_index, process_count), defaulting to JAX's."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in "
                     f"[0, process_count={process_count})")
  return int(process_index), int(process_count)


def _per_host(batch_size: int, process_count: int, what: str) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f"{what}={batch_size} must be a positive multiple of "
                     f"process_count={process_count}")
  return batch_size // process_count


def _finish(ds: grain.MapDataset, per_host_batch: int, config: Any, *,
            train: bool) -> grain.DatasetIterator:
  """Returns a checkpointable iterator: threads, batching, worker processes.

  Training batches after `to_iter_dataset`, so threads work per example and
  skipped (None) examples drop out before batching; with worker processes each
  worker batches its own slice, so batches depend on `num_workers` (fixed per
  run). Eval batches the MapDataset itself: batch b holds rows
  [b*B, (b+1)*B) whatever the worker count, which keeps row order.
  """
  threads = int(_cfg_get(config, "read_threads", 8) or 0)
  if train:
    read = grain.ReadOptions(
        num_threads=threads,
        prefetch_buffer_size=int(_cfg_get(config, "prefetch_buffer_size", 256)))
    it_ds = ds.to_iter_dataset(read).batch(
        per_host_batch, drop_remainder=True, batch_fn=_stack)
  else:
    # Buffer counts whole batches here: a few per thread is plenty.
    read = grain.ReadOptions(num_threads=threads,
                             prefetch_buffer_size=max(2, 2 * threads))
    it_ds = ds.batch(per_host_batch, batch_fn=_stack).to_iter_dataset(read)
  num_workers = int(_cfg_get(config, "num_workers", 0) or 0)
  if num_workers > 0:
    # grain's worker processes read absl flags; outside an absl.app entry
    # point (tests, notebooks, tools) nothing parsed them yet.
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it_ds)


def _check_stage1_rows(data_dir: str, products: _Source, skip_no_image: bool,
                       warn: bool = True, heldout: bool = False) -> None:
  """Raises ValueError if stage 1 would skip every product (it would wait forever for a batch).

  Reads products in index order up to the first usable one: one row on any
  ordinary catalogue, all of them only when none is usable. `warn`: log when
  no product has an image (once per run, not per validation iterator).
  `heldout`: check the held-out products (stage-1 validation) instead.
  """
  if len(products) == 0:
    return  # Reported by the caller as an empty table.
  for i in range(len(products)):
    row = products[i]
    if bool(np.asarray(row["heldout"])) != heldout:
      continue
    if skip_no_image and not bool(np.asarray(row["has_image"])):
      continue
    break
  else:
    why = ("held out for the novel-product split (import with a smaller "
           "--novel_product_fraction)")
    if heldout:
      why = ("in training: none is held out to validate stage 1 on (import with "
             "--novel_product_fraction > 0)")
    if skip_no_image:
      why += " or have no image (config.data.stage1_skip_no_image=True)"
    raise ValueError(f"{data_dir}: stage 1 has no product to train on: all "
                     f"{len(products)} products are {why}")
  if not warn:
    return
  if _catalog_info(data_dir).get("num_with_image", 1) == 0:
    # Every image-text pair is masked out of the loss: it stays 0 and the image tower does not move.
    _log.warning("%s: no product has an image, so stage 1 (image <-> title) "
                 "has nothing to learn", data_dir)


def _mix_seed(seed: int) -> int:
  """Returns a uint32 hash of `seed`.

  grain reseeds the shuffle of epoch e with seed + e, so without mixing run
  seed=1 would replay the epoch order of seed=0 shifted by one epoch.
  """
  return int(np.random.SeedSequence([int(seed) % 2**32, 0x5EED])
             .generate_state(1)[0])


# ----------------------------------------------------------------------------
# Public API.


def make_train_iterator(data_dir: str, stage: int, config: Any, *, seed: int,
                        process_index: int | None = None,
                        process_count: int | None = None,
                        split: str = "train", augment: bool | None = None,
                        ) -> grain.DatasetIterator:
  """Returns an infinite iterator of this host's training batches (numpy dicts).

  Args:
    data_dir: DATA_DIR (tokenizer.model + mmr_catalog/).
    stage: 1 (title/image alignment over products) or 2 (query/product pairs
      from `pairs/<split>`).
    config: `config.data` (batch_size is global; each host yields
      batch_size // process_count rows).
    seed: base seed (order and augmentation).
    process_index, process_count: default to jax.process_index/count().
    split: pairs split for stage 2 ("train" or "validation", e.g. for a
      validation loss). Stage 1 reads the products table: "train" the
      products that are not held out, any other split the held-out ones.
    augment: False turns config.augment off (validation batches); None keeps
      the config.

  The iterator supports `get_state()` / `set_state()`; `num_workers` must be
  the same when restoring. Stage 1 rows: title_tokens, product_tokens, image,
  has_image, product_index. Stage 2 adds query_tokens, query_index, grade,
  positives [B, K] (pad -1).
  """
  if stage not in (1, 2):
    raise ValueError(f"stage={stage} must be 1 or 2")
  host, hosts = _host(process_index, process_count)
  global_batch = int(_cfg_require(config, "batch_size"))
  per_host_batch = _per_host(global_batch, hosts, "config.data.batch_size")
  lens = _lens(config)
  aug = Augment.from_config(_cfg_get(config, "augment"))
  if augment is False:
    aug = Augment()
  tok = load_tokenizer(data_dir, config)
  products = open_source(data_dir, "products", "all")
  if stage == 1:
    num_rows = len(products)
    skip_no_image = bool(_cfg_get(config, "stage1_skip_no_image", False))
    heldout = split != "train"
    _check_stage1_rows(data_dir, products, skip_no_image,
                       warn=split == "train", heldout=heldout)
    example = _Stage1Example(products, tok, lens, aug,
                             skip_no_image=skip_no_image, heldout=heldout,
                             pseudo_queries=bool(_cfg_get(config, "stage1_pseudo_queries", False)))
    table = "products/all"
  else:
    pairs = open_source(data_dir, "pairs", split)
    num_rows = len(pairs)
    most = int((_catalog_info(data_dir).get("max_positives") or {}).get(split, 0))
    if most > lens.positives_k and (data_dir, split, lens.positives_k) not in _WARNED:
      _WARNED.add((data_dir, split, lens.positives_k))  # validation iterators are made at every evaluation
      _log.warning("%s: a %s query has %d E-labelled products but config.data.positives_k=%d; the ones past %d "
                   "count as in-batch negatives of their query%s. Set config.data.positives_k=%d to mask them all.",
                   data_dir, split, most, lens.positives_k, lens.positives_k,
                   "" if split == "train" else " (in the validation loss and accuracy)", most)
    # Validation batches score the labelled pairs only.
    pseudo_rate = float(_cfg_get(config, "pseudo_queries", 0.0) or 0.0) if split == "train" else 0.0
    if not 0.0 <= pseudo_rate < 1.0:
      raise ValueError(f"config.data.pseudo_queries={pseudo_rate} must be in [0, 1)")
    example = _Stage2Example(pairs, products, tok, lens, aug, pseudo_rate)
    table = f"pairs/{split}"
  if num_rows == 0:
    raise ValueError(f"{data_dir}: {table} has no rows (stage {stage} needs "
                     "some)")

  if num_rows < global_batch and split == "train":
    # Each batch then holds the same rows several times; repeats are masked out of the negatives, so
    # the contrastive loss sees at most num_rows distinct pairs and, with one, learns nothing.
    _log.warning("%s: %s has %d rows for a batch of %d: batches repeat the same examples, which leaves "
                 "the contrastive loss few negatives (%s)", data_dir, table, num_rows, global_batch,
                 "nothing to learn" if num_rows < 2 else "lower config.data.batch_size or add data")
  seed = int(seed) % 2**32
  order_seed = _cfg_get(config, "shuffle_seed")
  order_seed = _mix_seed(seed if order_seed is None else order_seed)
  # Shuffle before slicing: each epoch is one global permutation (reseeded per
  # epoch by grain), host h reading positions h, h+P, ... of it. The example
  # map sits before the slice too, so its RNG is keyed by the global stream
  # position: no two hosts share augmentation noise.
  ds = grain.MapDataset.range(num_rows).shuffle(seed=order_seed)
  ds = ds.random_map(example, seed=seed)
  ds = ds[host::hosts].repeat(None)
  return _finish(ds, per_host_batch, config, train=True)


def product_truncation(data_dir: str, config: Any, sample: int = 2000,
                       seed: int = 0) -> dict[str, Any]:
  """Returns how `config.product_len` cuts the product text (title | description | attributes), on a sample.

  `config` is `config.data` (its tokenizer and product_len).
  {"product_len", "sampled", "truncated" (fraction of products cut), "by_field": {field: fraction
  of products that lose part of that field}, "tokens": {"p50", "p95", "max"}}. Fields are cut from
  the end, so attributes go first: what textual queries (material, care, size) ask for.
  """
  products = open_source(data_dir, "products", "all")
  tok = load_tokenizer(data_dir, config)
  product_len = int(_cfg_require(config, "product_len"))
  n = len(products)
  rows = (np.arange(n) if n <= sample else
          np.sort(np.random.default_rng(seed).choice(n, sample, replace=False)))
  cut = {"title": 0, "description": 0, "attributes": 0}
  totals = []
  count = tok.num_tokens
  for i in rows:
    row = products[int(i)]
    title, desc, attrs = (_text(row, k) for k in ("title", "description", "attributes"))
    total = count(_text(row, "text"))
    totals.append(total)
    if total <= product_len:
      continue
    before_attrs = count(catalog.product_text(title, desc, ""))
    cut["attributes"] += bool(attrs)  # the last field: any cut reaches it
    cut["description"] += bool(desc) and before_attrs > product_len
    cut["title"] += count(catalog.product_text(title, "", "")) > product_len
  totals = np.asarray(totals or [0])
  m = max(len(rows), 1)
  return {"product_len": int(product_len), "sampled": int(len(rows)),
          "truncated": float(np.mean(totals > product_len)),
          "by_field": {k: v / m for k, v in cut.items()},
          "tokens": {"p50": float(np.percentile(totals, 50)), "p95": float(np.percentile(totals, 95)),
                     "max": int(totals.max())}}


def move_train_iterator(it: grain.DatasetIterator, position: int) -> bool:
  """Returns whether a fresh make_train_iterator iterator could be moved to `position` of this host's stream.

  The position counts examples read by this host: after s steps of a global batch B on P hosts, s * B / P
  continues the same shuffled epochs. Without worker processes the iterator's state is that one number;
  with them (config.num_workers > 0) it is per worker, and nothing is moved.
  """
  state = it.get_state()
  if not isinstance(state, dict) or set(state) != {"next_index"}:
    return False
  it.set_state({"next_index": int(position)})
  return True


def eval_host_slice(num_rows: int, batch_size: int, process_index: int,
                    process_count: int) -> tuple[int, int, int]:
  """Returns (start, stop, num_batches) of this host's contiguous eval rows.

  Every host gets ceil(num_rows / hosts) row slots and the same num_batches,
  so collective ops inside the eval loop line up; slots past `stop` are pads.
  """
  per_host_batch = _per_host(batch_size, process_count, "eval batch_size")
  rows_per_host = -(-num_rows // process_count)
  start = min(num_rows, process_index * rows_per_host)
  stop = min(num_rows, start + rows_per_host)
  num_batches = -(-rows_per_host // per_host_batch)
  return start, stop, num_batches


def make_eval_iterator(data_dir: str, table: str, split: str, config: Any,
                       batch_size: int, process_index: int | None = None,
                       process_count: int | None = None,
                       ) -> grain.DatasetIterator:
  """Returns a finite iterator over ALL rows of a table, padded with `mask`.

  `batch_size` is global (each host yields batch_size // process_count rows
  per batch). Host h reads a contiguous slice in row order; the last batch is
  padded with mask=False rows (index -1, zero tokens/image) and every host
  yields the same number of batches.
  Products batch: product_tokens, image, has_image, product_index, mask.
  Queries batch: query_tokens, query_index, mask.
  """
  host, hosts = _host(process_index, process_count)
  lens = _lens(config)
  tok = load_tokenizer(data_dir, config)
  if table == "products":
    source = open_source(data_dir, "products", split or "all")
    fn_cls = _EvalProduct
  elif table == "queries":
    source = open_source(data_dir, "queries", split)
    fn_cls = _EvalQuery
  else:
    raise ValueError(f"table={table!r} must be 'products' or 'queries'")
  start, stop, num_batches = eval_host_slice(len(source), batch_size, host,
                                             hosts)
  per_host_batch = batch_size // hosts
  ds = grain.MapDataset.range(num_batches * per_host_batch)
  ds = ds.map(fn_cls(source, tok, lens, start, stop))
  return _finish(ds, per_host_batch, config, train=False)


def batch_spec(stage: int | str, config: Any, per_host_batch: int
               ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Returns {key: (shape, dtype)} of a batch, e.g. for model init / export.

  stage: 1, 2, "eval_products" or "eval_queries".
  """
  lens = _lens(config)
  b, s = per_host_batch, lens.image_size
  product = {"product_tokens": ((b, lens.product_len), np.int32),
             "image": ((b, s, s, 3), np.uint8),
             "has_image": ((b,), np.bool_),
             "product_index": ((b,), np.int32)}
  if stage == 1:
    spec = {**product, "title_tokens": ((b, lens.title_len), np.int32)}
    if _cfg_get(config, "stage1_pseudo_queries", False):
      spec["query_tokens"] = ((b, lens.query_len), np.int32)
    return spec
  if stage == 2:
    return {**product, "title_tokens": ((b, lens.title_len), np.int32),
            "query_tokens": ((b, lens.query_len), np.int32),
            "query_index": ((b,), np.int32), "grade": ((b,), np.float32),
            "positives": ((b, lens.positives_k), np.int32)}
  if stage == "eval_products":
    return {**product, "mask": ((b,), np.bool_)}
  if stage == "eval_queries":
    return {"query_tokens": ((b, lens.query_len), np.int32),
            "query_index": ((b,), np.int32), "mask": ((b,), np.bool_)}
  raise ValueError(f"stage={stage!r}")
