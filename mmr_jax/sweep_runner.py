r"""Runs a sweep: named runs under one root, one after another, resumable, runs they depend on first.

A sweep is data: `get_sweep(arg)` in a config module returns override dicts; a caller turns them into
`Point`s (a run directory ROOT/<name> and its overrides). `run` orders the points so that every point
comes after the runs in its `depends` (a stage-2 row whose init.workdir is "{stage1}"), skips finished
ones, runs the rest through an `Executor`, times them and returns one `Result` each; a point whose
dependency failed is not started.

How a point runs is the caller's choice of executor: `launch.sweep` starts `python -m mmr_jax.train` (and
`mmr_jax.evaluate`) per point, with a log file and a DONE marker; `mmr_jax.ablation` trains and evaluates
in its own process, because a process start-up per row would eat the CPU demo's time budget.

Also here, because both sweeps need them and launch/ is not part of the installed package:
`load_config_module` (the config file that defines get_config / get_sweep), `{name}` placeholders
(`resolve`) and the Markdown table writer of their reports.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from etils import epath

from mmr_jax import fileio

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


class SweepError(ValueError):
  """Bad sweep input (a config file, a point, a placeholder); the message names what is at fault."""


# ---------------------------------------------------------------------------------------- configs


def make_repo_importable() -> None:
  """Puts the repo root and the working directory on sys.path: configs import `launch.sweep` helpers."""
  for p in (str(REPO_ROOT), os.getcwd()):
    if p not in sys.path:
      sys.path.insert(0, p)


def load_config_module(ref: str):
  """Returns the imported Python module of a config file: a path or a ref "configs/x.py:arg"."""
  path = ref.partition(":")[0]
  file = pathlib.Path(path)
  if not file.is_file():
    raise SweepError(f"--config: no such config file {path!r} (from {ref!r})")
  make_repo_importable()
  name = "_mmr_launch_config_" + re.sub(r"\W", "_", str(file.resolve()))
  spec = importlib.util.spec_from_file_location(name, file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ----------------------------------------------------------------------------------------- points


@dataclasses.dataclass
class Point:
  name: str  # the run's directory under the sweep root
  overrides: dict[str, Any]  # dotted config keys -> values
  depends: tuple[str, ...] = ()  # runs of the same sweep that must finish first


def join(root: str, name: str) -> str:
  """Returns ROOT/name for local paths and URLs alike."""
  return root.rstrip("/") + "/" + name if fileio.is_remote(root) else os.path.join(root, name)


_PLACEHOLDER = re.compile(r"\{([A-Za-z_][\w-]*)\}")


def resolve(points: Sequence[Point], root: str, variables: Mapping[str, str],
            run_names: Sequence[str] | None = None) -> list[Point]:
  """Returns the points with "{name}" in string values replaced by run dirs, {root} or --var values.

  `run_names` (default: the points' own) are the sweep's runs that placeholders may name.
  """
  table = {n: join(root, n) for n in (run_names if run_names is not None else [p.name for p in points])}
  table.update(root=root, **variables)
  out = []
  for p in points:
    new = {}
    for k, v in p.overrides.items():
      if isinstance(v, str):
        def sub(m, p=p, k=k):
          if m.group(1) not in table:
            raise SweepError(f"sweep point {p.name!r}: {k}={p.overrides[k]!r} names {{{m.group(1)}}}, which "
                             f"is no run of this sweep; give it with --var {m.group(1)}=VALUE")
          return table[m.group(1)]
        v = _PLACEHOLDER.sub(sub, v)
      new[k] = v
    out.append(dataclasses.replace(p, overrides=new))
  return out


def ordered(points: Sequence[Point]) -> list[Point]:
  """Returns the points with each one after the runs it depends on, otherwise in the given order."""
  names = [p.name for p in points]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise SweepError(f"sweep points share the name {dup[0]!r}; every run needs its own directory")
  for p in points:
    for d in p.depends:
      if d not in names:
        raise SweepError(f"sweep point {p.name!r} depends on {d!r}, which is no run of this sweep")
  out, placed, pending = [], set(), list(points)
  while pending:
    ready = next((p for p in pending if placed.issuperset(p.depends)), None)
    if ready is None:
      raise SweepError(f"sweep points {[p.name for p in pending]} depend on each other in a cycle")
    out.append(ready)
    placed.add(ready.name)
    pending.remove(ready)
  return out


def is_done(workdir: str) -> bool:
  """Returns True when a run finished: DONE marker or metrics.json in its workdir."""
  w = epath.Path(workdir)
  return (w / "DONE").exists() or (w / "metrics.json").exists()


# -------------------------------------------------------------------------------------------- runs


@dataclasses.dataclass
class Result:
  name: str
  status: str  # ok | skipped | FAILED
  seconds: float = 0.0
  returncode: int | None = None
  log: str | None = None
  stage: str | None = None  # what failed (train | eval | submit | depends) when FAILED


class Executor(Protocol):
  """Runs one point of a sweep; `run` calls it."""

  def finished(self, point: Point, workdir: str) -> bool:
    """Returns whether the point's run finished already; raises if it may not be reused as it is."""

  def execute(self, point: Point, workdir: str, tag: str) -> Result | None:
    """Runs the point ("ok" or "FAILED"; `run` fills in the seconds), or returns None when nothing ran."""

  def finish(self, point: Point, workdir: str, seconds: float) -> None:
    """Marks a point that ran ok as finished (what `finished` looks for next time)."""


def _tail(path: str | None, n: int = 8) -> str:
  try:
    with open(path, errors="replace") as f:
      lines = f.readlines()[-n:]
  except (OSError, TypeError):
    return ""
  return "".join("      | " + l for l in lines)


def run(points: Sequence[Point], root: str, executor: Executor,
        report: Callable[[str], None] | None = None) -> list[Result]:
  """Returns one Result per point (dependencies first) after running those not finished yet.

  `report` gets a line per point skipped, finished or failed. Exceptions of the executor propagate: an
  executor that wants the sweep to go on after a failed point returns a FAILED Result instead.
  """
  say = report or (lambda line: None)
  points = ordered(points)
  results, failed = [], set()
  for i, p in enumerate(points, 1):
    tag = f"[{i}/{len(points)}] {p.name}"
    wd = join(root, p.name)
    if executor.finished(p, wd):
      say(f"{tag}: done already, skipped")
      results.append(Result(p.name, "skipped"))
      continue
    broken = [d for d in p.depends if d in failed]
    if broken:
      say(f"{tag}: not started, it needs {', '.join(broken)}, which failed")
      results.append(Result(p.name, "FAILED", stage=f"depends on {', '.join(broken)}"))
      failed.add(p.name)
      continue
    t0 = time.time()
    r = executor.execute(p, wd, tag)
    if r is None:
      continue
    r.seconds = time.time() - t0
    if r.status == "ok":
      executor.finish(p, wd, r.seconds)
      say(f"{tag}: ok in {r.seconds:.1f}s")
    else:
      failed.add(p.name)
      say(f"{tag}: FAILED ({r.stage}, exit code {r.returncode}) after {r.seconds:.1f}s; log: {r.log}\n{_tail(r.log)}")
    results.append(r)
  return results


def summary(results: Sequence[Result], root: str) -> str:
  """Returns a readable table of a sweep's results."""
  if not results:
    return ""
  w = max(len(r.name) for r in results)
  lines = [f"sweep summary ({root}): " + ", ".join(
      f"{sum(r.status == s for r in results)} {s.lower()}" for s in ("ok", "skipped", "FAILED"))]
  for r in results:
    detail = ""
    if r.status == "FAILED":
      detail = f"{r.stage} exit code {r.returncode}, log {r.log}" if r.returncode is not None else r.stage
    secs = f"{r.seconds:7.1f}s" if r.status != "skipped" else "       -"
    lines.append(f"  {r.name:<{w}}  {r.status:<7}  {secs}  {detail}".rstrip())
  return "\n".join(lines)
