"""Pieces every launcher shares: the train command, overrides, config loading, running and printing.

A launcher turns (config, workdir, overrides) into commands. Commands are either argv lists (run
directly) or shell text (run with `bash -c`, e.g. heredocs that pipe a manifest into kubectl); both
print as copy-pasteable shell so `--dry-run` output is exactly what would run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO, Union

from mmr_jax import sweep_runner

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_MODULE = "mmr_jax.train"
EVAL_MODULE = "mmr_jax.evaluate"

Command = Union[Sequence[str], str]  # argv list, or shell text for `bash -c`


class LaunchError(sweep_runner.SweepError):
  """Bad launcher input; the message names the flag or file at fault."""


# ------------------------------------------------------------------------------------ config refs


def split_config_ref(ref: str) -> tuple[str, str | None]:
  """Returns (path, arg) of "configs/x.py:arg" (arg None when there is no ':')."""
  if not ref:
    raise LaunchError("--config is empty; expected e.g. configs/demo.py:stage=1")
  path, sep, arg = ref.partition(":")
  return path, (arg if sep else None)


def repo_relative_config(ref: str, repo_root: Path | None = None, *, shared_fs: bool = False) -> str:
  """Returns the config ref with its path relative to the repo root, for commands run in a copy of the repo.

  Remote machines hold a copy of the repo, so a config outside it would not exist there; with
  `shared_fs` (SLURM: every node mounts this filesystem) such a config keeps its absolute path.
  """
  repo_root = Path(repo_root or REPO_ROOT).resolve()
  path, arg = split_config_ref(ref)
  p = Path(path)
  if p.is_absolute() or p.exists():
    try:
      path = p.resolve().relative_to(repo_root).as_posix()
    except ValueError:
      if not shared_fs:
        raise LaunchError(f"--config {path!r} is outside the repository {repo_root}; remote machines only "
                          "get the repository, so move the config under configs/") from None
      path = str(p.resolve())
  return path if arg is None else f"{path}:{arg}"


def build_config(ref: str, overrides: Mapping[str, Any] = ()):
  """Returns the locked ConfigDict the trainer builds from `ref` and `overrides`, parsed the trainer's way.

  Nothing is read from the config's DATA_DIR (the vocabulary size stays unresolved), so a submitting
  machine that cannot reach the data still catches a mistyped key or value before any job is queued.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  path, _ = split_config_ref(ref)
  if not Path(path).is_file():
    raise LaunchError(f"--config: no such config file {path!r} (from {ref!r})")
  sweep_runner.make_repo_importable()
  given = override_flags(dict(overrides))
  argv = ["mmr_jax.train", f"--config={ref}", *given]
  # A private FlagValues: the same parsing as `python -m mmr_jax.train`, without touching absl's global flags.
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv, lock_config=True, sys_argv=argv)
  try:
    fv(argv)
  except (AttributeError, KeyError) as e:
    # ml_collections' message is a repr: escaped quotes and newlines.
    msg = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
    msg = msg.strip("'\" ")
    part = msg.split()[0].strip("'\"") if msg else ""
    bad = next((g.split("=", 1)[0] for g in given if part in g.split("=", 1)[0][len("--config."):].split(".")), None)
    if bad is None:  # an unknown `configs/x.py:key=value` argument names itself
      raise LaunchError(f"--config {ref!r}: {msg}") from None
    hint = msg[msg.index("Did you mean"):] if "Did you mean" in msg else f"(unknown: {part!r})"
    raise LaunchError(f"{bad} names no config key. {hint}") from None
  except (flags.Error, ValueError, TypeError) as e:
    raise LaunchError(f"--config {ref!r}: {e}") from None
  return fv.config


# -------------------------------------------------------------------------------------- overrides


def format_value(value: Any) -> str:
  """Returns the command-line text ml_collections parses back into `value`."""
  if isinstance(value, str):
    return value
  if isinstance(value, (list, tuple)):
    # config_flags parses tuple fields with ast.literal_eval.
    return repr(tuple(value))
  return repr(value)


def normalise_key(key: str) -> str:
  """Returns an override key without a leading "config." (both spellings are accepted)."""
  if not isinstance(key, str) or not key:
    raise LaunchError(f"override key must be a non-empty string, got {key!r}")
  key = key[len("config."):] if key.startswith("config.") else key
  if not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*", key):
    raise LaunchError(f"override key {key!r} is not a dotted config path like 'optim.lr'")
  return key


def override_flags(overrides: Mapping[str, Any]) -> list[str]:
  """Returns ["--config.k=v", ...] for an override dict (python values or strings)."""
  return [f"--config.{normalise_key(k)}={format_value(v)}" for k, v in overrides.items()]


def parse_override_args(args: Sequence[str]) -> dict[str, str]:
  """Returns {key: value} from "--config.key=value" tokens; other tokens are errors."""
  out = {}
  for a in args:
    m = re.fullmatch(r"--config\.([^=\s]+)=(.*)", a, flags=re.S)
    if not m:
      if a.startswith("--config."):
        raise LaunchError(f"override {a!r} needs the form --config.key=value (one token, with '=')")
      raise LaunchError(f"unrecognized argument {a!r} (config overrides look like --config.key=value)")
    out[normalise_key(m.group(1))] = m.group(2)
  return out


# ---------------------------------------------------------------------------------------- commands


def train_command(config: str, workdir: str, overrides: Mapping[str, Any] = (), *, python: str = sys.executable,
                  module: str = TRAIN_MODULE, extra: Sequence[str] = ()) -> list[str]:
  """Returns the argv of one training run: `python -m mmr_jax.train --config .. --workdir .. --config.k=v`."""
  if not workdir:
    raise LaunchError("--workdir is empty")
  return [python, "-m", module, f"--config={config}", f"--workdir={workdir}",
          *override_flags(dict(overrides)), *extra]


def train_extra(args) -> list[str]:
  """Returns the trainer flags a launcher's parsed args ask for beyond config and workdir."""
  return ["--evaluate"] if getattr(args, "evaluate", False) else []


def eval_command(workdir: str, *, python: str = sys.executable, module: str = EVAL_MODULE,
                 extra: Sequence[str] = ()) -> list[str]:
  """Returns the argv of `python -m mmr_jax.evaluate --workdir DIR [extra]`."""
  return [python, "-m", module, f"--workdir={workdir}", *extra]


def shell_text(cmd: Command) -> str:
  """Returns a command as shell text (argv lists quoted with shlex)."""
  return cmd if isinstance(cmd, str) else shlex.join(cmd)


def parse_env(items: Sequence[str] | None) -> dict[str, str]:
  """Returns {K: V} from repeated --env K=V flags."""
  env = {}
  for item in items or ():
    k, sep, v = item.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*", k):
      raise LaunchError(f"--env {item!r}: expected NAME=VALUE with NAME a shell variable name")
    env[k] = v
  return env


# Environment names whose values are secrets: masked wherever a launcher prints, kept out of written files.
SECRET_NAME = re.compile(r"TOKEN|SECRET|KEY|PASSWORD|PASSWD|CREDENTIAL", re.I)
MASK = "***"


def add_secret_args(parser: argparse.ArgumentParser):
  """Adds --secret_env and --env_file (what every cluster launcher offers for secrets)."""
  parser.add_argument("--secret_env", action="append", default=[], metavar="NAME",
                      help="treat --env NAME as a secret (names matching TOKEN|SECRET|KEY|PASSWORD|CREDENTIAL "
                           "already are): masked in printed commands, never written into a script or manifest")
  parser.add_argument("--env_file", default=None, metavar="PATH",
                      help="NAME=VALUE lines, read at submit time and loaded on the nodes instead of being inlined")


def is_secret(name: str, args=None) -> bool:
  """Returns True when env var `name` holds a secret (by its name, or named with --secret_env)."""
  return bool(SECRET_NAME.search(name)) or name in (getattr(args, "secret_env", None) or ())


def split_secret_env(args) -> tuple[dict[str, str], dict[str, str]]:
  """Returns (plain, secret) from a launcher's --env flags."""
  env = parse_env(getattr(args, "env", None))
  secret = {k: v for k, v in env.items() if is_secret(k, args)}
  return {k: v for k, v in env.items() if k not in secret}, secret


def mask_text(text: str, secrets) -> str:
  """Returns `text` with every secret value (also as shell quoting splits it at single quotes) replaced by ***."""
  for v in sorted((v for v in secrets if v), key=len, reverse=True):
    text = text.replace(v, MASK)
    for part in v.split("'"):
      if len(part) >= 4:
        text = text.replace(part, MASK)
  return text


def read_env_file(path: str) -> dict[str, str]:
  """Returns {NAME: VALUE} of an env file (NAME=VALUE lines; blank lines, # comments and `export ` allowed)."""
  try:
    lines = Path(path).read_text().splitlines()
  except OSError as e:
    raise LaunchError(f"--env_file {path!r}: {e.strerror or e}") from None
  out = {}
  for i, line in enumerate(lines, 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    k, sep, v = line.removeprefix("export ").partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*", k.strip()):
      raise LaunchError(f"--env_file {path}:{i}: expected NAME=VALUE")
    out[k.strip()] = v
  return out


def is_remote_path(path: str) -> bool:
  """Returns True for URLs such as gs://bucket/dir (what every host of a pod can reach)."""
  return "://" in str(path)


def require_bucket(workdir: str, allow_local: bool, flag: str = "--workdir"):
  """Raises unless `workdir` is on a bucket: every host of a pod must read and write the same run."""
  if not is_remote_path(workdir) and not allow_local:
    raise LaunchError(f"{flag} {workdir!r} is a local path, but each host of a multi-host job has its own disk; "
                      "use a bucket (gs://BUCKET/DIR) or pass --allow_local_workdir for a shared filesystem")


def run_commands(cmds: Sequence[Command], *, dry_run: bool, out: TextIO | None = None, env=None,
                 cwd=None, secrets=()) -> int:
  """Returns the first non-zero exit code (0 if all succeed); prints each command (`secrets` masked), runs it
  unless dry_run."""
  out = out or sys.stdout
  for cmd in cmds:
    print(("" if dry_run else "+ ") + mask_text(shell_text(cmd), secrets), file=out, flush=True)
    if dry_run:
      continue
    argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    try:
      rc = subprocess.call(argv, env=env, cwd=cwd)
    except FileNotFoundError as e:
      print(f"[launch] cannot run {argv[0]!r}: {e}", file=sys.stderr)
      return 127
    if rc != 0:
      print(f"[launch] command failed with exit code {rc}: {mask_text(shell_text(cmd), secrets)[:300]}",
            file=sys.stderr)
      return rc
  return 0


def free_port(host: str = "127.0.0.1") -> int:
  """Returns a TCP port that was free on `host` a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((host, 0))
    return s.getsockname()[1]


# --------------------------------------------------------------------------------- parallel runs


def _pump(stream, prefix: str, out: TextIO, lock: threading.Lock):
  for line in iter(stream.readline, ""):
    with lock:
      out.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
      out.flush()
  stream.close()


def _signal_group(proc: subprocess.Popen, sig: int):
  # Each child leads its own process group (start_new_session), so this reaches only what we started.
  try:
    os.killpg(proc.pid, sig)
  except (ProcessLookupError, PermissionError):
    pass


def run_parallel(cmds: Sequence[Sequence[str]], *, names: Sequence[str], envs: Sequence[Mapping[str, str]] | None = None,
                 grace_s: float = 10.0, kill_after_s: float = 5.0, out: TextIO | None = None,
                 tag: str = "launch") -> int:
  """Returns 0 if every command exits 0, else the first failure's exit code (1 if it was a signal).

  Output lines are prefixed with "[name]". Fails fast: once one command exits non-zero the others
  get `grace_s` to finish on their own (a collective they were in may error out by itself), then
  SIGTERM, then SIGKILL after `kill_after_s` — a peer stuck in a collective would otherwise wait
  for the distributed runtime's heartbeat timeout (minutes).
  """
  if len(names) != len(cmds):
    raise LaunchError("run_parallel: one name per command")
  out = out or sys.stdout
  lock = threading.Lock()
  procs, pumps = [], []
  try:
    for i, cmd in enumerate(cmds):
      env = None if envs is None else dict(envs[i])
      p = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           bufsize=1, start_new_session=True)
      procs.append(p)
      t = threading.Thread(target=_pump, args=(p.stdout, f"[{names[i]}]", out, lock), daemon=True)
      t.start()
      pumps.append(t)

    first_fail = None  # (index, rc)
    term_at = kill_at = None
    while True:
      codes = [p.poll() for p in procs]
      if first_fail is None:
        for i, rc in enumerate(codes):
          if rc not in (None, 0):
            first_fail = (i, rc)
            running = [names[j] for j, c in enumerate(codes) if c is None]
            with lock:
              msg = f"[{tag}] {names[i]} exited with code {rc}"
              if running:
                msg += f"; stopping {', '.join(running)} in {grace_s:g}s unless they exit"
              print(msg, file=out, flush=True)
            term_at = time.monotonic() + grace_s
            break
      if all(c is not None for c in codes):
        break
      now = time.monotonic()
      if term_at is not None and now >= term_at and kill_at is None:
        for p in procs:
          if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
        kill_at = now + kill_after_s
      if kill_at is not None and now >= kill_at:
        for p in procs:
          if p.poll() is None:
            _signal_group(p, signal.SIGKILL)
        kill_at = float("inf")
      time.sleep(0.05)
  except KeyboardInterrupt:
    for p in procs:
      if p.poll() is None:
        _signal_group(p, signal.SIGTERM)
    for p in procs:
      try:
        p.wait(timeout=kill_after_s)
      except subprocess.TimeoutExpired:
        _signal_group(p, signal.SIGKILL)
    raise
  for t in pumps:
    t.join(timeout=5)
  codes = [p.returncode for p in procs]
  if first_fail is None:
    return 0
  i, rc = first_fail
  summary = ", ".join(f"{n}={c}" for n, c in zip(names, codes))
  print(f"[{tag}] FAILED: {names[i]} exited first with code {rc} (exit codes: {summary}; "
        f"negative = killed by that signal)", file=out, flush=True)
  return rc if rc > 0 else 1


# ------------------------------------------------------------------------------------- CLI pieces


def add_train_args(parser: argparse.ArgumentParser, *, workdir_help: str = "run directory", dry_run: bool = True,
                   evaluate: bool = True):
  """Adds --config, --workdir, --train_module (and --evaluate, --dry-run unless False) to a launcher's parser."""
  parser.add_argument("--config", required=True, help="config ref, e.g. configs/demo.py:stage=1")
  parser.add_argument("--workdir", required=True, help=workdir_help)
  parser.add_argument("--train_module", default=TRAIN_MODULE, help="python module run with -m (default %(default)s)")
  if evaluate:
    parser.add_argument("--evaluate", action="store_true",
                        help="the job also evaluates after its last step (the trainer's --evaluate: metrics.json)")
  if dry_run:
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="print the exact commands / files and exit without running anything")


def parse_with_overrides(parser: argparse.ArgumentParser, argv: Sequence[str] | None):
  """Returns parsed args with `.overrides` ({key: value}) from the trailing --config.key=value tokens."""
  args, rest = parser.parse_known_args(argv)
  try:
    args.overrides = parse_override_args(rest)
  except LaunchError as e:
    parser.error(str(e))
  return args


def make_parser(description: str | None, **kw) -> argparse.ArgumentParser:
  """Returns an ArgumentParser that shows the module docstring and never abbreviates flags."""
  return argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False, **kw)


def main_guard(fn, argv=None) -> int:
  """Returns fn(argv), turning a LaunchError (or a SweepError) into a one-line message and exit code 2."""
  try:
    return fn(argv)
  except sweep_runner.SweepError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


# ------------------------------------------------------------------------------------ TPU slices


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  """One TPU slice: its size in chips and hosts, its topology, and the names clouds give it."""
  accelerator_type: str  # as gcloud spells it, e.g. "v4-32"
  generation: str  # "v4"
  chips: int
  hosts: int
  chips_per_host: int
  topology: str  # e.g. "2x2x4"
  runtime_version: str  # default TPU VM software version
  gke_accelerator: str | None  # node label cloud.google.com/gke-tpu-accelerator (None: not on GKE)
  gke_machine_type: str | None


# generation -> (accelerator-type count per chip, chips per host of a multi-host slice, largest single-host
#   slice in chips, topology rank, default TPU VM runtime, GKE accelerator label, GKE machine type prefix)
# v2-v5p names count TensorCores (2 per chip); v5e/v6e names count chips.
_TPU_GENERATIONS = {
    "v2": (2, 4, 4, 2, "tpu-ubuntu2204-base", None, None),
    "v3": (2, 4, 4, 2, "tpu-ubuntu2204-base", None, None),
    "v4": (2, 4, 4, 3, "tpu-ubuntu2204-base", "tpu-v4-podslice", "ct4p-hightpu"),
    "v5p": (2, 4, 4, 3, "v2-alpha-tpuv5", "tpu-v5p-slice", "ct5p-hightpu"),
    "v5litepod": (1, 4, 8, 2, "v2-alpha-tpuv5-lite", "tpu-v5-lite-podslice", "ct5lp-hightpu"),
    "v6e": (1, 4, 8, 2, "v2-alpha-tpuv6e", "tpu-v6e-slice", "ct6e-standard"),
}
_TPU_ALIASES = {"v5e": "v5litepod"}


def default_topology(chips: int, rank: int) -> str:
  """Returns the default topology string of a slice (e.g. 16 chips, rank 3 -> "2x2x4")."""
  if chips < 1 or chips & (chips - 1):
    raise LaunchError(f"TPU slices have a power-of-two number of chips, got {chips}")
  dims = [1] * rank
  while _prod(dims) < chips:
    # Doubling the smallest (rightmost) dimension reproduces Google's default shapes
    # (v4: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4; v5e: 1x1, 2x2, 2x4, 4x4, 4x8).
    m = min(dims)
    i = max(j for j, d in enumerate(dims) if d == m)
    dims[i] *= 2
  if dims == [1, 2, 2]:  # the single-host 3D slice is spelled 2x2x1
    dims = [2, 2, 1]
  return "x".join(map(str, dims))


def tpu_slice(accelerator_type: str, topology: str | None = None) -> TpuSlice:
  """Returns the TpuSlice of an accelerator type such as "v4-32", "v5litepod-16" or "v6e-64"."""
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", accelerator_type or "")
  if not m:
    raise LaunchError(f"--accelerator {accelerator_type!r}: expected e.g. v4-32, v5p-64, v5litepod-16, v6e-8")
  gen = _TPU_ALIASES.get(m.group(1), m.group(1))
  if gen not in _TPU_GENERATIONS:
    raise LaunchError(f"--accelerator {accelerator_type!r}: unknown TPU generation {m.group(1)!r} "
                      f"(known: {', '.join(sorted(_TPU_GENERATIONS))})")
  per_chip, chips_per_host, single_host_max, rank, runtime, gke_acc, gke_machine = _TPU_GENERATIONS[gen]
  count = int(m.group(2))
  if count % per_chip:
    raise LaunchError(f"--accelerator {accelerator_type!r}: {gen} sizes count TensorCores ({per_chip} per chip)")
  chips = count // per_chip
  if topology:
    dims = topology.split("x")
    if len(dims) != rank or not all(d.isdigit() and int(d) > 0 for d in dims):
      raise LaunchError(f"--topology {topology!r}: {gen} topologies have {rank} dimensions, e.g. "
                        f"{default_topology(chips, rank)}")
    if _prod(int(d) for d in dims) != chips:
      raise LaunchError(f"--topology {topology!r} has {_prod(int(d) for d in dims)} chips but "
                        f"{accelerator_type} has {chips}")
  else:
    topology = default_topology(chips, rank)
  if chips <= single_host_max:
    hosts, per_host = 1, chips
  else:
    hosts, per_host = chips // chips_per_host, chips_per_host
  machine = f"{gke_machine}-{per_host}t" if gke_machine else None
  return TpuSlice(f"{gen}-{count}", gen, chips, hosts, per_host, topology, runtime, gke_acc, machine)


GiB = 1024**3
# Ahead-of-time compilation targets (tools/aot_compile.py): generation -> (libtpu topology prefix, chip
#   config, HBM per device). One JAX device per chip on all four: v4 and v5p chips run their two
#   TensorCores as one "megacore" device, v5e and v6e chips have one TensorCore. HBM per chip from
#   Google's TPU system-architecture pages: v4 32 GiB, v5e 16 GiB, v5p 95 GiB, v6e 32 GiB (the compiler
#   keeps a little for itself: it reports 30.75 GiB usable on v4).
TPU_AOT = {
    "v4": ("v4", "megacore", 32 * GiB),
    "v5p": ("v5", "megacore", 95 * GiB),
    "v5litepod": ("v5e", "default", 16 * GiB),
    "v6e": ("v6e", "default", 32 * GiB),
}


@dataclasses.dataclass(frozen=True)
class TpuTarget:
  """What `jax.experimental.topologies.get_topology_desc` needs to compile for a slice without a TPU."""
  slice_: TpuSlice
  topology_name: str  # e.g. "v4:2x2x4"
  chip_config_name: str
  chips_per_host_bounds: tuple[int, int, int]
  hbm_bytes_per_device: int


def tpu_target(accelerator_type: str, topology: str | None = None) -> TpuTarget:
  """Returns the TpuTarget of an accelerator type, e.g. v4-32 -> 16 megacore devices on "v4:2x2x4"."""
  sl = tpu_slice(accelerator_type, topology)
  if sl.generation not in TPU_AOT:
    raise LaunchError(f"--topology {accelerator_type!r}: ahead-of-time compilation knows "
                      f"{', '.join(sorted(TPU_AOT))} (v5e is v5litepod), not {sl.generation}")
  prefix, chip_config, hbm = TPU_AOT[sl.generation]
  dims = [int(d) for d in sl.topology.split("x")]
  # A host holds a 2x2 block of chips (v5e/v6e single-host slices of 8: 2x4); smaller slices are one host.
  per_host = [min(d, b) for d, b in zip(dims + [1] * (3 - len(dims)), (2, 2, 1))]
  if sl.hosts == 1:
    per_host = dims + [1] * (3 - len(dims))
  return TpuTarget(sl, f"{prefix}:{sl.topology}", chip_config, tuple(per_host), hbm)


AOT_TOOL = REPO_ROOT / "tools" / "aot_compile.py"


def aot_check(config: str, overrides: Mapping[str, Any], accelerator: str, *, topology: str | None = None,
              num_slices: int = 1, python: str = sys.executable) -> dict:
  """Returns tools/aot_compile.py's report for the job; raises LaunchError unless its step fits the slice.

  Runs in a subprocess: the compile needs libtpu and JAX on the CPU platform, which the launcher's own
  process should not pin.
  """
  cmd = [python, str(AOT_TOOL), f"--config={config}", f"--topology={accelerator}", f"--num_slices={num_slices}",
         *([f"--chip_topology={topology}"] if topology else []), *override_flags(dict(overrides))]
  print(f"[aot_check] compiling the train step for {accelerator} on this machine (minutes for a large model)",
        file=sys.stderr, flush=True)
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=os.getcwd())
  try:
    report = json.loads(r.stdout)
  except ValueError:
    tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
    raise LaunchError(f"--aot_check: tools/aot_compile.py failed (exit code {r.returncode}): {tail}") from None
  need = report.get("per_device_bytes", {})
  need = need.get("total", need.get("temp", 0))
  summary = (f"{need / GiB:.2f} GiB per device of {report['hbm_bytes_per_device'] / GiB:.2f} GiB HBM on "
             f"{report['devices']} {report.get('device_kind', 'TPU')} devices")
  if not report.get("fits"):
    raise LaunchError(f"--aot_check: the train step does not fit {accelerator}: {summary}"
                      + (f" ({report['error']})" if report.get("error") else "") +
                      "; lower data.batch_size, turn on model.*.remat, or take a larger slice")
  print(f"[aot_check] fits: {summary} (compiled in {report.get('compile_s', '?')} s)", file=sys.stderr, flush=True)
  return report


def _prod(xs) -> int:
  p = 1
  for x in xs:
    p *= x
  return p


def short_hash(text: str, n: int = 6) -> str:
  """Returns the first `n` hex digits of `text`'s SHA-1: a stable tag telling similar names apart."""
  import hashlib  # pylint: disable=g-import-not-at-top
  return hashlib.sha1(text.encode()).hexdigest()[:n]


def k8s_name(name: str, max_len: int = 40) -> str:
  """Returns `name` as a Kubernetes object name (lowercase RFC 1123 label, short enough for pod names)."""
  s = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")
  s = re.sub(r"-{2,}", "-", s) or "run"
  if not s[0].isalpha():
    s = "r-" + s
  if len(s) > max_len or s != name:
    # Distinct inputs must stay distinct after lossy sanitising: keep a short hash of the original.
    h = short_hash(name)
    s = s[:max_len - 7].rstrip("-") + "-" + h
  return s
