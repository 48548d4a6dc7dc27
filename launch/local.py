r"""Runs one training job on this machine, in one process (then, optionally, its evaluation).

  python -m launch.local --config configs/demo.py:stage=1 --workdir workdirs/s1 [--eval] \
      [--config.train.steps=100 ...] [--dry-run]

Overrides (`--config.key=value`) pass through to `python -m mmr_jax.train` untouched. The exit code
is the trainer's (or the evaluator's, when it runs and fails).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

from launch import common


def job_commands(config: str, workdir: str, overrides, *, train_module: str = common.TRAIN_MODULE,
                 eval_module: str | None = None, eval_args: Sequence[str] = (),
                 python: str = sys.executable) -> list[list[str]]:
  """Returns the argv lists of one local job: train, then evaluate when `eval_module` is given."""
  cmds = [common.train_command(config, workdir, overrides, python=python, module=train_module)]
  if eval_module:
    cmds.append(common.eval_command(workdir, python=python, module=eval_module, extra=eval_args))
  return cmds


def main(argv: Sequence[str] | None = None) -> int:
  parser = common.make_parser(__doc__, prog="python -m launch.local")
  common.add_train_args(parser, workdir_help="run directory (local path or gs://)", evaluate=False)
  parser.add_argument("--eval", action="store_true", help="run mmr_jax.evaluate on the workdir after training")
  parser.add_argument("--eval_module", default=common.EVAL_MODULE)
  parser.add_argument("--eval_args", default="", metavar="ARGS",
                      help="extra evaluator flags as one string, e.g. --eval_args='--split test'")
  parser.add_argument("--python", default=sys.executable, help="interpreter (default: this one)")
  args = common.parse_with_overrides(parser, argv)
  cmds = job_commands(args.config, args.workdir, args.overrides, train_module=args.train_module,
                      eval_module=args.eval_module if args.eval else None,
                      eval_args=shlex.split(args.eval_args), python=args.python)
  return common.run_commands(cmds, dry_run=args.dry_run)


if __name__ == "__main__":
  sys.exit(common.main_guard(main))
