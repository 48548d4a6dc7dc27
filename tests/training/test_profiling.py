"""Profiling: traces are written, summarised per process and per op, and wired into the trainer."""

import gzip
import json
import pathlib

import jax
import jax.numpy as jnp
import pytest

from conftest import tiny_config
from mmr_jax import train
from mmr_jax.training import profiling


def _write_trace(run: pathlib.Path, events):
  run.mkdir(parents=True)
  meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}}]
  with gzip.open(run / "h.trace.json.gz", "wt") as f:
    json.dump({"traceEvents": meta + events}, f)


def test_summary_arithmetic_on_a_hand_made_trace(tmp_path):
  # Device: gemm 0-10 us and 20-30, fusion 10-15 -> busy 25 of 30 us over 2 steps. Host: nested events.
  ev = [dict(ph="X", pid=1, ts=0, dur=10, name="gemm"), dict(ph="X", pid=1, ts=20, dur=10, name="gemm"),
        dict(ph="X", pid=1, ts=10, dur=5, name="fusion.1"),
        dict(ph="X", pid=2, ts=0, dur=30, name="step"), dict(ph="X", pid=2, ts=5, dur=10, name="launch")]
  _write_trace(tmp_path / "plugins" / "profile" / "run1", ev)
  s = profiling.summarize(str(tmp_path), steps=2)
  gpu, cpu = s["processes"]["/device:GPU:0"], s["processes"]["/host:CPU"]
  assert gpu["wall_ms_per_step"] == pytest.approx(0.015)
  assert gpu["busy_ms_per_step"] == pytest.approx(0.0125)
  assert gpu["busy_fraction"] == pytest.approx(25 / 30)
  assert [o["name"] for o in gpu["ops"]] == ["gemm", "fusion.1"]
  assert gpu["ops"][0]["ms_per_step"] == pytest.approx(0.010) and gpu["ops"][0]["count_per_step"] == 1
  assert gpu["ops"][0]["fraction_of_busy"] == pytest.approx(20 / 25)
  assert cpu["busy_ms_per_step"] == pytest.approx(0.015)  # the nested launch counts once in busy time
  assert "gemm" in profiling.format_summary(s)


def test_summary_errors_name_the_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    profiling.summarize(str(tmp_path), steps=1)
  run = tmp_path / "plugins" / "profile" / "r"
  run.mkdir(parents=True)
  (run / "x.trace.json.gz").write_bytes(b"not gzip")
  with pytest.raises(ValueError, match="x.trace.json.gz"):
    profiling.summarize(str(tmp_path), steps=1)


@pytest.mark.parametrize("local_dir", [None, "scratch"])  # "scratch": the copy path of gs:// workdirs
def test_real_trace_of_a_jitted_function(tmp_path, local_dir):
  f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
  x = jnp.ones((256, 256))
  f(x).block_until_ready()
  prof = profiling.StepProfiler(tmp_path / "p", first=0, num=2,
                                local_dir=local_dir and str(tmp_path / local_dir))
  for step in range(3):
    prof.before(step)
    out = f(x)
    prof.after(step + 1, out)
  assert prof.stop() is None  # already stopped after the second step
  s = json.loads((tmp_path / "p" / "summary.json").read_text())
  assert s["steps"] == 2
  host = s["processes"]["/host:CPU"]
  assert 0 < host["busy_ms_per_step"] <= host["wall_ms_per_step"]
  assert any(o["ms_per_step"] > 0 for o in host["ops"])
  run = pathlib.Path(s["run"])
  assert run.parent.parent.parent == tmp_path / "p" and list(run.glob("*.xplane.pb"))


def test_trainer_profiles_the_configured_steps(tiny_data, tmp_path):
  cfg = tiny_config(tiny_data, progress=False, steps=4, eval_every=0, ckpt_every=4, log_every=2,
                    profile_from=1, profile_steps=2)
  train.train_and_evaluate(cfg, str(tmp_path / "wd"))
  out = tmp_path / "wd" / "profile" / "process_0"
  s = json.loads((out / "summary.json").read_text())
  assert s["steps"] == 2 and pathlib.Path(s["run"]).parent.parent.parent == out
  assert list((pathlib.Path(s["run"])).glob("*.xplane.pb"))
  assert s["processes"]["/host:CPU"]["busy_ms_per_step"] > 0
