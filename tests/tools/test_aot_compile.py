"""tools/aot_compile.py: the pod config's real train step compiled for a TPU v4-32 on this CPU machine.

Two compiles (minutes on a loaded 2-core machine), each once for the module: the config as written fits
its slice; the same config at 8x the batch without remat is refused by the TPU compiler as not fitting.
libtpu comes from the environment or REPO/.libtpu (installed by the tool on first use).
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
POD = "configs/vit_b16_pod.py:stage=2"
NO_REMAT = [f"--config.model.{t}.remat=False" for t in ("vit", "text", "fusion")]


def _aot(*args):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  r = subprocess.run([sys.executable, "tools/aot_compile.py", "--config", POD, "--topology", "v4-32", *args],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
  assert r.returncode in (0, 1), r.stdout + r.stderr[-3000:]
  return r.returncode, json.loads(r.stdout)


@pytest.fixture(scope="module")
def pod_fits():
  return _aot()


@pytest.mark.slow
def test_pod_config_fits_v4_32(pod_fits):
  rc, rep = pod_fits
  assert rc == 0 and rep["fits"] is True
  assert (rep["topology"], rep["topology_name"], rep["devices"], rep["device_kind"]) == ("v4-32", "v4:2x2x4", 16,
                                                                                         "TPU v4")
  assert rep["mesh"]["fsdp"] == 16 and rep["global_batch"] == 4096
  per = rep["per_device_bytes"]
  assert 0 < per["total"] <= rep["hbm_bytes_per_device"] == 32 * 2**30
  assert per["argument"] > 0 and per["temp"] > 0 and rep["flops_per_step"] > 0


@pytest.mark.slow
def test_8x_batch_without_remat_does_not_fit(pod_fits):
  rc, rep = _aot("--config.data.batch_size=32768", *NO_REMAT)
  assert rc == 1 and rep["fits"] is False and rep["global_batch"] == 32768
  assert rep["per_device_bytes"]["temp"] > rep["hbm_bytes_per_device"]
  # More than 8x the memory of the step that fits: the batch and the activations kept without remat.
  assert rep["per_device_bytes"]["temp"] > 8 * pod_fits[1]["per_device_bytes"]["temp"]


def test_topology_targets():
  sys.path.insert(0, REPO)
  from launch import common  # pylint: disable=g-import-not-at-top
  t = common.tpu_target("v4-32")
  assert (t.topology_name, t.chip_config_name, t.chips_per_host_bounds, t.slice_.chips) == ("v4:2x2x4", "megacore",
                                                                                          (2, 2, 1), 16)
  assert common.tpu_target("v5e-16").topology_name == "v5e:4x4"
  assert common.tpu_target("v5e-16").hbm_bytes_per_device == 16 * 2**30
  t = common.tpu_target("v5p-64")
  assert (t.topology_name, t.slice_.chips, t.hbm_bytes_per_device) == ("v5:2x4x4", 32, 95 * 2**30)
  assert common.tpu_target("v6e-8").chips_per_host_bounds == (2, 4, 1)
  with pytest.raises(common.LaunchError, match="ahead-of-time compilation knows"):
    common.tpu_target("v3-32")
