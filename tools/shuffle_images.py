"""A control catalogue: a catalogue folder with every product's image swapped for another product's.

  python tools/shuffle_images.py SRC_DIR OUT_DIR [--seed 0]
  python -m mmr_jax.data.import_catalog OUT_DIR --out DATA_DIR_SHUFFLED
  python -m mmr_jax.ablation --workdir W --data DATA_DIR_SHUFFLED --rows text_only,concat_ft,fusion_ft,text_only_ft

SRC_DIR is the folder format `import_catalog` reads (README, Bring your own catalogue). OUT_DIR gets the same
files, except that the products with an image pass their images round a seeded random cycle: none keeps its own,
and the catalogue holds the same images as before. Text, queries and labels are untouched, so the images now say
nothing about their product. The ablation on the copy shows what the image rows make of images that carry no
information about the product: the text_only row is the same model either way, so an image row that falls below it
there loses to something other than what the images show; the text_only_ft row (the same text towers without an
image) tells whether its text towers or its image side lose it. Lines of products.jsonl that are not a JSON
object with a string "image" are copied as they are (the importer reports the malformed ones).

OUT_DIR must not exist (nothing is overwritten). Prints one JSON line: {"products", "with_image", "swapped"}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np

PRODUCTS = "products.jsonl"


def shuffle_images(src: str, out: str, seed: int = 0) -> dict:
  """Writes the control copy of catalogue folder `src` into `out` (see the module docstring); returns its counts."""
  if not os.path.isfile(os.path.join(src, PRODUCTS)):
    raise FileNotFoundError(f"{src}: no {PRODUCTS} (expected a catalogue folder, see import_catalog --help)")
  if os.path.exists(out):
    raise FileExistsError(f"{out} exists: give a new folder (nothing is overwritten)")
  with open(os.path.join(src, PRODUCTS), encoding="utf-8-sig") as f:
    lines = f.read().splitlines()
  records, with_image = [], []
  for i, line in enumerate(lines):
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      rec = None
    ok = isinstance(rec, dict) and isinstance(rec.get("image"), str) and rec["image"]
    records.append(rec if ok else None)
    if ok:
      with_image.append(i)
  # A random cycle through the products with an image: each takes the next one's image, so none keeps its own.
  order = np.random.default_rng(seed).permutation(len(with_image))
  cycle = [with_image[k] for k in order]
  images = {i: records[i]["image"] for i in with_image}
  for a, b in zip(cycle, cycle[1:] + cycle[:1]):
    records[a] = dict(records[a], image=images[b])
  tmp = out.rstrip("/\\") + ".tmp-shuffle"
  shutil.rmtree(tmp, ignore_errors=True)
  shutil.copytree(src, tmp, ignore=lambda d, names: [PRODUCTS] if os.path.samefile(d, src) else [],
                  copy_function=_link_or_copy)
  with open(os.path.join(tmp, PRODUCTS), "w", encoding="utf-8") as f:
    for line, rec in zip(lines, records):
      f.write((json.dumps(rec, ensure_ascii=False) if rec is not None else line) + "\n")
  os.replace(tmp, out)
  swapped = sum(images[a] != images[b] for a, b in zip(cycle, cycle[1:] + cycle[:1])) if len(cycle) > 1 else 0
  return {"products": len(lines), "with_image": len(with_image), "swapped": int(swapped)}


def _link_or_copy(a: str, b: str) -> None:
  """Hard-links `a` to `b` (a photo catalogue is not copied twice), or copies it where links are not possible."""
  try:
    os.link(a, b)
  except OSError:
    shutil.copy2(a, b)


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                               formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  ap.add_argument("src", metavar="SRC_DIR", help="catalogue folder (products.jsonl, queries.jsonl, qrels.tsv, images)")
  ap.add_argument("out", metavar="OUT_DIR", help="new folder for the control copy")
  ap.add_argument("--seed", type=int, default=0, help="seed of the cycle")
  args = ap.parse_args(argv)
  try:
    counts = shuffle_images(args.src, args.out, args.seed)
  except (FileNotFoundError, FileExistsError) as e:
    sys.exit(f"error: {e}")
  print(json.dumps(counts))
  return counts


if __name__ == "__main__":
  main()
