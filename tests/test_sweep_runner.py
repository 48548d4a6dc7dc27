"""Tests for mmr_jax/sweep_runner.py: ordering by dependency, skipping, failures, the table writer, config loading."""

import os
import pathlib
import subprocess
import sys

import pytest

from mmr_jax import sweep_runner

P = sweep_runner.Point
ROOT = pathlib.Path(__file__).resolve().parents[1]


class Recorder:
  """Executor that records what ran; points named in `fail` fail, those in `done` count as finished."""

  def __init__(self, fail=(), done=()):
    self.fail, self.done, self.ran, self.finished_ok = set(fail), set(done), [], []

  def finished(self, point, workdir):
    assert workdir == os.path.join("/root", point.name)
    return point.name in self.done

  def execute(self, point, workdir, tag):
    self.ran.append(point.name)
    ok = point.name not in self.fail
    return sweep_runner.Result(point.name, "ok" if ok else "FAILED", returncode=0 if ok else 3, stage="train")

  def finish(self, point, workdir, seconds):
    assert seconds >= 0
    self.finished_ok.append(point.name)


def test_dependencies_run_first_and_failures_stop_their_dependants():
  points = [P("ft", {}, ("s1",)), P("plain", {}), P("s1", {}), P("ft2", {}, ("ft",))]
  assert [p.name for p in sweep_runner.ordered(points)] == ["plain", "s1", "ft", "ft2"]
  ex, lines = Recorder(fail={"s1"}), []
  results = sweep_runner.run(points, "/root", ex, report=lines.append)
  assert ex.ran == ["plain", "s1"] and ex.finished_ok == ["plain"]
  assert [(r.name, r.status) for r in results] == [("plain", "ok"), ("s1", "FAILED"), ("ft", "FAILED"),
                                                   ("ft2", "FAILED")]
  assert results[2].stage == "depends on s1" and any("ft: not started, it needs s1" in line for line in lines)
  assert "1 ok, 0 skipped, 3 failed" in sweep_runner.summary(results, "/root")


def test_finished_points_are_skipped():
  ex = Recorder(done={"s1"})
  results = sweep_runner.run([P("s1", {}), P("ft", {}, ("s1",))], "/root", ex)
  assert ex.ran == ["ft"] and [r.status for r in results] == ["skipped", "ok"]


def test_bad_dependencies_are_refused():
  with pytest.raises(sweep_runner.SweepError, match="no run of this sweep"):
    sweep_runner.ordered([P("a", {}, ("nope",))])
  with pytest.raises(sweep_runner.SweepError, match="cycle"):
    sweep_runner.ordered([P("a", {}, ("b",)), P("b", {}, ("a",))])
  with pytest.raises(sweep_runner.SweepError, match="share the name"):
    sweep_runner.ordered([P("a", {}), P("a", {})])


def test_load_config_module(tmp_path):
  (tmp_path / "c.py").write_text("def get_sweep(arg=None):\n  return [{'name': arg}]\n")
  assert sweep_runner.load_config_module(f"{tmp_path / 'c.py'}:x").get_sweep("x") == [{"name": "x"}]
  with pytest.raises(sweep_runner.SweepError, match="no such config file"):
    sweep_runner.load_config_module(str(tmp_path / "missing.py"))


def test_importing_the_runner_stays_cheap():
  # launch/ imports it for every command, --help included: no JAX or TensorFlow behind it.
  code = "import sys, mmr_jax.sweep_runner; print(sorted({'jax', 'flax', 'tensorflow'} & set(sys.modules)))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
  assert out.strip() == "[]"
