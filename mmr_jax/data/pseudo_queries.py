"""Pseudo-queries: search-like phrases sampled from a product's own text, paired with that product.

Query logs are small (a catalogue may have a few hundred labelled queries) and no pretrained text
tower can be downloaded, so the text towers would otherwise learn the catalogue's vocabulary from the
labelled pairs alone. A pseudo-query pairs a product with a few of its own terms, the way shoppers
type them: words of the title and whole attribute values ("navy blue", "machine washable"), in random
order. Training on them (`config.data.pseudo_queries`) teaches both text towers which words name which
products — lexical matching — for every product in the catalogue, not just the labelled ones (the
inverse-cloze / cropping idea of ICT and Contriever, on structured product text).

Only the product's own fields are read, so this works on any catalogue and language; descriptions are
used only when title and attributes give no term, since their words are mostly not what people search.
"""

from __future__ import annotations

import re

import numpy as np

MAX_TERMS = 4
# Runs of letters/digits (with inner hyphens or apostrophes, e.g. "t-shirt", "men's") in any script.
_WORD = re.compile(r"[^\W_]+(?:[-'’][^\W_]+)*")


def attribute_values(attributes: str) -> list[str]:
  """Returns the values of a rendered attributes string "key: value; key: value" (lists split on ", ")."""
  out = []
  for part in attributes.split("; "):
    _, sep, value = part.partition(": ")
    value = value if sep else part
    out += [v.strip() for v in value.split(", ") if v.strip()]
  return out


def candidate_terms(title: str, attributes: str, description: str = "") -> list[str]:
  """Returns the distinct terms a pseudo-query may use: title words and attribute values (case-folded)."""
  terms = _WORD.findall(title) + attribute_values(attributes)
  if not terms:
    terms = _WORD.findall(description)
  seen, out = set(), []
  for t in terms:
    key = t.casefold()
    if key not in seen:
      seen.add(key)
      out.append(key)
  return out


def sample(title: str, attributes: str, description: str, rng: np.random.Generator) -> str:
  """Returns a pseudo-query of 1..MAX_TERMS distinct terms of the product, in random order ("" if none)."""
  return sample_terms(candidate_terms(title, attributes, description), rng)


def sample_terms(terms: list[str], rng: np.random.Generator) -> str:
  """Returns a pseudo-query of 1..MAX_TERMS of `terms` (`candidate_terms`'s), in random order ("" if none)."""
  if not terms:
    return ""
  n = int(rng.integers(1, min(MAX_TERMS, len(terms)) + 1))
  picked = rng.choice(len(terms), size=n, replace=False)
  return " ".join(terms[i] for i in picked)
