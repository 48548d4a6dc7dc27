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
