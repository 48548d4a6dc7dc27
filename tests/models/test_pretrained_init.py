"""Starting from a big_vision SigLIP two-tower checkpoint and the SentencePiece model shipped with it.

The checkpoints here are written from big_vision's module definitions (models/vit.py,
proj/image_text/text_transformer.py, proj/image_text/two_towers.py), not from our model, so a
name or shape our loader gets wrong fails: a Conv patch kernel [p, p, 3, W], per-head attention
kernels [W, H, W/H], `t` and `b` of shape [1], everything under `params/` as big_vision's trainer
saves it.
"""

import json
import os
import re

import flax.linen as nn
import jax
import numpy as np
import pytest
import sentencepiece as spm

from mmr_jax import config as config_lib
from mmr_jax.data import pipeline
from mmr_jax.data import sources
from mmr_jax.data import tokenizer as tok_lib
from mmr_jax.evals import embedding
from mmr_jax.models import pretrained
from mmr_jax.models import two_tower
from mmr_jax.training import big_vision_npz

WIDTH, DEPTH, HEADS, MLP, PATCH, IMAGE, TEXT_LEN = 32, 2, 2, 128, 8, 16, 8


# ------------------------------------------------------------------------ big_vision-layout writer


def _block(rng, pre, width, heads, mlp):
  """big_vision vit.Encoder1DBlock (and MAPHead) parameter names and shapes."""
  out = {}
  for ln in ("LayerNorm_0", "LayerNorm_1"):
    out[f"{pre}{ln}/scale"] = 1 + 0.1 * rng.standard_normal(width)
    out[f"{pre}{ln}/bias"] = 0.1 * rng.standard_normal(width)
  out.update(_attention(rng, f"{pre}MultiHeadDotProductAttention_0/", width, heads))
  out.update(_mlp(rng, f"{pre}MlpBlock_0/", width, mlp))
  return out


def _attention(rng, pre, width, heads):
  out = {}
  for n in ("query", "key", "value"):
    out[f"{pre}{n}/kernel"] = rng.standard_normal((width, heads, width // heads))
    out[f"{pre}{n}/bias"] = rng.standard_normal((heads, width // heads))
  out[f"{pre}out/kernel"] = rng.standard_normal((heads, width // heads, width))
  out[f"{pre}out/bias"] = rng.standard_normal(width)
  return out


def _mlp(rng, pre, width, mlp):
  return {f"{pre}Dense_0/kernel": rng.standard_normal((width, mlp)), f"{pre}Dense_0/bias": rng.standard_normal(mlp),
          f"{pre}Dense_1/kernel": rng.standard_normal((mlp, width)), f"{pre}Dense_1/bias": rng.standard_normal(width)}


def _map_head(rng, pre, width, heads, mlp):
  out = {f"{pre}probe": rng.standard_normal((1, 1, width)),
         f"{pre}LayerNorm_0/scale": 1 + 0.1 * rng.standard_normal(width),
         f"{pre}LayerNorm_0/bias": 0.1 * rng.standard_normal(width)}
  out.update(_attention(rng, f"{pre}MultiHeadDotProductAttention_0/", width, heads))
  out.update(_mlp(rng, f"{pre}MlpBlock_0/", width, mlp))
  return out


def _encoder(rng, pre, width, depth, heads, mlp):
  out = {}
  for i in range(depth):
    out.update(_block(rng, f"{pre}encoderblock_{i}/", width, heads, mlp))
  out[f"{pre}encoder_norm/scale"] = 1 + 0.1 * rng.standard_normal(width)
  out[f"{pre}encoder_norm/bias"] = 0.1 * rng.standard_normal(width)
  return out


def siglip_arrays(vocab: int, *, seed=0, width=WIDTH, depth=DEPTH, heads=HEADS, mlp=MLP, patch=PATCH,
                  image=IMAGE, text_len=TEXT_LEN, out_dim=WIDTH) -> dict[str, np.ndarray]:
  """Returns the flat arrays of a SigLIP two-tower checkpoint: image ViT with MAP head and no head
  (out_dim[0]=None), text transformer with pool "last" and head Dense(out_dim), t and b."""
  rng = np.random.default_rng(seed)
  img = {"embedding/kernel": rng.standard_normal((patch, patch, 3, width)),  # nn.Conv, stride = patch
         "embedding/bias": rng.standard_normal(width),
         "pos_embedding": rng.standard_normal((1, (image // patch) ** 2, width))}
  img.update(_encoder(rng, "Transformer/", width, depth, heads, mlp))
  img.update(_map_head(rng, "MAPHead_0/", width, heads, mlp))
  txt = {"Embed_0/embedding": rng.standard_normal((vocab, width)),
         "pos_embedding": rng.standard_normal((1, text_len, width)),
         "head/kernel": rng.standard_normal((width, out_dim)), "head/bias": rng.standard_normal(out_dim)}
  txt.update(_encoder(rng, "Encoder_0/", width, depth, heads, mlp))
  flat = {**{f"img/{k}": v for k, v in img.items()}, **{f"txt/{k}": v for k, v in txt.items()},
          "t": np.array([np.log(10.0) + 0.5]), "b": np.array([-10.0 + 0.25])}
  return {f"params/{k}": (0.05 * v if v.ndim > 1 else v).astype(np.float32) for k, v in flat.items()}


def write_npz(path, arrays):
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return str(path)


def train_c4_like_tokenizer(path_prefix, texts, vocab_size=300):
  """Returns a SentencePiece model with T5 / c4_en's special ids: pad 0, eos 1, unk 2, no bos."""
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_prefix=str(path_prefix), model_type="unigram",
      vocab_size=vocab_size, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      num_threads=1, minloglevel=2)
  return f"{path_prefix}.model"


CORPUS = [f"{c} {n} {m}" for c in ("red", "blue", "green", "black", "white") for n in
          ("cotton shirt", "running shoes", "leather bag", "wool scarf", "ceramic mug", "phone case")
          for m in ("small", "large", "for men", "for women", "kids size 4")]


@pytest.fixture(scope="module")
def c4_tok(tmp_path_factory):
  return train_c4_like_tokenizer(tmp_path_factory.mktemp("tok") / "c4_like", CORPUS)


def _model_config(vocab: int, *, scan=False, share=False, text_len=TEXT_LEN):
  c = config_lib.base_config()
  c.data.tokenizer.path = "unused"
  config_lib.set_siglip(c, "unused.npz", "unused.model", variant=f"pico/{PATCH}", image_size=IMAGE,
                        text_len=text_len, scan_layers=scan)
  for tower in (c.model.vit, c.model.text):
    tower.depth, tower.num_heads, tower.mlp_ratio = DEPTH, HEADS, MLP / WIDTH
  c.model.text.vocab_size = vocab
  c.model.share_text_towers = share
  c.model.contrastive = "sigmoid"
  return c


def _init(cfg):
  model = two_tower.TwoTower(cfg.model)
  batch = two_tower.dummy_batch(cfg.model, image_size=cfg.data.image_size, text_len=cfg.data.query_len)
  return model, nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), batch)["params"])


# ---------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("scan,share", [(False, False), (True, True)])
def test_every_checkpoint_array_lands(tmp_path, scan, share):
  vocab = 50
  arrays = siglip_arrays(vocab)
  path = write_npz(tmp_path / "siglip.npz", arrays)
  cfg = _model_config(vocab, scan=scan, share=share)
  _, params = _init(cfg)
  loaded, report = big_vision_npz.load_two_tower_npz_into(params, path)
  flat = pretrained._flat(pretrained.unstack_layers(loaded) if scan else loaded)  # pylint: disable=protected-access
  text_towers = ["text_tower"] if share else ["query_tower", "product_text_tower"]
  for key, value in arrays.items():
    name = key[len("params/"):]
    if name == "img/embedding/kernel":
      np.testing.assert_array_equal(flat["image_tower/embedding/kernel"], value.reshape(-1, WIDTH))
    elif name.startswith("img/"):
      np.testing.assert_array_equal(flat["image_tower/" + name[4:]], value, err_msg=name)
    elif name.startswith("txt/"):
      for tower in text_towers:
        np.testing.assert_array_equal(flat[f"{tower}/{name[4:]}"], value, err_msg=name)
    else:
      np.testing.assert_array_equal(flat[pretrained.TWO_TOWER_SCALARS[name]], value[0])
  # Every model parameter of the three towers and the logit parameters came from the checkpoint.
  tower_params = [k for k in pretrained._flat(loaded) if k.split("/")[0] in ["image_tower", "loss", *text_towers]]  # pylint: disable=protected-access
  assert sorted(tower_params) == report["loaded"]
  assert not any(k.startswith(("image_tower", "query_tower", "loss")) for k in report["kept_init"])
  assert any(k.startswith("fusion/") for k in report["kept_init"])
  # The square projection heads are the identity: embeddings start as SigLIP's.
  for head in ("query", "product_text", "image"):
    np.testing.assert_array_equal(flat[f"heads/{head}/kernel"], np.eye(WIDTH))


def test_loaded_model_embeds_like_the_checkpoint(tmp_path, c4_tok):
  """Query embedding = normalize(head(last position)); image embedding = normalize(MAP pooled)."""
  tok = tok_lib.Tokenizer(c4_tok, conventions=tok_lib.Conventions(**config_lib.SIGLIP_TOKENIZER))
  arrays = siglip_arrays(tok.vocab_size)
  cfg = _model_config(tok.vocab_size)
  model, params = _init(cfg)
  params, _ = pretrained.load_two_tower(params, arrays)
  ids = tok.encode(["Red Cotton Shirt", "kids size 4 running shoes for women large"], TEXT_LEN)
  q = model.apply({"params": params}, ids, method="embed_query")["emb"]
  from mmr_jax.models import text as text_lib  # pylint: disable=g-import-not-at-top
  pooled, _, mask = text_lib.from_config(cfg.model.text).apply({"params": params["query_tower"]}, ids)
  assert bool(mask.all())  # SigLIP attends to the eos padding too
  np.testing.assert_allclose(q, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)
  image = np.random.default_rng(0).integers(0, 256, (2, IMAGE, IMAGE, 3), dtype=np.uint8)
  p = model.apply({"params": params}, ids, image, np.ones(2, bool), method="embed_product")
  np.testing.assert_allclose(p["text_emb"], q, rtol=1e-5, atol=1e-6)  # both text towers are the checkpoint's
  from mmr_jax.models import vit as vit_lib  # pylint: disable=g-import-not-at-top
  pooled, _ = vit_lib.from_config(cfg.model.vit).apply({"params": params["image_tower"]}, image)
  np.testing.assert_allclose(p["image_emb"], pooled / np.linalg.norm(pooled, axis=-1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  out = model.apply({"params": params}, method="logit_params")
  np.testing.assert_allclose([out["logit_scale"], out["logit_bias"]], [np.log(10.0) + 0.5, -9.75], rtol=1e-6)


def test_wrong_checkpoint_lists_every_problem(tmp_path):
  arrays = siglip_arrays(50)
  del arrays["params/txt/Encoder_0/encoderblock_1/MlpBlock_0/Dense_0/bias"]
  arrays["params/img/head/kernel"] = np.zeros((WIDTH, 7), np.float32)  # an image head the model lacks
  arrays["params/txt/pos_embedding"] = np.zeros((1, 4, WIDTH), np.float32)  # shorter than max_len 8
  arrays["params/extra"] = np.zeros((3,), np.float32)
  del arrays["params/t"]
  path = write_npz(tmp_path / "bad.npz", arrays)
  _, params = _init(_model_config(50))
  with pytest.raises(ValueError) as e:
    big_vision_npz.load_two_tower_npz_into(params, path)
  msg = str(e.value)
  for tower in ("query_tower", "product_text_tower"):
    assert f"{tower}/Encoder_0/encoderblock_1/MlpBlock_0/Dense_0/bias: missing in checkpoint (model shape (128,))" in msg
    assert f"{tower}/pos_embedding: checkpoint shape (1, 4, 32) != model shape (1, 8, 32)" in msg
  assert "img/head/kernel: in checkpoint, not in model image_tower (checkpoint shape (32, 7)) (a head: set model.vit.head_dim)" in msg
  assert "extra: not a two-tower parameter (checkpoint shape (3,))" in msg
  assert "loss/logit_scale: missing in checkpoint as 't' (model shape ())" in msg
  # A vocabulary other than the tokenizer's is a shape error, not a silent misfit.
  _, params = _init(_model_config(60))
  with pytest.raises(ValueError, match=re.escape("Embed_0/embedding: checkpoint shape (50, 32) != model shape (60, 32)")):
    pretrained.load_two_tower(params, siglip_arrays(50))


def test_lit_checkpoint_without_bias_and_with_image_head(tmp_path):
  """LiT: no `b` (the bias stays at init, reported), an image `head` loaded into vit.head_dim."""
  arrays = siglip_arrays(50)
  del arrays["params/b"]
  rng = np.random.default_rng(1)
  arrays["params/img/head/kernel"] = rng.standard_normal((WIDTH, WIDTH)).astype(np.float32)
  arrays["params/img/head/bias"] = rng.standard_normal(WIDTH).astype(np.float32)
  cfg = _model_config(50)
  cfg.model.vit.head_dim = WIDTH
  _, params = _init(cfg)
  loaded, report = pretrained.load_two_tower(params, arrays)
  np.testing.assert_array_equal(loaded["image_tower"]["head"]["kernel"], arrays["params/img/head/kernel"])
  assert "loss/logit_bias" in report["kept_init"] and loaded["loss"]["logit_bias"] == params["loss"]["logit_bias"]


# ------------------------------------------------------------------------------------ tokenizer


def test_siglip_tokenizer_conventions(c4_tok):
  """big_vision's tokenize op: ASCII lowercased, eos 1 appended and sticky, padded with 1, no bos."""
  sp = spm.SentencePieceProcessor(model_file=c4_tok)
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  tok = tok_lib.Tokenizer(c4_tok, conventions=tok_lib.Conventions(**config_lib.SIGLIP_TOKENIZER))
  pieces = sp.encode("red cotton shirt")
  assert len(pieces) < 15
  short = tok.encode(["Red COTTON shirt"], 16)[0]
  assert list(short) == pieces + [1] * (16 - len(pieces))  # eos, then eos-id padding
  long = sp.encode("red cotton shirt " * 10)
  assert list(tok.encode(["red cotton shirt " * 10], 8)[0]) == long[:7] + [1]  # truncated, eos kept last
  yes = tok_lib.Tokenizer(c4_tok, conventions=tok_lib.Conventions(eos="yes", pad_id=0))
  assert list(yes.encode(["red cotton shirt " * 10], 8)[0]) == long[:8]
  assert list(yes.encode(["red cotton shirt"], 16)[0]) == pieces + [1] + [0] * (15 - len(pieces))
  plain = tok_lib.Tokenizer(c4_tok)  # our catalogue conventions: as is, no eos, pad 0
  upper = sp.encode("RED Shirt")
  assert upper != sp.encode("red shirt")
  assert list(plain.encode(["RED Shirt"], 16)[0]) == upper + [0] * (16 - len(upper))
  assert tok_lib.lower_ascii("ÜBER Straße") == "Über straße"  # tf.strings.lower leaves non-ASCII alone
  with pytest.raises(ValueError, match="no bos piece"):
    tok_lib.Tokenizer(c4_tok, conventions=tok_lib.Conventions(bos=True))
  with pytest.raises(ValueError, match="eos="):
    tok_lib.Conventions(eos="always")


def test_siglip_tokenizer_tf_twin_matches(c4_tok):
  conv = tok_lib.Conventions(**config_lib.SIGLIP_TOKENIZER)
  tok = tok_lib.Tokenizer(c4_tok, conventions=conv)
  texts = ["Red COTTON shirt", "", "ÜBER Straße Large", "red cotton shirt " * 10, "wool scarf for women"]
  tf_ids = tok_lib.tf_encode(tok.model_proto, 8, conv)(np.asarray(texts, object)).numpy()
  np.testing.assert_array_equal(tf_ids, tok.encode(texts, 8))


# ---------------------------------------------------------------------- pipeline and training


def _siglip_run_config(data_dir, ckpt, tokenizer, **train):
  import importlib.util  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  spec = importlib.util.spec_from_file_location("pod_config", os.path.join(root, "configs", "vit_b16_pod.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  cfg = mod.get_config(f"init=siglip,runlocal=True,data={data_dir},ckpt={ckpt},tokenizer={tokenizer}")
  cfg.train.update(train)
  return cfg


def test_pipeline_tokenises_with_the_checkpoint_tokenizer(tiny_data, c4_tok, tmp_path):
  cfg = _siglip_run_config(tiny_data, "unused.npz", c4_tok)
  assert sources.tokenizer_path(tiny_data, cfg.data) == c4_tok
  it = pipeline.make_eval_iterator(tiny_data, "queries", "test", cfg.data, 4)
  batch = next(iter(it))
  from mmr_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  src = tfds_builder.load_source(tiny_data, "queries", "test")
  texts = [sources.row_text(src[i], "text") for i in range(4)]  # pylint: disable=protected-access
  sp = spm.SentencePieceProcessor(model_file=c4_tok)
  want = np.ones((4, cfg.data.query_len), np.int32)
  for row, text in enumerate(texts):
    ids = sp.encode(text.lower())[:cfg.data.query_len - 1] + [1]
    want[row, :len(ids)] = ids
  np.testing.assert_array_equal(batch["query_tokens"], want)
  own = sources.load_tokenizer(tiny_data)  # the catalogue's model when no path is configured
  assert own.vocab_size != sp.get_piece_size() or not np.array_equal(own.encode(texts, 16), want)


def test_train_from_siglip_checkpoint(tiny_data, c4_tok, tmp_path):
  from mmr_jax import train  # pylint: disable=g-import-not-at-top
  vocab = spm.SentencePieceProcessor(model_file=c4_tok).get_piece_size()
  cfg = _siglip_run_config(tiny_data, "x", c4_tok)
  arrays = siglip_arrays(vocab, width=cfg.model.text.width, depth=cfg.model.text.depth,
                         heads=cfg.model.text.num_heads, mlp=int(cfg.model.text.width * cfg.model.text.mlp_ratio),
                         patch=cfg.model.vit.patch_size, image=cfg.data.image_size, text_len=cfg.data.query_len,
                         out_dim=cfg.model.embed_dim)
  ckpt = write_npz(tmp_path / "siglip_mu.npz", arrays)
  cfg = _siglip_run_config(tiny_data, ckpt, c4_tok, steps=3, eval_every=0, ckpt_every=3, progress=False)
  resolved = train.resolve_config(cfg)
  assert resolved.model.text.vocab_size == vocab
  trainer = train.Trainer(resolved, str(tmp_path / "wd0"))
  state = trainer.init_state()
  np.testing.assert_array_equal(jax.device_get(state.params["query_tower"]["Embed_0"]["embedding"]),
                                arrays["params/txt/Embed_0/embedding"])
  np.testing.assert_array_equal(jax.device_get(state.params["loss"]["logit_bias"]), arrays["params/b"][0])
  wd = tmp_path / "wd"
  metrics = train.train_and_evaluate(cfg, str(wd))
  assert metrics["step"] == 3 and np.isfinite(metrics["loss"])
  recorded = json.loads((wd / "config.json").read_text())["data"]["tokenizer"]
  assert recorded == {"path": c4_tok, **config_lib.SIGLIP_TOKENIZER}
  tm = embedding.load_trained(str(wd), tiny_data)  # evaluation checks the vocabulary of the same model file
  assert sources.tokenizer_path(tiny_data, tm.config.data) == c4_tok
  # The exported query tower tokenises in its graph exactly as the pipeline did, then embeds the same.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from mmr_jax.export import towers  # pylint: disable=g-import-not-at-top
  qt = towers.make_query_tower(tm, sources.tokenizer_path(tiny_data, tm.config.data), ("cpu",))
  queries = ["Red COTTON shirt", "", "wool scarf for women " * 8]
  ids = sources.load_tokenizer(tiny_data, tm.config.data).encode(queries, int(tm.config.data.query_len))
  assert ids[1].tolist() == [1] * len(ids[1])  # the empty query is all eos
  graph_ids = qt.tokenize(tf.constant(queries))["query_tokens"].numpy()
  np.testing.assert_array_equal(graph_ids, ids)
  np.testing.assert_allclose(qt.serve(tf.constant(queries))["embedding"].numpy(),
                             tm.embed_queries({"query_tokens": ids}), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["vit_b16_pod", "vit_b16_gpu"])
def test_siglip_b16_configs(name):
  import importlib.util  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  spec = importlib.util.spec_from_file_location(name, os.path.join(root, "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("stage=1,init=siglip,ckpt=/c/webli_en_b16_224_63724782.npz,tokenizer=/c/c4_en.model")
  assert (c.model.vit.width, c.model.vit.depth, c.model.vit.patch_size, c.model.vit.pool_type) == (768, 12, 16, "map")
  assert c.model.vit.head_dim == 0 and c.data.image_size == 224
  t = c.model.text
  assert (t.width, t.depth, t.num_heads, t.mlp_ratio, t.max_len) == (768, 12, 12, 4.0, 64)
  assert (t.pool, t.pad_mask, t.head_dim, t.vocab_size) == ("last", False, 768, -1)
  assert (c.data.query_len, c.data.product_len, c.data.title_len, c.model.embed_dim) == (64, 64, 64, 768)
  assert c.model.vit.scan_layers and t.scan_layers and c.model.fusion.width == 768
  assert dict(c.data.tokenizer) == {"path": "/c/c4_en.model", **config_lib.SIGLIP_TOKENIZER}
  assert c.init.two_tower_npz == "/c/webli_en_b16_224_63724782.npz" and c.loss.kind == "sigmoid"
  with pytest.raises(ValueError, match="init=siglip needs ckpt=PATH"):
    mod.get_config("init=siglip")
  with pytest.raises(ValueError, match="init='lit'"):
    mod.get_config("init=lit")
