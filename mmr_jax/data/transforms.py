"""Per-example transforms of the grain pipelines: table rows -> numpy examples of batch_spec's layout.

Image decoding and augmentation, tokenisation, and the stage-1 / stage-2 / eval example maps. The maps
are module-level classes so grain can pickle them into worker processes; `stack` batches examples.
"""

from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import math
from typing import Any, Mapping, Sequence

import grain
import numpy as np
from PIL import Image, ImageOps

from mmr_jax import batch_spec
from mmr_jax.data import catalog
from mmr_jax.data import hard_negatives
from mmr_jax.data import pseudo_queries
from mmr_jax.data.sources import Source, row_bytes, row_text
from mmr_jax.data.tokenizer import Tokenizer

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Augment:
  """Training image augmentation (config.augment)."""
  random_crop: bool = False
  crop_scale_min: float = 0.35
  flip: bool = False

  @classmethod
  def from_config(cls, cfg: Any) -> "Augment":
    """Returns the augmentation of `config.data.augment`; raises ValueError for a bad crop scale."""
    aug = cls(random_crop=bool(cfg.random_crop), crop_scale_min=float(cfg.crop_scale_min),
              flip=bool(cfg.flip))
    if not 0.0 < aug.crop_scale_min <= 1.0:
      raise ValueError(f"config.data.augment.crop_scale_min="
                       f"{aug.crop_scale_min} must be in (0, 1]")
    return aug


def _random_box(width: int, height: int, scale_min: float,
                rng: np.random.Generator) -> tuple[int, int, int, int]:
  """Returns an Inception-style crop box (left, top, right, bottom)."""
  area = width * height
  log_ratio = (math.log(3 / 4), math.log(4 / 3))
  for _ in range(10):
    target = area * rng.uniform(scale_min, 1.0)
    ratio = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * ratio)))
    h = int(round(math.sqrt(target / ratio)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, left + w, top + h
  return 0, 0, width, height


def decode_image(data: bytes, size: int, *, augment: Augment | None = None,
                 rng: np.random.Generator | None = None,
                 ) -> tuple[np.ndarray, bool]:
  """Returns (uint8 [size, size, 3], ok); (zeros, False) if empty or corrupt.

  Without augmentation the whole image is resized to a square (what eval and
  export see). Any mode (L, P, RGBA, CMYK, 16-bit) becomes RGB as the importer
  converts it (`catalog.to_rgb`: transparency composited on white).
  """
  blank = np.zeros((size, size, 3), np.uint8)
  if not data:
    return blank, False
  augment = augment or Augment()
  crop = augment.random_crop and rng is not None
  try:
    img = Image.open(io.BytesIO(data))
    # JPEG DCT-domain downscaling: a 4000 px photo decodes at ~1/8 the cost.
    # Keep enough pixels for the smallest random crop to still fill `size`.
    need = size / math.sqrt(augment.crop_scale_min) if crop else size
    img.draft("RGB", (int(need) + 1, int(need) + 1))
    if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation (phone photos): upright, as imported
      img = ImageOps.exif_transpose(img)
    img = catalog.to_rgb(img)  # as the importer converts: transparency on white, wide greyscale scaled
    box = (0, 0, img.width, img.height)
    if crop:
      box = _random_box(img.width, img.height, augment.crop_scale_min, rng)
    img = img.resize((size, size), Image.Resampling.BILINEAR, box=box)
    out = np.asarray(img, dtype=np.uint8)
  except Exception as e:  # PIL raises many types for bad data
    _log.warning("undecodable image (%d bytes): %s", len(data), e)
    return blank, False
  if augment.flip and rng is not None and rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out), True


def product_tokens(product: Mapping[str, Any], tok: Tokenizer, product_len: int) -> np.ndarray:
  """Returns int32 [product_len]: a products row's text as the product towers read it (title | description |
  attributes; a text over product_len cut per field, Tokenizer.encode_fields)."""
  fields = catalog.product_fields(*(row_text(product, k) for k in ("title", "description", "attributes")))
  return tok.encode_fields(fields, product_len)


def _product_features(product: Mapping[str, Any], tok: Tokenizer, lens: batch_spec.Lens,
                      augment: Augment | None, rng: np.random.Generator | None,
                      with_title: bool) -> dict[str, np.ndarray]:
  """Returns tokens + image features of one products row."""
  has_image = bool(np.asarray(product["has_image"]))
  image, ok = decode_image(row_bytes(product, "image") if has_image else b"",
                           lens.image_size, augment=augment, rng=rng)
  out = {
      "product_tokens": product_tokens(product, tok, lens.product_len),  # [Lp]
      "image": image,  # [H, W, 3]
      "has_image": np.bool_(has_image and ok),
  }
  if with_title:
    out["title_tokens"] = tok.encode([row_text(product, "title")],
                                     lens.title_len)[0]  # [Lt]
  return out


class Stage1Example(grain.transforms.RandomMap):
  """Product index -> stage-1 example, None for skipped products.

  Training takes the products that are not held out; validation (`heldout=True`) the held-out ones,
  which no stage trains on, so the stage-1 validation loss is measured on unseen products.
  """

  def __init__(self, products: Source, tok: Tokenizer, lens: batch_spec.Lens,
               augment: Augment, skip_no_image: bool, heldout: bool = False,
               pseudo_queries: bool = False):
    self._products, self._tok, self._lens = products, tok, lens
    self._augment, self._skip_no_image = augment, skip_no_image
    self._heldout, self._pseudo_queries = heldout, pseudo_queries

  def random_map(self, index, rng: np.random.Generator):
    index = int(index)
    product = self._products[index]
    if bool(np.asarray(product["heldout"])) != self._heldout:
      return None
    if self._skip_no_image and not bool(np.asarray(product["has_image"])):
      return None
    out = _product_features(product, self._tok, self._lens, self._augment, rng,
                            with_title=True)
    out["product_index"] = np.int32(index)
    if self._pseudo_queries:  # text-side domain alignment: the product's own terms as its query
      text = pseudo_queries.sample(row_text(product, "title"), row_text(product, "attributes"),
                                   row_text(product, "description"), rng)
      out["query_tokens"] = self._tok.encode([text], self._lens.query_len)[0]  # [Lq]
    return out


_NONE = np.zeros((0,), np.int64)  # no labelled negatives


def _trainable_terms(product: Mapping[str, Any]) -> list[str]:
  """Returns the `pseudo_queries.candidate_terms` of a product training may use ([] if it is held out)."""
  if bool(np.asarray(product["heldout"])):
    return []
  return pseudo_queries.candidate_terms(row_text(product, "title"), row_text(product, "attributes"),
                                        row_text(product, "description"))


def _pad_positives(values: Any, k: int) -> np.ndarray:
  """Returns int32 [k]: the first k values, padded with batch_spec.PAD_INDEX."""
  values = np.asarray(values, dtype=np.int64).reshape(-1)[:k]
  out = np.full((k,), batch_spec.PAD_INDEX, np.int32)
  out[:len(values)] = values
  return out


class Stage2Example(grain.transforms.RandomMap):
  """Pair index -> stage-2 example (the product row fetched by index).

  With probability `pseudo_rate` the pair is replaced by a pseudo-query of a
  random product that is not held out (`pseudo_queries.sample`; query_index
  batch_spec.PAD_INDEX, the product its only positive).
  """

  def __init__(self, pairs: Source, products: Source, tok: Tokenizer,
               lens: batch_spec.Lens, augment: Augment, pseudo_rate: float = 0.0):
    self._pairs, self._products, self._tok = pairs, products, tok
    self._lens, self._augment = lens, augment
    self._num_products = len(products)
    self._pseudo_rate = pseudo_rate

  def trainable_product(self, rng: np.random.Generator, exclude: Sequence[int] = ()):
    """Returns (index, row, its `pseudo_queries.candidate_terms`) of a random product that is not held out, not in
    `exclude` and has text a pseudo-query can be drawn from, or None after 64 draws (rejection sampling: the
    products it skips are a small fraction of any catalogue that trains)."""
    for _ in range(64):
      index = int(rng.integers(self._num_products))
      if index in exclude:
        continue
      product = self._products[index]
      terms = _trainable_terms(product)
      if terms:
        return index, product, terms
    return None

  def _pseudo_pair(self, rng: np.random.Generator):
    picked = self.trainable_product(rng)
    if picked is None:
      return None
    index, product, terms = picked
    return index, product, pseudo_queries.sample_terms(terms, rng)

  def pseudo_example(self, product_index: int, product: Mapping[str, Any], text: str,
                     rng: np.random.Generator, positives: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Returns the example pairing pseudo-query `text` with `product` (its positives: it, then `positives`)."""
    out = _product_features(product, self._tok, self._lens, self._augment, rng, with_title=True)
    out.update(query_tokens=self._tok.encode([text], self._lens.query_len)[0],
               product_index=np.int32(product_index), query_index=np.int32(batch_spec.PAD_INDEX),
               grade=np.float32(1.0),
               positives=_pad_positives([product_index, *positives], self._lens.positives_k))
    return out

  def random_map(self, index, rng: np.random.Generator):
    return self.example(index, rng)[0]

  def example(self, index, rng: np.random.Generator):
    """Returns (example, its query text or None for a labelled pair, its product row, the labelled pair's
    I-labelled products: int64 [n], empty for a pseudo-query or a pairs table imported without them)."""
    if self._pseudo_rate and rng.random() < self._pseudo_rate:
      pseudo = self._pseudo_pair(rng)
      if pseudo is not None:
        product_index, product, text = pseudo
        return self.pseudo_example(product_index, product, text, rng), text, product, _NONE
    pair = self._pairs[int(index)]
    product_index = int(np.asarray(pair["product_index"]))
    if not 0 <= product_index < self._num_products:
      raise IndexError(f"pairs row {int(index)}: product_index={product_index}"
                       f" outside [0, {self._num_products})")
    product = self._products[product_index]
    out = _product_features(product, self._tok, self._lens, self._augment, rng,
                            with_title=True)
    out.update(
        query_tokens=self._tok.encode([row_text(pair, "query_text")],
                                      self._lens.query_len)[0],  # [Lq]
        product_index=np.int32(product_index),
        query_index=np.int32(np.asarray(pair["query_index"])),
        grade=np.float32(np.asarray(pair["grade"])),
        positives=_pad_positives(pair["positives"],
                                 self._lens.positives_k),  # [K]
    )
    negatives = np.asarray(pair["negatives"], np.int64).reshape(-1) if "negatives" in pair else _NONE
    return out, None, product, negatives


class HardNegativeGroup(grain.transforms.RandomMap):
  """Stream index -> a group of 1 + n stage-2 examples stacked [1 + n, ...] (`hard_negatives.py`).

  The first is `Stage2Example`'s; the others are pseudo-queries of n products: with `labelled_negatives`, a
  labelled pair's I-labelled products first (its query's judged-irrelevant products), then products drawn
  from its product's pool (`neighbours` [num_products, pool], pad -1: BM25's or a model's nearest; random
  products that are not held out fill a short pool). Only products with text a pseudo-query can be drawn
  from join. A pseudo-query's positives are every product of the group that holds all its words; a labelled
  pair keeps its labelled positives (an I label outranks shared words).
  """

  def __init__(self, stream: Stage2Example, products: Source, neighbours: np.ndarray, n: int,
               labelled_negatives: bool = False):
    self._stream, self._products, self._neighbours, self._n = stream, products, neighbours, n
    self._labelled_negatives = labelled_negatives

  def _companion(self, index: int, chosen: Sequence[int]):
    """Returns (row, pseudo-query terms) of product `index` if it may join the group (not in it yet, not held
    out, with terms), else None."""
    if index in chosen:
      return None
    row = self._products[index]
    terms = _trainable_terms(row)
    return (row, terms) if terms else None

  def random_map(self, index, rng: np.random.Generator):
    first, first_text, first_product, labelled = self._stream.example(index, rng)
    anchor = int(first["product_index"])
    pool = self._neighbours[anchor]
    orders = [rng.permutation(labelled)] if self._labelled_negatives and len(labelled) else []
    orders.append(rng.permutation(pool[pool >= 0]))
    chosen, rows, terms = [anchor], [first_product], [None]
    for i in itertools.chain.from_iterable(orders):
      if len(chosen) > self._n:
        break
      joined = self._companion(int(i), chosen)
      if joined is not None:
        chosen.append(int(i))
        rows.append(joined[0])
        terms.append(joined[1])
    while len(chosen) <= self._n:  # a short pool: random trainable products
      picked = self._stream.trainable_product(rng, exclude=chosen)
      if picked is None:
        raise ValueError(f"config.data.hard_negatives={self._n}: too few products with text that are not held "
                         "out to fill a group")
      chosen.append(picked[0])
      rows.append(picked[1])
      terms.append(picked[2])
    texts = [first_text] + [pseudo_queries.sample_terms(t, rng) for t in terms[1:]]
    product_words = [hard_negatives.words(row_text(r, "text")) for r in rows]
    examples = [first]
    if first_text is not None:  # a labelled pair keeps its labelled positives
      also = [chosen[k] for k in hard_negatives.positives(first_text, product_words) if k != 0]
      first["positives"] = _pad_positives([anchor, *also], len(first["positives"]))
    for j in range(1, len(chosen)):
      also = [chosen[k] for k in hard_negatives.positives(texts[j], product_words) if k != j]
      examples.append(self._stream.pseudo_example(chosen[j], rows[j], texts[j], rng, also))
    return stack(examples)


class _EvalRows(grain.transforms.Map):
  """Local position -> example of row `start + position`, or a masked padding row from `stop` on."""
  STAGE = ""  # batch_spec stage of the rows

  def __init__(self, source: Source, tok: Tokenizer, lens: batch_spec.Lens,
               start: int, stop: int):
    self._source, self._tok, self._lens = source, tok, lens
    self._start, self._stop = start, stop
    self._pad = batch_spec.pad_example(batch_spec.example_spec(self.STAGE, lens))

  def map(self, position):
    index = self._start + int(position)
    if index >= self._stop:
      return dict(self._pad)
    return self.example(index)

  def example(self, index: int) -> dict[str, np.ndarray]:
    raise NotImplementedError


class EvalProduct(_EvalRows):
  """Local position -> eval products example (or a masked pad row)."""
  STAGE = "eval_products"

  def example(self, index):
    out = _product_features(self._source[index], self._tok, self._lens,
                            augment=None, rng=None, with_title=False)
    out.update(product_index=np.int32(index), mask=np.bool_(True))
    return out


class EvalQuery(_EvalRows):
  """Local position -> eval queries example (or a masked pad row)."""
  STAGE = "eval_queries"

  def example(self, index):
    tokens = self._tok.encode([row_text(self._source[index], "text")],
                              self._lens.query_len)[0]
    return {"query_tokens": tokens, "query_index": np.int32(index),
            "mask": np.bool_(True)}


def stack(examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Returns the examples stacked on a new leading batch axis."""
  return {k: np.stack([ex[k] for ex in examples]) for k in examples[0]}


def concat(groups: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Returns stacked groups of examples ([G, ...] each) as one batch: their rows in order ([sum G, ...])."""
  return {k: np.concatenate([g[k] for g in groups]) for k in groups[0]}

