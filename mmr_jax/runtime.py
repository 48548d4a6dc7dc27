"""Process-level plumbing every command shares: logging, the compilation cache, multi-host start-up, and
the trainer's metric log and preemption flag.

Drivers (train, evaluate, ablation, export) call these at start; library modules never do, so importing a
library module changes no global state. Library code wraps `native_logs()` around calls into C++ libraries
that log on their own (ScaNN's index builder); it does nothing unless a command attached a log file.
(The package's `__init__` sets one environment default, TF_CPP_MIN_LOG_LEVEL: TensorFlow reads it once, when
it loads, before any command could.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys

from absl import logging as absl_logging
import jax
from jax.experimental import multihost_utils
from etils import epath

from mmr_jax import fileio

log = logging.getLogger("mmr_jax.runtime")


LIBRARIES = ("absl", "orbax", "tensorflow", "jax", "bm25s", "grain", "tensorflow_datasets")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Where C++ libraries' own logs go inside `native_logs()` (ScaNN's builder logs through absl's C++ logging,
# which nothing in Python configures): None leaves them on stderr.
_native_log_path: str | None = None
_verbosity = 1
_handlers: list[logging.Handler] = []  # the root handlers setup_logging / attach_log_file installed


class _ConsoleFilter(logging.Filter):
  """What the terminal shows at a verbosity: warnings of ours (each text once), plus INFO of the command's
  headline loggers (verbosity 0); INFO of all of ours (1); everything, libraries' INFO and DEBUG included (2)."""

  def __init__(self, verbosity: int, headline: tuple[str, ...]):
    super().__init__()
    self.verbosity, self.headline = verbosity, headline
    self._warned: set[tuple[str, str]] = set()

  def filter(self, record: logging.LogRecord) -> bool:
    if self.verbosity >= 2:
      return True
    if not (record.name == "mmr_jax" or record.name.startswith("mmr_jax.")):
      # Library chatter (Orbax's notes on read-only restores, absl): errors only; warnings from verbosity 1.
      return record.levelno >= (logging.WARNING if self.verbosity >= 1 else logging.ERROR)
    if record.levelno == logging.WARNING and self.verbosity == 0:
      # A warning each run of a multi-run command repeats (the ablation's rows share data and settings)
      # is shown once; the log file keeps every one.
      key = (record.name, record.getMessage())
      if key in self._warned:
        return False
      self._warned.add(key)
      return True
    if record.levelno != logging.INFO:
      return record.levelno > logging.INFO
    return self.verbosity >= 1 or any(record.name == h or record.name.startswith(h + ".") for h in self.headline)


def setup_logging(verbosity: int = 1, headline: tuple[str, ...] = (), log_file: str | None = None) -> None:
  """Configures logging for a command (replacing what an earlier call configured).

  verbosity: 0 shows progress bars, warnings and the INFO lines of the `headline` loggers (a command's one
    line per stage or row); 1 adds every INFO line of ours and the libraries' warnings; 2 shows everything,
    C++ libraries' own logs (ScaNN's builder) included.
  log_file: see `attach_log_file`.
  """
  global _verbosity
  reset_logging()
  root = logging.getLogger()
  for h in list(root.handlers):
    # A console handler someone else put there (absl logging before it is initialised calls basicConfig, e.g.
    # while Orbax is imported) would print every line twice; other handlers (files, a test's capture) stay.
    if type(h) is logging.StreamHandler and h.stream in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__):
      root.removeHandler(h)
  root.setLevel(logging.DEBUG if verbosity >= 2 else logging.INFO)
  console = logging.StreamHandler()
  console.setFormatter(logging.Formatter(FORMAT))
  console.addFilter(_ConsoleFilter(verbosity, tuple(headline)))
  root.addHandler(console)
  _handlers.append(console)
  for name in LIBRARIES:
    logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
  absl_logging.set_verbosity(absl_logging.DEBUG if verbosity >= 2 else absl_logging.WARNING)
  _verbosity = verbosity
  attach_log_file(log_file)


def reset_logging() -> None:
  """Removes (and closes) the handlers `setup_logging` / `attach_log_file` installed and stops `native_logs`
  redirecting; handlers others installed (a host application's, a test's log capture) stay."""
  global _native_log_path
  root = logging.getLogger()
  while _handlers:
    h = _handlers.pop()
    root.removeHandler(h)
    h.close()
  _native_log_path = None


class _LazyFileHandler(logging.FileHandler):
  """A FileHandler whose folder and file appear with the first record, so a command refused before it
  logs anything (a bad flag, a busy workdir) leaves no log file behind."""

  def __init__(self, path: str):
    super().__init__(path, delay=True)

  def _open(self):
    os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
    return super()._open()


def attach_log_file(path: str | None) -> None:
  """Adds a local log file that gets every INFO line of ours and the libraries' warnings whatever the
  verbosity; below verbosity 2 it also gets what C++ libraries write inside `native_logs()`. None (a gs://
  workdir, see `log_file_for`) adds nothing."""
  global _native_log_path
  if not path:
    return
  handler = _LazyFileHandler(os.path.abspath(path))
  handler.setFormatter(logging.Formatter(FORMAT))
  handler.setLevel(logging.INFO)
  logging.getLogger().addHandler(handler)
  _handlers.append(handler)
  if _verbosity < 2:
    _native_log_path = handler.baseFilename


def log_file_for(workdir, command: str) -> str | None:
  """Returns WORKDIR/logs/<command>.log (`.<process>.log` on processes other than 0), or None for a gs://
  workdir (a log file is appended line by line; buckets take whole objects). Asks jax for the process
  index: in a multi-process job, call it after `maybe_initialize_distributed`."""
  if "://" in str(workdir):
    return None
  index = jax.process_index()
  name = f"{command}.log" if index == 0 else f"{command}.{index}.log"
  return os.path.join(os.path.abspath(os.path.expanduser(str(workdir))), "logs", name)


@contextlib.contextmanager
def native_logs():
  """Sends what C++ code writes to stderr inside the block into the command's log file (below verbosity 2,
  when the command has one); otherwise stderr is left as it is. Python's stderr is flushed on both sides of
  the switch, so no line lands in the wrong place."""
  if _native_log_path is None:
    yield
    return
  os.makedirs(os.path.dirname(_native_log_path), exist_ok=True)
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(_native_log_path, "ab") as target:
      os.dup2(target.fileno(), 2)
      try:
        yield
      finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
  finally:
    os.close(saved)


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


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing to wait for on one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
