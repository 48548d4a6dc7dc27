"""README's launch commands stay runnable: each `python -m launch.*` line in its code blocks is run with --dry-run."""

from __future__ import annotations

import importlib
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands(prefix: str) -> list[str]:
  """Returns the README's shell commands starting with `prefix` (continuation lines joined)."""
  text = (ROOT / "README.md").read_text(encoding="utf-8")
  commands = []
  for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
    for line in block.replace("\\\n", " ").splitlines():
      line = line.strip()
      if line.startswith(prefix):
        commands.append(line)
  return commands


LAUNCH = _readme_commands("python -m launch.")


def test_readme_has_launch_commands():
  modules = {shlex.split(c)[2] for c in LAUNCH}
  assert {"launch.tpu_pod", "launch.gke", "launch.slurm", "launch.sweep", "launch.multiprocess"} <= modules


@pytest.mark.parametrize("command", LAUNCH, ids=[" ".join(shlex.split(c)[2:4]) for c in LAUNCH])
def test_readme_launch_command_dry_runs(command, monkeypatch, tmp_path, capsys):
  argv = shlex.split(command)[3:]
  module = importlib.import_module(shlex.split(command)[2])
  monkeypatch.chdir(ROOT)  # config paths in README are repo-relative
  if "--dry-run" not in argv:
    argv.append("--dry-run")
  before = sorted(p.name for p in ROOT.iterdir())
  assert module.main(argv) == 0, command
  assert capsys.readouterr().out.strip(), f"{command}: printed nothing"
  assert sorted(p.name for p in ROOT.iterdir()) == before  # a dry run writes nothing


def _entry_points() -> list[list[str]]:
  """Returns argv prefixes of every Python command README names (`python -m X`, `python tools/X.py`), plus tools/."""
  text = (ROOT / "README.md").read_text(encoding="utf-8")
  found = {("-m", m) for m in re.findall(r"python -m ((?:mmr_jax|launch)[\w.]*)", text)}
  found |= {(f,) for f in re.findall(r"python (tools/\w+\.py)", text)}
  found |= {(str(p.relative_to(ROOT)),) for p in (ROOT / "tools").glob("*.py")}
  return [list(f) for f in sorted(found)]


def test_every_command_has_help():
  """Each command README names (and every tools/ script) answers --help with usage, exit code 0."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  entries = _entry_points()
  assert ["-m", "mmr_jax.train"] in entries and ["tools/bench_export.py"] in entries
  procs = [(e, subprocess.Popen([sys.executable, *e, "--help"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)) for e in entries]
  for entry, proc in procs:
    out, _ = proc.communicate(timeout=300)
    absl_usage = proc.returncode == 1 and "Try --helpfull" in out  # absl's app.run exits 1 after --help
    assert proc.returncode == 0 or absl_usage, f"{entry} --help exited {proc.returncode}:\n{out[-2000:]}"
    assert re.search(r"usage|USAGE|flags:", out), f"{entry} --help printed no usage:\n{out[-2000:]}"
