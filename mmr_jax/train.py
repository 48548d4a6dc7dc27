r"""The one trainer: both alignment stages, any model in the registry, any mesh.

  python -m mmr_jax.train --config configs/demo.py:stage=1 --workdir workdirs/s1
  python -m mmr_jax.train --config configs/demo.py:stage=2,variant=fusion \
      --workdir workdirs/s2 --config.init.workdir=workdirs/s1

Stages are configs, not scripts: `config.stage` selects the objective (objectives.OBJECTIVES) and
`config.model.name` the model (models.MODELS). The workdir gets config.json, metrics.jsonl,
TensorBoard summaries and Orbax checkpoints; a second run on the same workdir resumes.
"""

from __future__ import annotations

import dataclasses
import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath

from mmr_jax import checkpoint as ckpt_lib
from mmr_jax import fileio
from mmr_jax import objectives
from mmr_jax import optimizer as optim_lib
from mmr_jax import profiling
from mmr_jax import sharding as shd
from mmr_jax.models import MODELS

log = logging.getLogger("mmr_jax.train")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  nonfinite: jax.Array  # count of steps whose loss or gradients were NaN/Inf (their update was dropped)


class NonFiniteLossError(RuntimeError):
  pass


class DataDirMismatchError(ValueError):
  """Raised when a workdir is used with a DATA_DIR other than the one it was trained on."""


DATA_FINGERPRINT_FILE = "data_fingerprint.json"


# --------------------------------------------------------------------------------------------- setup


def maybe_initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Initialises jax.distributed from flags, MMR_* env vars, or the platform's auto-detection.

  Flags win over env (MMR_COORDINATOR_ADDRESS, MMR_NUM_PROCESSES, MMR_PROCESS_ID). With neither,
  MMR_DISTRIBUTED=auto (set by launch/tpu_pod.py and launch/gke.py), a GKE TPU pod (TPU_WORKER_HOSTNAMES)
  or a SLURM job (SLURM_NTASKS > 1) lets jax find its peers itself. Must run before any other JAX call.
  Returns whether a multi-process job was initialised.
  """
  addr = coordinator_address or os.environ.get("MMR_COORDINATOR_ADDRESS")
  nproc = num_processes or (int(os.environ["MMR_NUM_PROCESSES"]) if "MMR_NUM_PROCESSES" in os.environ else None)
  pid = process_id if process_id is not None else (
      int(os.environ["MMR_PROCESS_ID"]) if "MMR_PROCESS_ID" in os.environ else None)
  # Only affects the CPU client (cross-process collectives on CPU need gloo); harmless on TPU/GPU.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if addr:
    timeout = int(os.environ.get("MMR_INIT_TIMEOUT_S", "300"))
    # A peer that dies is declared dead after this many seconds without a heartbeat; the survivors then
    # abort with a coordination-service error instead of hanging in their next collective.
    heartbeat = int(os.environ.get("MMR_HEARTBEAT_S", "100"))
    jax.distributed.initialize(addr, num_processes=nproc, process_id=pid, initialization_timeout=timeout,
                               heartbeat_timeout_seconds=heartbeat)
    return True
  if (os.environ.get("MMR_DISTRIBUTED") == "auto" or "TPU_WORKER_HOSTNAMES" in os.environ
      or int(os.environ.get("SLURM_NTASKS", "1")) > 1):
    jax.distributed.initialize()
    return True
  return False


def resolve_config(config):
  """Fills run-time values (vocab size from the run's tokenizer); returns a locked copy.

  A configured tokenizer path becomes absolute, so the workdir's config.json names the file that
  evaluation and export must tokenise with.
  """
  from mmr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mmr_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  with config.unlocked():
    tok_cfg = config.data.get("tokenizer")
    if tok_cfg is not None and tok_cfg.get("path"):
      tok_cfg.path = os.path.abspath(os.path.expanduser(tok_cfg.path))
    conventions = pipeline.tokenizer_conventions(config.data)
    if config.model.text.get("pool") == "last" and conventions.eos != "sticky":
      raise ValueError(f"model.text.pool='last' embeds each row's last position, which is padding unless "
                       f"data.tokenizer.eos='sticky' (it is {conventions.eos!r})")
    if config.model.text.vocab_size <= 0:
      try:
        tok = tok_lib.Tokenizer(pipeline.tokenizer_path(config.data.dir, config.data), conventions=conventions)
      except FileNotFoundError as e:
        if tok_cfg is not None and tok_cfg.get("path"):
          raise
        raise FileNotFoundError(
            f"config.data.dir={config.data.dir!r} is not an imported catalogue ({e}). Pass the DATA_DIR that "
            "import_catalog / make_synthetic wrote: --config configs/demo.py:data=DATA_DIR or "
            "--config.data.dir=DATA_DIR") from None
      config.model.text.vocab_size = tok.vocab_size
    config.model.contrastive = config.loss.kind
  config.lock()
  return config


def create_model(config):
  name = config.model.name
  if name not in MODELS:
    raise KeyError(f"unknown model.name {name!r}; known: {sorted(MODELS)}")
  return MODELS[name](config.model)


def _at_path(tree, path: str):
  """Returns the subtree of nested dict `tree` at "a/b" (None when absent)."""
  for key in path.split("/"):
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def initialised_towers(init) -> tuple[str, ...]:
  """Returns the top-level parameter names a run takes from init.workdir / init.vit_npz."""
  names = tuple(dict.fromkeys(n.split("/")[0] for n in init.load)) if init.workdir else ()
  return names + (("image_tower",) if init.vit_npz and "image_tower" not in names else ())


def _host_batch_size(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise ValueError(f"data.batch_size={global_batch} does not divide by {jax.process_count()} hosts")
  return global_batch // jax.process_count()


class Trainer:
  """Builds the sharded state and the compiled step for one config; runs the loop."""

  def __init__(self, config, workdir: str, mesh=None):
    self.config = config
    self.workdir = epath.Path(workdir)
    self.mesh = mesh if mesh is not None else shd.make_mesh(config.mesh.shape)
    self.rules = shd.logical_rules(config.mesh.rules)
    self.model = create_model(config)
    self.objective = objectives.get(config.stage)
    if config.data.batch_size % shd.data_parallel_size(self.mesh):
      raise ValueError(f"data.batch_size={config.data.batch_size} does not divide by the "
                       f"{shd.data_parallel_size(self.mesh)} data-parallel devices of mesh {dict(self.mesh.shape)}")
    accum = config.optim.grad_accum
    if config.data.batch_size % accum:
      raise ValueError(f"data.batch_size={config.data.batch_size} does not divide by optim.grad_accum={accum}")

    example = self.objective.example_batch(config, config.data.batch_size)
    init_batch = objectives.init_batch(config)
    rng = jax.random.PRNGKey(config.seed)
    with self._context():
      boxed = jax.eval_shape(lambda r: self.model.init(r, init_batch, train=False)["params"], rng)
    self.param_shardings = shd.logical_to_shardings(boxed, self.mesh, self.rules)
    abstract_params = nn.meta.unbox(boxed)
    self.tx, self.schedule = optim_lib.make_optimizer(config.optim, config.train.steps, abstract_params,
                                                      initialised_towers(config.init))
    # Optimizer-state shardings follow the parameters' by path (mu/nu of each param, also inside
    # multi_transform's masked states); XLA's propagation through tx.init would replicate them.
    rep = shd.replicated(self.mesh)
    opt_shardings = shd.param_like_shardings(jax.eval_shape(self.tx.init, abstract_params), abstract_params,
                                             self.param_shardings, rep)
    self.state_shardings = TrainState(step=rep, params=self.param_shardings, opt_state=opt_shardings, nonfinite=rep)
    self.batch_shardings = {k: shd.batch_sharding(self.mesh, np.ndim(v)) for k, v in example.items()}

    def init_fn(r):
      params = nn.meta.unbox(self.model.init(r, init_batch, train=False)["params"])
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                        nonfinite=jnp.zeros((), jnp.int32))

    with self._context():
      self._init = jax.jit(init_fn, out_shardings=self.state_shardings)
      self.abstract_state = jax.eval_shape(init_fn, rng)
    self.abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), self.abstract_state, self.state_shardings)
    self._step = jax.jit(self._train_step, in_shardings=(self.state_shardings, self.batch_shardings),
                         out_shardings=(self.state_shardings, rep), donate_argnums=(0,))
    self._eval = jax.jit(self._eval_step, in_shardings=(self.param_shardings, self.batch_shardings),
                         out_shardings=rep)
    self._example = example
    self._compiled = None
    self._embedder = None

  def _context(self):
    return _Context(self.mesh, self.rules)

  # ------------------------------------------------------------------------------------------ steps

  def _loss(self, params, batch, rng, train):
    return self.objective.loss(self.model, params, batch, self.config, train=train, rng=rng)

  def _train_step(self, state: TrainState, batch):
    cfg = self.config
    rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), state.step)
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    accum = cfg.optim.grad_accum
    if accum == 1:
      (loss, metrics), grads = grad_fn(state.params, batch, rng, True)
    else:
      micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

      def body(carry, xs):
        i, mb = xs
        (l, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i), True)
        acc_g, acc_l, acc_m = carry
        return (jax.tree.map(jnp.add, acc_g, g), acc_l + l, jax.tree.map(jnp.add, acc_m, m)), None

      zeros_g = jax.tree.map(jnp.zeros_like, state.params)
      first = jax.tree.map(lambda x: x[0], micro)
      _, m_shape = jax.eval_shape(lambda: self._loss(state.params, first, rng, True))
      zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
      (grads, loss, metrics), _ = jax.lax.scan(body, (zeros_g, 0.0, zeros_m), (jnp.arange(accum), micro))
      grads = jax.tree.map(lambda g: g / accum, grads)
      loss = loss / accum
      metrics = jax.tree.map(lambda m: m / accum, metrics)

    grad_norm = optax.global_norm(grads)
    # NaN/Inf anywhere in the gradients makes their global norm non-finite: one scalar check.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    def apply(operands):
      params, opt_state, g = operands
      updates, new_opt = self.tx.update(g, opt_state, params)
      return optax.apply_updates(params, updates), new_opt

    # A non-finite step leaves params and optimizer state untouched; the host decides to stop or go on.
    # (lax.cond rather than a per-leaf select: the select over every leaf made XLA's CPU compile 4x slower.)
    new_params, new_opt = jax.lax.cond(finite, apply, lambda ops: (ops[0], ops[1]),
                                       (state.params, state.opt_state, grads))
    new_state = TrainState(step=state.step + 1, params=new_params, opt_state=new_opt,
                           nonfinite=state.nonfinite + (~finite).astype(jnp.int32))
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=self.schedule(state.step),
                   finite=finite.astype(jnp.float32))
    return new_state, metrics

  def _eval_step(self, params, batch):
    _, metrics = self._loss(params, batch, jax.random.PRNGKey(0), False)
    return metrics

  # ------------------------------------------------------------------------------------------ state

  def init_state(self) -> TrainState:
    with self._context():
      state = self._init(jax.random.PRNGKey(self.config.seed))
    return self._load_init_weights(state)

  def _load_init_weights(self, state: TrainState) -> TrainState:
    """Overwrites parameters from a big_vision two-tower .npz, a stage-1 workdir and/or a ViT .npz."""
    cfg = self.config.init
    params = jax.device_get(state.params)
    changed = False
    if cfg.get("two_tower_npz"):
      from mmr_jax.models import pretrained  # pylint: disable=g-import-not-at-top
      params, report = pretrained.load_two_tower_npz_into(params, os.path.expanduser(cfg.two_tower_npz))
      log.info("initialised %d arrays from %s; identity heads %s; %d arrays kept at init: %s",
               len(report["loaded"]), cfg.two_tower_npz, report["identity"], len(report["kept_init"]),
               sorted({"/".join(k.split("/")[:2]) for k in report["kept_init"]}))
      changed = True
    if cfg.workdir:
      from mmr_jax.models import pretrained  # pylint: disable=g-import-not-at-top
      src, step = ckpt_lib.restore_params(cfg.workdir)
      loaded = []
      for name in cfg.load:
        sub, mine = _at_path(src, name), _at_path(params, name)
        if mine is None:  # e.g. `lexical` with model.lexical_dim=0 here
          log.warning("init.load names %r, which this model does not have: not loaded", name)
          continue
        if sub is None:
          raise KeyError(f"init.load names {name!r} but {cfg.workdir} has only {sorted(src)}")
        params = pretrained.merge_subtree(params, sub, name)
        loaded.append(name)
      log.info("initialised %s from %s (step %d)", loaded, cfg.workdir, step)
      changed = True
    if cfg.vit_npz:
      from mmr_jax.models import pretrained  # pylint: disable=g-import-not-at-top
      params = pretrained.load_vit_npz_into(params, cfg.vit_npz, prefix="image_tower")
      log.info("initialised image_tower from %s", cfg.vit_npz)
      changed = True
    if not changed:
      return state
    params = jax.device_put(params, self.param_shardings)
    with self._context():
      opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings.opt_state)(params)
    return state.replace(params=params, opt_state=opt_state)

  def memory_analysis(self) -> dict:
    """Returns the compiled step's memory figures (bytes), logged before the loop."""
    compiled = self.compiled_step()
    mem = compiled.memory_analysis()
    out = {}
    for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes", "alias_size_in_bytes"):
      if mem is not None and hasattr(mem, k):
        out[k] = int(getattr(mem, k))
    cost = compiled.cost_analysis()
    if isinstance(cost, list):
      cost = cost[0] if cost else {}
    if cost and "flops" in cost:
      out["xla_flops_per_step"] = float(cost["flops"])
    return out

  def compiled_step(self):
    """Returns the step compiled once for the example batch's shapes (memory analysis and the loop share it)."""
    if self._compiled is None:
      batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype, sharding=self.batch_shardings[k])
               for k, v in self._example.items()}
      with self._context():
        self._compiled = self._step.lower(self.abstract_state, batch).compile()
    return self._compiled

  def step(self, state, host_batch):
    batch = shd.host_batch_to_global(host_batch, self.mesh)
    return self.compiled_step()(state, batch)

  def validation_metric_names(self) -> set[str]:
    """Returns the val/ metric names `evaluate` logs (from the objective's metrics, without running it)."""
    batch = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in self._example.items()}
    params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), self.abstract_state.params)
    with self._context():
      out = jax.eval_shape(self._eval_step, params, batch)
    return {f"val/{k}" for k in out}

  def retrieval(self, params, split: str) -> dict:
    """Returns val/ retrieval metrics (Recall@K, NDCG@10, MRR) of `split`'s queries over the whole catalogue."""
    from mmr_jax import evaluate as eval_lib  # pylint: disable=g-import-not-at-top
    from mmr_jax import inference  # pylint: disable=g-import-not-at-top
    if self._embedder is None:  # one embedder: its jitted functions compile once per run
      self._embedder = inference.TrainedModel(self.config, self.model, params, 0, self.mesh)
    self._embedder.params = params
    dp = shd.data_parallel_size(self.mesh)
    with self._context():
      m = eval_lib.retrieval_metrics(self._embedder.embed_queries, self._embedder.embed_products,
                                     self.config.data.dir, self.config.data, split, max(dp, 256 // dp * dp))
    return {f"val/{k}": v for k, v in m.items()}

  def evaluate(self, params, batches) -> dict:
    """Returns the mean of the objective's metrics over `batches` (host numpy dicts), prefixed val/."""
    sums, n = {}, 0
    for host_batch in batches:
      batch = shd.host_batch_to_global(host_batch, self.mesh)
      with self._context():
        m = jax.device_get(self._eval(params, batch))
      for k, v in m.items():
        sums[k] = sums.get(k, 0.0) + float(v)
      n += 1
    return {f"val/{k}": v / max(n, 1) for k, v in sums.items()}


class _Context:
  """Enters the mesh and the logical-axis rules together (both are needed while tracing)."""

  def __init__(self, mesh, rules):
    self.mesh, self.rules = mesh, rules
    self._rules_cm = None

  def __enter__(self):
    self._mesh_cm = jax.set_mesh(self.mesh)
    self._mesh_cm.__enter__()
    self._rules_cm = nn.logical_axis_rules(self.rules)
    self._rules_cm.__enter__()
    return self

  def __exit__(self, *exc):
    self._rules_cm.__exit__(*exc)
    self._mesh_cm.__exit__(*exc)


# ------------------------------------------------------------------------------------------- loop


class _MetricWriter:
  """metrics.jsonl (one JSON object per line) + TensorBoard, written by process 0 only."""

  def __init__(self, workdir: epath.Path):
    self.enabled = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    self._tb = None
    if self.enabled:
      try:
        from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top
        self._tb = tensorboard.SummaryWriter(str(workdir / "tb"))
      except Exception as e:  # TensorBoard is a convenience; metrics.jsonl is the record.
        log.warning("TensorBoard summaries disabled: %s", e)

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in metrics.items():
        self._tb.scalar(k, float(v), step)
      self._tb.flush()

  def truncate_after(self, step: int):
    """Drops rows past `step` (left by a run that died after its last checkpoint) so resumed logs stay one history."""
    if not self.enabled or not self.path.exists():
      return
    rows = []
    for line in self.path.read_text().splitlines():
      try:
        row_step = json.loads(line)["step"]
      except (ValueError, KeyError, TypeError):  # e.g. a line torn by a crash mid-write: not history
        continue
      if row_step <= step:
        rows.append(line)
    fileio.write_text(self.path, "".join(r + "\n" for r in rows))

  def close(self):
    if self._tb is not None:
      self._tb.close()


class _Preemption:
  """Turns SIGTERM (TPU preemption, SLURM time limit) into a flag the loop checks between steps.

  Single process only. With several processes a flag of one's own would stop that host alone while the
  others wait in the next step's collectives; there jax.distributed's preemption service catches SIGTERM
  (on any one host) and `Checkpointer.reached_preemption(step)` turns true on every host at the same step.
  """

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    if jax.process_count() > 1:
      return self
    def handler(signum, frame):
      del frame
      log.warning("received signal %d: will checkpoint and exit after this step", signum)
      self.requested = True
    try:
      self._old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a test harness thread)
      self._old = None
    return self

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


# Allowed values of train options that are strings: a typo ("Stop") would otherwise act as another value.
TRAIN_CHOICES = {"nan_policy": ("stop", "skip"), "best_mode": ("auto", "min", "max")}


def check_train_options(tcfg) -> None:
  """Raises ValueError naming `train.<key>` and its allowed values when a choice option has another value."""
  for key, allowed in TRAIN_CHOICES.items():
    value = tcfg[key]
    if value not in allowed:
      raise ValueError(f"train.{key}={value!r} is not one of {', '.join(allowed)}: set --config.train.{key}="
                       f"{allowed[0]} (or {', '.join(allowed[1:])})")


def check_data_dir(workdir, data_dir: str) -> None:
  """Raises DataDirMismatchError when `data_dir` differs from the DATA_DIR `workdir` recorded at training.

  A re-import (import_catalog --overwrite) keeps the path and often the vocabulary size, but changes the
  tokenizer's pieces and the product order the checkpoint and its data-iterator position refer to.
  """
  from mmr_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / DATA_FINGERPRINT_FILE
  if not path.exists():  # a workdir trained before fingerprints were recorded: nothing to compare
    return
  recorded = json.loads(path.read_text())
  now = tfds_builder.data_fingerprint(data_dir)
  changed = [k for k in now if recorded.get(k) != now[k]]
  if changed:
    short = lambda v: v[:12] if isinstance(v, str) else v  # noqa: E731
    diffs = ", ".join(f"{k} {short(recorded.get(k))} -> {short(now[k])}" for k in changed)
    raise DataDirMismatchError(
        f"{data_dir} is not the DATA_DIR {workdir} was trained on ({recorded.get('data_dir')}): {diffs} (trained "
        f"-> now). Use the catalogue it was trained on (re-import the same source with the same options), or "
        f"train a new workdir on this one; to accept this DATA_DIR anyway, delete {path}.")


def _record_data_dir(workdir, data_dir: str) -> None:
  from mmr_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  ckpt_lib.write_json(epath.Path(workdir) / DATA_FINGERPRINT_FILE,
                      dict(tfds_builder.data_fingerprint(data_dir), data_dir=str(ckpt_lib.absolute(data_dir))))


RETRIEVAL_METRICS = ("val/recall@10", "val/recall@50", "val/recall@100", "val/ndcg@10", "val/mrr")


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


def _report_truncation(config, workdir) -> None:
  """Logs (a warning when any is cut) and writes product_truncation.json: how data.product_len cuts product text."""
  from mmr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
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


def _validation_plan(config) -> tuple[int, str | None]:
  """Returns (eval_every, retrieval split or None): 0 when the catalogue has nothing to validate on."""
  from mmr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from mmr_jax.data import tfds_builder  # pylint: disable=g-import-not-at-top
  eval_every = config.train.eval_every
  if not eval_every:
    return 0, None
  try:
    pipeline.make_train_iterator(config.data.dir, config.stage, config.data, seed=0, split="validation")
  except ValueError as e:  # e.g. a catalogue without validation queries or held-out products
    log.warning("validation disabled: %s", e)
    return 0, None
  queries = tfds_builder.catalog_info(config.data.dir).get("num_queries", {}).get("validation", 0)
  retrieval = config.stage == 2 and config.train.eval_retrieval and queries > 0
  return eval_every, ("validation" if retrieval else None)


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
    check_data_dir(workdir, config.data.dir)
  _check_init_sources(config.init, workdir)
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:  # one lock per job: its processes write one workdir together
      stack.enter_context(fileio.WorkdirLock(workdir, "train"))  # creates the workdir (none left if refused)
    else:
      workdir.mkdir(parents=True, exist_ok=True)
    return _train(config, workdir, mesh, hooks)


def _train(config, workdir: epath.Path, mesh, hooks) -> dict:
  from mmr_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  tcfg = config.train
  trainer = Trainer(config, str(workdir), mesh=mesh)
  log.info("mesh %s; %d params", dict(trainer.mesh.shape),
           sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state.params)))
  mem = trainer.memory_analysis()
  log.info("compiled step memory: %s", mem)
  if jax.process_index() == 0:
    ckpt_lib.write_json(workdir / "compiled_memory.json", mem)

  train_iter = pipeline.make_train_iterator(config.data.dir, config.stage, config.data, seed=config.seed,
                                            split="train")
  eval_every, retrieval_split = _validation_plan(config)
  keep_best, best_metric, best_mode = tcfg.keep_best, tcfg.best_metric, tcfg.best_mode
  if keep_best and eval_every:
    logged = trainer.validation_metric_names() | (set(RETRIEVAL_METRICS) if retrieval_split else set())
    best_metric, best_mode = resolve_best_metric(tcfg, logged)
    log.info("keeping the best %d checkpoint(s) by %s (%s)", keep_best, best_metric, best_mode)
  elif keep_best:
    log.warning("train.keep_best=%d needs validation, which this run does not have: keeping the latest "
                "checkpoints only", keep_best)
    keep_best = 0
  ckpt = ckpt_lib.Checkpointer(str(workdir), keep=tcfg.keep, keep_best=keep_best,
                               best_metric=best_metric, best_mode=best_mode,
                               async_save=tcfg.async_checkpoint)
  writer = _MetricWriter(workdir)
  latest = ckpt.latest_step()
  saved_hosts = ckpt.data_process_count(latest) if latest is not None else None
  if latest is not None and saved_hosts not in (None, jax.process_count()):
    # grain saves one iterator state per process; with another process count there is none for some
    # processes, so the position is derived from the step instead (the same global stream, up to rounding).
    state, _ = ckpt.restore(latest, trainer.abstract_state)
    position = latest * config.data.batch_size // jax.process_count()
    moved = pipeline.move_train_iterator(train_iter, position)
    log.warning("resumed from step %d, written by %d process(es), on %d: model and optimizer state restored; "
                "the data iterator %s", latest, saved_hosts, jax.process_count(),
                f"restarts at example {position} of each process's slice (step x data.batch_size / processes: "
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
  # Written only once the state exists: a run refused for a mismatching checkpoint leaves the workdir as it was.
  if jax.process_index() == 0:
    ckpt_lib.write_json(workdir / "config.json", config.to_dict())
    _record_data_dir(workdir, config.data.dir)

  def val_batches():
    it = pipeline.make_train_iterator(config.data.dir, config.stage, config.data, seed=config.seed + 1,
                                      split="validation", augment=False)
    for _ in range(tcfg.eval_batches):
      yield next(it)

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
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    pbar = tqdm(total=tcfg.steps, initial=start, desc=f"stage {config.stage} {config.model.variant}",
                unit="step", dynamic_ncols=True, file=sys.stderr,
                mininterval=0.5 if sys.stderr.isatty() else 15.0)
  t0, steps_timed = time.time(), 0
  # One trace folder per process: processes on one machine would otherwise write the same file name.
  profiler = profiling.StepProfiler(workdir / "profile" / f"process_{jax.process_index()}",
                                    tcfg.profile_from, tcfg.profile_steps)
  with _Preemption() as preempt:
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
        val = trainer.evaluate(state.params, val_batches())
        if retrieval_split:
          val.update(trainer.retrieval(state.params, retrieval_split))
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


def setup_logging(level=logging.INFO):
  """Our INFO logs on stderr; library chatter (Orbax, TFDS, absl) only from WARNING up."""
  logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  for name in ("absl", "orbax", "tensorflow", "jax", "bm25s"):
    logging.getLogger(name).setLevel(logging.WARNING)
  try:
    from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
    absl_logging.set_verbosity(absl_logging.WARNING)
  except ImportError:
    pass


def enable_compilation_cache(path: str | None = None) -> None:
  """Persists compiled executables across runs (ablation rows and resumed runs share compiles)."""
  path = path or os.environ.get("MMR_COMPILATION_CACHE", os.path.expanduser("~/.cache/mmr_jax/xla"))
  if not path or path == "none":
    return
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv=None):
  from absl import app, flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

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
    setup_logging()
    enable_compilation_cache()
    maybe_initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    metrics = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if jax.process_index() == 0:
      print(json.dumps({k: round(v, 5) for k, v in metrics.items()}))
    if FLAGS.evaluate and metrics["step"] >= FLAGS.config.train.steps:
      from mmr_jax import evaluate  # pylint: disable=g-import-not-at-top
      results = evaluate.evaluate_workdir(FLAGS.workdir)
      if jax.process_index() == 0:
        print(evaluate.markdown_report(results))

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
