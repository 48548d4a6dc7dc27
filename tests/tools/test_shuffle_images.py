"""tools/shuffle_images.py: the control catalogue whose images say nothing about their product."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import shuffle_images  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position


def _catalogue(tmp_path, n=7):
  src = tmp_path / "src"
  (src / "images").mkdir(parents=True)
  lines = []
  for i in range(n):
    (src / "images" / f"p{i}.png").write_bytes(f"image {i}".encode())
    lines.append(json.dumps({"id": f"p{i}", "title": f"title {i}", "image": f"images/p{i}.png"}))
  lines.append(json.dumps({"id": "noimg", "title": "no image"}))
  lines.append("{not json")
  (src / "products.jsonl").write_text("\n".join(lines) + "\n")
  (src / "queries.jsonl").write_text(json.dumps({"id": "q1", "text": "t", "split": "test"}) + "\n")
  (src / "qrels.tsv").write_text("q1\tp1\tE\n")
  return src


def test_every_product_gets_another_products_image_and_nothing_else_changes(tmp_path):
  src = _catalogue(tmp_path)
  counts = shuffle_images.shuffle_images(str(src), str(tmp_path / "out"), seed=3)
  assert counts == {"products": 9, "with_image": 7, "swapped": 7}
  before = (src / "products.jsonl").read_text().splitlines()
  after = (tmp_path / "out" / "products.jsonl").read_text().splitlines()
  old = [json.loads(l) for l in before[:7]]
  new = [json.loads(l) for l in after[:7]]
  assert all(a["image"] != b["image"] for a, b in zip(old, new))  # none keeps its own image
  assert sorted(b["image"] for b in new) == sorted(a["image"] for a in old)  # the same images
  assert [{k: v for k, v in b.items() if k != "image"} for b in new] == [
      {k: v for k, v in a.items() if k != "image"} for a in old]  # text untouched
  assert after[7:] == before[7:]  # no image, malformed: as they were
  for name in ("queries.jsonl", "qrels.tsv", "images/p3.png"):
    assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()
  # Seeded: the same seed gives the same copy, another seed another one.
  shuffle_images.shuffle_images(str(src), str(tmp_path / "again"), seed=3)
  shuffle_images.shuffle_images(str(src), str(tmp_path / "other"), seed=4)
  assert (tmp_path / "again" / "products.jsonl").read_text() == "\n".join(after) + "\n"
  assert (tmp_path / "other" / "products.jsonl").read_text() != "\n".join(after) + "\n"


def test_refuses_an_existing_output_and_a_folder_without_products(tmp_path):
  src = _catalogue(tmp_path)
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "keep.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="nothing is overwritten"):
    shuffle_images.shuffle_images(str(src), str(tmp_path / "out"))
  assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
  run = subprocess.run([sys.executable, str(ROOT / "tools" / "shuffle_images.py"), str(tmp_path / "out"),
                        str(tmp_path / "x")], capture_output=True, text=True, check=False)
  assert run.returncode != 0 and "no products.jsonl" in run.stderr and not (tmp_path / "x").exists()
