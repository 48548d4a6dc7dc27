"""A trained workdir as embedding functions: the bridge from checkpoints to evaluation and export.

Evaluation and export only need `embed_queries(batch) -> [B, D]` and `embed_products(batch) -> [B, D]`;
this module builds them from a workdir's config.json and latest checkpoint, jitted over a mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from etils import epath

from mmr_jax import checkpoint as ckpt_lib
from mmr_jax import config as config_lib
from mmr_jax import sharding as shd


@dataclasses.dataclass
class TrainedModel:
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


def load_trained(workdir: str, data_dir: str | None = None, mesh=None) -> TrainedModel:
  """Returns the workdir's model and latest parameters, replicated over `mesh` (default: all devices, data axis)."""
  from mmr_jax import train  # pylint: disable=g-import-not-at-top
  config = load_config(workdir)
  if data_dir:
    with config.unlocked():
      config.data.dir = data_dir
  train.check_data_dir(workdir, config.data.dir)
  # The tokenizer of the data the model was trained on must match the one used now.
  trained_vocab = config.model.text.vocab_size
  if data_dir and trained_vocab > 0:
    from mmr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    from mmr_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
    path = pipeline.tokenizer_path(data_dir, config.data)  # config.data.tokenizer.path when the run set one
    now = tok_lib.Tokenizer(path).vocab_size
    if now != trained_vocab:
      raise ValueError(f"{path} has vocab {now} but {workdir} was trained with {trained_vocab}: "
                       "evaluate with the DATA_DIR the model was trained on")
  model = train.create_model(config)
  params, step = ckpt_lib.restore_params(workdir)
  mesh = mesh if mesh is not None else shd.make_mesh({"data": -1})
  params = jax.device_put(params, shd.replicated(mesh))
  return TrainedModel(config=config, model=model, params=params, step=step, mesh=mesh)
