"""The query and product towers as tf.Modules: raw strings and image bytes in, embeddings out.

  query tower    serving_default(queries [B] string) -> {"embedding" float32 [B, D]}
                 tokenize(queries) -> {"query_tokens" int32 [B, query_len]}
                 embed_tokens(query_tokens) -> {"embedding"}
  product tower  serving_default(title, description, attributes, image [B] string)
                   -> {"embedding" float32 [B, D], "has_image" bool [B]}
                 preprocess(same inputs) -> {"product_tokens", "image" uint8 [B, S, S, 3], "has_image"}
                 embed_preprocessed(product_tokens, image, has_image) -> {"embedding"}

Embeddings are L2-normalised, D = `two_tower.embedding_dim(config.model)`. The preprocessing in the
graph is preprocess.py's; the model is convert.py's jax2tf function, run as one XLA cluster.

XLA compiles that cluster once per input shape, a stall for the request that brings a new shape and one
more executable kept in memory, so a request's batch is padded with zero rows to the next of
`batch_buckets` (default BATCH_BUCKETS: 1, 2, 4, ..., 1024; beyond the last, a multiple of it) and the
padding rows are dropped from the output: batches up to the last bucket compile at most once per bucket
(larger ones once per multiple), and batch sizes that are buckets run unpadded. Rows are independent in
the towers, so padding changes nothing in the real rows.

Bad input: an empty batch returns empty outputs; an undecodable image gives has_image=False; an
over-long string is tokenised whole and truncated like training; inputs of the wrong dtype or product
fields with different batch sizes are rejected with an error naming the inputs. Signature shapes are
not enforced by TF when a function is called: a scalar string is served as a batch of one. An empty or
whitespace-only text has no tokens and, as in JAX, embeds to the zero vector.
"""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
import tensorflow as tf

from mmr_jax.data import sources
from mmr_jax.export import convert
from mmr_jax.export import preprocess as prep
from mmr_jax.models import two_tower

# Batch sizes the towers' XLA programs are compiled for: a request's batch is padded up to the next one
# (above the last, to a multiple of it); see _run_bucketed.
BATCH_BUCKETS = tuple(2 ** i for i in range(11))  # 1, 2, 4, ..., 1024
MAX_BATCH_BUCKET = 1 << 20  # bucket sizes are int32 in the graph; a bound far below that keeps sums exact


def check_batch_buckets(buckets) -> tuple[int, ...]:
  """Returns `buckets` (ints, or strings of ints) as a tuple of ints; ValueError unless they increase
  from >= 1 to <= MAX_BATCH_BUCKET."""
  msg = f"batch_buckets must be integers in increasing order from 1 to {MAX_BATCH_BUCKET}, got {buckets!r}"
  out = []
  for b in buckets:
    if isinstance(b, str) and b.strip().isdigit():
      b = int(b)
    if not isinstance(b, (int, np.integer)) or isinstance(b, bool):
      raise ValueError(msg)
    out.append(int(b))
  if not out or out[0] < 1 or out[-1] > MAX_BATCH_BUCKET or any(a >= b for a, b in zip(out, out[1:])):
    raise ValueError(msg)
  return tuple(out)


def batch_bucket(n: int, buckets: Sequence[int] = BATCH_BUCKETS) -> int:
  """Returns the batch size a request of n rows is padded to: the smallest of `buckets` that is
  >= max(n, 1); above the largest, the next multiple of it. `tf_batch_bucket` in TF ops."""
  last = buckets[-1]
  return next((b for b in buckets if b >= max(n, 1)), -(-n // last) * last)


def tf_batch_bucket(n, buckets: Sequence[int] = BATCH_BUCKETS):
  """Returns `batch_bucket(n, buckets)` for an int32 scalar tensor n, in TF ops."""
  table = tf.constant(buckets, tf.int32)
  last = buckets[-1]
  i = tf.minimum(tf.searchsorted(table, tf.reshape(n, [1]))[0], len(buckets) - 1)
  return tf.where(n > last, (n + last - 1) // last * last, tf.gather(table, i))


def _run_bucketed(fn, buckets: Sequence[int], *inputs):
  """Returns fn(*inputs) (one output), with the batch padded to `tf_batch_bucket` rows and sliced back.

  `fn` is a jit-compiled function, compiled once per input shape; padding to the buckets bounds the
  shapes up to the last bucket (module doc). It also gives an empty batch one row: jax2tf's shape
  polymorphism assumes dimensions >= 1.
  """
  n = tf.shape(inputs[0])[0]
  rows = tf_batch_bucket(n, buckets)
  padded = [tf.pad(x, [[0, rows - n]] + [[0, 0]] * (x.shape.rank - 1)) for x in inputs]
  return fn(*padded)[:n]


def _check_same_batch(**tensors):
  """Returns assertions that every named [B] input has the same B (error names the fields)."""
  names = list(tensors)
  first = names[0]
  return [tf.debugging.assert_equal(tf.shape(tensors[n])[0], tf.shape(tensors[first])[0],
                                    message=f"inputs {first} and {n} must have the same batch size")
          for n in names[1:]]


class _Tower(tf.Module):
  """What both towers hold: the converted model's parameters, a tokenizer, the bucketed model call."""

  def __init__(self, name: str, tm, conv: convert.Converted, tokenizer_path: str, text_len: int,
               buckets: Sequence[int]):
    super().__init__(name=name)
    self.params = conv.variables
    self.param_layout = tf.Variable(json.dumps(conv.layout), trainable=False)
    self.tokenizer = prep.tf_tokenizer(tokenizer_path, text_len,
                                             sources.tokenizer_conventions(tm.config.data))
    self.dim = two_tower.embedding_dim(tm.config.model)
    self._fn, self._buckets = conv.fn, tuple(buckets)

  @tf.function(jit_compile=True, autograph=False)
  def _model(self, *inputs):
    # One XLA cluster per input shape, the variables read inside it: less overhead per call on CPU than
    # the bare XlaCallModule op fed by ReadVariableOps (XLA's on-demand path).
    emb = self._fn(self.params, *inputs)
    emb.set_shape([None, self.dim])  # static only: no EnsureShape op per request
    return emb

  def _embed(self, *inputs):
    return _run_bucketed(self._model, self._buckets, *inputs)


def make_query_tower(tm, tokenizer_path: str, platforms: Sequence[str], buckets: Sequence[int] = BATCH_BUCKETS):
  """Returns a tf.Module: raw query strings -> L2-normalised embeddings (see module doc)."""
  q_len = int(tm.config.data.query_len)
  conv = convert.convert_method(tm.model, tm.params, "embed_query", [np.ones((1, q_len), np.int32)],
                                ["(b, _)"], platforms)
  queries_spec = [tf.TensorSpec([None], tf.string, name="queries")]

  class QueryTower(_Tower):
    """Query tower: SentencePiece in the graph, then the converted JAX query encoder."""

    def __init__(self):
      super().__init__("query_tower", tm, conv, tokenizer_path, q_len, buckets)
      self.query_len = q_len

    def embed_ids(self, tokens):
      return self._embed(tokens)

    def embed(self, queries):
      return self.embed_ids(self.tokenizer(prep.tf_sanitize_utf8(queries)))

    @tf.function(input_signature=queries_spec, autograph=False)
    def serve(self, queries):
      return {"embedding": self.embed(queries)}

    @tf.function(input_signature=queries_spec, autograph=False)
    def tokenize(self, queries):
      return {"query_tokens": self.tokenizer(prep.tf_sanitize_utf8(queries))}

    @tf.function(input_signature=[tf.TensorSpec([None, q_len], tf.int32, name="query_tokens")],
                 autograph=False)
    def embed_tokens(self, query_tokens):
      return {"embedding": self.embed_ids(query_tokens)}

  return QueryTower()


def make_product_tower(tm, tokenizer_path: str, platforms: Sequence[str],
                       buckets: Sequence[int] = BATCH_BUCKETS):
  """Returns a tf.Module: product fields + image bytes -> product embeddings (see module doc)."""
  p_len, size = int(tm.config.data.product_len), int(tm.config.data.image_size)
  examples = [np.ones((1, p_len), np.int32), np.zeros((1, size, size, 3), np.uint8), np.ones((1,), bool)]
  conv = convert.convert_method(tm.model, tm.params, "embed_product", examples,
                                ["(b, _)", "(b, _, _, _)", "(b,)"], platforms)
  v_first = prep.pillow_vertical_first()
  raw_sig = [tf.TensorSpec([None], tf.string, name=name) for name in ("title", "description", "attributes", "image")]

  class ProductTower(_Tower):
    """Product tower: text assembly, SentencePiece and Pillow-exact image decoding in the graph."""

    def __init__(self):
      super().__init__("product_tower", tm, conv, tokenizer_path, p_len, buckets)
      self.product_len, self.image_size = p_len, size

    def _preprocess(self, title, description, attributes, image):
      with tf.control_dependencies(_check_same_batch(title=title, description=description,
                                                     attributes=attributes, image=image)):
        fields = prep.tf_product_fields(*(prep.tf_sanitize_utf8(t) for t in (title, description, attributes)))
        tokens = self.tokenizer.encode_fields(fields)  # a text over product_len is cut per field
        pixels, has_image = prep.tf_decode_images(image, size, v_first)
      return tokens, pixels, has_image

    @tf.function(input_signature=raw_sig, autograph=False)
    def serve(self, title, description, attributes, image):
      tokens, pixels, has_image = self._preprocess(title, description, attributes, image)
      return {"embedding": self._embed(tokens, pixels, has_image), "has_image": has_image}

    @tf.function(input_signature=raw_sig, autograph=False)
    def preprocess(self, title, description, attributes, image):
      tokens, pixels, has_image = self._preprocess(title, description, attributes, image)
      return {"product_tokens": tokens, "image": pixels, "has_image": has_image}

    @tf.function(input_signature=[tf.TensorSpec([None, p_len], tf.int32, name="product_tokens"),
                                  tf.TensorSpec([None, size, size, 3], tf.uint8, name="image"),
                                  tf.TensorSpec([None], tf.bool, name="has_image")], autograph=False)
    def embed_preprocessed(self, product_tokens, image, has_image):
      with tf.control_dependencies(_check_same_batch(product_tokens=product_tokens, image=image,
                                                     has_image=has_image)):
        return {"embedding": self._embed(tf.identity(product_tokens), image, has_image)}

  return ProductTower()
