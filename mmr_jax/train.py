r"""The one trainer command: both alignment stages, any model in the registry, any mesh.

  python -m mmr_jax.train --config configs/demo.py:stage=1 --workdir workdirs/s1
  python -m mmr_jax.train --config configs/demo.py:stage=2,variant=fusion \
      --workdir workdirs/s2 --config.init.workdir=workdirs/s1

Stages are configs, not scripts: `config.stage` selects the objective (objectives.OBJECTIVES) and
`config.model.name` the model (models.MODELS). The workdir gets config.json, metrics.jsonl,
TensorBoard summaries and Orbax checkpoints; a second run on the same workdir resumes.

This module is the loop around `trainer.Trainer` (the compiled step): resume, validation through the
evaluators of `mmr_jax.evals`, checkpoints, preemption, the non-finite-loss policy, and the CLI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np
from etils import epath
from ml_collections import config_flags
from tqdm import tqdm

from mmr_jax import batch_spec
from mmr_jax import checkpoint as ckpt_lib
from mmr_jax.data import pipeline
from mmr_jax.data import tfds_builder
from mmr_jax.evals import objective
from mmr_jax.evals import report
from mmr_jax.evals import retrieval
from mmr_jax import evaluate
from mmr_jax import fileio
from mmr_jax import runtime
from mmr_jax.training import profiling
from mmr_jax.training.trainer import Trainer, resolve_config

log = logging.getLogger("mmr_jax.train")


class NonFiniteLossError(RuntimeError):
  pass


# ------------------------------------------------------------------------------------------- loop


# Allowed values of train options that are strings: a typo ("Stop") would otherwise act as another value.
TRAIN_CHOICES = {"nan_policy": ("stop", "skip"), "best_mode": ("auto", "min", "max")}


def check_train_options(tcfg) -> None:
  """Raises ValueError naming `train.<key>` and its allowed values when a choice option has another value."""
  for key, allowed in TRAIN_CHOICES.items():
    value = tcfg[key]
    if value not in allowed:
      raise ValueError(f"train.{key}={value!r} is not one of {', '.join(allowed)}: set --config.train.{key}="
                       f"{allowed[0]} (or {', '.join(allowed[1:])})")


def resolve_best_metric(tcfg, logged: set[str]) -> tuple[str, str]:
  """Returns (best_metric, best_mode) for keep_best, given the validation metrics this run logs.

  "auto" picks validation NDCG@10 when retrieval is evaluated, else the objective's validation loss; a
  named metric must be one the run logs (else keep_best would silently keep nothing).
  """
  metric, mode = tcfg.best_metric, tcfg.best_mode
  check_train_options(tcfg)
  if metric == "auto":
    losses = sorted(k for k in logged if k.endswith("/loss"))
    metric = "val/ndcg@10" if "val/ndcg@10" in logged else (losses[0] if losses else "")
    if not metric:
      raise ValueError(f"train.best_metric=auto found no validation metric to rank checkpoints by among "
                       f"{sorted(logged)}; name one, or set train.keep_best=0")
  elif metric not in logged:
    raise ValueError(f"train.best_metric={metric!r} is not a metric this run's validation logs ({sorted(logged)}); "
                     "name one of them, or set train.keep_best=0")
  if mode == "auto":
    mode = "min" if metric.endswith("loss") else "max"
  return metric, mode


def _check_init_sources(init, workdir) -> None:
  """Raises FileNotFoundError for a missing init.workdir / .npz before anything is compiled or written
  (a run resuming from its own checkpoint does not read them)."""
  if ckpt_lib.has_checkpoint(workdir):
    return
  if init.workdir and not ckpt_lib.has_checkpoint(init.workdir):
    raise FileNotFoundError(f"init.workdir={init.workdir!r} holds no checkpoint (checkpoints/<step>/): give the "
                            "stage-1 workdir, trained to at least one checkpoint")
  for key in ("vit_npz", "two_tower_npz"):
    path = init.get(key)
    if path and not ckpt_lib.absolute(path).is_file():
      raise FileNotFoundError(f"init.{key}={path!r} is not a file")


def resolve_stream_offset(config) -> int:
  """Returns where this run's training stream starts, in global batches (`config.data.stream_offset`).

  -1 (auto): after init.workdir's checkpoint when that run read the same stream of training pairs (stage 2, or
  stage 1 with data.stage1_source="pairs"; same seed, shuffle_seed and batch size), so the two runs together see
  the batches one run of their combined steps would (its own offset included); else 0.
  """
  offset = int(config.data.get("stream_offset", 0))
  if offset >= 0:
    return offset
  if offset != -1:
    raise ValueError(f"config.data.stream_offset={offset}: expected a number of batches >= 0, or -1 (auto)")
  init_dir = config.init.workdir
  reads_pairs = lambda c: int(c["stage"]) == 2 or c["data"].get("stage1_source") == "pairs"  # noqa: E731
  if not init_dir or not reads_pairs(config):
    return 0
  path = ckpt_lib.absolute(init_dir) / "config.json"
  ckpts = ckpt_lib.absolute(init_dir) / "checkpoints"
  if not path.exists() or not ckpts.is_dir():
    return 0
  other = json.loads(path.read_text())
  same = lambda c: (int(c["seed"]), c["data"].get("shuffle_seed"), int(c["data"]["batch_size"]))  # noqa: E731
  if not reads_pairs(other) or same(other) != same(config):
    return 0
  steps = max((int(p.name) for p in ckpts.iterdir() if p.name.isdigit()), default=0)
  return max(int(other["data"].get("stream_offset", 0)), 0) + steps


def _report_truncation(config, workdir) -> None:
  """Logs (a warning when any is cut) and writes product_truncation.json: how data.product_len cuts product text."""
  rep = pipeline.product_truncation(config.data.dir, config.data)
  ckpt_lib.write_json(workdir / "product_truncation.json", rep)
  tokens = rep["tokens"]
  if rep["truncated"]:
    fields = ", ".join(f"{k} {100 * v:.1f}%" for k, v in rep["by_field"].items() if v)
    log.warning("config.data.product_len=%d cuts the text of %.1f%% of products (fields losing tokens: %s); "
                "product text is %d tokens at the median, %d at p95, %d at most: raise data.product_len to "
                "keep it", rep["product_len"], 100 * rep["truncated"], fields, tokens["p50"], tokens["p95"],
                tokens["max"])
  else:
    log.info("product text fits data.product_len=%d (at most %d tokens in a sample of %d products)",
             rep["product_len"], tokens["max"], rep["sampled"])


def check_loss_settings(config) -> None:
  """Warns about loss settings that cannot do what they say on this run's data and init."""
  if config.stage == 2 and config.loss.grade_weighted:
    grades = tfds_builder.catalog_info(config.data.dir).get("pair_grades") or []
    if len(set(grades)) == 1:
      log.warning("loss.grade_weighted=True, but %s's training pairs are all %s-labelled (imported with "
                  "--pair_grades %s): every pair weighs the same and the setting changes nothing; import with "
                  "--pair_grades E,S (or E,S,C) to train on graded pairs", config.data.dir, grades[0], grades[0])
  # Stage 1's objective has a query <-> product-text term exactly when its batches carry queries.
  text_term = "query_tokens" in batch_spec.from_config(1, config.data, 1)
  if config.stage == 1 and config.loss.stage1_lock_text and not text_term and not config.init.two_tower_npz:
    log.warning("loss.stage1_lock_text=True without a text term in stage 1 (data.stage1_source='products', "
                "data.stage1_pseudo_queries=False) or pretrained text towers (init.two_tower_npz): the image "
                "tower aligns with untrained text towers; set data.stage1_source='pairs' or "
                "data.stage1_pseudo_queries=True")
  if config.stage == 1 and config.loss.stage1_text != 1.0 and not text_term:
    log.warning("loss.stage1_text=%s weighs stage 1's query <-> product-text term, but stage 1 has none "
                "(data.stage1_source='products', data.stage1_pseudo_queries=False): the setting changes nothing; "
                "set data.stage1_source='pairs' or data.stage1_pseudo_queries=True", config.loss.stage1_text)


def _evaluators(config, trainer: Trainer) -> tuple[int, list]:
  """Returns (eval_every, evaluators) of the run: none when the catalogue has nothing to validate on.

  The objective's metrics on `train.eval_batches` validation batches always; validation retrieval (Recall@K,
  NDCG@10, MRR over the whole catalogue) in stage 2 with `train.eval_retrieval` and validation queries.
  """
  eval_every = config.train.eval_every
  if not eval_every:
    return 0, []
  try:
    pipeline.make_train_iterator(config.data.dir, config.stage, config.data, seed=0, split="validation")
  except ValueError as e:  # e.g. a catalogue without validation queries or held-out products
    log.warning("validation disabled: %s", e)
    return 0, []

  def val_batches():
    it = pipeline.make_train_iterator(config.data.dir, config.stage, config.data, seed=config.seed + 1,
                                      split="validation", augment=False)
    for _ in range(config.train.eval_batches):
      yield next(it)

  evaluators = [objective.ObjectiveEvaluator(trainer.objective_metrics, val_batches, trainer.mesh,
                                             trainer.objective_metric_names())]
  queries = tfds_builder.catalog_info(config.data.dir).get("num_queries", {}).get("validation", 0)
  if config.stage == 2 and config.train.eval_retrieval and queries > 0:
    evaluators.append(retrieval.RetrievalEvaluator(config, trainer.model, trainer.mesh, split="validation"))
  return eval_every, evaluators


def train_and_evaluate(config, workdir: str, mesh=None, hooks=()) -> dict:
  """Trains `config` in `workdir` (resuming if it holds a checkpoint); returns the last logged metrics
  and "step", the step it stopped at (below config.train.steps if preempted).

  `hooks`: callables hook(step, state) run after every step (tests use one to deliver SIGTERM).
  A workdir another run is writing is refused (fileio.WorkdirBusyError) before anything in it changes.
  """
  config = resolve_config(config)
  check_train_options(config.train)
  workdir = ckpt_lib.absolute(workdir)
  if ckpt_lib.has_checkpoint(workdir):  # the restored state and iterator position refer to the recorded data
    ckpt_lib.check_data_dir(workdir, config.data.dir)
  _check_init_sources(config.init, workdir)
  config.data.stream_offset = resolve_stream_offset(config)  # config.json records where the stream started
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:  # one lock per job: its processes write one workdir together
      stack.enter_context(fileio.WorkdirLock(workdir, "train"))  # creates the workdir (none left if refused)
    else:
      workdir.mkdir(parents=True, exist_ok=True)
    return _train(config, workdir, mesh, hooks)


def _train(config, workdir: epath.Path, mesh, hooks) -> dict:
  tcfg = config.train
  trainer = Trainer(config, str(workdir), mesh=mesh)
  log.info("mesh %s; %d params", dict(trainer.mesh.shape),
           sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state.params)))
  mem = trainer.memory_analysis()
  log.info("compiled step memory: %s", mem)
  if jax.process_index() == 0:
    ckpt_lib.write_json(workdir / "compiled_memory.json", mem)

  offset = int(config.data.stream_offset)
  if offset:
    log.info("the training stream starts at batch %d (data.stream_offset)", offset)
  train_iter = pipeline.make_train_iterator(config.data.dir, config.stage, config.data, seed=config.seed,
                                            split="train", offset=offset)
  eval_every, evaluators = _evaluators(config, trainer)
  keep_best, best_metric, best_mode = tcfg.keep_best, tcfg.best_metric, tcfg.best_mode
  if keep_best and eval_every:
    logged = set().union(*(e.metric_names() for e in evaluators))
    best_metric, best_mode = resolve_best_metric(tcfg, logged)
    log.info("keeping the best %d checkpoint(s) by %s (%s)", keep_best, best_metric, best_mode)
  elif keep_best:
    log.warning("train.keep_best=%d needs validation, which this run does not have: keeping the latest "
                "checkpoints only", keep_best)
    keep_best = 0
  ckpt = ckpt_lib.Checkpointer(str(workdir), keep=tcfg.keep, keep_best=keep_best,
                               best_metric=best_metric, best_mode=best_mode,
                               async_save=tcfg.async_checkpoint)
  writer = runtime.MetricWriter(workdir)
  latest = ckpt.latest_step()
  saved_hosts = ckpt.data_process_count(latest) if latest is not None else None
  if latest is not None and saved_hosts not in (None, jax.process_count()):
    # grain saves one iterator state per process; with another process count there is none for some
    # processes, so the position is derived from the step instead (the same global stream, up to rounding).
    state, _ = ckpt.restore(latest, trainer.abstract_state)
    position = latest * config.data.batch_size // jax.process_count() // pipeline.group_size(
        config.stage, config.data)
    moved = pipeline.move_train_iterator(train_iter, position)
    log.warning("resumed from step %d, written by %d process(es), on %d: model and optimizer state restored; "
                "the data iterator %s", latest, saved_hosts, jax.process_count(),
                f"restarts at element {position} of each process's slice (step x data.batch_size / processes / "
                "(1 + data.hard_negatives): "
                "the global stream continues up to rounding)" if moved else
                "restarts from the beginning of the data (its worker processes' positions cannot be derived)")
  elif latest is not None:
    state, train_iter = ckpt.restore(latest, trainer.abstract_state, train_iter)
    log.info("resumed from step %d", latest)
  else:
    state = trainer.init_state()
  writer.truncate_after(latest or 0)  # rows of a run that died after its last checkpoint (or before any)
  start = int(jax.device_get(state.step))
  if start == 0 and jax.process_index() == 0:
    _report_truncation(config, workdir)
    check_loss_settings(config)
  # Written only once the state exists: a run refused for a mismatching checkpoint leaves the workdir as it was.
  if jax.process_index() == 0:
    ckpt_lib.write_json(workdir / "config.json", config.to_dict())
    ckpt_lib.record_data_dir(workdir, config.data.dir)

  # The count is cumulative and saved; the stop policy acts on steps since the resume, since those before it
  # were reported (or allowed under train.nan_policy=skip) by the run that had them.
  nonfinite_at_start = int(jax.device_get(state.nonfinite))

  def stop_on_new_nonfinite(step: int, state) -> int:
    """Returns the cumulative non-finite count; raises NonFiniteLossError on new ones under nan_policy=stop."""
    nonfinite = int(jax.device_get(state.nonfinite))
    if nonfinite > nonfinite_at_start and tcfg.nan_policy == "stop":
      good = ckpt.latest_step()
      ckpt.close()
      raise NonFiniteLossError(
          f"loss or gradients became NaN/Inf ({nonfinite - nonfinite_at_start} step(s) between steps {start} and "
          f"{step}); those updates were dropped. Last good checkpoint: step {good} in {workdir / 'checkpoints'}. "
          "Lower optim.lr, check the data, or set train.nan_policy=skip.")
    return nonfinite

  last = {}
  pbar = None
  if tcfg.progress and jax.process_index() == 0 and start < tcfg.steps:
    pbar = tqdm(total=tcfg.steps, initial=start, desc=f"stage {config.stage} {config.model.variant}",
                unit="step", dynamic_ncols=True, file=sys.stderr,
                mininterval=0.5 if sys.stderr.isatty() else 15.0)
  t0, steps_timed = time.time(), 0
  # One trace folder per process: processes on one machine would otherwise write the same file name.
  profiler = profiling.StepProfiler(workdir / "profile" / f"process_{jax.process_index()}",
                                    tcfg.profile_from, tcfg.profile_steps)
  with runtime.Preemption() as preempt:
    step = start
    while step < tcfg.steps:
      profiler.before(step)
      host_batch = next(train_iter)
      state, metrics = trainer.step(state, host_batch)
      step += 1
      if profiler.after(step, (state, metrics)) is not None:
        log.info("profile of steps %d-%d (%s):\n%s", tcfg.profile_from + 1, step, profiler.out_dir,
                 profiling.format_summary(profiler.summary))
      steps_timed += 1
      if pbar is not None:
        pbar.update(1)
      for hook in hooks:
        hook(step, state)
      if step % tcfg.log_every == 0 or step == tcfg.steps:
        m = jax.device_get(metrics)
        nonfinite = stop_on_new_nonfinite(step, state)
        dt = time.time() - t0
        m = {k: float(v) for k, v in m.items()}
        m.update(steps_per_s=steps_timed / max(dt, 1e-9),
                 examples_per_s=steps_timed * config.data.batch_size / max(dt, 1e-9), nonfinite_steps=nonfinite)
        t0, steps_timed = time.time(), 0
        writer.write(step, m)
        last = m
        if pbar is not None:
          pbar.set_postfix(loss=f"{m['loss']:.4f}")
      val = None
      if eval_every and (step % eval_every == 0 or step == tcfg.steps):
        val = {}
        with trainer.context():
          for evaluator in evaluators:
            val.update(evaluator.run(state.params))
        writer.write(step, val)
        last.update(val)
      preempted = preempt.requested or ckpt.reached_preemption(step)
      if step % tcfg.ckpt_every == 0 or step == tcfg.steps or preempted:
        # Checked before every save too, so no checkpoint holds a non-finite step the stop policy has not seen:
        # the step named "last good" resumes cleanly.
        stop_on_new_nonfinite(step, state)
        ckpt.save(step, state, train_iter, metrics=val, force=True)
      if preempted:
        log.warning("preempted at step %d: checkpoint written, exiting", step)
        break
  profiler.close()  # a run that ended inside the traced steps
  if pbar is not None:
    pbar.close()
  ckpt.close()
  writer.close()
  return dict(last, step=step)


# --------------------------------------------------------------------------------------------- CLI


def main(argv=None):

  config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo.py:stage=1", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and summaries go (local or gs://).")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for multi-host runs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-host run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-host run.")
  flags.DEFINE_bool("evaluate", False, "After the last step, evaluate the workdir in the same job (what "
                    "`python -m mmr_jax.evaluate --workdir DIR` does: retrieval metrics into metrics.json, on "
                    "every host of a multi-host job); a preempted run skips it and evaluates when resumed.")
  flags.mark_flags_as_required(["config", "workdir"])
  FLAGS = flags.FLAGS

  def _main(_):
    # absl's -v/--verbosity: 0 (default) progress, warnings and the trainer's few INFO lines; 1 all INFO; 2 all.
    runtime.setup_logging(max(FLAGS.verbosity, 0), headline=("mmr_jax.train", "mmr_jax.training.trainer"))
    runtime.enable_compilation_cache()
    runtime.maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    runtime.attach_log_file(runtime.log_file_for(FLAGS.workdir, "train"))
    metrics = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
      print(json.dumps({k: round(v, 5) for k, v in metrics.items()}))
    if FLAGS.evaluate and metrics["step"] >= FLAGS.config.train.steps:
      results = evaluate.evaluate_workdir(FLAGS.workdir)
      if jax.process_index() == 0:
        print(report.markdown_report(results))

  try:
    app.run(_main, argv=argv)
  except (AttributeError, KeyError) as e:
    # A mistyped --config.key=value surfaces from ml_collections while absl parses the flags.
    msg = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
    msg = msg.strip("'\" ")
    if FLAGS.is_parsed():  # not a flag problem: an error of the run itself
      raise
    keys = [a.split("=", 1)[0] for a in (argv or sys.argv)[1:] if a.startswith("--config.")]
    part = msg.split()[0].strip("'\"") if msg else ""  # ml_collections names the unknown part first
    bad = next((k for k in keys if part in k[len("--config."):].split(".")), None)
    if bad is None:  # e.g. an unknown `configs/x.py:key=value` argument: its own message says it
      print(f"error: {msg}", file=sys.stderr)
    else:
      hint = msg[msg.index("Did you mean"):] if "Did you mean" in msg else f"(unknown: {part!r})"
      print(f"error: {bad} names no config key. {hint}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
