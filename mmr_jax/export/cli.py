"""The command line of the export: `python -m mmr_jax.export --workdir DIR --out OUT [flags]`.

Parses and checks the flags before any long work, starts the multi-process runtime when the launcher
set one up, runs `workdir.export_workdir` and prints the summary's paths, parity and timings; a parity
outside `--parity_tol` exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from mmr_jax.export import convert
from mmr_jax.export import parity
from mmr_jax.export import saving
from mmr_jax.export import towers
from mmr_jax.export import workdir
from mmr_jax import runtime


def main(argv=None):
  """Runs the export command with `argv` (default: sys.argv[1:])."""
  p = argparse.ArgumentParser(
      prog="python -m mmr_jax.export", formatter_class=argparse.RawDescriptionHelpFormatter,
      description="Export a trained workdir: query/product tower SavedModels, a serving SavedModel (query "
                  "strings -> top-K product ids) and the embedded catalogue with its ScaNN index.",
      epilog="Writes OUT/query_tower, OUT/product_tower, OUT/serving, OUT/embeddings/ and "
             "OUT/export_summary.json; see the docstrings of mmr_jax/export/ for formats and signatures.")
  p.add_argument("--workdir", required=True, help="trained workdir (config.json + checkpoints/)")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--data", default=None, help="DATA_DIR (default: the one the workdir was trained on)")
  p.add_argument("--k", type=int, default=100, help="results per query in the serving model (default 100)")
  p.add_argument("--platforms", default=",".join(convert.DEFAULT_PLATFORMS),
                 help=f"comma-separated jax2tf lowering platforms from {convert.PLATFORMS} (default cpu,cuda)")
  p.add_argument("--batch_size", type=int, default=256, help="global batch for embedding the catalogue")
  p.add_argument("--shard_batches", type=int, default=16, help="batches per resumable embedding shard")
  p.add_argument("--scann", default=None, help='JSON dict of ScaNN parameter overrides, e.g. \'{"num_leaves": 100}\'')
  p.add_argument("--rebuild_index", action="store_true",
                 help="re-embed and rebuild the index even if OUT/embeddings or WORKDIR/index can be reused")
  p.add_argument("--no_parity", action="store_true", help="skip the SavedModel vs JAX parity measurement")
  p.add_argument("--parity_tol", type=float, default=parity.PARITY_TOL,
                 help=f"largest |SavedModel - JAX| embedding difference accepted (default {parity.PARITY_TOL:g}); "
                      "above it the export exits with status 1")
  p.add_argument("--allow_parity_mismatch", action="store_true",
                 help="a parity above --parity_tol is a warning, not an error (exit status 0)")
  p.add_argument("--no_progress", action="store_true", help="no progress output")
  p.add_argument("--batch_buckets", default=",".join(map(str, towers.BATCH_BUCKETS)),
                 help="comma-separated increasing batch sizes the towers' XLA programs are compiled for; a "
                      "request is padded to the next one (above the last, to a multiple of it). Default: "
                      "powers of two to 1024")
  p.add_argument("--warmup_max_batch", type=int, default=saving.WARMUP_MAX_BATCH,
                 help="write TF Serving warm-up requests (assets.extra/tf_serving_warmup_requests) for every "
                      f"bucket up to this batch size (default {saving.WARMUP_MAX_BATCH}; 0: none)")
  p.add_argument("--verbosity", type=int, default=1, choices=(0, 1, 2),
                 help="0: progress and warnings; 1: every INFO line; 2: everything, native libraries' logs included "
                 "(OUT/logs/export.log gets INFO and native logs at any level)")
  args = p.parse_args(argv)
  try:
    buckets = towers.check_batch_buckets(args.batch_buckets.split(","))
  except ValueError as e:
    p.error(f"--batch_buckets: {e}")
  try:
    saving.check_warmup(buckets, args.warmup_max_batch)
  except ValueError as e:
    p.error(f"--warmup_max_batch: {e}")
  runtime.setup_logging(args.verbosity, headline=("mmr_jax.export",))
  runtime.maybe_initialize_distributed()  # before anything asks jax for its processes
  runtime.attach_log_file(runtime.log_file_for(args.out, "export"))
  try:
    summary = workdir.export_workdir(args.workdir, args.out, args.data, k=args.k, platforms=args.platforms.split(","),
                             batch_size=args.batch_size, shard_batches=args.shard_batches,
                             scann_overrides=json.loads(args.scann) if args.scann else None,
                             rebuild_index=args.rebuild_index, parity=not args.no_parity,
                             progress=not args.no_progress, batch_buckets=buckets,
                             warmup_max_batch=args.warmup_max_batch, parity_tol=args.parity_tol,
                             allow_parity_mismatch=args.allow_parity_mismatch)
  except parity.ParityError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  if summary is not None:
    print(json.dumps({k: summary[k] for k in ("paths", "num_products", "k", "parity", "timings")},
                     indent=2, default=float))
