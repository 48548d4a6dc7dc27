"""Deterministic synthetic e-commerce catalogue, written in the folder format real users bring.

`generate_folder(out_dir, SyntheticConfig(...))` writes

```
out_dir/
  products.jsonl      {"id", "title", "description", "attributes": {key: value}, "image", "language"}
  queries.jsonl       {"id", "text", "split": train|validation|test, "tags": [...]}
  qrels.tsv           query_id <TAB> product_id <TAB> E|S|C|I        (no header)
  images/<id>.png     RGB, image_size x image_size
  ground_truth.jsonl  latent attributes of every product (synthetic only; see below)
```
which `mmr_jax.data.import_catalog.import_catalog` turns into a DATA_DIR (`make_synthetic` does both).

# What the catalogue encodes (the ground truth)

Every product has latent attributes, recorded in `ground_truth.jsonl`:

| field | values | where it shows |
|---|---|---|
| category | dress, t-shirt, jacket, trousers, shorts, skirt, shoe, bag, hat, scarf | silhouette; text (always) |
| primary_color | 11 named colours of `COLORS` (distinct RGB) | the body's colour; text unless sparse |
| secondary_color | another colour, never a near-neighbour of the primary | pattern and small details |
| pattern | solid, striped, dotted, checked, floral | drawn on the body in the secondary colour |
| style | 3 per category (e.g. dress: sleeveless / short sleeve / long sleeve) | silhouette detail; text unless sparse |
| material, care, size | e.g. cotton / machine washable / M | text only (attributes and/or description) |
| gender, brand | | text only; never queried |
| sparse_title | bool | text names category but no colour, pattern or style |
| noisy | bool | text names a colour (`text_color`) the image does not have |
| language | en, or one of `second_languages` | title, description and attributes written in it |

Images are rendered with numpy + PIL from the visible attributes with nuisance variation a model must
learn to ignore: background tone and texture, drop shadow, scale, position, rotation, mirror, lighting
level and gradient, partial occlusion by another object, pixel noise.

Queries are English and of three kinds (tag = kind): `visual` (colour / pattern / style + category,
"red striped dress"), `textual` (material / care / size + category, "machine washable cotton
t-shirt") and `mixed` ("red linen dress"). Extra tags: `sparse_text` when most of a query's labelled
E products have sparse titles (text cannot find them; the image can), `novel_combination` for test
queries whose (category, colour) pair no train or validation query uses.

Grades come from the latent attributes, never from the (possibly wrong) text:
E = every query attribute matches; S = same category with one attribute off (for one-attribute
queries only a near value: red~pink, striped~checked, cotton~linen, ...); C = a complementary category
("shoe" for a dress query) in the query's colour if it names one; I = hard negatives (same category,
further off; or another category in the same colour). Every query has at least one E product.
Train queries label only a few E products each (`train_positives_per_query`), like click logs, so
train labels cover only a fraction of the catalogue; validation/test queries label all their E
products (queries are refined with more attributes until they match at most `relevant_cap` products,
0.5% of the catalogue within [50, 500], so the query mix is the same from 10k to 100k products).

The story this supports: a good share of products (`sparsity_rate`) have sparse titles, so stage 1
(title <-> image) can learn what colours and patterns look like only from the products whose titles
name them, and stage 2 (query -> product) can then find the sparse-titled products through their images.

# Knobs (all in `SyntheticConfig`, with defaults)

| knob | default | effect |
|---|---|---|
| num_products | 1000 | catalogue size (`PRESETS`: tiny 300, small 2k, medium 20k, large 100k, xlarge 500k) |
| num_queries / queries_per_product | None / 0.08 | queries over all splits (at least min_queries=40) |
| split_fractions | (0.7, 0.1, 0.2) | train / validation / test queries |
| query_kind_fractions | (0.5, 0.25, 0.25) | visual / textual / mixed queries (before refinement) |
| image_size | 64 | rendered PNG side |
| sparsity_rate | 0.4 | products whose text omits colour, pattern and style |
| noise_rate | 0.05 | non-sparse products whose text names a wrong colour |
| second_language_rate, second_languages | 0.1, (de, es) | products written in another language |
| empty_description_rate | 0.3 | products with an empty description |
| occlusion_rate, noise_sigma_max | 0.25, 6 | image nuisances |
| novel_combination_fraction, test_novel_fraction | 0.1, 0.25 | held-out (category, colour) pairs; test share |
| eval_repeat_fraction | 0.3 | validation/test queries that repeat a train query's text |
| train_positives_per_query | 5 | E labels per train query (scarcity) |
| max_relevant_per_query | None | most E products per query (None: 0.5% of products in [50, 500]) |
| seed | 0 | everything derives from it |

Determinism: the files are a function of the config alone (byte-identical for the same numpy, Pillow
and zlib); product i depends only on (seed, i), so a larger catalogue extends a smaller one.
Speed: ~0.55 ms of main-thread CPU per 64 px product (PNG encoding and file writes overlap in a
writer thread), i.e. >1000 products/s on an idle 2-core machine; query generation for 100k products
takes ~10 s.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import dataclasses
import itertools
import json
import os
import re
import struct
import time
import zlib
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# ---------------------------------------------------------------------------------------------------
# Vocabulary. Canonical values are English; `WORDS[lang]` renders them in text.

CATEGORIES = ("dress", "t-shirt", "jacket", "trousers", "shorts", "skirt", "shoe", "bag", "hat", "scarf")

STYLES = {
    "dress": ("sleeveless", "short sleeve", "long sleeve"),
    "t-shirt": ("crew neck", "v-neck", "pocket"),
    "jacket": ("zip-up", "buttoned", "hooded"),
    "trousers": ("straight leg", "wide leg", "belted"),
    "shorts": ("cargo", "drawstring", "cuffed"),
    "skirt": ("mini", "midi", "pleated"),
    "shoe": ("sneaker", "heeled", "ankle boot"),
    "bag": ("tote", "crossbody", "clutch"),
    "hat": ("cap", "beanie", "sun hat"),
    "scarf": ("fringed", "square", "infinity"),
}

# RGB chosen pairwise >= ~90 apart so that "is this pixel red?" has one answer under lighting changes.
COLORS = {
    "red": (210, 30, 40),
    "orange": (245, 135, 20),
    "yellow": (245, 215, 40),
    "green": (40, 150, 60),
    "blue": (35, 75, 200),
    "purple": (125, 50, 165),
    "pink": (245, 140, 190),
    "brown": (115, 70, 35),
    "black": (25, 25, 25),
    "white": (245, 245, 245),
    "grey": (130, 130, 135),
}
COLOR_NAMES = tuple(COLORS)
COLOR_NEIGHBOURS = {
    "red": ("orange", "pink"), "orange": ("red", "yellow", "brown"), "yellow": ("orange",),
    "green": ("yellow",), "blue": ("purple",), "purple": ("blue", "pink"), "pink": ("red", "purple"),
    "brown": ("orange", "black"), "black": ("grey", "brown"), "white": ("grey",),
    "grey": ("white", "black"),
}

PATTERNS = ("solid", "striped", "dotted", "checked", "floral")
PATTERN_PROBS = (0.36, 0.16, 0.16, 0.16, 0.16)
PATTERN_NEIGHBOURS = {"solid": (), "striped": ("checked",), "checked": ("striped",),
                      "dotted": ("floral",), "floral": ("dotted",)}

MATERIALS = {
    "dress": ("cotton", "linen", "silk", "viscose", "polyester"),
    "t-shirt": ("cotton", "linen", "polyester", "viscose"),
    "jacket": ("denim", "leather", "wool", "polyester", "cotton"),
    "trousers": ("cotton", "denim", "linen", "wool", "polyester"),
    "shorts": ("cotton", "denim", "linen", "polyester"),
    "skirt": ("cotton", "denim", "silk", "wool", "viscose"),
    "shoe": ("leather", "suede", "canvas", "synthetic"),
    "bag": ("leather", "canvas", "nylon", "suede"),
    "hat": ("wool", "cotton", "straw", "polyester"),
    "scarf": ("wool", "cashmere", "silk", "cotton", "polyester"),
}
MATERIAL_NEIGHBOURS = {
    "cotton": ("linen",), "linen": ("cotton",), "silk": ("viscose",), "viscose": ("silk", "polyester"),
    "polyester": ("viscose", "nylon"), "denim": ("cotton",), "leather": ("suede",), "suede": ("leather",),
    "wool": ("cashmere",), "cashmere": ("wool",), "canvas": ("nylon",), "nylon": ("canvas", "polyester"),
    "synthetic": ("polyester",), "straw": (),
}
CARES = ("machine washable", "hand wash only", "dry clean only", "wipe clean")
# Care follows material the way real labels do; the rest of the mass keeps it from being implied.
CARE_PROBS = {
    "cotton": (0.8, 0.2, 0, 0), "linen": (0.6, 0.2, 0.2, 0), "polyester": (0.9, 0.1, 0, 0),
    "silk": (0, 0.4, 0.6, 0), "denim": (1, 0, 0, 0), "wool": (0, 0.6, 0.4, 0),
    "cashmere": (0, 0.5, 0.5, 0), "viscose": (0.4, 0.6, 0, 0), "leather": (0, 0, 0.3, 0.7),
    "suede": (0, 0, 0.3, 0.7), "canvas": (0.5, 0, 0, 0.5), "nylon": (0.4, 0, 0, 0.6),
    "synthetic": (0, 0, 0, 1), "straw": (0, 0, 0, 1),
}
CLOTHING_SIZES = ("XS", "S", "M", "L", "XL")
SIZES = {
    **{c: CLOTHING_SIZES for c in ("dress", "t-shirt", "jacket", "trousers", "shorts", "skirt")},
    "shoe": tuple(str(s) for s in range(36, 46)),
    "hat": ("S", "M", "L"),
    "bag": ("one size",),
    "scarf": ("one size",),
}
GENDERS = ("women", "men", "unisex")
SEASONS = ("summer", "winter", "spring", "autumn")
BRANDS = ("Norvik", "Alba & Co", "Urbanline", "Maison Lune", "Kestrel", "Tidewell", "Fjordhaus",
          "Casa Sol", "Northmark", "Lumen", "Brightfield", "Oakridge Supply", "Vela", "Juniper Lane")

COMPLEMENTS = {
    "dress": ("shoe", "bag", "hat"), "t-shirt": ("trousers", "shorts", "skirt"),
    "jacket": ("trousers", "scarf", "hat"), "trousers": ("t-shirt", "jacket", "shoe"),
    "shorts": ("t-shirt", "shoe", "hat"), "skirt": ("t-shirt", "shoe", "bag"),
    "shoe": ("dress", "trousers", "bag"), "bag": ("dress", "shoe", "scarf"),
    "hat": ("scarf", "jacket", "dress"), "scarf": ("jacket", "hat", "bag"),
}

# Query phrases where "<style> <category>" is not what people type.
STYLE_PHRASES = {
    ("shoe", "sneaker"): ("sneakers",), ("shoe", "heeled"): ("heels", "heeled shoes"),
    ("shoe", "ankle boot"): ("ankle boots",), ("bag", "tote"): ("tote bag", "tote"),
    ("bag", "crossbody"): ("crossbody bag",), ("bag", "clutch"): ("clutch", "clutch bag"),
    ("hat", "cap"): ("cap", "baseball cap"), ("hat", "beanie"): ("beanie",), ("hat", "sun hat"): ("sun hat",),
    ("t-shirt", "pocket"): ("pocket t-shirt", "t-shirt with pocket"),
    ("trousers", "belted"): ("belted trousers", "trousers with belt"),
}
QUERY_CATEGORY = {
    "dress": ("dress",), "t-shirt": ("t-shirt", "tee", "t shirt"), "jacket": ("jacket",),
    "trousers": ("trousers", "pants"), "shorts": ("shorts",), "skirt": ("skirt",),
    "shoe": ("shoes",), "bag": ("bag", "handbag"), "hat": ("hat",), "scarf": ("scarf",),
}
QUERY_COLOR = {c: (c,) for c in COLORS} | {"grey": ("grey", "gray")}
QUERY_PATTERN = {"solid": ("plain", "solid"), "striped": ("striped", "stripe"),
                 "dotted": ("polka dot", "dotted"), "checked": ("checked", "plaid", "check"),
                 "floral": ("floral", "flower print")}

# Text vocabulary per language. en is also the canonical key space.
WORDS: dict[str, dict[str, dict[str, str]]] = {
    "en": {
        "category": {"dress": "Dress", "t-shirt": "T-Shirt", "jacket": "Jacket", "trousers": "Trousers",
                     "shorts": "Shorts", "skirt": "Skirt", "shoe": "Shoes", "bag": "Bag", "hat": "Hat",
                     "scarf": "Scarf"},
        "color": {"red": "Red", "orange": "Orange", "yellow": "Yellow", "green": "Green", "blue": "Blue",
                  "purple": "Purple", "pink": "Pink", "brown": "Brown", "black": "Black", "white": "White",
                  "grey": "Grey"},
        "pattern": {"solid": "Plain", "striped": "Striped", "dotted": "Polka Dot", "checked": "Checked",
                    "floral": "Floral"},
        "style": {"sleeveless": "Sleeveless", "short sleeve": "Short Sleeve", "long sleeve": "Long Sleeve",
                  "crew neck": "Crew Neck", "v-neck": "V-Neck", "pocket": "Pocket", "zip-up": "Zip-Up",
                  "buttoned": "Buttoned", "hooded": "Hooded", "straight leg": "Straight Leg",
                  "wide leg": "Wide Leg", "belted": "Belted", "cargo": "Cargo", "drawstring": "Drawstring",
                  "cuffed": "Cuffed", "mini": "Mini", "midi": "Midi", "pleated": "Pleated",
                  "sneaker": "Sneaker", "heeled": "Heeled", "ankle boot": "Ankle Boot", "tote": "Tote",
                  "crossbody": "Crossbody", "clutch": "Clutch", "cap": "Cap", "beanie": "Beanie",
                  "sun hat": "Sun Hat", "fringed": "Fringed", "square": "Square", "infinity": "Infinity"},
        "material": {"cotton": "cotton", "linen": "linen", "silk": "silk", "viscose": "viscose",
                     "polyester": "polyester", "denim": "denim", "leather": "leather", "wool": "wool",
                     "suede": "suede", "canvas": "canvas", "synthetic": "synthetic", "nylon": "nylon",
                     "straw": "straw", "cashmere": "cashmere"},
        "care": {"machine washable": "machine washable", "hand wash only": "hand wash only",
                 "dry clean only": "dry clean only", "wipe clean": "wipe clean"},
        "size": {"one size": "one size"},
        "gender": {"women": "Women", "men": "Men", "unisex": "Unisex"},
        "gender_possessive": {"women": "Women's", "men": "Men's", "unisex": "Unisex"},
        "season": {"summer": "Summer", "winter": "Winter", "spring": "Spring", "autumn": "Autumn"},
        "key": {"brand": "brand", "material": "material", "care": "care", "size": "size", "color": "color",
                "pattern": "pattern", "gender": "gender", "fit": "fit"},
    },
    "de": {
        "category": {"dress": "Kleid", "t-shirt": "T-Shirt", "jacket": "Jacke", "trousers": "Hose",
                     "shorts": "Shorts", "skirt": "Rock", "shoe": "Schuhe", "bag": "Tasche", "hat": "Hut",
                     "scarf": "Schal"},
        "color": {"red": "Rot", "orange": "Orange", "yellow": "Gelb", "green": "Grün", "blue": "Blau",
                  "purple": "Lila", "pink": "Rosa", "brown": "Braun", "black": "Schwarz", "white": "Weiß",
                  "grey": "Grau"},
        "pattern": {"solid": "Uni", "striped": "Gestreift", "dotted": "Gepunktet", "checked": "Kariert",
                    "floral": "Geblümt"},
        "style": {"sleeveless": "Ärmellos", "short sleeve": "Kurzarm", "long sleeve": "Langarm",
                  "crew neck": "Rundhals", "v-neck": "V-Ausschnitt", "pocket": "mit Brusttasche",
                  "zip-up": "mit Reißverschluss", "buttoned": "mit Knöpfen", "hooded": "mit Kapuze",
                  "straight leg": "Gerades Bein", "wide leg": "Weites Bein", "belted": "mit Gürtel",
                  "cargo": "Cargo", "drawstring": "mit Kordelzug", "cuffed": "mit Umschlag", "mini": "Mini",
                  "midi": "Midi", "pleated": "Plissee", "sneaker": "Sneaker", "heeled": "mit Absatz",
                  "ankle boot": "Stiefelette", "tote": "Shopper", "crossbody": "Umhänge",
                  "clutch": "Clutch", "cap": "Cap", "beanie": "Strickmütze", "sun hat": "Sonnenhut",
                  "fringed": "mit Fransen", "square": "Quadratisch", "infinity": "Loop"},
        "material": {"cotton": "Baumwolle", "linen": "Leinen", "silk": "Seide", "viscose": "Viskose",
                     "polyester": "Polyester", "denim": "Denim", "leather": "Leder", "wool": "Wolle",
                     "suede": "Wildleder", "canvas": "Canvas", "synthetic": "Synthetik", "nylon": "Nylon",
                     "straw": "Stroh", "cashmere": "Kaschmir"},
        "care": {"machine washable": "maschinenwaschbar", "hand wash only": "nur Handwäsche",
                 "dry clean only": "nur chemische Reinigung", "wipe clean": "feucht abwischen"},
        "size": {"one size": "Einheitsgröße"},
        "gender": {"women": "Damen", "men": "Herren", "unisex": "Unisex"},
        "gender_possessive": {"women": "Damen", "men": "Herren", "unisex": "Unisex"},
        "season": {"summer": "Sommer", "winter": "Winter", "spring": "Frühling", "autumn": "Herbst"},
        "key": {"brand": "Marke", "material": "Material", "care": "Pflege", "size": "Größe", "color": "Farbe",
                "pattern": "Muster", "gender": "Abteilung", "fit": "Passform"},
    },
    "es": {
        "category": {"dress": "Vestido", "t-shirt": "Camiseta", "jacket": "Chaqueta", "trousers": "Pantalones",
                     "shorts": "Pantalones cortos", "skirt": "Falda", "shoe": "Zapatos", "bag": "Bolso",
                     "hat": "Sombrero", "scarf": "Bufanda"},
        "color": {"red": "rojo", "orange": "naranja", "yellow": "amarillo", "green": "verde", "blue": "azul",
                  "purple": "morado", "pink": "rosa", "brown": "marrón", "black": "negro", "white": "blanco",
                  "grey": "gris"},
        "pattern": {"solid": "liso", "striped": "de rayas", "dotted": "de lunares", "checked": "de cuadros",
                    "floral": "de flores"},
        "style": {"sleeveless": "sin mangas", "short sleeve": "manga corta", "long sleeve": "manga larga",
                  "crew neck": "cuello redondo", "v-neck": "cuello de pico", "pocket": "con bolsillo",
                  "zip-up": "con cremallera", "buttoned": "con botones", "hooded": "con capucha",
                  "straight leg": "pierna recta", "wide leg": "pierna ancha", "belted": "con cinturón",
                  "cargo": "cargo", "drawstring": "con cordón", "cuffed": "con dobladillo", "mini": "mini",
                  "midi": "midi", "pleated": "plisada", "sneaker": "deportivas", "heeled": "de tacón",
                  "ankle boot": "botines", "tote": "shopper", "crossbody": "bandolera", "clutch": "de mano",
                  "cap": "gorra", "beanie": "gorro de punto", "sun hat": "pamela", "fringed": "con flecos",
                  "square": "cuadrado", "infinity": "infinito"},
        "material": {"cotton": "algodón", "linen": "lino", "silk": "seda", "viscose": "viscosa",
                     "polyester": "poliéster", "denim": "vaquero", "leather": "piel", "wool": "lana",
                     "suede": "ante", "canvas": "lona", "synthetic": "sintético", "nylon": "nailon",
                     "straw": "paja", "cashmere": "cachemira"},
        "care": {"machine washable": "lavable a máquina", "hand wash only": "solo lavado a mano",
                 "dry clean only": "solo limpieza en seco", "wipe clean": "limpiar con paño húmedo"},
        "size": {"one size": "talla única"},
        "gender": {"women": "mujer", "men": "hombre", "unisex": "unisex"},
        "gender_possessive": {"women": "mujer", "men": "hombre", "unisex": "unisex"},
        "season": {"summer": "verano", "winter": "invierno", "spring": "primavera", "autumn": "otoño"},
        "key": {"brand": "marca", "material": "material", "care": "cuidado", "size": "talla", "color": "color",
                "pattern": "estampado", "gender": "sección", "fit": "corte"},
    },
}

# Sentences that carry no attribute: what fills real descriptions. No colour words in any language.
FILLER = {
    "en": ("A wardrobe essential.", "Designed for everyday comfort.", "Our bestseller, back in stock.",
           "Easy to combine with your favourite pieces.", "Made to last.", "Relaxed fit.",
           "Perfect for the weekend."),
    "de": ("Ein Basic für jeden Tag.", "Bequem und vielseitig kombinierbar.", "Unser Bestseller.",
           "Lässige Passform.", "Ideal für das Wochenende."),
    "es": ("Un básico imprescindible.", "Cómodo para el día a día.", "Nuestro más vendido.",
           "Corte relajado.", "Perfecto para el fin de semana."),
}
SENTENCES = {
    "en": {"material": "Made from {material}.", "care": "Care: {care}.", "size": "Size {size}.",
           "season": "Perfect for {season}."},
    "de": {"material": "Material: {material}.", "care": "Pflegehinweis: {care}.", "size": "Größe {size}.",
           "season": "Ideal für den {season}."},
    "es": {"material": "Fabricado en {material}.", "care": "Cuidado: {care}.", "size": "Talla {size}.",
           "season": "Ideal para {season}."},
}


def words_for(lang: str, kind: str, value: str) -> str:
  """Returns `value` (canonical English) as written in `lang`'s text, e.g. ("de", "color", "red") -> "Rot"."""
  table = WORDS[lang].get(kind, {})
  return table.get(value, value)


def color_words() -> dict[str, set[str]]:
  """Returns, per canonical colour, every lowercase word that names it in any language of `WORDS`."""
  out = {c: set() for c in COLORS}
  for lang in WORDS:
    for c, w in WORDS[lang]["color"].items():
      out[c].add(w.lower())
  out["grey"].add("gray")
  return out


# ---------------------------------------------------------------------------------------------------
# Configuration.

@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  """Every knob of the generator. All randomness derives from `seed`.

  Attributes:
    num_products: catalogue size.
    num_queries: total queries over all splits; None -> max(min_queries, queries_per_product * num_products).
    queries_per_product: query count scale when num_queries is None. Small on purpose: labelled pairs are
      scarce relative to products, as in real logs.
    min_queries: floor so tiny catalogues still have every split populated.
    split_fractions: (train, validation, test) shares of queries.
    query_kind_fractions: (visual, textual, mixed) shares of queries.
    image_size: rendered side in pixels (square PNG).
    sparsity_rate: share of products whose text names the category but no colour, pattern or style.
    noise_rate: share of non-sparse products whose text names a wrong colour.
    second_language_rate: share of products written in one of `second_languages`.
    second_languages: languages (keys of `WORDS`) for those products.
    empty_description_rate: share of products with an empty description (their material, care and size
      are then in the attributes dict).
    style_in_title_rate: chance a non-sparse title names the style (real titles drop words).
    occlusion_rate: share of images with another object partly over the product.
    noise_sigma_max: per-image pixel noise std is uniform in [0, noise_sigma_max] (0-255 scale).
    novel_combination_fraction: share of (category, colour) pairs that no train/validation query uses.
    test_novel_fraction: share of test queries built on such a pair (tag `novel_combination`).
    eval_repeat_fraction: share of the other validation/test queries that repeat a train query's text
      (head queries recur in real logs); the importer's test_novel_query split is the test queries
      whose text no train query has, so this keeps it a proper subset of test.
    train_positives_per_query: at most this many E labels per train query (click-log-like scarcity).
    max_relevant_per_query: queries are made specific (more attributes) until they match at most this
      many products; validation/test queries label all of them. None -> 0.5% of the catalogue, clipped
      to [50, 500] (see `relevant_cap`).
    s_per_query, c_per_query, i_per_query: (train, eval) caps on S / C / I labels per query.
    seed: everything derives from it.
  """
  num_products: int = 1000
  num_queries: int | None = None
  queries_per_product: float = 0.08
  min_queries: int = 40
  split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2)
  query_kind_fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)
  image_size: int = 64
  sparsity_rate: float = 0.4
  noise_rate: float = 0.05
  second_language_rate: float = 0.1
  second_languages: tuple[str, ...] = ("de", "es")
  empty_description_rate: float = 0.3
  style_in_title_rate: float = 0.7
  occlusion_rate: float = 0.25
  noise_sigma_max: float = 6.0
  novel_combination_fraction: float = 0.1
  test_novel_fraction: float = 0.25
  eval_repeat_fraction: float = 0.3
  train_positives_per_query: int = 5
  max_relevant_per_query: int | None = None
  s_per_query: tuple[int, int] = (3, 10)
  c_per_query: tuple[int, int] = (2, 5)
  i_per_query: tuple[int, int] = (3, 5)
  seed: int = 0

  def __post_init__(self):
    def check(ok, field, msg):
      if not ok:
        raise ValueError(f"SyntheticConfig.{field}: {msg} (got {getattr(self, field)!r})")
    check(self.num_products >= 1, "num_products", "must be >= 1")
    check(self.num_queries is None or self.num_queries >= 3, "num_queries", "must be >= 3 (one per split)")
    check(self.image_size >= 16, "image_size", "must be >= 16")
    for f in ("sparsity_rate", "noise_rate", "second_language_rate", "empty_description_rate",
              "style_in_title_rate", "occlusion_rate", "novel_combination_fraction", "test_novel_fraction",
              "eval_repeat_fraction"):
      check(0.0 <= getattr(self, f) <= 1.0, f, "must be in [0, 1]")
    for f in ("split_fractions", "query_kind_fractions"):
      v = getattr(self, f)
      check(len(v) == 3 and min(v) >= 0 and abs(sum(v) - 1) < 1e-6, f, "must be 3 shares summing to 1")
    check(all(l in WORDS and l != "en" for l in self.second_languages) and self.second_languages,
          "second_languages", f"must be a non-empty subset of {[l for l in WORDS if l != 'en']}")
    check(self.train_positives_per_query >= 1, "train_positives_per_query", "must be >= 1")
    check(self.max_relevant_per_query is None or self.max_relevant_per_query >= 1, "max_relevant_per_query",
          "must be >= 1 or None")
    check(self.min_queries >= 3, "min_queries", "must be >= 3 (one per split)")
    for f in ("s_per_query", "c_per_query", "i_per_query"):
      check(len(getattr(self, f)) == 2 and min(getattr(self, f)) >= 0, f, "must be (train, eval) counts >= 0")

  @property
  def relevant_cap(self) -> int:
    """Returns the most products a query may match (see max_relevant_per_query)."""
    if self.max_relevant_per_query is not None:
      return self.max_relevant_per_query
    return int(min(500, max(50, round(0.005 * self.num_products))))

  @property
  def total_queries(self) -> int:
    """Returns the number of queries over all splits."""
    if self.num_queries is not None:
      return self.num_queries
    return max(self.min_queries, int(round(self.queries_per_product * self.num_products)))


# Sizes from unit tests to a catalogue that stresses the input pipeline.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(num_products=300, image_size=32, min_queries=40),      # unit tests (seconds)
    "small": dict(num_products=2_000),                                    # smoke runs (seconds)
    # The README's main job: enough labelled queries that every ablation row is measured on ~300
    # test queries, still far fewer labelled pairs than products.
    "demo": dict(num_products=3_000, num_queries=1_200),
    "medium": dict(num_products=20_000),                                  # CPU experiments (~20 s)
    "large": dict(num_products=100_000),                                  # GPU experiments (~2 min)
    "xlarge": dict(num_products=500_000, image_size=96),                  # pipeline scale tests
}


def preset(name: str, **overrides) -> SyntheticConfig:
  """Returns the named preset's SyntheticConfig with `overrides` applied."""
  if name not in PRESETS:
    raise KeyError(f"unknown synthetic preset {name!r}; known: {sorted(PRESETS)}")
  return SyntheticConfig(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------------------------------------------
# Latent attributes.

_PRODUCT_STREAM, _QUERY_STREAM = 1, 2


def _pick(rng: np.random.Generator, options):
  return options[int(rng.random() * len(options))]


def _pick_weighted(rng: np.random.Generator, options, cum_probs):
  return options[min(bisect.bisect_right(cum_probs, rng.random() * cum_probs[-1]), len(options) - 1)]


_PATTERN_CUM = tuple(itertools.accumulate(PATTERN_PROBS))
_CARE_CUM = {m: tuple(itertools.accumulate(p)) for m, p in CARE_PROBS.items()}
_SECONDARY_OPTIONS = {c: tuple(o for o in COLOR_NAMES if o != c and o not in COLOR_NEIGHBOURS[c]) for c in COLORS}


def sample_latents(rng: np.random.Generator, cfg: SyntheticConfig) -> dict[str, Any]:
  """Returns one product's latent attributes (the ground-truth record, without id)."""
  cat = _pick(rng, CATEGORIES)
  primary = _pick(rng, COLOR_NAMES)
  # The secondary colour must be tellable from the primary, or patterns would be invisible.
  secondary = _pick(rng, _SECONDARY_OPTIONS[primary])
  pattern = _pick_weighted(rng, PATTERNS, _PATTERN_CUM)
  style = _pick(rng, STYLES[cat])
  material = _pick(rng, MATERIALS[cat])
  care = _pick_weighted(rng, CARES, _CARE_CUM[material])
  size = _pick(rng, SIZES[cat])
  gender = "women" if cat in ("dress", "skirt") else _pick(rng, GENDERS)
  sparse = rng.random() < cfg.sparsity_rate
  noisy = (not sparse) and rng.random() < cfg.noise_rate
  if noisy:
    text_color = _pick(rng, [c for c in COLOR_NAMES if c not in (primary, secondary)])
  else:
    text_color = None if sparse else primary
  language = "en"
  if rng.random() < cfg.second_language_rate:
    language = _pick(rng, cfg.second_languages)
  return {
      "category": cat, "primary_color": primary, "secondary_color": secondary, "pattern": pattern,
      "style": style, "material": material, "care": care, "size": size, "gender": gender,
      "brand": _pick(rng, BRANDS), "sparse_title": bool(sparse), "noisy": bool(noisy),
      "text_color": text_color, "language": language,
  }


# ---------------------------------------------------------------------------------------------------
# Product text.

def _cap(s: str) -> str:
  return s[:1].upper() + s[1:]


def _visual_sentence(lang: str, gt: dict[str, Any], color: str, pattern: str | None) -> str:
  """Returns a description sentence naming the colour `color`, the pattern and the style, in `lang`."""
  w = lambda kind, v: words_for(lang, kind, v)
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
  w = lambda kind, v: words_for(lang, kind, v)
  cat = w("category", gt["category"])
  sparse = gt["sparse_title"]
  color = None if sparse else w("color", gt["text_color"])
  pattern = None if sparse or gt["pattern"] == "solid" else w("pattern", gt["pattern"])
  style = None
  if not sparse and rng.random() < cfg.style_in_title_rate:
    style = w("style", gt["style"])
  gender = w("gender", gt["gender"])
  season = w("season", _pick(rng, SEASONS))
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
  template = _pick(rng, templates)
  title = template.format(
      cat=cat, gender=gender, gender_p=w("gender_possessive", gt["gender"]), season=season, brand=brand,
      color=color or "", pattern=pattern or "", style=style or "", material=_cap(w("material", gt["material"])))
  title = re.sub(r"[\s-]+$", "", re.sub(r"\s+", " ", title)).strip()  # empty slots leave gaps / a dangling "-"

  # Which text-only attributes go in the attributes dict; the rest go in the description, so an empty
  # description puts them all in the dict.
  empty_description = rng.random() < cfg.empty_description_rate
  in_attrs = {k: empty_description or bool(rng.random() < p)
              for k, p in (("material", 0.6), ("care", 0.5), ("size", 0.7))}
  key = lambda k: WORDS[lang]["key"][k]
  attributes: dict[str, str] = {key("brand"): brand}
  if in_attrs["material"]:
    attributes[key("material")] = w("material", gt["material"])
  if in_attrs["care"]:
    attributes[key("care")] = w("care", gt["care"])
  if in_attrs["size"]:
    attributes[key("size")] = w("size", gt["size"])
  if rng.random() < 0.5:
    attributes[key("gender")] = gender
  if not sparse and rng.random() < 0.5:
    attributes[key("color")] = color.lower() if lang != "de" else color
  if pattern and rng.random() < 0.3:
    attributes[key("pattern")] = pattern.lower() if lang != "de" else pattern

  needs = [k for k, v in in_attrs.items() if not v]
  sentences: list[str] = []
  if not empty_description:
    s = SENTENCES[lang]
    if not sparse and rng.random() < 0.6:
      sentences.append(_visual_sentence(lang, gt, color, pattern))
    fillers = FILLER[lang]
    sentences.append(_pick(rng, fillers))
    for k in ("material", "care", "size"):
      if k in needs or rng.random() < 0.3:
        if k == "size" and gt["size"] == "one size":
          sentences.append(_cap(w("size", "one size")) + ".")
        else:
          sentences.append(s[k].format(**{k: w(k, gt[k])}))
    if rng.random() < 0.3:
      sentences.append(s["season"].format(season=season if lang == "de" else season.lower()))
  description = re.sub(r"\s+", " ", " ".join(sentences)).replace(" ,", ",").strip()
  return title, description, attributes


# ---------------------------------------------------------------------------------------------------
# Images.
#
# Each (category, style) is a label map drawn once in canonical coordinates [-1, 1]^2 (x right, y down):
# 0 background/hole, 1 body (primary colour + pattern), 2 detail in the secondary colour,
# 3 shade (darkened primary: seams, soles, handles), 4 hardware (dark grey: zips, buttons, laces).

_BODY, _DETAIL, _SHADE, _HARDWARE = 1, 2, 3, 4
_HARDWARE_RGB = (55, 55, 60)


def _mirror(points):
  return [(-x, y) for x, y in points]


def _draw_template(d: "_Canvas", cat: str, style: str):
  """Draws one silhouette; see the label legend above."""
  if cat == "dress":
    if style == "short sleeve":
      sl = [(-0.2, -0.78), (-0.52, -0.6), (-0.44, -0.4), (-0.27, -0.5)]
      d.poly(sl, _BODY); d.poly(_mirror(sl), _BODY)
    elif style == "long sleeve":
      sl = [(-0.2, -0.78), (-0.5, -0.62), (-0.68, 0.22), (-0.52, 0.26), (-0.36, -0.3), (-0.27, -0.5)]
      d.poly(sl, _BODY); d.poly(_mirror(sl), _BODY)
      cuff = [(-0.68, 0.22), (-0.52, 0.26), (-0.5, 0.18), (-0.665, 0.14)]
      d.poly(cuff, _DETAIL); d.poly(_mirror(cuff), _DETAIL)
    else:
      d.line([(-0.17, -0.78), (-0.15, -0.95)], _SHADE, 0.05); d.line([(0.17, -0.78), (0.15, -0.95)], _SHADE, 0.05)
    d.poly([(-0.22, -0.8), (0.22, -0.8), (0.3, -0.62), (0.24, -0.15), (0.64, 0.9), (-0.64, 0.9),
            (-0.24, -0.15), (-0.3, -0.62)], _BODY)
    d.ellipse(0, -0.82, 0.12, 0.1, 0)
    d.rect(-0.25, -0.19, 0.25, -0.11, _DETAIL)
  elif cat in ("t-shirt", "jacket"):
    if cat == "jacket" and style == "hooded":
      d.ellipse(0, -0.8, 0.3, 0.2, _BODY)
      d.ellipse(0, -0.78, 0.18, 0.13, _SHADE)
    if cat == "t-shirt":
      sl = [(-0.25, -0.76), (-0.8, -0.42), (-0.64, -0.16), (-0.42, -0.3)]
      d.poly(sl, _BODY); d.poly(_mirror(sl), _BODY)
    else:
      sl = [(-0.25, -0.76), (-0.62, -0.56), (-0.8, 0.62), (-0.58, 0.66), (-0.44, -0.15)]
      d.poly(sl, _BODY); d.poly(_mirror(sl), _BODY)
      cuff = [(-0.8, 0.62), (-0.58, 0.66), (-0.565, 0.56), (-0.785, 0.52)]
      d.poly(cuff, _SHADE); d.poly(_mirror(cuff), _SHADE)
    d.poly([(-0.2, -0.8), (0.2, -0.8), (0.44, -0.64), (0.44, 0.86), (-0.44, 0.86), (-0.44, -0.64)], _BODY)
    if cat == "t-shirt":
      if style == "v-neck":
        d.poly([(-0.19, -0.81), (0.19, -0.81), (0, -0.44)], _DETAIL)
        d.poly([(-0.12, -0.81), (0.12, -0.81), (0, -0.54)], 0)
      else:
        d.ellipse(0, -0.8, 0.19, 0.13, _DETAIL)
        d.ellipse(0, -0.82, 0.13, 0.08, 0)
      if style == "pocket":
        d.rect(0.1, -0.45, 0.32, -0.2, _DETAIL)
    else:
      d.line([(0, -0.62), (0, 0.86)], _SHADE, 0.04)
      if style == "zip-up":
        d.poly([(-0.2, -0.84), (0.2, -0.84), (0.23, -0.66), (-0.23, -0.66)], _DETAIL)
        d.line([(0, -0.66), (0, 0.86)], _HARDWARE, 0.05)
        d.rect(-0.04, -0.66, 0.04, -0.56, _HARDWARE)
      elif style == "buttoned":
        lapel = [(-0.2, -0.8), (-0.02, -0.3), (-0.12, -0.8)]
        d.poly(lapel, _DETAIL); d.poly(_mirror(lapel), _DETAIL)
        for y in (-0.2, 0.1, 0.4, 0.7):
          d.ellipse(0.07, y, 0.05, 0.05, _HARDWARE)
      else:
        d.line([(0, -0.66), (0, 0.86)], _HARDWARE, 0.04)
        d.line([(-0.08, -0.64), (-0.1, -0.3)], _DETAIL, 0.035)
        d.line([(0.08, -0.64), (0.1, -0.3)], _DETAIL, 0.035)
  elif cat == "trousers":
    if style == "wide leg":
      d.poly([(-0.42, -0.74), (0.42, -0.74), (0.66, 0.92), (0.1, 0.92), (0, -0.22), (-0.1, 0.92),
              (-0.66, 0.92)], _BODY)
    else:
      d.poly([(-0.42, -0.74), (0.42, -0.74), (0.45, 0.92), (0.07, 0.92), (0, -0.3), (-0.07, 0.92),
              (-0.45, 0.92)], _BODY)
    if style == "belted":
      d.rect(-0.43, -0.88, 0.43, -0.72, _HARDWARE)
      d.rect(-0.09, -0.9, 0.09, -0.7, _DETAIL)
    else:
      d.rect(-0.42, -0.86, 0.42, -0.73, _DETAIL)
    d.line([(0, -0.73), (0, -0.35)], _SHADE, 0.03)
  elif cat == "shorts":
    d.poly([(-0.52, -0.4), (0.52, -0.4), (0.64, 0.42), (0.08, 0.48), (0, 0.0), (-0.08, 0.48),
            (-0.64, 0.42)], _BODY)
    d.rect(-0.52, -0.56, 0.52, -0.4, _DETAIL)
    if style == "cargo":
      d.rect(-0.58, 0.0, -0.34, 0.3, _SHADE); d.rect(0.34, 0.0, 0.58, 0.3, _SHADE)
    elif style == "drawstring":
      d.line([(-0.03, -0.46), (-0.12, -0.05)], _HARDWARE, 0.035)
      d.line([(0.03, -0.46), (0.12, -0.05)], _HARDWARE, 0.035)
    else:
      d.poly([(-0.64, 0.42), (-0.08, 0.48), (-0.07, 0.34), (-0.625, 0.28)], _DETAIL)
      d.poly([(0.64, 0.42), (0.08, 0.48), (0.07, 0.34), (0.625, 0.28)], _DETAIL)
  elif cat == "skirt":
    hem = {"mini": (0.6, 0.15), "midi": (0.62, 0.88), "pleated": (0.66, 0.55)}[style]
    d.poly([(-0.36, -0.62), (0.36, -0.62), (hem[0], hem[1]), (-hem[0], hem[1])], _BODY)
    d.rect(-0.37, -0.76, 0.37, -0.62, _DETAIL)
    if style == "pleated":
      for k in range(-3, 4):
        d.line([(0.36 * k / 4, -0.62), (hem[0] * k / 4, hem[1])], _SHADE, 0.025)
  elif cat == "shoe":
    if style == "sneaker":
      d.poly([(-0.82, 0.3), (-0.8, -0.15), (-0.5, -0.26), (0.1, -0.1), (0.62, 0.04), (0.86, 0.2),
              (0.86, 0.3)], _BODY)
      d.rect(-0.84, 0.3, 0.9, 0.46, _DETAIL)
      for x in (-0.2, -0.05, 0.1, 0.25):
        d.line([(x, -0.13 + 0.05 * (x + 0.2)), (x + 0.08, 0.02 + 0.05 * (x + 0.2))], _HARDWARE, 0.035)
      d.ellipse(-0.62, -0.2, 0.12, 0.05, _SHADE)
    elif style == "heeled":
      d.poly([(-0.72, 0.0), (-0.56, -0.22), (-0.2, -0.06), (0.4, 0.14), (0.88, 0.3), (0.82, 0.42),
              (0.2, 0.38), (-0.55, 0.22)], _BODY)
      d.poly([(-0.72, 0.0), (-0.55, 0.22), (-0.6, 0.78), (-0.7, 0.78)], _SHADE)
      d.line([(0.2, 0.38), (0.82, 0.42)], _DETAIL, 0.05)
    else:
      d.poly([(-0.7, 0.36), (-0.7, -0.78), (-0.24, -0.78), (-0.2, -0.06), (0.5, 0.04), (0.86, 0.2),
              (0.86, 0.36)], _BODY)
      d.rect(-0.72, 0.36, 0.88, 0.5, _SHADE)
      d.rect(-0.72, 0.36, -0.44, 0.62, _SHADE)
      d.rect(-0.6, -0.88, -0.4, -0.74, _DETAIL)
  elif cat == "bag":
    if style == "tote":
      d.arc(-0.36, -0.78, 0.36, 0.38, _SHADE, 0.06)
      d.poly([(-0.6, -0.2), (0.6, -0.2), (0.72, 0.86), (-0.72, 0.86)], _BODY)
      d.rect(-0.61, -0.22, 0.61, -0.12, _DETAIL)
    elif style == "crossbody":
      d.line([(-0.46, 0.1), (0.0, -0.92)], _SHADE, 0.05); d.line([(0.46, 0.1), (0.0, -0.92)], _SHADE, 0.05)
      d.rect(-0.52, 0.05, 0.52, 0.78, _BODY)
      d.poly([(-0.52, 0.05), (0.52, 0.05), (0.52, 0.36), (0, 0.48), (-0.52, 0.36)], _DETAIL)
    else:
      d.rect(-0.82, -0.3, 0.82, 0.36, _BODY)
      d.poly([(-0.82, -0.3), (0.82, -0.3), (0, 0.1)], _DETAIL)
      d.ellipse(0, 0.06, 0.06, 0.06, _HARDWARE)
  elif cat == "hat":
    if style == "cap":
      d.pieslice(-0.56, -0.56, 0.56, 0.56, 180, 360, _BODY)
      d.poly([(0.3, -0.04), (0.96, 0.02), (0.92, 0.14), (0.3, 0.1)], _SHADE)
      d.rect(-0.56, -0.06, 0.56, 0.08, _DETAIL)
      d.ellipse(0, -0.56, 0.06, 0.04, _DETAIL)
    elif style == "beanie":
      d.pieslice(-0.55, -0.7, 0.55, 0.7, 180, 360, _BODY)
      d.rect(-0.55, -0.02, 0.55, 0.2, _BODY)
      d.rect(-0.58, 0.2, 0.58, 0.52, _DETAIL)
      d.ellipse(0, -0.74, 0.17, 0.15, _DETAIL)
    else:
      d.ellipse(0, 0.18, 0.95, 0.2, _BODY)
      d.ellipse(0, -0.08, 0.42, 0.38, _BODY)
      d.rect(-0.43, 0.0, 0.43, 0.12, _DETAIL)
  elif cat == "scarf":
    if style == "fringed":
      d.poly([(-0.26, -0.82), (0.26, -0.82), (0.3, 0.7), (-0.22, 0.7)], _BODY)
      d.rect(-0.27, -0.82, 0.27, -0.7, _SHADE)
      for x in np.linspace(-0.2, 0.26, 7):
        d.line([(x, 0.7), (x, 0.94)], _DETAIL, 0.035)
    elif style == "square":
      d.poly([(0, -0.88), (0.88, 0), (0, 0.88), (-0.88, 0)], _DETAIL)
      d.poly([(0, -0.74), (0.74, 0), (0, 0.74), (-0.74, 0)], _BODY)
    else:
      d.ellipse(0, 0, 0.7, 0.82, _BODY)
      d.ellipse(0, 0, 0.36, 0.5, 0)
      d.poly([(-0.7, 0.05), (-0.36, 0.05), (-0.36, 0.2), (-0.68, 0.25)], _SHADE)
  else:
    raise ValueError(f"no silhouette for category {cat!r}")


class _Canvas:
  """PIL drawing in canonical [-1, 1] coordinates onto an R x R label map."""

  def __init__(self, res: int):
    self.res = res
    self.img = Image.new("L", (res, res), 0)
    self.draw = ImageDraw.Draw(self.img)

  def p(self, x, y):
    return ((x + 1) * 0.5 * self.res, (y + 1) * 0.5 * self.res)

  def poly(self, pts, label):
    self.draw.polygon([self.p(x, y) for x, y in pts], fill=label)

  def rect(self, x0, y0, x1, y1, label):
    self.draw.rectangle([self.p(x0, y0), self.p(x1, y1)], fill=label)

  def ellipse(self, cx, cy, rx, ry, label):
    self.draw.ellipse([self.p(cx - rx, cy - ry), self.p(cx + rx, cy + ry)], fill=label)

  def pieslice(self, x0, y0, x1, y1, start, end, label):
    self.draw.pieslice([self.p(x0, y0), self.p(x1, y1)], start, end, fill=label)

  def arc(self, x0, y0, x1, y1, label, width):
    self.draw.arc([self.p(x0, y0), self.p(x1, y1)], 180, 360, fill=label,
                  width=max(1, int(round(width * 0.5 * self.res))))

  def line(self, pts, label, width):
    self.draw.line([self.p(x, y) for x, y in pts], fill=label, width=max(1, int(round(width * 0.5 * self.res))))


# Backgrounds: studio tones chosen (by Monte Carlo over jitter, texture and lighting) to stay >~45 RGB
# away from every palette colour, so a colour word stays a property of the product, not the backdrop.
_BACKGROUNDS = np.asarray([
    (170, 190, 215),  # pale blue
    (215, 195, 160),  # sand
    (175, 170, 215),  # lavender
    (150, 200, 200),  # pale teal
    (150, 200, 130),  # pistachio
    (70, 80, 100),    # slate
    (50, 65, 95),     # navy slate
], np.float32)
_OCCLUDERS = np.asarray([(224, 172, 140), (198, 134, 100), (141, 85, 60), (90, 90, 90), (200, 200, 200),
                         (60, 110, 120)], np.float32)


class Renderer:
  """Renders product images from latent attributes; templates are built once per image size.

  Everything is sampled in numpy at the output resolution: output pixel -> inverse pose -> canonical
  (u, v) -> label map lookup, and the pattern evaluated at (u, v).
  """

  def __init__(self, image_size: int):
    self.size = image_size
    # Canonical maps finer than the object's largest on-screen size, so nearest lookup is not blocky.
    self.res = R = int(round(image_size * 1.5))
    # Coverage is prefiltered in canonical space with a blur about one output pixel wide: sampling it
    # at pixel centres antialiases the silhouette for the cost of the one lookup that gives the label.
    blur = 0.3 * R / (0.78 * image_size)  # ~ box of one output pixel at mean scale, as a Gaussian sigma
    self.maps = {}
    for cat in CATEGORIES:
      for style in STYLES[cat]:
        canvas = _Canvas(R)
        _draw_template(canvas, cat, style)
        lab = np.asarray(canvas.img, np.uint8).copy()
        # A zero border makes every out-of-range lookup (clipped to the border) background.
        lab[:2, :] = lab[-2:, :] = lab[:, :2] = lab[:, -2:] = 0
        mask = Image.fromarray(np.where(lab > 0, 255, 0).astype(np.uint8), "L")
        cover = np.asarray(mask.filter(ImageFilter.GaussianBlur(blur)), np.uint16)
        self.maps[(cat, style)] = (lab.astype(np.uint16) | (cover << 8)).ravel()
    pix = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size * 2 - 1
    self.x, self.y = np.meshgrid(pix, pix)  # [S, S] output coordinates in [-1, 1]
    # Sensor noise comes from a fixed bank (sliced and flipped per image): drawing 3*S*S normals per image
    # would cost more than the rest of the rendering.
    bank_rng = np.random.default_rng(12345)
    self.noise_bank = bank_rng.standard_normal((8, image_size, image_size, 3), dtype=np.float32)

  def _pattern(self, rng, pattern, u, v) -> np.ndarray | None:
    """Returns a bool map like u: True where the pattern shows the secondary colour (None for solid)."""
    if pattern == "solid":
      return None
    if pattern == "striped":
      angle = (0.0, 0.5 * np.pi, 0.25 * np.pi, -0.25 * np.pi)[rng.integers(4)]
      period = rng.uniform(0.17, 0.28)
      t = u * np.float32(np.cos(angle) / period) + v * np.float32(np.sin(angle) / period)
      t += np.float32(rng.random())
      return (t - np.floor(t)) < rng.uniform(0.3, 0.45)
    if pattern == "dotted":
      period = rng.uniform(0.2, 0.28)
      radius = rng.uniform(0.28, 0.36)
      b = v * np.float32(1 / period) + np.float32(rng.random())
      fb = np.floor(b)
      a = u * np.float32(1 / period) + np.float32(rng.random()) + 0.5 * (fb % 2)  # staggered rows
      a -= np.floor(a) + 0.5
      b -= fb + 0.5
      return a * a + b * b < radius * radius
    if pattern == "checked":
      period = rng.uniform(0.22, 0.32)
      duty = rng.uniform(0.2, 0.28)
      a = u * np.float32(1 / period) + np.float32(rng.random())
      b = v * np.float32(1 / period) + np.float32(rng.random())
      return ((a - np.floor(a)) < duty) | ((b - np.floor(b)) < duty)
    if pattern == "floral":
      period = rng.uniform(0.3, 0.4)
      a = u * np.float32(1 / period) + np.float32(rng.random())
      b = v * np.float32(1 / period) + np.float32(rng.random())
      ia, ib = np.floor(a), np.floor(b)
      # Per-cell jitter from a hash of the cell index, so flowers are not on a visible grid.
      h = np.sin(ia * 12.9898 + ib * 78.233) * 43758.5453
      h -= np.floor(h)
      fa = a - ia - 0.5 - 0.25 * (h - 0.5)
      fb = b - ib - 0.5 + 0.25 * (h - 0.5)
      r = np.sqrt(fa * fa + fb * fb)
      theta = np.arctan2(fb, fa) + 6.283 * h
      return (r < 0.42 * (0.6 + 0.4 * np.cos(5 * theta))) | (r < 0.12)
    raise ValueError(f"unknown pattern {pattern!r}")

  def render(self, rng: np.random.Generator, gt: dict[str, Any], occlusion_rate: float = 0.25,
             noise_sigma_max: float = 6.0) -> np.ndarray:
    """Returns the product image, uint8 [S, S, 3]."""
    cat = gt["category"]
    S, R = self.size, self.res
    # Pose: scale, rotation, translation, mirror.
    s = rng.uniform(0.62, 0.95)
    max_rot = 25.0 if cat in ("bag", "hat", "shoe") else 12.0
    theta = np.deg2rad(rng.uniform(-max_rot, max_rot))
    tx, ty = rng.uniform(-1, 1, size=2) * (1.0 - s) * 0.8
    flip = -1.0 if rng.random() < 0.5 else 1.0
    # Output (x, y) -> canonical pixel units: (u, v) = F * Rot(-theta) * ((x, y) - t) / s, then * R/2 + R/2.
    c, sn = np.cos(theta) / s, np.sin(theta) / s
    h = R / 2
    a00, a01, a02 = flip * c * h, flip * sn * h, h - flip * (c * tx + sn * ty) * h
    a10, a11, a12 = -sn * h, c * h, h - (c * ty - sn * tx) * h
    x, y = self.x, self.y
    pu = x * np.float32(a00) + y * np.float32(a01)  # [S, S] at pixel centres
    pv = x * np.float32(a10) + y * np.float32(a11)
    # One lookup gives label (low byte) and prefiltered coverage (high byte) at each pixel centre.
    iu = np.clip(pu + np.float32(a02), 0, R - 1).astype(np.int32)
    iv = np.clip(pv + np.float32(a12), 0, R - 1).astype(np.int32)
    packed = np.take(self.maps[(cat, gt["style"])], iv * R + iu)  # [S, S] uint16
    labels = (packed & 0xFF).astype(np.uint8)
    alpha = (packed >> 8).astype(np.float32)[..., None] * np.float32(1 / 255)  # [S, S, 1]
    u = (pu + np.float32(a02)) * np.float32(1 / h) - 1
    v = (pv + np.float32(a12)) * np.float32(1 / h) - 1
    pat = self._pattern(rng, gt["pattern"], u, v)
    if pat is not None:
      labels = labels + np.uint8(5 - _BODY) * ((labels == _BODY) & pat)

    # Colour per label (label 5 = body pixel painted by the pattern). Label 0 takes the body colour:
    # partly covered edge pixels whose centre falls outside the silhouette blend towards the product.
    primary = np.asarray(COLORS[gt["primary_color"]], np.float32)
    secondary = np.asarray(COLORS[gt["secondary_color"]], np.float32)
    table = np.stack([primary, primary, secondary, primary * 0.62, np.asarray(_HARDWARE_RGB, np.float32),
                      secondary])
    obj = np.take(table, labels, axis=0)  # [S, S, 3]

    # Background: a studio tone, jittered, with one of several textures.
    bg_base = (_BACKGROUNDS[rng.integers(len(_BACKGROUNDS))] + rng.uniform(-10, 10, size=3)).astype(np.float32)
    texture = rng.integers(4)
    if texture == 0:
      tex = None
    elif texture == 1:
      tex = y * np.float32(14 * rng.uniform(0.5, 1)) + x * np.float32(14 * rng.uniform(-0.5, 0.5))
    elif texture == 2:
      coarse = rng.uniform(-12, 12, size=(4, 4)).astype(np.float32)
      tex = np.asarray(Image.fromarray(coarse, "F").resize((S, S), Image.Resampling.BILINEAR))
    else:
      freq = rng.uniform(10, 25)
      tex = 7.0 * np.sin(np.float32(freq) * (y + 0.15 * np.sin(3 * x)) + np.float32(rng.uniform(0, 6.3)))
    bg = np.broadcast_to(bg_base, (S, S, 3)) if tex is None else bg_base + tex[..., None]
    # Drop shadow: the alpha shifted down-right darkens the background beneath.
    d = max(1, S // 32)
    shadow = np.ones_like(alpha)
    shadow[d:, d:] -= np.float32(rng.uniform(0.15, 0.3)) * alpha[:-d, :-d]
    # Lighting: a level, a directional gradient, and a soft falloff across the object (reads as volume).
    phi = rng.uniform(0, 2 * np.pi)
    light = np.float32(rng.uniform(0.92, 1.08)) * (
        1.0 + x * np.float32(rng.uniform(0, 0.06) * np.cos(phi)) + y * np.float32(rng.uniform(0, 0.06) * np.sin(phi)))
    volume = 1.0 - np.float32(0.12 / (s * s)) * (x - np.float32(tx)) ** 2
    img = bg * (shadow * (1.0 - alpha)) + obj * (alpha * volume[..., None])

    if rng.random() < occlusion_rate:
      # Another object (a hand, a prop) over an edge of the product.
      ang = rng.uniform(0, 2 * np.pi)
      cx, cy = tx + 0.75 * s * np.cos(ang), ty + 0.75 * s * np.sin(ang)
      rx, ry = rng.uniform(0.15, 0.3, size=2)
      if rng.random() < 0.5:
        occ = ((x - np.float32(cx)) * np.float32(1 / rx)) ** 2 + ((y - np.float32(cy)) * np.float32(1 / ry)) ** 2 < 1
      else:
        occ = (np.abs(x - np.float32(cx)) < rx) & (np.abs(y - np.float32(cy)) < ry)
      img[occ] = _OCCLUDERS[rng.integers(len(_OCCLUDERS))]

    img *= light[..., None]
    sigma = np.float32(rng.uniform(0, noise_sigma_max))
    noise = self.noise_bank[rng.integers(len(self.noise_bank))]
    if rng.random() < 0.5:
      noise = noise[::-1]
    if rng.random() < 0.5:
      noise = noise[:, ::-1]
    img += sigma * noise + np.float32(0.5)
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


def encode_png(image: np.ndarray, level: int = 1) -> bytes:
  """Returns PNG bytes of a uint8 [H, W, 3] image.

  A minimal encoder (one IDAT, "Up" filter on every row): PIL's encoder costs more than rendering a
  64 px image. Deterministic for a given zlib; any PNG reader decodes it.
  """
  h, w, _ = image.shape
  raw = image.reshape(h, w * 3)
  up = np.empty((h, w * 3 + 1), np.uint8)
  up[:, 0] = 2  # filter type Up
  up[0, 1:] = raw[0]
  np.subtract(raw[1:], raw[:-1], out=up[1:, 1:])  # uint8 wraps mod 256, as PNG wants

  def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

  header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  # After the Up filter, noise-dominated rows gain little from LZ77 matching: Huffman-only coding is
  # ~2x faster than level 1 and smaller.
  z = zlib.compressobj(level, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
  data = z.compress(up.tobytes()) + z.flush()
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


# ---------------------------------------------------------------------------------------------------
# Catalogue as arrays, for query matching.

_QUERY_ATTRS = ("primary_color", "pattern", "style", "material", "care", "size")
_VISUAL_ATTRS = ("primary_color", "pattern", "style")
_TEXTUAL_ATTRS = ("material", "care", "size")
NEIGHBOURS = {"primary_color": COLOR_NEIGHBOURS, "pattern": PATTERN_NEIGHBOURS, "material": MATERIAL_NEIGHBOURS}


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


# ---------------------------------------------------------------------------------------------------
# Queries and labels.

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
  has_v = any(a in q for a in _VISUAL_ATTRS)
  has_t = any(a in q for a in _TEXTUAL_ATTRS)
  return "mixed" if has_v and has_t else ("visual" if has_v else "textual")


def _sample_novel_combos(rng: np.random.Generator, frac: float) -> set[tuple[str, str]]:
  combos = [(c, col) for c in CATEGORIES for col in COLOR_NAMES]
  n = max(1, int(round(frac * len(combos)))) if frac > 0 else 0
  return {combos[i] for i in rng.choice(len(combos), size=n, replace=False)}


def generate_queries(gts: list[dict[str, Any]], ids: list[str], cfg: SyntheticConfig):
  """Returns (queries, qrels, stats): query dicts in file order and (query_id, product_id, grade) rows."""
  rng = np.random.default_rng([cfg.seed, _QUERY_STREAM])
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
                              or [np.zeros(0, np.int64)])
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
      kind = "visual" if novel else _pick_weighted(rng, kinds, kind_cum)
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
    e_ids = np.sort(exact[rng.choice(len(exact), e_cap, replace=False)]) if len(exact) > e_cap else exact
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
    comp = np.concatenate([cat.by_category.get(c, np.zeros(0, np.int64)) for c in COMPLEMENTS[q["category"]]])
    if "primary_color" in q:
      comp = comp[cat.codes["primary_color"][comp] == cat.code("primary_color", q["primary_color"])]
    # I: same category further off, plus unrelated categories in the query's colour (a red bag for
    # "red dress" is what a colour-only model would wrongly return).
    i_ids = idx[(mism >= 2) | ((mism == 1) & ~s_mask)]
    if "primary_color" in q:
      related = set(COMPLEMENTS[q["category"]]) | {q["category"]}
      others = [c for c in CATEGORIES if c not in related]
      same_color = np.concatenate([cat.by_cat_color.get((c, q["primary_color"]), np.zeros(0, np.int64))
                                   for c in others])
      i_ids = np.concatenate([i_ids, same_color])
    split_i = 0 if train else 1

    def take(ids, k):
      ids = np.asarray(ids, np.int64)
      return np.sort(ids[rng.choice(len(ids), k, replace=False)] if len(ids) > k else ids)

    s_take = take(s_ids, cfg.s_per_query[split_i])
    c_take = take(comp, cfg.c_per_query[split_i])
    i_take = take(i_ids, cfg.i_per_query[split_i])
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


# ---------------------------------------------------------------------------------------------------
# The folder.

def _progress(total: int, desc: str):
  try:
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    return tqdm(total=total, desc=desc, unit="it", mininterval=1.0, dynamic_ncols=True)
  except ImportError:  # pragma: no cover - tqdm is a dependency; this only keeps the generator usable
    return None


def generate_folder(out_dir: str | os.PathLike, config: SyntheticConfig, progress: bool = True) -> dict[str, Any]:
  """Returns generation stats after writing the catalogue folder (see module docstring) into out_dir.

  out_dir is created if needed; existing files of the same names are overwritten.
  """
  cfg = config
  t0 = time.perf_counter()
  out_dir = os.fspath(out_dir)
  os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
  renderer = Renderer(cfg.image_size)
  width = max(6, len(str(cfg.num_products)))
  ids = [f"p{i + 1:0{width}d}" for i in range(cfg.num_products)]
  gts: list[dict[str, Any]] = []
  bar = _progress(cfg.num_products, "synthetic products") if progress else None
  # PNG encoding (zlib) and file creation release the GIL: a writer thread overlaps them with rendering.
  # Threads, not processes: the file contents do not depend on the order they are written in.
  pending: collections.deque = collections.deque()

  def write_image(path, image):
    with open(path, "wb") as f:
      f.write(encode_png(image))

  with open(os.path.join(out_dir, "products.jsonl"), "w", encoding="utf-8") as fp, \
       open(os.path.join(out_dir, "ground_truth.jsonl"), "w", encoding="utf-8") as fg, \
       concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="png") as pool:
    for i, pid in enumerate(ids):
      # Product i depends on (seed, i) only: catalogues of different sizes share their prefix.
      rng = np.random.default_rng([cfg.seed, _PRODUCT_STREAM, i])
      gt = sample_latents(rng, cfg)
      title, description, attributes = product_text(rng, gt, cfg)
      image = renderer.render(rng, gt, cfg.occlusion_rate, cfg.noise_sigma_max)
      rel = f"images/{pid}.png"
      pending.append(pool.submit(write_image, os.path.join(out_dir, rel), image))
      while len(pending) > 64 or (pending and pending[0].done()):
        pending.popleft().result()  # re-raises a failed write here
      fp.write(json.dumps({"id": pid, "title": title, "description": description, "attributes": attributes,
                           "image": rel, "language": gt["language"]}, ensure_ascii=False) + "\n")
      fg.write(json.dumps({"id": pid, **gt}, ensure_ascii=False) + "\n")
      gts.append(gt)
      if bar is not None and (i + 1) % 256 == 0:
        bar.update(256)
    while pending:
      pending.popleft().result()
  if bar is not None:
    bar.update(cfg.num_products - bar.n)
    bar.close()
  t_products = time.perf_counter() - t0

  queries, qrels, qstats = generate_queries(gts, ids, cfg)
  with open(os.path.join(out_dir, "queries.jsonl"), "w", encoding="utf-8") as f:
    for q in queries:
      f.write(json.dumps({k: v for k, v in q.items() if not k.startswith("_")}, ensure_ascii=False) + "\n")
  with open(os.path.join(out_dir, "qrels.tsv"), "w", encoding="utf-8") as f:
    for qid, pid, grade in qrels:
      f.write(f"{qid}\t{pid}\t{grade}\n")

  n = cfg.num_products
  languages: dict[str, int] = {}
  for g in gts:
    languages[g["language"]] = languages.get(g["language"], 0) + 1
  grades = {g: 0 for g in "ESCI"}
  for _, _, g in qrels:
    grades[g] += 1
  splits = {s: sum(q["split"] == s for q in queries) for s in ("train", "validation", "test")}
  return {
      "num_products": n,
      "num_queries": splits,
      "num_qrels": grades,
      "sparse_fraction": sum(g["sparse_title"] for g in gts) / n,
      "noisy_fraction": sum(g["noisy"] for g in gts) / n,
      "languages": languages,
      **qstats,
      "seconds": time.perf_counter() - t0,
      "products_per_second": n / max(t_products, 1e-9),
  }


def read_ground_truth(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
  """Returns {product id: ground-truth record} from a ground_truth.jsonl."""
  out = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      out[rec["id"]] = rec
  return out
