r"""Compiles the real train step for a TPU slice on this (CPU) machine and prints its memory as JSON.

  python tools/aot_compile.py --config configs/vit_b16_pod.py:stage=2 --topology v4-32 \
      [--num_slices 1] [--vocab_size 32000] [--config.key=value ...]

MaxText's train_compile.py habit: a config that cannot fit fails here, in a minute or a few, not
after the queue. The step is `mmr_jax.train.Trainer`'s own (its jit, shardings and mesh from the
config), built over a mesh of the slice's devices as libtpu describes them
(`jax.experimental.topologies`, no TPU needed) and lowered with ShapeDtypeStructs; nothing is
allocated and no data is read (--vocab_size stands in for the tokenizer in DATA_DIR).

Prints {"topology", "devices", "per_device_bytes": {argument, output, alias, temp, generated_code,
total}, "hbm_bytes_per_device", "fits", "flops_per_step", ...}; exit code 0 if it fits, 1 if not,
2 for bad input. A step that needs more HBM than the chip has is refused by the TPU compiler itself
("Ran out of memory on HBM"): that is reported as fits=false with the compiler's figures.

Topologies (--topology, as gcloud names slices; launch/common.py: TPU_AOT):
  v4-N   N/2 chips, one megacore device per chip, "v4:AxBxC" (v4-32 = 16 chips 2x2x4), 32 GiB HBM each
  v5p-N  N/2 chips, megacore, "v5:AxBxC" (v5p-64 = 32 chips 2x4x4), 95 GiB each
  v5e-N  N chips (also spelt v5litepod-N), "v5e:AxB" (v5e-16 = 4x4), 16 GiB each
  v6e-N  N chips, "v6e:AxB", 32 GiB each
TPU-only: compiling for NVIDIA GPUs this way needs the CUDA plugin and a GPU target description,
which this CPU-only setup does not have.

libtpu: used from this environment if installed (`jax[tpu]`), else installed on first use into
REPO/.libtpu (pip --target, the version jax[tpu] pins; ~0.7 GB) and put on sys.path of this process
only, so other JAX programs of the venv never see it. JAX_PLATFORMS defaults to cpu here: the
topology compile needs no TPU client.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from launch import common  # pylint: disable=g-import-not-at-top,wrong-import-position

LIBTPU_DIR = REPO / ".libtpu"
DEFAULT_VOCAB = 32_000
_OOM = re.compile(r"Ran out of memory.*?required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds available HBM "
                  r"\(([\d.]+)([KMGT]?)\)", re.S)


def libtpu_requirement() -> str:
  """Returns the libtpu requirement jax[tpu] pins for the installed jax (e.g. "libtpu==0.0.42.*")."""
  for req in importlib.metadata.requires("jax") or ():
    name, _, marker = req.partition(";")
    if name.strip().startswith("libtpu") and "tpu" in marker:
      return name.strip().replace(" ", "")
  raise RuntimeError("the installed jax names no libtpu for its [tpu] extra")


def ensure_libtpu(install: bool = True) -> str:
  """Returns where libtpu comes from, putting REPO/.libtpu on sys.path (installing it there if needed)."""
  try:
    import libtpu  # pylint: disable=g-import-not-at-top,unused-import
    return os.path.dirname(libtpu.__file__)
  except ImportError:
    pass
  req = libtpu_requirement()
  version = req.split("==", 1)[1].rstrip("*").rstrip(".")
  have = [p.name for p in LIBTPU_DIR.glob("libtpu-*.dist-info")]
  if not any(n.startswith(f"libtpu-{version}") for n in have):
    if not install:
      raise RuntimeError(f"libtpu ({req}) is not installed in {LIBTPU_DIR}")
    print(f"[aot] installing {req} into {LIBTPU_DIR} (once)", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--upgrade", "--target",
                    str(LIBTPU_DIR), req], check=True)
  sys.path.insert(0, str(LIBTPU_DIR))
  return str(LIBTPU_DIR / "libtpu")


def _bytes(value: str, unit: str) -> int:
  return int(float(value) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


def compile_report(config, target: common.TpuTarget, num_slices: int = 1) -> dict:
  """Returns the JSON report of compiling `config`'s train step for `num_slices` slices of `target`."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from mmr_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from mmr_jax import train  # pylint: disable=g-import-not-at-top

  topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology_name,
                                      chip_config_name=target.chip_config_name,
                                      chips_per_host_bounds=target.chips_per_host_bounds, num_slices=num_slices)
  devices = list(topo.devices)
  report = {"topology": target.slice_.accelerator_type, "topology_name": target.topology_name,
            "chip_config": target.chip_config_name, "num_slices": num_slices, "devices": len(devices),
            "device_kind": devices[0].device_kind, "hbm_bytes_per_device": target.hbm_bytes_per_device}
  config = train.resolve_config(config)
  mesh = shd.make_mesh(config.mesh.shape, devices)
  report["mesh"] = dict(mesh.shape)
  report["global_batch"] = config.data.batch_size
  t0 = time.time()
  trainer = train.Trainer(config, "", mesh=mesh)
  try:
    mem = trainer.memory_analysis()  # the step the training loop runs: lowered with ShapeDtypeStructs, compiled
  except Exception as e:  # pylint: disable=broad-except
    m = _OOM.search(str(e))
    if m is None:
      raise
    report.update(compile_s=round(time.time() - t0, 1), fits=False,
                  per_device_bytes={"temp": _bytes(*m.group(1, 2))},
                  compiler_available_hbm_bytes=_bytes(*m.group(3, 4)),
                  error=str(e).strip().splitlines()[0][:500])
    return report
  per = {k.replace("_size_in_bytes", ""): v for k, v in mem.items() if k.endswith("_size_in_bytes")}
  # Outputs aliased to donated arguments (the train state) occupy their buffers once.
  per["total"] = per.get("argument", 0) + per.get("output", 0) - per.get("alias", 0) + per.get("temp", 0) + per.get(
      "generated_code", 0)
  flops = mem.get("xla_flops_per_step")
  report.update(compile_s=round(time.time() - t0, 1), per_device_bytes=per,
                fits=per["total"] <= target.hbm_bytes_per_device,
                # XLA's count for one device's program; a scanned layer stack's loop body is counted once,
                # so with scan_layers this is a lower bound.
                flops_per_step=None if flops is None else flops * len(devices),
                flops_per_device_per_step=flops)
  return report


def main(argv=None) -> int:
  parser = common.make_parser(__doc__, prog="python tools/aot_compile.py")
  parser.add_argument("--config", required=True, help="config ref, e.g. configs/vit_b16_pod.py:stage=2")
  parser.add_argument("--topology", required=True, help="TPU slice, e.g. v4-32, v5e-16, v5p-64, v6e-8")
  parser.add_argument("--chip_topology", default=None, help="non-default chip layout, e.g. 4x2x2 for a v4-32")
  parser.add_argument("--num_slices", type=int, default=None,
                      help="slices joined over DCN (default: the config's mesh.shape.dcn)")
  parser.add_argument("--vocab_size", type=int, default=None,
                      help=f"vocabulary size when the config leaves it to DATA_DIR's tokenizer (default {DEFAULT_VOCAB}; "
                           "the data is never read)")
  parser.add_argument("--out", default=None, help="also write the JSON report here")
  args = common.parse_with_overrides(parser, argv)
  target = common.tpu_target(args.topology, args.chip_topology)
  config = common.build_config(args.config, args.overrides)
  with config.unlocked():
    if args.vocab_size is not None:
      if args.vocab_size < 1:
        raise common.LaunchError(f"--vocab_size must be positive, got {args.vocab_size}")
      config.model.text.vocab_size = args.vocab_size
    elif config.model.text.vocab_size <= 0:
      config.model.text.vocab_size = DEFAULT_VOCAB
  num_slices = args.num_slices or max(int(config.mesh.shape.get("dcn", 1)), 1)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  ensure_libtpu()
  report = compile_report(config, target, num_slices)
  text = json.dumps(report, indent=1)
  print(text, flush=True)
  if args.out:
    Path(args.out).write_text(text + "\n")
  return 0 if report["fits"] else 1


if __name__ == "__main__":
  sys.exit(common.main_guard(main))
