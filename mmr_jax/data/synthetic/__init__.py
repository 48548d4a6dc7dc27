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

# Layout

| module | what |
|---|---|
| vocabulary.py | attribute values, neighbours, complements, the words text and queries use per language |
| config.py | `SyntheticConfig` (the knobs below) and `PRESETS` |
| latents.py | `sample_latents`: one product's ground-truth record; the random streams |
| text.py | `product_text`: title, description and attributes dict in the product's language |
| silhouettes.py, renderer.py | label maps per (category, style); `Renderer` poses, colours and lights them |
| queries.py | `generate_queries`: queries and E/S/C/I labels from the latent attributes |
| writer.py | `generate_folder` (the whole folder), `encode_png`, `read_ground_truth` |

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

from mmr_jax.data.synthetic.config import PRESETS, SyntheticConfig, preset
from mmr_jax.data.synthetic.latents import sample_latents
from mmr_jax.data.synthetic.queries import generate_queries
from mmr_jax.data.synthetic.renderer import Renderer
from mmr_jax.data.synthetic.text import product_text
from mmr_jax.data.synthetic.vocabulary import (CATEGORIES, COLORS, COMPLEMENTS, NEIGHBOURS, QUERY_COLOR, STYLES,
                                               WORDS, color_words, words_for)
from mmr_jax.data.synthetic.writer import encode_png, generate_folder, read_ground_truth

__all__ = [
    "CATEGORIES", "COLORS", "COMPLEMENTS", "NEIGHBOURS", "PRESETS", "QUERY_COLOR", "STYLES", "WORDS",
    "Renderer", "SyntheticConfig", "color_words", "encode_png", "generate_folder", "generate_queries",
    "preset", "product_text", "read_ground_truth", "sample_latents", "words_for",
]
