"""Catalogue folder format: schema, validation, product text rendering, images, scanning.

A catalogue folder (what users bring) holds:

```
products.jsonl   {"id": "p1", "title": "...", "description": "...", "attributes": {...},
                  "image": "images/p1.jpg", "language": "en"}   (description/attributes/language/image optional)
queries.jsonl    {"id": "q1", "text": "red floral dress", "split": "train|validation|test",
                  "tags": ["visual"]}                            (tags optional)
qrels.tsv        query_id <TAB> product_id <TAB> E|S|C|I         (header line optional)
images/          JPEG or PNG (anything Pillow decodes), paths relative to the folder
```

`scan_catalog` reads the three files once, streaming, and returns a `CatalogPlan`: which products.jsonl
lines become which product index, the query rows of every split with their labels, the held-out
(novel) products, and every skipped line with its reason. Images are not decoded here: that happens
once, while the TFDS products table is written (`load_image`).

Bad input never crashes later: a line that cannot be used is skipped and logged under a reason with
its `file:line` reference (`SkipLog`), a product whose image is unusable is kept with has_image=False
and logged, and problems that make the whole catalogue unusable (missing file, unknown split, no
products) raise `CatalogError` naming the file.

Modules: `schema` (file names, grades, splits, skip reasons, line validation, `product_text`),
`images` (path checks, `to_rgb`, `load_image`), `scan` (`scan_catalog`, `CatalogPlan`, chunked
re-reading). Callers use the names re-exported here: `from mmr_jax.data import catalog`.
"""

from mmr_jax.data.catalog.images import load_image, resolve_image_path, to_rgb
from mmr_jax.data.catalog.scan import (CatalogPlan, ProductChunk, QueryRow, check_folder,
                                       iter_chunk_products, scan_catalog)
from mmr_jax.data.catalog.schema import (
    DEFAULT_LANGUAGE, DERIVED_QUERY_SPLITS, DUPLICATE_PRODUCT_ID, DUPLICATE_QREL, DUPLICATE_QUERY_ID, EMPTY_TEXT,
    GRADE_GAIN, IMAGE_CORRUPT, IMAGE_MISSING, IMAGE_PATH_REFUSED, INVALID_FIELD, INVALID_GRADE, MALFORMED_JSON,
    MALFORMED_QREL, MISSING_FIELD, NON_UTF8, PAIR_SPLITS, PRODUCT_SPLIT, PRODUCTS_FILE, QRELS_FILE, QUERIES_FILE,
    QUERY_SPLITS, REQUIRED_FILES, SOURCE_QUERY_SPLITS, UNKNOWN_PRODUCT, UNKNOWN_QUERY, UNSPACED, CatalogError,
    Product, Query, SkipLog, count_words, normalize_query, parse_grade, parse_product, parse_query,
    FIELD_SEPARATOR, product_fields, product_text, render_attributes)

__all__ = [
    "CatalogError", "CatalogPlan", "DEFAULT_LANGUAGE", "DERIVED_QUERY_SPLITS", "DUPLICATE_PRODUCT_ID",
    "DUPLICATE_QREL", "DUPLICATE_QUERY_ID", "EMPTY_TEXT", "FIELD_SEPARATOR", "GRADE_GAIN", "IMAGE_CORRUPT",
    "IMAGE_MISSING", "IMAGE_PATH_REFUSED", "INVALID_FIELD", "INVALID_GRADE", "MALFORMED_JSON", "MALFORMED_QREL",
    "MISSING_FIELD", "NON_UTF8", "PAIR_SPLITS", "PRODUCT_SPLIT", "PRODUCTS_FILE", "Product", "ProductChunk",
    "QRELS_FILE", "QUERIES_FILE", "QUERY_SPLITS", "Query", "QueryRow", "REQUIRED_FILES", "SOURCE_QUERY_SPLITS",
    "SkipLog", "UNKNOWN_PRODUCT", "UNKNOWN_QUERY", "UNSPACED", "check_folder", "count_words", "iter_chunk_products",
    "load_image", "normalize_query", "parse_grade", "parse_product", "parse_query", "product_fields",
    "product_text", "render_attributes", "resolve_image_path", "scan_catalog", "to_rgb",
]
