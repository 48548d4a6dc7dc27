r"""Runs a config's sweep: locally one run after another (resumable), or as one cluster job per point.

  python -m launch.sweep --config configs/demo.py:runlocal=True --workdir workdirs/sweep
  python -m launch.sweep --config configs/demo.py --workdir ROOT --backend print        # just the commands
  python -m launch.sweep --config configs/demo.py --workdir gs://B/sweep --backend tpu \
      --tpu mmr --zone us-central2-b [--submit]
  python -m launch.sweep --config configs/demo.py --workdir /shared/sweep --backend slurm --nodes 2 [--submit]
  python -m launch.sweep --collect ROOT                  # tables + plot from finished runs

A sweep is data: `get_sweep(arg)` in the config module returns a list of override dicts
({"optim.lr": 1e-3, "model.variant": "fusion"}), optionally with a "name" (the run's directory
ROOT/<name>; otherwise derived from the overrides). Build them with `product`, `zip_` and `cross`:

  def get_sweep(arg):
    return cross(product({"model.variant": ["concat", "fusion"]}), zip_({"optim.lr": [1e-3, 3e-4],
                                                                        "train.steps": [500, 1000]}))

String values may name other runs' directories as `{run_name}`, `{root}`, or values given with
`--var NAME=VALUE` (e.g. "init.workdir": "{stage1}" with --var stage1=workdirs/stage1).
`--config.key=value` flags apply to every point (they may not repeat a key the sweep sets).

Backend local (default): each point trains with `python -m mmr_jax.train` (output to
ROOT/<name>/train.log), then evaluates (`python -m mmr_jax.evaluate`, unless --no_eval or the
trainer wrote metrics.json) and gets a DONE marker. Points with DONE or metrics.json are skipped,
so rerunning the command resumes the sweep. A failed point is reported with its exit code and log
and the sweep goes on; a summary ends it, then `collect` writes ROOT/results.{md,csv,png}.

Backends tpu / gke / slurm print one job command per point (a shell script you can read or pipe
to bash); --submit runs them (tpu: one after another on the same pod). Their flags are those of
launch.tpu_pod run, launch.gke and launch.slurm. Each job trains and then evaluates (`mmr_jax.train
--evaluate`), so its metrics.json marks the point done: rerunning the sweep skips it (with
--check_remote for gs:// roots) and --collect tabulates it.

The runner itself (dependency order, skipping, summary) is `mmr_jax/sweep_runner.py`, shared with
`mmr_jax.ablation`; this module adds the subprocess executor, the cluster backends and `collect`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import importlib
import io
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from etils import epath

from launch import common
from mmr_jax.evals import metrics as metrics_lib
from mmr_jax.evals import report
from mmr_jax import fileio
from mmr_jax import sweep_runner

BACKENDS = {"tpu": "launch.tpu_pod", "gke": "launch.gke", "slurm": "launch.slurm"}
RESULTS = "results"


# -------------------------------------------------------------------------------- sweeps as data


def _axes(axes: Mapping[str, Sequence] | None, kw: Mapping[str, Sequence]) -> dict[str, list]:
  merged = {**(axes or {}), **kw}
  for k, v in merged.items():
    if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
      raise common.LaunchError(f"sweep axis {k!r} must be a list of values, got {v!r}")
  return {k: list(v) for k, v in merged.items()}


def product(axes: Mapping[str, Sequence] | None = None, /, **kw_axes: Sequence) -> list[dict[str, Any]]:
  """Returns every combination of the axes' values as override dicts (last axis varies fastest).

  Dotted keys go in the mapping: product({"optim.lr": [1e-3, 3e-4]}, seed=[0, 1]).
  """
  a = _axes(axes, kw_axes)
  return [dict(zip(a, values)) for values in itertools.product(*a.values())]


def zip_(axes: Mapping[str, Sequence] | None = None, /, **kw_axes: Sequence) -> list[dict[str, Any]]:
  """Returns the i-th values of all axes together, one override dict per i (axes must be equally long)."""
  a = _axes(axes, kw_axes)
  lengths = {k: len(v) for k, v in a.items()}
  if len(set(lengths.values())) > 1:
    raise common.LaunchError(f"zip_ axes differ in length: {lengths}")
  return [dict(zip(a, values)) for values in zip(*a.values())]


def cross(*sweeps: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Returns the product of sweeps (lists of override dicts), merging one dict from each."""
  out = [{}]
  for sweep in sweeps:
    out = [{**a, **b} for a in out for b in sweep]
  return out


# ------------------------------------------------------------------------------------ sweep points


def _value_text(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:g}"
  return common.format_value(v)


def _auto_names(dicts: Sequence[Mapping[str, Any]]) -> list[str]:
  keys = {k for d in dicts for k in d}
  short = {k: k.rsplit(".", 1)[-1] for k in keys}
  if len(set(short.values())) < len(keys):  # two keys end alike ("a.lr", "b.lr"): keep them whole
    short = {k: k for k in keys}
  names = []
  for d in dicts:
    name = ",".join(f"{short[k]}={_value_text(v)}" for k, v in d.items()) or "default"
    name = re.sub(r"[^A-Za-z0-9._=,+@-]+", "_", name).strip("._") or "run"
    if len(name) > 96:
      name = name[:88] + "-" + common.short_hash(name, 7)
    names.append(name)
  return names


def points_from(raw: Any, source: str = "get_sweep") -> list[sweep_runner.Point]:
  """Returns validated, uniquely named Points from a list of override dicts (optionally with "name")."""
  if not isinstance(raw, (list, tuple)) or not raw:
    raise common.LaunchError(f"{source} must return a non-empty list of override dicts, got {type(raw).__name__}")
  dicts, names = [], []
  for i, d in enumerate(raw):
    if not isinstance(d, Mapping):
      raise common.LaunchError(f"{source}: point {i} is a {type(d).__name__}, expected a dict of overrides")
    d = dict(d)
    name = d.pop("name", None)
    if name is not None and (not isinstance(name, str) or not name or "/" in name or name in (".", "..")):
      raise common.LaunchError(f"{source}: point {i} has an invalid name {name!r} (a directory name, no '/')")
    dicts.append({common.normalise_key(k): v for k, v in d.items()})
    names.append(name)
  auto = _auto_names(dicts)
  names = [n if n is not None else a for n, a in zip(names, auto)]
  seen: dict[str, int] = {}
  for i, n in enumerate(names):
    if n in seen:
      raise common.LaunchError(f"{source}: points {seen[n]} and {i} have the same name {n!r}; give them distinct "
                               "'name' entries")
    seen[n] = i
  return [sweep_runner.Point(n, d) for n, d in zip(names, dicts)]


def load_sweep(config: str) -> list[sweep_runner.Point]:
  """Returns the Points of `get_sweep(arg)` from the config module named by `config` ("path.py:arg")."""
  module = sweep_runner.load_config_module(config)
  fn = getattr(module, "get_sweep", None)
  if fn is None:
    raise common.LaunchError(f"--config {config!r}: {common.split_config_ref(config)[0]} defines no get_sweep(arg)")
  return points_from(fn(common.split_config_ref(config)[1]), source=f"{common.split_config_ref(config)[0]}:get_sweep")


# ------------------------------------------------------------------------------------- local runs


@dataclasses.dataclass
class Subprocess:
  """Executor of local points: `python -m mmr_jax.train`, then `mmr_jax.evaluate`, output in a log file."""
  root: str
  config: str
  overrides: Mapping[str, Any]
  train_module: str = common.TRAIN_MODULE
  eval_module: str | None = common.EVAL_MODULE
  eval_args: Sequence[str] = ()
  python: str = sys.executable
  dry_run: bool = False
  out: Any = None

  def say(self, line: str) -> None:
    print(line, file=self.out or sys.stdout, flush=True)

  def _commands(self, point: sweep_runner.Point, workdir: str):
    train = common.train_command(self.config, workdir, {**point.overrides, **self.overrides}, python=self.python,
                                 module=self.train_module)
    evaluate = (common.eval_command(workdir, python=self.python, module=self.eval_module, extra=self.eval_args)
                if self.eval_module else None)
    return train, evaluate

  def finished(self, point: sweep_runner.Point, workdir: str) -> bool:
    del point
    return sweep_runner.is_done(workdir)

  def execute(self, point: sweep_runner.Point, workdir: str, tag: str) -> sweep_runner.Result | None:
    train, evaluate = self._commands(point, workdir)
    if self.dry_run:
      self.say(f"# {tag}")
      self.say(common.shell_text(train))
      if evaluate:
        self.say(common.shell_text(evaluate))
      return None
    wd_path = epath.Path(workdir)
    wd_path.mkdir(parents=True, exist_ok=True)
    # The log is a local file (subprocess output); under a gs:// root it is copied up after the point.
    remote = common.is_remote_path(workdir)
    log = os.path.join(_local_log_dir(self.root, point.name) if remote else workdir, "train.log")
    self.say(f"{tag}: training (log: {log})")
    rc = _run_logged(train, log)
    stage = "train"
    if rc == 0 and evaluate and not (wd_path / "metrics.json").exists():
      self.say(f"{tag}: evaluating")
      stage = "eval"
      rc = _run_logged(evaluate, log)
    if remote:
      epath.Path(log).copy(wd_path / "train.log", overwrite=True)
    return sweep_runner.Result(point.name, "ok" if rc == 0 else "FAILED", returncode=rc, log=log,
                               stage=None if rc == 0 else stage)

  def finish(self, point: sweep_runner.Point, workdir: str, seconds: float) -> None:
    (epath.Path(workdir) / "DONE").write_text(json.dumps({
        "finished": datetime.datetime.now().isoformat(timespec="seconds"), "seconds": round(seconds, 1),
        "command": self._commands(point, workdir)[0]}))


def _local_log_dir(root: str, name: str) -> str:
  """Returns a local folder for a point's log when the sweep root is a bucket."""
  d = os.path.join(os.path.expanduser("~/.cache/mmr_jax/sweep_logs"), common.short_hash(root, 8), name)
  os.makedirs(d, exist_ok=True)
  return d


def _run_logged(cmd: Sequence[str], log_path: str) -> int:
  with open(log_path, "a") as log:
    log.write(f"# {datetime.datetime.now().isoformat(timespec='seconds')} $ {common.shell_text(cmd)}\n")
    log.flush()
    return subprocess.call(list(cmd), stdout=log, stderr=subprocess.STDOUT)


def run_local(points: Sequence[sweep_runner.Point], *, root: str, config: str, overrides: Mapping[str, Any],
              train_module: str = common.TRAIN_MODULE, eval_module: str | None = common.EVAL_MODULE,
              eval_args: Sequence[str] = (), python: str = sys.executable, dry_run: bool = False,
              out=None) -> list[sweep_runner.Result]:
  """Returns one Result per point after running the not-yet-done ones one after another (subprocesses)."""
  executor = Subprocess(root, config, overrides, train_module, eval_module, tuple(eval_args), python, dry_run, out)
  return sweep_runner.run(points, root, executor, report=executor.say)


# ------------------------------------------------------------------------------------------ collect


def gather(root: str) -> tuple[list[dict[str, Any]], list[str], list[str]]:
  """Returns (rows, override_columns, metric_columns) from every ROOT/<run>/metrics.json.

  Rows follow the sweep's order (ROOT/sweep.json) when known, else name order; each row holds
  "run", the run's overrides and its flattened metrics.
  """
  r = epath.Path(root)
  if not r.exists():
    raise common.LaunchError(f"--workdir {root!r} does not exist")
  order, overrides = [], {}
  if (r / "sweep.json").exists():
    info = json.loads((r / "sweep.json").read_text())
    for p in info.get("points", []):
      order.append(p["name"])
      overrides[p["name"]] = p.get("overrides", {})
  runs = {c.name: c for c in r.iterdir() if c.is_dir() and (c / "metrics.json").exists()}
  names = [n for n in order if n in runs] + sorted(n for n in runs if n not in order)
  rows, ocols, mcols = [], [], []
  for n in names:
    try:
      metrics = json.loads((runs[n] / "metrics.json").read_text())
    except json.JSONDecodeError as e:
      raise common.LaunchError(f"{runs[n] / 'metrics.json'}: not valid JSON ({e})") from None
    if not isinstance(metrics, Mapping):
      raise common.LaunchError(f"{runs[n] / 'metrics.json'}: expected a JSON object")
    flat = metrics_lib.flatten(metrics)
    ov = {k: _value_text(v) for k, v in overrides.get(n, {}).items()}
    for k in ov:
      if k not in ocols:
        ocols.append(k)
    for k in flat:
      if k not in mcols:
        mcols.append(k)
    rows.append({"run": n, **ov, **flat})
  return rows, ocols, mcols


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _lower_is_better(metric: str) -> bool:
  return bool(re.search(r"loss|latency|time|seconds|_ms\b|error", metric))


def headline_metrics(columns: Sequence[str]) -> list[str]:
  """Returns the columns worth a table / plot: the test split's overall metrics (metrics.headline_keys)."""
  return metrics_lib.headline_keys(columns) or list(columns)


def _fmt(v) -> str:
  if _is_num(v) and isinstance(v, float):
    return f"{v:.4f}"
  return "" if v is None else str(v)


def results_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """Returns a Markdown table of `columns`, the best value of each numeric metric column in bold."""
  best = {}
  for c in columns:
    vals = [r.get(c) for r in rows if _is_num(r.get(c))]
    if len(vals) > 1 and c not in ("run",):
      best[c] = min(vals) if _lower_is_better(c) else max(vals)
  bold = lambda c, r, text: f"**{text}**" if c in best and r.get(c) == best[c] else text  # noqa: E731
  return report.markdown_table(columns, [[bold(c, r, _fmt(r.get(c))) for c in columns] for r in rows])


def plot(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> bytes | None:
  """Returns PNG bytes: grouped bars of `metrics` per run, plus Recall@K curves when there are several K."""
  metrics = [m for m in metrics if any(_is_num(r.get(m)) for r in rows)][:8]
  if not metrics or not rows:
    return None
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  def k_of(m):
    mm = re.fullmatch(r"(?:.*/)?recall@(\d+)", m)
    return int(mm.group(1)) if mm else None

  ks = sorted((k_of(m), m) for m in metrics if k_of(m) is not None)
  panels = 2 if len(ks) >= 2 else 1
  width = max(7.0, 0.45 * len(rows) * min(len(metrics), 4) + 2)
  fig = Figure(figsize=(width, 4.2 * panels), layout="constrained")
  FigureCanvasAgg(fig)  # Agg canvas on the figure itself: no pyplot, no global backend switch.
  ax = fig.add_subplot(panels, 1, 1)
  bar_w = 0.8 / len(metrics)
  for j, m in enumerate(metrics):
    xs = [i + (j - (len(metrics) - 1) / 2) * bar_w for i in range(len(rows))]
    ys = [r.get(m) if _is_num(r.get(m)) else 0.0 for r in rows]
    ax.bar(xs, ys, width=bar_w, label=m)
  ax.set_xticks(range(len(rows)))
  ax.set_xticklabels([r["run"] for r in rows], rotation=30 if len(rows) > 3 else 0, ha="right" if len(rows) > 3 else "center")
  ax.set_ylabel("metric value")
  top = max((r.get(m) for r in rows for m in metrics if _is_num(r.get(m))), default=0.0)
  if top > 0:
    ax.set_ylim(top=top * 1.2)  # headroom for the legend
  ax.legend(fontsize="small", ncols=min(4, len(metrics)), loc="upper left")
  ax.grid(axis="y", alpha=0.3)
  if panels == 2:
    ax2 = fig.add_subplot(2, 1, 2)
    for r in rows:
      pts = [(k, r.get(m)) for k, m in ks if _is_num(r.get(m))]
      if pts:
        ax2.plot([k for k, _ in pts], [v for _, v in pts], marker="o", label=r["run"])
    ax2.set_xscale("log")
    ax2.set_xticks([k for k, _ in ks])
    ax2.set_xticklabels([str(k) for k, _ in ks])
    ax2.set_xlabel("K")
    ax2.set_ylabel("Recall@K")
    ax2.legend(fontsize="small")
    ax2.grid(alpha=0.3)
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  return buf.getvalue()


def collect(root: str, out_name: str = RESULTS) -> dict[str, str]:
  """Returns {"md", "csv", "png"} paths written in ROOT from every run's metrics.json ({} if none)."""
  rows, ocols, mcols = gather(root)
  if not rows:
    return {}
  r = epath.Path(root)
  head = headline_metrics(mcols)
  md = [f"# Sweep results: {root}\n",
        f"{len(rows)} runs with metrics.json. All {len(mcols)} metrics are in {out_name}.csv.\n",
        results_table(rows, ["run", *ocols, *head])]
  rest = [c for c in mcols if c not in head]
  if rest and len(rest) <= 24:
    md += ["\n## Other metrics\n", results_table(rows, ["run", *rest])]
  paths = {"md": str(r / f"{out_name}.md"), "csv": str(r / f"{out_name}.csv")}
  (r / f"{out_name}.md").write_text("\n".join(md), encoding="utf-8")
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=["run", *ocols, *mcols], extrasaction="ignore")
  w.writeheader()
  for row in rows:
    w.writerow({k: row.get(k, "") for k in ["run", *ocols, *mcols]})
  (r / f"{out_name}.csv").write_text(buf.getvalue(), encoding="utf-8")
  png = plot(rows, head)
  if png is not None:
    (r / f"{out_name}.png").write_bytes(png)
    paths["png"] = str(r / f"{out_name}.png")
  return paths


# ----------------------------------------------------------------------------------------------- CLI


def _backend_parser(backend: str):
  module = importlib.import_module(BACKENDS[backend])
  p = common.make_parser(None, prog=f"python -m launch.sweep --backend {backend}", add_help=False)
  module.add_backend_args(p)
  if backend == "tpu":
    module.add_run_args(p)
  return module, p


def job_name(backend: str, point: str, root: str) -> str:
  """Returns a point's job name: on GKE, where JobSet names must be unique in the namespace, it carries a
  hash of the sweep root, so the same point of two sweeps does not collide."""
  return point if backend != "gke" else f"{point}-{common.short_hash(root, 4)}"


def write_sweep_json(root: str, config: str, points: Sequence[sweep_runner.Point], overrides: Mapping[str, Any]):
  """Writes ROOT/sweep.json (what was swept; collect uses it for columns and row order)."""
  r = epath.Path(root)
  r.mkdir(parents=True, exist_ok=True)
  info = {"config": config, "overrides": dict(overrides),
          "points": [{"name": p.name, "overrides": p.overrides} for p in points]}
  (r / "sweep.json").write_text(json.dumps(info, indent=1, default=str) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
  parser = common.make_parser(__doc__, prog="python -m launch.sweep")
  parser.add_argument("--config", help="config ref whose module defines get_sweep(arg)")
  parser.add_argument("--workdir", help="sweep root: each run goes to ROOT/<name>")
  parser.add_argument("--backend", default="local", choices=["local", "print", *BACKENDS])
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                      help="print what would run, run and write nothing")
  parser.add_argument("--submit", action="store_true", help="cluster backends: submit the jobs (default: print)")
  parser.add_argument("--only", default=None, metavar="REGEX", help="run only points whose name matches")
  parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                      help="value for {NAME} placeholders in the sweep (repeatable)")
  parser.add_argument("--train_module", default=common.TRAIN_MODULE)
  parser.add_argument("--eval_module", default=common.EVAL_MODULE)
  parser.add_argument("--eval_args", default="", metavar="ARGS",
                      help="extra evaluator flags as one string, e.g. --eval_args='--split test'")
  parser.add_argument("--no_eval", action="store_true",
                      help="do not evaluate after training (cluster points then never count as done)")
  parser.add_argument("--python", default=None,
                      help="interpreter of the runs (local/print: default this one; slurm/gke: their --python)")
  parser.add_argument("--check_remote", action="store_true",
                      help="skip finished points on a gs:// root too (needs credentials here)")
  parser.add_argument("--no_collect", action="store_true", help="local: skip the results table and plot")
  parser.add_argument("--collect", metavar="ROOT", help="only gather ROOT/*/metrics.json into tables and a plot")
  args, rest = parser.parse_known_args(argv)

  if args.collect:
    paths = collect(args.collect)
    if not paths:
      print(f"no run under {args.collect} has a metrics.json yet")
      return 1
    print("\n".join(f"wrote {p}" for p in paths.values()))
    return 0
  if not args.config or not args.workdir:
    parser.error("--config and --workdir are required (or --collect ROOT)")

  override_tokens = [a for a in rest if a.startswith("--config.")]
  backend_tokens = [a for a in rest if not a.startswith("--config.")]
  overrides = common.parse_override_args(override_tokens)
  backend_args = None
  if args.backend in BACKENDS:
    module, bparser = _backend_parser(args.backend)
    backend_args = bparser.parse_args(backend_tokens)
    if args.python:  # parsed above as the sweep's own flag; the backend's launcher takes it too
      if not hasattr(backend_args, "python"):
        parser.error(f"--python: --backend {args.backend} runs the repo's own .venv/bin/python on every worker")
      backend_args.python = args.python
    backend_args.train_module = args.train_module
    # Each job evaluates after training (the trainer's --evaluate), so its metrics.json marks the point done
    # for resuming and --collect.
    backend_args.evaluate = not args.no_eval
  elif backend_tokens:
    parser.error(f"unrecognized arguments for --backend {args.backend}: {' '.join(backend_tokens)}")

  points = load_sweep(args.config)
  clash = sorted({k for p in points for k in p.overrides} & set(overrides))
  if clash:
    raise common.LaunchError(f"--config.{clash[0]} is also set by the sweep; drop it from the command line or "
                             "from get_sweep")
  all_points = points
  if args.only:
    try:
      only = re.compile(args.only)
    except re.error as e:
      parser.error(f"--only {args.only!r} is not a regular expression: {e}")
    points = [p for p in points if only.search(p.name)]
    if not points:
      raise common.LaunchError(f"--only {args.only!r} matches no point of the sweep")
  # Only the points that run need their placeholders filled; any run of the sweep may be named.
  points = sweep_runner.resolve(points, args.workdir, common.parse_env(args.var), [p.name for p in all_points])
  # Every point's config is built here first: a mistyped key would otherwise fail N jobs, one by one, on the cluster.
  for p in points:
    try:
      common.build_config(args.config, {**p.overrides, **overrides})
    except common.LaunchError as e:
      raise common.LaunchError(f"sweep point {p.name!r}: {e}") from None
  if getattr(backend_args, "aot_check", False):
    if not getattr(backend_args, "accelerator", None):
      parser.error("--aot_check needs --accelerator (the slice's type, e.g. v4-32)")
    for p in points:
      try:
        common.aot_check(args.config, {**p.overrides, **overrides}, backend_args.accelerator,
                         topology=getattr(backend_args, "topology", None), num_slices=backend_args.num_slices)
      except common.LaunchError as e:
        raise common.LaunchError(f"sweep point {p.name!r}: {e}") from None
  check_done = not common.is_remote_path(args.workdir) or args.check_remote

  args.python = args.python or sys.executable
  if args.backend == "local":
    try:
      # One local sweep per root: a second one would re-run the same unfinished points beside it.
      with contextlib.ExitStack() as stack:
        if not args.dry_run:
          stack.enter_context(fileio.WorkdirLock(args.workdir, "sweep"))
          write_sweep_json(args.workdir, args.config, all_points, overrides)
        results = run_local(points, root=args.workdir, config=args.config, overrides=overrides,
                            train_module=args.train_module, eval_module=None if args.no_eval else args.eval_module,
                            eval_args=shlex.split(args.eval_args), python=args.python, dry_run=args.dry_run)
    except fileio.WorkdirBusyError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    except KeyboardInterrupt:
      print("\ninterrupted; rerun the same command to resume", file=sys.stderr)
      return 130
    if args.dry_run:
      return 0
    print(sweep_runner.summary(results, args.workdir), flush=True)
    if not args.no_collect:
      paths = collect(args.workdir)
      for p in paths.values():
        print(f"wrote {p}")
    return 1 if any(r.status == "FAILED" for r in results) else 0

  # print / cluster backends: one job per point.
  if args.submit and not args.dry_run and args.backend != "print":
    try:
      write_sweep_json(args.workdir, args.config, all_points, overrides)
    except Exception as e:  # pylint: disable=broad-except
      print(f"warning: could not write {args.workdir}/sweep.json ({e}); collect will order runs by name",
            file=sys.stderr)
  results = []
  for i, p in enumerate(points, 1):
    wd = sweep_runner.join(args.workdir, p.name)
    ov = {**p.overrides, **overrides}
    if check_done and sweep_runner.is_done(wd):
      print(f"# [{i}/{len(points)}] {p.name}: done already, skipped")
      results.append(sweep_runner.Result(p.name, "skipped"))
      continue
    if args.backend == "print":
      train = common.shell_text(common.train_command(args.config, wd, ov, python=args.python,
                                                     module=args.train_module))
      evaluate = common.eval_command(wd, python=args.python, module=args.eval_module,
                                     extra=shlex.split(args.eval_args))
      cmds = [train if args.no_eval else f"{train} && {common.shell_text(evaluate)}"]
    else:
      cmds = module.job_commands(backend_args, name=job_name(args.backend, p.name, args.workdir), config=args.config,
                                 workdir=wd, overrides=ov)
    secrets = common.split_secret_env(backend_args)[1].values() if backend_args is not None else ()
    if not args.submit or args.dry_run or args.backend == "print":
      print(f"# [{i}/{len(points)}] {p.name}")
      for c in cmds:
        print(common.mask_text(common.shell_text(c), secrets))
      continue
    print(f"[{i}/{len(points)}] {p.name}: submitting", flush=True)
    t0 = time.time()
    if hasattr(module, "submit_job"):  # backends whose submission is more than running its commands (tpu_pod)
      rc = module.submit_job(backend_args, name=job_name(args.backend, p.name, args.workdir), config=args.config,
                             workdir=wd, overrides=ov)
    else:
      env = {**os.environ, **module.job_env(backend_args)} if hasattr(module, "job_env") else None
      rc = common.run_commands(cmds, dry_run=False, env=env, secrets=secrets)
    results.append(sweep_runner.Result(p.name, "ok" if rc == 0 else "FAILED", time.time() - t0, rc, None, "submit"))
  if results and args.submit and not args.dry_run:
    print(sweep_runner.summary(results, args.workdir))
  return 1 if any(r.status == "FAILED" for r in results) else 0


if __name__ == "__main__":
  sys.exit(common.main_guard(main))
