"""Where the pipelines' inputs come from: table rows, their fields, catalog_info.json and the tokenizer.

Every reader of a DATA_DIR's tables and text ids (pipelines, evaluation, export, the trainer's vocab
size) goes through here, so the run's SentencePiece model is chosen in one place (`tokenizer_path`).
TFDS is imported only when a table is opened: importing this module pulls in no TensorFlow.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

from etils import epath
import numpy as np

from mmr_jax.data import tfds_builder
from mmr_jax.data.tokenizer import Conventions, Tokenizer


# Random access: len(src), src[i] -> dict. grain pickles sources into each
# worker process, which reopens the array_record files there.
Source = Any


def open_source(data_dir: str, table: str, split: str) -> Source:
  """Returns the random-access source of DATA_DIR/mmr_catalog/<table>/<split>."""
  return tfds_builder.load_source(data_dir, table, split)


def catalog_info(data_dir: str) -> dict:
  """Returns catalog_info.json, or {} for tables without one (hand-built in tests): nothing to warn about."""
  try:
    return tfds_builder.catalog_info(data_dir)
  except FileNotFoundError:
    return {}


def tokenizer_path(data_dir: str, config: Any = None) -> str:
  """Returns the SentencePiece model a run tokenises with (every reader of text ids asks here).

  `config` is `config.data`: its `tokenizer.path` (the model shipped with a pretrained checkpoint,
  e.g. SigLIP's c4_en) wins; without one it is the catalogue's own DATA_DIR/tokenizer.model.
  Either may be a gs:// path.
  """
  path = config.tokenizer.path if config is not None else ""
  if path:
    path = str(path) if str(path).startswith("gs://") else os.path.expanduser(str(path))
    if not epath.Path(path).is_file():
      raise FileNotFoundError(f"config.data.tokenizer.path={path!r} is not a file (the SentencePiece "
                              ".model that goes with the pretrained checkpoint)")
    return path
  path = epath.Path(data_dir) / tfds_builder.TOKENIZER_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: DATA_DIR must be written by import_catalog / "
        "make_synthetic")
  return str(path)


def tokenizer_conventions(config: Any = None) -> Conventions:
  """Returns the eos / pad / bos / lowercase conventions of `config.data.tokenizer` (defaults: ours)."""
  return Conventions.from_config(config.tokenizer if config is not None else None)


def load_tokenizer(data_dir: str, config: Any = None) -> Tokenizer:
  """Returns the run's Tokenizer: `tokenizer_path(data_dir, config)` with its conventions."""
  return Tokenizer(tokenizer_path(data_dir, config), conventions=tokenizer_conventions(config))


def row_text(row: Mapping[str, Any], key: str) -> str:
  """Returns row[key] as str (TFDS numpy decoding gives bytes)."""
  try:
    value = row[key]
  except KeyError:
    raise KeyError(f"row has no field {key!r} (fields: {sorted(row)})") from None
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  if isinstance(value, np.ndarray) and value.ndim == 0:
    return row_text({key: value.item()}, key)
  return str(value)


def row_bytes(row: Mapping[str, Any], key: str) -> bytes:
  """Returns row[key] as bytes (an encoded image); raises TypeError for a str."""
  value = row[key]
  if isinstance(value, np.ndarray) and value.ndim == 0:
    value = value.item()
  if isinstance(value, str):
    raise TypeError(f"field {key!r} must hold encoded image bytes, got str")
  return bytes(value)
