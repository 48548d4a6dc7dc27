"""The path layer: files that may live on a local disk or in a bucket (gs://), through etils `epath`.

Every command reads DATA_DIR and writes workdirs through here or through `epath` directly (which is what
Orbax, TFDS and grain use: `tf.io.gfile` underneath, so gs:// works wherever TensorFlow's GCS filesystem
does). Libraries that only open local files (SentencePiece, ScaNN, matplotlib, `np.save`) get a local
temporary file that is copied up (`write_atomic`, `upload_dir`) or down (`download_dir`).

- `write_atomic` / `write_json` / `write_text` / `write_bytes`: a reader never sees half a file. Locally a
  temporary file beside the target is renamed over it; on gs:// the content is made completely in a local
  temporary file first and then uploaded as one object (an object upload is atomic: readers see the old
  object or the new one).
- `WorkdirLock`: one writer per workdir (`flock` locally, a lease object on gs://).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from typing import Callable

from etils import epath
import tensorstore as ts

log = logging.getLogger(__name__)


def is_remote(path) -> bool:
  """Returns whether `path` is a URL (gs://, s3://...) rather than a local path."""
  return "://" in os.fspath(path)


def write_atomic(path, write: Callable[[str], None]) -> None:
  """Writes `path` through `write(local_path)`, which fills a temporary local file; `path` appears (or is
  replaced) only when `write` returns, so an error or crash part-way leaves the old file or none."""
  path = epath.Path(path)
  if is_remote(path):
    with tempfile.TemporaryDirectory(prefix="mmr_upload_") as tmp:
      local = os.path.join(tmp, path.name)
      write(local)
      path.parent.mkdir(parents=True, exist_ok=True)
      epath.Path(local).copy(path, overwrite=True)
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  # Unique name: two writers of one file must not share (and truncate) each other's temporary. The suffix
  # stays last: np.save appends ".npy" and savefig picks the format from it.
  tmp = path.parent / f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}"
  try:
    write(os.fspath(tmp))
    with open(tmp, "rb+") as f:  # durable before it takes the final name
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.remove(tmp)


def write_bytes(path, data: bytes) -> None:
  """Writes `data` to `path` atomically (see write_atomic)."""
  def write(local):
    with open(local, "wb") as f:
      f.write(data)
  write_atomic(path, write)


def write_text(path, text: str) -> None:
  """Writes UTF-8 `text` to `path` atomically (see write_atomic)."""
  write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> None:
  """Writes `obj` as JSON to `path` atomically (see write_atomic): never a half file, e.g. a half
  `metrics.json` that a sweep would count as a finished point."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float))


def upload_dir(local_dir, dst) -> None:
  """Copies the local folder `local_dir` to `dst` (local or gs://), replacing what `dst` held."""
  dst = epath.Path(dst)
  if dst.exists():
    dst.rmtree()
  if not is_remote(dst):
    shutil.copytree(local_dir, dst)
    return
  for root, _, files in os.walk(local_dir):
    rel = os.path.relpath(root, local_dir)
    target = dst if rel == "." else dst / rel
    target.mkdir(parents=True, exist_ok=True)
    for name in files:
      epath.Path(os.path.join(root, name)).copy(target / name, overwrite=True)


def download_dir(src, local_dir) -> None:
  """Copies the folder `src` (local or gs://) into the local folder `local_dir`."""
  src = epath.Path(src)
  os.makedirs(local_dir, exist_ok=True)
  for child in src.iterdir():
    target = os.path.join(local_dir, child.name)
    if child.is_dir():
      download_dir(child, target)
    else:
      child.copy(epath.Path(target), overwrite=True)


@contextlib.contextmanager
def local_dir(path):
  """Yields a local folder for `path`: `path` itself when local, else a temporary copy of it."""
  if not is_remote(path):
    yield os.fspath(path)
    return
  with tempfile.TemporaryDirectory(prefix="mmr_download_") as tmp:
    download_dir(path, tmp)
    yield tmp


# ------------------------------------------------------------------------------------------- the lock

LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
  """Raised when another process holds a workdir's lock."""


def _holder_info(what: str) -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(), "what": what,
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "command": " ".join(sys.argv)[:300]}


def _describe(info: dict) -> str:
  return (f"{info.get('what', '?')} pid {info.get('pid', '?')} on {info.get('host', '?')} since "
          f"{info.get('started', '?')} ({info.get('command', '')})")


class WorkdirLock:
  """One writer per workdir: `with WorkdirLock(workdir, "train"):` or acquire()/release().

  Local workdirs (and mounted shared file systems): an exclusive `flock` on WORKDIR/.lock, released by the
  kernel when the process dies, so a killed run never leaves a stale lock. The file records the holder
  (host, pid, start time, command) for the refusal message.

  gs:// workdirs: a lease object WORKDIR/.lock, created only if absent (GCS precondition
  `ifGenerationMatch=0` through tensorstore, Orbax's own client), renewed every `heartbeat_s` with a
  precondition on its own generation, deleted on release. A holder that stops renewing (killed, lost its
  network) loses the lease after `ttl_s`; the next run takes it over, again under a generation
  precondition so two contenders cannot both win. Its clock is the lease's own `expires` written by the
  holder: hosts with clocks more than ttl_s apart could misjudge a live lease as expired.

  Re-entrant within a process (`train --evaluate` evaluates under the trainer's lock).
  """

  _held: dict[str, list] = {}  # path -> [count, lock]
  _held_guard = threading.Lock()

  def __init__(self, workdir, what: str, *, ttl_s: float = 600.0, heartbeat_s: float = 60.0):
    self.workdir = epath.Path(workdir)
    self.path = self.workdir / LOCK_FILE
    self.what = what
    self.ttl_s, self.heartbeat_s = ttl_s, heartbeat_s
    self._fd = None
    self._created = False
    self._kv = None
    self._generation = None
    self._stop = threading.Event()
    self._thread = None

  def acquire(self) -> WorkdirLock:
    key = os.fspath(self.path)
    with WorkdirLock._held_guard:
      held = WorkdirLock._held.get(key)
      if held is not None:
        held[0] += 1
        return self
      # A run refused before it wrote anything leaves no workdir behind (see _release).
      self._created = not is_remote(self.workdir) and not self.workdir.exists()
      self.workdir.mkdir(parents=True, exist_ok=True)
      (self._acquire_lease if is_remote(self.workdir) else self._acquire_flock)()
      WorkdirLock._held[key] = [1, self]
    return self

  def release(self) -> None:
    key = os.fspath(self.path)
    with WorkdirLock._held_guard:
      held = WorkdirLock._held.get(key)
      if held is None:
        return
      held[0] -= 1
      if held[0]:
        return
      del WorkdirLock._held[key]
      owner = held[1]
    owner._release()  # pylint: disable=protected-access

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  # -- local: flock

  def _acquire_flock(self):
    fd = os.open(os.fspath(self.path), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      try:
        info = json.loads(os.pread(fd, 65536, 0) or b"{}")
      except ValueError:
        info = {}
      os.close(fd)
      raise WorkdirBusyError(f"{self.workdir} is in use by {_describe(info)}: wait for it to finish or stop it "
                             f"(lock {self.path})") from None
    data = json.dumps(_holder_info(self.what)).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    self._fd = fd

  # -- gs://: lease object

  def _kvstore(self):
    return ts.KvStore.open({"driver": "gcs", "bucket": self.workdir.parts[2],
                            "path": "/".join(self.workdir.parts[3:]) + "/"}).result()

  def _lease(self) -> bytes:
    info = _holder_info(self.what)
    info["expires"] = time.time() + self.ttl_s
    return json.dumps(info).encode()

  def _acquire_lease(self):
    self._kv = self._kvstore()
    current = self._kv.read(LOCK_FILE).result()
    if current.state == "value":
      try:
        info = json.loads(current.value)
      except ValueError:
        info = {}
      if float(info.get("expires", 0)) > time.time():
        raise WorkdirBusyError(f"{self.workdir} is in use by {_describe(info)}: wait for it to finish or stop it "
                               f"(lease {self.path}, renewed every {self.heartbeat_s:.0f} s, expires "
                               f"{self.ttl_s:.0f} s after its holder stops)")
      log.warning("taking over the expired lease %s of %s", self.path, _describe(info))
    # `current.stamp.generation` is "absent" or the expired lease's generation: the write succeeds only if
    # nobody wrote the lease since we read it.
    stamp = self._kv.write(LOCK_FILE, self._lease(), if_equal=current.stamp.generation).result()
    if not stamp.generation:
      info = self._read_info()
      raise WorkdirBusyError(f"{self.workdir} is in use by {_describe(info)} (it took lease {self.path} just now)")
    self._generation = stamp.generation
    self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="workdir-lease")
    self._thread.start()

  def _read_info(self) -> dict:
    try:
      return json.loads(self._kv.read(LOCK_FILE).result().value or b"{}")
    except ValueError:
      return {}

  def _heartbeat(self):
    while not self._stop.wait(self.heartbeat_s):
      try:
        stamp = self._kv.write(LOCK_FILE, self._lease(), if_equal=self._generation).result()
      except Exception as e:  # pylint: disable=broad-except
        log.warning("could not renew lease %s (%s); retrying in %.0f s", self.path, e, self.heartbeat_s)
        continue
      if not stamp.generation:
        log.error("lease %s was taken over by %s: another run now writes this workdir", self.path,
                  _describe(self._read_info()))
        return
      self._generation = stamp.generation

  def _release(self):
    if self._fd is not None:
      if self._created and set(os.listdir(self.workdir)) == {LOCK_FILE}:
        os.unlink(self.path)  # this lock made the folder and nothing else was written: leave none
        os.rmdir(self.workdir)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
    if self._kv is not None:
      self._stop.set()
      if self._thread is not None:
        self._thread.join()
      try:
        self._kv.write(LOCK_FILE, None, if_equal=self._generation).result()
      except Exception as e:  # pylint: disable=broad-except
        log.warning("could not delete lease %s (%s); it expires by itself", self.path, e)
      self._kv = None
