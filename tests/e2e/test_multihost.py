"""Multi-host training on one machine: two local processes joined by jax.distributed (gloo on CPU).

Each process has 2 simulated CPU devices, so the global mesh has 4 devices in both the 2-process
job and the single-process reference (4 devices in one process), with the same global batch.
Runs are children: this file run as a script (`python tests/e2e/test_multihost.py run ...`), alone or
under `launch.multiprocess --script`, writes what it measured; the tests assert on it.

The learning rate is constant (no warmup, min_lr_ratio=1) so a run preempted at step 2 and resumed
to step 4 must match an uninterrupted 4-step run: the schedule does not depend on train.steps.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from mmr_jax.evals import embedding
from mmr_jax import runtime

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROCESSES, DEVICES_PER_PROCESS = 2, 2
STEPS = 4
FAST_COMPILE = "--xla_backend_optimization_level=0"  # see test_sharding.py


def _config(data_dir: str):
  sys.path.insert(0, str(ROOT / "tests"))
  from test_sharding import small_config  # pylint: disable=g-import-not-at-top
  cfg = small_config(data_dir, "text_only")  # the towers are not the point here, and it compiles fast
  cfg.train.ckpt_every = 2
  cfg.optim.warmup_steps = 0
  cfg.optim.min_lr_ratio = 1.0
  return cfg


# ------------------------------------------------------------------------------------- child run


def _embed_all_products(workdir: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  """Returns (product_index [P], embeddings [P, D]) of every product, on every host."""
  from mmr_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from mmr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  model = embedding.load_trained(workdir, data_dir)
  embed = model.embed_products
  it = pipeline.make_eval_iterator(data_dir, "products", "all", model.config.data, batch_size=32)
  ids, embs = [], []
  for batch in it:
    emb = embed(batch)  # [32, D] global: rows of every host
    index = shd.global_to_host(shd.host_batch_to_global({"i": batch["product_index"]}, model.mesh)["i"])
    ids.append(index)
    embs.append(emb)
  ids, embs = np.concatenate(ids), np.concatenate(embs)
  keep = ids >= 0  # pads of the last batch
  return ids[keep], embs[keep]


def _child_run(argv):
  p = argparse.ArgumentParser()
  p.add_argument("what")
  p.add_argument("--data", required=True)
  p.add_argument("--workdir", required=True)
  p.add_argument("--out", required=True)
  p.add_argument("--preempt_at", type=int, default=0)
  p.add_argument("--coordinator_address")
  p.add_argument("--num_processes", type=int)
  p.add_argument("--process_id", type=int)
  args = p.parse_args(argv)
  sys.path.insert(0, str(ROOT))
  import jax  # pylint: disable=g-import-not-at-top
  from mmr_jax import train  # pylint: disable=g-import-not-at-top
  cache = os.environ.get("MMR_COMPILATION_CACHE")
  if cache:
    runtime.enable_compilation_cache(cache)
  runtime.maybe_initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
  seen = {"process_count": jax.process_count(), "device_count": jax.device_count()}

  def preempt(step, state):
    del state
    if step == args.preempt_at:
      # A preemption notice reaches one host, not all at once: the hosts must still stop together.
      if jax.process_index() == 0:
        os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(1.0)  # time for the notice to reach the coordination service before the run ends

  def first_step(step, state):
    del state
    seen.setdefault("first_step_after_resume", step)

  if args.preempt_at:
    train.train_and_evaluate(_config(args.data), args.workdir, hooks=[preempt])
    seen["steps_after_preemption"] = sorted(int(p.name) for p in (pathlib.Path(args.workdir) / "checkpoints").iterdir()
                                            if p.name.isdigit())
    train.train_and_evaluate(_config(args.data), args.workdir, hooks=[first_step])
  else:
    train.train_and_evaluate(_config(args.data), args.workdir)
  ids, embs = _embed_all_products(args.workdir, args.data)
  # The embedding export: each process writes its slice's shards, process 0 merges them.
  from mmr_jax.export import embeddings as export_embeddings  # pylint: disable=g-import-not-at-top
  catalogue = export_embeddings.embed_catalogue(embedding.load_trained(args.workdir, args.data), args.data,
                                                os.path.join(args.workdir, "export"), batch_size=32,
                                                shard_batches=2, progress=False)
  if jax.process_index() == 0:
    np.savez(args.out + ".npz", ids=ids, embs=embs, catalogue=catalogue)
    pathlib.Path(args.out).write_text(json.dumps(seen))


# ------------------------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Environment of the children: CPU, quick compiles, a shared compilation cache, short heartbeats."""
  cache = tmp_path_factory.mktemp("multihost_xla_cache")
  return dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
              XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip(),
              MMR_COMPILATION_CACHE=str(cache), MMR_HEARTBEAT_S="10")


def _result(out: pathlib.Path) -> tuple[dict, dict]:
  data = np.load(str(out) + ".npz")
  return json.loads(out.read_text()), {k: data[k] for k in ("ids", "embs", "catalogue")}


def _losses(workdir):
  rows = [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def runs(tiny_data, tmp_path_factory, env):
  """Runs the single-process reference and the 2-process job (preempted at step 2, then resumed)."""
  tmp = tmp_path_factory.mktemp("multihost")
  single_env = dict(env, XLA_FLAGS=f"{env['XLA_FLAGS']} --xla_force_host_platform_device_count="
                                   f"{PROCESSES * DEVICES_PER_PROCESS}")
  cmd = [sys.executable, __file__, "run", "--data", tiny_data]
  r = subprocess.run(cmd + ["--workdir", str(tmp / "single"), "--out", str(tmp / "single.json")], cwd=ROOT,
                     env=single_env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-6000:]
  r = subprocess.run([sys.executable, "-m", "launch.multiprocess", "-n", str(PROCESSES), "-d",
                      str(DEVICES_PER_PROCESS), "--script", __file__, "--", "run", "--data", tiny_data,
                      "--workdir", str(tmp / "multi"), "--out", str(tmp / "multi.json"), "--preempt_at", "2"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-8000:] + r.stderr[-3000:]
  return dict(tmp=tmp, single=_result(tmp / "single.json"), multi=_result(tmp / "multi.json"))


@pytest.mark.slow
def test_two_processes_train_checkpoint_resume_like_one(runs):
  from mmr_jax import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  tmp = runs["tmp"]
  single, multi = runs["single"][0], runs["multi"][0]
  assert single == {"process_count": 1, "device_count": 4}
  assert multi["process_count"] == 2 and multi["device_count"] == 4
  # Stopped together at an agreed step (the one SIGTERM arrived in, or the next), with its checkpoint.
  stopped = max(multi["steps_after_preemption"])
  assert 2 <= stopped < STEPS and multi["first_step_after_resume"] == stopped + 1, multi
  # Each process saved its own input-pipeline position next to the shared state.
  data_dir = tmp / "multi" / "checkpoints" / "4" / "data"
  assert sorted(p.name for p in data_dir.iterdir() if p.suffix == ".json") == [
      "process_0-of-2.json", "process_1-of-2.json"]

  ls, lm = _losses(tmp / "single"), _losses(tmp / "multi")
  assert sorted(lm) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([lm[s] for s in range(1, STEPS + 1)], [ls[s] for s in range(1, STEPS + 1)],
                             rtol=2e-5, atol=2e-5)
  p_single, _ = ckpt_lib.restore_params(str(tmp / "single"))
  p_multi, step = ckpt_lib.restore_params(str(tmp / "multi"))
  p_mid, _ = ckpt_lib.restore_params(str(tmp / "single"), step=2)
  assert step == STEPS
  sq = lambda t: sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in jax.tree.leaves(t))  # noqa: E731
  diff = sq(jax.tree.map(np.subtract, p_multi, p_single))
  moved = sq(jax.tree.map(np.subtract, p_single, p_mid))
  assert moved > 0 and np.sqrt(diff / moved) < 1e-2, (diff, moved)


@pytest.mark.slow
def test_two_process_evaluation_gives_single_process_embeddings(runs):
  single, multi = runs["single"][1], runs["multi"][1]
  assert sorted(multi["ids"].tolist()) == list(range(len(multi["ids"])))  # every product, once
  assert np.array_equal(np.sort(single["ids"]), np.sort(multi["ids"]))
  a = single["embs"][np.argsort(single["ids"])]
  b = multi["embs"][np.argsort(multi["ids"])]
  assert a.shape[0] > 100 and np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-4)
  np.testing.assert_allclose(b, a, atol=2e-4)  # the two runs' weights differ by float rounding only


@pytest.mark.slow
def test_two_process_embedding_export_equals_single_process(runs):
  """export.embeddings.embed_catalogue on two processes: shards per process, merged in product order by process 0."""
  single, multi = runs["single"][1], runs["multi"][1]
  n = len(single["ids"])
  assert single["catalogue"].shape == multi["catalogue"].shape == (n, single["embs"].shape[1])
  # Same weights, same rows: the export equals the evaluation path's embeddings in product-index order.
  np.testing.assert_allclose(single["catalogue"], single["embs"][np.argsort(single["ids"])], atol=1e-5)
  np.testing.assert_allclose(multi["catalogue"], single["catalogue"], atol=2e-4)
  shards = runs["tmp"] / "multi" / "export" / "shards"
  assert sorted(p.name for p in shards.iterdir()) == ["process_0-of-2", "process_1-of-2"]
  rows = [sum(len(np.load(f)["product_index"]) for f in (shards / d).glob("shard_*.npz"))
          for d in ("process_0-of-2", "process_1-of-2")]
  assert sum(rows) == n and min(rows) > 0  # both processes embedded a share


@pytest.mark.slow
def test_dead_process_makes_the_survivor_fail_fast(tiny_data, tmp_path, env):
  """SIGKILL one process mid-run: the other must exit non-zero within the heartbeat bound, not hang."""
  sys.path.insert(0, str(ROOT))
  from launch import common, multiprocess  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "wd"
  coordinator = f"127.0.0.1:{common.free_port()}"
  overrides = {"train.steps": 100000, "train.log_every": 1, "train.ckpt_every": 100000, "train.eval_every": 0,
               "train.progress": False, "model.vit.width": 32, "model.vit.depth": 1, "model.text.width": 32,
               "model.text.depth": 1, "model.fusion.width": 32, "model.embed_dim": 32}
  procs = []
  for i in range(PROCESSES):
    cmd = common.train_command(f"configs/demo.py:runlocal=True,variant=text_only,data={tiny_data}", str(workdir),
                               overrides)
    penv = multiprocess.process_env(env, process_id=i, num_processes=PROCESSES, coordinator=coordinator,
                                    devices_per_process=DEVICES_PER_PROCESS)
    log = open(tmp_path / f"p{i}.log", "w")  # pylint: disable=consider-using-with
    procs.append((subprocess.Popen(cmd + multiprocess.coordinator_flags(coordinator, PROCESSES, i), cwd=ROOT,
                                   env=penv, stdout=log, stderr=subprocess.STDOUT), log))
  try:
    deadline = time.time() + 400
    metrics = workdir / "metrics.jsonl"
    while time.time() < deadline:  # both processes are in the loop once a few steps are logged
      if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
        break
      assert all(p.poll() is None for p, _ in procs), [p.poll() for p, _ in procs]
      time.sleep(0.5)
    else:
      pytest.fail("training did not start within 400 s")
    survivor, victim = procs[0][0], procs[1][0]
    victim.kill()
    t0 = time.time()
    rc = survivor.wait(timeout=120)  # raises TimeoutExpired (a failure) if it hangs
    elapsed = time.time() - t0
  finally:
    for p, log in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
      log.close()
  text = (tmp_path / "p0.log").read_text()
  assert rc != 0, text[-3000:]
  assert elapsed < 120
  assert ("another task died" in text or "unhealthy" in text or "Gloo" in text), text[-3000:]


if __name__ == "__main__":
  _child_run(sys.argv[1:])
