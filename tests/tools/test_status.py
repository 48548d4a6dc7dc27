"""Tests for tools/status.py on fake workdirs (a run, a sweep root, broken files)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("mmr_status_tool", os.path.join(_ROOT, "tools", "status.py"))
status = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(status)


def make_run(path, *, steps=(100, 200), tmp_ckpt=None, metrics=True, partial_line=False, done=False):
  """Creates a workdir the way the trainer / evaluator leave it."""
  os.makedirs(path / "checkpoints")
  (path / "config.json").write_text(json.dumps({
      "seed": 0, "stage": 2, "model": {"name": "two_tower", "variant": "fusion", "text": {"width": 32}},
      "loss": {"kind": "softmax"}, "train": {"steps": 300}, "optim": {"lr": 0.001},
      "data": {"dir": "data/x", "batch_size": 64}}))
  rows = [{"step": 100, "loss": 2.5, "lr": 1e-3}, {"step": 100, "val/loss": 2.75}, {"step": 200, "loss": 1.25}]
  text = "".join(json.dumps(r) + "\n" for r in rows)
  (path / "metrics.jsonl").write_text(text + ('{"step": 3' if partial_line else ""))
  for s in steps:
    (path / "checkpoints" / str(s) / "state").mkdir(parents=True)
  if tmp_ckpt:
    (path / "checkpoints" / f"{tmp_ckpt}.orbax-checkpoint-tmp-1700000000").mkdir()
  if metrics:
    test = {"overall": {"recall@100": 0.8, "ndcg@10": 0.35}, "by_tag": {"short": {"recall@100": 0.7}}}
    (path / "metrics.json").write_text(json.dumps({"num_products": 300, "splits": {"test": test}}))  # evaluate's layout
  if done:
    (path / "DONE").write_text("{}")
  return path


def test_summarize_run(tmp_path):
  wd = make_run(tmp_path / "run", tmp_ckpt=300, partial_line=True)
  s = status.summarize(str(wd))
  assert s["config"] == {"stage": 2, "model.name": "two_tower", "model.variant": "fusion", "loss.kind": "softmax",
                         "data.dir": "data/x", "data.batch_size": 64, "train.steps": 300, "optim.lr": 0.001,
                         "seed": 0}
  log = s["log"]
  assert (log["records"], log["bad_lines"], log["last_step"]) == (3, 1, 200)
  assert log["latest"]["loss"] == (1.25, 200) and log["latest"]["val/loss"] == (2.75, 100)
  assert s["checkpoints"] == {"steps": [100, 200], "incomplete": [300]}
  assert s["metrics"] == {"num_products": 300, "splits/test/overall/recall@100": 0.8,
                          "splits/test/overall/ndcg@10": 0.35, "splits/test/by_tag/short/recall@100": 0.7}
  assert s["problems"] == ["metrics.jsonl: 1 unreadable line(s)"]

  text = status.format_summary(s)
  assert "train:   step 200/300, 3 logged rows" in text
  assert "  latest: loss=1.25, val/loss=2.75 (step 100), lr=0.001 (step 100)" in text
  assert "ckpts:   100, 200  (+ unfinished: 300)" in text
  assert "eval:    splits/test/overall/recall@100=0.8, splits/test/overall/ndcg@10=0.35\n" in text
  assert "(+2 more in metrics.json)" in text
  assert "model.variant=fusion" in text

  full = status.summarize(str(wd), full=True)
  assert full["config"]["model.text.width"] == 32

  # Many metrics: the important ones first, the rest behind --full.
  many = {"step": 5, "loss": 1.0, **{f"val/m{i}": i for i in range(12)}, "val/q2p/loss": 2.0}
  (wd / "metrics.jsonl").write_text(json.dumps(many) + "\n")
  s = status.summarize(str(wd))
  text = status.format_summary(s)
  assert "  latest: loss=1, val/q2p/loss=2, val/m0=0," in text and "(+6 more: --full)" in text
  assert "val/m11=11" in status.format_summary(s, full=True)


def test_fresh_and_missing_workdirs(tmp_path):
  (tmp_path / "fresh").mkdir()
  (tmp_path / "fresh" / "config.json").write_text(json.dumps({"name": "x", "nested": {"a": 1}}))
  s = status.summarize(str(tmp_path / "fresh"))
  assert s["config"] == {"name": "x"}  # unknown config: top-level scalars
  assert s["log"] is None and s["checkpoints"] is None and s["metrics"] is None
  text = status.format_summary(s)
  assert "(no metrics.jsonl)" in text and "(no checkpoints/)" in text and "(no metrics.json)" in text
  assert status.main([str(tmp_path / "missing")]) == 1
  (tmp_path / "broken").mkdir()
  (tmp_path / "broken" / "metrics.json").write_text("{not json")
  s = status.summarize(str(tmp_path / "broken"))
  assert s["metrics"] is None and "metrics.json: unreadable JSON" in s["problems"][0]


def test_sweep_root(tmp_path, capsys):
  make_run(tmp_path / "fusion", done=True)
  make_run(tmp_path / "concat", metrics=False, steps=(100,))
  (tmp_path / "crashed").mkdir()
  (tmp_path / "crashed" / "train.log").write_text("Traceback ...\n")
  (tmp_path / "not_a_run").mkdir()
  rows = status.sweep_rows(str(tmp_path))
  assert [r["run"] for r in rows] == ["concat", "crashed", "fusion"]
  by = {r["run"]: r for r in rows}
  assert by["fusion"]["state"] == "done" and by["fusion"]["metric"] == "splits/test/overall/recall@100=0.8"
  assert by["concat"]["state"] == "running/stopped" and by["concat"]["ckpt"] == 100 and by["concat"]["loss"] == 1.25
  assert by["crashed"]["state"] == "no output (see train.log)"
  assert status.main([str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert out.startswith(f"sweep: {tmp_path}") and "fusion" in out and "not_a_run" not in out


def test_cli_json(tmp_path):
  wd = make_run(tmp_path / "run")
  r = subprocess.run([sys.executable, os.path.join(_ROOT, "tools", "status.py"), str(wd), "--json"],
                     capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stderr
  s = json.loads(r.stdout)
  assert s["log"]["last_step"] == 200 and s["checkpoints"]["steps"] == [100, 200]


@pytest.mark.parametrize("workdir", ["gs://no-such-bucket-for-mmr-tests/run"])
def test_remote_paths_use_epath(workdir, monkeypatch):
  """gs:// goes through epath; here a fake epath backend stands in for GCS (no network in tests)."""
  calls = []

  class FakePath:
    def __init__(self, p):
      self.p = str(p)
      calls.append(self.p)

    def __truediv__(self, other):
      return FakePath(f"{self.p}/{other}")

    def exists(self):
      return self.p in (workdir, f"{workdir}/metrics.jsonl")

    def read_text(self):
      return '{"step": 7, "loss": 0.5}\n'

    def stat(self):
      raise NotImplementedError

    @property
    def name(self):
      return self.p.rsplit("/", 1)[-1]

  monkeypatch.setattr(status.epath, "Path", FakePath)
  s = status.summarize(workdir)
  assert s["exists"] and s["log"]["last_step"] == 7 and s["log"]["mtime"] is None
  assert f"{workdir}/config.json" in calls and f"{workdir}/checkpoints" in calls
