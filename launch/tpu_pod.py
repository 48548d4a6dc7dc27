r"""TPU VM pod slices through gcloud: create, set up, run the trainer on every worker, delete.

  python -m launch.tpu_pod create --tpu mmr --zone us-central2-b --accelerator v4-32
  python -m launch.tpu_pod setup  --tpu mmr --zone us-central2-b            # copy repo, .venv, jax[tpu]
  python -m launch.tpu_pod run    --tpu mmr --zone us-central2-b \
      --config configs/demo.py:stage=1 --workdir gs://BUCKET/mmr/s1 [--config.key=value ...]
  python -m launch.tpu_pod ssh    --tpu mmr --zone us-central2-b --worker 0 -- tail -n 50 mmr_jax/logs/train.log
  python -m launch.tpu_pod delete --tpu mmr --zone us-central2-b

Every subcommand takes --dry-run (print the gcloud commands, run nothing) and --project.

How a pod runs: every worker VM of the slice (v4-32 = 4 hosts x 4 chips) must run the same
program at the same time; `gcloud ... ssh --worker=all --command ...` does that. On TPU VMs
`jax.distributed.initialize()` needs no arguments: worker ids and peers come from the TPU
metadata server. Each host has its own disk, so the workdir (checkpoints, metrics) must be a
bucket (gs://...) and so should the data; `run` refuses a local --workdir.

`setup` copies the working tree (tracked + untracked-but-not-ignored files, i.e. what git would
see, uncommitted edits included) with `gcloud ... scp --worker=all`, or clones it (--source git),
then builds `.venv` with Python 3.11 through uv (TPU VM images ship an older Python) and installs
`-e .` plus `jax[tpu]` at this machine's jax version.

Multi-slice (--num_slices N > 1): slices talk over the data-centre network (DCN) and must be
created together as one queued resource (`create --num_slices N` uses `gcloud compute tpus
queued-resources create NAME --node-count N --node-prefix NAME`, nodes NAME-0 .. NAME-(N-1)).
The TPU runtime joins them through the MEGASCALE_* variables: MEGASCALE_COORDINATOR_ADDRESS (worker 0
of slice 0), MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID and MEGASCALE_PORT (default 8080). Queued
resources publish these in each VM's `tpu-env` metadata, where jax reads them (jax numbers processes
slice by slice), so `run --num_slices N` only has to start every worker of every slice at once: it
runs one `ssh --worker=all` per slice in parallel, prefixes their output [s0], [s1], ... and stops
the others if one fails. To join slices created separately, pass MEGASCALE_COORDINATOR_ADDRESS,
MEGASCALE_NUM_SLICES (and MEGASCALE_PORT) yourself with --env; each slice then gets its own
MEGASCALE_SLICE_ID (0 for NAME-0, ...) (coordinator: `gcloud compute tpus tpu-vm describe NAME-0
--format='value(networkEndpoints[0].ipAddress)'`).
The mesh's DCN axis (data parallel across slices) is a config matter, not a launcher one.

If a run dies and the TPU stays busy ("TPU in use"), a stale process still holds /dev/accel*: find it
with `ssh -- sudo lsof -w /dev/accel0` and end that process by its id.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import shlex
import sys
from collections.abc import Sequence

from launch import common

SRC_ARCHIVE = "mmr_jax-src.tar.gz"


# ------------------------------------------------------------------------------------------- pieces


def node_names(tpu: str, num_slices: int) -> list[str]:
  """Returns the TPU VM node names: [tpu] for one slice, [tpu-0, ..] for a queued-resource multi-slice."""
  if num_slices < 1:
    raise common.LaunchError(f"--num_slices must be >= 1, got {num_slices}")
  return [tpu] if num_slices == 1 else [f"{tpu}-{i}" for i in range(num_slices)]


def _where(args) -> list[str]:
  return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def remote_path(path: str) -> str:
  """Returns shell text for a path on the worker ("~/x" stays home-relative, the rest is quoted)."""
  if path.startswith("~/"):
    return "~/" + shlex.quote(path[2:])
  if path.startswith("/"):
    return shlex.quote(path)
  return "~/" + shlex.quote(path)


def ssh_command(args, node: str, remote_cmd: str, worker: str = "all") -> list[str]:
  """Returns the gcloud argv running shell text `remote_cmd` on `worker` ("all" or an index) of `node`."""
  cmd = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *_where(args), f"--worker={worker}"]
  if getattr(args, "internal_ip", False):
    cmd.append("--internal-ip")
  return cmd + [f"--command={remote_cmd}"]


def create_commands(args) -> list[common.Command]:
  """Returns the gcloud command creating the slice (a queued resource when --num_slices > 1)."""
  sl = common.tpu_slice(args.accelerator)
  version = args.version or sl.runtime_version
  if args.num_slices == 1:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.tpu, *_where(args),
           f"--accelerator-type={sl.accelerator_type}", f"--version={version}"]
  else:
    if sl.hosts == 1:
      raise common.LaunchError(f"--num_slices {args.num_slices}: multi-slice needs multi-host slices; "
                               f"{sl.accelerator_type} is a single host")
    cmd = ["gcloud", "compute", "tpus", "queued-resources", "create", args.tpu, *_where(args),
           f"--node-count={args.num_slices}", f"--node-prefix={args.tpu}",
           f"--accelerator-type={sl.accelerator_type}", f"--runtime-version={version}"]
  if args.spot:
    cmd.append("--spot")
  return [cmd]


def delete_commands(args) -> list[common.Command]:
  """Returns the gcloud command deleting the slice (or the whole queued resource)."""
  if args.num_slices == 1:
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.tpu, *_where(args), "--quiet"]]
  return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.tpu, *_where(args), "--force", "--quiet"]]


def setup_script(args) -> str:
  """Returns the shell text each worker runs to unpack / clone the repo and build its .venv."""
  d = remote_path(args.remote_dir)
  lines = ["set -euo pipefail"]
  if args.source == "copy":
    lines += [f"mkdir -p {d}", f"tar -xzf ~/{SRC_ARCHIVE} -C {d}", f"rm -f ~/{SRC_ARCHIVE}"]
  else:
    url, ref = shlex.quote(args.git_url), shlex.quote(args.git_ref)
    lines += [f"if [ -d {d}/.git ]; then git -C {d} fetch --depth 1 origin {ref} && git -C {d} checkout -f FETCH_HEAD; "
              f"else git clone {url} {d} && git -C {d} checkout {ref}; fi"]
  jax_req = shlex.quote(f"jax[tpu]=={args.jax_version}")
  lines += [
      f"cd {d}",
      # TPU VM images ship an older Python than the project's 3.11: uv fetches a standalone one.
      "python3 -m pip install --user --quiet --upgrade uv",
      f"~/.local/bin/uv venv --allow-existing --python {shlex.quote(args.python_version)} .venv",
      f"~/.local/bin/uv pip install --python .venv/bin/python -e . {jax_req}",
      ".venv/bin/python -c 'import jax, mmr_jax; print(\"mmr_jax ready, jax\", jax.__version__)'",
  ]
  return "\n".join(lines)


def setup_commands(args) -> list[common.Command]:
  """Returns the commands copying (or cloning) the repo to every worker and installing it."""
  nodes = node_names(args.tpu, args.num_slices)
  cmds: list[common.Command] = []
  if args.source == "copy":
    archive = f"/tmp/{SRC_ARCHIVE}"
    repo = shlex.quote(str(common.REPO_ROOT))
    # What git sees (tracked + untracked-not-ignored): no .venv, data or workdirs in the upload.
    # pipefail: outside a git checkout the upload must fail, not ship an empty archive; files deleted but
    # not yet committed are listed by git and skipped by tar (--ignore-failed-read).
    cmds.append(f"set -o pipefail; git -C {repo} ls-files -z --cached --others --exclude-standard "
                f"| tar --ignore-failed-read -czf {archive} -C {repo} --null -T -")
    for node in nodes:
      scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp", archive, f"{node}:{SRC_ARCHIVE}", *_where(args),
             "--worker=all"]
      if args.internal_ip:
        scp.append("--internal-ip")
      cmds.append(scp)
  elif not args.git_url:
    raise common.LaunchError("setup --source git needs --git_url")
  script = setup_script(args)
  for node in nodes:
    cmds.append(ssh_command(args, node, script))
  return cmds


def remote_train_script(args, *, config: str, workdir: str, overrides, background: bool = False,
                        log_name: str = "train", slice_env: dict | None = None) -> str:
  """Returns the shell text each worker runs: cd into the repo, export env, run the trainer."""
  cmd = common.train_command(common.repo_relative_config(config), workdir, overrides, python=".venv/bin/python",
                             module=args.train_module, extra=common.train_extra(args))
  # Every worker must join one jax.distributed job; the TPU VM's metadata tells jax who its peers are.
  env = {"MMR_DISTRIBUTED": "auto", **common.parse_env(args.env), **(slice_env or {})}
  cmd = ["env", *(f"{k}={v}" for k, v in env.items()), *cmd]
  cd = f"cd {remote_path(args.remote_dir)}"
  if background:
    log = shlex.quote(f"logs/{log_name}.log")
    return f"{cd} && mkdir -p logs && (nohup {shlex.join(cmd)} > {log} 2>&1 < /dev/null &)"
  return f"{cd} && exec {shlex.join(cmd)}"


def run_commands_for(args, *, name: str, config: str, workdir: str, overrides,
                     background: bool = False) -> list[list[str]]:
  """Returns one `ssh --worker=all` argv per slice, all running the same train command."""
  common.require_bucket(workdir, args.allow_local_workdir)
  # Slices joined by hand (--env MEGASCALE_COORDINATOR_ADDRESS=...) differ only in their slice id.
  user_env = common.parse_env(args.env)
  by_hand = "MEGASCALE_COORDINATOR_ADDRESS" in user_env and "MEGASCALE_SLICE_ID" not in user_env
  return [ssh_command(args, node, remote_train_script(
      args, config=config, workdir=workdir, overrides=overrides, background=background, log_name=name,
      slice_env={"MEGASCALE_SLICE_ID": str(i)} if by_hand else None))
          for i, node in enumerate(node_names(args.tpu, args.num_slices))]


# --------------------------------------------------------------------------- sweep backend interface


def add_backend_args(parser: argparse.ArgumentParser):
  """Adds the flags a TPU pod job needs (used by this CLI and by launch.sweep --backend tpu)."""
  parser.add_argument("--tpu", required=True, help="TPU VM (or queued resource) name")
  parser.add_argument("--zone", required=True)
  parser.add_argument("--project", default=None)
  parser.add_argument("--num_slices", type=int, default=1, help="slices of a queued-resource multi-slice")
  parser.add_argument("--internal_ip", action="store_true", help="reach workers by internal IP (from inside the VPC)")


def add_run_args(parser: argparse.ArgumentParser):
  """Adds the flags shaping the remote train command (not --train_module: callers own that one)."""
  parser.add_argument("--remote_dir", default="mmr_jax", help="repo directory on the workers (relative to ~)")
  parser.add_argument("--env", action="append", metavar="NAME=VALUE", help="environment for the trainer (repeatable)")
  parser.add_argument("--secret_env", action="append", default=[], metavar="NAME",
                      help="treat --env NAME as a secret (names matching TOKEN|SECRET|KEY|PASSWORD|CREDENTIAL "
                           "already are): masked wherever a command is printed")
  parser.add_argument("--allow_local_workdir", action="store_true",
                      help="accept a non-bucket --workdir (only for a filesystem every worker mounts)")
  parser.add_argument("--aot_check", action="store_true",
                      help="first compile the train step for --accelerator on this machine (tools/aot_compile.py) "
                           "and refuse to run when it does not fit the chips' HBM")
  parser.add_argument("--accelerator", default=None, help="the slice's type, e.g. v4-32 (for --aot_check)")


def job_commands(args, *, name: str, config: str, workdir: str, overrides) -> list[common.Command]:
  """Returns the printable commands of one sweep point (parallel per slice when multi-slice)."""
  cmds = run_commands_for(args, name=name, config=config, workdir=workdir, overrides=overrides)
  if len(cmds) == 1:
    return cmds
  # Slices must start together: background each slice's ssh, wait for all, fail if any failed (in a
  # subshell, so a printed sweep piped to bash goes on to its next point).
  body = "\n".join(f"  {shlex.join(c)} &\n  pids=\"$pids $!\"" for c in cmds)
  return [f"(\n  pids=\"\"\n{body}\n  rc=0\n  for p in $pids; do wait \"$p\" || rc=$?; done\n  exit $rc\n)"]


def submit_job(args, *, name: str, config: str, workdir: str, overrides) -> int:
  """Returns the exit code of running one sweep point on the pod (blocking)."""
  cmds = run_commands_for(args, name=name, config=config, workdir=workdir, overrides=overrides)
  secrets = common.split_secret_env(args)[1].values()
  if len(cmds) == 1:
    return common.run_commands(cmds, dry_run=False, secrets=secrets)
  for c in cmds:
    print("+ " + common.mask_text(shlex.join(c), secrets), flush=True)
  return common.run_parallel(cmds, names=[f"s{i}" for i in range(len(cmds))], tag="tpu_pod")


# ----------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
  parser = common.make_parser(__doc__, prog="python -m launch.tpu_pod")
  sub = parser.add_subparsers(dest="cmd", required=True)
  dry = argparse.ArgumentParser(add_help=False)
  dry.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true", help="print, run nothing")

  def subparser(name, help_):
    p = sub.add_parser(name, help=help_, parents=[dry], allow_abbrev=False)
    add_backend_args(p)
    return p

  p = subparser("create", "create the slice (queued resource when --num_slices > 1)")
  p.add_argument("--accelerator", required=True, help="e.g. v4-32, v5p-64, v5litepod-16, v6e-16")
  p.add_argument("--version", default=None, help="TPU VM runtime (default: the generation's usual image)")
  p.add_argument("--spot", action="store_true", help="spot capacity (cheaper, preemptible)")

  p = subparser("setup", "put the repo on every worker and build .venv with jax[tpu]")
  p.add_argument("--source", choices=("copy", "git"), default="copy",
                 help="copy this working tree (default) or git clone --git_url")
  p.add_argument("--git_url", default=None)
  p.add_argument("--git_ref", default="main")
  p.add_argument("--remote_dir", default="mmr_jax")
  p.add_argument("--python_version", default="3.11")
  p.add_argument("--jax_version", default=importlib.metadata.version("jax"),
                 help="jax[tpu] version to install (default: this machine's, %(default)s)")

  p = subparser("run", "run the trainer on every worker of every slice")
  common.add_train_args(p, workdir_help="run directory on a bucket, e.g. gs://BUCKET/mmr/run1", dry_run=False)
  add_run_args(p)
  p.add_argument("--background", action="store_true",
                 help="start detached (nohup) and return; output goes to REMOTE_DIR/logs/<name>.log on each worker")
  p.add_argument("--name", default="train", help="log name for --background")

  p = subparser("ssh", "run a shell command on workers (after --)")
  p.add_argument("--worker", default="all", help="'all' or a worker index")
  p.add_argument("remote", nargs=argparse.REMAINDER, help="-- COMMAND ...")

  subparser("delete", "delete the slice (or the queued resource and its slices)")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args, rest = parser.parse_known_args(argv)
  if args.cmd == "run":
    try:
      args.overrides = common.parse_override_args(rest)
    except common.LaunchError as e:
      parser.error(str(e))
  elif rest:
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  node_names(args.tpu, args.num_slices)  # validates --num_slices

  if args.cmd == "create":
    return common.run_commands(create_commands(args), dry_run=args.dry_run)
  if args.cmd == "delete":
    return common.run_commands(delete_commands(args), dry_run=args.dry_run)
  if args.cmd == "setup":
    return common.run_commands(setup_commands(args), dry_run=args.dry_run)
  if args.cmd == "ssh":
    remote = args.remote[1:] if args.remote[:1] == ["--"] else args.remote
    if not remote:
      parser.error("ssh: give the command after --")
    cmds = [ssh_command(args, n, shlex.join(remote), worker=args.worker)
            for n in node_names(args.tpu, args.num_slices)]
    return common.run_commands(cmds, dry_run=args.dry_run)
  # run: the config is built here first, so a mistyped key fails now, not on every worker.
  common.build_config(args.config, args.overrides)
  if args.aot_check:
    if not args.accelerator:
      parser.error("run --aot_check needs --accelerator (the slice's type, e.g. v4-32)")
    common.aot_check(args.config, args.overrides, args.accelerator, num_slices=args.num_slices)
  cmds = run_commands_for(args, name=args.name, config=args.config, workdir=args.workdir, overrides=args.overrides,
                          background=args.background)
  secrets = common.split_secret_env(args)[1].values()
  if args.dry_run or len(cmds) == 1 or args.background:
    rc = common.run_commands(cmds, dry_run=args.dry_run, secrets=secrets)
  else:
    for c in cmds:
      print("+ " + common.mask_text(shlex.join(c), secrets), flush=True)
    rc = common.run_parallel(cmds, names=[f"s{i}" for i in range(len(cmds))], tag="tpu_pod")
  if args.background and rc == 0 and not args.dry_run:
    print(f"started in the background; follow with:\n  python -m launch.tpu_pod ssh --tpu {args.tpu} "
          f"--zone {args.zone} --worker 0 -- tail -f {args.remote_dir}/logs/{args.name}.log")
  return rc


if __name__ == "__main__":
  sys.exit(common.main_guard(main))
