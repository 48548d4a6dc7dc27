"""A product's latent attributes (its ground-truth record), drawn from the vocabulary's tables.

Also the random-stream ids and the two draws every part of the generator shares: products draw from
`np.random.default_rng([seed, PRODUCT_STREAM, i])`, queries from `[seed, QUERY_STREAM]`, so product i
depends only on (seed, i) and a larger catalogue extends a smaller one.
"""

from __future__ import annotations

import bisect
import itertools
from typing import Any

import numpy as np

from mmr_jax.data.synthetic.config import SyntheticConfig
from mmr_jax.data.synthetic.vocabulary import (BRANDS, CARE_PROBS, CARES, CATEGORIES, COLOR_NAMES, COLOR_NEIGHBOURS,
                                               COLORS, GENDERS, MATERIALS, PATTERN_PROBS, PATTERNS, SIZES, STYLES)

PRODUCT_STREAM, QUERY_STREAM = 1, 2


def pick(rng: np.random.Generator, options):
  """Returns one of `options`, uniformly (one rng.random() draw)."""
  return options[int(rng.random() * len(options))]


def pick_weighted(rng: np.random.Generator, options, cum_probs):
  """Returns one of `options` with the weights whose running sums are `cum_probs` (one rng.random() draw)."""
  return options[min(bisect.bisect_right(cum_probs, rng.random() * cum_probs[-1]), len(options) - 1)]


_PATTERN_CUM = tuple(itertools.accumulate(PATTERN_PROBS))
_CARE_CUM = {m: tuple(itertools.accumulate(p)) for m, p in CARE_PROBS.items()}
_SECONDARY_OPTIONS = {c: tuple(o for o in COLOR_NAMES if o != c and o not in COLOR_NEIGHBOURS[c]) for c in COLORS}


def sample_latents(rng: np.random.Generator, cfg: SyntheticConfig) -> dict[str, Any]:
  """Returns one product's latent attributes (the ground-truth record, without id)."""
  cat = pick(rng, CATEGORIES)
  primary = pick(rng, COLOR_NAMES)
  # The secondary colour must be tellable from the primary, or patterns would be invisible.
  secondary = pick(rng, _SECONDARY_OPTIONS[primary])
  pattern = pick_weighted(rng, PATTERNS, _PATTERN_CUM)
  style = pick(rng, STYLES[cat])
  material = pick(rng, MATERIALS[cat])
  care = pick_weighted(rng, CARES, _CARE_CUM[material])
  size = pick(rng, SIZES[cat])
  gender = "women" if cat in ("dress", "skirt") else pick(rng, GENDERS)
  sparse = rng.random() < cfg.sparsity_rate
  noisy = (not sparse) and rng.random() < cfg.noise_rate
  if noisy:
    text_color = pick(rng, [c for c in COLOR_NAMES if c not in (primary, secondary)])
  else:
    text_color = None if sparse else primary
  language = "en"
  if rng.random() < cfg.second_language_rate:
    language = pick(rng, cfg.second_languages)
  return {
      "category": cat, "primary_color": primary, "secondary_color": secondary, "pattern": pattern,
      "style": style, "material": material, "care": care, "size": size, "gender": gender,
      "brand": pick(rng, BRANDS), "sparse_title": bool(sparse), "noisy": bool(noisy),
      "text_color": text_color, "language": language,
  }

