r"""Summarises training workdirs: config, progress, latest metrics, checkpoints, evaluation.

  python tools/status.py WORKDIR [WORKDIR ...] [--json] [--full]
  python tools/status.py gs://BUCKET/mmr/s1
  python tools/status.py workdirs/sweep          # a sweep root: one line per run

Reads config.json, metrics.jsonl (one JSON object per logged step), checkpoints/<step>/ (Orbax)
and metrics.json (evaluation) through etils.epath, so local paths and gs:// work alike. A
directory without config.json or metrics.jsonl whose subdirectories have them is treated as a
sweep root.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath

from mmr_jax.evals import metrics as metrics_lib

# Config fields worth a glance, in display order; any that the config lacks are left out.
KEY_FIELDS = ("stage", "model.name", "model.variant", "loss.kind", "data.dir", "data.batch_size", "train.steps",
              "optim.lr", "init.workdir", "mesh.shape", "seed")
PRIORITY = ("loss", "val/loss", "lr", "grad_norm", "steps_per_s", "examples_per_s")
MAX_METRICS = 8
_TMP_CKPT = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


def _read_json(path: epath.Path) -> tuple[Any, str | None]:
  try:
    return json.loads(path.read_text()), None
  except FileNotFoundError:
    return None, None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    return None, f"{path.name}: unreadable JSON ({e})"


def _mtime(path: epath.Path) -> float | None:
  try:
    return float(path.stat().mtime)
  except Exception:  # pylint: disable=broad-except  (stat support differs between backends)
    return None


def read_log(path: epath.Path) -> dict[str, Any] | None:
  """Returns {"records", "bad_lines", "last_step", "last", "latest"} from metrics.jsonl (None if absent).

  "last" is the final record; "latest" maps every metric to (value, step) of its most recent
  appearance, so metrics logged on different schedules (train loss, validation) all show up.
  """
  if not path.exists():
    return None
  records, bad = 0, 0
  last, latest = None, {}
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      bad += 1  # e.g. a line cut short by a crash mid-write
      continue
    if not isinstance(row, dict):
      bad += 1
      continue
    records += 1
    last = row
    step = row.get("step")
    for k, v in row.items():
      if k != "step":
        latest[k] = (v, step)
  return {"records": records, "bad_lines": bad, "last_step": None if last is None else last.get("step"),
          "last": last, "latest": latest, "mtime": _mtime(path)}


def read_checkpoints(directory: epath.Path) -> dict[str, list[int]] | None:
  """Returns {"steps": [...], "incomplete": [...]} of an Orbax checkpoints/ directory (None if absent)."""
  if not directory.exists():
    return None
  steps, incomplete = [], []
  for child in directory.iterdir():
    name = child.name
    if name.isdigit() and child.is_dir():
      steps.append(int(name))
    elif (m := _TMP_CKPT.match(name)):
      incomplete.append(int(m.group(1)))
  return {"steps": sorted(steps), "incomplete": sorted(incomplete)}


def summarize(workdir: str, full: bool = False) -> dict[str, Any]:
  """Returns what is known about a workdir as a JSON-able dict."""
  w = epath.Path(workdir)
  out: dict[str, Any] = {"workdir": workdir, "exists": w.exists(), "problems": []}
  if not out["exists"]:
    return out
  config, err = _read_json(w / "config.json")
  if err:
    out["problems"].append(err)
  if isinstance(config, Mapping):
    flat = metrics_lib.flatten(config, sep=".", keep_empty=True)
    out["config"] = flat if full else {k: flat[k] for k in KEY_FIELDS if k in flat}
    if not full and not out["config"]:  # an unfamiliar config: show its top-level scalars instead
      out["config"] = {k: v for k, v in config.items() if not isinstance(v, (dict, list))}
  out["log"] = read_log(w / "metrics.jsonl")
  if out["log"] and out["log"]["bad_lines"]:
    out["problems"].append(f"metrics.jsonl: {out['log']['bad_lines']} unreadable line(s)")
  out["checkpoints"] = read_checkpoints(w / "checkpoints")
  metrics, err = _read_json(w / "metrics.json")
  if err:
    out["problems"].append(err)
  out["metrics"] = metrics_lib.flatten(metrics, keep_empty=True) if isinstance(metrics, Mapping) else None
  out["done"] = (w / "DONE").exists()
  return out


def _num(v) -> str:
  if isinstance(v, float):
    if math.isnan(v) or math.isinf(v):
      return str(v)
    return f"{v:.4g}" if abs(v) < 1e-3 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".")
  return str(v)


def _ago(ts: float | None) -> str:
  if ts is None:
    return ""
  s = max(0, datetime.datetime.now().timestamp() - ts)
  for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
    if s >= n:
      return f" (updated {s / n:.0f}{unit} ago)"
  return f" (updated {s:.0f}s ago)"


def ordered_metrics(latest: Mapping[str, Any]) -> list[str]:
  """Returns metric names, the ones people look at first (loss, lr, throughput, validation loss) leading."""
  def rank(k):
    if k in PRIORITY:
      return (0, PRIORITY.index(k), k)
    if k.endswith("loss"):
      return (1, k.count("/"), k)
    if "acc" in k or "recall" in k:
      return (2, k.count("/"), k)
    return (3, k.count("/"), k)
  return sorted(latest, key=rank)


def format_summary(s: Mapping[str, Any], full: bool = False) -> str:
  """Returns a human-readable report of one summarize() result (every logged metric with full=True)."""
  lines = [f"workdir: {s['workdir']}"]
  if not s["exists"]:
    return lines[0] + "\n  does not exist"
  cfg = s.get("config")
  lines.append("config:  " + (", ".join(f"{k}={_num(v)}" for k, v in cfg.items()) if cfg else "(no config.json)"))
  log = s.get("log")
  if not log:
    lines.append("train:   (no metrics.jsonl)")
  else:
    total = (cfg or {}).get("train.steps")
    of = f"/{total}" if isinstance(total, int) and total > 0 else ""
    lines.append(f"train:   step {log['last_step']}{of}, {log['records']} logged rows{_ago(log.get('mtime'))}")
    keys = ordered_metrics(log["latest"])
    shown = keys if full else keys[:MAX_METRICS]
    cells = []
    for k in shown:
      v, step = log["latest"][k]
      cells.append(f"{k}={_num(v)}" + ("" if step == log["last_step"] else f" (step {step})"))
    if cells:
      more = f"  (+{len(keys) - len(shown)} more: --full)" if len(shown) < len(keys) else ""
      lines.append("  latest: " + ", ".join(cells) + more)
  ck = s.get("checkpoints")
  if ck is None:
    lines.append("ckpts:   (no checkpoints/)")
  else:
    txt = ", ".join(map(str, ck["steps"])) or "none"
    if ck["incomplete"]:
      txt += f"  (+ unfinished: {', '.join(map(str, ck['incomplete']))})"
    lines.append(f"ckpts:   {txt}")
  m = s.get("metrics")
  if m:
    head = {k: m[k] for k in metrics_lib.headline_keys(list(m))} or m
    lines.append("eval:    " + ", ".join(f"{k}={_num(v)}" for k, v in list(head.items())[:12]))
    if len(m) > len(head):
      lines.append(f"         (+{len(m) - len(head)} more in metrics.json)")
  else:
    lines.append("eval:    (no metrics.json)")
  if s.get("done"):
    lines.append("DONE")
  for p in s.get("problems", []):
    lines.append(f"warning: {p}")
  return "\n".join(lines)


def is_run(path: epath.Path) -> bool:
  """Returns True when `path` looks like a training workdir."""
  return any((path / f).exists() for f in ("config.json", "metrics.jsonl", "metrics.json", "checkpoints", "train.log"))


def sweep_rows(root: str) -> list[dict[str, Any]]:
  """Returns one compact summary row per run directory under a sweep root."""
  rows = []
  for child in sorted(epath.Path(root).iterdir(), key=lambda p: p.name):
    if not child.is_dir() or not is_run(child):
      continue
    s = summarize(str(child))
    log, ck, m = s.get("log") or {}, s.get("checkpoints") or {}, s.get("metrics") or {}
    head = metrics_lib.headline_keys(list(m))
    headline = next((k for k in head if "recall" in k), next(iter(head or m), None))
    loss = (log.get("latest") or {}).get("loss")
    rows.append({
        "run": child.name,
        "step": log.get("last_step"),
        "loss": None if loss is None else loss[0],
        "ckpt": (ck.get("steps") or [None])[-1],
        "metric": None if headline is None else f"{headline}={_num(m[headline])}",
        "state": ("done" if s.get("done") or m else "running/stopped" if log
                  else "no output (see train.log)" if (child / "train.log").exists() else "not started"),
    })
  return rows


def format_rows(rows: Sequence[Mapping[str, Any]]) -> str:
  """Returns rows as an aligned text table."""
  cols = ["run", "state", "step", "loss", "ckpt", "metric"]
  cells = [[("" if r.get(c) is None else _num(r.get(c))) for c in cols] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
  out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
  out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
  return "\n".join(l.rstrip() for l in out)


def main(argv: Sequence[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("workdirs", nargs="+", help="workdir(s) or sweep root(s), local or gs://")
  p.add_argument("--json", action="store_true", help="print JSON instead of text")
  p.add_argument("--full", action="store_true", help="show every config field and logged metric")
  args = p.parse_args(argv)
  rc = 0
  reports = []
  for wd in args.workdirs:
    path = epath.Path(wd)
    if path.exists() and not is_run(path) and path.is_dir():
      rows = sweep_rows(wd)
      if rows:
        reports.append({"sweep": wd, "runs": rows} if args.json else f"sweep: {wd}\n{format_rows(rows)}")
        continue
    s = summarize(wd, full=args.full)
    if not s["exists"]:
      rc = 1
    elif not is_run(path):
      s["problems"].append("no config.json, metrics.jsonl, checkpoints/, metrics.json or train.log here: "
                           "not a workdir?")
      rc = 1
    reports.append(s if args.json else format_summary(s, full=args.full))
  if args.json:
    print(json.dumps(reports if len(reports) > 1 else reports[0], indent=1, default=str))
  else:
    print("\n\n".join(reports))
  return rc


if __name__ == "__main__":
  sys.exit(main())
