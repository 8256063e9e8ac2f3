"""One writer per workdir: a run holds `WORKDIR/qnet.lock` while it runs.

Two runs on one workdir (a requeued job whose old instance still lives, a typo'd launch)
would interleave checkpoints and metrics. So a run takes the lock before it writes
anything, and a second run stops at once with `WorkdirBusyError` naming the holder.

- POSIX file systems (local disks, NFS, Lustre): `fcntl.flock` on the lock file. The OS
  drops the lock when the holder dies, however it dies, so a lock of a dead process never
  blocks; its leftover file (host, pid, since) is reported in a log line and taken over.
  On NFS, Linux implements `flock` with NFS byte-range locks, which work across hosts.
- Object stores (`gs://`, `s3://`, ... and FUSE mounts of them such as gcsfuse, where
  `flock` is only local to one machine): no lock primitive exists, so the holder keeps a
  lease file whose heartbeat it renews every `lease_s / 4` seconds; a lease older than
  `lease_s` is a dead holder's and is taken over. Without a conditional write, two runs
  starting within the same second can both win (each re-reads its lease after writing,
  which narrows that window but cannot close it); a lost lease is logged as an error.

On a multi-host job only the chief (process 0) takes the lock, for the whole job.
Nested `hold` calls on the same workdir within one process are no-ops (reentrant).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
import threading
import time
from typing import Iterator

from absl import logging

LOCK_FILE = "qnet.lock"
DEFAULT_LEASE_S = 60.0
_OBJECT_STORE_FS = ("fuse.gcsfuse", "fuse.s3fs", "fuse.goofys", "fuse.rclone", "fuse.mountpoint-s3")


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir."""


@dataclasses.dataclass
class Held:
  """A held lock: `kind` is 'flock' or 'lease'."""

  kind: str
  path: str
  depth: int = 1
  fd: int | None = None
  stop: threading.Event | None = None
  thread: threading.Thread | None = None


_HELD: dict[str, Held] = {}
_GUARD = threading.Lock()


def _key(workdir: str) -> str:
  return workdir if "://" in workdir else os.path.realpath(workdir)


def _lock_path(workdir: str) -> str:
  return workdir.rstrip("/") + "/" + LOCK_FILE


def _me() -> dict:
  now = time.time()
  return {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "since": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(
      timespec="seconds"
    ),
    "heartbeat": now,
  }


def describe(holder: dict) -> str:
  return f"host {holder.get('host')} pid {holder.get('pid')} since {holder.get('since')}"


def read_holder(workdir: str) -> dict | None:
  """The lock file's holder record, or None if there is none (or it is unreadable)."""
  try:
    text = _read(_lock_path(workdir))
    return json.loads(text) if text.strip() else None
  except (OSError, ValueError):
    return None


def _read(path: str) -> str:
  if "://" in path:
    import tensorflow as tf  # gfile speaks gs://, s3:// (through TF's file systems)

    return tf.io.gfile.GFile(path, "r").read()
  with open(path) as f:
    return f.read()


def _write(path: str, text: str) -> None:
  if "://" in path:
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "w") as f:
      f.write(text)
    return
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _remove(path: str) -> None:
  if "://" in path:
    import tensorflow as tf

    tf.io.gfile.remove(path)
  else:
    os.remove(path)


def needs_lease(workdir: str) -> bool:
  """Whether `workdir` is on an object store (a URL or a FUSE mount of one)."""
  if "://" in workdir:
    return True
  path, best, fstype = os.path.realpath(workdir), "", ""
  try:
    with open("/proc/mounts") as f:
      for line in f:
        parts = line.split()
        mount = parts[1]
        if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
          best, fstype = mount, parts[2]
  except OSError:
    return False
  return fstype in _OBJECT_STORE_FS


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True, lease_s: float | None = None) -> Iterator[Held | None]:
  """Holds the workdir's lock for the `with` block (creating the workdir if needed).

  Raises `WorkdirBusyError` (having written nothing) if another live run holds it.
  `enabled=False` (non-chief processes) holds nothing. `lease_s` forces a lease (the
  object-store mechanism) with that expiry; by default a lease is used only where
  `needs_lease(workdir)`.
  """
  if not enabled:
    yield None
    return
  key = _key(workdir)
  with _GUARD:
    held = _HELD.get(key)
    if held is not None:
      held.depth += 1
  if held is not None:
    try:
      yield held
    finally:
      held.depth -= 1
    return
  if lease_s is None and needs_lease(workdir):
    lease_s = DEFAULT_LEASE_S
  held = _take_lease(workdir, lease_s) if lease_s else _take_flock(workdir)
  with _GUARD:
    _HELD[key] = held
  try:
    yield held
  finally:
    with _GUARD:
      del _HELD[key]
    _release(held)


def _take_flock(workdir: str) -> Held:
  path = _lock_path(workdir)
  if not os.path.isdir(workdir):
    os.makedirs(workdir, exist_ok=True)
  while True:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      holder = read_holder(workdir) or {}
      raise WorkdirBusyError(
        f"{workdir} is in use by another qnet run ({describe(holder)}); wait for it to end, "
        f"stop it, or use another --workdir"
      ) from None
    try:
      same = os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
      same = False
    if same:  # else the previous holder removed the file between our open and lock: retry
      break
    os.close(fd)
  previous = os.read(fd, 1 << 16).decode(errors="replace")
  if previous.strip():
    try:
      old = json.loads(previous)
    except ValueError:
      old = {}
    logging.warning(
      "taking over the workdir lock of %s, which is no longer running (it did not release it)",
      describe(old),
    )
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(_me()).encode(), 0)
  os.fsync(fd)
  return Held("flock", path, fd=fd)


def _take_lease(workdir: str, lease_s: float) -> Held:
  path = _lock_path(workdir)
  if "://" not in workdir:
    os.makedirs(workdir, exist_ok=True)
  old = read_holder(workdir)
  if old is not None:
    age = time.time() - float(old.get("heartbeat", 0))
    if age < lease_s:
      raise WorkdirBusyError(
        f"{workdir} is in use by another qnet run ({describe(old)}, lease renewed {age:.0f} s "
        f"ago); wait for it to end, stop it, or use another --workdir"
      )
    logging.warning(
      "taking over the workdir lease of %s, expired %.0f s ago", describe(old), age - lease_s
    )
  me = _me()
  _write(path, json.dumps(me))
  time.sleep(min(1.0, lease_s / 10))  # a concurrent taker's write lands in this window
  now = read_holder(workdir) or {}
  if (now.get("host"), now.get("pid"), now.get("since")) != (me["host"], me["pid"], me["since"]):
    raise WorkdirBusyError(f"{workdir} was taken at the same moment by {describe(now)}")
  stop = threading.Event()
  thread = threading.Thread(
    target=_heartbeat, args=(workdir, me, lease_s, stop), name="qnet-lease", daemon=True
  )
  thread.start()
  return Held("lease", path, stop=stop, thread=thread)


def _heartbeat(workdir: str, me: dict, lease_s: float, stop: threading.Event) -> None:
  while not stop.wait(lease_s / 4):
    now = read_holder(workdir) or {}
    if (now.get("pid"), now.get("host"), now.get("since")) != (me["pid"], me["host"], me["since"]):
      logging.error("workdir lease of %s lost to %s; stopped renewing it", workdir, describe(now))
      return
    me["heartbeat"] = time.time()
    try:
      _write(_lock_path(workdir), json.dumps(me))
    except OSError as e:  # transient store errors: the next beat retries
      logging.warning("could not renew the workdir lease: %s", e)


def _release(held: Held) -> None:
  """Removes the holder record (a clean end leaves no lock file), then unlocks."""
  if held.kind == "lease":
    held.stop.set()
    held.thread.join()
  try:
    _remove(held.path)
  except OSError:
    pass
  if held.fd is not None:
    os.close(held.fd)  # closing the descriptor drops the flock
