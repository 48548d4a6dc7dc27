"""Scale-out on one CPU: the sharded loss and the trainer on simulated 8-device meshes.

The mesh checks need `XLA_FLAGS=--xla_force_host_platform_device_count=8` before JAX starts, so they
run in a child process: this file run as a script (`python tests/test_sharding.py CHECK OUT.json`),
which measures and writes JSON; the tests below assert on it. The rest of the suite keeps 1 device.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_DEVICES = 8
STEPS = 4
TOL = 2e-5  # float32 sums in another order: a few ulps per step
# Children compile with less LLVM optimisation: half the compile time of these tiny programs on CPU;
# the runs they compare share the flag.
FAST_COMPILE = "--xla_backend_optimization_level=0"


# ------------------------------------------------------------------------------------ child checks


def small_config(data_dir: str, variant: str = "fusion", **model):
  """Returns the tiny trainer config with "pico" towers (compiles in seconds; fusion has every module)."""
  sys.path.insert(0, str(ROOT / "tests"))
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from mmr_jax.models import two_tower  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(data_dir, variant=variant, progress=False, eval_every=0, steps=STEPS, log_every=1,
                    ckpt_every=100)
  m = two_tower.get_config(cfg.model.variant, "pico", patch_size=8, vocab_size=-1, max_len=64, embed_dim=32)
  m.name = cfg.model.name
  m.update(model)
  cfg.model = m
  return cfg


def _leaf_info(tree) -> dict:
  """Returns {path: [shape, shard shape, spec, number of distinct shards]} of a tree of jax.Arrays."""
  import jax  # pylint: disable=g-import-not-at-top
  out = {}
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    shard = x.addressable_shards[0].data.shape
    spec = getattr(x.sharding, "spec", None)
    distinct = len({tuple((s.start, s.stop) for s in sh.index) for sh in x.addressable_shards})
    out[jax.tree_util.keystr(path)] = [list(x.shape), list(shard), str(spec), distinct]
  return out


def _rel_diff(a, b, init) -> float:
  """Returns |a - b| / |b - init| over whole trees (L2): disagreement relative to how far training moved.

  Max-abs differences are the wrong yardstick after Adam steps: a parameter whose gradient is ~0
  gets a full +-lr update from rounding noise alone, whatever the mesh.
  """
  import jax  # pylint: disable=g-import-not-at-top
  sq = lambda t: sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in jax.tree.leaves(t))  # noqa: E731
  diff = jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)
  moved = jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), b, init)
  return float(np.sqrt(sq(diff) / max(sq(moved), 1e-30)))


def _max_diff(a, b) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))) for x, y in zip(la, lb))


def check_losses() -> dict:
  """Sharded vs dense loss values, metrics and gradients; per-device memory as devices grow."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmr_jax.training import losses, sharded_loss  # pylint: disable=g-import-not-at-top
  from mmr_jax import sharding as shd  # pylint: disable=g-import-not-at-top

  n, d = 32, 8
  rng = np.random.default_rng(0)
  a = rng.normal(size=(n, d)).astype(np.float32)
  b = (a + 0.7 * rng.normal(size=(n, d))).astype(np.float32)  # correlated: accuracies are neither 0 nor 1
  a /= np.linalg.norm(a, axis=1, keepdims=True)
  b /= np.linalg.norm(b, axis=1, keepdims=True)
  pidx = np.arange(100, 100 + n, dtype=np.int32)
  pidx[[9, 20]] = pidx[3]  # the same product three times, across shards
  positives = np.full((n, 3), -1, np.int32)
  positives[0, 0], positives[5, :2], positives[31, 0] = pidx[7], [pidx[1], pidx[30]], pidx[0]
  weights = rng.uniform(0.5, 2.0, size=n).astype(np.float32)
  weights[2] = 0.0
  masks = {"ids": (pidx, positives), "dense": losses.make_pos_mask(pidx, positives), "none": None}

  def dense(kind, mask):
    if kind == "softmax":
      return lambda a, b, s, bias: losses.softmax_contrastive(a, b, s, mask, weights)
    return lambda a, b, s, bias: losses.sigmoid_contrastive(a, b, s, bias, mask, weights)

  def sharded(kind, mask, how, w=weights):
    if kind == "softmax":
      return lambda a, b, s, bias: sharded_loss.softmax_contrastive(a, b, s, mask, w, method=how)
    return lambda a, b, s, bias: sharded_loss.sigmoid_contrastive(a, b, s, bias, mask, w, method=how)

  args = (a, b, jnp.float32(2.5), jnp.float32(-4.0))
  out = {}
  for kind in ("softmax", "sigmoid"):
    for form in ("ids", "dense", "none"):
      grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))  # noqa: E731
      (l0, m0), g0 = grad(dense(kind, masks[form]))(*args)
      meshes = {"data8": {"data": 8}, "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2}}
      for mesh_name, shape in meshes.items():
        if form != "ids" and mesh_name != "data8":
          continue
        mesh = shd.make_mesh(shape)
        for how in ("ring", "gather") if form == "ids" else ("ring",):  # masks: one code path for both
          with jax.set_mesh(mesh):
            (l1, m1), g1 = grad(sharded(kind, masks[form], how))(*args)
          out[f"{kind}/{form}/{mesh_name}/{how}"] = dict(
              loss=[float(l0), float(l1)], grad_err=_max_diff(g0, g1),
              grad_scale=max(float(np.max(np.abs(g))) for g in g0),
              metric_keys=[sorted(m0), sorted(m1)],
              metrics={k: [float(m0[k]), float(m1[k])] for k in m0 if k in m1})

  # Compile-only per-device memory of loss + gradients at a fixed global batch on 1, 2, 4, 8 devices
  # (1 device: the dense loss, the baseline every sharded form must beat).
  n, d = 2048, 32

  def temp_bytes(kind, how, k):
    return sharded_loss.loss_grad_temp_bytes(kind, how, n, d, jax.devices()[:k])

  memory = {}
  for kind in ("softmax", "sigmoid"):
    single = temp_bytes(kind, "dense", 1)
    for how in ("ring", "gather"):
      memory[f"{kind}/{how}"] = [single] + [temp_bytes(kind, how, k) for k in (2, 4, 8)]
  return {"losses": out, "memory": memory}


def _batches(cfg, n):
  from mmr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  it = pipeline.make_train_iterator(cfg.data.dir, cfg.stage, cfg.data, seed=cfg.seed, split="train")
  return [next(it) for _ in range(n)]


def _train_on_mesh(cfg, shape, num_devices, workdir, start=None):
  """Returns (losses per step, final state, initial state on the host) of STEPS steps on the first devices.

  start: a host TrainState to place onto this mesh's shardings instead of compiling its own init.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from mmr_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from mmr_jax import train  # pylint: disable=g-import-not-at-top
  mesh = shd.make_mesh(shape, jax.devices()[:num_devices])
  trainer = train.Trainer(cfg, workdir, mesh=mesh)
  state = trainer.init_state() if start is None else jax.device_put(start, trainer.state_shardings)
  start = jax.device_get(state)
  losses = []
  for batch in _batches(cfg, STEPS):
    state, metrics = trainer.step(state, batch)
    losses.append(float(metrics["loss"]))
  return losses, state, start


# name: (mesh shape, loss.sharded, own_init). Without own_init a mesh starts from the 1-device init
# placed onto its shardings (one compile less); FSDP compiles its own, sharded-from-birth init.
MESHES = {
    "data8": ({"data": 8}, "auto", False),  # auto: the ring loss
    "fsdp8": ({"fsdp": 8}, "gather", True),
    "data4_tensor2": ({"data": 4, "tensor": 2}, "ring", False),
}


def check_meshes(data_dir: str, workdir: str, which: list[str]) -> dict:
  """The same config trained on 1 device and on 8-device meshes: losses, parameters, layouts."""
  import jax  # pylint: disable=g-import-not-at-top
  from mmr_jax import train  # pylint: disable=g-import-not-at-top
  ref_losses, ref, start = _train_on_mesh(train.resolve_config(small_config(data_dir)), {"data": 1}, 1, workdir)
  ref_params = jax.device_get(ref.params)
  out = {"single": {"losses": ref_losses}}
  for name in which:
    shape, sharded, own_init = MESHES[name]
    cfg = small_config(data_dir)
    cfg.loss.sharded = sharded
    losses, state, _ = _train_on_mesh(train.resolve_config(cfg), shape, NUM_DEVICES, workdir,
                                      None if own_init else start)
    params = jax.device_get(state.params)
    out[name] = dict(losses=losses, param_rel_err=_rel_diff(params, ref_params, start.params),
                     param_max_err=_max_diff(params, ref_params), params=_leaf_info(state.params),
                     opt_state=_leaf_info(state.opt_state))
  return out


def check_elastic(data_dir: str, workdir: str) -> dict:
  """Trains on 8 devices, is preempted at step 2, resumes on a 4-device mesh; returns what it saw.

  The text_only variant: resuming is about the state's layout, not the towers (and it compiles fast).
  """
  import signal  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from mmr_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  from mmr_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from mmr_jax import train  # pylint: disable=g-import-not-at-top
  wd = pathlib.Path(workdir) / "elastic"
  seen = {}

  def preempt_at_2(step, state):
    seen.setdefault("devices_before", len(jax.tree.leaves(state.params)[0].sharding.device_set))
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  def record(step, state):
    seen.setdefault("first_step_after_resume", step)
    seen["devices_after"] = len(jax.tree.leaves(state.params)[0].sharding.device_set)

  config = lambda: small_config(data_dir, "text_only")  # noqa: E731
  train.train_and_evaluate(config(), str(wd), mesh=shd.make_mesh({"data": 8}), hooks=[preempt_at_2])
  seen["steps_saved"] = ckpt_lib.Checkpointer(str(wd)).all_steps()
  train.train_and_evaluate(config(), str(wd), mesh=shd.make_mesh({"data": 4}, jax.devices()[:4]), hooks=[record])
  rows = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  seen["losses"] = {r["step"]: r["loss"] for r in rows if "loss" in r}
  params, step = ckpt_lib.restore_params(str(wd))
  seen["final_step"] = step
  ref_losses, ref, start = _train_on_mesh(train.resolve_config(config()), {"data": 1}, 1, str(wd / "ref"))
  seen["reference_losses"] = ref_losses
  seen["param_rel_err"] = _rel_diff(params, jax.device_get(ref.params), start.params)
  return seen


def check_remat(data_dir: str, workdir: str) -> dict:
  """Loss and gradients of one training batch with and without remat + scan over layers (1 device)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mmr_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from mmr_jax import train  # pylint: disable=g-import-not-at-top
  from mmr_jax.models import pretrained  # pylint: disable=g-import-not-at-top
  mesh = shd.make_mesh({"data": 1}, jax.devices()[:1])

  def config(remat_scan):
    cfg = small_config(data_dir)
    for t in ("vit", "text", "fusion"):  # two layers, so scan really loops
      cfg.model[t].update(depth=2, remat=remat_scan, scan_layers=remat_scan)
    return train.resolve_config(cfg)

  def value_and_grad(cfg, params, batch):
    """Returns (loss, grads, primitive names of the gradient's jaxpr)."""
    trainer = train.Trainer(cfg, workdir, mesh=mesh)
    loss = lambda p: trainer._loss(p, batch, jax.random.PRNGKey(0), True)  # pylint: disable=protected-access  # noqa: E731
    with trainer.context():  # pylint: disable=protected-access
      fn = jax.value_and_grad(loss, has_aux=True)
      (value, _), grads = jax.jit(fn)(params)
      text = str(jax.make_jaxpr(fn)(params))
    names = set(re.findall(r"\b([a-z_0-9]+)\[", text))
    return float(value), jax.device_get(grads), {p for p in names if p.startswith(("remat", "checkpoint", "scan"))}

  plain, fancy = config(False), config(True)
  batch = _batches(plain, 1)[0]
  # Random weights of the right shapes: equality needs no trained (or even initialised) model.
  rng = np.random.default_rng(0)
  abstract = train.Trainer(plain, workdir, mesh=mesh).abstract_state.params
  params = jax.tree.map(lambda a: (0.1 * rng.normal(size=a.shape)).astype(a.dtype), abstract)
  loss0, g0, prims0 = value_and_grad(plain, params, batch)
  loss1, g1, prims1 = value_and_grad(fancy, pretrained.stack_layers(params), batch)
  g0 = pretrained.stack_layers(g0)  # the scan layout, leaf for leaf
  k0 = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(g0)]
  k1 = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(g1)]
  zeros = jax.tree.map(np.zeros_like, g0)
  return dict(loss=[loss0, loss1], same_leaves=k0 == k1, primitives=[sorted(prims0), sorted(prims1)],
              scanned_leaves=sum("['encoderblock']" in k for k in k1),
              grad_rel_err=_rel_diff(g1, g0, zeros) if k0 == k1 else None)


def _child_main(argv):
  check, out_path = argv[0], argv[1]
  import jax  # pylint: disable=g-import-not-at-top
  cache = os.environ.get("MMR_TEST_XLA_CACHE")
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  assert jax.device_count() == NUM_DEVICES, jax.devices()
  seconds = {}

  def timed(name, fn, *args):
    t = time.time()
    out = fn(*args)
    seconds[name] = round(time.time() - t, 1)
    return out

  if check == "fast":
    result = timed("losses", check_losses)
    result["meshes"] = timed("meshes", check_meshes, argv[2], argv[3], ["data8"])
    result["remat"] = timed("remat", check_remat, argv[2], argv[3])
  elif check == "slow":
    result = {"meshes": timed("meshes", check_meshes, argv[2], argv[3], ["fsdp8", "data4_tensor2"])}
    result["elastic"] = timed("elastic", check_elastic, argv[2], argv[3])
  else:
    raise SystemExit(f"unknown check {check!r}")
  result["seconds"] = seconds
  pathlib.Path(out_path).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("mesh_xla_cache"))


def run_child(tmp_path, xla_cache, *args, timeout=600) -> dict:
  """Returns the JSON a check wrote, run in a child process with 8 simulated CPU devices."""
  out = tmp_path / f"{args[0]}.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", MMR_TEST_XLA_CACHE=xla_cache, TF_CPP_MIN_LOG_LEVEL="2",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE} "
                       f"--xla_force_host_platform_device_count={NUM_DEVICES}".strip())
  r = subprocess.run([sys.executable, __file__, args[0], str(out), *map(str, args[1:])], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, f"child check {args[0]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}"
  return json.loads(out.read_text())


@pytest.fixture(scope="module")
def fast_checks(tmp_path_factory, xla_cache, tiny_data):
  """One child for the quick checks (the process start and imports are a good part of their cost)."""
  tmp = tmp_path_factory.mktemp("fast")
  return run_child(tmp, xla_cache, "fast", tiny_data, tmp / "wd")


def test_sharded_losses_equal_dense_values_metrics_and_gradients(fast_checks):
  results = fast_checks["losses"]
  assert len(results) == 2 * (2 * 2 + 2)  # kinds x (ids: 2 meshes x 2 methods + dense/none: ring)
  for name, r in results.items():
    dense, sharded = r["loss"]
    assert abs(dense - sharded) <= 1e-5 * max(1.0, abs(dense)), (name, r["loss"])
    assert r["grad_err"] <= 1e-5 * max(1.0, r["grad_scale"]), (name, r["grad_err"])
    assert r["metric_keys"][0] == r["metric_keys"][1], name
    for k, (m0, m1) in r["metrics"].items():
      assert abs(m0 - m1) <= 1e-5 * max(1.0, abs(m0)), (name, k, m0, m1)
  # The masks matter (the test data has duplicates and positives), so they were really applied.
  assert results["softmax/ids/data8/ring"]["loss"][0] != results["softmax/none/data8/ring"]["loss"][0]
  accs = [r["metrics"]["acc_a2b"][0] for r in results.values()]
  assert 0.0 < min(accs) and max(accs) < 1.0


def test_sharded_loss_memory_per_device_falls_as_devices_grow(fast_checks):
  for name, row in fast_checks["memory"].items():
    assert all(b < a for a, b in zip(row, row[1:])), (name, row)  # 1, 2, 4, 8 devices
  # The ring keeps [N/P, N/P] blocks: 8 devices need far less than an eighth of the dense loss.
  for kind in ("softmax", "sigmoid"):
    ring = fast_checks["memory"][f"{kind}/ring"]
    assert ring[-1] < ring[0] / 16, ring


def _assert_same_training(single, run, name):
  np.testing.assert_allclose(run["losses"], single["losses"], rtol=TOL, atol=TOL, err_msg=name)
  assert run["param_rel_err"] < 1e-2, (name, run["param_rel_err"])
  assert run["param_max_err"] < 2e-3, (name, run["param_max_err"])  # at most ~one peak-lr (2e-3) step apart


def test_data_parallel_8_devices_equals_single_device(fast_checks):
  r = fast_checks["meshes"]
  assert len(r["single"]["losses"]) == STEPS
  _assert_same_training(r["single"], r["data8"], "data8")
  # Pure data parallelism: parameters are whole on every device.
  for path, (shape, shard, _, distinct) in r["data8"]["params"].items():
    assert shard == shape and distinct == 1, path


@pytest.fixture(scope="module")
def slow_checks(tmp_path_factory, xla_cache, tiny_data):
  tmp = tmp_path_factory.mktemp("slow")
  return run_child(tmp, xla_cache, "slow", tiny_data, tmp / "wd")


def _bytes(info, select=lambda path: True):
  total = sum(np.prod(shape) for p, (shape, _, _, _) in info.items() if select(p))
  local = sum(np.prod(shard) for p, (_, shard, _, _) in info.items() if select(p))
  return total, local


@pytest.mark.slow
def test_fsdp_and_tensor_parallel_shard_and_equal_single_device(slow_checks):
  r = slow_checks["meshes"]
  _assert_same_training(r["single"], r["fsdp8"], "fsdp8")
  _assert_same_training(r["single"], r["data4_tensor2"], "data4_tensor2")

  fsdp = r["fsdp8"]
  for path, (shape, shard, spec, distinct) in fsdp["params"].items():
    if "fsdp" in spec:
      assert np.prod(shard) * NUM_DEVICES == np.prod(shape) and distinct == NUM_DEVICES, (path, shape, shard)
    if path.endswith(("['kernel']", "['embedding']")) and ("encoderblock" in path or "Embed_0" in path):
      assert "fsdp" in spec, (path, spec)  # every tower's matrices are split
  total, local = _bytes(fsdp["params"])
  assert local < total / 4, (local, total)  # mostly split 8 ways (a few small heads stay whole)
  # Adam's moments follow their parameters.
  moments = lambda p: ".mu[" in p or ".nu[" in p  # noqa: E731
  total, local = _bytes(fsdp["opt_state"], moments)
  assert total > 0 and local < total / 4, (local, total)
  split = [p for p, (_, _, spec, _) in fsdp["opt_state"].items() if moments(p) and "fsdp" in spec]
  assert any("encoderblock" in p and "MlpBlock_0" in p for p in split), split[:5]

  tp = r["data4_tensor2"]
  checked = 0
  for path, (shape, shard, spec, _) in tp["params"].items():
    if ("MultiHeadDotProductAttention_0" in path or "_attn" in path or "to_text" in path
        or "to_image" in path) and path.endswith("['kernel']"):
      assert "tensor" in spec, (path, spec)  # heads split over `tensor`
      assert np.prod(shard) * 2 == np.prod(shape), (path, shape, shard)
      checked += 1
    if ("MlpBlock_0']['Dense_0']['kernel']" in path or "_mlp']['Dense_0']['kernel']" in path):
      assert "tensor" in spec and shard[-1] * 2 == shape[-1], (path, spec, shape, shard)
      checked += 1
  assert checked >= 20, checked


@pytest.mark.slow
def test_checkpoint_from_8_devices_resumes_on_4(slow_checks):
  r = slow_checks["elastic"]
  assert r["steps_saved"] == [2]
  assert r["devices_before"] == 8 and r["devices_after"] == 4
  assert r["first_step_after_resume"] == 3 and r["final_step"] == STEPS
  losses = [r["losses"][str(s)] for s in range(1, STEPS + 1)]
  np.testing.assert_allclose(losses, r["reference_losses"], rtol=TOL, atol=TOL)
  assert r["param_rel_err"] < 1e-2, r["param_rel_err"]


def test_remat_and_scan_layers_give_the_same_loss_and_gradients(fast_checks):
  r = fast_checks["remat"]
  assert np.isfinite(r["loss"][0])
  assert abs(r["loss"][0] - r["loss"][1]) < 1e-5, r["loss"]
  assert r["same_leaves"] and r["scanned_leaves"] > 0, r
  plain, fancy = r["primitives"]
  assert "scan" in fancy and any(p.startswith(("remat", "checkpoint")) for p in fancy), fancy  # both really on
  assert not plain, plain
  assert r["grad_rel_err"] < 1e-4, r


# ------------------------------------------------------------------------- in-process unit tests


def _abstract_mesh(**sizes):
  import jax  # pylint: disable=g-import-not-at-top
  from mmr_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  return jax.sharding.AbstractMesh(tuple(sizes.get(a, 1) for a in shd.MESH_AXES), shd.MESH_AXES)


def test_fit_spec_replicates_only_the_dims_an_axis_does_not_divide():
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from mmr_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  mesh = _abstract_mesh(fsdp=4, tensor=2)
  assert shd.fit_spec(P("tensor", "fsdp"), (731, 64), mesh) == P(None, "fsdp")  # odd vocabulary
  assert shd.fit_spec(P("tensor", "fsdp"), (732, 64), mesh) == P("tensor", "fsdp")
  assert shd.fit_spec(P(("data", "fsdp"), None), (6, 3), mesh) == P()
  assert shd.fit_spec(P(), (), mesh) == P()


def test_optimizer_state_shardings_follow_their_parameters():
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from mmr_jax.training import optimizer as optim_lib  # pylint: disable=g-import-not-at-top
  from mmr_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  mesh = shd.make_mesh({"data": 1})
  params = {"tower_a": {"dense": {"kernel": jax.ShapeDtypeStruct((8, 4), "float32"),
                                  "bias": jax.ShapeDtypeStruct((4,), "float32")}},
            "tower_b": {"dense": {"kernel": jax.ShapeDtypeStruct((8, 4), "float32")}}}
  specs = {"tower_a": {"dense": {"kernel": P("fsdp", "tensor"), "bias": P("tensor")}},
           "tower_b": {"dense": {"kernel": P(None, "fsdp")}}}
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))
  optim = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=1, min_lr_ratio=0.0, weight_decay=1e-4, b1=0.9,
                                         b2=0.999, grad_clip=1.0, lr_mult=dict(tower_a=1.0, tower_b=0.5)))
  tx, _ = optim_lib.make_optimizer(optim, 10, params)
  state = jax.eval_shape(tx.init, params)
  out = shd.param_like_shardings(state, params, shardings, shd.replicated(mesh))
  got = {jax.tree_util.keystr(k): s.spec for k, s in jax.tree_util.tree_leaves_with_path(out)}
  # Each tower's masked Adam state holds mu/nu of exactly its own parameters, sharded like them.
  mu_a = [v for k, v in got.items() if "tower_a" in k.split(".mu")[-1] and ".mu" in k and "kernel" in k]
  mu_b = [v for k, v in got.items() if ".nu" in k and "tower_b" in k.split(".nu")[-1]]
  assert mu_a == [P("fsdp", "tensor")] and mu_b == [P(None, "fsdp")], got
  assert [v for k, v in got.items() if k.endswith(".count")] == [P()] * len(
      [k for k in got if k.endswith(".count")]) and any(k.endswith(".count") for k in got)


def test_sharded_loss_method_resolution():
  from mmr_jax.training import sharded_loss  # pylint: disable=g-import-not-at-top
  from mmr_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  dp8 = _abstract_mesh(data=4, fsdp=2, tensor=2)
  assert shd.data_parallel_size(dp8) == 8
  assert sharded_loss.method("auto", 16, dp8) == "ring"
  assert sharded_loss.method("auto", 12, dp8) == "none"  # does not divide: the one-device loss
  assert sharded_loss.method("gather", 16, dp8) == "gather"
  assert sharded_loss.method("ring", 16, _abstract_mesh(tensor=2)) == "none"  # one data shard
  assert sharded_loss.method("auto", 16) == "none"  # no mesh at all
  with pytest.raises(ValueError, match="does not divide"):
    sharded_loss.method("ring", 12, dp8)
  with pytest.raises(ValueError, match="loss.sharded"):
    sharded_loss.method("rings", 16, dp8)


def test_bench_counts_matmul_flops_through_nested_jaxprs():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, str(ROOT / "tools"))
  import bench_train  # pylint: disable=g-import-not-at-top

  def f(x, w):
    y = jax.jit(lambda a: a @ w)(x)  # one [4, 8] x [8, 8] matmul: 2 * 4 * 8 * 8 = 512 FLOPs
    y, _ = jax.lax.scan(lambda c, _: (c @ w, None), y, None, length=3)  # 3 more
    y = jax.checkpoint(lambda a: a @ w)(y)  # 1 more
    return jax.lax.cond(y.sum() > 0, lambda a: (a @ w) @ w, lambda a: a, y)  # costlier branch: 2 more

  jaxpr = jax.make_jaxpr(f)(jnp.ones((4, 8)), jnp.ones((8, 8)))
  assert bench_train.matmul_flops(jaxpr) == 512 * 7


if __name__ == "__main__":
  sys.path.insert(0, str(ROOT))
  _child_main(sys.argv[1:])
