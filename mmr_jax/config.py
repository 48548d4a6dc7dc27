"""Base configuration shared by every experiment family in `configs/`.

A config file in `configs/` calls `base_config()` and changes what its experiment needs, so every
key a user can override with `--config.key=value` exists here, with its default and meaning. Unknown
keys are rejected by ml_collections (the ConfigDict is locked by `config_flags`).
"""

from __future__ import annotations

import ast

import ml_collections

from mmr_jax.models import fusion as fusion_lib
from mmr_jax.models import text as text_lib
from mmr_jax.models import two_tower
from mmr_jax.models import vit as vit_lib

ConfigDict = ml_collections.ConfigDict


def parse_value(name: str, value: str, default):
  """Returns the command-line string `value` typed like `default` (bool, int, float, tuple or str).

  `name` is what an error calls the value ("config argument steps", "override optim.lr").
  """
  try:
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError("not a bool (true/false/1/0)")
      return value.lower() in ("true", "1")
    if isinstance(default, int):
      return int(float(value)) if "e" in value.lower() and float(value).is_integer() else int(value)
    if isinstance(default, float):
      return float(value)
    if isinstance(default, (tuple, list)):
      return tuple(ast.literal_eval(value)) if value.startswith(("(", "[")) else tuple(
          v for v in value.split("+") if v)
  except (ValueError, SyntaxError) as e:
    raise ValueError(f"{name}={value!r}: {e}") from None
  return value


def parse_arg(arg: str | None, **defaults) -> ConfigDict:
  """Returns `defaults` updated from a "k=v,k2=v2" string, values typed like their defaults.

  Unknown keys raise with the key's name; a value that does not parse as the default's type raises too.
  """
  out = ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(","):
    if not item.strip():
      continue
    if "=" not in item:
      raise ValueError(f"config argument {item!r} is not key=value (in {arg!r})")
    key, value = (s.strip() for s in item.split("=", 1))
    if key not in defaults:
      raise KeyError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    out[key] = parse_value(f"config argument {key}", value, defaults[key])
  return out


def base_config() -> ConfigDict:
  """Returns the full default config: a tiny CPU-sized stage-2 fusion run."""
  c = ConfigDict()
  c.seed = 0
  c.stage = 2  # 1: image<->title domain alignment; 2: query<->product alignment.

  c.data = ConfigDict(dict(
      dir="data/synthetic",  # DATA_DIR written by make_synthetic / import_catalog.
      batch_size=64,  # global batch (all hosts).
      image_size=32,
      query_len=16,
      # Title | description | attributes; a longer text is cut per field, the longest first, so a long description
      # does not push out the attributes (material, care, size): Tokenizer.encode_fields. Training logs how many
      # products this cuts, by field (product_truncation.json in the workdir).
      product_len=96,
      title_len=16,
      num_workers=0,  # grain worker processes per host (0: in-process).
      read_threads=8,  # grain read threads per process (per worker with num_workers > 0).
      # Examples grain reads ahead per process while training (eval reads ahead 2 batches per thread).
      prefetch_buffer_size=256,
      # Sampling order seed; None: derived from the run's seed. Setting it changes the order only, not the
      # augmentation noise (which follows `seed`).
      shuffle_seed=ml_collections.config_dict.placeholder(int),
      # Where the training stream starts, in global batches: N skips the first N, so a run that continues
      # another's training on the same stream sees the batches that run did not (stage 2 after a stage 1 over
      # its pairs, data.stage1_source="pairs": without it, stage 2 replays stage 1's first batches, pseudo-queries
      # and augmentation noise included). -1: after init.workdir's last checkpoint (its step plus that run's own
      # offset) when that run read this pairs stream (stage 2, or stage 1 over pairs, with the same seed,
      # shuffle_seed and batch size), else 0 (train.resolve_stream_offset).
      stream_offset=-1,
      positives_k=8,
      # Fraction of stage-2 training examples replaced by pseudo-queries sampled from a random product's own
      # title words and attribute values (mmr_jax/data/pseudo_queries.py): lexical supervision for every
      # product, beyond the labelled pairs. 0 trains on the labelled pairs only.
      pseudo_queries=0.0,
      # Stage 1: also align pseudo-queries with their product's text (the text towers learn the catalogue's
      # vocabulary without query logs); stage-2 runs take those towers with init.load.
      stage1_pseudo_queries=False,
      # What stage 1 iterates over. "products": every product that is not held out, once per epoch (image <->
      # title; with stage1_pseudo_queries also pseudo-query <-> product text). "pairs": stage 2's stream (the
      # labelled pairs, pseudo_queries of them replaced by pseudo-queries): image <-> title over each batch's
      # products and query <-> product text, so a stage-1 run's text towers learn what a text-only stage 2
      # teaches while its image tower aligns (stage1_pseudo_queries is then moot).
      stage1_source="products",
      # Hard in-batch negatives (mmr_jax/data/hard_negatives.py): training batches of stage 2's stream come
      # in groups of 1 + hard_negatives examples, an example and pseudo-queries of that many other products
      # (drawn from the hard_negative_pool nearest to its product), so every query meets products close to
      # its own as negatives. 0: random batches. The per-host batch must be a multiple of the group.
      hard_negatives=0,
      hard_negative_pool=16,
      # With hard_negatives: a labelled pair's group takes its query's I-labelled products (judged irrelevant:
      # the pairs table's `negatives`) before products of the pool.
      labelled_negatives=False,
      # The pool: "" mines it with BM25 (products sharing words). A path to a trained run's product embeddings
      # (.npy [num_products, D]; `python -m mmr_jax.evaluate --workdir RUN --products_only` writes
      # RUN/catalogue_embeddings.npy): each product's nearest products by that model (model-mined negatives).
      hard_negative_embeddings="",
      # Stage 1: leave out products without an image, so every batch row is an image<->title pair. False
      # keeps them (has_image=False: zero weight in that loss, still in the pseudo-query term).
      stage1_skip_no_image=False,
      # The table of model.query_translation_k (mmr_jax/data/query_translation.py), fitted when a run starts: a query
      # token that no product uses, in min_queries or more training queries, is translated to the product tokens
      # found in min_prob of those queries' best-graded products and min_lift times commoner there than overall.
      query_translation=ConfigDict(dict(min_prob=0.3, min_lift=3.0, min_queries=2)),
      augment=ConfigDict(dict(random_crop=True, crop_scale_min=0.6, flip=True)),
      # The SentencePiece model every text goes through (pipeline, evaluation, exported graphs):
      # path "" is DATA_DIR/tokenizer.model; a pretrained two-tower needs the .model it was trained
      # with, and its conventions (mmr_jax.data.tokenizer.Conventions; set_siglip sets SigLIP's).
      tokenizer=ConfigDict(dict(path="", eos="none", pad_id=0, bos=False, lower=False)),
  ))

  # Model sizes come from the model package's presets; see mmr_jax/models/two_tower.get_config.
  c.model = two_tower.get_config("fusion", "mu", patch_size=8, vocab_size=-1, max_len=96, embed_dim=64)
  c.model.name = "two_tower"  # key of mmr_jax.models.MODELS
  # contrastive (the logit-param init) is set from loss.kind when the run starts.

  c.loss = ConfigDict(dict(
      kind="softmax",  # softmax (CLIP InfoNCE) | sigmoid (SigLIP)
      aux_query_image=0.0,  # stage 2: weight of query<->image-only term
      aux_query_text=0.0,  # stage 2: weight of query<->text-only term
      # stage 2: weight of query<->fused-only term (fusion, fusion_qw): trains the fused branch directly, which
      # a gate that closes early (the text branch starts ahead) would otherwise leave without gradient.
      aux_query_fused=0.0,
      grade_weighted=False,  # weight positives by their ESCI gain
      # Stage 1: weight of the image -> words term: from its image, predict the words of each product's title
      # (against the bag of its tokens, as model.image_words_activation scores it; objectives.words_loss). A
      # direct signal for the image tower (colours, patterns, categories the title names) while image <-> title
      # is still weak; the head (model.image_words) exists only in stage-1 runs with a weight > 0.
      image_words=0.0,
      # Stage 1: the image <-> title term trains the image side only (stop-gradient on the title embedding), so
      # the image tower aligns into the text space that the query <-> product-text term trains, and the text
      # towers learn from the queries alone (LiT's locked tower, the other way round). Titles stay in the batch.
      stage1_lock_text=False,
      # Stage 1: weight of the query <-> product-text term (when the stage-1 stream carries queries), against the
      # image terms' 1.0: the stage-1 rows start from the text towers this term trains (with image <-> title
      # through the titles, unless stage1_lock_text), so it sets how far along their text side is.
      stage1_text=1.0,
      chunk_size=0,  # >0: compute logits in row blocks of this size (bounded memory)
      # Global-batch loss over the mesh's data-parallel axes (mmr_jax/training/sharded_loss.py): auto (ring
      # when there is more than one data-parallel shard) | ring | gather | none (one device's logits).
      sharded="auto",
  ))

  c.optim = ConfigDict(dict(
      lr=1e-3,
      warmup_steps=20,
      min_lr_ratio=0.0,
      weight_decay=1e-4,
      b1=0.9,
      b2=0.999,
      grad_clip=1.0,
      grad_accum=1,  # micro-batches per step (each micro-batch has its own in-batch negatives)
      # Per-tower learning-rate multipliers, by top-level parameter name; 0.0 freezes the tower.
      lr_mult=ConfigDict(dict(image_tower=1.0, query_tower=1.0, product_text_tower=1.0, text_tower=1.0,
                              fusion=1.0, heads=1.0, loss=1.0, lexical=1.0, lexical_mix=1.0,
                              query_translation=0.0)),
      # Extra multiplier, per top-level parameter name (like lr_mult), for a tower this run initialises from
      # init.workdir (init.load), init.vit_npz (image_tower) or init.two_tower_npz (the image and text towers, loss):
      # weights that already learnt can move slowly while the same tower trained from scratch in another run gets
      # the full rate. Unlisted: 1.
      init_lr_mult=ConfigDict(dict(image_tower=1.0)),
  ))

  c.init = ConfigDict(dict(
      workdir="",  # stage 2: stage-1 workdir to initialise from (latest checkpoint)
      load=("image_tower",),  # top-level parameter subtrees taken from init.workdir
      vit_npz="",  # big_vision-layout ViT .npz on a local path, loaded into image_tower
      # big_vision SigLIP / LiT two-tower .npz on a local path: img -> image_tower, txt -> both text
      # towers, t / b -> loss/logit_scale / logit_bias (big_vision_npz.load_two_tower_npz_into).
      # Loaded first; init.workdir and init.vit_npz then overwrite what they name.
      two_tower_npz="",
      # Start the lexical segment's token weights (model.lexical_dim > 0) at the catalogue's BM25 idf
      # (data.pipeline.token_idf over the non-held-out products) instead of 1: rare words weigh more from step 0.
      # Before init.workdir, so a stage-1 `lexical` in init.load replaces it.
      lexical_idf=False,
  ))

  c.train = ConfigDict(dict(
      steps=200,
      log_every=10,
      eval_every=100,  # validation (in-batch accuracy + loss, and retrieval metrics); 0 disables
      eval_batches=4,
      # Stage 2: every validation also embeds the catalogue and scores the validation queries over all of it
      # (val/recall@K, val/ndcg@10, val/mrr by exact search), so quality is seen while training.
      eval_retrieval=True,
      ckpt_every=100,
      keep=2,  # latest checkpoints kept
      keep_best=1,  # best checkpoints by best_metric kept besides
      # auto: val/ndcg@10 when retrieval is evaluated, else the objective's validation loss; a named metric
      # must be one the run logs (checked at start). best_mode auto: min for losses, max otherwise.
      best_metric="auto",
      best_mode="auto",
      nan_policy="stop",  # stop | skip
      async_checkpoint=True,
      progress=True,
      # jax.profiler trace of steps profile_from+1 .. profile_from+profile_steps into workdir/profile/
      # process_<i>/ with summary.json (busiest ops per step; mmr_jax/training/profiling.py); 0 steps: off.
      profile_steps=0,
      profile_from=5,  # past compilation and warm-up
  ))

  c.mesh = ConfigDict(dict(
      shape=ConfigDict(dict(dcn=1, data=-1, fsdp=1, tensor=1)),  # -1 fills the remaining devices
  ))
  # Logical axis name -> mesh axes. The same rules serve DP, FSDP and TP: an axis of size 1 is a no-op.
  c.mesh.rules = (
      ("batch", ("dcn", "data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv", None),
      ("joined_kv", "tensor"),
      ("vocab", "tensor"),
      ("length", None),
      ("patch", None),
  )
  return c


# Keys an older config.json may hold that the code no longer has, each with the value that left its part off (None:
# any value, a setting of nothing else). A saved run with those values is what today's code trains without the key.
REMOVED_KEYS = {
    # The learned query expansion head, replaced by the query translation table (model.query_translation_k).
    "model.query_expansion_k": 0, "loss.query_words": 0.0, "optim.lr_mult.query_expansion": None,
}


def _drop_removed(config: ConfigDict) -> None:
  """Deletes REMOVED_KEYS from a saved run's `config`; raises ValueError for one that turned on a part since removed."""
  for dotted, off in REMOVED_KEYS.items():
    *path, key = dotted.split(".")
    parent = config
    for name in path:
      parent = parent.get(name) if isinstance(parent, ConfigDict) else None
    if not isinstance(parent, ConfigDict) or key not in parent:
      continue
    if off is not None and parent[key] != off:
      raise ValueError(f"config.{dotted}={parent[key]!r}: this run was trained with a part the code no longer has "
                       f"(only {dotted}={off!r} loads); train it again with this version")
    del parent[key]


def fill_defaults(config: ConfigDict, defaults: ConfigDict | None = None) -> ConfigDict:
  """Returns `config` with every key of `defaults` (default: `base_config()`) that it lacks added, recursively.

  A workdir's config.json holds the keys of the code that trained it; code reads every key as a plain
  attribute, so a key added since takes its default (which keeps the behaviour of the code before it). With the
  default `defaults`, keys removed since (REMOVED_KEYS) are dropped first.
  """
  if defaults is None:
    _drop_removed(config)
  defaults = base_config() if defaults is None else defaults
  for key, value in defaults.items():
    if key not in config:
      config[key] = value
    elif isinstance(value, ConfigDict) and isinstance(config[key], ConfigDict):
      fill_defaults(config[key], value)
  return config


def set_b16_model(c: ConfigDict, *, remat: bool = False, scan_layers: bool = False,
                  remat_policy: str = "nothing_saveable", attention_impl: str = "flax") -> ConfigDict:
  """Sets ViT-B/16 + a B-sized text tower + 2 fusion layers, bf16 compute, 224 px, 512-d embeddings.

  `remat`, `scan_layers`, `remat_policy` and `attention_impl` apply to all three towers.
  """
  c.data.image_size = 224
  c.data.query_len = 32
  c.data.product_len = 128
  c.data.title_len = 32
  stack = dict(remat=remat, scan_layers=scan_layers, remat_policy=remat_policy, attention_impl=attention_impl)
  c.model.vit = vit_lib.get_config("B/16", pool_type="map", **stack)
  c.model.fusion = fusion_lib.get_config(**stack)
  set_text_tower(c, "B", max_len=128, **stack)
  c.model.fusion.depth = 2
  c.model.embed_dim = 512
  c.model.dtype = "bfloat16"
  return c


def set_b16_stage2(c: ConfigDict) -> ConfigDict:
  """Sets the B/16 scale configs' stage 2: stage 1's image tower (at 0.1x the rate, keeping its domain alignment, as
  in the paper's second stage; a tower this run does not load trains at the full rate) and product text tower, and
  the fused branch's own term at half weight."""
  c.optim.init_lr_mult.image_tower = 0.1
  c.init.load = ("image_tower", "product_text_tower")
  # The fused branch also learns on its own (query <-> fused term): it starts from nothing beside a text branch
  # that arrives trained, and without the term the fusion gate shuts before it has learnt anything
  # (configs/demo.py). Half weight, as the demo's long budget: at full weight over many steps the term pulls the
  # query towards the image side and costs the queries the text answers. Measured on the demo, not at this scale.
  c.loss.aux_query_fused = 0.5
  return c


def set_text_tower(c: ConfigDict, size: str, *, max_len: int, **overrides) -> ConfigDict:
  """Sets the text towers to size preset `size` ("mu", "S", "B", ...); the fusion network follows their
  width and heads. The vocabulary size stays -1 (the trainer reads it from DATA_DIR's tokenizer)."""
  c.model.text = text_lib.get_config(size, vocab_size=-1, max_len=max_len, **overrides)
  c.model.fusion.width = c.model.text.width
  c.model.fusion.num_heads = c.model.text.num_heads
  return c


# big_vision's `tokenize(max_len=64, eos="sticky", pad_value=1)` of the SigLIP checkpoints (lower=True is the
# op's default): lowercased ASCII, eos appended and kept when truncating, rows padded with the eos id 1.
SIGLIP_TOKENIZER = dict(eos="sticky", pad_id=1, bos=False, lower=True)
# `set_siglip` sizes for `runlocal`: the same structure as SigLIP B/16 at the smoke-test size.
SIGLIP_RUNLOCAL = dict(variant="mu/8", image_size=32, text_len=16)


def set_siglip(c: ConfigDict, ckpt: str, tokenizer: str, *, variant: str = "B/16", image_size: int = 224,
               text_len: int = 64, **stack) -> ConfigDict:
  """Sets the towers to mirror a big_vision SigLIP two-tower checkpoint, initialised from it.

  SigLIP (arXiv 2303.15343; big_vision's SigLIP_demo.ipynb): a ViT `variant` with MAP pooling and no head;
  a text transformer of the same size with `pool="last"` (the sticky eos), no padding mask and a `head` Dense
  to the embedding width; the vocabulary of its SentencePiece model (c4_en, 32k pieces, for the English
  checkpoints). Query, title and product texts all get the checkpoint's `text_len` (64; 16 for So400m/14 224)
  tokens: its pos_embedding is that long and "last" pools the final position. `embed_dim` is the width, so
  the identity projection heads (models/pretrained.load_two_tower) start from SigLIP's own embeddings.
  `stack`: remat / scan_layers / remat_policy / attention_impl for every tower.
  """
  if not ckpt or not tokenizer:
    raise ValueError("init=siglip needs ckpt=PATH (the two-tower .npz) and tokenizer=PATH (its SentencePiece "
                     f".model), got ckpt={ckpt!r}, tokenizer={tokenizer!r}")
  size = variant.split("/")[0]
  c.data.image_size = image_size
  c.data.query_len = c.data.product_len = c.data.title_len = text_len
  c.data.tokenizer = ConfigDict(dict(path=tokenizer, **SIGLIP_TOKENIZER))
  c.model.vit = vit_lib.get_config(variant, pool_type="map", **stack)
  width = c.model.vit.width
  set_text_tower(c, size, max_len=text_len, pool="last", pad_mask=False, head_dim=width, **stack)
  c.model.embed_dim = width
  c.init.two_tower_npz = ckpt
  return c


def shrink_for_cpu(c: ConfigDict) -> ConfigDict:
  """Returns `c` shrunk to the `runlocal` smoke size: the same code path in seconds on one CPU."""
  base = base_config()
  for key in ("image_size", "query_len", "product_len", "title_len"):
    c.data[key] = base.data[key]
  c.data.product_len = 48  # a smoke run needs the code path, not every attribute
  c.data.batch_size = 16
  c.data.num_workers = 0
  c.model.vit = base.model.vit
  c.model.text = base.model.text
  c.model.fusion = base.model.fusion
  c.model.embed_dim = base.model.embed_dim
  c.model.dtype = "float32"
  c.train.steps = 6
  c.train.log_every = 2
  c.train.eval_every = 3
  c.train.eval_batches = 1
  c.train.ckpt_every = 3
  c.mesh.shape.dcn = 1
  return c


# A budget's multiplier of a config's own step count (`budget=long`; the ablation's --budget). A config may
# also change other settings with its budget (configs/demo.py: the fused branch's own term at the long one).
BUDGETS = {"default": 1, "long": 5}


def apply_budget(c: ConfigDict, arg: ConfigDict) -> ConfigDict:
  """Applies the `runlocal`, `budget`, `steps` and `batch` arguments every config family accepts; returns `c`.

  `budget` multiplies the config's step count (BUDGETS); `steps` sets the count outright instead.
  """
  if arg.runlocal:
    shrink_for_cpu(c)
  budget = arg.get("budget", "default")
  if budget not in BUDGETS:
    raise ValueError(f"config argument budget={budget!r}; expected one of {sorted(BUDGETS)}")
  c.train.steps = arg.steps or c.train.steps * BUDGETS[budget]
  if arg.batch:
    c.data.batch_size = arg.batch
  return c
