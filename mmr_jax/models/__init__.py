"""Flax (linen) models of mmr_jax: ViT and text towers, fusion, the two-tower model.

`MODELS` is the registry the trainer looks models up in by `config.model_name`.
"""

from mmr_jax.models.two_tower import TwoTower, dummy_batch, embedding_dim, get_config

MODELS = {"two_tower": TwoTower}

__all__ = ["MODELS", "TwoTower", "dummy_batch", "embedding_dim", "get_config"]
