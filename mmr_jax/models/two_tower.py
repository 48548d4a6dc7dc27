"""Two-tower retrieval model: text query tower vs multimodal product tower.

`TwoTower(config.model)` with `config.model.variant` in
  text_only   product = product text tower
  image_only  product = image tower (products without an image: learned "missing image" vector)
  concat      product = projection of [pooled text, pooled image] (naive multimodal baseline)
  fusion      product = gate * fused(text<->image cross-attention) + (1 - gate) * text
  fusion_qw   product = [fused, text, image] segments; the query weighs them (see embed_query)

Top-level submodules (names are the contract that stage 2 loading, freezing and per-tower
learning rates rely on): `query_tower`, `product_text_tower` (or one shared `text_tower` when
`share_text_towers`), `image_tower`, `fusion`, `heads/*` (projections to `embed_dim`, the
"missing image" vector, the fusion_qw segment weights) and `loss` (logit_scale, logit_bias).
Submodules are created lazily: init with `dummy_batch(config)` to get every parameter.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmr_jax import batch_spec
from mmr_jax.models import fusion as fusion_lib
from mmr_jax.models import layers
from mmr_jax.models import text as text_lib
from mmr_jax.models import vit as vit_lib

VARIANTS = ("text_only", "image_only", "concat", "fusion", "fusion_qw")
CONTRASTIVE = ("softmax", "sigmoid")
NUM_SEGMENTS = 3  # fusion_qw segments, in order: fused, text, image.


def get_config(variant: str = "fusion", size: str = "mu", *, patch_size: int = 16,
               vocab_size: int = 32_000, max_len: int = 64, embed_dim: int = 128,
               **overrides) -> ml_collections.ConfigDict:
  """Returns `config.model` for a variant and a tower size preset ("mu", "Ti", "S", "B", ...).

  Image and text towers share the size preset; override `vit`/`text`/`fusion` sub-configs
  (e.g. `cfg.vit = vit.get_config("B/16")`) for anything else.
  """
  txt = text_lib.get_config(size, vocab_size=vocab_size, max_len=max_len)
  cfg = ml_collections.ConfigDict(dict(
      variant=variant,
      embed_dim=embed_dim,
      share_text_towers=False,  # one `text_tower` for queries and products
      # >0: append a lexical segment of this size to query and product embeddings (LexicalSegment): a
      # hashed bag of the text's tokens with a learned weight per token, so exact term matches count
      # in the one inner product an ANN index serves. 0: the embeddings are the dense vectors alone.
      lexical_dim=0,
      vit=vit_lib.get_config(f"{size}/{patch_size}"),
      text=txt,
      fusion=fusion_lib.get_config(width=txt.width, num_heads=txt.num_heads),
      dtype="float32",          # compute dtype ("bfloat16" on TPU/GPU)
      param_dtype="float32",
      contrastive="softmax",    # sets the init of loss/logit_scale: "softmax" | "sigmoid"
      # The contrastive temperature's initial value (logit scale 1 / t; learnt from there): 0 takes the
      # loss's usual one (CLIP's 0.07 for softmax, SigLIP's 0.1 for sigmoid).
      temperature_init=0.0,
      # fusion / fusion_qw: the fused head also reads the image tower's pooled output (the vector stage 1 aligns
      # with titles, which concat's head reads) beside the fusion network's pooled text and image streams, so the
      # fused branch starts from what naive concatenation sees. False: the streams alone.
      fused_pooled_image=True,
      # A `heads/image_words` Dense from the pooled image to the vocabulary: embed_title_image also returns
      # "image_word_logits" (stage 1's image -> product words term; set from loss.image_words when a run starts).
      image_words=False,
      # >0 (needs lexical_dim > 0): the image's k most likely words (heads/image_words, which stage 1's image ->
      # title words term trains) join the product's lexical bag, word v as k * p(v | image) occurrences times a
      # learned scale (heads/image_expansion_scale, 1 at init): a product whose text omits what its photo shows
      # ("red", "striped") still matches the query's term, inside the one product vector.
      image_expansion_k=0,
      # >0 (needs lexical_dim > 0): each query token that no product uses joins the query's lexical bag with up to
      # k product tokens it stands for (QueryTranslation, top-level `query_translation`: a table [vocab, k] that the
      # trainer estimates from the labelled training pairs, data.query_translation; frozen): "gray" adds "grey",
      # "plaid" adds "checked", so a query in the shoppers' words matches the catalogue's.
      query_translation_k=0,
      # >0: the image -> words head (heads/image_words) also reads the image's colour histogram, bins^3 joint RGB
      # bins (`color_histogram`): colour is what shoppers' visual words name most, and a linear read of the
      # histogram gives the head colour evidence from its first steps, where a ViT trained from scratch learns it
      # slowly. 0: the pooled image alone.
      image_words_color_bins=0,
      # >0: the image -> words head also reads the image's texture (`texture_histogram`): its gradient energy per
      # orientation, over this many unsigned orientation bins, at two scales, over the whole image and its central
      # half: what patterns ("striped", "checked") show as, where a ViT trained from scratch at this budget learns
      # colour alone. 0: off.
      image_words_texture_bins=0,
      # How the image -> words head scores the vocabulary. "softmax": one distribution over it (stage 1 fits each
      # title's bag of words; p(v | image) is spread over every word of the title, frequent ones first).
      # "sigmoid": one independent probability per word (stage 1 fits "is v among the title's words", a
      # multi-label classifier): p(red | photo of a red dress) can reach 1 whatever else the title says, so an
      # image word counts as about p occurrences in the product's bag.
      image_words_activation="softmax",
  ))
  cfg.update(overrides)
  return cfg


def embedding_dim(config: ml_collections.ConfigDict) -> int:
  """Returns the size of the `emb` vectors (query and product) the model outputs."""
  dense = config.embed_dim * (NUM_SEGMENTS if config.variant == "fusion_qw" else 1)
  return dense + int(config.get("lexical_dim", 0))


def color_histogram(image: jax.Array, bins: int) -> jax.Array:
  """Returns each uint8 image's [B, H, W, 3] joint RGB histogram [B, bins^3]: the square roots of the fractions of
  its pixels per bin (the square root keeps a large background from drowning the rest), times sqrt(bins^3) so that
  the features' mean square is 1, as a layer-normed feature's is."""
  if image.dtype != jnp.uint8:
    raise TypeError(f"color_histogram expects uint8 images, got {image.dtype}")
  q = (image.astype(jnp.int32) * bins) // 256  # [B, H, W, 3] in [0, bins)
  idx = ((q[..., 0] * bins + q[..., 1]) * bins + q[..., 2]).reshape(image.shape[0], -1)  # [B, H * W]
  # A scatter-add, not a one-hot mean: memory [B, H * W] indices rather than [B, H * W, bins^3] floats (at 224 px
  # and 64 bins that would be 12.8 MB per image); the counts are exact integers either way.
  rows = jnp.arange(image.shape[0])[:, None]
  counts = jnp.zeros((image.shape[0], bins ** 3), jnp.float32).at[rows, idx].add(1.0) / idx.shape[1]
  return jnp.sqrt(counts) * math.sqrt(bins ** 3)


def texture_histogram(image: jax.Array, bins: int) -> jax.Array:
  """Returns each uint8 image's [B, H, W, 3] texture features [B, 4 * bins]: the gradient energy of its grey levels
  per unsigned orientation bin (bin k holds the orientations within half a bin of k * 180 / bins degrees), at full
  and half resolution, over the whole image and over its central half (where a product photo's object is, away from
  its background).

  Each feature is the square root of the mean gradient magnitude the bin receives per pixel (grey levels in [0, 1],
  forward differences), times sqrt(bins): a plain image gives zeros, stripes energy in one bin, checks in two at right
  angles, a busy print in all of them.
  """
  if image.dtype != jnp.uint8:
    raise TypeError(f"texture_histogram expects uint8 images, got {image.dtype}")
  if bins < 1:
    raise ValueError(f"texture_histogram: bins={bins} must be >= 1")
  x = jnp.mean(image.astype(jnp.float32), axis=-1) / 255.0  # [B, H, W]
  b, h, w = x.shape
  if min(h, w) < 8:
    raise ValueError(f"texture_histogram needs images of at least 8x8 pixels, got {h}x{w}")
  rows = jnp.arange(b)[:, None]
  feats = []
  for scale in (1, 2):
    if scale == 2:
      x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    # Forward differences (central ones miss stripes one pixel wide).
    gx = x[:, :-1, 1:] - x[:, :-1, :-1]  # [B, h - 1, w - 1]
    gy = x[:, 1:, :-1] - x[:, :-1, :-1]
    mag = jnp.sqrt(gx * gx + gy * gy)
    angle = jnp.mod(jnp.arctan2(gy, gx), math.pi)  # unsigned: a stripe's two edges count alike
    # Bins centred on the orientations: edges along the pixel grid (angle 0 or pi/2 exactly, the most common ones)
    # fall in the middle of a bin, not on a boundary where float rounding (XLA's atan2 against TensorFlow's, in the
    # exported tower) could move them to the next bin.
    idx = jnp.mod(jnp.floor(angle * (bins / math.pi) + 0.5).astype(jnp.int32), bins)
    gh, gw = mag.shape[1:]
    centre = (slice(None), slice(gh // 4, gh - gh // 4), slice(gw // 4, gw - gw // 4))
    for region in ((slice(None),) * 3, centre):
      m, k = mag[region].reshape(b, -1), idx[region].reshape(b, -1)
      energy = jnp.zeros((b, bins), jnp.float32).at[rows, k].add(m) / m.shape[1]
      feats.append(jnp.sqrt(energy) * math.sqrt(bins))
  return jnp.concatenate(feats, axis=-1)


_HASH_MULT = np.uint32(2654435761)  # Knuth's multiplicative hash (odd, so the map is a bijection of uint32)


class LexicalSegment(nn.Module):
  """Returns the lexical segment [B, dim] (unit norm, zeros for empty text) of token ids [B, L].

  A bag of the text's tokens: token t adds w_t * sign(t) to bucket(t), where w_t = softplus(a learned
  weight per token id, 1 at init) and, with dim >= vocab, bucket(t) = t and sign +1 (an exact bag of
  tokens); otherwise a fixed signed hash (the count-sketch trick). Queries and products share the
  weights, so <q_lex, p_lex> is a learned, length-normalised count of the terms they share - what
  keyword search ranks by - inside the same inner product as the dense towers. Dense and sparse
  scores in one vector follow Luan et al. 2021 (hybrid dense-sparse single-vector retrieval).
  """
  vocab_size: int
  dim: int

  def setup(self):
    self.token_weight = self.param(
        "token_weight", layers.logical(nn.initializers.constant(math.log(math.e - 1.0)), ("vocab",)),
        (self.vocab_size,), jnp.float32)

  def token_weights(self) -> jax.Array:
    """Returns w [V]: each token id's learned weight (what one occurrence adds to the bag before saturation)."""
    return jax.nn.softplus(self.token_weight)

  def __call__(self, tokens, extra_tokens=None, extra_values=None):
    """`extra_tokens` [B, K] ids with `extra_values` [B, K] >= 0: soft occurrences added to the bag (each counts
    `extra_values` times the token's learned weight), e.g. the words a product's image predicts."""
    tokens = jnp.asarray(tokens)
    mask = (tokens != text_lib.PAD_ID).astype(jnp.float32)  # [B, L]
    if extra_tokens is not None:
      tokens = jnp.concatenate([tokens, jnp.asarray(extra_tokens, tokens.dtype)], axis=-1)
      mask = jnp.concatenate([mask, jnp.asarray(extra_values, jnp.float32)], axis=-1)
    values = self.token_weights()[jnp.clip(tokens, 0, self.vocab_size - 1)] * mask  # [B, L (+ K)]
    if self.dim >= self.vocab_size:
      bucket = tokens
    else:
      h = tokens.astype(jnp.uint32) * _HASH_MULT
      bucket = (h % np.uint32(self.dim)).astype(jnp.int32)
      values = values * jnp.where((h >> 31) == 1, -1.0, 1.0)
    rows = jnp.arange(tokens.shape[0])[:, None]
    bag = jnp.zeros((tokens.shape[0], self.dim), jnp.float32).at[rows, bucket].add(values)  # [B, dim]
    # Repeats saturate (log(1 + count), as BM25's k1 does): a word said three times is not three matches.
    bag = jnp.sign(bag) * jnp.log1p(jnp.abs(bag))
    return layers.l2_normalize(bag)


def lexical_token_weights(idf: np.ndarray) -> np.ndarray:
  """Returns LexicalSegment's `token_weight` [V] (pre-softplus) that start the segment at BM25's term weights.

  A token's weight applies on both sides of the inner product, so w_t = sqrt(idf_t) makes a shared token add
  idf_t (times both sides' saturated counts) before normalisation: a rare word ("burgundy") starts far above a
  word in every product ("dress"), where the default init weighs every word alike and a few hundred steps at the
  usual learning rates move the weights only by tens of percent.
  """
  w = np.sqrt(np.maximum(np.asarray(idf, np.float64), 1e-4))
  return np.log(np.expm1(w)).astype(np.float32)  # softplus^-1


class LexicalMix(nn.Module):
  """Returns concat(sqrt(1 - a) dense, sqrt(a) lexical): inner products add (1 - a) dense + a lexical similarity.

  `a` = sigmoid(a learned logit, 0 at init): one weight shared by queries and products, so both sides of
  the inner product use the same mix and a unit dense and a unit lexical segment give a unit embedding.
  """

  @nn.compact
  def __call__(self, dense, lexical):
    a = jax.nn.sigmoid(self.param("mix_logit", layers.logical(nn.initializers.zeros, ()), (), jnp.float32))
    return jnp.concatenate([jnp.sqrt(1.0 - a) * dense.astype(jnp.float32), jnp.sqrt(a) * lexical], axis=-1)


# Parts of a trained model's embeddings (the product's, and the query's translations) that `without_part` switches
# off in its parameters, with no retraining (tools/components.py measures what each adds). What the rest of the
# model learnt alongside a part stays, so the drop without it is what the trained model leans on that part for, not
# what training without it would give.
PARTS = {
    "image_words": "the image's words in the product's lexical segment (model.image_expansion_k): scale 0",
    "query_translation": "the catalogue's words for the query's unmatched words (model.query_translation_k): none",
    "fused_branch": "the fusion network's fused embedding (variant fusion): gate 0, the dense product is its text's",
    "text_branch": "the text embedding beside the fused one (variant fusion): gate 1 for products with an image",
    "lexical": "the lexical segment (model.lexical_dim), queries' and products': mix 0, dense similarity only",
    "dense": "the dense segment beside the lexical one: mix 1, lexical similarity only",
}
_OFF = 1e4  # a logit or softplus input this far out is exactly 0 or 1 after sigmoid / softplus in float32


def embedding_parts(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """Returns the names of the `PARTS` that the model of `config` (config.model) has, in `PARTS` order."""
  has = {"image_words": bool(int(config.get("image_expansion_k", 0))) and config.variant != "text_only",
         "query_translation": bool(int(config.get("query_translation_k", 0))),
         "fused_branch": config.variant == "fusion", "text_branch": config.variant == "fusion",
         "lexical": bool(config.get("lexical_dim", 0)), "dense": bool(config.get("lexical_dim", 0))}
  return tuple(name for name in PARTS if has[name])


def without_part(params: Mapping[str, Any], config: ml_collections.ConfigDict, part: str) -> dict:
  """Returns a copy of trained `params` (of `TwoTower(config)`) in which `part` of the embeddings adds nothing
  (see `PARTS`); the inputs `params` are not changed."""
  if part not in embedding_parts(config):
    raise ValueError(f"part={part!r}: the {config.variant} model of this config has the parts "
                     f"{embedding_parts(config)} (of {tuple(PARTS)})")
  flat = traverse_util.flatten_dict(dict(params))
  settings = {"image_words": {("heads", "image_expansion_scale"): -_OFF},
              "query_translation": {("query_translation", "targets"): -1.0},
              "fused_branch": {("fusion", "gate_out", "kernel"): 0.0, ("fusion", "gate_out", "bias"): -_OFF},
              "text_branch": {("fusion", "gate_out", "kernel"): 0.0, ("fusion", "gate_out", "bias"): _OFF},
              "lexical": {("lexical_mix", "mix_logit"): -_OFF},
              "dense": {("lexical_mix", "mix_logit"): _OFF}}[part]
  for path, value in settings.items():
    if path not in flat:
      raise KeyError(f"{'/'.join(path)} is not among the parameters: are they of a {config.variant} model?")
    flat[path] = jnp.full_like(flat[path], value)
  return traverse_util.unflatten_dict(flat)


IMAGE_WORDS_ACTIVATIONS = ("softmax", "sigmoid")


def image_word_probs(logits, activation: str) -> jax.Array:
  """Returns p(word | image) [B, V] from the image -> words head's logits [B, V] (model.image_words_activation)."""
  if activation == "softmax":
    return jax.nn.softmax(logits, axis=-1)
  if activation == "sigmoid":
    return jax.nn.sigmoid(logits)
  raise ValueError(f"config.model.image_words_activation={activation!r}: expected one of {IMAGE_WORDS_ACTIVATIONS}")


def _top_words(logits, k: int, raw_scale, on=None, activation: str = "softmax") -> dict[str, jax.Array]:
  """Returns LexicalSegment's extra_tokens / extra_values [B, K] from word logits [B, V]: the K most likely words,
  word v counting c * (p(v) - p_K+1) times softplus(raw_scale) occurrences, where p_K+1 is the probability of the
  most likely word left out (0 for rows where `on` [B] is False), and c = K for a softmax head, 1 for a sigmoid one.

  Softmax: the K words share K occurrences in proportion to the head's confidence: a head sure of its words adds
  about one occurrence each, one that spreads its probability over the vocabulary adds next to nothing. Sigmoid:
  each word's own probability is what it adds. Measuring from the first word left out keeps the bag continuous in
  the logits: two words tied at the K-th place weigh 0 whichever is kept, so float rounding (the exported tower
  against JAX, another batch size) cannot swap a word in or out.
  """
  probs = image_word_probs(logits, activation)  # [B, V]
  # A stable sort, not lax.top_k (same words, ties to the lower id): top_k lowers to a StableHLO composite that
  # TensorFlow's XlaCallModule (the exported towers) cannot load.
  ids = jax.lax.broadcasted_iota(jnp.int32, probs.shape, 1)
  neg, ids = jax.lax.sort((-probs, ids), dimension=1, is_stable=True, num_keys=1)
  top = -neg[:, :k]
  if k < probs.shape[1]:
    top = top + neg[:, k:k + 1]
  values = top * ((k if activation == "softmax" else 1) * jax.nn.softplus(raw_scale))
  if on is not None:
    values = values * on.astype(jnp.float32)[:, None]
  return {"extra_tokens": ids[:, :k], "extra_values": values}


def _expansion_k(config: ml_collections.ConfigDict, key: str, what: str) -> int:
  """Returns config.<key>, the number of words an expansion adds to the lexical segment, after checking it."""
  k, dim = int(config.get(key, 0)), config.get("lexical_dim", 0)
  if k < 0 or (k and not dim):
    raise ValueError(f"config.model.{key}={k} adds {what} to the lexical segment: it must be >= 0, and > 0 needs "
                     f"config.model.lexical_dim > 0 (it is {dim})")
  if k > config.text.vocab_size:
    raise ValueError(f"config.model.{key}={k} > the vocabulary ({config.text.vocab_size})")
  return k


def dummy_batch(config: ml_collections.ConfigDict, *, batch_size: int = 2,
                image_size: int = 224, text_len: int | None = None) -> dict[str, np.ndarray]:
  """Returns a numpy batch with every input key, for `model.init` of all parameters.

  `image_size` must be the training image size: learned position embeddings are sized by it. Every
  text is `text_len` tokens (default: the text tower's max_len).
  """
  length = text_len or config.text.max_len
  lens = batch_spec.Lens(image_size=image_size, query_len=length, product_len=length, title_len=length,
                         positives_k=1)
  return batch_spec.model_init_batch(lens, batch_size)


class ContrastiveParams(nn.Module):
  """Holds the learnable contrastive temperature and bias (so the optimizer sees them)."""
  logit_scale_init: float
  logit_bias_init: float

  @nn.compact
  def __call__(self):
    """Returns {"logit_scale": (), "logit_bias": ()} float32 scalars."""
    scale = self.param("logit_scale",
                       layers.logical(nn.initializers.constant(self.logit_scale_init), ()),
                       (), jnp.float32)
    bias = self.param("logit_bias",
                      layers.logical(nn.initializers.constant(self.logit_bias_init), ()),
                      (), jnp.float32)
    return {"logit_scale": scale, "logit_bias": bias}


class Heads(nn.Module):
  """Projection heads to `embed_dim` (float32), the missing-image vector, segment weights and, with
  `vocab_size` > 0, the image -> words logits."""
  embed_dim: int
  image_width: int
  param_dtype: Any = jnp.float32
  vocab_size: int = 0
  image_expansion: bool = False
  # The image -> words bias at init: 0 for a softmax head; for a sigmoid one log(1 / vocab), so every word starts
  # unlikely (a title holds a few words of the vocabulary) rather than at p = 0.5.
  image_words_bias_init: float = 0.0

  def setup(self):
    def proj(in_axis):
      # No bias: the outputs are L2-normalised and compared by angle.
      return nn.Dense(self.embed_dim, use_bias=False, param_dtype=self.param_dtype,
                      kernel_init=layers.logical(nn.initializers.lecun_normal(),
                                                 (in_axis, None)))
    self.query = proj("embed")
    self.product_text = proj("embed")
    self.image = proj("embed")
    self.concat = proj(None)  # Input is [text width + image width].
    self.fused = proj(None)   # Input is [2 * fusion width].
    self.query_fused = proj("embed")
    self.query_text = proj("embed")
    self.query_image = proj("embed")
    # Zero init: every query starts with equal segment weights, i.e. the plain inner product
    # of the concatenated segments.
    self.segment_weights = nn.Dense(
        NUM_SEGMENTS, param_dtype=self.param_dtype,
        kernel_init=layers.logical(nn.initializers.zeros, ("embed", None)),
        bias_init=layers.logical(nn.initializers.zeros, (None,)))
    # Stands in for the pooled image of products without one (concat, image_only, fusion_qw).
    self.missing_image = self.param(
        "missing_image", layers.logical(nn.initializers.normal(stddev=0.02), ("embed",)),
        (self.image_width,), self.param_dtype)
    if self.vocab_size:
      self.image_words = nn.Dense(
          self.vocab_size, param_dtype=self.param_dtype,
          kernel_init=layers.logical(nn.initializers.lecun_normal(), ("embed", "vocab")),
          bias_init=layers.logical(nn.initializers.constant(self.image_words_bias_init), ("vocab",)))
    if self.image_expansion:
      # softplus(0.5413) = 1: at init the image's top word counts as one occurrence in the product's text.
      self.image_expansion_scale = self.param(
          "image_expansion_scale", layers.logical(nn.initializers.constant(math.log(math.e - 1.0)), ()),
          (), jnp.float32)


class QueryTranslation(nn.Module):
  """The catalogue's tokens for the query's: `targets` [vocab, k] holds, per token id, up to k token ids (-1: none)
  that each occurrence of it adds to the query's lexical bag as one more occurrence.

  The table is data, not learnt: the trainer fills it from the labelled training pairs
  (mmr_jax/data/query_translation.py) and optim.lr_mult.query_translation=0 keeps it. It is a parameter so that
  checkpoints, sharding and the exported query tower carry it like every other weight; the ids are stored as
  float32 (exact below 2^24) so the parameter tree stays differentiable, and no gradient reaches them.
  """
  vocab_size: int
  k: int

  def setup(self):
    self.targets = self.param("targets", layers.logical(nn.initializers.constant(-1.0), ("vocab", None)),
                              (self.vocab_size, self.k), jnp.float32)

  def __call__(self, tokens) -> dict[str, jax.Array]:
    """Returns LexicalSegment's extra_tokens / extra_values [B, L * k] for query token ids [B, L]."""
    tokens = jnp.asarray(tokens)
    found = jax.lax.stop_gradient(self.targets)[jnp.clip(tokens, 0, self.vocab_size - 1)]  # [B, L, k]
    on = (found >= 0) & (tokens != text_lib.PAD_ID)[..., None]
    b = tokens.shape[0]
    return {"extra_tokens": jnp.where(on, found, 0).astype(jnp.int32).reshape(b, -1),
            "extra_values": on.astype(jnp.float32).reshape(b, -1)}


class TwoTower(nn.Module):
  """Two-tower retrieval model configured by `config.model` (see `get_config`)."""
  config: ml_collections.ConfigDict

  def setup(self):
    cfg = self.config
    if cfg.variant not in VARIANTS:
      raise ValueError(f"config.model.variant={cfg.variant!r}; expected one of {VARIANTS}")
    if cfg.contrastive not in CONTRASTIVE:
      raise ValueError(f"config.model.contrastive={cfg.contrastive!r}; expected {CONTRASTIVE}")
    if cfg.embed_dim <= 0:
      raise ValueError(f"config.model.embed_dim must be > 0, got {cfg.embed_dim}")
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    if cfg.share_text_towers:
      self.text_tower = text_lib.from_config(cfg.text, **kw)
    else:
      self.query_tower = text_lib.from_config(cfg.text, **kw)
      self.product_text_tower = text_lib.from_config(cfg.text, **kw)
    self.image_tower = vit_lib.from_config(cfg.vit, **kw)
    self.fusion = fusion_lib.from_config(cfg.fusion, gate=cfg.variant == "fusion", **kw)
    expansion_k = _expansion_k(cfg, "image_expansion_k", "image words")
    expands = bool(expansion_k) and cfg.variant != "text_only"  # text_only never sees the image
    # Configs saved before the option existed read as the softmax head they trained.
    activation = self.words_activation = cfg.get("image_words_activation", "softmax")
    if activation not in IMAGE_WORDS_ACTIVATIONS:
      raise ValueError(f"config.model.image_words_activation={activation!r}: expected one of {IMAGE_WORDS_ACTIVATIONS}")
    self.heads = Heads(cfg.embed_dim, cfg.vit.get("head_dim") or cfg.vit.width,
                       param_dtype=kw["param_dtype"],
                       vocab_size=cfg.text.vocab_size if cfg.get("image_words") or expands else 0,
                       image_expansion=expands,
                       image_words_bias_init=-math.log(cfg.text.vocab_size) if activation == "sigmoid" else 0.0)
    for key in ("image_words_color_bins", "image_words_texture_bins"):
      if int(cfg.get(key, 0)) < 0:
        raise ValueError(f"config.model.{key}={cfg[key]} must be >= 0")
    translation_k = _expansion_k(cfg, "query_translation_k", "the catalogue's words for the query's")
    if translation_k and cfg.text.vocab_size > 2 ** 24:
      raise ValueError(f"config.model.query_translation_k={translation_k} stores token ids as float32, exact up to "
                       f"2^24; the vocabulary has {cfg.text.vocab_size}")
    if translation_k:
      self.query_translation = QueryTranslation(cfg.text.vocab_size, translation_k)
    # CLIP's 1/0.07 for softmax; SigLIP's t' = log 10, b = -10 for sigmoid (the bias makes
    # the many negatives start near p = 0, the imbalance SigLIP's paper discusses).
    t = float(cfg.get("temperature_init", 0.0)) or (0.07 if cfg.contrastive == "softmax" else 0.1)
    if t <= 0:
      raise ValueError(f"config.model.temperature_init={t} must be > 0 (or 0 for the loss's default)")
    scale_init = math.log(1 / t)
    self.loss = ContrastiveParams(scale_init, -10.0)
    if cfg.get("lexical_dim", 0):
      if cfg.variant in ("image_only", "fusion_qw"):
        raise ValueError(f"config.model.lexical_dim={cfg.lexical_dim} needs a product text tower and one query "
                         f"segment; variant {cfg.variant!r} has {'no text' if cfg.variant == 'image_only' else 'three'}")
      self.lexical = LexicalSegment(cfg.text.vocab_size, int(cfg.lexical_dim))
      self.lexical_mix = LexicalMix()

  def _query_encoder(self):
    return self.text_tower if self.config.share_text_towers else self.query_tower

  def _product_encoder(self):
    return self.text_tower if self.config.share_text_towers else self.product_text_tower

  def _image(self, image, has_image, train):
    """Returns (pooled image [B, Wi] f32, missing-image rows replaced; patch tokens [B, N, Wi])."""
    if image is None or has_image is None:
      raise ValueError(f"variant {self.config.variant!r} needs `image` and `has_image`")
    pooled, tokens = self.image_tower(image, train=train)
    has_image = jnp.asarray(has_image).astype(bool)
    if has_image.shape != pooled.shape[:1]:
      raise ValueError(f"has_image shape {has_image.shape} != batch {pooled.shape[:1]}")
    pooled = jnp.where(has_image[:, None], pooled.astype(jnp.float32),
                       self.heads.missing_image.astype(jnp.float32)[None, :])
    return pooled, tokens

  def logit_params(self) -> dict[str, jax.Array]:
    """Returns {"logit_scale", "logit_bias"} scalars (log-scale; the losses exponentiate)."""
    return self.loss()

  def embed_query(self, query_tokens, train=False) -> dict[str, jax.Array]:
    """Returns {"emb": [B, D'] unit norm, "segment_weights": [B, 3] (fusion_qw only)}; with a lexical segment
    also "dense_emb" [B, D].

    fusion_qw: three unit segments q_k (fused, text, image) and softmax weights w(q); the
    query emb is concat_k(w_k q_k) / ||w||_2, so for a product emb p = concat_k(p_k) / sqrt(3)
        <q, p> = sum_k w_k(q) <q_k, p_k> / (sqrt(3) ||w(q)||_2),
    the weighted per-segment score as ONE inner product (an ANN index serves it). The query
    emb has unit norm, so <q, p> lies in [-1, 1] like every other variant; the per-query factor
    1 / (sqrt(3) ||w||) (between 1/sqrt(3) and 1) does not change a query's ranking but does
    rescale its logits, which the learned temperature absorbs.
    """
    pooled, _, _ = self._query_encoder()(query_tokens, train=train)
    pooled = pooled.astype(jnp.float32)
    h = self.heads
    if self.config.variant != "fusion_qw":
      dense = layers.l2_normalize(h.query(pooled))
      if not self.config.get("lexical_dim", 0):
        return {"emb": dense}
      translation = self.query_translation(query_tokens) if self.config.get("query_translation_k", 0) else {}
      return {"dense_emb": dense, "emb": self.lexical_mix(dense, self.lexical(query_tokens, **translation))}
    segments = [layers.l2_normalize(p(pooled))
                for p in (h.query_fused, h.query_text, h.query_image)]
    w = jax.nn.softmax(h.segment_weights(pooled), axis=-1)  # [B, 3]
    emb = jnp.concatenate([w[:, k:k + 1] * s for k, s in enumerate(segments)], axis=-1)
    emb = emb / jnp.linalg.norm(w, axis=-1, keepdims=True)
    return {"emb": emb, "segment_weights": w}

  def embed_product(self, product_tokens, image, has_image, train=False) -> dict[str, jax.Array]:
    """Returns {"emb": [B, D'], "text_emb": [B, D], "image_emb": [B, D], "gate": [B]}.

    "text_emb" is absent for image_only and "image_emb" for text_only (their towers are not
    run); "gate" (the weight of the fused representation) only for fusion; "fused_emb" for
    fusion and fusion_qw. `image`/`has_image` may be None for text_only.
    """
    variant = self.config.variant
    h = self.heads
    out = {}
    if variant != "image_only":
      t_pooled, t_tokens, t_mask = self._product_encoder()(product_tokens, train=train)
      t_pooled = t_pooled.astype(jnp.float32)
      out["text_emb"] = layers.l2_normalize(h.product_text(t_pooled))
    if variant != "text_only":
      i_pooled, i_tokens = self._image(image, has_image, train)
      out["image_emb"] = layers.l2_normalize(h.image(i_pooled))

    if variant == "text_only":
      out["emb"] = out["text_emb"]
    elif variant == "image_only":
      out["emb"] = out["image_emb"]
    elif variant == "concat":
      out["emb"] = layers.l2_normalize(h.concat(jnp.concatenate([t_pooled, i_pooled], -1)))
    else:
      f = self.fusion(t_tokens, t_mask, i_tokens, jnp.asarray(has_image).astype(bool),
                      train=train)
      streams = [f["text"], f["image"]] + ([i_pooled] if self.config.get("fused_pooled_image") else [])
      fused = layers.l2_normalize(h.fused(jnp.concatenate(streams, -1)))
      out["fused_emb"] = fused
      if variant == "fusion":
        g = f["gate"][:, None]
        out["emb"] = layers.l2_normalize(g * fused + (1.0 - g) * out["text_emb"])
        out["gate"] = f["gate"]
      else:
        out["emb"] = jnp.concatenate(
            [fused, out["text_emb"], out["image_emb"]], -1) / math.sqrt(NUM_SEGMENTS)
    if self.config.get("lexical_dim", 0):
      out["dense_emb"] = out["emb"]
      extra = self._image_words(i_pooled, image, has_image) if self.heads.image_expansion else {}
      out["emb"] = self.lexical_mix(out["emb"], self.lexical(product_tokens, **extra))
    out["emb"] = nn.with_logical_constraint(out["emb"], ("batch", None))
    return out

  def _word_logits(self, i_pooled, image) -> jax.Array:
    """Returns the image -> words logits [B, V] float32 from the pooled image (and its colour and texture
    histograms)."""
    feats = [i_pooled.astype(jnp.float32)]
    if bins := int(self.config.get("image_words_color_bins", 0)):
      feats.append(color_histogram(jnp.asarray(image), bins))
    if bins := int(self.config.get("image_words_texture_bins", 0)):
      feats.append(texture_histogram(jnp.asarray(image), bins))
    feats = jnp.concatenate(feats, axis=-1)
    return self.heads.image_words(feats).astype(jnp.float32)

  def _image_words(self, i_pooled, image, has_image) -> dict[str, jax.Array]:
    """Returns the lexical segment's extra_tokens / extra_values [B, K]: the image's K most likely words (see
    `_top_words`; none for products without an image)."""
    return _top_words(self._word_logits(i_pooled, image), int(self.config.image_expansion_k),
                      self.heads.image_expansion_scale, jnp.asarray(has_image), self.words_activation)

  def embed_text_product(self, product_tokens, train=False) -> dict[str, jax.Array]:
    """Returns {"emb": [B, D']}: the product embedding from its text alone (the text_only variant's),
    comparable with `embed_query`'s (stage 1's text-side alignment)."""
    if self.config.variant == "fusion_qw":
      raise ValueError("embed_text_product: fusion_qw queries have three segments; use another variant")
    pooled, _, _ = self._product_encoder()(product_tokens, train=train)
    emb = layers.l2_normalize(self.heads.product_text(pooled.astype(jnp.float32)))
    if self.config.get("lexical_dim", 0):
      emb = self.lexical_mix(emb, self.lexical(product_tokens))
    return {"emb": emb}

  def embed_title_image(self, title_tokens, image, has_image, train=False):
    """Returns {"title_emb": [B, D], "image_emb": [B, D]} for stage-1 title<->image alignment.

    Titles go through the product text tower and head, so stage 2 inherits the alignment. With
    `config.image_words`, also "image_word_logits" [B, vocab] (float32): which words the image predicts.
    """
    t_pooled, _, _ = self._product_encoder()(title_tokens, train=train)
    i_pooled, _ = self._image(image, has_image, train)
    out = {"title_emb": layers.l2_normalize(self.heads.product_text(t_pooled)),
           "image_emb": layers.l2_normalize(self.heads.image(i_pooled))}
    if self.config.get("image_words"):
      out["image_word_logits"] = self._word_logits(i_pooled, image)
    return out

  def __call__(self, batch: Mapping[str, Any], train=False) -> dict[str, Any]:
    """Returns {"query": ..., "product": ..., "title_image": ..., "logit_scale", "logit_bias"}.

    Each part is computed when its inputs are in `batch`; `dummy_batch(config)` has them all.
    """
    out: dict[str, Any] = {}
    if "query_tokens" in batch:
      out["query"] = self.embed_query(batch["query_tokens"], train=train)
    if "product_tokens" in batch:
      out["product"] = self.embed_product(batch["product_tokens"], batch.get("image"),
                                          batch.get("has_image"), train=train)
    if "title_tokens" in batch and "image" in batch:
      out["title_image"] = self.embed_title_image(batch["title_tokens"], batch["image"],
                                                  batch.get("has_image"), train=train)
    out.update(self.logit_params())
    return out
