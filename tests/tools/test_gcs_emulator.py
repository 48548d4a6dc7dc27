"""gs:// end to end against a local GCS emulator (tools/gcs_emulator.py) that these tests start themselves.

Every client the commands use talks to it: TF's GCS filesystem (etils epath, TFDS, grain, Orbax metadata,
TensorBoard, SavedModels), tensorstore (Orbax arrays, the workdir lease) and array_record's google-cloud-cpp
(TFDS data sources).
"""

import json
import os
import subprocess
import sys
import time

import pytest

from tools import gcs_emulator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def gcs_emulator_env():
  """Starts the emulator (bucket `mmr`) on 127.0.0.1 and returns the environment that points clients at it."""
  with gcs_emulator.GcsEmulator(buckets=("mmr",)) as emu:
    yield dict(emu.env)


def _env(emu_env):
  return dict(os.environ, **emu_env, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT,
              MMR_COMPILATION_CACHE="none")


def _run(args, emu_env, timeout=600):
  r = subprocess.run([sys.executable, *args], cwd=ROOT, env=_env(emu_env), capture_output=True, text=True,
                     timeout=timeout)
  assert r.returncode == 0, f"{args}:\n{r.stderr[-4000:]}"
  return r


def _py(code, emu_env):
  return _run(["-c", code], emu_env).stdout


def _train_cmd(stage, data, workdir, *extra):
  return ["-m", "mmr_jax.train", "--config", f"configs/demo.py:stage={stage},runlocal=True,data={data}",
          "--workdir", workdir, "--config.train.eval_every=0", "--config.train.progress=False", *extra]


def test_gcs_emulator_lease_refuses_a_second_holder_and_expires(gcs_emulator_env):
  code = """
import json, time
from mmr_jax import fileio
wd = "gs://mmr/lease_test"
a = fileio.WorkdirLock(wd, "train", ttl_s=3, heartbeat_s=100).acquire()
try:
  fileio.WorkdirLock(wd + "/", "train")._acquire_lease()
  print("NOT REFUSED")
except fileio.WorkdirBusyError as e:
  print("refused:", e)
# The holder stops renewing (heartbeat_s=100 > ttl_s): after ttl_s the lease can be taken over.
time.sleep(3.5)
b = fileio.WorkdirLock(wd + "/", "export")
b._acquire_lease()
print("taken over")
a._kv.write(fileio.LOCK_FILE, b"stale", if_equal=a._generation).result()  # the old holder cannot overwrite it
print("holder now", json.loads(b._kv.read(fileio.LOCK_FILE).result().value)["what"])
b._release()
print("released", b._kvstore().read(fileio.LOCK_FILE).result().state)
"""
  out = _py(code, gcs_emulator_env)
  assert "refused: gs://mmr/lease_test is in use by train pid" in out, out
  assert "NOT REFUSED" not in out
  assert "taken over" in out and "holder now export" in out and "released missing" in out, out


@pytest.mark.slow
def test_gcs_emulator_end_to_end_import_train_evaluate_export(tiny_data, gcs_emulator_env):
  env = gcs_emulator_env
  data = "gs://mmr/data"
  t0 = time.time()
  # Import stays local (object stores cannot rename a folder atomically); then copy the DATA_DIR up.
  _py(f"from mmr_jax import fileio; fileio.upload_dir({tiny_data!r}, {data!r})", env)
  s1, s2, out = "gs://mmr/runs/s1", "gs://mmr/runs/s2", "gs://mmr/runs/s2/export"

  # Stage 1, and a second trainer on the same workdir while the first runs: refused, the first goes on.
  first = subprocess.Popen([sys.executable, *_train_cmd(1, data, s1, "--config.train.steps=6",
                                                         "--config.train.ckpt_every=2")],
                           cwd=ROOT, env=_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    # One watcher process (not one per poll: each would import TF): waits for the lease or the trainer's end.
    lease_seen = "lease" in _py(f"""
import os, time
from mmr_jax import fileio
kv = fileio.WorkdirLock({s1!r}, "x")._kvstore()
for _ in range(1200):
  if kv.read(fileio.LOCK_FILE).result().state == "value":
    print("lease"); break
  try:
    os.kill({first.pid}, 0)
  except OSError:
    break
  time.sleep(0.5)
""", env)
    assert lease_seen, "the first trainer never took the lease"
    second = subprocess.run([sys.executable, *_train_cmd(1, data, s1, "--config.train.steps=6")], cwd=ROOT,
                            env=_env(env), capture_output=True, text=True, timeout=600)
    assert second.returncode != 0
    assert f"gs://mmr/runs/s1 is in use by train pid {first.pid}" in second.stderr, second.stderr[-3000:]
    _, err = first.communicate(timeout=900)
  finally:
    if first.poll() is None:
      first.kill()
      first.wait()
  assert first.returncode == 0, err[-4000:]
  t_s1 = time.time() - t0

  # Stage 2 from stage 1, evaluated in the same job; then export and status, all on gs://.
  _run(_train_cmd(2, data, s2, "--config.train.steps=2", f"--config.init.workdir={s1}", "--evaluate"), env)
  t_s2 = time.time() - t0 - t_s1
  _run(["-m", "mmr_jax.export", "--workdir", s2, "--out", out, "--platforms", "cpu", "--no_progress",
        "--batch_buckets", "1,4", "--warmup_max_batch", "1", "--k", "5"], env)
  status = _run(["tools/status.py", s2], env).stdout
  listing = json.loads(_py(f"""
import json
from etils import epath
s2, out = epath.Path({s2!r}), epath.Path({out!r})
m = json.loads((s2 / "metrics.json").read_text())
summary = json.loads((out / "export_summary.json").read_text())
info = json.loads((out / "embeddings" / "info.json").read_text())
print(json.dumps({{"s2": sorted(p.name for p in s2.iterdir()), "out": sorted(p.name for p in out.iterdir()),
                  "emb": sorted(p.name for p in (out / "embeddings").iterdir()), "step": m["step"],
                  "splits": sorted(m["splits"]), "parity": summary["parity"], "n": info["num_products"],
                  "s1_ckpts": sorted(p.name for p in epath.Path({s1!r}, "checkpoints").iterdir()),
                  "s1_steps": [json.loads(l)["step"] for l in (epath.Path({s1!r}) / "metrics.jsonl").read_text().splitlines()],
                  "lease_left": (s2 / ".lock").exists()}}))
""", env).strip().splitlines()[-1])
  print(f"stage 1 {t_s1:.0f} s, stage 2 + evaluate {t_s2:.0f} s, total {time.time() - t0:.0f} s")
  assert listing["step"] == 2 and "test" in listing["splits"]
  for name in ("metrics.json", "metrics.md", "recall_at_k.png", "product_embeddings.npy", "index", "checkpoints",
               "config.json", "metrics.jsonl", "tb", "compiled_memory.json"):
    assert name in listing["s2"], (name, listing["s2"])
  assert {"query_tower", "product_tower", "serving", "embeddings", "export_summary.json"} <= set(listing["out"])
  assert {"embeddings.npy", "ids.txt", "index", "info.json"} <= set(listing["emb"]) and "shards" not in listing["emb"]
  assert listing["n"] == 300 and listing["parity"]["query_max_abs_diff"] < 1e-4
  assert listing["s1_ckpts"][-1] == "6"
  assert not listing["lease_left"]
  # One history: the refused second trainer wrote nothing into the first one's metrics.jsonl.
  steps = listing["s1_steps"]
  assert steps == sorted(set(steps)) and steps[-1] == 6, steps
  assert "gs://mmr/runs/s2" in status and "step" in status
