"""The path layer: atomic writes and the workdir lock (local; gs:// is in test_gcs_emulator.py)."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from mmr_jax import checkpoint as ckpt_lib
from mmr_jax import fileio


def test_write_that_fails_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "metrics.json"
  ckpt_lib.write_json(path, {"recall@10": 0.5})

  def half_then_crash(local):
    with open(local, "w") as f:
      f.write('{"recall@10": 0.')
    raise RuntimeError("killed mid-write")

  with pytest.raises(RuntimeError, match="killed mid-write"):
    fileio.write_atomic(path, half_then_crash)
  assert json.loads(path.read_text()) == {"recall@10": 0.5}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_write_that_fails_midway_leaves_no_final_file(tmp_path):
  path = tmp_path / "embeddings.npy"

  def crash(local):
    np.save(local, np.zeros(3))
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    fileio.write_atomic(path, crash)
  assert list(tmp_path.iterdir()) == []


def test_write_atomic_keeps_the_suffix_for_writers_that_need_it(tmp_path):
  # np.save appends .npy to a name without it; savefig picks the format from the suffix.
  fileio.write_atomic(tmp_path / "e.npy", lambda p: np.save(p, np.arange(3)))
  np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), np.arange(3))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy"]


def _hold_lock_in_subprocess(workdir, seconds):
  code = ("import sys, time; from mmr_jax import fileio\n"
          f"with fileio.WorkdirLock({str(workdir)!r}, 'train'):\n"
          "  print('locked', flush=True); time.sleep(float(sys.argv[1]))\n")
  proc = subprocess.Popen([sys.executable, "-c", code, str(seconds)], stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
  assert proc.stdout.readline().strip() == "locked"
  return proc


def test_lock_refuses_a_second_process_naming_the_first(tmp_path):
  proc = _hold_lock_in_subprocess(tmp_path, 60)
  try:
    with pytest.raises(fileio.WorkdirBusyError) as e:
      fileio.WorkdirLock(tmp_path, "train").acquire()
    msg = str(e.value)
    assert str(tmp_path) in msg and f"pid {proc.pid}" in msg and "train" in msg and "since" in msg
    assert "\n" not in msg
  finally:
    proc.kill()
    proc.wait()
  # A killed holder leaves no stale lock: the kernel drops its flock.
  with fileio.WorkdirLock(tmp_path, "train"):
    pass


def test_lock_is_reentrant_in_one_process(tmp_path):
  with fileio.WorkdirLock(tmp_path, "train"):
    with fileio.WorkdirLock(tmp_path, "evaluate"):
      pass
    # Still held by the outer one after the inner release.
    code = (f"from mmr_jax import fileio\nfileio.WorkdirLock({str(tmp_path)!r}, 'x').acquire()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode != 0 and "WorkdirBusyError" in r.stderr
