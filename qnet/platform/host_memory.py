"""Keep freed host memory mapped, so XLA:CPU does not fault its buffers in again every step.

XLA's CPU runtime mallocs each execution's temporary buffer (the ResNet-20 W4A4 train step,
batch 128: one 294 MB block) and frees it when the step ends. glibc serves a block that large
with mmap (from a worker thread's arena it has no other way) and frees it with munmap, so
every step faults in and zeroes every page again: 72k page faults a step. `keep_freed_memory`
sets glibc's malloc so that every thread allocates from the main heap (`M_ARENA_MAX=1`),
large blocks included (`M_MMAP_MAX=0`), and freed memory stays with the process
(`M_TRIM_THRESHOLD` at its maximum). After the first steps no page faults remain, and on the
2-vCPU VM of experiments/README.md ("Host memory") the ResNet-20 W4A4 step went from ~330 to
~265 ms (jaxlib 0.12).

The cost: the process keeps its peak heap (the step's temporaries) between steps instead of
returning it, and all threads share one malloc arena. It must run before JAX starts its
backends (the first `jax.devices()` or computation): a thread that already has its own arena
keeps it. It acts on CPU-only hosts only (`cpu_only_host`), where these buffers are the
step's. `qnet.main` calls it first thing; library users can too. QNET_CPU_MALLOC=0 turns it
off. glibc (Linux) only: elsewhere it does nothing and returns False.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
_INT_MAX = 2**31 - 1
_OFF = ("0", "false", "no", "off")
_SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, _INT_MAX))
# The same settings as environment variables, for a process started with them (glibc reads
# them at start-up): e.g. to give a peer framework the same malloc in a benchmark.
GLIBC_ENV = {
  "MALLOC_ARENA_MAX": "1",
  "MALLOC_MMAP_MAX_": "0",
  "MALLOC_TRIM_THRESHOLD_": str(_INT_MAX),
}


def cpu_only_host() -> bool:
  """Whether JAX will run on CPU only: JAX_PLATFORMS says cpu, or no accelerator is installed.

  Decided without starting JAX's backends (that must come after `keep_freed_memory`): an
  installed PJRT plugin (`jax_plugins` entry points, e.g. CUDA) or libtpu means an
  accelerator host.
  """
  import jax

  platforms = (jax.config.jax_platforms or "").strip().lower()
  if platforms:
    return platforms.split(",") == ["cpu"]
  if importlib.metadata.entry_points(group="jax_plugins"):
    return False
  return importlib.util.find_spec("libtpu") is None


def keep_freed_memory() -> bool:
  """On a CPU-only host, set glibc malloc to keep freed memory mapped (module docstring).

  True if it was set; False when QNET_CPU_MALLOC=0, on an accelerator host (`cpu_only_host`),
  off Linux, or when the C library has no glibc `mallopt`.
  """
  if os.environ.get("QNET_CPU_MALLOC", "1").strip().lower() in _OFF:
    return False
  if not sys.platform.startswith("linux") or not cpu_only_host():
    return False
  libc = ctypes.CDLL(None)
  if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: other malloc, other knobs
    return False
  mallopt = libc.mallopt
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  # mallopt returns 1 on success; all three are needed for the effect.
  return all(mallopt(param, value) == 1 for param, value in _SETTINGS)
