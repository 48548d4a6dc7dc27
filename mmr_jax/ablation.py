r"""The paper's ablation as one resumable job: stage 1 once, then every stage-2 row, evaluated alike.

  python -m mmr_jax.ablation --workdir DIR [--data DATA_DIR] [--config configs/demo.py] [--steps N]

Rows (same steps, batch and examples for every row; see README):
  text_only   product tower = text only
  concat      pooled text (+) image -> projection; image tower from the user's init, trained in stage 2 only
  concat_ft   concat after stage-1 domain alignment of the image tower
  fusion_ft   stage 1 + the cross-modal fusion network (the paper's full model)
  fusion_e2e  fusion trained end to end without stage 1 (the paper says two stages win); not run by default
  fusion_qw   stage 1 + query-conditioned modality weighting (still one inner product); not run by default:
              it trains far more slowly than the others at the demo budget (README), --rows ...,fusion_qw adds it
  text_only_mined  text_only with hard negatives mined by stage 1's model (data.hard_negative_embeddings);
              not run by default either
  text_only_ft  text_only from stage 1's text towers: the stage-1 rows without an image, so fusion_ft and
              concat_ft minus it is what the image adds (ablation_margins.json "image_adds"); not run by default

A row the config names in CHOSEN_ON_VALIDATION ({row: (alternative rows of its get_sweep, ...)}) is trained
each way and reported as the one whose validation queries rank best (the mean of R@100 and NDCG@10, exact
search): configs/demo.py trains fusion_ft with and without its query <-> fused term, which helps where the
photos say something about the product and costs recall where they do not. The row's "chosen" entry in
ablation.json and a line of ablation.md say which run it is and what each scored on the validation queries.

Writes DIR/ablation.json (a list of rows), DIR/ablation.md, DIR/ablation_margins.json and DIR/ablation.png;
each row's own workdir (DIR/<row>/) holds its checkpoints and metrics.json. Finished rows are skipped on re-run.
The margins (fusion_ft - text_only, fusion_ft - concat_ft, what the image adds, each row - bm25) come with a 95 %
paired bootstrap interval over the test queries: whether another sample of queries could reverse them.

With `--seeds 0,1,2` the whole ablation runs once per seed (config `seed`: initialisation, data order,
augmentation) in DIR/seed_<s>/, and DIR/ablation_seeds.json / .md give each row's mean, standard deviation and
range over the seeds, and the fusion_ft - text_only margin per seed (a margin of a point or two at one seed is
within what another seed moves it at the demo's budget) and pooled: each query's margin averaged over the seeds,
with its interval over the queries.

The stage-1 run and the rows are the points of one sweep (`mmr_jax/sweep_runner.py`, the runner of
`launch.sweep` too): the rows that name stage 1 depend on it (rows that only mine hard negatives with its
model still train stage 1's steps themselves). They train and evaluate in this
process, one after another.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings

import jax
from jax.experimental import multihost_utils
import numpy as np
from etils import epath

from mmr_jax import checkpoint as ckpt_lib
from mmr_jax import config as config_lib
from mmr_jax.data import tfds_builder
from mmr_jax.evals import metrics as metrics_lib
from mmr_jax.evals import report
from mmr_jax.evals import retrieval
from mmr_jax import evaluate
from mmr_jax import fileio
from mmr_jax import runtime
from mmr_jax import sweep_runner
from mmr_jax import train

log = logging.getLogger("mmr_jax.ablation")

ROWS = ("text_only", "concat", "concat_ft", "fusion_ft")  # the default; get_sweep may name more
PAPER_METRICS = ("recall@100", "ndcg@10")  # the paper's two: the plot's and the margins' metrics
CI_LEVEL = 0.95  # the margins' intervals ("ci95")
PAPER = {"text_only": (72.3, 41.2), "concat": (73.1, 41.8), "concat_ft": (75.6, 43.5), "fusion_ft": (77.4, 45.1)}


def apply_overrides(config, overrides: dict):
  """Sets dotted keys ("optim.lr") on a ConfigDict; unknown keys raise with their name."""
  for key, value in overrides.items():
    if key == "name":
      continue
    node = config
    parts = key.split(".")
    for p in parts[:-1]:
      if p not in node:
        raise KeyError(f"override {key!r}: no config key {p!r}")
      node = node[p]
    if parts[-1] not in node:
      raise KeyError(f"override {key!r}: no config key {parts[-1]!r}")
    current = node[parts[-1]]
    # Strings from --set are typed like the current value ("False" -> bool, "1e3" -> int); typed values as given.
    node[parts[-1]] = config_lib.parse_value(f"override {key}", value, current) if isinstance(value, str) else value
  return config


def row_summary(name: str, results: dict, split: str = "test", system: str | None = None) -> dict:
  """Returns the ablation.json row for one evaluated workdir.

  A learned row reports its exact ranking: the model's quality, the same on every run (ScaNN's index build
  is randomised and cannot be seeded, so its ranking of the same embeddings moves by a point or two between
  builds), with ScaNN's own metrics ("scann") and its recall against exact search beside it.
  `system`: "bm25" or "hybrid" for that ranking of the same queries (evaluate's splits/<split>/<system>),
  which has no ScaNN twin; None for the model's own.
  """
  keep = lambda m: {k: v for k, v in m.items() if not k.startswith("num_")} | {"num_queries": m.get("num_queries")}

  def view(v):
    if system is not None:
      return dict(v[system], scann=None, scann_recall_vs_exact=None)
    if "by_sparsity_exact" not in v:
      raise KeyError(f"row {name}: its metrics.json has no exact-search breakdown (written by an older "
                     "mmr_jax.evaluate); evaluate that workdir again")
    return {"overall": v["exact"], "by_tag": v["by_tag_exact"], "by_sparsity": v["by_sparsity_exact"],
            "scann": v["overall"], "scann_recall_vs_exact": v["scann_recall_vs_exact"],
            "per_query": v.get("per_query_exact")}

  splits = {s: view(v) for s, v in results["splits"].items() if system is None or system in v}
  r = splits[split]
  groups = results["splits"][split].get("query_groups")
  return {
      "row": name,
      "overall": keep(r["overall"]),
      "scann": keep(r["scann"]) if r["scann"] else None,
      "by_tag": {t: keep(m) for t, m in r["by_tag"].items()},
      "by_sparsity": {t: keep(m) for t, m in r["by_sparsity"].items()},
      "scann_recall_vs_exact": r["scann_recall_vs_exact"],
      "splits": {s: {"overall": keep(v["overall"]), "scann_recall_vs_exact": v["scann_recall_vs_exact"]}
                 for s, v in splits.items()},
      # Each query's metrics (evaluate's metrics_per_query.json; None for a workdir evaluated before it was
      # written): `margins` pairs two rows query by query for its confidence intervals.
      "per_query": {"values": r["per_query"], "groups": groups} if r.get("per_query") and groups else None,
  }


def keyword_rows(results: dict[str, dict], split: str = "test") -> list[dict]:
  """Returns the `bm25` and `hybrid` ablation rows from the rows' metrics.json ({row name: results}).

  BM25 needs no model, so every row's results hold the same BM25 ranking. The hybrid fuses BM25 with
  the learned row that ranks best on the validation queries (`metrics.selection_score`: the mean of R@100 and
  NDCG@10, exact search), where its fusion was tuned by the same measure; without validation queries, with the
  last row.
  """
  scored = {n: r for n, r in results.items() if "bm25" in r["splits"].get(split, {})}
  if not scored:
    return []
  val = {n: _validation_scores(r) for n, r in scored.items()}
  val = {n: v["score"] for n, v in val.items() if v is not None and not np.isnan(v["score"])}
  best = max(val, key=val.get) if val else list(scored)[-1]
  source = scored[best]
  hybrid = dict(row_summary("hybrid", source, split, system="hybrid"), learned_row=best, fusion=source.get("fusion"))
  return [row_summary("bm25", source, split, system="bm25"), hybrid]


def table(rows: list[dict]) -> str:
  """Returns ablation.md's table: a line per row, R@100 / NDCG@10 in % overall, per tag and per breakdown."""
  pct = lambda v: "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{100 * v:.1f}"
  tags = sorted({t for r in rows for t in r["by_tag"]})
  head = ["row", "R@100", "NDCG@10"] + [f"{t} R@100 / NDCG@10" for t in tags] + \
         ["sparse-text R@100", "novel-product R@100", "ScaNN R@100", "ScaNN recall vs exact", "paper R@100 / NDCG@10"]
  body = []
  for r in rows:
    o = r["overall"]
    label = f"hybrid ({r['learned_row']} + bm25)" if r.get("learned_row") else r["row"]
    cells = [label, pct(o.get("recall@100")), pct(o.get("ndcg@10"))]
    for t in tags:
      m = r["by_tag"].get(t, {})
      cells.append(f"{pct(m.get('recall@100'))} / {pct(m.get('ndcg@10'))}")
    cells.append(pct(r["by_sparsity"].get("sparse_products", {}).get("recall@100")))
    cells.append(pct(r["splits"].get("test_novel_product", {}).get("overall", {}).get("recall@100")))
    cells.append(pct((r.get("scann") or {}).get("recall@100")))
    cells.append(pct(r["scann_recall_vs_exact"]))
    paper = PAPER.get(r["row"])
    cells.append(f"{paper[0]} / {paper[1]}" if paper else "-")
    body.append(cells)
  return report.markdown_table(head, body)


def margins(rows: list[dict], row: str = "fusion_ft", baseline: str = "text_only") -> dict:
  """Returns `row` minus `baseline` (points of recall@100 / ndcg@10), overall and per tag; {} if either is missing.

  Where both rows hold their per-query values for the same queries, each group also gets "ci95": {metric: [low,
  high]}, the paired bootstrap interval over its queries (`metrics.paired_bootstrap`): a margin whose interval
  holds 0 is not told apart from the sample of queries.
  """
  by = {r["row"]: r for r in rows}
  if row not in by or baseline not in by:
    return {}
  paired = _paired_values([by[row]], [by[baseline]])
  out = {}
  for group in ["overall"] + [f"tag:{t}" for t in by[row]["by_tag"]]:
    get = (lambda r: r["overall"]) if group == "overall" else (lambda r, t=group[4:]: r["by_tag"].get(t, {}))
    a, b = get(by[row]), get(by[baseline])
    out[group] = {m: 100 * (a.get(m, np.nan) - b.get(m, np.nan)) for m in PAPER_METRICS}
    if paired is not None:
      out[group]["ci95"] = _interval(paired, group)
  return out


def _paired_values(rows_a: list[dict], rows_b: list[dict]):
  """Returns (per-query group indexes, {metric: [runs, Q] a - b}) of rows paired run by run (one run, or one per
  seed), or None when a row lacks per-query values or two of them scored different queries."""
  pqs = [r.get("per_query") for r in rows_a + rows_b]
  if not all(pqs) or len({pq["groups"]["fingerprint"] for pq in pqs}) != 1:
    if all(pqs):
      log.warning("rows %s: their per-query values are of different queries; no confidence intervals",
                  sorted({r["row"] for r in rows_a + rows_b}))
    return None
  diffs = {}
  for m in PAPER_METRICS:
    if not all(m in pq["values"] for pq in pqs):
      continue
    diffs[m] = np.stack([np.asarray(a["per_query"]["values"][m], np.float64)
                         - np.asarray(b["per_query"]["values"][m], np.float64) for a, b in zip(rows_a, rows_b)])
  return pqs[0]["groups"], diffs


def _interval(paired, group: str) -> dict:
  """Returns {metric: [low, high]} (points): the CI_LEVEL interval of the mean over `group`'s queries of the
  per-query differences, averaged over the runs first (the same queries at every seed)."""
  groups, diffs = paired
  out = {}
  for m, d in diffs.items():
    idx = np.arange(d.shape[1]) if group == "overall" else np.asarray(groups["by_tag"].get(group[4:], []), int)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # a query undefined at every run: its mean is NaN, left out
      per_query = np.nanmean(d[:, idx], axis=0) if idx.size else np.zeros(0)
    ci = metrics_lib.paired_bootstrap(per_query, np.zeros_like(per_query), level=CI_LEVEL)
    out[m] = [100 * ci["low"], 100 * ci["high"]]
  return out


def drawable_labels(labels: list[str]) -> tuple[list[str], list[str]]:
  """Returns (labels, font families) so that every character of a plot label is drawn, not a box.

  Query tags come from the catalogue, in any script. The families are matplotlib's default font then
  every installed font needed for the characters it lacks (matplotlib falls back per glyph); a character
  no installed font has is written as its \\uXXXX escape, with one warning naming the labels.
  """
  from matplotlib import font_manager  # pylint: disable=g-import-not-at-top
  default = font_manager.get_font(font_manager.findfont(font_manager.FontProperties()))
  cmap = default.get_charmap()
  missing = {c for label in labels for c in label if not c.isspace() and ord(c) not in cmap}
  families = [default.family_name]
  # matplotlib draws a family with the one file it finds for it at the plot's style and weight, so a family's
  # glyphs are that file's: a character only its bold or oblique file has is not drawn by naming the family.
  names = dict.fromkeys(e.name for e in font_manager.fontManager.ttflist) if missing else {}
  for name in names:
    if name in families or name.startswith("Last Resort"):  # matplotlib's own: a block symbol for everything
      continue
    try:
      path = font_manager.findfont(font_manager.FontProperties(family=name), fallback_to_default=False)
      covered = {c for c in missing if ord(c) in font_manager.get_font(path).get_charmap()}
    except (OSError, RuntimeError, ValueError):  # an unreadable font file, or no file at the default style
      continue
    if covered:
      missing -= covered
      families.append(name)
    if not missing:
      break
  if not missing:
    return list(labels), families
  out = ["".join(c.encode("unicode_escape").decode("ascii") if c in missing else c for c in label)
         for label in labels]
  log.warning("no installed font can draw %s; the plot shows them as escapes (install a font for "
              "that script, e.g. Noto Sans CJK, to see them)", [lb for lb, o in zip(labels, out) if lb != o])
  return out, families


def plot_rows(rows: list[dict], path: str) -> None:
  """Writes the ablation plot to `path`: each row's R@100 and NDCG@10 overall and per tag, and where a `bm25` row
  is among them, a second line of panels with every other row minus bm25 (points)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  groups = ["overall"] + sorted({t for r in rows for t in r["by_tag"]})
  labels, families = drawable_labels(groups)
  with matplotlib.rc_context({"font.family": families}):
    fig = draw_rows(rows, groups, labels)
    try:
      fig.savefig(path, dpi=120)
    finally:
      plt.close(fig)


def _percent(row: dict, group: str, metric: str) -> float:
  """Returns a row's `metric` overall or on tag `group`, in % (NaN where the row has no such tag)."""
  return 100 * (row["overall"] if group == "overall" else row["by_tag"].get(group, {})).get(metric, np.nan)


def draw_rows(rows: list[dict], groups: list[str], labels: list[str]):
  """Returns the figure plot_rows saves: axes [R@100, NDCG@10] of every row, then (with a bm25 row) the same
  metrics of every other row minus bm25's, one bar per row and group."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  bm25 = next((r for r in rows if r["row"] == "bm25"), None)
  others = [r for r in rows if r is not bm25]
  panels = [(metric, rows, None) for metric in PAPER_METRICS]
  if bm25 is not None and others:
    panels += [(metric, others, bm25) for metric in PAPER_METRICS]
  fig, axes = plt.subplots(len(panels) // 2, 2, figsize=(11, 4 * (len(panels) // 2)), squeeze=False)
  x = np.arange(len(groups))
  colours = {r["row"]: f"C{i}" for i, r in enumerate(rows)}
  for ax, (metric, drawn, base) in zip(axes.flat, panels):
    width = 0.8 / max(len(drawn), 1)
    for i, r in enumerate(drawn):
      vals = np.array([_percent(r, g, metric) for g in groups])
      if base is not None:
        vals = vals - np.array([_percent(base, g, metric) for g in groups])
      ax.bar(x + i * width, vals, width, label=r["row"], color=colours[r["row"]])
    ax.set_xticks(x + width * (len(drawn) - 1) / 2)
    ax.set_xticklabels(labels, rotation=20, parse_math=False)  # a tag "$5 gifts$" is text, not maths
    if base is None:
      ax.set_title(metric)
      ax.set_ylabel("%")
    else:
      ax.set_title(f"{metric} minus bm25")
      ax.set_ylabel("points")
      ax.axhline(0, color="black", linewidth=0.8)
    ax.grid(axis="y", alpha=0.3)
  axes.flat[0].legend(fontsize=7)
  fig.tight_layout()
  return fig


def _flat_config(config: dict) -> dict:
  """Returns a config dict as {"dotted.key": value}, through JSON as config.json holds it (tuples as lists)."""
  return metrics_lib.flatten(json.loads(json.dumps(config, default=str)), sep=".")


def _config_differences(saved: dict, wanted) -> list[str]:
  """Returns "key: saved -> wanted" for settings that change what a row learns (not logging/checkpointing)."""
  # Through JSON, as config.json was written: tuples become lists on both sides.
  wanted = train.resolve_config(wanted)
  wanted.data.stream_offset = train.resolve_stream_offset(wanted)  # as config.json records it
  want = _flat_config(wanted.to_dict())
  # A key added to the code since the run was saved takes its default, which keeps that run's behaviour; a run
  # saved before data.stream_offset started its stream at the beginning.
  saved = json.loads(json.dumps(saved))
  saved.setdefault("data", {}).setdefault("stream_offset", 0)
  saved = config_lib.fill_defaults(config_lib.ConfigDict(saved)).to_dict()
  have = _flat_config(saved)
  norm = lambda k, v: str(ckpt_lib.absolute(v)) if k in ("data.dir", "init.workdir") and v else v  # noqa: E731
  # init.load names what init.workdir gives; a row without one loads nothing (trainer.initialised_towers).
  inert = {"init.load"} if not have.get("init.workdir") and not want.get("init.workdir") else set()
  out = []
  for k in sorted(set(want) | set(have)):
    if (k.startswith("train.") and k != "train.steps") or k in inert:
      continue
    a, b = have.get(k), want.get(k)
    if norm(k, a) != norm(k, b):
      out.append(f"{k}: {a!r} -> {b!r}")
  return out


def _check_reuse(run_dir: epath.Path, cfg, what: str) -> None:
  """Raises ValueError if a finished run in `run_dir` was trained with other settings than `cfg`."""
  saved = run_dir / "config.json"
  if not saved.exists():
    return
  diff = _config_differences(json.loads(saved.read_text()), cfg)
  if diff:
    raise ValueError(f"{what} in {run_dir} was trained with other settings than this command asks for "
                     f"({'; '.join(diff[:8])}{'; ...' if len(diff) > 8 else ''}); its results would be reused "
                     "as they are. Use another --workdir, or remove that folder to train it again.")


def run(workdir: str, data_dir: str, config_path: str, rows=ROWS, steps: int = 0, stage1_steps: int = 0,
        batch: int = 0, config_arg: str = "", overrides: dict | None = None, budget: str = "default") -> list[dict]:
  """Trains and evaluates every row (skipping finished ones); returns the ablation.json rows.

  Every row gets the same number of optimiser steps in total: a row without stage 1 trains stage 2 for
  stage 1's steps longer. `budget` ("long": 5x) multiplies every step count, and the config gets it as
  budget= (config_lib.apply_budget) for the settings it changes with it.
  """
  # Checked before hours of training: every row is scored on the test queries.
  info = tfds_builder.catalog_info(data_dir)
  if not info["num_queries"].get("test"):
    raise ValueError(f"{data_dir} has no test queries: the ablation scores every row on them "
                     "(give queries.jsonl lines with \"split\": \"test\" and their qrels, then re-import)")
  mod = sweep_runner.load_config_module(config_path)
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  with fileio.WorkdirLock(root, "ablation"):
    return _run(root, data_dir, config_path, mod, info, rows, steps, stage1_steps, batch, config_arg, overrides,
                budget)


STAGE1 = "stage1"  # the run that rows naming "{stage1}" (init.workdir) start from


def _points(root, data_dir, config_path, mod, rows, steps, stage1_steps, batch, config_arg, overrides, budget):
  """Returns (points, {point name: ConfigDict}): the stage-1 run when a row needs it, then the rows."""
  if budget not in config_lib.BUDGETS:
    raise ValueError(f"budget {budget!r}; expected one of {sorted(config_lib.BUDGETS)}")
  if any(item.split("=", 1)[0].strip() == "budget" for item in config_arg.split(",")):
    raise ValueError(f"config argument {config_arg!r} names budget=: give it as --budget, which also scales "
                     "--steps and --stage1_steps")
  # The config gets the budget too: it multiplies the config's own step counts and may change other settings
  # with it (config_lib.apply_budget). A config that does not take budget= runs at the default one only.
  extra = "," + config_arg if config_arg else ""
  if budget != "default":
    extra += f",budget={budget}"
  mult = config_lib.BUDGETS[budget]
  try:
    own = [mod.get_config(f"stage={stage}{extra}").train.steps for stage in (1, 2)]
  except KeyError as e:
    if budget != "default" and "'budget'" in str(e):
      raise ValueError(f"--budget {budget}: {config_path}'s get_config does not take budget= "
                       "(see mmr_jax.config.apply_budget)") from e
    raise
  stage1_steps = stage1_steps * mult or own[0]
  steps = steps * mult or own[1]
  # DATA_DIR is set on the config, not passed in the "k=v,..." argument, where a comma in the path would split it.
  base_arg = f"steps={steps},batch={batch}{extra}"
  names = {s["name"] for s in mod.get_sweep(config_arg)}
  unknown = set(rows) - names
  if unknown:
    raise KeyError(f"rows {sorted(unknown)} are not in {config_path}'s get_sweep()")
  # A row chosen on the validation queries brings its alternatives (`choose_on_validation`).
  choices = chosen_on_validation(mod, config_path, names, rows)
  wanted = set(rows) | {alt for row in rows for alt in choices.get(row, ())}
  sweep = [s for s in mod.get_sweep(config_arg) if s["name"] in wanted]
  uses_stage1 = lambda point: any("{" + STAGE1 + "}" in str(v) for v in point.values())  # noqa: E731
  # A row that starts from stage 1's weights; one that only reads a file of it (mined hard negatives) still
  # trains all its steps itself.
  from_stage1 = lambda point: "{" + STAGE1 + "}" in str(point.get("init.workdir", ""))  # noqa: E731
  with_stage1 = any(uses_stage1(s) for s in sweep)
  # Rows without stage 1 get its steps whenever the config's ablation has a stage 1, whichever rows run: a row's
  # numbers must not depend on which others were asked for.
  equal_steps = any(from_stage1(s) for s in mod.get_sweep(config_arg))
  row_points = [sweep_runner.Point(s["name"], {k: v for k, v in s.items() if k != "name"},
                                   (STAGE1,) if uses_stage1(s) else ()) for s in sweep]
  trains_stage1_steps = {s["name"]: not from_stage1(s) for s in sweep}
  row_points = sweep_runner.resolve(row_points, str(root), {}, [STAGE1] + [p.name for p in row_points])
  configs = {}
  if with_stage1:
    cfg = mod.get_config(f"stage=1,steps={stage1_steps},batch={batch}{extra}")
    cfg.data.dir = str(data_dir)
    configs[STAGE1] = apply_overrides(cfg, overrides or {})
  for point in row_points:
    cfg = mod.get_config(f"stage=2,{base_arg}")
    cfg.data.dir = str(data_dir)
    if equal_steps and trains_stage1_steps[point.name]:
      cfg.train.steps = steps + stage1_steps  # the optimiser steps stage 1 gives the other rows
    apply_overrides(cfg, point.overrides)
    configs[point.name] = apply_overrides(cfg, overrides or {})
  # An alternative that --set made the same run as its row (e.g. --set loss.aux_query_fused=0) is not trained twice.
  same = {alt for row, alts in choices.items() if row in configs for alt in alts
          if alt in configs and configs[alt].to_dict() == configs[row].to_dict()}
  row_points = [p for p in row_points if p.name not in same]
  configs = {k: v for k, v in configs.items() if k not in same}
  points = ([sweep_runner.Point(STAGE1, {})] if with_stage1 else []) + row_points
  return points, configs


def chosen_on_validation(mod, config_path: str, names, rows) -> dict[str, tuple[str, ...]]:
  """Returns the config module's CHOSEN_ON_VALIDATION ({row: (alternative row, ...)}; {} without one), each name
  checked against its get_sweep() row `names`, without the rows one of whose alternatives is among the `rows`
  asked for: an alternative asked for by name is a row of its own, reported as trained, nothing chosen."""
  choices = {row: tuple(alts) for row, alts in getattr(mod, "CHOSEN_ON_VALIDATION", {}).items()}
  bad = sorted({n for row, alts in choices.items() for n in (row, *alts)} - set(names))
  if bad:
    raise KeyError(f"{config_path}'s CHOSEN_ON_VALIDATION names {bad}, which are not rows of its get_sweep()")
  alts = [alt for a in choices.values() for alt in a]
  twice = sorted({a for a in alts if alts.count(a) > 1 or a in choices})
  if twice:
    raise ValueError(f"{config_path}'s CHOSEN_ON_VALIDATION: {twice} must each be the alternative of one row only "
                     "(not a row of its own there, nor its own alternative)")
  return {row: alts for row, alts in choices.items() if not set(alts) & set(rows)}


def _validation_scores(results: dict) -> dict | None:
  """Returns a row's exact-search SELECTION_METRICS (R@100, NDCG@10) on the validation queries and their mean
  ("score", `metrics.selection_score`); None without validation queries."""
  val = results["splits"].get(retrieval.FUSION_SPLIT, {}).get("exact")
  if not val or not val.get("num_queries"):
    return None
  out = {m: float(val[m]) for m in metrics_lib.SELECTION_METRICS}
  return out | {"score": metrics_lib.selection_score(out)}


def choose_on_validation(results: dict[str, dict], choices: dict, settings: dict | None = None):
  """Returns (results, {row: its choice}): each row of `choices` whose results and at least one alternative's
  are here is replaced by whichever of them scores best on the validation queries (`_validation_scores`; the row
  itself on a tie or without validation queries), and its alternatives are dropped. The choice records the run
  it took, every candidate's validation scores and `settings[row]` (the settings in which they differ)."""
  out, chosen = dict(results), {}
  for row, alts in choices.items():
    runs = [n for n in (row, *alts) if n in results]
    if row not in results or len(runs) < 2:
      continue
    scores = {n: _validation_scores(results[n]) for n in runs}
    scored = [n for n in runs if scores[n] is not None]
    best = max(scored, key=lambda n: scores[n]["score"]) if scored else row  # the first of equal scores: the row
    out[row] = results[best]
    for alt in alts:
      out.pop(alt, None)
    chosen[row] = {"run": best,
                   "criterion": f"validation mean of {' and '.join(metrics_lib.SELECTION_METRICS)}, exact search",
                   "validation": scores, "settings": (settings or {}).get(row, {})}
  return out, chosen


def _setting_differences(configs: dict, choices: dict) -> dict:
  """Returns {row: {key: {run: value}}}: the settings in which each chosen row's runs differ."""
  out = {}
  for row, alts in choices.items():
    runs = [n for n in (row, *alts) if n in configs]
    if row not in configs or len(runs) < 2:
      continue
    values = {n: _flat_config(configs[n].to_dict()) for n in runs}
    keys = sorted({k for v in values.values() for k in v})
    out[row] = {k: {n: values[n].get(k) for n in runs} for k in keys
                if len({json.dumps(values[n].get(k)) for n in runs}) > 1}
  return out


class _InProcess:
  """Executor of the ablation's points: trains (rows: and evaluates) in this process.

  A process per row would pay the start-up (imports, compiles) every time, which the CPU demo's
  ten-minute budget cannot spare. Exceptions propagate: the ablation stops at a failed run.
  """

  def __init__(self, configs: dict, data_dir: str):
    self.configs, self.data_dir = configs, data_dir

  def finished(self, point: sweep_runner.Point, workdir: str) -> bool:
    stage1 = point.name == STAGE1
    if not (epath.Path(workdir) / ("DONE" if stage1 else "metrics.json")).exists():
      return False
    _check_reuse(epath.Path(workdir), self.configs[point.name], "stage 1" if stage1 else f"row {point.name}")
    return True

  def execute(self, point: sweep_runner.Point, workdir: str, tag: str) -> sweep_runner.Result:
    del tag
    stage1 = point.name == STAGE1
    if stage1:
      log.info("== stage 1: image <-> title domain alignment")
    else:
      log.info("== row %s", point.name)
      self._embed_for_mining(point)
    train.train_and_evaluate(self.configs[point.name], workdir)
    if not stage1:
      evaluate.evaluate_workdir(workdir, self.data_dir)
    return sweep_runner.Result(point.name, "ok")

  def _embed_for_mining(self, point: sweep_runner.Point) -> None:
    """Writes RUN/catalogue_embeddings.npy when the row mines hard negatives from a trained run's (e.g.
    "data.hard_negative_embeddings": "{stage1}/catalogue_embeddings.npy") and it is not there yet."""
    name = str(self.configs[point.name].data.hard_negative_embeddings or "")
    path = epath.Path(name)
    need = bool(name) and path.name == evaluate.CATALOGUE_EMBEDDINGS and not path.exists() \
        and (path.parent / "config.json").exists()
    if jax.process_count() > 1:  # every process must agree: embedding is a collective
      need = bool(multihost_utils.broadcast_one_to_all(np.int32(need)))
    if need:
      log.info("== %s: embedding %s's products (the row's hard negatives are mined from them)", point.name,
               path.parent.name)
      evaluate.embed_catalogue(str(path.parent), self.data_dir)

  def finish(self, point: sweep_runner.Point, workdir: str, seconds: float) -> None:
    del seconds
    if point.name == STAGE1:
      fileio.write_text(epath.Path(workdir) / "DONE", "ok\n")


def _run(root, data_dir, config_path, mod, info, rows, steps, stage1_steps, batch, config_arg, overrides, budget):
  points, configs = _points(root, data_dir, config_path, mod, rows, steps, stage1_steps, batch, config_arg,
                            overrides, budget)
  choices = chosen_on_validation(mod, config_path, [s["name"] for s in mod.get_sweep(config_arg)], rows)
  if not info["num_queries"].get(retrieval.FUSION_SPLIT):
    # Nothing to choose on: the rows run as the config gives them, their alternatives not at all.
    idle = {alt for alts in choices.values() for alt in alts}
    if idle & set(configs):
      log.warning("%s has no validation queries: %s trained as configured, not chosen on them", data_dir,
                  ", ".join(row for row in choices if row in configs))
    points = [p for p in points if p.name not in idle]
  margins_path = root / "ablation_margins.json"
  # Rows reused from an earlier invocation keep the timings measured then.
  timings = json.loads(margins_path.read_text()).get("timings_s", {}) if margins_path.exists() else {}
  for r in sweep_runner.run(points, str(root), _InProcess(configs, data_dir)):
    if r.status == "ok":
      timings["stage1_s" if r.name == STAGE1 else r.name] = r.seconds
  results = {p.name: evaluate.load_results(str(root / p.name)) for p in points if p.name != STAGE1}
  results, chosen = choose_on_validation(results, choices, _setting_differences(configs, choices))
  out_rows = [row_summary(name, res) | ({"chosen": chosen[name]} if name in chosen else {})
              for name, res in results.items()] + keyword_rows(results)
  for r in out_rows:  # the hybrid's learned row may be a chosen one: which run (workdir) it fused
    if r["row"] == "hybrid":
      r["learned_run"] = chosen[r["learned_row"]]["run"] if r["learned_row"] in chosen else r["learned_row"]
  _write_reports(root, data_dir, config_path, info, out_rows, timings)
  return out_rows


def _write_reports(root, data_dir, config_path, info, out_rows, timings) -> None:
  """Writes ablation.json, ablation.md, ablation_margins.json and ablation.png in `root`."""
  fileio.write_json(root / "ablation.json", out_rows)
  md = ["# Ablation", "", f"Data: `{data_dir}`; config: `{config_path}`; test split, exact search (ScaNN's R@100 and "
        "its recall against exact search in their columns); metrics in %.", "",
        table(out_rows)]
  if info["num_products"] <= 100:
    md += ["", f"The catalogue has {info['num_products']} products, so R@100 ranks all of them (1.0 for every "
           "judged query by construction): compare the rows by NDCG@10 and the per-row metrics.json (recall@10)."]
  chosen = [r for r in out_rows if r.get("chosen")]
  if chosen:
    md += ["", "Chosen on the validation queries (the run whose mean of R@100 and NDCG@10 there, exact search, is "
           "highest; the table shows it under the row's name):"]
    md += [f"- {r['row']}: {_fmt_choice(r['chosen'])}" for r in chosen]
  gains = margins(out_rows)
  fmt_gains = lambda g: "; ".join(  # noqa: E731
      f"{k}: R@100 {_fmt_margin(v, 'recall@100')}, NDCG@10 {_fmt_margin(v, 'ndcg@10')}" for k, v in g.items())
  if gains:
    md += ["", "fusion_ft minus text_only (points): " + fmt_gains(gains)]
    if "ci95" in gains["overall"]:
      md += ["", f"[low, high]: the {CI_LEVEL:.0%} paired bootstrap interval over the test queries (the same queries "
             "resampled for both rows); a margin whose interval holds 0 is within what another sample of queries "
             "moves it."]
  over_concat = margins(out_rows, "fusion_ft", "concat_ft")
  if over_concat:
    md += ["", "fusion_ft minus concat_ft (what the fusion network adds over concatenating the same stage-1 towers' "
           "embeddings, points): " + fmt_gains(over_concat)]
  # The stage-1 rows minus the same stage-1 text towers without an image: what the image itself adds.
  image_adds = {name: margins(out_rows, name, "text_only_ft") for name in ("fusion_ft", "concat_ft")}
  image_adds = {k: v for k, v in image_adds.items() if v}
  if image_adds:
    md += ["", "What the image adds (minus text_only_ft, stage 1's text towers without an image, points):"]
    md += [f"- {name}: {fmt_gains(g)}" for name, g in image_adds.items()]
  learned = [r["row"] for r in out_rows if r["row"] not in ("bm25", "hybrid")]
  vs_bm25 = {name: margins(out_rows, name, "bm25") for name in learned + ["hybrid"]}
  vs_bm25 = {k: v for k, v in vs_bm25.items() if v}
  hybrid = next((r for r in out_rows if r["row"] == "hybrid"), None)
  if vs_bm25:
    md += ["", "BM25: keyword search over title + description + attributes (no model; `mmr_jax/evals/keyword.py`). "
           f"hybrid: {hybrid['learned_row']} (the learned row with the best validation R@100 and NDCG@10, their mean"
           + ("" if hybrid.get("learned_run", hybrid["learned_row"]) == hybrid["learned_row"]
              else f"; run {hybrid['learned_run']}") + ") fused with BM25 per "
           f"query ({hybrid['fusion']['method']}, learned-ranking weight {hybrid['fusion']['weight']:g}, "
           + ("chosen on the validation queries)." if hybrid["fusion"].get("tuned_on") else
              "not tuned: the catalogue has no validation queries).") + "", "", "Minus bm25 (points):"]
    md += [f"- {name}: {fmt_gains(g)}" for name, g in vs_bm25.items()]
  fileio.write_text(root / "ablation.md", "\n".join(md) + "\n")
  fileio.write_json(root / "ablation_margins.json",
                    {"fusion_ft_minus_text_only": gains, "fusion_ft_minus_concat_ft": over_concat,
                     "minus_bm25": vs_bm25, "image_adds": image_adds,
                     "timings_s": timings})
  fileio.write_atomic(root / "ablation.png", lambda p: plot_rows(out_rows, p))


def _fmt_choice(choice: dict) -> str:
  """Returns "fusion_ft_no_q2f (validation R@100 / NDCG@10 81.0 / 71.7; fusion_ft 80.0 / 71.7; they differ in
  loss.aux_query_fused: fusion_ft 1.0, fusion_ft_no_q2f 0.0)"."""
  scores = choice["validation"]
  fmt = lambda v: "no validation queries" if v is None else " / ".join(  # noqa: E731
      f"{100 * v[m]:.1f}" for m in metrics_lib.SELECTION_METRICS)
  others = "; ".join(f"{n} {fmt(v)}" for n, v in scores.items() if n != choice["run"])
  settings = "; ".join(f"{k}: " + ", ".join(f"{n} {v}" for n, v in by_run.items())
                       for k, by_run in choice.get("settings", {}).items())
  return (f"{choice['run']} (validation R@100 / NDCG@10 {fmt(scores[choice['run']])}; {others}"
          + (f"; they differ in {settings}" if settings else "") + ")")


def _fmt_ci(ci) -> str:
  """Returns " [+2.1, +5.9]" for an interval [low, high] in points, "" for None."""
  return f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else ""


def _fmt_margin(v: dict, metric: str) -> str:
  """Returns "+4.0" or, with its confidence interval, "+4.0 [+2.1, +5.9]" (points)."""
  return f"{v[metric]:+.1f}" + _fmt_ci(v.get("ci95", {}).get(metric))


def _spread(values) -> dict:
  """Returns {"mean", "std" (population), "min", "max", "values"} of per-seed numbers, NaNs dropped."""
  v = np.asarray([x for x in values if x is not None and not np.isnan(x)], np.float64)
  if not v.size:
    return {"mean": None, "std": None, "min": None, "max": None, "values": []}
  return {"mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()), "max": float(v.max()),
          "values": [float(x) for x in v]}


# The margins ablation_seeds.json follows over the seeds (those whose rows ran): the paper's headline; what the
# fusion network adds over naive concatenation of the same stage-1 towers; with the text_only_ft row, what the image
# adds to each image row against the same stage-1 text towers, and what those towers add over text_only's.
SEED_MARGINS = (("fusion_ft", "text_only"), ("fusion_ft", "concat_ft"), ("fusion_ft", "text_only_ft"),
                ("concat_ft", "text_only_ft"), ("text_only_ft", "text_only"))


def seed_summary(per_seed: dict) -> dict:
  """Returns ablation_seeds.json from {seed: that seed's ablation.json rows}: per row, overall and per tag, the
  spread (`_spread`) of each metric over the seeds; and the `SEED_MARGINS` (points) likewise, each pooled over the
  seeds with its interval over the queries ("ci95") where the rows kept their per-query values."""
  seeds = list(per_seed)
  if not seeds:
    raise ValueError("seed_summary: no seeds")
  names = [r["row"] for r in per_seed[seeds[0]]]
  by_seed = {s: {r["row"]: r for r in rows} for s, rows in per_seed.items()}
  for s, rows in by_seed.items():
    if set(rows) != set(names):
      raise ValueError(f"seed {s} has the rows {sorted(rows)}, seed {seeds[0]} {sorted(names)}")
  out_rows = {}
  for name in names:
    tags = sorted({t for s in seeds for t in by_seed[s][name]["by_tag"]})
    out_rows[name] = {
        "overall": {m: _spread([by_seed[s][name]["overall"].get(m, np.nan) for s in seeds]) for m in PAPER_METRICS},
        "by_tag": {t: {m: _spread([by_seed[s][name]["by_tag"].get(t, {}).get(m, np.nan) for s in seeds])
                       for m in PAPER_METRICS} for t in tags}}
  out = {"seeds": seeds, "rows": out_rows,
         # Which run each row chosen on the validation queries took, per seed.
         "chosen": {name: {str(s): by_seed[s][name]["chosen"]["run"] for s in seeds}
                    for name in names if all(by_seed[s][name].get("chosen") for s in seeds)}}
  for row, baseline in SEED_MARGINS:
    out[f"{row}_minus_{baseline}"] = _seed_margin(per_seed, by_seed, row, baseline)
  return out


def _seed_margin(per_seed: dict, by_seed: dict, row: str, baseline: str) -> dict:
  """Returns {group: {metric: spread of `row` - `baseline` over the seeds (+ "ci95")}}; {} without both rows."""
  seeds = list(per_seed)
  gains = {s: margins(per_seed[s], row, baseline) for s in seeds}
  groups = sorted({g for m in gains.values() for g in m}, key=lambda g: (g != "overall", g))
  margin = {g: {m: _spread([gains[s].get(g, {}).get(m, np.nan) for s in seeds]) for m in PAPER_METRICS}
            for g in groups}
  if margin and all(row in by_seed[s] and baseline in by_seed[s] for s in seeds):
    # Pooled over the seeds: each query's margin averaged over them, its interval over the queries.
    paired = _paired_values([by_seed[s][row] for s in seeds], [by_seed[s][baseline] for s in seeds])
    if paired is not None:
      for g in groups:
        for m, ci in _interval(paired, g).items():
          margin[g][m]["ci95"] = ci
  return margin


def seed_table(summary: dict) -> str:
  """Returns ablation_seeds.md's table: per row, mean +- std (min ... max) of R@100 and NDCG@10 in %, overall and
  per tag's NDCG@10."""
  def cell(sp):
    if sp["mean"] is None:
      return "-"
    return f"{100 * sp['mean']:.1f} ± {100 * sp['std']:.1f} ({100 * sp['min']:.1f} … {100 * sp['max']:.1f})"
  tags = sorted({t for r in summary["rows"].values() for t in r["by_tag"]})
  head = ["row", "R@100", "NDCG@10"] + [f"{t} NDCG@10" for t in tags]
  body = [[name, cell(r["overall"]["recall@100"]), cell(r["overall"]["ndcg@10"])]
          + [cell(r["by_tag"][t]["ndcg@10"]) if t in r["by_tag"] else "-" for t in tags]
          for name, r in summary["rows"].items()]
  return report.markdown_table(head, body)


def check_seeds(seeds: list[int], overrides: dict | None) -> None:
  """Raises ValueError unless `seeds` are one or more distinct seeds and `overrides` leaves the seed to them."""
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds {seeds}: give one or more distinct seeds")
  if overrides and "seed" in overrides:
    raise ValueError("--set seed=... and --seeds: give the seeds with --seeds only")


def run_seeds(workdir: str, seeds, data_dir: str, config_path: str, rows=ROWS, steps: int = 0,
              stage1_steps: int = 0, batch: int = 0, config_arg: str = "", overrides: dict | None = None,
              budget: str = "default") -> dict:
  """Runs the ablation (`run`) once per seed in WORKDIR/seed_<s>/ (config `seed` set to s, the other settings
  alike) and writes WORKDIR/ablation_seeds.json and .md; returns the summary (`seed_summary`)."""
  seeds = [int(s) for s in seeds]
  check_seeds(seeds, overrides)
  root = epath.Path(workdir)
  per_seed = {}
  for i, s in enumerate(seeds):
    log.info("== seed %d (%d of %d): %s", s, i + 1, len(seeds), root / f"seed_{s}")
    per_seed[s] = run(str(root / f"seed_{s}"), data_dir, config_path, rows, steps, stage1_steps, batch, config_arg,
                      dict(overrides or {}, seed=s), budget)
  summary = seed_summary(per_seed)
  if jax.process_index() == 0:
    fmt = lambda sp: "-" if sp["mean"] is None else (  # noqa: E731
        f"{sp['mean']:+.1f} ± {sp['std']:.1f} (" + ", ".join(f"{v:+.1f}" for v in sp["values"]) + ")"
        + _fmt_ci(sp.get("ci95")))
    md = ["# Ablation over seeds", "", f"Data: `{data_dir}`; config: `{config_path}`; seeds {seeds} (each in "
          "`seed_<s>/`, its own ablation.md); test split, exact search; mean ± standard deviation (min … max) "
          "over the seeds, in %.", "", seed_table(summary)]
    for row, runs in summary["chosen"].items():
      md += ["", f"{row} is the run its validation queries ranked best (see each seed's ablation.md): "
             + ", ".join(f"seed {s} {run}" for s, run in runs.items()) + "."]
    for row, baseline in SEED_MARGINS:
      margin = summary[f"{row}_minus_{baseline}"]
      if margin:
        md += ["", f"{row} minus {baseline} (points; mean ± std, then each seed's; [low, high]: the "
               f"{CI_LEVEL:.0%} paired bootstrap interval over the test queries of each query's margin averaged "
               "over the seeds):"]
        md += [f"- {g}: R@100 {fmt(m['recall@100'])}; NDCG@10 {fmt(m['ndcg@10'])}" for g, m in margin.items()]
    fileio.write_json(root / "ablation_seeds.json", summary)
    fileio.write_text(root / "ablation_seeds.md", "\n".join(md) + "\n")
  return summary


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument("--workdir", required=True)
  p.add_argument("--data", default="data/synthetic", help="DATA_DIR (synthetic default or an imported catalogue)")
  p.add_argument("--config", default="configs/demo.py", help="config file with get_config(arg) and get_sweep(arg)")
  p.add_argument("--config_arg", default="", help="extra get_config arguments, e.g. 'loss=sigmoid'")
  p.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of rows")
  p.add_argument("--steps", type=int, default=0, help="stage-2 steps per row (0: the config's)")
  p.add_argument("--stage1_steps", type=int, default=0, help="stage-1 steps (0: the config's)")
  p.add_argument("--batch", type=int, default=0, help="global batch (0: the config's)")
  p.add_argument("--budget", choices=sorted(config_lib.BUDGETS), default="default",
                 help="long: 5x every step count (how far each row goes with more training); the config gets "
                 "budget=long too, for the settings it changes with it")
  p.add_argument("--seeds", default="", metavar="S,S,...",
                 help="run the whole ablation once per seed (WORKDIR/seed_<s>/) and write ablation_seeds.json / .md: "
                 "each row's mean, std and range over the seeds")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override for every run, e.g. --set optim.lr=1e-3 (repeatable)")
  p.add_argument("--verbosity", type=int, default=0, choices=(0, 1, 2),
                 help="0: progress bars, one line per stage / row, warnings and the table; 1: every INFO line "
                 "(the trainer's and evaluation's too); 2: everything, native libraries' logs included. "
                 "WORKDIR/logs/ablation.log gets INFO and native logs at any level")
  args = p.parse_args(argv)
  # The arguments are checked before anything is written (the log file included).
  overrides = {}
  for item in args.set:
    if "=" not in item:
      p.error(f"--set {item!r} is not KEY=VALUE")
    k, v = item.split("=", 1)
    overrides[k] = v
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    p.error(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. --seeds 0,1,2")
  if seeds:
    try:
      check_seeds(seeds, overrides)
    except ValueError as e:
      p.error(str(e))
  runtime.setup_logging(args.verbosity, headline=("mmr_jax.ablation",),
                        log_file=runtime.log_file_for(args.workdir, "ablation"))
  runtime.enable_compilation_cache()
  rows_arg = tuple(r for r in args.rows.split(",") if r)
  if seeds:
    try:
      run_seeds(args.workdir, seeds, args.data, args.config, rows_arg, args.steps, args.stage1_steps, args.batch,
                args.config_arg, overrides, args.budget)
    except sweep_runner.SweepError as e:
      p.error(str(e))
    print((epath.Path(args.workdir) / "ablation_seeds.md").read_text())
    return
  try:
    rows = run(args.workdir, args.data, args.config, rows_arg, args.steps,
               args.stage1_steps, args.batch, args.config_arg, overrides, args.budget)
  except sweep_runner.SweepError as e:  # a missing config file, an unknown {placeholder}: one line, exit 2
    p.error(str(e))
  print(table(rows))
  md = (epath.Path(args.workdir) / "ablation.md").read_text().splitlines()
  print("\n".join(line for line in md if line.startswith(("Chosen on", "fusion_ft minus", "- "))))


if __name__ == "__main__":
  main()
