r"""Imports a catalogue folder into DATA_DIR: validate, train the tokenizer, write the TFDS tables.

Usage:
  python -m mmr_jax.data.import_catalog SRC_DIR --out DATA_DIR [--overwrite]
      [--novel_product_fraction 0.1] [--seed 0] [--image_max_side 256] [--vocab_size 8000]
      [--pair_grades E,S]

SRC_DIR holds products.jsonl, queries.jsonl, qrels.tsv and images/ (format: mmr_jax/data/catalog/).
DATA_DIR gets catalog_info.json, import_summary.json, tokenizer.model and mmr_catalog/ (DESIGN.md),
plus a copy of SRC_DIR/ground_truth.jsonl when there is one (synthetic catalogues).

Unusable lines are skipped and reported (count + file:line) in import_summary.json and on stdout;
products with a missing/corrupt image are kept with has_image=False and reported too. Everything is
written into a temporary folder beside DATA_DIR and moved into place at the end, so an interrupted
import never leaves a half-written DATA_DIR, and an existing one is only replaced with --overwrite.
What a hard kill leaves of the temporary folder is removed by the next import into the same DATA_DIR.

Memory: product rows and images are streamed; what stays in memory is an id -> index map of the
products, the queries with their labels, and TFDS's write buffer (at most ~1 GB before it spills
to disk).

Image decoding is the slow part. By default it runs in this process; with --beam_runner the
products table is written by an Apache Beam pipeline (`pip install apache-beam`, the `beam` extra):

  python -m mmr_jax.data.import_catalog SRC_DIR --out DATA_DIR --beam_runner DirectRunner \
      --beam_options "--direct_num_workers=16 --direct_running_mode=multi_processing"

Workers read SRC_DIR and write next to DATA_DIR through local paths, so a distributed runner
(Flink, Spark) needs both on a filesystem mounted at the same path on every worker; GCS paths
(Dataflow) are not supported by the atomic move into place. Tested with DirectRunner only.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import glob
import hashlib
import io
import json
import os
import pathlib
import shlex
import shutil
import signal
import socket
import sys
import threading
import uuid
from typing import Any, Iterator, Sequence

import tensorflow_datasets as tfds

from mmr_jax import config as config_lib
from mmr_jax.data import catalog
from mmr_jax.data import pipeline
from mmr_jax.data import tfds_builder
from mmr_jax.data import tokenizer as tokenizer_lib

CatalogError = catalog.CatalogError

_CORPUS_FILE = "_tokenizer_corpus.txt"
# Latent attributes of synthetic catalogues (data/synthetic/): carried into DATA_DIR if present.
GROUND_TRUTH_FILE = "ground_truth.jsonl"


def _is_dataset(path: pathlib.Path) -> bool:
  return ((path / tfds_builder.CATALOG_INFO_FILE).exists() or (path / tfds_builder.BUILDER_NAME).exists()
          or (path / tfds_builder.IMPORT_SUMMARY_FILE).exists())


def _check_out_dir(out: pathlib.Path, src: pathlib.Path, overwrite: bool) -> None:
  """Raises CatalogError if writing DATA_DIR at `out` could destroy something it should not."""
  src_r, out_r = src.resolve(), out.resolve()
  if src_r == out_r or src_r.is_relative_to(out_r):
    raise CatalogError(f"the catalogue folder {str(src)!r} is inside the output directory {str(out)!r}; "
                       "write DATA_DIR somewhere else (it is replaced as a whole)")
  if not out.exists():
    return
  if not out.is_dir():
    raise CatalogError(f"output {str(out)!r} exists and is not a directory")
  if not any(out.iterdir()):
    return
  if not _is_dataset(out):
    raise CatalogError(f"output directory {str(out)!r} is not empty and does not hold an imported "
                       "catalogue; refusing to replace it (choose a new or empty directory)")
  if not overwrite:
    raise CatalogError(f"output directory {str(out)!r} already holds an imported catalogue; "
                       "pass --overwrite to replace it")



def _exchange(a: pathlib.Path, b: pathlib.Path) -> bool:
  """Returns True if a and b were swapped atomically (Linux renameat2 RENAME_EXCHANGE)."""
  if not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = libc.renameat2
  except (OSError, AttributeError):
    return False
  at_fdcwd, rename_exchange = -100, 2
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _tmp_dir(out: pathlib.Path) -> pathlib.Path:
  """Returns a fresh temporary folder path beside `out`, naming this process and host (see _remove_stale)."""
  return out.parent / f".{out.name}.importing-{os.getpid()}-{uuid.uuid4().hex[:8]}-{socket.gethostname()}"


_LOCK_FILE = ".import.lock"  # in the temporary folder, flock-ed by the import writing it


def _lock(tmp: pathlib.Path) -> int:
  """Returns an fd holding an exclusive flock on tmp's lock file: the folder's import is alive while held."""
  fd = os.open(tmp / _LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
  fcntl.flock(fd, fcntl.LOCK_EX)
  return fd


def _lock_held(path: pathlib.Path) -> bool | None:
  """Returns whether a live process holds path's import lock (None: the folder has no lock file)."""
  try:
    fd = os.open(path / _LOCK_FILE, os.O_RDWR)
  except FileNotFoundError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return False
  except BlockingIOError:
    return True
  finally:
    os.close(fd)  # also releases the probe's lock


def _pid_gone(name_rest: str) -> bool:
  """Returns True if `PID-UUID-HOST` names a process of this host that no longer runs."""
  pid, _, rest = name_rest.partition("-")
  if not (pid.isascii() and pid.isdigit()) or rest.partition("-")[2] != socket.gethostname():
    return False
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return True
  except (PermissionError, OverflowError):  # another user's process; not a pid
    return False
  return False


def _remove_stale(out: pathlib.Path) -> list[pathlib.Path]:
  """Removes the temporary folders of imports into `out` that were killed hard (SIGKILL, power loss).

  A running import holds an flock on its folder's lock file (released by the kernel however the
  process ends), so a folder whose lock can be taken is stale; one without a lock file (an import
  between mkdir and lock, or moving into place) is stale only if it names a process of this host that
  no longer runs. Returns what was removed.
  """
  prefix = f".{out.name}.importing-"
  removed = []
  for path in sorted(out.parent.glob(glob.escape(prefix) + "*")) if out.parent.is_dir() else ():
    held = _lock_held(path) if path.is_dir() else True
    if held or (held is None and not _pid_gone(path.name[len(prefix):])):
      continue
    shutil.rmtree(path, ignore_errors=True)
    if not path.exists():
      removed.append(path)
  return removed


def _move_into_place(tmp: pathlib.Path, out: pathlib.Path) -> None:
  """Replaces `out` by `tmp` so readers see either the old or the new DATA_DIR, never a mix."""
  if not out.exists():
    os.rename(tmp, out)
    return
  if _exchange(tmp, out):
    shutil.rmtree(tmp)  # Now holds the previous DATA_DIR.
    return
  # Fallback (non-Linux or a filesystem without RENAME_EXCHANGE): two renames; the gap between
  # them is the only moment DATA_DIR is absent, and the old one is restored on failure.
  old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
  os.rename(out, old)
  try:
    os.rename(tmp, out)
  except BaseException:
    os.rename(old, out)
    raise
  shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _tfds_progress(enable: bool) -> Iterator[None]:
  """Shows or hides TFDS's own progress bars for the duration, then restores the setting."""
  previous = getattr(tfds.core.utils.tqdm_utils, "_active", True)
  tfds.display_progress_bar(enable)
  try:
    yield
  finally:
    tfds.display_progress_bar(previous)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
  """Turns SIGTERM into SystemExit while active (context manager or decorator): `kill` cleans up like Ctrl-C.

  Python's default SIGTERM action ends the process at once, without running `finally` blocks, and
  would leave the half-written temporary folder beside DATA_DIR. Only installed from the main thread
  and only over the default action (a program with its own SIGTERM handler keeps it).
  """
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
    yield
    return

  def handler(signum, frame):
    del frame
    raise SystemExit(128 + signum)

  signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _remove_empty_tree(path: pathlib.Path) -> None:
  """Removes path if it holds directories only (no files)."""
  if path.is_dir() and not any(p.is_file() or p.is_symlink() for p in path.rglob("*")):
    shutil.rmtree(path)


def _read_corpus(path: pathlib.Path) -> Iterator[str]:
  with open(path, encoding="utf-8") as f:
    for line in f:
      yield line.rstrip("\n")


@_sigterm_raises()  # `kill` cleans up the temporary folder like Ctrl-C does
def import_catalog(src_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                   novel_product_fraction: float = 0.1, seed: int = 0, image_max_side: int = 256,
                   vocab_size: int = 8000, pair_grades: Sequence[str] = ("E",), overwrite: bool = False,
                   jpeg_quality: int = 90, name: str | None = None, progress: bool = True,
                   verbose: bool = True, beam_runner: Any = None,
                   beam_options: Sequence[str] | str | None = None) -> dict[str, Any]:
  """Returns the import summary after writing DATA_DIR (out_dir) from a catalogue folder.

  Args:
    src_dir: catalogue folder (products.jsonl, queries.jsonl, qrels.tsv, images/).
    out_dir: DATA_DIR to create; replaced atomically if it holds a catalogue and overwrite=True.
    novel_product_fraction: fraction (seeded draw) of products with an E label on a test query
      held out of all train/validation pairs; they make the test_novel_product split.
    seed: seeds the held-out draw and tokenizer sampling.
    image_max_side: images are shrunk so their longest side is at most this.
    vocab_size: SentencePiece target vocabulary (smaller if the catalogue is tiny).
    pair_grades: grades that make a training pair: ("E",) or ("E", "S") (or with "C").
    overwrite: replace an existing DATA_DIR.
    jpeg_quality: quality of the re-encoded JPEGs.
    name: catalogue name for catalog_info.json (default: the folder's name).
    progress: tqdm progress bars.
    verbose: print the summary.
    beam_runner: write the products table (image decoding, the slow part) with an Apache Beam
      pipeline on this runner ("DirectRunner", ...); None writes it in this process.
    beam_options: Beam pipeline flags (list, or one shell-quoted string), e.g.
      "--direct_num_workers=8 --direct_running_mode=multi_processing".

  Raises:
    CatalogError: the folder cannot be imported (missing file, unknown split, no products, ...),
      or out_dir exists and may not be replaced.
  """
  for what, path in (("catalogue folder", src_dir), ("output DATA_DIR", out_dir)):
    if "://" in os.fspath(path):  # pathlib would quietly make gs://b/x the local folder ./gs:/b/x
      raise CatalogError(f"{what} {os.fspath(path)!r} is a URL: the importer reads and writes local (or mounted) "
                         "folders, since DATA_DIR is replaced by an atomic rename object stores cannot do; "
                         "import to a local path, then copy the folder")
  src = catalog.check_folder(src_dir)
  # A symlinked DATA_DIR is replaced where it points (same disk as the data); the link itself stays.
  out = pathlib.Path(os.path.realpath(pathlib.Path(out_dir).expanduser()))
  if image_max_side < 16:
    raise CatalogError(f"image_max_side must be >= 16, got {image_max_side}")
  if vocab_size < 300:  # Byte fallback alone takes 260 ids (tokenizer.train_tokenizer).
    raise CatalogError(f"vocab_size must be >= 300, got {vocab_size}")
  if not 1 <= jpeg_quality <= 100:
    raise CatalogError(f"jpeg_quality must be in [1, 100], got {jpeg_quality}")
  if isinstance(beam_options, str):
    beam_options = shlex.split(beam_options)
  if beam_runner is not None:
    try:
      import apache_beam  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise CatalogError("beam_runner needs Apache Beam: pip install 'mmr_jax[beam]' "
                         "(or apache-beam)") from None
  if isinstance(pair_grades, str):
    pair_grades = [g for g in pair_grades.replace(",", " ").split() if g]
  _check_out_dir(out, src, overwrite)
  out.parent.mkdir(parents=True, exist_ok=True)
  for stale in _remove_stale(out):
    print(f"removed {stale}: the temporary folder of an import that was killed", file=sys.stderr)
  tmp = _tmp_dir(out)
  tmp.mkdir()
  lock_fd = _lock(tmp)
  try:
    corpus_path = tmp / _CORPUS_FILE
    # The product ids in product-index order: a workdir records this (through catalog_info.json) to tell a
    # re-imported DATA_DIR from the one it was trained on without reading the products table.
    ids_hash = hashlib.sha256()
    with open(corpus_path, "w", encoding="utf-8") as corpus:

      def on_product(index, product):
        del index
        corpus.write(product.text.replace("\n", " ") + "\n")
        ids_hash.update(product.id.encode("utf-8") + b"\n")

      plan = catalog.scan_catalog(src, novel_product_fraction=novel_product_fraction, seed=seed,
                                  pair_grades=pair_grades, on_product=on_product, progress=progress)
      for q in plan.queries["train"]:
        corpus.write(q.text.replace("\n", " ") + "\n")

    try:
      model_path = tokenizer_lib.train_tokenizer(_read_corpus(corpus_path), str(tmp / "tokenizer"),
                                                 vocab_size=vocab_size, seed=seed)
    except tokenizer_lib.VocabTooSmallError as e:
      # The catalogue's characters alone (CJK scripts have thousands) do not fit the requested size:
      # grow it, with room for some words, rather than fail; catalog_info.json records both sizes.
      grown = e.required + max(64, e.required // 8)
      if verbose:
        print(f"Tokenizer: the catalogue's characters need {e.required} pieces; vocab_size {vocab_size} "
              f"raised to {grown}", flush=True)
      model_path = tokenizer_lib.train_tokenizer(_read_corpus(corpus_path), str(tmp / "tokenizer"),
                                                 vocab_size=grown, seed=seed)
    corpus_path.unlink()
    if pathlib.Path(model_path) != tmp / tfds_builder.TOKENIZER_FILE:
      os.replace(model_path, tmp / tfds_builder.TOKENIZER_FILE)
    tokenizer_vocab = tokenizer_lib.Tokenizer(tmp / tfds_builder.TOKENIZER_FILE).vocab_size

    skips = plan.skips
    num_with_image = 0
    with _tfds_progress(progress):
      for table in tfds_builder.TABLES:
        if verbose:
          print(f"Writing the {table} table ...", flush=True)
        # TFDS prints "Downloading and preparing ... Subsequent calls will reuse this data" about the
        # temporary folder: misleading here, so its stdout is dropped (its progress bars use stderr).
        with contextlib.redirect_stdout(io.StringIO()):
          builder = tfds_builder.build_table(plan, tmp, table, image_max_side=image_max_side,
                                             jpeg_quality=jpeg_quality, beam_runner=beam_runner,
                                             beam_options=beam_options)
        if table == "products":
          skips.merge(builder.image_skips)
          num_with_image = builder.num_with_image
    _remove_empty_tree(tmp / "downloads")  # TFDS creates it even though nothing is downloaded.

    num_queries = {s: len(plan.queries[s]) for s in catalog.QUERY_SPLITS}
    num_pairs = {s: plan.num_pairs(s) for s in catalog.PAIR_SPLITS}
    summary = {
        "products": plan.num_products,
        "queries": sum(num_queries[s] for s in catalog.SOURCE_QUERY_SPLITS),
        "qrels": plan.num_qrels,
        "skipped": skips.as_dict(),
        "skipped_counts": skips.counts(),
        "products_with_image": num_with_image,
        "heldout_products": int(plan.heldout.sum()),
        # How the default config.data.product_len cuts the product text, by field (training reports its own).
        "product_text": _product_text_report(tmp),
    }
    info = {
        "name": name or src.resolve().name,
        "num_products": plan.num_products,
        "products_sha256": ids_hash.hexdigest(),
        "num_queries": num_queries,
        "num_pairs": num_pairs,
        "image_max_side": int(image_max_side),
        "novel_product_fraction": float(novel_product_fraction),
        "seed": int(seed),
        "source": str(src.resolve()),
        "pair_grades": list(plan.pair_grades),
        "num_heldout": int(plan.heldout.sum()),
        "num_with_image": num_with_image,
        # Per pairs split, the most E-labelled products of one query (config.data.positives_k is compared
        # to it: positives past k would count as in-batch negatives).
        "max_positives": {s: max((len(q.positives) for q in plan.queries[s]), default=0)
                          for s in catalog.PAIR_SPLITS},
        "vocab_size": int(tokenizer_vocab),
        "requested_vocab_size": int(vocab_size),
        "jpeg_quality": int(jpeg_quality),
        "version": tfds_builder.DATASET_VERSION,
    }
    if (src / GROUND_TRUTH_FILE).is_file():
      shutil.copyfile(src / GROUND_TRUTH_FILE, tmp / GROUND_TRUTH_FILE)
    _write_json(tmp / tfds_builder.IMPORT_SUMMARY_FILE, summary)
    _write_json(tmp / tfds_builder.CATALOG_INFO_FILE, info)
    # Re-checked here: another process may have created out_dir while we were importing.
    _check_out_dir(out, src, overwrite)
    (tmp / _LOCK_FILE).unlink()  # not part of DATA_DIR; the fd keeps the lock until the end
    _move_into_place(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  finally:
    os.close(lock_fd)
  if verbose:
    print(format_summary(summary, info, out))
  return summary


def _write_json(path: pathlib.Path, obj: Any) -> None:
  path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _product_text_report(data_dir: pathlib.Path) -> dict[str, Any]:
  """Returns pipeline.product_truncation at the default config.data (its product_len and tokenizer)."""
  if not _has_products(data_dir):
    return {}
  return pipeline.product_truncation(str(data_dir), config_lib.base_config().data)


def _has_products(data_dir: pathlib.Path) -> bool:
  """Returns whether the products table written into `data_dir` has a row."""
  return len(tfds_builder.load_source(str(data_dir), "products", "all")) > 0


def format_summary(summary: dict[str, Any], info: dict[str, Any], out: pathlib.Path,
                   max_refs: int = 5) -> str:
  """Returns a human-readable report of an import."""
  lines = [
      f"Imported {info['name']!r} -> {out}",
      f"  products: {summary['products']} ({summary['products_with_image']} with image, "
      f"{summary['heldout_products']} held out)",
      "  queries:  " + ", ".join(f"{s} {n}" for s, n in info["num_queries"].items()),
      "  pairs:    " + ", ".join(f"{s} {n}" for s, n in info["num_pairs"].items())
      + f" (grades {','.join(info['pair_grades'])})",
      f"  qrels:    {summary['qrels']}",
      f"  tokenizer: {info['vocab_size']} pieces",
  ]
  text = summary.get("product_text") or {}
  if text:
    cut = ", ".join(f"{k} {100 * v:.1f}%" for k, v in text["by_field"].items() if v)
    lines.append(f"  product text: {text['tokens']['p50']:.0f} tokens median, {text['tokens']['p95']:.0f} p95, "
                 f"{text['tokens']['max']} max; data.product_len={text['product_len']} "
                 + (f"cuts {100 * text['truncated']:.1f}% of products (losing {cut})" if text["truncated"]
                    else "keeps all of it"))
  if summary["skipped"]:
    lines.append(f"  skipped (details in {tfds_builder.IMPORT_SUMMARY_FILE}):")
    for reason, refs in summary["skipped"].items():
      lines.append(f"    {reason}: {len(refs)}")
      for ref in refs[:max_refs]:
        lines.append(f"      {ref}")
      if len(refs) > max_refs:
        lines.append(f"      ... and {len(refs) - max_refs} more")
  else:
    lines.append("  skipped: nothing")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m mmr_jax.data.import_catalog",
      description="Validate a catalogue folder and write DATA_DIR (TFDS tables, tokenizer, summary).",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  parser.add_argument("src_dir", metavar="SRC_DIR",
                      help="catalogue folder: products.jsonl, queries.jsonl, qrels.tsv, images/")
  parser.add_argument("--out", required=True, metavar="DATA_DIR", help="output directory")
  parser.add_argument("--overwrite", action="store_true", help="replace DATA_DIR if it holds a catalogue")
  parser.add_argument("--novel_product_fraction", type=float, default=0.1,
                      help="fraction of test E-labelled products held out of training pairs")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--image_max_side", type=int, default=256, help="longest image side after import")
  parser.add_argument("--jpeg_quality", type=int, default=90)
  parser.add_argument("--vocab_size", type=int, default=8000, help="SentencePiece vocabulary (target)")
  parser.add_argument("--pair_grades", default="E", help="grades making a training pair, e.g. E or E,S")
  parser.add_argument("--name", default=None, help="catalogue name (default: SRC_DIR's name)")
  parser.add_argument("--no_progress", action="store_true", help="no progress bars")
  parser.add_argument("--beam_runner", default=None,
                      help="write the products table with Apache Beam on this runner, e.g. DirectRunner")
  parser.add_argument("--beam_options", default=None,
                      help='Beam pipeline flags, e.g. "--direct_num_workers=8 '
                      '--direct_running_mode=multi_processing"')
  args = parser.parse_args(argv)
  try:
    import_catalog(args.src_dir, args.out, novel_product_fraction=args.novel_product_fraction,
                   seed=args.seed, image_max_side=args.image_max_side, vocab_size=args.vocab_size,
                   pair_grades=args.pair_grades, overwrite=args.overwrite,
                   jpeg_quality=args.jpeg_quality, name=args.name, progress=not args.no_progress,
                   beam_runner=args.beam_runner, beam_options=args.beam_options)
  except CatalogError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
