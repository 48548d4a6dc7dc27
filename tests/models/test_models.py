"""Towers, fusion gate, TwoTower variants, remat/scan equivalence, pretrained loading."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmr_jax.models import fusion as fusion_lib
from mmr_jax.models import layers
from mmr_jax.models import pretrained
from mmr_jax.models import text as text_lib
from mmr_jax.models import two_tower
from mmr_jax.models import vit as vit_lib
from mmr_jax.training import big_vision_npz

IMG = 16   # Image side; with patch 8 -> a 2x2 grid.
LEN = 12   # Token length.
B = 3      # Products per pixel set; rows B..2B-1 repeat rows 0..B-1 with other pixels.
HAS_IMAGE = (True, False, True)


def _config(variant="fusion", **kw):
  cfg = two_tower.get_config(variant, "pico", patch_size=8, vocab_size=50, max_len=16,
                             embed_dim=16)
  cfg.update(kw)
  return cfg


def _batch(seed=0, title=True):
  """Returns 2B rows: B products, then the same products with different pixels."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, 50, (B, LEN)).astype(np.int32)
  tokens[1, 5:] = 0  # A shorter text.
  tokens[2, 2:] = 0  # A very short one.
  tokens = np.concatenate([tokens, tokens])
  batch = dict(query_tokens=tokens[:, :8], product_tokens=tokens,
               image=rng.integers(0, 256, (2 * B, IMG, IMG, 3), dtype=np.uint8),
               has_image=np.array(HAS_IMAGE * 2))
  if title:
    batch["title_tokens"] = tokens[:, :6]
  return batch


@functools.lru_cache(maxsize=None)
def _run(variant, **kw):
  """Returns (model, params, outputs) with random params (tracing + one apply compile).

  XLA compiles of `init` cost ~3x an `apply` on this CPU, so the towers are tested with
  random parameters and initial values are tested on the small modules that set them.
  """
  model = two_tower.TwoTower(_config(variant, **kw))
  batch = _batch(title=variant == "fusion")
  params = _random_params(model, batch)
  return model, params, _jit(model.apply)({"params": params}, batch)


def _jit(f):
  """Returns jax.jit(f) with cheap XLA backend optimisation: these tests are compile-bound."""
  return jax.jit(f, compiler_options={"xla_backend_optimization_level": 0})


def _norms(x):
  return np.linalg.norm(np.asarray(x), axis=-1)


def _random_params(module, *inputs, seed=0):
  """Returns the module's (boxed) params with random values: shapes by tracing, no compile."""
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype), shapes)


def _close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=rtol, atol=atol), a, b)


# ------------------------------------------------------------------------------------ towers


@pytest.mark.parametrize("pool,posemb", [("tok", "learn"), ("map", "sincos2d"), ("gap", "learn")])
def test_vit_shapes_and_pooling(pool, posemb):
  vit = vit_lib.ViT(patch_size=8, width=32, depth=1, num_heads=2, pool_type=pool, posemb=posemb)
  img = np.zeros((2, 16, 24, 3), np.uint8)
  (pooled, tokens), variables = jax.eval_shape(vit.init_with_output, jax.random.PRNGKey(0), img)
  assert pooled.shape == (2, 32) and tokens.shape == (2, 2 * 3, 32)
  names = set(variables["params"])
  assert ("cls" in names) == (pool == "tok") and ("MAPHead_0" in names) == (pool == "map")
  assert ("pos_embedding" in names) == (posemb == "learn")
  with pytest.raises(TypeError, match="uint8"):
    jax.eval_shape(vit.init, jax.random.PRNGKey(0), img.astype(np.float32))
  with pytest.raises(ValueError, match="divisible by patch_size"):
    jax.eval_shape(vit.init, jax.random.PRNGKey(0), img[:, :15])


def test_vit_normalises_uint8_to_unit_range():
  vit = vit_lib.ViT(patch_size=8, width=32, depth=1, num_heads=2)
  img = np.zeros((1, 8, 8, 3), np.uint8)
  img[..., 0] = 255
  variables = _random_params(vit, img)
  _, inter = _jit(functools.partial(
      vit.apply, capture_intermediates=lambda m, _: m.name == "embedding",
      mutable=["intermediates"]))({"params": variables}, img)
  p = nn.unbox(variables)["embedding"]
  x = np.tile(np.array([1.0, -1.0, -1.0], np.float32), 64)  # (row, col, channel) order.
  np.testing.assert_allclose(inter["intermediates"]["embedding"]["__call__"][0][0, 0],
                             x @ p["kernel"] + p["bias"], rtol=1e-4, atol=1e-4)


def test_patch_embedding_equals_big_vision_conv():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 16, 24, 3)).astype(np.float32)
  kernel = rng.normal(size=(8, 8, 3, 5)).astype(np.float32)  # big_vision Conv layout.
  conv = jax.lax.conv_general_dilated(x, kernel, (8, 8), "VALID",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  patches, h, w = vit_lib.patchify(x, 8)
  dense = patches @ kernel.reshape(-1, 5)
  np.testing.assert_allclose(dense.reshape(2, h, w, 5), conv, rtol=1e-4, atol=1e-4)


def test_text_encoder_masks_padding():
  enc = text_lib.TextEncoder(vocab_size=50, width=32, depth=1, num_heads=2, max_len=16)
  tokens = np.array([[5, 6, 7, 0, 0, 0], [9, 8, 0, 0, 0, 0], [5, 6, 7, 11, 0, 0],
                     [0, 0, 0, 0, 0, 0]], np.int32)  # Last: an empty text.
  longer = np.pad(tokens, ((0, 0), (0, 6)))  # The same texts with 6 more pads.
  params = _random_params(enc, longer)
  pooled, seq, mask = _jit(enc.apply)({"params": params}, longer)
  assert pooled.shape == (4, 32) and seq.shape == (4, 12, 32)
  np.testing.assert_array_equal(mask, longer != 0)
  short, _, _ = _jit(enc.apply)({"params": params}, tokens)
  np.testing.assert_allclose(short, pooled, rtol=1e-5, atol=1e-5)  # Pad count: no effect.
  assert np.abs(np.asarray(pooled[0] - pooled[2])).max() > 1e-3  # A real token: an effect.
  np.testing.assert_array_equal(pooled[3], 0.0)  # Empty text: zeros, not NaN.
  with pytest.raises(ValueError, match="max_len"):
    jax.eval_shape(enc.init, jax.random.PRNGKey(0), np.ones((1, 17), np.int32))


def _grad_and_out(module, params, *inputs, **kw):
  def f(p):
    out = module.apply({"params": p}, *inputs, **kw)
    return sum(jnp.sum(jnp.sin(x)) for x in jax.tree.leaves(out) if x.dtype == jnp.float32), out
  (_, out), g = _jit(jax.value_and_grad(f, has_aux=True))(params)
  return out, g


def test_remat_and_scan_match_plain():
  """remat / scan_layers compute the same outputs and gradients as the plain stack."""
  tokens = np.array([[5, 6, 7, 0], [9, 8, 3, 3]], np.int32)
  kw = dict(vocab_size=50, width=32, depth=2, num_heads=2, max_len=8, dropout=0.0)
  plain = text_lib.TextEncoder(**kw)
  params = nn.unbox(_random_params(plain, tokens))
  out0, g0 = _grad_and_out(plain, params, tokens, train=True)
  for remat, scan in [(True, False), (False, True), (True, True)]:
    other = text_lib.TextEncoder(**kw, remat=remat, scan_layers=scan)
    p = pretrained.stack_layers(params) if scan else params
    out1, g1 = _grad_and_out(other, p, tokens, train=True)
    _close(out1, out0)
    _close(pretrained.unstack_layers(g1) if scan else g1, g0, rtol=1e-4)

  # The fusion stack (two streams, image-masked cross-attention) and the ViT (no mask).
  t = np.random.default_rng(0).normal(size=(2, 4, 32)).astype(np.float32)
  v = np.random.default_rng(1).normal(size=(2, 6, 32)).astype(np.float32)
  args = (t, tokens != 0, v, np.array([True, False]))
  fkw = dict(width=32, depth=2, num_heads=2)
  f_plain = fusion_lib.Fusion(**fkw)
  f_params = nn.unbox(_random_params(f_plain, *args))
  out1, g1 = _grad_and_out(fusion_lib.Fusion(**fkw, remat=True, scan_layers=True),
                           pretrained.stack_layers(f_params), *args)
  out0, g0 = _grad_and_out(f_plain, f_params, *args)
  _close(out1, out0)
  _close(pretrained.unstack_layers(g1), g0, rtol=1e-4)
  img = np.random.default_rng(2).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  vkw = dict(patch_size=8, width=32, depth=2, num_heads=2)
  v_plain = vit_lib.ViT(**vkw)
  v_params = nn.unbox(_random_params(v_plain, img))
  _close(_jit(vit_lib.ViT(**vkw, remat=True, scan_layers=True).apply)(
      {"params": pretrained.stack_layers(v_params)}, img),
      _jit(v_plain.apply)({"params": v_params}, img))


def test_attention_impls_compute_the_same_function():
  """attention_impl="xla" (jax.nn.dot_product_attention) equals flax's attention in every tower,
  with padding masks (text), image-masked cross-attention (fusion) and MAP pooling (ViT)."""
  cfg = _config("fusion")
  cfg.vit.pool_type = "map"
  model, batch = two_tower.TwoTower(cfg), _batch()
  params = _random_params(model, batch)
  for tower in ("vit", "text", "fusion"):
    cfg[tower].attention_impl = "xla"
  other = two_tower.TwoTower(cfg)
  assert other.config.text.attention_impl == "xla"
  _close(_jit(other.apply)({"params": params}, batch), _jit(model.apply)({"params": params}, batch))
  cfg.text.attention_impl = "flash"
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    jax.eval_shape(two_tower.TwoTower(cfg).init, jax.random.PRNGKey(0), batch)


@pytest.mark.parametrize("t,s", [(5, 7), (4, 7), (5, 6), (4, 6)])
def test_odd_length_padding_for_cudnn_changes_nothing(t, s):
  """The padding cuDNN needs (odd lengths with a mask) gives the same outputs and gradients."""
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  q = jax.random.normal(ks[0], (3, t, 2, 8))
  k, v = (jax.random.normal(x, (3, s, 2, 8)) for x in ks[1:3])
  mask = jax.random.bernoulli(ks[3], 0.7, (3, 1, 1, s)).at[:, :, :, 0].set(True)

  def loss(q, k, v, pad_odd):
    out = layers._jax_attention(q, k, v, mask=mask, implementation="xla", pad_odd=pad_odd)  # pylint: disable=protected-access
    return jnp.sum(jnp.sin(out)), out

  (l0, o0), g0 = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, False)
  (l1, o1), g1 = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, True)
  assert o1.shape == o0.shape == (3, t, 2, 8)
  np.testing.assert_allclose(o1, o0, atol=1e-6)
  for a, b in zip(g1, g0):
    assert np.all(np.isfinite(a))
    np.testing.assert_allclose(a, b, atol=1e-6)


# --------------------------------------------------------------------------------- two tower


@pytest.mark.parametrize("variant", two_tower.VARIANTS)
def test_variant_outputs_and_missing_image(variant):
  model, _, out = _run(variant)
  d = two_tower.embedding_dim(model.config)
  assert out["query"]["emb"].shape == (2 * B, d) and out["product"]["emb"].shape == (2 * B, d)
  for part in ("query", "product", "title_image"):
    for k, v in out.get(part, {}).items():
      if k.endswith("emb"):
        np.testing.assert_allclose(_norms(v), 1.0, rtol=1e-5, err_msg=f"{part}/{k}")
  assert ("text_emb" in out["product"]) == (variant != "image_only")
  assert ("image_emb" in out["product"]) == (variant != "text_only")
  assert ("gate" in out["product"]) == (variant == "fusion")

  # Rows B.. repeat rows 0.. with other pixels: product 1 (no image) keeps its embedding,
  # products 0 and 2 (with images) change.
  e = np.asarray(out["product"]["emb"])
  e1, e2 = e[:B], e[B:]
  np.testing.assert_allclose(e1[1], e2[1], rtol=1e-6, atol=1e-6)
  if variant != "text_only":
    assert np.abs(e1[0] - e2[0]).max() > 1e-4 and np.abs(e1[2] - e2[2]).max() > 1e-4
  else:
    np.testing.assert_allclose(e1, e2, rtol=1e-6, atol=1e-6)
  if variant == "fusion":
    # Stage 1: a missing image embeds as the learned "missing" vector, whatever the pixels.
    ti = np.asarray(out["title_image"]["image_emb"])
    np.testing.assert_allclose(ti[1], ti[B + 1], rtol=1e-6, atol=1e-6)
    assert np.abs(ti[0] - ti[B]).max() > 1e-4
    assert out["title_image"]["title_emb"].shape == (2 * B, d)


def test_fusion_gate_responds_to_missing_image():
  _, _, out = _run("fusion")
  out = out["product"]
  gate = np.asarray(out["gate"])
  assert gate[1] == 0.0 and gate[B + 1] == 0.0
  assert 0.0 < gate[0] < 1.0 and 0.0 < gate[2] < 1.0
  assert gate[0] != gate[B]  # The gate reads the image too.
  # No image: the product embedding is exactly the text embedding.
  np.testing.assert_allclose(out["emb"][1], out["text_emb"][1], rtol=1e-5, atol=1e-6)
  # With an image it mixes in the fused branch.
  assert np.abs(np.asarray(out["emb"][0] - out["text_emb"][0])).max() > 1e-3


def test_initial_values():
  """Gate starts on text, qw segment weights uniform, loss params per contrastive type."""
  rng = np.random.default_rng(0)
  t = rng.normal(size=(2, 4, 32)).astype(np.float32)
  v = rng.normal(size=(2, 6, 32)).astype(np.float32)
  fusion = fusion_lib.Fusion(width=32, depth=1, num_heads=2, gate_init_bias=-2.0)
  out, _ = _jit(fusion.init_with_output)(
      jax.random.PRNGKey(0), t, np.ones((2, 4), bool), v, np.array([True, False]))
  np.testing.assert_allclose(out["gate"], [1 / (1 + math.exp(2.0)), 0.0], rtol=1e-5)
  heads = two_tower.Heads(embed_dim=16, image_width=32)
  w, _ = heads.init_with_output(jax.random.PRNGKey(0), t[:, 0],
                                method=lambda m, x: jax.nn.softmax(m.segment_weights(x)))
  np.testing.assert_allclose(w, 1 / 3, rtol=1e-6)
  for contrastive, t, scale in [("softmax", 0.0, math.log(1 / 0.07)), ("sigmoid", 0.0, math.log(10.0)),
                                ("softmax", 0.02, math.log(50.0))]:
    model = two_tower.TwoTower(_config(contrastive=contrastive, temperature_init=t))
    lp, v = model.init_with_output(jax.random.PRNGKey(0), method=model.logit_params)
    assert set(v["params"]) == {"loss"}
    assert float(lp["logit_scale"]) == pytest.approx(scale)
    assert float(lp["logit_bias"]) == -10.0
  with pytest.raises(ValueError, match="temperature_init=-0.1"):
    two_tower.TwoTower(_config(temperature_init=-0.1)).init(jax.random.PRNGKey(0), method="logit_params")


def test_fusion_qw_is_one_weighted_inner_product():
  model, _, out = _run("fusion_qw")
  q, p = out["query"], out["product"]
  w = np.asarray(q["segment_weights"])
  n = w.shape[0]
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  assert np.ptp(w) > 1e-3  # Random params: non-uniform weights, a real test of the identity.
  e = model.config.embed_dim
  qs = np.asarray(q["emb"]).reshape(n, 3, e)
  ps = np.asarray(p["emb"]).reshape(n, 3, e)
  # Query segment k has norm w_k / ||w||; product segments are unit / sqrt(3).
  np.testing.assert_allclose(_norms(qs), w / np.linalg.norm(w, axis=-1, keepdims=True),
                             rtol=1e-5)
  np.testing.assert_allclose(ps * math.sqrt(3), np.stack(
      [p["fused_emb"], p["text_emb"], p["image_emb"]], 1), rtol=1e-5, atol=1e-6)
  # score = sum_k w_k <q_k, p_k> / (sqrt(3) ||w||), with unit q_k.
  unit_q = qs / _norms(qs)[..., None]
  score = np.einsum("ik,ikd,jkd->ij", w, unit_q, ps * math.sqrt(3))
  score /= math.sqrt(3) * np.linalg.norm(w, axis=-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(q["emb"]) @ np.asarray(p["emb"]).T, score,
                             rtol=1e-5, atol=1e-6)


def test_param_names_shared_towers_and_bfloat16():
  _, p_sep, _ = _run("fusion")
  assert set(p_sep) == {"query_tower", "product_text_tower", "image_tower", "fusion", "heads",
                        "loss"}
  _, p, out = _run("concat", share_text_towers=True, dtype="bfloat16")
  assert set(p) == {"text_tower", "image_tower", "heads", "loss"}
  # bfloat16 compute: params and returned embeddings stay float32 and unit norm.
  assert {x.dtype for x in jax.tree.leaves(nn.unbox(p))} == {jnp.dtype("float32")}
  assert out["product"]["emb"].dtype == jnp.float32
  np.testing.assert_allclose(_norms(out["product"]["emb"]), 1.0, rtol=1e-5)


def test_every_param_has_logical_axis_names():
  cfg = _config("fusion_qw")
  cfg.text.scan_layers = True
  model = two_tower.TwoTower(cfg)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), _batch())
  leaves = jax.tree.leaves(variables["params"],
                           is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for x in leaves:
    assert len(x.names) == len(x.value.shape), x
  specs = nn.get_partition_spec(variables["params"])
  q = specs["query_tower"]["Encoder_0"]["encoderblock"]["MultiHeadDotProductAttention_0"]
  assert tuple(q["query"]["kernel"]) == ("layers", "embed", "heads", "kv")
  assert tuple(specs["image_tower"]["embedding"]["kernel"]) == ("patch", "embed")
  rules = (("batch", "data"), ("embed", "fsdp"), ("mlp", "model"), ("heads", "model"),
           ("vocab", "model"))
  mesh_axes = nn.logical_to_mesh(specs, rules)
  assert tuple(mesh_axes["product_text_tower"]["Embed_0"]["embedding"]) == ("model", "fsdp")


def test_init_and_apply_under_a_mesh_with_logical_rules():
  """Param boxes and activation constraints resolve against a mesh (as the trainer runs)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
  rules = (("batch", "data"), ("embed", "model"), ("mlp", "model"), ("heads", "model"))
  cfg = _config("fusion")
  cfg.vit.scan_layers = True
  model = two_tower.TwoTower(cfg)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), _batch())
    out = jax.eval_shape(model.apply, variables, _batch())
  assert out["product"]["emb"].shape == (2 * B, 16)
  k = variables["params"]["image_tower"]["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]
  assert k["kernel"].names == ("layers", "embed", "mlp")


def test_bad_config_errors():
  with pytest.raises(ValueError, match="variant"):
    jax.eval_shape(two_tower.TwoTower(_config("late_fusion")).init, jax.random.PRNGKey(0),
                   _batch())
  cfg = _config("text_only")
  cfg.text.poolng = "mean"
  with pytest.raises(ValueError, match="poolng"):
    jax.eval_shape(two_tower.TwoTower(cfg).init, jax.random.PRNGKey(0), _batch())


# -------------------------------------------------------------------------------- pretrained


def _vit_params(size=IMG, seed=0, **kw):
  vit = vit_lib.ViT(**{**dict(patch_size=8, width=32, depth=2, num_heads=2), **kw})
  return vit, _random_params(vit, np.zeros((1, size, size, 3), np.uint8), seed=seed)


def _assert_tree_equal(a, b):
  fa, fb = pretrained._flat(nn.unbox(a)), pretrained._flat(nn.unbox(b))
  assert set(fa) == set(fb)
  for k in fa:
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_big_vision_npz_round_trip(tmp_path):
  _, params = _vit_params(pool_type="map")
  path = tmp_path / "vit.npz"
  big_vision_npz.save_npz(path, params)
  keys = set(np.load(path).files)
  # The big_vision layout, including the Conv-shaped patch kernel.
  assert "Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel" in keys
  assert "MAPHead_0/probe" in keys and "pos_embedding" in keys
  assert np.load(path)["embedding/kernel"].shape == (8, 8, 3, 32)
  _, target = _vit_params(pool_type="map", seed=1)  # Different values.
  loaded = big_vision_npz.load_vit_npz(path, target)
  _assert_tree_equal(loaded, params)
  # Boxes (logical names) of the target survive.
  leaf = loaded["Transformer"]["encoderblock_0"]["MlpBlock_0"]["Dense_0"]["kernel"]
  assert isinstance(leaf, nn.LogicallyPartitioned) and leaf.names == ("embed", "mlp")
  # Into a scan_layers model: same values, stacked.
  _, scan_target = _vit_params(pool_type="map", scan_layers=True)
  loaded_scan = big_vision_npz.load_vit_npz(path, scan_target)
  _assert_tree_equal(pretrained.unstack_layers(loaded_scan), params)


def test_big_vision_npz_old_layouts_and_resize(tmp_path):
  _, params = _vit_params()
  flat = pretrained.to_big_vision(params)
  # Pre-Linen names, posemb inside the encoder with the [cls] entry prepended, "img/" prefix.
  old = {}
  for k, v in flat.items():
    k = (k.replace("LayerNorm_1", "LayerNorm_2").replace("MlpBlock_0", "MlpBlock_3")
         .replace("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1"))
    old["img/" + k] = v
  pe = old.pop("img/pos_embedding")
  cls_pe = np.full((1, 1, 32), 0.5, np.float32)
  old["img/Transformer/posembed_input/pos_embedding"] = np.concatenate([cls_pe, pe], 1)
  old["img/head/kernel"] = np.zeros((32, 10), np.float32)  # Classifier head: ignored.
  old["txt/Embed_0/embedding"] = np.zeros((50, 32), np.float32)
  path = tmp_path / "old.npz"
  np.savez(path, **old)
  loaded = big_vision_npz.load_vit_npz(path, params, key_prefix="img")
  expected = nn.unbox(params)
  expected["cls"] = expected["cls"] + 0.5
  _assert_tree_equal(loaded, expected)
  # A model at 32px (4x4 grid) gets a resampled 2x2 posemb; everything else loads as is.
  _, big = _vit_params(size=32)
  loaded_big = nn.unbox(big_vision_npz.load_vit_npz(path, big, key_prefix="img"))
  assert loaded_big["pos_embedding"].shape == (1, 16, 32)
  np.testing.assert_allclose(loaded_big["pos_embedding"][0, 0], pe[0, 0], rtol=1e-5)
  with pytest.raises(ValueError, match="key_prefix 'image'"):
    big_vision_npz.load_vit_npz(path, params, key_prefix="image")


def test_big_vision_npz_mismatch_names_every_param(tmp_path):
  _, params = _vit_params()
  path = tmp_path / "vit.npz"
  big_vision_npz.save_npz(path, params)
  _, wide = _vit_params(width=64, pool_type="map")
  with pytest.raises(ValueError) as e:
    big_vision_npz.load_vit_npz(path, wide)
  msg = str(e.value)
  assert ("Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel: checkpoint shape (32, 128) "
          "!= model shape (64, 256)") in msg
  assert "MAPHead_0/probe: missing in checkpoint" in msg
  # keep_init lets the MAP head stay random (loading a cls-token ViT into a MAP model).
  _, map_target = _vit_params(pool_type="map", seed=1)
  loaded = big_vision_npz.load_vit_npz(path, map_target, keep_init=("MAPHead_0",))
  np.testing.assert_array_equal(nn.unbox(loaded)["MAPHead_0"]["probe"],
                                nn.unbox(map_target)["MAPHead_0"]["probe"])


def test_text_npz_round_trip_and_merge_subtree(tmp_path):
  model = two_tower.TwoTower(_config("fusion"))
  batch = _batch()
  params = _random_params(model, batch, seed=0)
  path = tmp_path / "siglip.npz"
  big_vision_npz.save_npz(path, params["product_text_tower"], key_prefix="txt")
  loaded = big_vision_npz.load_text_npz(path, params["query_tower"], key_prefix="txt")
  _assert_tree_equal(loaded, params["product_text_tower"])

  # merge_subtree: stage 2 takes stage 1's image tower by name.
  other = _random_params(two_tower.TwoTower(_config("concat")), batch, seed=1)
  merged = pretrained.merge_subtree(params, other["image_tower"], "image_tower")
  _assert_tree_equal(merged["image_tower"], other["image_tower"])
  _assert_tree_equal(merged["fusion"], params["fusion"])
  out = jax.eval_shape(model.apply, {"params": merged}, batch)  # The model accepts it.
  assert out["product"]["emb"].shape == (2 * B, 16)
  assert not np.array_equal(nn.unbox(params)["image_tower"]["cls"],  # Input not modified.
                            nn.unbox(other)["image_tower"]["cls"])
  # Into a scan_layers model (stage 2 may scan where stage 1 did not).
  cfg = _config("fusion")
  cfg.vit.scan_layers = True
  scanned = _random_params(two_tower.TwoTower(cfg), batch, seed=2)
  merged = pretrained.merge_subtree(scanned, other["image_tower"], "image_tower")
  assert "encoderblock" in merged["image_tower"]["Transformer"]
  _assert_tree_equal(pretrained.unstack_layers(merged["image_tower"]), other["image_tower"])
  # Model params as the trainer holds them (unboxed) + a big_vision npz at a prefix.
  big_vision_npz.save_npz(tmp_path / "vit.npz", other["image_tower"], key_prefix="img")
  loaded = big_vision_npz.load_vit_npz_into(nn.unbox(params), f"{tmp_path / 'vit.npz'}:img")
  _assert_tree_equal(loaded["image_tower"], other["image_tower"])
  _assert_tree_equal(loaded["fusion"], params["fusion"])

  bad = pretrained.unstack_layers(other["image_tower"])
  bad["embedding"]["kernel"] = np.zeros((10, 32), np.float32)
  del bad["cls"]
  with pytest.raises(ValueError) as e:
    pretrained.merge_subtree(params, bad, "image_tower")
  assert "image_tower/embedding/kernel: subtree shape (10, 32) != model shape (192, 32)" in str(
      e.value)
  assert "image_tower/cls: missing in subtree" in str(e.value)
  with pytest.raises(ValueError, match="'image_towr' not in params"):
    pretrained.merge_subtree(params, bad, "image_towr")


def test_lexical_segment_counts_shared_terms_in_the_one_inner_product():
  toks = jnp.array([[5, 6, 0, 0], [6, 5, 5, 0], [7, 8, 9, 0], [0, 0, 0, 0]])
  for vocab, scale in ((50, 1), (5000, 100)):  # exact bag (dim >= vocab) and signed hashing
    seg = two_tower.LexicalSegment(vocab, 64)
    params = seg.init(jax.random.PRNGKey(0), toks * scale)
    v = np.asarray(seg.apply(params, toks * scale))
    # At init every token weighs 1 and counts saturate as log(1 + n): {5, 6} vs {6, 5, 5}.
    a, b = np.log1p([1.0, 1.0]), np.log1p([2.0, 1.0])
    np.testing.assert_allclose(v[0] @ v[1], a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), rtol=1e-5)
    assert abs(v[0] @ v[2]) < 1e-6 and np.all(v[3] == 0)  # no shared term; empty text
  cfg = two_tower.get_config("text_only", "pico", vocab_size=100, max_len=8, embed_dim=16, lexical_dim=32)
  model = two_tower.TwoTower(cfg)
  batch = two_tower.dummy_batch(cfg, image_size=16)
  params = model.init(jax.random.PRNGKey(0), batch)["params"]
  q = model.apply({"params": params}, batch["query_tokens"], method="embed_query")
  p = model.apply({"params": params}, batch["product_tokens"], None, None, method="embed_product")
  assert q["emb"].shape == p["emb"].shape == (2, two_tower.embedding_dim(cfg)) == (2, 48)
  # mix a = 1/2 at init: <q, p> = (<q_dense, p_dense> + <q_lex, p_lex>) / 2, and every embedding is unit norm.
  want = 0.5 * np.sum(q["dense_emb"] * p["dense_emb"], -1) + 0.5 * 1.0  # identical token bags
  np.testing.assert_allclose(np.sum(q["emb"] * p["emb"], -1), want, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(p["emb"], axis=-1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="lexical_dim=32 needs a product text tower"):
    bad = two_tower.TwoTower(two_tower.get_config("fusion_qw", "pico", vocab_size=100, max_len=8, lexical_dim=32))
    bad.init(jax.random.PRNGKey(0), two_tower.dummy_batch(bad.config, image_size=16))


def _sure_of_word_42(variant, head, **model_cfg):
  """Returns (model, batch, params) of a pico model (vocabulary 100, width 16) whose word head (`head`, a path of
  params) predicts word 42 whatever its input: p(42) ~ 1, every other word ~ 0."""
  cfg = two_tower.get_config(variant, "pico", vocab_size=100, max_len=8, embed_dim=16, **model_cfg)
  model = two_tower.TwoTower(cfg)
  batch = two_tower.dummy_batch(cfg, image_size=16)
  params = jax.tree.map(np.asarray, nn.meta.unbox(model.init(jax.random.PRNGKey(0), batch)["params"]))
  dense = params[head[0]][head[1]]
  dense["kernel"] = np.zeros_like(dense["kernel"])
  dense["bias"] = np.zeros(100, np.float32)
  dense["bias"][42] = 30.0
  return model, batch, params


def test_image_expansion_adds_the_words_the_image_predicts_to_the_product_lexical_segment():
  k, dim = 4, 128
  # An image sure of word 42 (whatever it shows).
  model, batch, params = _sure_of_word_42("fusion", ("heads", "image_words"), lexical_dim=dim, image_expansion_k=k)
  tokens = np.array([[5, 6, 0, 0, 0, 0, 0, 0]] * 2)
  p = model.apply({"params": params}, tokens, batch["image"], np.array([True, False]), method="embed_product")
  q = model.apply({"params": params}, np.array([[42, 0, 0, 0, 0, 0, 0, 0]]), method="embed_query")
  lex = np.asarray(p["emb"][:, 16:])
  lex = lex / np.linalg.norm(lex, axis=-1, keepdims=True)
  # At init every token weighs 1 and the scale is 1: word 42 counts k * p = 4 occurrences, saturated as log(1 + 4).
  want = np.zeros((2, dim), np.float32)
  want[:, [5, 6]] = np.log(2.0)
  want[0, 42] = np.log1p(k)
  want /= np.linalg.norm(want, axis=-1, keepdims=True)
  np.testing.assert_allclose(lex, want, atol=1e-5)  # the product without an image gets no image words
  scores = np.asarray(p["emb"] @ q["emb"][0])
  assert scores[0] > scores[1]
  np.testing.assert_allclose(np.linalg.norm(p["emb"], axis=-1), 1.0, rtol=1e-5)
  # The image-words head learns from the retrieval loss through the lexical segment: the more sure the image is
  # of the query's word, the higher the product scores.
  def score(bias):
    ps = dict(params, heads=dict(params["heads"], image_words=dict(params["heads"]["image_words"], bias=bias)))
    e = model.apply({"params": ps}, tokens, batch["image"], np.array([True, False]), method="embed_product")["emb"]
    return jnp.sum(e[0] * q["emb"][0])
  grad = np.asarray(jax.grad(score)(np.eye(100, dtype=np.float32)[42] * 3.0))
  assert grad[42] > 1e-3 and np.all(grad[np.arange(100) != 42] <= 0)
  # Not without a lexical segment, nor more words than the vocabulary.
  for bad_cfg, msg in (({"lexical_dim": 0}, "needs config.model.lexical_dim > 0"),
                       ({"image_expansion_k": 101}, "image_expansion_k=101 > the vocabulary")):
    bad = two_tower.TwoTower(two_tower.get_config("fusion", "pico", vocab_size=100, max_len=8,
                                                  **{"lexical_dim": dim, "image_expansion_k": k, **bad_cfg}))
    with pytest.raises(ValueError, match=msg):
      bad.init(jax.random.PRNGKey(0), two_tower.dummy_batch(bad.config, image_size=16))
  # text_only never sees the image: the setting leaves it without the head and the scale.
  txt = two_tower.TwoTower(two_tower.get_config("text_only", "pico", vocab_size=100, max_len=8, embed_dim=16,
                                                lexical_dim=dim, image_expansion_k=k))
  heads = txt.init(jax.random.PRNGKey(0), two_tower.dummy_batch(txt.config, image_size=16))["params"]["heads"]
  assert "image_words" not in heads and "image_expansion_scale" not in heads


def test_color_histogram_counts_each_images_pixels_per_joint_rgb_bin():
  img = np.zeros((3, 4, 4, 3), np.uint8)
  img[0] = (255, 0, 0)  # all red
  img[1, :2], img[1, 2:] = (255, 0, 0), (0, 0, 255)  # half red, half blue
  img[2] = (127, 128, 255)  # the bin edges: 127 -> bin 0, 128 -> bin 1 of 2
  h = np.asarray(two_tower.color_histogram(jnp.asarray(img), 2))
  assert h.shape == (3, 8)
  scale = np.sqrt(8.0)  # mean square 1 per bin
  red, blue = (1 * 2 + 0) * 2 + 0, (0 * 2 + 0) * 2 + 1  # (r * bins + g) * bins + b
  want = np.zeros((3, 8), np.float32)
  want[0, red] = scale
  want[1, [red, blue]] = np.sqrt(0.5) * scale
  want[2, (0 * 2 + 1) * 2 + 1] = scale
  np.testing.assert_allclose(h, want, rtol=1e-6)
  np.testing.assert_allclose(np.mean(h ** 2, axis=-1), 1.0, rtol=1e-6)
  with pytest.raises(TypeError, match="uint8"):
    two_tower.color_histogram(jnp.asarray(img, jnp.float32), 2)


def test_image_words_are_continuous_at_the_kth_place():
  """Two words tied for the K-th place weigh 0 whichever the sort keeps: a logit moved by float rounding (the exported
  tower against JAX) cannot swap one in or out of the product's bag."""
  k, vocab, dim = 2, 6, 8
  seg = two_tower.LexicalSegment(vocab, dim)
  seg_params = seg.init(jax.random.PRNGKey(0), np.zeros((1, 3), np.int32))
  raw_scale = jnp.float32(math.log(math.e - 1.0))  # scale 1
  tokens = np.array([[1, 0, 0]])
  bags = []
  for eps in (1e-6, -1e-6):  # word 4 just above word 5, then just below: the sort keeps another word
    logits = jnp.asarray([[0.0, 0.0, 0.0, 3.0, 1.0 + eps, 1.0]], jnp.float32)
    extra = two_tower._top_words(logits, k, raw_scale)  # pylint: disable=protected-access
    assert int(extra["extra_tokens"][0, 0]) == 3
    bags.append(np.asarray(seg.apply(seg_params, tokens, **extra)))
  np.testing.assert_allclose(bags[0], bags[1], atol=1e-5)
  # The top word counts K * (p(3) - p(k + 1-th)) occurrences, the word tied at the K-th place about none.
  p = np.asarray(jax.nn.softmax(jnp.asarray([0.0, 0.0, 0.0, 3.0, 1.0, 1.0])))
  extra = two_tower._top_words(jnp.asarray(np.log(p))[None], k, raw_scale)  # pylint: disable=protected-access
  np.testing.assert_allclose(np.asarray(extra["extra_values"][0]), [k * (p[3] - p[5]), 0.0], atol=1e-6)


def test_sigmoid_image_words_count_each_words_own_probability():
  """A sigmoid head's words are independent: a word the head is sure of counts one occurrence however many other
  words it is sure of, where a softmax head's K words share K occurrences."""
  k = 2
  raw_scale = jnp.float32(math.log(math.e - 1.0))  # scale 1
  logits = jnp.asarray([[-9.0, 4.0, -1.0, 0.0, 9.0, -9.0]], jnp.float32)
  extra = two_tower._top_words(logits, k, raw_scale, activation="sigmoid")  # pylint: disable=protected-access
  p = 1.0 / (1.0 + np.exp(-np.asarray(logits[0], np.float64)))
  np.testing.assert_array_equal(np.asarray(extra["extra_tokens"][0]), [4, 1])
  np.testing.assert_allclose(np.asarray(extra["extra_values"][0]), [p[4] - p[3], p[1] - p[3]], rtol=1e-5)
  soft = two_tower._top_words(logits, k, raw_scale)  # pylint: disable=protected-access
  assert float(soft["extra_values"][0, 1]) < 0.05 < float(extra["extra_values"][0, 1])
  off = two_tower._top_words(  # pylint: disable=protected-access
      logits, k, raw_scale, on=jnp.asarray([False]), activation="sigmoid")
  np.testing.assert_array_equal(np.asarray(off["extra_values"]), 0.0)
  # The model: a sigmoid head starts every word at p = 1 / vocab; an unknown activation is an error at init.
  cfg = two_tower.get_config("fusion", "pico", vocab_size=100, max_len=8, embed_dim=16, lexical_dim=128,
                             image_expansion_k=4, image_words_activation="sigmoid")
  batch = two_tower.dummy_batch(cfg, image_size=16)
  params = two_tower.TwoTower(cfg).init(jax.random.PRNGKey(0), batch)["params"]
  np.testing.assert_allclose(np.asarray(nn.meta.unbox(params)["heads"]["image_words"]["bias"]), -math.log(100),
                             rtol=1e-6)
  cfg.image_words_activation = "tanh"
  with pytest.raises(ValueError, match="image_words_activation='tanh'"):
    two_tower.TwoTower(cfg).init(jax.random.PRNGKey(0), batch)


def test_texture_histogram_puts_stripes_energy_in_their_orientation_bin_at_their_scale():
  img = np.full((4, 16, 16, 3), 128, np.uint8)  # 0: plain grey
  img[1, :, ::2] = 255  # 1: vertical stripes one pixel wide (grey varies along x: orientation 0)
  img[2, ::4] = img[2, 1::4] = 0  # 2: horizontal stripes two pixels wide (grey varies along y: 90 degrees)
  img[3, 4:12, 4:12, :][:, ::4] = 0  # 3: vertical stripes in the central half only
  h = np.asarray(two_tower.texture_histogram(jnp.asarray(img), 4)).reshape(4, 2, 2, 4)  # [B, scale, region, bin]
  np.testing.assert_array_equal(h[0], 0.0)
  # Full resolution, whole image: one pixel wide stripes change grey between every pair of columns.
  assert h[1, 0, 0, 0] > 1.0 and np.all(h[1, :, :, 1:] == 0.0)
  # At half resolution they average out to a plain grey; two pixels wide ones survive it.
  np.testing.assert_array_equal(h[1, 1], 0.0)
  assert np.all(h[2, :, :, 2] > 0.5) and np.all(h[2, :, :, [0, 1, 3]] == 0.0)
  # Texture in the middle weighs more in the central half's features than in the whole image's.
  assert h[3, 0, 1, 0] > h[3, 0, 0, 0] > 0.0
  with pytest.raises(TypeError, match="uint8"):
    two_tower.texture_histogram(jnp.asarray(img, jnp.float32), 4)
  with pytest.raises(ValueError, match="8x8"):
    two_tower.texture_histogram(jnp.asarray(img[:, :4, :4]), 4)


def test_image_words_head_reads_the_texture_histogram():
  cfg = two_tower.get_config("fusion", "pico", vocab_size=100, max_len=8, embed_dim=16, lexical_dim=128,
                             image_expansion_k=4, image_words_color_bins=2, image_words_texture_bins=4)
  model = two_tower.TwoTower(cfg)
  batch = two_tower.dummy_batch(cfg, image_size=16)
  params = jax.tree.map(np.asarray, nn.meta.unbox(model.init(jax.random.PRNGKey(0), batch)["params"]))
  width = cfg.vit.get("head_dim") or cfg.vit.width
  assert params["heads"]["image_words"]["kernel"].shape == (width + 8 + 16, 100)
  # A head that reads only the full-resolution, whole-image orientation-0 bin, into word 42: vertical stripes add
  # word 42 to the product's bag, a plain image of the same mean colour does not.
  kernel = np.zeros_like(params["heads"]["image_words"]["kernel"])
  kernel[width + 8, 42] = 10.0
  params["heads"]["image_words"] = {"kernel": kernel, "bias": np.zeros(100, np.float32)}
  img = np.full((2, 16, 16, 3), 128, np.uint8)
  img[0, :, ::2], img[0, :, 1::2] = 255, 0
  tokens = np.array([[5, 6, 0, 0, 0, 0, 0, 0]] * 2)
  p = model.apply({"params": params}, tokens, img, np.array([True, True]), method="embed_product")
  q = model.apply({"params": params}, np.array([[42, 0, 0, 0, 0, 0, 0, 0]]), method="embed_query")
  lex_q, lex_p = np.asarray(q["emb"][0, 16:]), np.asarray(p["emb"][:, 16:])
  assert lex_p[0] @ lex_q > 0.1 and abs(lex_p[1] @ lex_q) < 1e-3
  bad = two_tower.TwoTower(two_tower.get_config("fusion", "pico", vocab_size=100, max_len=8, lexical_dim=128,
                                                image_expansion_k=4, image_words_texture_bins=-1))
  with pytest.raises(ValueError, match="image_words_texture_bins=-1"):
    bad.init(jax.random.PRNGKey(0), batch)


def test_image_words_head_reads_the_color_histogram():
  cfg = two_tower.get_config("fusion", "pico", vocab_size=100, max_len=8, embed_dim=16, lexical_dim=128,
                             image_expansion_k=4, image_words_color_bins=2)
  model = two_tower.TwoTower(cfg)
  batch = two_tower.dummy_batch(cfg, image_size=16)
  params = jax.tree.map(np.asarray, nn.meta.unbox(model.init(jax.random.PRNGKey(0), batch)["params"]))
  width = cfg.vit.get("head_dim") or cfg.vit.width
  assert params["heads"]["image_words"]["kernel"].shape == (width + 8, 100)
  # A head that reads only the histogram's red bin, into word 42: a red image adds word 42 to the product's bag,
  # a blue one does not, whatever the ViT makes of them.
  kernel = np.zeros_like(params["heads"]["image_words"]["kernel"])
  kernel[width + 4, 42] = 10.0
  params["heads"]["image_words"] = {"kernel": kernel, "bias": np.zeros(100, np.float32)}
  img = np.zeros((2, 16, 16, 3), np.uint8)
  img[0], img[1] = (255, 0, 0), (0, 0, 255)
  tokens = np.array([[5, 6, 0, 0, 0, 0, 0, 0]] * 2)
  p = model.apply({"params": params}, tokens, img, np.array([True, True]), method="embed_product")
  q = model.apply({"params": params}, np.array([[42, 0, 0, 0, 0, 0, 0, 0]]), method="embed_query")
  lex_q = np.asarray(q["emb"][0, 16:])
  lex_p = np.asarray(p["emb"][:, 16:])
  assert lex_p[0] @ lex_q > 0.1 and abs(lex_p[1] @ lex_q) < 1e-3
  bad = two_tower.TwoTower(two_tower.get_config("fusion", "pico", vocab_size=100, max_len=8, lexical_dim=128,
                                                image_expansion_k=4, image_words_color_bins=-1))
  with pytest.raises(ValueError, match="image_words_color_bins=-1"):
    bad.init(jax.random.PRNGKey(0), batch)


def test_fused_head_can_read_the_pooled_image():
  model, params, out = _run("fusion")  # the default
  cfg = model.config
  params = jax.tree.map(np.asarray, nn.meta.unbox(params))
  kernel = params["heads"]["fused"]["kernel"]
  streams = 2 * cfg.fusion.width  # the fusion network's pooled text and image streams, then the pooled image
  assert kernel.shape[0] == streams + cfg.vit.width
  # The pooled image's rows of the kernel matter: zeroing them changes the fused embedding; a product without an
  # image still embeds as its text alone (gate 0).
  cut = jax.tree.map(np.copy, params)
  cut["heads"]["fused"]["kernel"][streams:] = 0.0
  out2 = _jit(model.apply)({"params": cut}, _batch(title=True))
  f1, f2 = np.asarray(out["product"]["fused_emb"]), np.asarray(out2["product"]["fused_emb"])
  assert np.abs(f1[0] - f2[0]).max() > 1e-3
  np.testing.assert_allclose(out2["product"]["emb"][1], out["product"]["emb"][1], rtol=1e-5, atol=1e-6)
  _, plain, _ = _run("fusion", fused_pooled_image=False)
  assert nn.meta.unbox(plain)["heads"]["fused"]["kernel"].shape[0] == streams


def test_lexical_token_weights_start_shared_words_at_their_idf():
  idf = np.array([0.0, 0.05, 1.0, 7.5], np.float32)
  raw = two_tower.lexical_token_weights(idf)
  np.testing.assert_allclose(jax.nn.softplus(raw) ** 2, np.maximum(idf, 1e-4), rtol=1e-4)
  # In the segment: a query sharing a rare word with a product scores above one sharing a common word.
  seg = two_tower.LexicalSegment(vocab_size=4, dim=8)
  params = {"params": {"token_weight": raw}}
  bag = np.asarray(seg.apply(params, np.array([[1, 3], [3, 0], [1, 0]])))
  assert bag[0] @ bag[1] > 5 * (bag[0] @ bag[2]) > 0
  flat = np.asarray(seg.apply({"params": {"token_weight": np.full(4, np.log(np.e - 1), np.float32)}},
                              np.array([[1, 3], [3, 0], [1, 0]])))
  np.testing.assert_allclose(flat[0] @ flat[1], flat[0] @ flat[2], rtol=1e-6)  # the default weighs them alike


def test_query_translation_adds_the_catalogues_words_for_the_querys_to_its_lexical_segment():
  k, dim, d = 2, 128, 16
  cfg = two_tower.get_config("text_only", "pico", vocab_size=100, max_len=8, embed_dim=d, lexical_dim=dim,
                             query_translation_k=k)
  model = two_tower.TwoTower(cfg)
  params = jax.tree.map(np.asarray, nn.meta.unbox(model.init(jax.random.PRNGKey(0), two_tower.dummy_batch(
      cfg, image_size=16))["params"]))
  targets = params["query_translation"]["targets"]
  np.testing.assert_array_equal(targets, -1.0)  # an empty table until the trainer fills it
  query = np.array([[7, 9, 0, 0, 0, 0, 0, 0]])

  def lex(p, tokens=query, method="embed_query", *extra):
    e = np.asarray(model.apply({"params": p}, tokens, *extra, method=method)["emb"][:, d:])
    return e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)

  plain = lex(params)
  table = targets.copy()
  table[7] = [42, -1]  # the shopper's 7 is the catalogue's 42
  table[9] = [43, 44]
  table[0] = [50, 51]  # padding adds nothing, whatever the table says
  params["query_translation"]["targets"] = table
  # At init every token weighs 1: the bag holds 7, 9 and their translations, one occurrence each.
  want = np.zeros(dim, np.float32)
  want[[7, 9, 42, 43, 44]] = np.log(2.0)
  np.testing.assert_allclose(lex(params)[0], want / np.linalg.norm(want), atol=1e-6)
  # A product that says 42 and not 7 now shares a term with the query; without the table it shared none.
  products = np.array([[42, 11, 0, 0, 0, 0, 0, 0], [11, 12, 0, 0, 0, 0, 0, 0]])
  p_lex = lex(params, products, "embed_product", None, None)
  assert lex(params)[0] @ p_lex[0] > 0.1 and abs(plain[0] @ p_lex[0]) < 1e-6 and abs(lex(params)[0] @ p_lex[1]) < 1e-6
  # The table is data: no gradient reaches it.
  def score(t):
    ps = dict(params, query_translation={"targets": t})
    return jnp.sum(model.apply({"params": ps}, query, method="embed_query")["emb"][0, d:] * p_lex[0])
  np.testing.assert_array_equal(jax.grad(score)(table), 0.0)
  # without_part empties it: the plain bag again.
  np.testing.assert_allclose(lex(two_tower.without_part(params, cfg, "query_translation")), plain, atol=1e-6)
  # Not without a lexical segment.
  bad = two_tower.TwoTower(two_tower.get_config("text_only", "pico", vocab_size=100, max_len=8,
                                                query_translation_k=k))
  with pytest.raises(ValueError, match=r"query_translation_k=2 adds .* needs config.model.lexical_dim > 0"):
    bad.init(jax.random.PRNGKey(0), two_tower.dummy_batch(bad.config, image_size=16))


def test_without_part_switches_one_part_of_the_embeddings_off():
  d, dim = 16, 64
  cfg = two_tower.get_config("fusion", "pico", vocab_size=100, max_len=8, embed_dim=d, lexical_dim=dim,
                             image_expansion_k=4)
  model = two_tower.TwoTower(cfg)
  batch = two_tower.dummy_batch(cfg, image_size=16)
  params = jax.tree.map(np.asarray, nn.meta.unbox(model.init(jax.random.PRNGKey(0), batch)["params"]))
  params["fusion"]["gate_out"]["kernel"] = np.random.default_rng(0).normal(
      size=params["fusion"]["gate_out"]["kernel"].shape).astype(np.float32)  # a gate that depends on the product
  assert two_tower.embedding_parts(cfg) == ("image_words", "fused_branch", "text_branch", "lexical", "dense")
  tokens = np.array([[5, 6, 7, 0, 0, 0, 0, 0]] * 2)
  has = np.array([True, False])
  rng = np.random.default_rng(1)
  img_a = rng.integers(0, 256, size=batch["image"][:2].shape, dtype=np.uint8)
  img_b = rng.integers(0, 256, size=img_a.shape, dtype=np.uint8)

  def product(p, image=img_a):
    return {k: np.asarray(v) for k, v in
            model.apply({"params": p}, tokens, image, has, method="embed_product").items()}

  def query(p):
    return np.asarray(model.apply({"params": p}, tokens[:1], method="embed_query")["emb"])

  full = product(params)
  before = jax.tree.map(np.copy, params)
  off = {part: two_tower.without_part(params, cfg, part) for part in two_tower.embedding_parts(cfg)}
  jax.tree.map(np.testing.assert_array_equal, params, before)  # the trained parameters are not touched
  # The image's words: with them the product's lexical segment follows its image; without, only its text.
  assert not np.allclose(full["emb"][0, d:], product(params, img_b)["emb"][0, d:])
  np.testing.assert_allclose(product(off["image_words"])["emb"][0, d:],
                             product(off["image_words"], img_b)["emb"][0, d:], atol=1e-6)
  # The fused branch off: the dense product is its text embedding; the text branch off: the fused one (with an
  # image; a product without one keeps its text embedding).
  assert 0.0 < full["gate"][0] < 1.0
  got = product(off["fused_branch"])
  np.testing.assert_allclose(got["dense_emb"], got["text_emb"], atol=1e-6)
  got = product(off["text_branch"])
  np.testing.assert_allclose(got["dense_emb"][0], got["fused_emb"][0], atol=1e-6)
  np.testing.assert_allclose(got["dense_emb"][1], got["text_emb"][1], atol=1e-6)
  # The lexical segment off: queries and products are their dense embeddings (zeros after them); dense off: the
  # other way round. Either way a unit vector.
  for part, kept, zero in (("lexical", slice(0, d), slice(d, None)), ("dense", slice(d, None), slice(0, d))):
    p, q = product(off[part])["emb"], query(off[part])
    for e in (p, q):
      np.testing.assert_array_equal(e[:, zero], 0.0)
      np.testing.assert_allclose(np.linalg.norm(e[:, kept], axis=-1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match=r"has the parts \('lexical', 'dense'\)"):
    txt = two_tower.get_config("text_only", "pico", vocab_size=100, max_len=8, embed_dim=d, lexical_dim=dim)
    two_tower.without_part(params, txt, "fused_branch")
