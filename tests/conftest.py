"""Shared pytest fixtures."""

import json
import pathlib
from typing import Any, Iterable

import numpy as np
import pytest


def write_catalog(src: pathlib.Path, products: Iterable[Any], queries: Iterable[Any],
                  qrels: Iterable[Any], images: dict[str, tuple[int, int]] | None = None,
                  qrels_header: bool = True) -> pathlib.Path:
  """Returns src after writing a catalogue folder.

  products / queries: dicts (written as JSON lines) or raw `bytes`/`str` lines written verbatim
  (for malformed input). qrels: (query_id, product_id, grade) tuples or raw lines.
  images: relative path -> (width, height); written as noise with Pillow in the format the
  suffix names (.png / .jpg).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  src.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(0)
  for rel, (w, h) in (images or {}).items():
    path = src / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)

  def write_lines(name: str, rows: Iterable[Any], render) -> None:
    with open(src / name, "wb") as f:
      for row in rows:
        if isinstance(row, bytes):
          f.write(row.rstrip(b"\n") + b"\n")
        elif isinstance(row, str):
          f.write(row.rstrip("\n").encode("utf-8") + b"\n")
        else:
          f.write(render(row).encode("utf-8") + b"\n")

  write_lines("products.jsonl", products, lambda r: json.dumps(r, ensure_ascii=False))
  write_lines("queries.jsonl", queries, lambda r: json.dumps(r, ensure_ascii=False))
  qrels = list(qrels)
  if qrels_header:
    qrels = ["query_id\tproduct_id\tgrade"] + qrels
  write_lines("qrels.tsv", qrels, lambda r: "\t".join(r))
  return src


@pytest.fixture(scope="session")
def catalog_writer():
  """Returns write_catalog (see its docstring)."""
  return write_catalog


@pytest.fixture(autouse=True)
def _command_logging():
  """Undoes the logging set-up of a command's main() a test ran: its console handler writes to that test's
  captured stderr, which is closed once the test ends."""
  import logging  # pylint: disable=g-import-not-at-top
  from mmr_jax import runtime  # pylint: disable=g-import-not-at-top
  level = logging.getLogger().level
  yield
  runtime.reset_logging()
  logging.getLogger().setLevel(level)


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  """Shares compiled executables between the tests' many identical tiny trainers."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> str:
  """Returns a DATA_DIR with the `tiny` synthetic catalogue (300 products, 32 px), made once per session."""
  from mmr_jax.data import make_synthetic, synthetic  # pylint: disable=g-import-not-at-top
  out = tmp_path_factory.mktemp("tiny_data") / "data"
  make_synthetic.make_synthetic(out, synthetic.preset("tiny"), progress=False, verbose=False)
  return str(out)


def pytest_itemcollected(item):
  """Keeps the tests that share a module-scoped fixture on one pytest-xdist worker (tools/test.sh runs
  `--dist loadgroup`): those fixtures train or compile for minutes, and every worker would otherwise build
  its own. Other tests, those of the same module included, are dealt out one by one."""
  module = getattr(item, "module", None)
  if module is None:
    return
  shared = set()
  for attr, value in vars(module).items():
    marker = getattr(value, "_fixture_function_marker", None)
    if getattr(marker, "scope", None) == "module":
      shared.add(marker.name or attr)
  if shared & set(getattr(item, "fixturenames", ())):
    item.add_marker(pytest.mark.xdist_group(item.nodeid.split("::")[0]))


def tiny_config(data_dir: str, stage: int = 2, variant: str = "fusion", **train):
  """Returns the demo config shrunk for tests (seconds per run), with `train` overrides."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).resolve().parents[1]
  spec = importlib.util.spec_from_file_location("demo_config", root / "configs" / "demo.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config(f"stage={stage},variant={variant},runlocal=True,data={data_dir}")
  for k, v in train.items():
    cfg.train[k] = v
  return cfg


@pytest.fixture(scope="session")
def tiny_workdir(tiny_data, tmp_path_factory) -> str:
  """Returns a workdir of a few stage-2 fusion steps on `tiny_data` (for evaluation / export tests)."""
  from mmr_jax import train  # pylint: disable=g-import-not-at-top
  wd = tmp_path_factory.mktemp("tiny_workdir") / "fusion"
  cfg = tiny_config(tiny_data, progress=False)
  # The tiny catalogue's shoppers' words no product uses each come in one training query: one is evidence enough
  # here, so the run (and what evaluation and export read from it) has a query translation table that is not empty.
  cfg.data.query_translation.min_queries = 1
  train.train_and_evaluate(cfg, str(wd))
  return str(wd)


def suggested_overrides(text: str) -> list[tuple[str, str]]:
  """Returns the `config.KEY=VALUE` settings a message suggests, each checked as the trainer parses it.

  Each becomes `--config.KEY=VALUE` on configs/demo.py, locked as `python -m mmr_jax.train` locks it,
  so a message cannot tell the user to set a key (or a value) the command line then rejects.
  """
  import re  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  demo = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"
  found = [(k, v.rstrip(".")) for k, v in re.findall(r"\bconfig\.([\w.]+)=([^\s);,]+)", text)]
  for key, value in found:
    argv = ["train", f"--config={demo}", f"--config.{key}={value}"]
    fv = flags.FlagValues()  # private: absl's global flags stay untouched
    config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    node = fv.config
    for part in key.split("."):
      node = node[part]
    assert str(node) == value, (key, value, node)
  return found
