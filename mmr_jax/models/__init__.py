"""Flax (linen) models of mmr_jax: ViT and text towers, fusion, the two-tower model.

`MODELS` is the registry `create_model` looks models up in by `config.model.name`, as
`objectives.OBJECTIVES` is for the training objective of `config.stage`.
"""

from mmr_jax.models.two_tower import TwoTower, dummy_batch, embedding_dim, get_config

MODELS = {"two_tower": TwoTower}


def create_model(config):
  """Returns the Flax module `config.model.name` names, built from `config.model`."""
  name = config.model.name
  if name not in MODELS:
    raise KeyError(f"unknown model.name {name!r}; known: {sorted(MODELS)}")
  return MODELS[name](config.model)


__all__ = ["MODELS", "TwoTower", "create_model", "dummy_batch", "embedding_dim", "get_config"]
