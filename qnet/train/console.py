"""What a training run prints: by default one line per log step and one per evaluation.

`configure(verbose=False)` (the CLI's default) keeps the console for qnet's own lines, without
absl's `I1129 06:33:52.745599 139963599920000 file.py:48]` prefixes, and drops the INFO lines
of libraries (TFDS readers, orbax, JAX's backend probing such as the libtpu notice) and the
native start-up lines TensorFlow writes to stderr when imported. Warnings and errors of every
library still show. `configure(verbose=True)` (`--verbose`) leaves absl's full console, and
`metrics_io.create_writer` then also echoes every metric and the hyperparameters (clu's
logging writer). The full record is in TensorBoard and `WORKDIR/metrics.jsonl` either way.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import sys
from typing import Iterator

from absl import logging

_QNET_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # the package root
_verbose = True  # Library use (tests, notebooks) keeps absl's defaults; the CLI configures.


def verbose() -> bool:
  """Whether library chatter is on (see `configure`)."""
  return _verbose


class _QnetLinesOnly(std_logging.Filter):
  """INFO lines of qnet's own modules; warnings and errors from anyone, except orbax's and
  asyncio's tracebacks of a full or read-only disk (a dozen per failed save), which qnet
  reports in one line (`qnet: storage error`)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if _storage_noise(record):
      return False
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(_QNET_DIR)


def _storage_noise(record: std_logging.LogRecord) -> bool:
  from qnet.train import faults

  library = "/orbax/" in record.pathname or record.name == "asyncio"
  if not library or record.levelno < std_logging.ERROR:
    return False
  text = record.getMessage() + (repr(record.exc_info[1]) if record.exc_info else "")
  return any(t in text for t in faults.STORAGE_ERRNOS.values())


class _Brief(std_logging.Formatter):
  """The message alone; `warning: ` / `error: ` in front of those."""

  def format(self, record: std_logging.LogRecord) -> str:
    message = record.getMessage()
    if record.levelno >= std_logging.WARNING:
      message = f"{record.levelname.lower()}: {message}"
    if record.exc_info:
      message += "\n" + self.formatException(record.exc_info)
    return message


def configure(verbose: bool) -> None:
  """Sets up the console of a run (call once, before training)."""
  global _verbose
  _verbose = verbose
  if verbose:
    return
  handler = logging.get_absl_handler()
  handler.setFormatter(_Brief())
  handler.addFilter(_QnetLinesOnly())
  with native_stderr_silenced():
    import tensorflow  # noqa: F401  (its C++ start-up lines, e.g. the oneDNN notice)
    import tensorflow_datasets  # noqa: F401


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
  """Sends file descriptor 2 to /dev/null, so lines written by C++ code go nowhere."""
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
