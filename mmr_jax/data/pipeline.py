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

Batches follow `mmr_jax/batch_spec.py`; the per-example maps are in `transforms.py`, rows and the
tokenizer come from `sources.py`. Decisions the layout leaves open:
- Stage 1 iterates over products that are not `heldout` (the novel-product
  split must stay unseen by every stage). Products without an image are kept
  (zeros, `has_image=False`; the loss masks them) unless
  `config.data.stage1_skip_no_image` is True.
- Images are squashed (whole image resized to image_size x image_size, no
  centre crop, so no part of the product is cut away) with antialiased
  bilinear resampling; training may instead take an Inception-style random
  resized crop and a horizontal flip, seeded by (seed, stream position).
- `seed` drives everything; `config.data.shuffle_seed`, when not None,
  overrides the sampling order only (same augmentation noise, different order).
- `stream_offset` global batches of the training stream are skipped (the
  same stream, started later), so a run continuing another's training on it
  does not replay that run's batches.

`config` is `config.data` of `mmr_jax.config.base_config()` (every key read
here is defined there). A state restores only into an iterator built with the
same data, batch size, host count and `num_workers`. With `num_workers > 0` batch
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

import logging
import time
from typing import Any

from absl import flags
import grain
import jax
import numpy as np
from etils import epath

from mmr_jax import batch_spec
from mmr_jax.data import catalog
from mmr_jax.data import hard_negatives
from mmr_jax.data import sources
from mmr_jax.data import transforms

# Orbax checkpoint args for a grain iterator; checkpoint.py registers these in
# its CheckpointManager (item name e.g. "data"). Each host writes
# `process_{i}-of-{n}.json` with its own state.
CheckpointHandler = grain.checkpoint.CheckpointHandler
CheckpointSave = grain.checkpoint.CheckpointSave
CheckpointRestore = grain.checkpoint.CheckpointRestore

_log = logging.getLogger(__name__)
_WARNED: set = set()  # what was already warned about: (data_dir, split, positives_k), (data_dir, "negatives")


def _host(process_index: int | None, process_count: int | None
          ) -> tuple[int, int]:
  """Returns (process_index, process_count), defaulting to JAX's."""
  if process_index is None or process_count is None:
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
            train: bool, group: int = 1) -> grain.DatasetIterator:
  """Returns a checkpointable iterator: threads, batching, worker processes.

  Training batches after `to_iter_dataset`, so threads work per example and
  skipped (None) examples drop out before batching; with worker processes each
  worker batches its own slice, so batches depend on `num_workers` (fixed per
  run). Eval batches the MapDataset itself: batch b holds rows
  [b*B, (b+1)*B) whatever the worker count, which keeps row order.
  With `group` > 1 each element of `ds` is `group` stacked examples (HardNegativeGroup), and a batch
  holds per_host_batch // group of them, rows of a group adjacent.
  """
  threads = int(config.read_threads)
  if train:
    read = grain.ReadOptions(
        num_threads=threads,
        prefetch_buffer_size=int(config.prefetch_buffer_size))
    it_ds = ds.to_iter_dataset(read).batch(
        per_host_batch // group, drop_remainder=True,
        batch_fn=transforms.concat if group > 1 else transforms.stack)
  else:
    # Buffer counts whole batches here: a few per thread is plenty.
    read = grain.ReadOptions(num_threads=threads,
                             prefetch_buffer_size=max(2, 2 * threads))
    it_ds = ds.batch(per_host_batch, batch_fn=transforms.stack).to_iter_dataset(read)
  num_workers = int(config.num_workers)
  if num_workers > 0:
    # grain's worker processes read absl flags; outside an absl.app entry
    # point (tests, notebooks, tools) nothing parsed them yet.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers))
  return iter(it_ds)


def _check_stage1_rows(data_dir: str, products: sources.Source, skip_no_image: bool,
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
  if sources.catalog_info(data_dir).get("num_with_image", 1) == 0:
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


def make_train_iterator(data_dir: str, stage: int, config: Any, *, seed: int,
                        process_index: int | None = None,
                        process_count: int | None = None,
                        split: str = "train", augment: bool | None = None,
                        offset: int = 0,
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
    offset: global batches of the stream to skip (train.py passes the
      resolved `config.stream_offset`): batch b of this iterator is batch
      offset + b of the stream.

  The iterator supports `get_state()` / `set_state()`; `num_workers` must be
  the same when restoring. Stage 1 rows: title_tokens, product_tokens, image,
  has_image, product_index. Stage 2 adds query_tokens, query_index, grade,
  positives [B, K] (pad -1).
  """
  if stage not in (1, 2):
    raise ValueError(f"stage={stage} must be 1 or 2")
  host, hosts = _host(process_index, process_count)
  global_batch = int(config.batch_size)
  per_host_batch = _per_host(global_batch, hosts, "config.data.batch_size")
  lens = batch_spec.Lens.from_config(config)
  aug = transforms.Augment.from_config(config.augment)
  if augment is False:
    aug = transforms.Augment()
  tok = sources.load_tokenizer(data_dir, config)
  products = sources.open_source(data_dir, "products", "all")
  stage1_pairs = stage == 1 and batch_spec.stage1_reads_pairs(config)
  group = group_size(stage, config) if split == "train" else 1
  if per_host_batch % group:
    raise ValueError(f"config.data.hard_negatives={group - 1}: each host's batch ({per_host_batch}) must "
                     f"be a multiple of 1 + hard_negatives = {group}")
  if stage == 1 and not stage1_pairs:
    num_rows = len(products)
    skip_no_image = bool(config.stage1_skip_no_image)
    heldout = split != "train"
    _check_stage1_rows(data_dir, products, skip_no_image,
                       warn=split == "train", heldout=heldout)
    example = transforms.Stage1Example(products, tok, lens, aug, skip_no_image=skip_no_image, heldout=heldout,
                                       pseudo_queries=bool(config.stage1_pseudo_queries))
    table = "products/all"
  else:
    pairs = sources.open_source(data_dir, "pairs", split)
    num_rows = len(pairs)
    most = int((sources.catalog_info(data_dir).get("max_positives") or {}).get(split, 0))
    if most > lens.positives_k and (data_dir, split, lens.positives_k) not in _WARNED:
      _WARNED.add((data_dir, split, lens.positives_k))  # validation iterators are made at every evaluation
      _log.warning("%s: a %s query has %d E-labelled products but config.data.positives_k=%d; the ones past %d "
                   "count as in-batch negatives of their query%s. Set config.data.positives_k=%d to mask them all.",
                   data_dir, split, most, lens.positives_k, lens.positives_k,
                   "" if split == "train" else " (in the validation loss and accuracy)", most)
    # Validation batches score the labelled pairs only.
    pseudo_rate = float(config.pseudo_queries) if split == "train" else 0.0
    if not 0.0 <= pseudo_rate < 1.0:
      raise ValueError(f"config.data.pseudo_queries={pseudo_rate} must be in [0, 1)")
    example = transforms.Stage2Example(pairs, products, tok, lens, aug, pseudo_rate)
    table = f"pairs/{split}"
    if group > 1:
      labelled_negatives = bool(config.labelled_negatives)
      if labelled_negatives and len(pairs) and "negatives" not in pairs[0] \
          and (data_dir, "negatives") not in _WARNED:
        _WARNED.add((data_dir, "negatives"))
        _log.warning("%s: the pairs table has no `negatives` (imported by an older mmr_jax): hard-negative "
                     "groups take products of the pool only; re-import the catalogue to add its I-labelled "
                     "products", data_dir)
      example = transforms.HardNegativeGroup(example, products, _neighbours(data_dir, products, config),
                                             group - 1, labelled_negatives)
  if num_rows == 0:
    how = " with config.data.stage1_source='pairs'" if stage1_pairs else ""
    raise ValueError(f"{data_dir}: {table} has no rows (stage {stage}{how} needs some)")

  if num_rows < global_batch and split == "train":
    # Each batch then holds the same rows several times; repeats are masked out of the negatives, so
    # the contrastive loss sees at most num_rows distinct pairs and, with one, learns nothing.
    _log.warning("%s: %s has %d rows for a batch of %d: batches repeat the same examples, which leaves "
                 "the contrastive loss few negatives (%s)", data_dir, table, num_rows, global_batch,
                 "nothing to learn" if num_rows < 2 else "lower config.data.batch_size or add data")
  seed = int(seed) % 2**32
  order_seed = config.shuffle_seed
  order_seed = _mix_seed(seed if order_seed is None else order_seed)
  # Shuffle before slicing: each epoch is one global permutation (reseeded per
  # epoch by grain), host h reading positions h, h+P, ... of it. The example
  # map sits before the slice too, so its RNG is keyed by the global stream
  # position: no two hosts share augmentation noise.
  ds = grain.MapDataset.range(num_rows).shuffle(seed=order_seed)
  ds = ds.random_map(example, seed=seed)
  ds = ds[host::hosts].repeat(None)
  if offset < 0:
    raise ValueError(f"stream offset {offset}: expected a number of batches >= 0")
  if offset:
    ds = ds[offset * (per_host_batch // group):]  # positions keep their order, augmentation and pseudo-queries
  return _finish(ds, per_host_batch, config, train=True, group=group)


def group_size(stage: int, config: Any) -> int:
  """Returns how many adjacent training examples form one sampled group: 1 + config.hard_negatives.

  `config` is `config.data`. Groups are drawn from stage 2's stream (stage 2, and stage 1 over pairs);
  stage 1 over products has none (1). A host's position in its stream counts groups.
  """
  n = int(config.hard_negatives)
  if n < 0:
    raise ValueError(f"config.data.hard_negatives={n} must be >= 0")
  if stage == 1 and not batch_spec.stage1_reads_pairs(config):
    return 1
  return 1 + n


_NEIGHBOURS: dict[tuple, np.ndarray] = {}


def _neighbours(data_dir: str, products: sources.Source, config: Any) -> np.ndarray:
  """Returns each product's pool of hard negatives, mined once per process, catalogue and source: BM25
  (`hard_negatives.neighbours`) or, with config.hard_negative_embeddings, a model's nearest products."""
  pool = int(config.hard_negative_pool)
  path = str(config.hard_negative_embeddings or "")
  sha = str(sources.catalog_info(data_dir).get("products_sha256", ""))
  stamp = None
  if path and epath.Path(path).exists():  # a file written again under the same name is mined again
    st = epath.Path(path).stat()
    stamp = (st.length, st.mtime)
  key = (str(data_dir), len(products), sha, pool, path, stamp)
  if key not in _NEIGHBOURS:
    if path:
      emb = hard_negatives.load_embeddings(path, len(products), sha)
      _NEIGHBOURS[key] = hard_negatives.nearest_by_embedding(emb, hard_negatives.heldout_flags(products), pool)
    else:
      _NEIGHBOURS[key] = hard_negatives.neighbours(products, pool)
  return _NEIGHBOURS[key]


def _sample_rows(n: int, sample: int, seed: int) -> np.ndarray:
  """Returns every row index below `n`, or a sorted seeded sample of `sample` of them when there are more."""
  return np.arange(n) if n <= sample else np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))


def product_truncation(data_dir: str, config: Any, sample: int = 2000,
                       seed: int = 0) -> dict[str, Any]:
  """Returns how `config.product_len` cuts the product text (title | description | attributes), on a sample.

  `config` is `config.data` (its tokenizer and product_len).
  {"product_len", "sampled", "truncated" (fraction of products cut), "by_field": {field: fraction
  of products that lose part of that field}, "tokens": {"p50", "p95", "max"}}. A text is cut per field
  (Tokenizer.encode_fields): the longest field loses ids first, so a long description does not push out the
  attributes, what textual queries (material, care, size) ask for.
  """
  products = sources.open_source(data_dir, "products", "all")
  tok = sources.load_tokenizer(data_dir, config)
  product_len = int(config.product_len)
  n = len(products)
  rows = _sample_rows(n, sample, seed)
  names = ("title", "description", "attributes")
  cut = dict.fromkeys(names, 0)
  totals = []
  for i in rows:
    row = products[int(i)]
    total = tok.num_tokens(sources.row_text(row, "text"))
    totals.append(total)
    if total <= product_len:
      continue
    fields = catalog.product_fields(*(sources.row_text(row, k) for k in names))
    for name, (have, kept) in zip(names, tok.fields_kept(fields, product_len)):
      cut[name] += kept < have
  totals = np.asarray(totals or [0])
  m = max(len(rows), 1)
  return {"product_len": int(product_len), "sampled": int(len(rows)),
          "truncated": float(np.mean(totals > product_len)),
          "by_field": {k: v / m for k, v in cut.items()},
          "tokens": {"p50": float(np.percentile(totals, 50)), "p95": float(np.percentile(totals, 95)),
                     "max": int(totals.max())}}


def product_token_set(tok: Any, row: Any, config: Any) -> np.ndarray:
  """Returns the distinct token ids (no padding) of a products-source `row`'s text, tokenised as training sees it."""
  ids = transforms.product_tokens(row, tok, int(config.product_len))
  return np.unique(ids[ids != tok.conventions.pad_id])


def token_document_frequency(data_dir: str, config: Any, vocab_size: int, sample: int = 100_000,
                             seed: int = 0) -> tuple[np.ndarray, int]:
  """Returns (df int64 [vocab_size], products counted): in how many of the catalogue's products each token id occurs.

  `config` is `config.data`. Products are tokenised as training sees them (`product_len`, the tokenizer's
  conventions); held-out products (the novel-product split) are left out, and catalogues larger than `sample`
  products are counted on a seeded sample of that many.
  """
  products = sources.open_source(data_dir, "products", "all")
  tok = sources.load_tokenizer(data_dir, config)
  n = len(products)
  rows = _sample_rows(n, sample, seed)
  df = np.zeros(vocab_size, np.int64)
  docs = 0
  start = last = time.monotonic()
  for j, i in enumerate(rows):
    row = products[int(i)]
    if bool(np.asarray(row["heldout"])):
      continue
    ids = product_token_set(tok, row, config)
    if ids.size and ids.max() >= vocab_size:
      raise ValueError(f"{data_dir}: token id {int(ids.max())} >= the model's vocabulary ({vocab_size}); "
                       "config.model.text.vocab_size must cover the tokenizer")
    df[ids] += 1
    docs += 1
    if time.monotonic() - last > 30:
      last = time.monotonic()
      _log.info("token frequencies: %d / %d products (%.0f s)", j + 1, len(rows), last - start)
  if not docs:
    raise ValueError(f"{data_dir}: no product outside the held-out split to count token frequencies on")
  return df, docs


def token_idf(data_dir: str, config: Any, vocab_size: int, sample: int = 100_000, seed: int = 0) -> np.ndarray:
  """Returns float32 [vocab_size]: each token id's BM25 inverse document frequency over the catalogue's products.

  Counted as `token_document_frequency` counts. idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5)),
  Lucene's BM25 idf: near 0 for a token in every product, ln(2N + 2) for one in none.
  """
  df, docs = token_document_frequency(data_dir, config, vocab_size, sample, seed)
  return np.log1p((docs - df + 0.5) / (df + 0.5)).astype(np.float32)


def move_train_iterator(it: grain.DatasetIterator, position: int) -> bool:
  """Returns whether a fresh make_train_iterator iterator could be moved to `position` of this host's stream.

  The position counts elements read by this host: after s steps of a global batch B on P hosts, s * B / P
  / group_size continues the same shuffled epochs. Without worker processes the iterator's state is that one number;
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
  lens = batch_spec.Lens.from_config(config)
  tok = sources.load_tokenizer(data_dir, config)
  if table == "products":
    source = sources.open_source(data_dir, "products", split or "all")
    fn_cls = transforms.EvalProduct
  elif table == "queries":
    source = sources.open_source(data_dir, "queries", split)
    fn_cls = transforms.EvalQuery
  else:
    raise ValueError(f"table={table!r} must be 'products' or 'queries'")
  start, stop, num_batches = eval_host_slice(len(source), batch_size, host,
                                             hosts)
  per_host_batch = batch_size // hosts
  ds = grain.MapDataset.range(num_batches * per_host_batch)
  ds = ds.map(fn_cls(source, tok, lens, start, stop))
  return _finish(ds, per_host_batch, config, train=False)
