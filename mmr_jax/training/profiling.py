"""Traces a few steps with `jax.profiler` and summarises where the time went.

The trace (`plugins/profile/<run>/*.xplane.pb`, open it in TensorBoard's profile plugin or XProf) is
the full story; `summarize` reads the Chrome-trace copy jax writes beside it (`*.trace.json.gz`) and
returns, per traced process (`/host:CPU`, `/device:GPU:0`, ...), the busiest op names in ms per step
and the fraction of the traced wall time in which that process ran anything. On an accelerator the
device rows are the XLA kernels of the step (fusions, GEMMs, collectives); idle device time is time
the step waits on the host. Used by the trainer (`config.train.profile_steps`) and tools/bench_train.py.
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from typing import Any

import jax
from etils import epath

from mmr_jax import checkpoint as ckpt_lib


def latest_run(log_dir: str) -> str:
  """Returns the newest `plugins/profile/<run>` folder under `log_dir` that holds a Chrome trace."""
  root = os.path.join(log_dir, "plugins", "profile")
  runs = sorted((os.path.join(root, d) for d in (os.listdir(root) if os.path.isdir(root) else ())),
                key=os.path.getmtime)
  runs = [r for r in runs if any(f.endswith(".trace.json.gz") for f in os.listdir(r))]
  if not runs:
    raise FileNotFoundError(f"no profiler trace (plugins/profile/*/*.trace.json.gz) under {log_dir}")
  return runs[-1]


def _busy_us(intervals: list[tuple[float, float]]) -> float:
  """Returns the length of the union of [start, end) intervals (nested and overlapping events count once)."""
  total, end = 0.0, -float("inf")
  for s, e in sorted(intervals):
    if e <= end:
      continue
    total += e - max(s, end)
    end = e
  return total


def summarize(log_dir: str, steps: int, top: int = 20) -> dict[str, Any]:
  """Returns the per-process op-time summary of the newest trace under `log_dir`, per step.

  {"run": folder, "steps": steps, "processes": {name: {"busy_fraction", "wall_ms_per_step",
  "busy_ms_per_step", "ops": [{"name", "ms_per_step", "count_per_step", "fraction_of_busy"}]}}}.
  Times of nested events (a host-side call and the work inside it) each count in full under their own
  name, so "ops" of one process can sum to more than "busy_ms_per_step".
  """
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  run = latest_run(log_dir)
  names: dict[int, str] = {}
  events: dict[int, list[dict]] = {}
  for fname in sorted(os.listdir(run)):
    if not fname.endswith(".trace.json.gz"):
      continue
    path = os.path.join(run, fname)
    try:
      with gzip.open(path, "rt", encoding="utf-8") as f:
        data = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f"unreadable profiler trace {path}: {e}") from e
    for ev in data.get("traceEvents", []) if isinstance(data, dict) else data:
      pid = ev.get("pid")
      if ev.get("ph") == "M" and ev.get("name") == "process_name":
        names[pid] = str(ev.get("args", {}).get("name", pid))
      elif ev.get("ph") == "X" and "dur" in ev and "ts" in ev:
        events.setdefault(pid, []).append(ev)
  processes = {}
  for pid, evs in events.items():
    start = min(float(e["ts"]) for e in evs)
    end = max(float(e["ts"]) + float(e["dur"]) for e in evs)
    busy = _busy_us([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in evs])
    per_name: dict[str, list[float]] = {}
    for e in evs:
      acc = per_name.setdefault(str(e["name"]), [0.0, 0])
      acc[0] += float(e["dur"])
      acc[1] += 1
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]
    processes[names.get(pid, str(pid))] = dict(
        wall_ms_per_step=(end - start) / 1e3 / steps,
        busy_ms_per_step=busy / 1e3 / steps,
        busy_fraction=busy / max(end - start, 1e-9),
        ops=[dict(name=n, ms_per_step=us / 1e3 / steps, count_per_step=c / steps,
                  fraction_of_busy=us / max(busy, 1e-9)) for n, (us, c) in ranked])
  if not processes:
    raise ValueError(f"the profiler trace in {run} holds no timed events")
  return dict(run=run, steps=steps, processes=processes)


def format_summary(summary: dict[str, Any], top: int = 10) -> str:
  """Returns a few readable lines: per process, its busy fraction and its busiest ops."""
  lines = []
  for name, p in summary["processes"].items():
    lines.append(f"{name}: busy {p['busy_ms_per_step']:.2f} of {p['wall_ms_per_step']:.2f} ms/step "
                 f"({100 * p['busy_fraction']:.0f}%)")
    for op in p["ops"][:top]:
      lines.append(f"  {op['ms_per_step']:9.3f} ms/step  x{op['count_per_step']:<6g} {op['name'][:100]}")
  return "\n".join(lines)


class StepProfiler:
  """Traces steps `first + 1 .. first + num` of a loop (numbered from 1, as in metrics.jsonl).

  The trace goes to `out_dir` with `summary.json` beside it; the summary is also returned by `stop`.
  jax's profiler writes local files only, so a remote `out_dir` (gs://...) is traced into `local_dir`
  (default: a new temporary folder) and the trace copied up afterwards.
  A run resumed past `first` traces nothing. Call `before(step)` before running step `step + 1`,
  `after(step, outputs)` after it (blocks on `outputs` at the last traced step) and `close()` at the end.
  """

  def __init__(self, out_dir, first: int, num: int, local_dir: str | None = None):
    if num < 0 or first < 0:
      raise ValueError(f"profile steps must be >= 0, got first={first} num={num}")
    self.out_dir = epath.Path(out_dir)
    self.first, self.num = first, num
    self.summary: dict[str, Any] | None = None
    self._local_dir = local_dir
    self._local: str | None = None
    self._traced = 0

  def before(self, step: int) -> None:
    if self.num and step == self.first and self._local is None and self.summary is None:
      if self._local_dir is None and "://" in str(self.out_dir):
        self._local_dir = tempfile.mkdtemp(prefix="mmr_profile_")
      self._local = str(self._local_dir or self.out_dir)
      os.makedirs(self._local, exist_ok=True)
      options = jax.profiler.ProfileOptions()
      options.python_tracer_level = 0  # Python frames (this class's own calls included) would blur host time
      jax.profiler.start_trace(self._local, profiler_options=options)

  def after(self, step: int, outputs: Any) -> dict[str, Any] | None:
    if self._local is None:
      return None
    self._traced += 1
    if step < self.first + self.num:
      return None
    jax.block_until_ready(outputs)
    return self.stop()

  def stop(self) -> dict[str, Any] | None:
    """Ends an open trace (e.g. a loop left early) and writes its summary; returns it (None if none)."""
    if self._local is None:
      return None
    local, self._local = self._local, None
    jax.profiler.stop_trace()
    if not self._traced:
      return None
    self.summary = summarize(local, self._traced)
    if local != str(self.out_dir):  # copy the trace up to the remote workdir
      run = epath.Path(self.summary["run"])
      dest = self.out_dir / "plugins" / "profile" / run.name
      dest.mkdir(parents=True, exist_ok=True)
      for f in run.iterdir():
        f.copy(dest / f.name, overwrite=True)
      self.summary["run"] = str(dest)
    self.out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_lib.write_json(self.out_dir / "summary.json", self.summary)
    return self.summary

  close = stop
