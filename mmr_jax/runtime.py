"""Process-level plumbing every command shares: logging, the compilation cache, multi-host start-up, and
the trainer's metric log and preemption flag.

Drivers (train, evaluate, ablation, export) call these at start; library modules never do, so importing a
library module changes no global state.
"""

from __future__ import annotations

import json
import logging
import os
import signal

from absl import logging as absl_logging
import jax
from etils import epath

from mmr_jax import fileio

log = logging.getLogger("mmr_jax.runtime")


def setup_logging(level=logging.INFO):
  """Our INFO logs on stderr; library chatter (Orbax, TFDS, absl) only from WARNING up."""
  logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
  for name in ("absl", "orbax", "tensorflow", "jax", "bm25s"):
    logging.getLogger(name).setLevel(logging.WARNING)
  absl_logging.set_verbosity(absl_logging.WARNING)


def enable_compilation_cache(path: str | None = None) -> None:
  """Persists compiled executables across runs (ablation rows and resumed runs share compiles)."""
  path = path or os.environ.get("MMR_COMPILATION_CACHE", os.path.expanduser("~/.cache/mmr_jax/xla"))
  if not path or path == "none":
    return
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


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


class MetricWriter:
  """metrics.jsonl (one JSON object per line) + TensorBoard, written by process 0 only."""

  def __init__(self, workdir: epath.Path):
    self.enabled = jax.process_index() == 0
    self.path = workdir / "metrics.jsonl"
    self._tb = None
    if self.enabled:
      try:
        from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
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


class Preemption:
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


