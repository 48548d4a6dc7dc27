"""Benchmarks the data path: catalogue generation/import rate and stage-2 pipeline throughput.

  python tools/bench_data.py                              # 2k products, 64 px, in-process
  python tools/bench_data.py --num_workers 2 --batch_size 512
  python tools/bench_data.py --data_dir DATA_DIR          # time the pipeline on an existing import
  python tools/bench_data.py --beam_runner DirectRunner   # also import with Apache Beam (the `beam` extra)

Prints one JSON object:
  {"examples_per_s": stage-2 training examples per second (this host, after warm-up),
   "products_per_s_generate": products per second to write the catalogue folder,
   "products_per_s_import": products per second for import_catalog (folder -> DATA_DIR),
   "generate_s_per_1k_products", "import_s_per_1k_products",
   "products_per_s_import_beam": the same import with its products table written by Beam on
     --beam_runner (--beam_options, e.g. "--direct_num_workers=2 --direct_running_mode=multi_processing"),
     timed after the in-process import in the same run (null without --beam_runner),
   "config": {...}}
Generation is `mmr_jax.data.synthetic.generate_folder` (rendered PNGs, --source_image_size px),
then `import_catalog` (re-encodes JPEGs, trains the tokenizer, writes TFDS). With --data_dir
nothing is generated and the generate/import keys are null.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mmr_jax import config as config_lib  # pylint: disable=g-import-not-at-top
from mmr_jax.data import import_catalog as import_lib  # pylint: disable=g-import-not-at-top
from mmr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from mmr_jax.data import synthetic  # pylint: disable=g-import-not-at-top


def _log(msg: str) -> None:
  print(f"[bench_data {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def time_pipeline(data_dir: str, args: argparse.Namespace) -> tuple[float, dict[str, Any]]:
  """Returns (stage-2 examples/s, data config used) measured after warm-up."""
  cfg = config_lib.base_config().data
  cfg.update(dict(
      dir=data_dir, batch_size=args.batch_size, image_size=args.image_size, query_len=32,
      product_len=128, title_len=32, num_workers=args.num_workers, read_threads=args.read_threads,
      positives_k=8, augment=dict(random_crop=args.augment, crop_scale_min=0.35, flip=args.augment)))
  it = pipeline.make_train_iterator(data_dir, 2, cfg, seed=args.seed, process_index=0,
                                    process_count=1)
  try:
    for _ in range(args.warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(args.batches):
      batch = next(it)
      del batch  # shared-memory batches (num_workers > 0) are freed at once
    elapsed = time.perf_counter() - start
  finally:
    it.close()
  return args.batches * args.batch_size / elapsed, cfg.to_dict()


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("--data_dir", default=None,
                      help="existing DATA_DIR to read (default: generate + import a fresh one)")
  parser.add_argument("--num_products", type=int, default=2000, help="products to generate")
  parser.add_argument("--image_size", type=int, default=64, help="pipeline image side (px)")
  parser.add_argument("--source_image_size", type=int, default=64,
                      help="side of the generated catalogue images (px)")
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--batches", type=int, default=20, help="timed batches")
  parser.add_argument("--warmup", type=int, default=3, help="untimed batches first")
  parser.add_argument("--num_workers", type=int, default=0, help="grain worker processes")
  parser.add_argument("--read_threads", type=int, default=8, help="grain read threads/process")
  parser.add_argument("--augment", action="store_true", help="random crop + flip on")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--beam_runner", default=None, help="also time the import with Apache Beam on this runner")
  parser.add_argument("--beam_options", default=None, help="Beam pipeline flags for --beam_runner, one string")
  parser.add_argument("--out", default=None, help="also write the JSON here")
  args = parser.parse_args(argv)

  result: dict[str, Any] = {"products_per_s_generate": None, "products_per_s_import": None,
                            "generate_s_per_1k_products": None, "import_s_per_1k_products": None,
                            "products_per_s_import_beam": None}
  config: dict[str, Any] = {k: v for k, v in vars(args).items() if k != "out"}
  with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
    data_dir = args.data_dir
    if data_dir is None:
      folder, data_dir = os.path.join(tmp, "src"), os.path.join(tmp, "data")
      gen_cfg = synthetic.SyntheticConfig(num_products=args.num_products,
                                          image_size=args.source_image_size, seed=args.seed)
      config["generator"] = {"fn": "mmr_jax.data.synthetic.generate_folder",
                             "image_size": gen_cfg.image_size,
                             "num_queries": gen_cfg.total_queries}
      _log(f"generating {args.num_products} synthetic products")
      t = time.perf_counter()
      synthetic.generate_folder(folder, gen_cfg, progress=False)
      gen_s = time.perf_counter() - t
      _log(f"importing into {data_dir}")
      t = time.perf_counter()
      import_lib.import_catalog(folder, data_dir, seed=args.seed, progress=False, verbose=False)
      imp_s = time.perf_counter() - t
      result.update(products_per_s_generate=args.num_products / gen_s,
                    products_per_s_import=args.num_products / imp_s,
                    generate_s_per_1k_products=1000 * gen_s / args.num_products,
                    import_s_per_1k_products=1000 * imp_s / args.num_products)
      if args.beam_runner:
        _log(f"importing again with Beam ({args.beam_runner})")
        t = time.perf_counter()
        import_lib.import_catalog(folder, os.path.join(tmp, "data_beam"), seed=args.seed, progress=False,
                                  verbose=False, beam_runner=args.beam_runner, beam_options=args.beam_options)
        result["products_per_s_import_beam"] = args.num_products / (time.perf_counter() - t)
    _log(f"timing stage-2 pipeline: {args.batches} x {args.batch_size} examples")
    examples_per_s, data_config = time_pipeline(data_dir, args)
  config["data"] = data_config
  config["cpu_count"] = os.cpu_count()
  out = {"examples_per_s": examples_per_s, **result, "config": config}
  text = json.dumps(out, indent=2, default=str)
  print(text)
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
