"""Orbax checkpointing of the train state together with the input pipeline's position.

One `CheckpointManager` per workdir (`WORKDIR/checkpoints/<step>/{state,data}`): async saves, the
latest `keep` checkpoints plus the `keep_best` best by a validation metric, auto-resume from the
latest step. The data iterator's state is saved in the same step directory, so a resumed run neither
repeats nor skips examples. The state is restored onto whatever shardings the caller's abstract state
carries, so a checkpoint written on 8 devices restores onto 4 (elastic resume).

A workdir also records the fingerprint of the DATA_DIR it was trained on (`record_data_dir`): a checkpoint's
product indexes and tokenizer ids mean nothing with another catalogue, so every reader checks it first.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from mmr_jax.data import tfds_builder
from mmr_jax import fileio

try:  # grain registers its orbax handler on import.
  import grain.checkpoint as grain_ckpt
except ImportError:  # pragma: no cover - grain is a hard dependency; kept for clarity of the error.
  grain_ckpt = None


def absolute(path) -> epath.Path:
  """Returns `path` as an absolute epath.Path (Orbax needs absolute local paths; URLs such as gs:// pass through)."""
  path = str(path)
  return epath.Path(path if "://" in path else os.path.abspath(os.path.expanduser(path)))


log = logging.getLogger("mmr_jax.checkpoint")

class DataDirMismatchError(ValueError):
  """Raised when a workdir is used with a DATA_DIR other than the one it was trained on."""


DATA_FINGERPRINT_FILE = "data_fingerprint.json"


class CheckpointShapeError(ValueError):
  """Raised when a checkpoint's arrays do not match the shapes the config asks for."""


class CheckpointRestoreError(RuntimeError):
  """Raised when a checkpoint's files cannot be read (damaged after it was written)."""


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def shape_mismatches(expected, found) -> list[str]:
  """Returns 'name: checkpoint shape vs config shape' for each leaf that differs or is missing."""
  exp = {_path_str(p): tuple(getattr(x, "shape", ())) for p, x in jax.tree_util.tree_leaves_with_path(expected)}
  got = {_path_str(p): tuple(getattr(x, "shape", ())) for p, x in jax.tree_util.tree_leaves_with_path(found)}
  out = []
  for name in sorted(set(exp) | set(got)):
    if name not in got:
      out.append(f"{name}: missing in checkpoint (config wants {exp[name]})")
    elif name not in exp:
      out.append(f"{name}: in checkpoint {got[name]} but not in the config's model")
    elif exp[name] != got[name]:
      out.append(f"{name}: checkpoint {got[name]} vs config {exp[name]}")
  return out


class Checkpointer:
  """Saves and restores {state, data-iterator} pairs in `workdir/checkpoints`."""

  def __init__(self, workdir: str, *, keep: int = 2, keep_best: int = 0, best_metric: str = "val/loss",
               best_mode: str = "min", async_save: bool = True, save_every: int = 1):
    self.directory = absolute(workdir) / "checkpoints"
    self.best_metric = best_metric
    policies = [ocm.LatestN(n=keep)]
    if keep_best:
      policies.append(ocm.BestN(get_metric_fn=lambda m: m[best_metric], reverse=(best_mode == "min"),
                                n=keep_best, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=save_every,
        preservation_policy=ocm.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        create=True,
    )
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain_ckpt.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_iter=None, metrics: dict | None = None, force: bool = False) -> bool:
    """Starts a (possibly async) save; returns whether a checkpoint is being written for `step`."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain_ckpt.CheckpointSave(data_iter)
    if metrics is not None:
      metrics = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
      if self.best_metric not in metrics:
        metrics = None  # BestN only ranks checkpoints that carry the metric.
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def data_process_count(self, step: int) -> int | None:
    """Returns how many processes wrote `step`'s data-iterator state (None: the step has none)."""
    names = [p.stem for p in (self.directory / str(step) / "data").glob("process_*-of-*.json")]
    counts = {int(n.rsplit("-of-", 1)[1]) for n in names if n.rsplit("-of-", 1)[1].isdigit()}
    return max(counts) if counts else None

  def check_shapes(self, step: int, abstract_state) -> None:
    """Raises CheckpointShapeError naming every parameter whose saved shape differs from the config's."""
    meta = self.manager.item_metadata(step)
    saved = meta["state"] if meta is not None and "state" in meta else None
    if saved is None:
      return
    saved_tree = getattr(saved, "tree", saved)
    expected = jax.tree.map(lambda x: x, abstract_state)
    expected = jax.tree_util.tree_map(lambda x: x, _as_dict(expected))
    bad = shape_mismatches(expected, saved_tree)
    if bad:
      raise CheckpointShapeError(
          f"checkpoint {self.directory / str(step)} does not match the config:\n  " + "\n  ".join(bad[:50]))

  def restore(self, step: int, abstract_state, data_iter=None):
    """Returns (state, data_iter) restored from `step` onto `abstract_state`'s shardings."""
    self.check_shapes(step, abstract_state)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain_ckpt.CheckpointRestore(data_iter)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    except CheckpointShapeError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # Orbax writes a step into a temporary folder and renames it when complete, so a step that fails to
      # read was damaged afterwards (disk, a partial copy); say which one and how to go on without it.
      older = [s for s in self.manager.all_steps() if s < step]
      hint = (f"resume from step {max(older)}" if older else "start again from step 0")
      raise CheckpointRestoreError(
          f"checkpoint {self.directory / str(step)} could not be read ({type(e).__name__}: {str(e)[:300]}). "
          f"If the storage is reachable and this persists, the step is damaged: move it away to {hint}") from e
    return restored["state"], restored.get("data", data_iter) if data_iter is not None else None

  def wait(self):
    self.manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def _as_dict(tree):
  """Returns the state as nested dicts, the form Orbax metadata uses for dataclass pytrees."""
  if hasattr(tree, "__dataclass_fields__"):
    return {k: _as_dict(getattr(tree, k)) for k in tree.__dataclass_fields__}
  if isinstance(tree, dict):
    return {k: _as_dict(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
    return type(tree)(_as_dict(v) for v in tree)
  return tree


def has_checkpoint(workdir) -> bool:
  """Returns whether `workdir` holds a finished checkpoint (checkpoints/<step>/; Orbax's unfinished ones
  are named <step>.orbax-checkpoint-tmp-...)."""
  ckpts = absolute(workdir) / "checkpoints"
  return ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir())


def restore_params(workdir: str, step: int | None = None) -> tuple[dict, int]:
  """Returns (params as host numpy arrays, step) from another run's latest (or given) checkpoint.

  Used to initialise stage 2 from a stage-1 workdir: only the parameters are read, whatever the
  optimizer or mesh of that run was.
  """
  directory = absolute(workdir) / "checkpoints"
  if not directory.exists():
    raise FileNotFoundError(f"no checkpoints under {directory} (init.workdir={workdir!r})")
  handlers = {"state": ocp.PyTreeCheckpointHandler()}
  if grain_ckpt is not None:  # known, though not read: else Orbax warns on every restore that it cannot
    handlers["data"] = grain_ckpt.CheckpointHandler()
  mngr = ocp.CheckpointManager(directory, item_handlers=handlers,
                               options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"no finished checkpoint in {directory}")
  meta = mngr.item_metadata(step)["state"]
  meta_tree = getattr(meta, "tree", meta)
  params_meta = meta_tree["params"]
  cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=cpu), params_meta)
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item={"params": target},
          restore_args={"params": jax.tree.map(lambda t: ocp.ArrayRestoreArgs(sharding=cpu), target)},
          partial_restore=True)))
  mngr.close()
  params = jax.tree.map(np.asarray, restored["state"]["params"])
  log.info("restored params of step %d from %s", step, directory)
  return params, step


def write_json(path, obj) -> None:
  """Writes JSON atomically, locally or on gs:// (fileio.write_json), so a crash never leaves a half file."""
  fileio.write_json(path, obj)


def check_data_dir(workdir, data_dir: str) -> None:
  """Raises DataDirMismatchError when `data_dir` differs from the DATA_DIR `workdir` recorded at training.

  A re-import (import_catalog --overwrite) keeps the path and often the vocabulary size, but changes the
  tokenizer's pieces and the product order the checkpoint and its data-iterator position refer to.
  """
  path = epath.Path(workdir) / DATA_FINGERPRINT_FILE
  if not path.exists():  # a workdir that recorded none: nothing to compare
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


def record_data_dir(workdir, data_dir: str) -> None:
  """Writes the fingerprint of `data_dir` that `check_data_dir` compares later runs against."""
  write_json(epath.Path(workdir) / DATA_FINGERPRINT_FILE,
             dict(tfds_builder.data_fingerprint(data_dir), data_dir=str(absolute(data_dir))))
