"""Queries and their graded labels (qrels), from the catalogue's latent attributes.

Queries are English and of three kinds (visual, textual, mixed), refined with more attributes until
they match at most `SyntheticConfig.relevant_cap` products. Grades come from the latent attributes,
never from the (possibly wrong) product text: E every query attribute matches, S one attribute off, C a
complementary category, I hard negatives. The package docstring gives the full rules.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import numpy as np

from mmr_jax.data.synthetic.config import SyntheticConfig
from mmr_jax.data.synthetic.latents import QUERY_STREAM, pick_weighted
from mmr_jax.data.synthetic.vocabulary import (CATEGORIES, COLOR_NAMES, COMPLEMENTS, NEIGHBOURS, QUERY_CATEGORY,
                                               QUERY_COLOR, QUERY_PATTERN, SIZES, STYLE_PHRASES, TEXTUAL_ATTRS,
                                               VISUAL_ATTRS)

_QUERY_ATTRS = VISUAL_ATTRS + TEXTUAL_ATTRS
_NONE = np.zeros(0, np.int64)  # an empty index list, for look-ups that find no products
_NONE.flags.writeable = False


class _Catalog:
  """Latent attributes as integer codes [N] per attribute, with per-category index lists."""

  def __init__(self, gts: list[dict[str, Any]]):
    self.vocab: dict[str, dict[str, int]] = {}
    self.codes: dict[str, np.ndarray] = {}
    for attr in ("category",) + _QUERY_ATTRS:
      values = sorted({g[attr] for g in gts})
      self.vocab[attr] = {v: i for i, v in enumerate(values)}
      self.codes[attr] = np.asarray([self.vocab[attr][g[attr]] for g in gts], np.int32)
    self.sparse = np.asarray([g["sparse_title"] for g in gts], bool)
    self.by_category = {c: np.flatnonzero(self.codes["category"] == i) for c, i in self.vocab["category"].items()}
    self.by_cat_color: dict[tuple[str, str], np.ndarray] = {}
    for i, g in enumerate(gts):
      self.by_cat_color.setdefault((g["category"], g["primary_color"]), []).append(i)
    self.by_cat_color = {k: np.asarray(v) for k, v in self.by_cat_color.items()}

  def code(self, attr, value) -> int:
    return self.vocab[attr].get(value, -1)

  def mismatches(self, idx: np.ndarray, query: dict[str, str]) -> np.ndarray:
    """Returns, per product in idx, how many non-category query attributes it does not have."""
    out = np.zeros(len(idx), np.int32)
    for attr, value in query.items():
      if attr != "category":
        out += self.codes[attr][idx] != self.code(attr, value)
    return out

  def near(self, idx: np.ndarray, attr: str, value: str) -> np.ndarray:
    """Returns a bool mask over idx: the product's `attr` is a near value of `value` (not equal)."""
    near = [self.code(attr, n) for n in NEIGHBOURS.get(attr, {}).get(value, ())]
    return np.isin(self.codes[attr][idx], near)



def _query_text(rng: np.random.Generator, q: dict[str, str]) -> str:
  """Returns how a shopper would type the query `q` (canonical attributes)."""
  pick = lambda options: options[rng.integers(len(options))]
  cat = q["category"]
  if "style" in q:
    noun = pick(STYLE_PHRASES.get((cat, q["style"]), (f"{q['style']} {pick(QUERY_CATEGORY[cat])}",)))
  else:
    noun = pick(QUERY_CATEGORY[cat])
  color = pick(QUERY_COLOR[q["primary_color"]]) if "primary_color" in q else ""
  pattern = pick(QUERY_PATTERN[q["pattern"]]) if "pattern" in q else ""
  material = q.get("material", "")
  care = q.get("care", "")
  size = f"size {q['size'].lower()}" if "size" in q else ""
  visual = " ".join(p for p in (color, pattern) if p)
  forms = [
      f"{visual} {care} {material} {noun} {size}",
      f"{care} {material} {noun} {visual} {size}",
      f"{visual} {material} {noun} {care} {size}",
  ]
  return re.sub(r"\s+", " ", pick(forms)).strip()


def _choose_attrs(rng: np.random.Generator, kind: str, gt: dict[str, Any], need_color: bool):
  """Returns (attrs, n0): every query attribute besides category in refinement order, and how many start.

  A query starts with its kind's attributes; when it matches too many products it is refined with the
  next ones, so a "visual" query can become "mixed" (its tag follows its final attributes).
  """
  rest = ["pattern", "style"]
  rest = [rest[i] for i in rng.permutation(2)]
  if gt["pattern"] == "solid" and rng.random() < 0.7:
    rest = ["style", "pattern"]  # "plain" is a rarer query word than the others
  visual = ["primary_color"] + rest if (need_color or rng.random() < 0.75) else rest + ["primary_color"]
  textual = ["material", "care"] if rng.random() < 0.7 else ["care", "material"]
  if len(SIZES[gt["category"]]) > 1:
    textual.append("size")
  if kind == "visual":
    return visual + textual, 1 + int(rng.random() < 0.4)
  if kind == "textual":
    return textual + visual, 1 + int(rng.random() < 0.35)
  head = [visual[0], textual[0]]
  tail = [a for pair in zip(visual[1:], textual[1:]) for a in pair] + visual[len(textual):]
  return head + tail, 2


def _kind(q: dict[str, str]) -> str:
  """Returns visual / textual / mixed from the attributes a query names."""
  has_v = any(a in q for a in VISUAL_ATTRS)
  has_t = any(a in q for a in TEXTUAL_ATTRS)
  return "mixed" if has_v and has_t else ("visual" if has_v else "textual")


def _sample_novel_combos(rng: np.random.Generator, frac: float) -> set[tuple[str, str]]:
  combos = [(c, col) for c in CATEGORIES for col in COLOR_NAMES]
  n = max(1, int(round(frac * len(combos)))) if frac > 0 else 0
  return {combos[i] for i in rng.choice(len(combos), size=n, replace=False)}


def _sample_sorted(rng: np.random.Generator, ids, k: int) -> np.ndarray:
  """Returns k of the product indices `ids` drawn without replacement (all of them if fewer), sorted."""
  ids = np.asarray(ids, np.int64)
  return np.sort(ids[rng.choice(len(ids), k, replace=False)] if len(ids) > k else ids)


def generate_queries(gts: list[dict[str, Any]], ids: list[str], cfg: SyntheticConfig):
  """Returns (queries, qrels, stats): query dicts in file order and (query_id, product_id, grade) rows."""
  rng = np.random.default_rng([cfg.seed, QUERY_STREAM])
  cat = _Catalog(gts)
  n_total = cfg.total_queries
  n_val = int(round(cfg.split_fractions[1] * n_total))
  n_test = int(round(cfg.split_fractions[2] * n_total))
  n_train = n_total - n_val - n_test
  if min(n_train, n_val, n_test) < 1:
    raise ValueError(f"SyntheticConfig: {n_total} queries with split_fractions={cfg.split_fractions} "
                     f"leave a split empty; raise num_queries / min_queries")
  novel_combos = _sample_novel_combos(rng, cfg.novel_combination_fraction)
  novel_pool = np.concatenate([cat.by_cat_color[k] for k in sorted(novel_combos) if k in cat.by_cat_color]
                              or [_NONE])
  common_pool = np.setdiff1d(np.arange(len(gts)), novel_pool)
  if len(common_pool) == 0:
    raise ValueError("SyntheticConfig: every product is in a held-out (category, colour) pair; lower "
                     f"novel_combination_fraction ({cfg.novel_combination_fraction}) or add products")
  n_novel = int(round(cfg.test_novel_fraction * n_test)) if len(novel_pool) else 0
  cap = cfg.relevant_cap
  kinds = ("visual", "textual", "mixed")
  kind_cum = tuple(itertools.accumulate(cfg.query_kind_fractions))

  # (split, novel, repeat): exact counts rather than coin flips, so tiny catalogues still get each kind.
  n_val_rep = int(round(cfg.eval_repeat_fraction * n_val))
  n_test_rep = int(round(cfg.eval_repeat_fraction * (n_test - n_novel)))
  slots = [("train", False, False)] * n_train
  slots += [("validation", False, True)] * n_val_rep + [("validation", False, False)] * (n_val - n_val_rep)
  slots += [("test", True, False)] * n_novel + [("test", False, True)] * n_test_rep
  slots += [("test", False, False)] * (n_test - n_novel - n_test_rep)
  queries, qrels = [], []
  seen: set[tuple] = set()
  seen_texts: set[str] = set()
  train_queries: list[tuple[dict[str, str], str]] = []
  stats = {"truncated_queries": 0, "duplicate_queries": 0, "sparse_text_queries": 0, "novel_queries": 0,
           "repeated_train_queries": 0, "queries_by_kind": {k: 0 for k in kinds}}
  train_covered = np.zeros(len(gts), bool)

  def is_heldout(q):
    return "primary_color" in q and (q["category"], q["primary_color"]) in novel_combos

  def new_query(kind, novel):
    """Returns (attributes, text) of a query built on a random product, specific enough, unseen if possible.

    Attribute sets already asked are avoided first; past that, a rewording of one is accepted (real logs
    hold "grey bag" and "gray handbag"); past that, a repeat (counted in stats["duplicate_queries"]).
    """
    pool = novel_pool if novel else common_pool
    fallback = None
    for attempt in range(60):
      g = gts[int(pool[rng.integers(len(pool))])]
      attrs, n = _choose_attrs(rng, kind, g, need_color=novel)
      q = {"category": g["category"], **{a: g[a] for a in attrs[:n]}}
      idx = cat.by_category[g["category"]]
      match = cat.mismatches(idx, q) == 0
      while np.count_nonzero(match) > cap and n < len(attrs):
        q[attrs[n]] = g[attrs[n]]
        match &= cat.codes[attrs[n]][idx] == cat.code(attrs[n], g[attrs[n]])
        n += 1
      if not novel and is_heldout(q):
        continue  # held-out (category, colour) pairs appear in novel test queries only
      text = _query_text(rng, q)
      if tuple(sorted(q.items())) not in seen or (attempt >= 8 and text not in seen_texts):
        return q, text
      fallback = fallback or (q, text)
    if fallback is None:
      raise ValueError("SyntheticConfig: cannot build a query outside the held-out (category, colour) "
                       f"pairs; lower novel_combination_fraction ({cfg.novel_combination_fraction})")
    stats["duplicate_queries"] += 1  # more queries than distinct ones this catalogue supports
    return fallback

  for qi, (split, novel, repeat) in enumerate(slots):
    train = split == "train"
    if repeat:
      # Head queries recur in real logs: re-ask a train query (same text), labelled in full here.
      q, text = train_queries[rng.integers(len(train_queries))]
      stats["repeated_train_queries"] += 1
    else:
      kind = "visual" if novel else pick_weighted(rng, kinds, kind_cum)
      q, text = new_query(kind, novel)
    seen.add(tuple(sorted(q.items())))
    seen_texts.add(text)
    if train:
      train_queries.append((q, text))
    idx = cat.by_category[q["category"]]
    mism = cat.mismatches(idx, q)
    exact = idx[mism == 0]  # holds the product the query was built on, so never empty
    if len(exact) > cap:
      stats["truncated_queries"] += 1
    e_cap = cfg.train_positives_per_query if train else cap
    e_ids = _sample_sorted(rng, exact, e_cap)
    if train:
      train_covered[e_ids] = True

    # S: same category, one attribute off; a near value when the query has only one attribute to be off.
    n_attr = len(q) - 1
    s_mask = mism == 1
    if n_attr == 1:
      (attr, value), = [(a, v) for a, v in q.items() if a != "category"]
      s_mask &= cat.near(idx, attr, value)
    s_ids = idx[s_mask]
    # C: a complementary category, in the query's colour when it has one.
    comp = np.concatenate([cat.by_category.get(c, _NONE) for c in COMPLEMENTS[q["category"]]])
    if "primary_color" in q:
      comp = comp[cat.codes["primary_color"][comp] == cat.code("primary_color", q["primary_color"])]
    # I: same category further off, plus unrelated categories in the query's colour (a red bag for
    # "red dress" is what a colour-only model would wrongly return).
    i_ids = idx[(mism >= 2) | ((mism == 1) & ~s_mask)]
    if "primary_color" in q:
      related = set(COMPLEMENTS[q["category"]]) | {q["category"]}
      others = [c for c in CATEGORIES if c not in related]
      same_color = np.concatenate([cat.by_cat_color.get((c, q["primary_color"]), _NONE) for c in others])
      i_ids = np.concatenate([i_ids, same_color])
    split_i = 0 if train else 1
    s_take = _sample_sorted(rng, s_ids, cfg.s_per_query[split_i])
    c_take = _sample_sorted(rng, comp, cfg.c_per_query[split_i])
    i_take = _sample_sorted(rng, i_ids, cfg.i_per_query[split_i])
    qid = f"q{qi + 1:0{max(5, len(str(len(slots))))}d}"
    kind = _kind(q)
    tags = [kind]
    if cat.sparse[e_ids].mean() > 0.5:
      tags.append("sparse_text")
      stats["sparse_text_queries"] += 1
    if novel:
      tags.append("novel_combination")
      stats["novel_queries"] += 1
    stats["queries_by_kind"][kind] += 1
    queries.append({"id": qid, "text": text, "split": split, "tags": tags, "_attrs": q})
    for grade, chosen in (("E", e_ids), ("S", s_take), ("C", c_take), ("I", i_take)):
      qrels.extend((qid, ids[int(p)], grade) for p in chosen)
  stats["train_label_coverage"] = float(train_covered.mean())
  stats["novel_combinations"] = sorted(f"{c}/{col}" for c, col in novel_combos)
  return queries, qrels, stats

