r"""Generates the synthetic catalogue and imports it into DATA_DIR in one step.

Usage:
  python -m mmr_jax.data.make_synthetic --out DATA_DIR [--preset small] [--num_products N] [--seed S]
      [--image_size 64] [--num_queries Q] [--sparsity_rate 0.4] [--noise_rate 0.05]
      [--second_language_rate 0.1] [--novel_product_fraction 0.1] [--image_max_side 256]
      [--vocab_size 8000] [--pair_grades E] [--keep_source DIR] [--overwrite]

The catalogue folder (products.jsonl, queries.jsonl, qrels.tsv, images/, ground_truth.jsonl; see
mmr_jax/data/synthetic/) is written to a temporary folder beside DATA_DIR (or to --keep_source),
then `import_catalog` validates it and writes DATA_DIR exactly as it does for a real catalogue.
DATA_DIR also gets ground_truth.jsonl (latent attributes per product id) and synthetic_info.json
(the generator config and its stats: sparse/noisy fractions, label coverage, ...).

Sizes: `--preset` picks from synthetic.PRESETS (tiny 300, small 2k, medium 20k, large 100k, xlarge 500k
products); --num_products and the other flags override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any, Sequence

from mmr_jax.data import catalog
from mmr_jax.data import import_catalog as import_lib
from mmr_jax.data import synthetic

GROUND_TRUTH_FILE = "ground_truth.jsonl"
INFO_FILE = "synthetic_info.json"


def make_synthetic(out_dir: str | os.PathLike, config: synthetic.SyntheticConfig, *,
                   keep_source: str | os.PathLike | None = None, progress: bool = True,
                   verbose: bool = True, **import_options) -> dict[str, Any]:
  """Returns {"generate": generator stats, "import": import summary} after writing DATA_DIR.

  Args:
    out_dir: DATA_DIR to write (import_catalog's rules: new/empty, or overwrite=True).
    config: the generator's knobs.
    keep_source: write the catalogue folder here and keep it; default a temporary folder beside out_dir.
    progress, verbose: progress bars and printed summaries.
    **import_options: passed to import_catalog (novel_product_fraction, image_max_side, vocab_size,
      pair_grades, overwrite, jpeg_quality, ...); seed defaults to config.seed.
  """
  out = pathlib.Path(out_dir).expanduser().absolute()
  # Fail before generating (minutes at scale) what import_catalog would refuse to write anyway.
  if out.exists() and (not out.is_dir() or any(out.iterdir())) and not import_options.get("overwrite"):
    raise catalog.CatalogError(f"output {str(out)!r} exists and is not empty; choose a new directory "
                               "(or pass --overwrite to replace an imported catalogue)")
  import_options.setdefault("seed", config.seed)
  import_options.setdefault("name", f"synthetic_n{config.num_products}_seed{config.seed}")
  out.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix=f".{out.name}.synthetic-", dir=out.parent) as tmp:
    src = pathlib.Path(keep_source).expanduser().absolute() if keep_source else pathlib.Path(tmp)
    t0 = time.perf_counter()
    stats = synthetic.generate_folder(src, config, progress=progress)
    if verbose:
      print(f"Generated {config.num_products} products, {sum(stats['num_queries'].values())} queries in "
            f"{time.perf_counter() - t0:.1f} s ({stats['products_per_second']:.0f} products/s) -> {src}",
            flush=True)
    summary = import_lib.import_catalog(src, out, progress=progress, verbose=verbose, **import_options)
    # import_catalog carries ground_truth.jsonl over; copied here too in case an importer does not.
    if not (out / GROUND_TRUTH_FILE).exists():
      shutil.copyfile(src / GROUND_TRUTH_FILE, out / GROUND_TRUTH_FILE)
  info = {"config": dataclasses.asdict(config), "stats": stats}
  (out / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
  return {"generate": stats, "import": summary}


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m mmr_jax.data.make_synthetic",
      description="Generate the deterministic synthetic e-commerce catalogue and import it into DATA_DIR.")
  p.add_argument("--out", required=True, metavar="DATA_DIR", help="output DATA_DIR")
  p.add_argument("--preset", default="small", choices=sorted(synthetic.PRESETS),
                 help="size preset (default small); other flags override it")
  p.add_argument("--num_products", type=int, default=None, help="catalogue size")
  p.add_argument("--num_queries", type=int, default=None,
                 help="queries over all splits (default: scales with products, see SyntheticConfig)")
  p.add_argument("--seed", type=int, default=0, help="everything derives from it")
  p.add_argument("--image_size", type=int, default=None, help="rendered image side in pixels (default 64)")
  for name in ("sparsity_rate", "noise_rate", "second_language_rate", "occlusion_rate"):
    field = synthetic.SyntheticConfig.__dataclass_fields__[name]
    p.add_argument(f"--{name}", type=float, default=None, help=f"SyntheticConfig.{name} (default {field.default})")
  p.add_argument("--keep_source", default=None, metavar="DIR",
                 help="also keep the generated catalogue folder (the format users bring) here")
  imp = p.add_argument_group("import options (see python -m mmr_jax.data.import_catalog --help)")
  imp.add_argument("--novel_product_fraction", type=float, default=0.1)
  imp.add_argument("--image_max_side", type=int, default=256)
  imp.add_argument("--vocab_size", type=int, default=8000)
  imp.add_argument("--pair_grades", default="E", help="grades making a training pair, e.g. E or E,S")
  imp.add_argument("--overwrite", action="store_true", help="replace DATA_DIR if it holds a catalogue")
  p.add_argument("--no_progress", action="store_true", help="no progress bars")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  overrides = {k: getattr(args, k) for k in ("num_products", "num_queries", "image_size", "sparsity_rate",
                                             "noise_rate", "second_language_rate", "occlusion_rate")
               if getattr(args, k) is not None}
  try:
    config = synthetic.preset(args.preset, seed=args.seed, **overrides)
    make_synthetic(args.out, config, keep_source=args.keep_source, progress=not args.no_progress,
                   novel_product_fraction=args.novel_product_fraction, image_max_side=args.image_max_side,
                   vocab_size=args.vocab_size, pair_grades=args.pair_grades, overwrite=args.overwrite)
  except (ValueError, catalog.CatalogError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
