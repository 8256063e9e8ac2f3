"""Faults of the machine rather than the run, each turned into one clear error.

`guarded` wraps the training loop: it holds the workdir lock (`workdir_lock`) for the run
and translates what a cluster throws at it:

- `StorageError`: a checkpoint or metrics write failed for lack of space, quota or
  permission (ENOSPC, EDQUOT, EACCES, EPERM, EROFS), however deeply orbax, TensorStore or
  TensorFlow wrapped it. Checkpoints are written to a temporary name and renamed when
  complete, so the last complete one is intact and the same command resumes from it.
- `PeerLostError`: in a multi-process run a collective failed because another process
  died (gloo: connection reset or closed by the peer). The survivors exit at once instead
  of waiting in `jax.distributed`'s shutdown barrier; a process that is not in a
  collective when its peer dies is stopped by the coordination service when heartbeats
  stop (`QNET_HEARTBEAT_TIMEOUT_S`, see `qnet.main`).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import os
from typing import Any, Callable, Iterator

from qnet.platform import workdir_lock
from qnet.data.datasets import DataError

STORAGE_ERRNOS = {
  errno.ENOSPC: "No space left on device",
  errno.EDQUOT: "Disk quota exceeded",
  errno.EACCES: "Permission denied",
  errno.EPERM: "Operation not permitted",
  errno.EROFS: "Read-only file system",
}
_PEER_SIGNS = (
  "Gloo",
  "Connection reset by peer",
  "Connection closed by peer",
  "stopped sending heartbeats",
  "leader task was preempted/died",
)


class StorageError(RuntimeError):
  """A write to the workdir failed for lack of space or permission."""


class PeerLostError(RuntimeError):
  """Another process of a multi-process run died."""


def _chain(exc: BaseException):
  seen: set[int] = set()
  todo = [exc]
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    todo += [e.__cause__, e.__context__, *getattr(e, "exceptions", ())]


def storage_cause(exc: BaseException, workdir: str | None = None) -> BaseException | None:
  """The exception in `exc`'s chain that says a write under `workdir` failed for lack of
  space or permission (any path if `workdir` is None), if any. A failure naming another
  path (a data set, `init_from`) is not one."""
  roots = {os.path.abspath(workdir), os.path.realpath(workdir)} if workdir else set()

  def ours(path: str) -> bool:
    path = os.path.abspath(path)
    return not roots or any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

  for e in _chain(exc):
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
      if not e.filename or ours(str(e.filename)):
        return e
    elif any(text in str(e) for text in STORAGE_ERRNOS.values()):
      if not roots or any(root in str(e) for root in roots):
        return e
  return None


def peer_cause(exc: BaseException) -> BaseException | None:
  """The exception in `exc`'s chain that says another process died, if any."""
  for e in _chain(exc):
    if type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and any(
      s in str(e) for s in _PEER_SIGNS
    ):
      return e
  return None


def _first_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
    text = f"{e.strerror or STORAGE_ERRNOS[e.errno]}" + (f": {e.filename}" if e.filename else "")
  return (text or type(e).__name__)[:400]


def _latest_checkpoint(workdir: str) -> str:
  from qnet.train import checkpointing  # pylint: disable=import-outside-toplevel

  try:
    step = checkpointing.create_manager(workdir).latest_step()
  except Exception:  # noqa: BLE001 - only decorates the message
    return "the last complete checkpoint"
  return "no checkpoint yet" if step is None else f"the last complete checkpoint (step {step})"


def translate(exc: BaseException, workdir: str) -> BaseException | None:
  """The one-line error `exc` stands for, or None if it is none of these faults."""
  cause = storage_cause(exc, workdir)
  if cause is not None:
    return StorageError(
      f"cannot write to {os.path.abspath(workdir)}: {_first_line(cause)}; "
      f"{_latest_checkpoint(workdir)} is intact: free space (or fix permissions) and run the "
      f"same command again to resume"
    )
  import jax  # pylint: disable=import-outside-toplevel

  if jax.process_count() > 1:
    cause = peer_cause(exc)
    if cause is not None:
      return PeerLostError(
        f"process {jax.process_index()}/{jax.process_count()}: another process died "
        f"({_first_line(cause)[:200]}); relaunch all processes to resume from the last "
        f"complete checkpoint"  # (not looked up: orbax would wait for the dead peer)
      )
  return None


@contextlib.contextmanager
def guard(workdir: str, is_chief: bool) -> Iterator[None]:
  """The chief holds the workdir lock for the block; storage and lost-peer failures in it
  (the lock's own write included) come out as `StorageError` / `PeerLostError`."""
  try:
    with workdir_lock.hold(workdir, enabled=is_chief):
      yield
  except (StorageError, PeerLostError, workdir_lock.WorkdirBusyError, DataError):
    raise  # already one clear line
  except Exception as e:  # noqa: BLE001 - translated or re-raised unchanged
    one_line = translate(e, workdir)
    if one_line is None:
      raise
    raise one_line from e


def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`fn(config, workdir, ...)` run under `guard(workdir, chief)`."""
  signature = inspect.signature(fn)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    import jax  # pylint: disable=import-outside-toplevel

    workdir = str(signature.bind(*args, **kwargs).arguments["workdir"])
    with guard(workdir, jax.process_index() == 0):
      return fn(*args, **kwargs)

  return wrapper
