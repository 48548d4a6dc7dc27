r"""Runs N local processes joined by jax.distributed on 127.0.0.1: a multi-host job on one machine.

  python -m launch.multiprocess --num_processes 2 --devices_per_process 4 \
      --config configs/demo.py:runlocal=True --workdir workdirs/mp [--config.key=value ...]
  python -m launch.multiprocess --num_processes 2 --script my_check.py [-- script args]

Each process gets JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=D (so N
processes x D fake CPU devices form the global mesh), and the coordinator both as flags
(`--coordinator_address 127.0.0.1:PORT --num_processes N --process_id I`) and as env vars
(MMR_COORDINATOR_ADDRESS / MMR_NUM_PROCESSES / MMR_PROCESS_ID). A --script must accept those three
flags (or read the env). Cross-process collectives on CPU need
`jax.config.update("jax_cpu_collectives_implementation", "gloo")` before initialize (mmr_jax.train
does this when it sees a coordinator on CPU).

Output lines are prefixed [p0], [p1], ... If one process exits non-zero, the others get
--grace_s seconds, then are terminated, and the launcher exits non-zero naming the process.
"""

from __future__ import annotations

import os
import shlex
import re
import sys
from collections.abc import Sequence

from launch import common


def process_env(base: dict[str, str], *, process_id: int, num_processes: int, coordinator: str,
                devices_per_process: int) -> dict[str, str]:
  """Returns the environment of local process `process_id` (CPU platform, fake devices, coordinator)."""
  env = dict(base)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).strip()
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices_per_process}".strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["MMR_COORDINATOR_ADDRESS"] = coordinator
  env["MMR_NUM_PROCESSES"] = str(num_processes)
  env["MMR_PROCESS_ID"] = str(process_id)
  return env


def coordinator_flags(coordinator: str, num_processes: int, process_id: int) -> list[str]:
  """Returns the trainer's multi-host flags for one process."""
  return [f"--coordinator_address={coordinator}", f"--num_processes={num_processes}", f"--process_id={process_id}"]


def main(argv: Sequence[str] | None = None) -> int:
  parser = common.make_parser(__doc__, prog="python -m launch.multiprocess")
  parser.add_argument("--num_processes", "-n", type=int, default=2)
  parser.add_argument("--devices_per_process", "-d", type=int, default=1,
                      help="fake CPU devices per process (XLA_FLAGS host device count)")
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument("--config", help="train: config ref, e.g. configs/demo.py:runlocal=True")
  what.add_argument("--script", help="run this python script instead of the trainer")
  parser.add_argument("--workdir", help="train: run directory, shared by all processes")
  parser.add_argument("--train_module", default=common.TRAIN_MODULE)
  parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
  parser.add_argument("--grace_s", type=float, default=10.0,
                      help="after one process fails, seconds the others get before being terminated")
  parser.add_argument("--python", default=sys.executable)
  parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true")
  argv = list(sys.argv[1:] if argv is None else argv)
  # Everything after "--" goes to the script untouched.
  script_args = []
  if "--" in argv:
    i = argv.index("--")
    argv, script_args = argv[:i], argv[i + 1:]
  args = common.parse_with_overrides(parser, argv)
  if args.num_processes < 1 or args.devices_per_process < 1:
    parser.error("--num_processes and --devices_per_process must be >= 1")
  if args.config and not args.workdir:
    parser.error("--workdir is required with --config")
  if args.script and args.overrides:
    parser.error("--config.key=value overrides apply to the trainer, not to --script")
  if args.script and not os.path.isfile(args.script):
    parser.error(f"--script {args.script!r}: no such file")

  coordinator = f"127.0.0.1:{args.port or common.free_port()}"
  cmds, envs, names = [], [], []
  for i in range(args.num_processes):
    if args.config:
      cmd = common.train_command(args.config, args.workdir, args.overrides, python=args.python,
                                 module=args.train_module)
    else:
      cmd = [args.python, args.script]
    cmds.append(cmd + coordinator_flags(coordinator, args.num_processes, i) + script_args)
    envs.append(process_env(dict(os.environ), process_id=i, num_processes=args.num_processes,
                            coordinator=coordinator, devices_per_process=args.devices_per_process))
    names.append(f"p{i}")

  if args.dry_run:
    for cmd, env in zip(cmds, envs):
      shown = {k: env[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS", "MMR_COORDINATOR_ADDRESS", "MMR_NUM_PROCESSES",
                                   "MMR_PROCESS_ID")}
      print(" ".join(f"{k}={shlex.quote(v)}" for k, v in shown.items()), common.shell_text(cmd), "&")
    print("wait")
    return 0
  print(f"[multiprocess] {args.num_processes} processes x {args.devices_per_process} CPU devices, "
        f"coordinator {coordinator}", flush=True)
  rc = common.run_parallel(cmds, names=names, envs=envs, grace_s=args.grace_s, tag="multiprocess")
  if rc == 0:
    print(f"[multiprocess] all {args.num_processes} processes finished OK", flush=True)
  return rc


if __name__ == "__main__":
  sys.exit(common.main_guard(main))
