"""A model's parameters as embedding functions, and whole tables embedded with them.

Every evaluator and the export need only `embed_queries(batch) -> [B, D]` and `embed_products(batch) ->
[B, D]`. `Embedder` makes them from a model, its parameters and a mesh (jitted once per model);
`load_trained` builds one from a workdir's config.json and latest checkpoint; `embed_table` runs one over a
table's batches and puts the rows back in table order.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from tqdm import tqdm

from mmr_jax import checkpoint as ckpt_lib
from mmr_jax import config as config_lib
from mmr_jax.data import sources
from mmr_jax.data import tokenizer as tok_lib
from mmr_jax.models import create_model
from mmr_jax import sharding as shd


@dataclasses.dataclass
class Embedder:
  """A model and its parameters (replicated over `mesh`) as jitted query / product embedding functions."""

  config: ml_collections.ConfigDict
  model: Any
  params: Any
  step: int
  mesh: Any

  def _jit(self, method: str, keys: tuple[str, ...]) -> Callable[[dict], np.ndarray]:
    model, mesh = self.model, self.mesh

    def fn(params, *args):
      return model.apply({"params": params}, *args, train=False, method=method)["emb"]

    jitted = jax.jit(fn)

    def call(batch: dict) -> np.ndarray:
      arrays = shd.host_batch_to_global({k: batch[k] for k in keys}, mesh)
      out = jitted(self.params, *(arrays[k] for k in keys))
      return shd.global_to_host(out)

    return call

  # Cached: one jitted function (and its compiled shapes) per model, however often evaluation asks for it.
  @functools.cached_property
  def embed_queries(self) -> Callable[[dict], np.ndarray]:
    """Returns fn(batch with query_tokens [B, Lq]) -> [B, D] L2-normalised query embeddings."""
    return self._jit("embed_query", ("query_tokens",))

  @functools.cached_property
  def embed_products(self) -> Callable[[dict], np.ndarray]:
    """Returns fn(batch with product_tokens, image, has_image) -> [B, D] product embeddings."""
    return self._jit("embed_product", ("product_tokens", "image", "has_image"))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: is {workdir!r} a training workdir?")
  return config_lib.fill_defaults(ml_collections.ConfigDict(json.loads(path.read_text())))


def load_trained(workdir: str, data_dir: str | None = None, mesh=None) -> Embedder:
  """Returns the workdir's model and latest parameters, replicated over `mesh` (default: all devices, data axis)."""
  config = load_config(workdir)
  if data_dir:
    with config.unlocked():
      config.data.dir = data_dir
  ckpt_lib.check_data_dir(workdir, config.data.dir)
  # The tokenizer of the data the model was trained on must match the one used now.
  trained_vocab = config.model.text.vocab_size
  if data_dir and trained_vocab > 0:
    path = sources.tokenizer_path(data_dir, config.data)  # config.data.tokenizer.path when the run set one
    now = tok_lib.Tokenizer(path).vocab_size
    if now != trained_vocab:
      raise ValueError(f"{path} has vocab {now} but {workdir} was trained with {trained_vocab}: "
                       "evaluate with the DATA_DIR the model was trained on")
  model = create_model(config)
  params, step = ckpt_lib.restore_params(workdir)
  mesh = mesh if mesh is not None else shd.make_mesh({"data": -1})
  params = jax.device_put(params, shd.replicated(mesh))
  return Embedder(config=config, model=model, params=params, step=step, mesh=mesh)


def embed_table(embed_fn: Callable[[dict], np.ndarray], batches: Iterable[dict], total: int | None = None,
                desc: str = "embed") -> tuple[np.ndarray, np.ndarray]:
  """Returns (embeddings [N, D] float32, row indexes [N]) of the unpadded rows of `batches`.

  Batches carry a `mask` [B] (False on padding rows) and an index key (`product_index` / `query_index`);
  rows are returned sorted by that index, so the result lines up with the table.
  """
  embs, idxs = [], []
  with tqdm(total=total, desc=desc, unit="row", file=sys.stderr, disable=total is not None and total < 1,
            mininterval=1.0) as bar:
    for batch in batches:
      key = "product_index" if "product_index" in batch else "query_index"
      e = np.asarray(embed_fn(batch), np.float32)
      m = np.asarray(batch["mask"], bool)
      idx = np.asarray(batch[key])
      if e.shape[0] != m.shape[0]:
        # Multi-host: the embedding function returned the global batch (every host's rows, in process
        # order); gather the host-local masks and indexes the same way so rows line up.
        m = np.asarray(multihost_utils.process_allgather(m, tiled=True))
        idx = np.asarray(multihost_utils.process_allgather(idx, tiled=True))
      embs.append(e[m])
      idxs.append(idx[m])
      bar.update(int(m.sum()))
  if not embs:
    raise ValueError(f"{desc}: no rows to embed")
  emb, idx = np.concatenate(embs), np.concatenate(idxs)
  order = np.argsort(idx, kind="stable")
  return emb[order], idx[order]


