"""Tests for launch/: commands each launcher would run, and end-to-end runs with fake trainers / clusters.

Cluster tools (gcloud, scontrol, srun) are replaced by small scripts on PATH that execute what they
are given locally, so the generated shell (quoting, env, coordinator) is really run, not just read.
"""

import argparse
import csv
import json
import os
import re
import shlex
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # `launch` is not an installed package
from launch import common, gke, local, multiprocess, slurm, sweep, tpu_pod
from mmr_jax import sweep_runner

REPO = str(common.REPO_ROOT)
PY = sys.executable

# Launchers build the config locally before submitting (a mistyped key fails there, once), so it has the keys
# the tests override; it reads no data.
FAKE_CONFIG = """
import ml_collections
from launch.sweep import cross, product, zip_

def get_config(arg=None):
  return ml_collections.ConfigDict({"model": {"variant": "a"}, "optim": {"lr": 0.1}, "train": {"steps": 1},
                                    "data": {"dir": ""}})

def get_sweep(arg=None):
  pts = cross(product({"model.variant": ["a", "b"]}), zip_({"optim.lr": [0.1, 0.01]}))
  pts.append({"name": "bad", "model.variant": "fail"})
  return pts
"""

# Records its argv + MMR_* env in WORKDIR/calls.jsonl; fails with code 3 for variant "fail".
FAKE_TRAIN = r"""
import json, os, sys
args = dict(a.split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
wd = args["--workdir"]
os.makedirs(wd, exist_ok=True)
rec = {"argv": sys.argv[1:], "env": {k: v for k, v in os.environ.items() if k.startswith(("MMR_", "FAKE_"))}}
with open(os.path.join(wd, "calls.jsonl"), "a") as f:
  f.write(json.dumps(rec) + "\n")
print("fake train", sys.argv[1:])
if args.get("--config.model.variant") == "fail":
  print("boom: variant fail", file=sys.stderr)
  sys.exit(3)
with open(os.path.join(wd, "trained.json"), "w") as f:
  json.dump({"lr": float(args.get("--config.optim.lr", "1"))}, f)
"""

# Writes metrics.json from what the fake trainer left (so a sweep only has metrics if eval ran).
FAKE_EVAL = r"""
import json, os, sys
wd = [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--workdir=")][0]
lr = json.load(open(os.path.join(wd, "trained.json")))["lr"]
# The layout mmr_jax.evaluate writes (top-level scalars beside the per-split metrics).
test = {"overall": {"recall@10": 0.5 + lr, "recall@100": 0.8 + lr, "ndcg@10": 0.3 + lr},
        "by_tag": {"short": {"recall@10": lr}}}
json.dump({"num_products": 300, "k": [10, 100], "splits": {"test": test, "validation": test}, "step": 3},
          open(os.path.join(wd, "metrics.json"), "w"))
"""


def _write(path, text, executable=False):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(textwrap.dedent(text).lstrip())
  if executable:
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return path


@pytest.fixture
def fakes(tmp_path, monkeypatch):
  """Fake trainer/evaluator modules on PYTHONPATH and a fake config with get_sweep."""
  mods = tmp_path / "mods"
  _write(mods / "fake_train.py", FAKE_TRAIN)
  _write(mods / "fake_eval.py", FAKE_EVAL)
  cfg = _write(tmp_path / "cfgs" / "fake.py", FAKE_CONFIG)
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(mods), REPO]))
  return {"mods": mods, "config": str(cfg)}


def _piped_documents(printed, consumer):
  """Returns the texts a printed sweep pipes into `consumer` (`printf '%s' TEXT | consumer` per point)."""
  docs = []
  for block in re.split(r"^# \[\d+/\d+\] .*$", printed, flags=re.M)[1:]:
    words = shlex.split(block)
    if words[:2] == ["printf", "%s"] and " ".join(words[4:]) == consumer and words[3] == "|":
      docs.append(words[2])
  return docs


def _calls(workdir):
  with open(os.path.join(workdir, "calls.jsonl")) as f:
    return [json.loads(l) for l in f]


# ------------------------------------------------------------------------------------ common pieces


def test_tpu_slice_shapes():
  s = common.tpu_slice("v4-32")
  assert (s.chips, s.hosts, s.chips_per_host, s.topology) == (16, 4, 4, "2x2x4")
  assert (s.gke_accelerator, s.gke_machine_type) == ("tpu-v4-podslice", "ct4p-hightpu-4t")
  assert common.tpu_slice("v4-8").hosts == 1 and common.tpu_slice("v4-8").topology == "2x2x1"
  assert common.tpu_slice("v4-128").topology == "4x4x4"
  e = common.tpu_slice("v5e-16")
  assert (e.accelerator_type, e.hosts, e.chips_per_host, e.topology) == ("v5litepod-16", 4, 4, "4x4")
  assert common.tpu_slice("v5litepod-8").hosts == 1 and common.tpu_slice("v5litepod-8").chips_per_host == 8
  assert common.tpu_slice("v6e-64").topology == "8x8"
  assert common.tpu_slice("v4-32", "4x2x2").topology == "4x2x2"
  for bad in ("v4-31", "x9-8", "v4", "v4-24"):
    with pytest.raises(common.LaunchError):
      common.tpu_slice(bad)
  with pytest.raises(common.LaunchError, match="has 8 chips"):
    common.tpu_slice("v4-32", "2x2x2")


def test_overrides_round_trip():
  flags = common.override_flags({"config.optim.lr": 0.001, "train.progress": False, "data.dir": "a b",
                                 "init.load": ("image_tower", "heads"), "x": None})
  assert flags == ["--config.optim.lr=0.001", "--config.train.progress=False", "--config.data.dir=a b",
                   "--config.init.load=('image_tower', 'heads')", "--config.x=None"]
  assert common.parse_override_args(["--config.a.b=1", "--config.c=x=y"]) == {"a.b": "1", "c": "x=y"}
  with pytest.raises(common.LaunchError, match="needs the form"):
    common.parse_override_args(["--config.a"])
  with pytest.raises(common.LaunchError, match="unrecognized"):
    common.parse_override_args(["--bogus"])
  with pytest.raises(common.LaunchError, match="dotted config path"):
    common.override_flags({"a b": 1})


def test_repo_relative_config(tmp_path):
  assert common.repo_relative_config(f"{REPO}/configs/x.py:stage=1") == "configs/x.py:stage=1"
  assert common.repo_relative_config("configs/not_here.py") == "configs/not_here.py"
  outside = _write(tmp_path / "c.py", "x = 1\n")
  with pytest.raises(common.LaunchError, match="outside the repository"):
    common.repo_relative_config(f"{outside}:a")
  assert common.repo_relative_config(f"{outside}:a", shared_fs=True) == f"{outside}:a"


def test_k8s_name():
  assert common.k8s_name("mmr-s1") == "mmr-s1"
  a, b = common.k8s_name("Fusion_FT"), common.k8s_name("fusion-ft")
  assert a != b and a.startswith("fusion-ft-")
  long = common.k8s_name("x" * 100)
  assert len(long) <= 40


# -------------------------------------------------------------------------------------- sweep data


def test_product_zip_cross():
  p = sweep.product({"model.variant": ["a", "b"]}, seed=[0, 1, 2])
  assert len(p) == 6 and p[0] == {"model.variant": "a", "seed": 0} and p[-1] == {"model.variant": "b", "seed": 2}
  z = sweep.zip_({"optim.lr": [1, 2]}, steps=[10, 20])
  assert z == [{"optim.lr": 1, "steps": 10}, {"optim.lr": 2, "steps": 20}]
  assert len(sweep.cross(p, z)) == 12
  with pytest.raises(common.LaunchError, match="differ in length"):
    sweep.zip_(a=[1, 2], b=[1])
  with pytest.raises(common.LaunchError, match="list of values"):
    sweep.product(a="abc")


def test_points_names_and_placeholders():
  pts = sweep.points_from([{"a.lr": 0.1, "b.lr": 1}, {"a.lr": 0.2, "b.lr": 1}, {"name": "base"}])
  assert [p.name for p in pts] == ["a.lr=0.1,b.lr=1", "a.lr=0.2,b.lr=1", "base"]
  assert [p.name for p in sweep.points_from([{"optim.lr": 0.1}, {"optim.lr": 0.2}])] == ["lr=0.1", "lr=0.2"]
  with pytest.raises(common.LaunchError, match="same name"):
    sweep.points_from([{"name": "x", "a": 1}, {"name": "x", "a": 2}])
  with pytest.raises(common.LaunchError, match="invalid name"):
    sweep.points_from([{"name": "a/b"}])
  with pytest.raises(common.LaunchError, match="non-empty list"):
    sweep.points_from({"a": 1})
  pts = sweep.points_from([{"name": "s1", "stage": 1}, {"name": "s2", "init.workdir": "{s1}", "data.dir": "{data}"}])
  res = sweep_runner.resolve(pts, "/r", {"data": "/d"})
  assert res[1].overrides == {"init.workdir": os.path.join("/r", "s1"), "data.dir": "/d"}
  with pytest.raises(sweep_runner.SweepError, match="--var stage1=VALUE"):
    sweep_runner.resolve(sweep.points_from([{"init.workdir": "{stage1}"}]), "/r", {})
  # A subset (--only) may still name runs outside it.
  (ft,) = sweep_runner.resolve(pts[1:], "/r", {"data": "/d"}, run_names=["s1", "s2"])
  assert ft.overrides["init.workdir"] == os.path.join("/r", "s1")


# ------------------------------------------------------------------------------------- local + sweep


def test_local_launcher(fakes, tmp_path, capsys):
  wd = str(tmp_path / "run")
  argv = ["--config", fakes["config"] + ":x", "--workdir", wd, "--train_module", "fake_train",
          "--config.optim.lr=0.5", "--config.data.dir=a b"]
  assert local.main(argv + ["--dry-run"]) == 0
  out = capsys.readouterr().out
  assert "-m fake_train" in out and "'--config.data.dir=a b'" in out and not os.path.exists(wd)
  assert local.main(argv) == 0
  (call,) = _calls(wd)
  assert call["argv"] == [f"--config={fakes['config']}:x", f"--workdir={wd}", "--config.optim.lr=0.5",
                          "--config.data.dir=a b"]
  assert local.main(argv[:6] + ["--config.model.variant=fail"]) == 3


def test_sweep_local_resumable(fakes, tmp_path, capsys):
  root = str(tmp_path / "sweep")
  argv = ["--config", fakes["config"] + ":x", "--workdir", root, "--train_module", "fake_train",
          "--eval_module", "fake_eval", "--config.train.steps=3"]
  assert sweep.main(argv) == 1  # one point fails, the others still run
  out = capsys.readouterr().out
  assert "bad: FAILED (train, exit code 3)" in out and os.path.join(root, "bad", "train.log") in out
  assert "boom: variant fail" in out  # the log's tail is shown
  assert "4 ok, 0 skipped, 1 failed" in out
  names = ["variant=a,lr=0.1", "variant=a,lr=0.01", "variant=b,lr=0.1", "variant=b,lr=0.01"]
  for n in names:
    assert os.path.exists(os.path.join(root, n, "DONE")) and os.path.exists(os.path.join(root, n, "metrics.json"))
    (call,) = _calls(os.path.join(root, n))
    assert "--config.train.steps=3" in call["argv"] and f"--workdir={os.path.join(root, n)}" in call["argv"]
  assert not os.path.exists(os.path.join(root, "bad", "DONE"))

  # Tables and plot from collect(), in sweep order, with override columns.
  with open(os.path.join(root, "results.csv")) as f:
    rows = list(csv.DictReader(f))
  assert [r["run"] for r in rows] == names
  assert rows[0]["optim.lr"] == "0.1" and float(rows[0]["splits/test/overall/recall@10"]) == pytest.approx(0.6)
  assert float(rows[1]["splits/test/by_tag/short/recall@10"]) == pytest.approx(0.01)
  md = open(os.path.join(root, "results.md")).read()
  # The headline columns are the test split's overall metrics, not num_products and the other scalars.
  assert "| run | model.variant | optim.lr | splits/test/overall/recall@10 |" in md and "**0.6000**" in md
  assert "num_products" not in md.split("\n\n")[1]
  with open(os.path.join(root, "results.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"

  # Rerun: finished points are skipped, only the failed one runs again.
  assert sweep.main(argv) == 1
  out = capsys.readouterr().out
  assert "0 ok, 4 skipped, 1 failed" in out
  assert all(len(_calls(os.path.join(root, n))) == 1 for n in names)
  assert len(_calls(os.path.join(root, "bad"))) == 2

  # --only + --dry-run prints the commands and runs nothing.
  assert sweep.main(argv + ["--only", "^bad$", "--dry-run"]) == 0
  out = capsys.readouterr().out
  assert "-m fake_train" in out and "-m fake_eval" in out and len(_calls(os.path.join(root, "bad"))) == 2


def test_a_second_local_sweep_on_the_same_root_is_refused(fakes, tmp_path, capsys):
  root = tmp_path / "sweep"
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from mmr_jax import fileio; "
                             f"fileio.WorkdirLock({str(root)!r}, 'sweep').acquire(); print('held', flush=True); "
                             "time.sleep(60)"], cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    argv = ["--config", fakes["config"] + ":x", "--workdir", str(root), "--train_module", "fake_train",
            "--eval_module", "fake_eval"]
    assert sweep.main(argv) == 1
    err = capsys.readouterr().err
    assert f"{root} is in use by sweep pid {holder.pid}" in err
    assert sorted(p.name for p in root.iterdir()) == [".lock"]  # nothing run, nothing written
  finally:
    holder.kill()
    holder.wait()


def test_sweep_local_on_a_bucket_root_keeps_files_in_the_bucket(fakes, tmp_path, monkeypatch, capsys):
  # Stand-in for a gs:// root: treated as remote, so the log is written locally and copied up; nothing
  # lands in a local ./gs:/... folder.
  monkeypatch.setattr(common, "is_remote_path", lambda p: True)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path)
  root = str(tmp_path / "bucket")
  argv = ["--config", fakes["config"] + ":x", "--workdir", root, "--train_module", "fake_train",
          "--eval_module", "fake_eval", "--only", "^variant=a,lr=0.1$", "--check_remote"]
  assert sweep.main(argv) == 0
  wd = tmp_path / "bucket" / "variant=a,lr=0.1"
  assert (wd / "DONE").exists() and (wd / "metrics.json").exists() and "fake_train" in (wd / "train.log").read_text()
  assert str(tmp_path / "home" / ".cache" / "mmr_jax" / "sweep_logs") in capsys.readouterr().out


def test_sweep_rejects_clashing_override(fakes, tmp_path):
  with pytest.raises(common.LaunchError, match="also set by the sweep"):
    sweep.main(["--config", fakes["config"], "--workdir", str(tmp_path), "--config.optim.lr=1"])


def test_collect_cli(tmp_path, capsys):
  for name, v in (("r1", 0.2), ("r2", 0.4)):
    (tmp_path / name).mkdir()
    (tmp_path / name / "metrics.json").write_text(json.dumps({"loss": 1 - v, "acc": v}))
  assert sweep.main(["--collect", str(tmp_path)]) == 0
  md = (tmp_path / "results.md").read_text()
  assert "| r2 | **0.6000** | **0.4000** |" in md  # lower loss and higher acc are both best for r2
  assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
  empty = tmp_path / "empty"
  empty.mkdir()
  assert sweep.main(["--collect", str(empty)]) == 1


@pytest.fixture
def fake_repo(tmp_path, monkeypatch):
  """A repository root holding configs/fake.py, so cluster backends accept the config."""
  repo = tmp_path / "repo"
  _write(repo / "configs" / "fake.py", FAKE_CONFIG)
  monkeypatch.setattr(common, "REPO_ROOT", repo)
  monkeypatch.chdir(repo)
  return repo


def test_sweep_cluster_backends_emit_one_job_per_point(fake_repo, capsys):
  base = ["--config", "configs/fake.py:x", "--config.train.steps=5"]
  assert sweep.main(base + ["--workdir", "gs://bkt/sw", "--backend", "tpu", "--tpu", "mmr", "--zone", "z"]) == 0
  out = capsys.readouterr().out
  ssh = [l for l in out.splitlines() if l.startswith("gcloud compute tpus tpu-vm ssh mmr")]
  assert len(ssh) == 5 and all("--worker=all" in l for l in ssh)
  assert "--workdir=gs://bkt/sw/bad" in ssh[-1] and "--config=configs/fake.py:x" in ssh[-1]

  assert sweep.main(base + ["--workdir", "gs://bkt/sw", "--backend", "gke", "--accelerator", "v4-32",
                            "--image", "img:1"]) == 0
  out = capsys.readouterr().out
  docs = _piped_documents(out, "kubectl apply -f -")
  assert len(docs) == 5
  manifest = yaml.safe_load(docs[0])
  assert manifest["metadata"]["name"].startswith("variant-a-lr-0-1")
  # The same point of another sweep root gets another JobSet name.
  assert sweep.main(base + ["--workdir", "gs://bkt/sw2", "--backend", "gke", "--accelerator", "v4-32",
                            "--image", "img:1"]) == 0
  other = _piped_documents(capsys.readouterr().out, "kubectl apply -f -")
  assert yaml.safe_load(other[0])["metadata"]["name"] != manifest["metadata"]["name"]

  assert sweep.main(base + ["--workdir", "/shared/sw", "--backend", "slurm", "--nodes", "2"]) == 0
  out = capsys.readouterr().out
  assert len(_piped_documents(out, "sbatch")) == 5 and "#SBATCH --job-name=bad" in out
  # Each job evaluates after training (its metrics.json marks the point done); --python reaches the job.
  assert out.count(" --evaluate") == 5 and ssh[0].count("--evaluate") == 1
  assert sweep.main(base + ["--workdir", "/shared/sw", "--backend", "slurm", "--nodes", "2", "--no_eval",
                            "--python", "/env/bin/python"]) == 0
  out = capsys.readouterr().out
  assert "--evaluate" not in out and out.count("exec /env/bin/python -m") == 5
  with pytest.raises(SystemExit):
    sweep.main(base + ["--workdir", "gs://bkt/sw", "--backend", "tpu", "--tpu", "mmr", "--zone", "z",
                       "--python", "/env/bin/python"])

  with pytest.raises(SystemExit):  # tpu backend without its required flags
    sweep.main(base + ["--workdir", "gs://bkt/sw", "--backend", "tpu"])
  with pytest.raises(common.LaunchError, match="local path"):
    sweep.main(base + ["--workdir", "/not/a/bucket", "--backend", "tpu", "--tpu", "mmr", "--zone", "z"])


def test_sweep_submits_each_point_through_sbatch(fake_repo, tmp_path, monkeypatch, capsys):
  """--submit runs each point's sbatch command (a stand-in records the scripts); a refused job is FAILED."""
  bin_dir = tmp_path / "bin"
  _write(bin_dir / "sbatch", """
      #!/bin/bash
      script=$(cat)
      n=$(ls "$SBATCH_LOG" | wc -l)
      printf '%s' "$script" > "$SBATCH_LOG/job$n.sh"
      grep -q -- '--job-name=bad' <<< "$script" && { echo 'sbatch: error: refused' >&2; exit 1; }
      echo "Submitted batch job $n"
      """, executable=True)
  log_dir = tmp_path / "sbatch_log"
  log_dir.mkdir()
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  monkeypatch.setenv("SBATCH_LOG", str(log_dir))
  argv = ["--config", "configs/fake.py:x", "--config.train.steps=5", "--workdir", "/shared/sw",
          "--backend", "slurm", "--nodes", "2", "--submit"]
  assert sweep.main(argv) == 1
  out = capsys.readouterr().out
  scripts = sorted(log_dir.iterdir())
  assert len(scripts) == 5 and all(p.read_text().startswith("#!/bin/bash") for p in scripts)
  assert "--workdir=/shared/sw/bad" in scripts[-1].read_text()
  assert re.search(r"\n  bad +FAILED .*submit exit code 1", out)
  assert len(re.findall(r"\n  variant=\S+ +ok ", out)) == 4


def test_mistyped_config_key_fails_before_any_job_is_submitted(fake_repo, tmp_path, monkeypatch, capsys):
  """A typo in a --config.key (or in one sweep point) stops the launcher once, locally; nothing is submitted."""
  bin_dir, log = tmp_path / "bin", tmp_path / "submitted"
  _write(bin_dir / "sbatch", f"""
      #!/bin/bash
      echo job >> {log}
      """, executable=True)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  base = ["--config", "configs/fake.py:x", "--workdir", "/shared/sw", "--backend", "slurm", "--nodes", "2", "--submit"]
  with pytest.raises(common.LaunchError, match=r"--config.optim.lrr names no config key. Did you mean \"lr\""):
    sweep.main(base + ["--config.optim.lrr=0.1"])
  with pytest.raises(common.LaunchError, match="train.steps=many"):
    sweep.main(base + ["--config.train.steps=many"])
  _write(fake_repo / "configs" / "typo.py", FAKE_CONFIG + """
def get_sweep(arg=None):
  return [{"name": "ok", "optim.lr": 0.1}, {"name": "typo", "model.varient": "b"}]
""")
  with pytest.raises(common.LaunchError, match="sweep point 'typo': --config.model.varient names no config key"):
    sweep.main(["--config", "configs/typo.py"] + base[2:])
  assert not log.exists()
  with pytest.raises(common.LaunchError, match="--config.train.stpes names no config key"):
    gke.main(["--name", "m", "--accelerator", "v4-32", "--image", "i", "--config", "configs/fake.py",
              "--workdir", "gs://b/r", "--config.train.stpes=5", "--dry-run"])
  with pytest.raises(common.LaunchError, match="--config.train.stpes names no config key"):
    tpu_pod.main(["run", "--tpu", "t", "--zone", "z", "--config", "configs/fake.py", "--workdir", "gs://b/r",
                  "--config.train.stpes=5", "--dry-run"])
  with pytest.raises(common.LaunchError, match="--config.train.stpes names no config key"):
    slurm.main(["--nodes", "1", "--config", "configs/fake.py", "--workdir", "/w", "--config.train.stpes=5",
                "--dry-run"])
  capsys.readouterr()


def test_launcher_builds_the_real_config_without_reading_its_data(capsys):
  """The pod config names an unreachable bucket as DATA_DIR: building it locally must not read it."""
  assert gke.main(["--name", "m", "--accelerator", "v4-32", "--image", "i", "--config",
                   "configs/vit_b16_pod.py:stage=2,data=gs://no-such-bucket-here/data", "--workdir", "gs://b/r",
                   "--config.optim.lr=0.001", "--dry-run"]) == 0
  assert "kind: JobSet" in capsys.readouterr().out


# Stands in for tools/aot_compile.py (the real compile: tests/tools/test_aot_compile.py): fits unless the batch is huge.
FAKE_AOT = r"""
import json, sys
big = any(a.startswith("--config.data.batch_size=") and int(a.split("=")[1]) > 10000 for a in sys.argv)
print(json.dumps({"topology": "v4-32", "devices": 16, "device_kind": "TPU v4", "fits": not big,
                  "per_device_bytes": {"total": (800 if big else 10) * 2**30}, "hbm_bytes_per_device": 32 * 2**30}))
sys.exit(1 if big else 0)
"""


def test_aot_check_refuses_to_submit_a_step_that_does_not_fit(fake_repo, tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(common, "AOT_TOOL", _write(tmp_path / "aot.py", FAKE_AOT))
  gke_argv = ["--name", "m", "--accelerator", "v4-32", "--image", "i", "--config", "configs/fake.py",
              "--workdir", "gs://b/r", "--aot_check", "--dry-run"]
  assert gke.main(gke_argv) == 0
  assert "kind: JobSet" in capsys.readouterr().out
  _write(fake_repo / "configs" / "big.py", FAKE_CONFIG.replace('"data": {"dir": ""}', '"data": {"dir": "", "batch_size": 8}'))
  big = ["--config", "configs/big.py", "--config.data.batch_size=32768"]
  with pytest.raises(common.LaunchError, match=r"does not fit v4-32: 800.00 GiB per device of 32.00 GiB"):
    gke.main(gke_argv[:6] + big + gke_argv[8:])
  with pytest.raises(common.LaunchError, match="does not fit"):
    tpu_pod.main(["run", "--tpu", "t", "--zone", "z", "--accelerator", "v4-32", "--aot_check", "--workdir",
                  "gs://b/r", "--dry-run"] + big)
  with pytest.raises(SystemExit):  # run --aot_check without the slice type
    tpu_pod.main(["run", "--tpu", "t", "--zone", "z", "--aot_check", "--workdir", "gs://b/r", "--dry-run"] + big)
  with pytest.raises(common.LaunchError, match="sweep point 'variant=a,lr=0.1': --aot_check: the train step does not"):
    sweep.main(["--config", "configs/big.py:x", "--workdir", "gs://b/sw", "--backend", "gke", "--accelerator", "v4-32",
                "--image", "i", "--aot_check", "--config.data.batch_size=32768", "--submit"])
  capsys.readouterr()


# ------------------------------------------------------------------------------------------ TPU pods


def test_tpu_pod_dry_run_v4_32(capsys):
  assert tpu_pod.main(["create", "--tpu", "mmr", "--zone", "us-central2-b", "--accelerator", "v4-32",
                       "--dry-run"]) == 0
  assert capsys.readouterr().out.strip() == ("gcloud compute tpus tpu-vm create mmr --zone=us-central2-b "
                                             "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base")
  assert tpu_pod.main(["setup", "--tpu", "mmr", "--zone", "z", "--dry-run"]) == 0
  out = capsys.readouterr().out
  assert "tpu-vm scp /tmp/mmr_jax-src.tar.gz mmr:mmr_jax-src.tar.gz --zone=z --worker=all" in out
  assert "uv venv --allow-existing --python 3.11 .venv" in out and "jax[tpu]==" in out
  assert tpu_pod.main(["run", "--tpu", "mmr", "--zone", "z", "--project", "p", "--config", "configs/demo.py:stage=1",
                       "--workdir", "gs://bkt/mmr/s1", "--config.train.steps=10", "--env", "FOO=1",
                       "--dry-run"]) == 0
  out = capsys.readouterr().out.strip()
  assert out == ("gcloud compute tpus tpu-vm ssh mmr --zone=z --project=p --worker=all '--command=cd ~/mmr_jax && "
                 "exec env MMR_DISTRIBUTED=auto FOO=1 .venv/bin/python -m mmr_jax.train --config=configs/demo.py:stage=1 "
                 "--workdir=gs://bkt/mmr/s1 --config.train.steps=10'")
  # A worker's local disk is not shared: refuse it.
  assert common.main_guard(tpu_pod.main, ["run", "--tpu", "mmr", "--zone", "z", "--config", "configs/demo.py",
                                          "--workdir", "/tmp/x", "--dry-run"]) == 2
  assert "gs://" in capsys.readouterr().err


def test_tpu_pod_source_archive(tmp_path, monkeypatch):
  """The upload holds what git sees, skips a file deleted but not committed, and fails outside git."""
  repo = tmp_path / "repo"
  (repo / "pkg").mkdir(parents=True)
  for name in ("pkg/a.py", "gone.txt", ".gitignore"):
    (repo / name).write_text("x\n" if name != ".gitignore" else "ignored.log\n")
  (repo / "ignored.log").write_text("no")
  git = lambda *a: subprocess.run(["git", "-C", str(repo), *a], check=True, capture_output=True)  # noqa: E731
  git("init", "-q")
  git("add", ".")
  git("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-qm", "x")
  (repo / "gone.txt").unlink()
  (repo / "new.py").write_text("y")
  archive = tmp_path / "src.tar.gz"
  monkeypatch.setattr(common, "REPO_ROOT", repo)
  monkeypatch.setattr(tpu_pod, "SRC_ARCHIVE", "unused")
  args = argparse.Namespace(tpu="t", num_slices=1, source="copy", zone="z", project=None, internal_ip=False)
  monkeypatch.setattr(tpu_pod, "setup_script", lambda a: "true")
  monkeypatch.setattr(tpu_pod, "ssh_command", lambda a, node, script: ["true"])
  pack = tpu_pod.setup_commands(args)[0].replace("/tmp/unused", str(archive))
  assert subprocess.run(["bash", "-c", pack]).returncode == 0
  names = subprocess.run(["tar", "-tzf", str(archive)], capture_output=True, text=True).stdout.split()
  assert sorted(names) == [".gitignore", "new.py", "pkg/a.py"]
  monkeypatch.setattr(common, "REPO_ROOT", tmp_path / "not_git")
  (tmp_path / "not_git").mkdir()
  pack = tpu_pod.setup_commands(args)[0].replace("/tmp/unused", str(archive))
  assert subprocess.run(["bash", "-c", pack], capture_output=True).returncode != 0


def test_tpu_pod_multislice_dry_run(capsys):
  assert tpu_pod.main(["create", "--tpu", "mmr", "--zone", "z", "--accelerator", "v4-32", "--num_slices", "2",
                       "--spot", "--dry-run"]) == 0
  out = capsys.readouterr().out
  assert "queued-resources create mmr" in out and "--node-count=2" in out and "--node-prefix=mmr" in out
  assert "--runtime-version=tpu-ubuntu2204-base" in out and "--spot" in out
  assert tpu_pod.main(["run", "--tpu", "mmr", "--zone", "z", "--num_slices", "2", "--config", "configs/demo.py",
                       "--workdir", "gs://b/r", "--dry-run"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert [l.split()[5] for l in lines] == ["mmr-0", "mmr-1"] and all("--worker=all" in l for l in lines)
  assert "MEGASCALE_SLICE_ID" not in lines[0]  # queued resources: the TPU metadata has them
  # Slices joined by hand: the same coordinator everywhere, each slice its own id.
  assert tpu_pod.main(["run", "--tpu", "mmr", "--zone", "z", "--num_slices", "2", "--config", "configs/demo.py",
                       "--workdir", "gs://b/r", "--env", "MEGASCALE_COORDINATOR_ADDRESS=10.0.0.2",
                       "--env", "MEGASCALE_NUM_SLICES=2", "--dry-run"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert ["MEGASCALE_SLICE_ID=0" in lines[0], "MEGASCALE_SLICE_ID=1" in lines[1]] == [True, True]
  assert all("MEGASCALE_COORDINATOR_ADDRESS=10.0.0.2" in l for l in lines)
  # One launch per slice with its own id given: kept.
  assert tpu_pod.main(["run", "--tpu", "mmr", "--zone", "z", "--config", "configs/demo.py", "--workdir", "gs://b/r",
                       "--env", "MEGASCALE_COORDINATOR_ADDRESS=10.0.0.2", "--env", "MEGASCALE_SLICE_ID=1",
                       "--dry-run"]) == 0
  out = capsys.readouterr().out
  assert "MEGASCALE_SLICE_ID=1" in out and "MEGASCALE_SLICE_ID=0" not in out
  assert tpu_pod.main(["delete", "--tpu", "mmr", "--zone", "z", "--num_slices", "2", "--dry-run"]) == 0
  assert "queued-resources delete mmr --zone=z --force --quiet" in capsys.readouterr().out
  with pytest.raises(common.LaunchError, match="single host"):
    tpu_pod.main(["create", "--tpu", "m", "--zone", "z", "--accelerator", "v4-8", "--num_slices", "2", "--dry-run"])


def test_tpu_pod_multislice_sweep_script_fails_if_a_slice_fails(monkeypatch):
  monkeypatch.setattr(tpu_pod, "run_commands_for",
                      lambda a, **k: [["bash", "-c", "sleep 0.2"], ["bash", "-c", "exit 5"]])
  (script,) = tpu_pod.job_commands(argparse.Namespace(), name="n", config="c", workdir="w", overrides={})
  r = subprocess.run(["bash", "-c", script + "\necho next point after $?"], capture_output=True, text=True)
  assert r.stdout.strip() == "next point after 5"


def _fake_gcloud(bin_dir, home, log):
  """A gcloud that logs its argv and runs `ssh --command=...` locally with HOME=home."""
  return _write(bin_dir / "gcloud", f"""
      #!{PY}
      import json, os, subprocess, sys
      argv = sys.argv[1:]
      with open({str(log)!r}, "a") as f:
        f.write(json.dumps(argv) + "\\n")
      if argv[:3] == ["compute", "tpus", "tpu-vm"] and argv[3] == "ssh":
        cmd = [a for a in argv if a.startswith("--command=")][0][len("--command="):]
        env = dict(os.environ, HOME={str(home)!r})
        sys.exit(subprocess.call(["bash", "-c", cmd], env=env, cwd={str(home)!r}))
      """, executable=True)


def test_tpu_pod_run_executes_remote_command(fakes, tmp_path, monkeypatch):
  home, bin_dir, log = tmp_path / "home", tmp_path / "bin", tmp_path / "gcloud.jsonl"
  (home / "mmr_jax" / ".venv" / "bin").mkdir(parents=True)
  os.symlink(PY, home / "mmr_jax" / ".venv" / "bin" / "python")
  _fake_gcloud(bin_dir, home, log)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  wd = str(tmp_path / "shared" / "run")
  tricky = "it's \"quoted\" $HOME"
  rc = tpu_pod.main(["run", "--tpu", "mmr", "--zone", "z", "--num_slices", "2", "--config", "configs/demo.py:stage=1",
                     "--workdir", wd, "--allow_local_workdir", "--train_module", "fake_train",
                     "--env", f"FAKE_X={tricky}", f"--config.data.dir={tricky}"])
  assert rc == 0
  calls = _calls(wd)
  assert len(calls) == 2  # one ssh --worker=all per slice, run in parallel
  for c in calls:
    assert c["env"]["FAKE_X"] == tricky  # survived two levels of shell quoting
    assert f"--config.data.dir={tricky}" in c["argv"] and "--config=configs/demo.py:stage=1" in c["argv"]
  gcloud = [json.loads(l) for l in log.read_text().splitlines()]
  assert sorted(a[4] for a in gcloud) == ["mmr-0", "mmr-1"]


# -------------------------------------------------------------------------------------------- GKE


def test_gke_manifest_v4_32(capsys):
  argv = ["--name", "mmr-s1", "--accelerator", "v4-32", "--image", "us-docker.pkg.dev/p/r/mmr:1",
          "--config", "configs/demo.py:stage=1", "--workdir", "gs://bkt/mmr/s1", "--config.train.steps=7",
          "--env", "TF_CPP_MIN_LOG_LEVEL=2", "--dry-run"]
  assert gke.main(argv) == 0
  m = yaml.safe_load(capsys.readouterr().out)
  assert m["kind"] == "JobSet" and m["metadata"]["name"] == "mmr-s1"
  rj = m["spec"]["replicatedJobs"][0]
  assert rj["replicas"] == 1
  job = rj["template"]["spec"]
  assert job["parallelism"] == job["completions"] == 4 and job["backoffLimit"] == 0
  pod = job["template"]["spec"]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v4-podslice",
                                 "cloud.google.com/gke-tpu-topology": "2x2x4"}
  c = pod["containers"][0]
  assert c["resources"]["limits"]["google.com/tpu"] == 4
  assert c["command"] == ["python", "-m", "mmr_jax.train", "--config=configs/demo.py:stage=1",
                          "--workdir=gs://bkt/mmr/s1", "--config.train.steps=7"]
  assert {"name": "TF_CPP_MIN_LOG_LEVEL", "value": "2"} in c["env"]

  assert gke.main(argv[:-1] + ["--num_slices", "2", "--dry-run"]) == 0
  m2 = yaml.safe_load(capsys.readouterr().out)
  assert m2["spec"]["replicatedJobs"][0]["replicas"] == 2

  assert gke.main(argv + ["--xpk", "--cluster", "c1"]) == 0
  out = capsys.readouterr().out
  assert out.startswith("xpk workload create --cluster=c1 --workload=mmr-s1 --tpu-type=v4-32 --num-slices=1")
  assert "--env=TF_CPP_MIN_LOG_LEVEL=2" in out

  with pytest.raises(SystemExit):
    gke.main(["--name", "Bad_Name"] + argv[2:])
  with pytest.raises(common.LaunchError, match="local path"):
    gke.main([a if a != "gs://bkt/mmr/s1" else "/local/dir" for a in argv])
  with pytest.raises(common.LaunchError, match="not offered on GKE"):
    gke.main([a if a != "v4-32" else "v3-32" for a in argv])


def test_gke_writes_manifest_file(tmp_path, capsys):
  out = tmp_path / "job.yaml"
  assert gke.main(["--name", "m", "--accelerator", "v5litepod-16", "--image", "i", "--config", "configs/demo.py",
                   "--workdir", "gs://b/r", "--out", str(out)]) == 0
  m = yaml.safe_load(out.read_text())
  assert m["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"] == 4
  assert m["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["nodeSelector"][
      "cloud.google.com/gke-tpu-topology"] == "4x4"


# ------------------------------------------------------------------------------------------ SLURM


def test_slurm_script_2_nodes_8_gpus(capsys):
  argv = ["--nodes", "2", "--gpus_per_node", "8", "--partition", "h100", "--time", "04:00:00",
          "--config", "configs/demo.py:stage=2", "--workdir", "/shared/mmr/s2", "--config.train.steps=9", "--dry-run"]
  assert slurm.main(argv) == 0
  script = capsys.readouterr().out
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
               "#SBATCH --partition=h100", "#SBATCH --time=04:00:00",
               'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)',
               'export MMR_COORDINATOR_ADDRESS="${head_node}:$((20000 + SLURM_JOB_ID % 20000))"',
               'export MMR_NUM_PROCESSES="$SLURM_NTASKS"',
               "export JAX_PLATFORMS=cuda,cpu"):  # a venv without the CUDA plugin fails instead of using CPUs
    assert line in script.splitlines(), line
  srun = [l for l in script.splitlines() if l.startswith("srun ")][0]
  assert "export MMR_PROCESS_ID=$SLURM_PROCID" in srun and "--kill-on-bad-exit=1" in srun
  assert "--config=configs/demo.py:stage=2 --workdir=/shared/mmr/s2 --config.train.steps=9" in srun
  assert slurm.main(argv + ["--procs_per_node", "8", "--port", "4444", "--cpus_per_task", "12"]) == 0
  script = capsys.readouterr().out
  assert "#SBATCH --cpus-per-task=12" in script and "srun --kill-on-bad-exit=1 --ntasks-per-node=8 --cpus-per-task=12 " in script
  assert "#SBATCH --ntasks-per-node=8" in script and "CUDA_VISIBLE_DEVICES=$SLURM_LOCALID" in script
  assert 'MMR_COORDINATOR_ADDRESS="${head_node}:4444"' in script
  with pytest.raises(common.LaunchError, match="procs_per_node"):
    slurm.main(argv + ["--procs_per_node", "3"])
  # A log folder with spaces is one #SBATCH value; sweep jobs create it before sbatch.
  assert slurm.main(argv + ["--log_dir", "/shared/my logs", "--gpus_per_node", "0"]) == 0
  script = capsys.readouterr().out
  assert '#SBATCH --output="/shared/my logs/%x-%j.out"' in script and "JAX_PLATFORMS" not in script
  args = common.make_parser(None)
  slurm.add_backend_args(args)
  args = args.parse_args(["--nodes", "1", "--log_dir", "/shared/my logs"])
  args.train_module = common.TRAIN_MODULE
  (cmd,) = slurm.job_commands(args, name="p", config="c.py", workdir="/w", overrides={})
  assert cmd.startswith("mkdir -p '/shared/my logs' && printf ") and cmd.endswith(" | sbatch")


def _fake_slurm(bin_dir):
  """scontrol and srun stand-ins on `bin_dir`: srun starts SLURM_NTASKS local tasks with their ranks."""
  # A big job's node list is long: the tail makes a reader that exits after the first line (`head -n 1`)
  # fail the script with SIGPIPE under `set -o pipefail` every time, not only when the race goes badly.
  _write(bin_dir / "scontrol", """
      #!/bin/bash
      [ "$1 $2" = "show hostnames" ] && printf 'gpu-node-07\\ngpu-node-08\\n' && seq -f 'gpu-node-x%g' 1 200000
      """, executable=True)
  # srun: drop its options, start SLURM_NTASKS tasks with their ranks, fail if any fails.
  _write(bin_dir / "srun", """
      #!/bin/bash
      while [[ "$1" == --* ]]; do shift; done
      pids=()
      for ((i = 0; i < SLURM_NTASKS; i++)); do
        SLURM_PROCID=$i SLURM_LOCALID=$((i % 8)) "$@" & pids+=($!)
      done
      rc=0; for p in "${pids[@]}"; do wait "$p" || rc=$?; done; exit $rc
      """, executable=True)


def test_slurm_script_runs_under_fake_slurm(fakes, tmp_path, monkeypatch):
  """Runs the generated script with scontrol/srun stand-ins: coordinator, ranks and overrides reach the trainer."""
  bin_dir = tmp_path / "bin"
  _fake_slurm(bin_dir)
  script_path = tmp_path / "job.sbatch"
  wd = str(tmp_path / "shared" / "run")
  assert slurm.main(["--nodes", "2", "--config", fakes["config"] + ":x", "--workdir", wd, "--train_module",
                     "fake_train", "--python", PY, "--repo", str(tmp_path), "--env", "FAKE_Y=a b",
                     "--config.optim.lr=0.5", "--out", str(script_path)]) == 0
  env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-node-[07-08]",
             SLURM_NTASKS="2", SLURM_JOB_ID="123456", SLURM_JOB_NUM_NODES="2")
  r = subprocess.run(["bash", str(script_path)], env=env, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stdout + r.stderr
  calls = _calls(wd)
  assert sorted(c["env"]["MMR_PROCESS_ID"] for c in calls) == ["0", "1"]
  for c in calls:
    assert c["env"]["MMR_COORDINATOR_ADDRESS"] == f"gpu-node-07:{20000 + 123456 % 20000}"
    assert c["env"]["MMR_NUM_PROCESSES"] == "2" and c["env"]["FAKE_Y"] == "a b"
    assert "--config.optim.lr=0.5" in c["argv"] and "--config=cfgs/fake.py:x" in c["argv"]  # relative to --repo


# Values that would run as shell if any layer left them unquoted: the old heredoc terminator on a line
# of its own, command substitution, backticks, quotes and a `;`.
HOSTILE = ["x\nMMR_SBATCH_EOF\ntouch {p}/heredoc\n", "$(touch {p}/subst)", "`touch {p}/backtick`",
           "a'b\"c; touch {p}/semi", "line1\nline2 $HOME \\ end"]


def test_slurm_hostile_values_reach_the_trainer_verbatim(fakes, tmp_path, monkeypatch):
  """Submitting (sbatch stand-in) and running the job (srun stand-in) never executes an override or --env value."""
  pwned = tmp_path / "pwned"
  pwned.mkdir()
  values = [v.format(p=pwned) for v in HOSTILE]
  bin_dir = tmp_path / "bin"
  _fake_slurm(bin_dir)
  _write(bin_dir / "sbatch", """
      #!/bin/bash
      cat > "$SBATCH_SCRIPT"
      bash "$SBATCH_SCRIPT"
      """, executable=True)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  for k, v in dict(SBATCH_SCRIPT=str(tmp_path / "job.sh"), SLURM_JOB_NODELIST="n1", SLURM_NTASKS="1",
                   SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="1").items():
    monkeypatch.setenv(k, v)
  parser = common.make_parser(None)
  slurm.add_backend_args(parser)
  wd = str(tmp_path / "run")
  for i, value in enumerate(values):
    args = parser.parse_args(["--nodes", "1", "--gpus_per_node", "0", "--python", PY, "--repo", str(tmp_path),
                              "--env", f"FAKE_V={value}"])
    args.train_module, args.evaluate = "fake_train", False
    (cmd,) = slurm.job_commands(args, name="p", config=fakes["config"], workdir=wd, overrides={"data.dir": value})
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    call = _calls(wd)[i]
    assert f"--config.data.dir={value}" in call["argv"] and call["env"]["FAKE_V"] == value
  assert not list(pwned.iterdir())
  # A newline in an #SBATCH value would end the comment line and run the rest on the node.
  with pytest.raises(common.LaunchError, match="newlines"):
    slurm.main(["--nodes", "1", "--partition", f"gpu\ntouch {pwned}/sbatch", "--config", fakes["config"],
                "--workdir", wd, "--dry-run"])


def test_secrets_are_masked_and_never_written(fakes, fake_repo, tmp_path, monkeypatch, capsys):
  secret, other = "s3cr3t-'tok$en", "hunter2-pass"
  base = ["--config", "configs/fake.py", "--config.train.steps=2"]
  # TPU pods: the value rides in the ssh command; every printed form masks it.
  assert tpu_pod.main(["run", "--tpu", "t", "--zone", "z", "--workdir", "gs://b/r", "--env", f"HF_TOKEN={secret}",
                       "--env", f"MINE={other}", "--secret_env", "MINE", "--env", "PLAIN=visible", "--dry-run"]
                      + base) == 0
  out = capsys.readouterr().out
  assert "HF_TOKEN=***" in out and "MINE=***" in out and "PLAIN=visible" in out
  assert "s3cr3t" not in out and "tok$en" not in out and other not in out
  # GKE: a secret --env would sit in the manifest: refused; Kubernetes secrets and env files are referenced.
  gke_argv = ["--name", "m", "--accelerator", "v4-32", "--image", "i", "--workdir", "gs://b/r", *base]
  with pytest.raises(common.LaunchError, match="--env HF_TOKEN=... is a secret"):
    gke.main(gke_argv + ["--env", f"HF_TOKEN={secret}", "--dry-run"])
  env_file = _write(tmp_path / "job.env", f"# comment\nexport DB_PASSWORD={other}\nX=1\n")
  assert gke.main(gke_argv + ["--k8s_secret", "HF_TOKEN=hf:token", "--env_file", str(env_file), "--dry-run"]) == 0
  out = capsys.readouterr().out
  c = yaml.safe_load(out)["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]
  assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}} in c["env"]
  assert c["envFrom"] == [{"secretRef": {"name": "m-env"}}] and other not in out
  parser = common.make_parser(None)
  gke.add_backend_args(parser)
  args, _ = parser.parse_known_args(gke_argv + ["--env_file", str(env_file)])
  args.train_module, args.evaluate = common.TRAIN_MODULE, False
  (create, apply) = gke.job_commands(args, name="m", config="configs/fake.py", workdir="gs://b/r", overrides={})
  assert create.startswith("kubectl create secret generic m-env --from-env-file=") and other not in apply
  with pytest.raises(common.LaunchError, match="job.env:1: expected NAME=VALUE"):
    _write(tmp_path / "job.env", "not a line\n")
    gke.main(gke_argv + ["--env_file", str(env_file), "--dry-run"])
  # SLURM: secrets reach the job through sbatch's environment, not the script.
  bin_dir = tmp_path / "bin"
  _write(bin_dir / "sbatch", f"""
      #!/bin/bash
      cat "$1" > {tmp_path}/script.sh
      printf '%s' "$HF_TOKEN" > {tmp_path}/token
      """, executable=True)
  monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
  assert slurm.main(["--nodes", "1", "--workdir", "/w", "--env", f"HF_TOKEN={secret}", "--submit",
                     "--out", str(tmp_path / "job.sbatch")] + base) == 0
  script = (tmp_path / "script.sh").read_text()
  assert "s3cr3t" not in script and "#SBATCH --export=ALL" in script and ': "${HF_TOKEN:?' in script
  assert (tmp_path / "token").read_text() == secret
  assert "s3cr3t" not in capsys.readouterr().out
  assert sweep.main(["--config", "configs/fake.py:x", "--workdir", "/shared/sw", "--backend", "slurm", "--nodes", "1",
                     "--env", f"WANDB_API_KEY={secret}"]) == 0
  assert "s3cr3t" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------- multiprocess

PSUM_SCRIPT = """
import argparse, json
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
p = argparse.ArgumentParser()
p.add_argument("--coordinator_address"); p.add_argument("--num_processes", type=int)
p.add_argument("--process_id", type=int); p.add_argument("--tag")
a = p.parse_args()
jax.distributed.initialize(a.coordinator_address, a.num_processes, a.process_id, initialization_timeout=60)
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("d",))
# Device j of process i holds 10 * i + j + 1.
local = np.array([[10.0 * a.process_id + j + 1] for j in range(jax.local_device_count())], np.float32)
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), local)
total = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "d"), mesh=mesh, in_specs=P("d"), out_specs=P()))(x)
print(json.dumps({"process": jax.process_index(), "processes": jax.process_count(), "devices": jax.device_count(),
                  "psum": float(np.asarray(total.addressable_data(0)).ravel()[0]), "tag": a.tag}))
"""

FAIL_SCRIPT = """
import argparse, sys, time
p = argparse.ArgumentParser()
p.add_argument("--coordinator_address"); p.add_argument("--num_processes", type=int); p.add_argument("--process_id", type=int)
a = p.parse_args()
if a.process_id == 1:
  print("process 1 giving up", flush=True)
  sys.exit(3)
time.sleep(120)  # stands in for a peer stuck in a collective
"""


def _mp(args, timeout=90):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
  return subprocess.run([PY, "-m", "launch.multiprocess", *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_multiprocess_psum_over_gloo(tmp_path):
  script = _write(tmp_path / "psum.py", PSUM_SCRIPT)
  r = _mp(["-n", "2", "-d", "2", "--script", str(script), "--", "--tag", "hello"])
  assert r.returncode == 0, r.stdout + r.stderr
  results = {}
  for line in r.stdout.splitlines():
    for i in (0, 1):
      if line.startswith(f"[p{i}] {{"):
        results[i] = json.loads(line[len(f"[p{i}] "):])
  assert set(results) == {0, 1}
  for i, res in results.items():
    # 2 processes x 2 devices: (1 + 2) + (11 + 12) = 26 on every process.
    assert res == {"process": i, "processes": 2, "devices": 4, "psum": 26.0, "tag": "hello"}
  assert "[multiprocess] all 2 processes finished OK" in r.stdout


def test_multiprocess_fails_fast(tmp_path):
  script = _write(tmp_path / "fail.py", FAIL_SCRIPT)
  t0 = time.monotonic()
  r = _mp(["-n", "2", "--script", str(script), "--grace_s", "0.5"], timeout=60)
  assert time.monotonic() - t0 < 30  # the sleeping peer was terminated, not waited for
  assert r.returncode == 3
  assert "[p1] process 1 giving up" in r.stdout
  assert "[multiprocess] p1 exited with code 3; stopping p0" in r.stdout
  assert "FAILED: p1 exited first with code 3" in r.stdout and "p0=-15" in r.stdout


def test_multiprocess_dry_run_sets_env_and_flags(capsys):
  assert multiprocess.main(["-n", "2", "-d", "4", "--port", "5555", "--config", "configs/demo.py:runlocal=True",
                            "--workdir", "/tmp/w", "--config.train.steps=2", "--dry-run"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == 3 and lines[-1] == "wait"
  for i, line in enumerate(lines[:2]):
    assert "JAX_PLATFORMS=cpu" in line and "--xla_force_host_platform_device_count=4" in line
    assert f"MMR_PROCESS_ID={i}" in line and "MMR_NUM_PROCESSES=2" in line
    assert "MMR_COORDINATOR_ADDRESS=127.0.0.1:5555" in line
    assert line.endswith(f"--coordinator_address=127.0.0.1:5555 --num_processes=2 --process_id={i} &")
    assert "--config.train.steps=2" in line
  env = multiprocess.process_env({"XLA_FLAGS": "--xla_dump_to=/x --xla_force_host_platform_device_count=8"},
                                 process_id=1, num_processes=2, coordinator="h:1", devices_per_process=2)
  assert env["XLA_FLAGS"] == "--xla_dump_to=/x --xla_force_host_platform_device_count=2"


@pytest.mark.parametrize("module", [local, multiprocess, tpu_pod, gke, slurm, sweep])
def test_help(module, capsys):
  with pytest.raises(SystemExit) as e:
    module.main(["--help"])
  assert e.value.code == 0
  assert "--dry-run" in capsys.readouterr().out or module is tpu_pod
