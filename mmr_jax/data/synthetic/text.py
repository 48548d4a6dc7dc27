"""A product's title, description and attributes dict, written from its latent attributes.

Text is where the catalogue's difficulty lives: sparse products name no colour, pattern or style; noisy
ones name a wrong colour; some are in a second language; material, care and size are split between the
attributes dict and the description the way real listings split them.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import numpy as np

from mmr_jax.data.synthetic.config import SyntheticConfig
from mmr_jax.data.synthetic.latents import pick
from mmr_jax.data.synthetic.vocabulary import (FILLER, SEASONS, SENTENCES, STYLE_PHRASES, TEXTUAL_ATTRS, WORDS,
                                               words_for)


def _cap(s: str) -> str:
  return s[:1].upper() + s[1:]


def _in_sentence(lang: str, word: str) -> str:
  """Returns a vocabulary word as it stands in running text: lowercase, except German ones (nouns there)."""
  return word if lang == "de" else word.lower()


def _visual_sentence(lang: str, gt: dict[str, Any], color: str, pattern: str | None) -> str:
  """Returns a description sentence naming the colour `color`, the pattern and the style, in `lang`."""
  w = functools.partial(words_for, lang)
  style = w("style", gt["style"])
  if lang == "en":
    noun = STYLE_PHRASES.get((gt["category"], gt["style"]), (f"{style} {w('category', gt['category'])}",))[0]
    words = " ".join(p for p in (color, pattern, noun) if p).lower()
    if words.split()[-1] in ("shoes", "trousers", "shorts", "heels", "sneakers", "boots"):
      return _cap(words) + "."  # plural nouns take no article
    return f"{'An' if words[0] in 'aeiou' else 'A'} {words}."
  cat = w("category", gt["category"])
  if lang == "de":
    return ", ".join(p for p in (f"{cat} in {color}", pattern, style) if p) + "."
  return ", ".join(p for p in (f"{cat} {pattern or ''}".strip() + f" en color {color}", style) if p) + "."


def product_text(rng: np.random.Generator, gt: dict[str, Any], cfg: SyntheticConfig):
  """Returns (title, description, attributes) for one product, written in gt["language"].

  Sparse products name no colour, pattern or style anywhere; noisy ones name gt["text_color"] (wrong).
  Material, care and size each appear in the attributes dict, the description, or both.
  """
  lang = gt["language"]
  w = functools.partial(words_for, lang)
  cat = w("category", gt["category"])
  sparse = gt["sparse_title"]
  color = None if sparse else w("color", gt["text_color"])
  pattern = None if sparse or gt["pattern"] == "solid" else w("pattern", gt["pattern"])
  style = None
  if not sparse and rng.random() < cfg.style_in_title_rate:
    style = w("style", gt["style"])
  gender = w("gender", gt["gender"])
  season = w("season", pick(rng, SEASONS))
  brand = gt["brand"]

  if sparse:
    # What real sparse listings look like: category plus words nobody searches for colour with.
    templates = {
        "en": ["{cat} {gender} {season}", "{brand} {cat}", "{brand} {gender_p} {cat}",
               "{cat} {gender} {season} {material}"],
        "de": ["{cat} {gender} {season}", "{brand} {cat}", "{brand} {gender} {cat} {material}"],
        "es": ["{cat} {gender} {season}", "{brand} {cat}", "{cat} para {gender} {brand}"],
    }[lang]
  else:
    templates = {
        "en": ["{brand} {gender_p} {color} {pattern} {style} {cat}", "{color} {pattern} {cat} - {style}",
               "{cat} {gender} {color} {pattern} {style} {season}", "{brand} {color} {pattern} {cat} {material}"],
        "de": ["{brand} {gender} {cat} {color} {pattern} {style}", "{cat} {color} {pattern} {style} {season}",
               "{color} {pattern} {cat} {material}"],
        "es": ["{cat} {pattern} {color} {style} {brand}", "{cat} {color} {pattern} para {gender} {style}",
               "{brand} {cat} {color} {pattern}"],
    }[lang]
  template = pick(rng, templates)
  title = template.format(
      cat=cat, gender=gender, gender_p=w("gender_possessive", gt["gender"]), season=season, brand=brand,
      color=color or "", pattern=pattern or "", style=style or "", material=_cap(w("material", gt["material"])))
  title = re.sub(r"[\s-]+$", "", re.sub(r"\s+", " ", title)).strip()  # empty slots leave gaps / a dangling "-"

  # Which text-only attributes go in the attributes dict; the rest go in the description, so an empty
  # description puts them all in the dict.
  empty_description = rng.random() < cfg.empty_description_rate
  in_attrs = {k: empty_description or bool(rng.random() < p) for k, p in zip(TEXTUAL_ATTRS, (0.6, 0.5, 0.7))}
  key = WORDS[lang]["key"]
  attributes: dict[str, str] = {key["brand"]: brand}
  for k in TEXTUAL_ATTRS:
    if in_attrs[k]:
      attributes[key[k]] = w(k, gt[k])
  if rng.random() < 0.5:
    attributes[key["gender"]] = gender
  if not sparse and rng.random() < 0.5:
    attributes[key["color"]] = _in_sentence(lang, color)
  if pattern and rng.random() < 0.3:
    attributes[key["pattern"]] = _in_sentence(lang, pattern)

  needs = [k for k, v in in_attrs.items() if not v]
  sentences: list[str] = []
  if not empty_description:
    s = SENTENCES[lang]
    if not sparse and rng.random() < 0.6:
      sentences.append(_visual_sentence(lang, gt, color, pattern))
    fillers = FILLER[lang]
    sentences.append(pick(rng, fillers))
    for k in TEXTUAL_ATTRS:
      if k in needs or rng.random() < 0.3:
        if k == "size" and gt["size"] == "one size":
          sentences.append(_cap(w("size", "one size")) + ".")
        else:
          sentences.append(s[k].format(**{k: w(k, gt[k])}))
    if rng.random() < 0.3:
      sentences.append(s["season"].format(season=_in_sentence(lang, season)))
  description = re.sub(r"\s+", " ", " ".join(sentences)).replace(" ,", ",").strip()
  return title, description, attributes

