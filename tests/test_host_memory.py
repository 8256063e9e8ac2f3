"""qnet.platform.host_memory: glibc malloc settings that keep XLA:CPU's per-step buffers mapped.

Each case runs in a fresh Python: the settings only act before JAX starts its backends.
"""

import json
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

# A jit whose temporaries (two 64 MiB scatter outputs, above glibc's largest dynamic mmap
# threshold of 32 MiB) are freed after each call; page faults per call after warm-up, with or
# without `keep_freed_memory()` first. Strided scatters into copies of `x` make the same
# temporaries as the sorts this used to run, at a tenth of the time (a sort of 16M floats
# took seconds a call on the 2-core machine; the test took 114-180 s).
_FAULTS = """
import json, resource, sys
from qnet.platform import host_memory
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x: x.at[::7].add(1.0)[::1024] + x.at[::5].multiply(2.0)[::1024])
x = jnp.arange(1 << 24, dtype=jnp.float32)
for _ in range(10):  # the heap settles over the first calls (3 were sometimes too few)
  f(x).block_until_ready()
faults = []
for _ in range(9):
  r = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r)
print(json.dumps({"kept": kept, "faults": sorted(faults)[4]}))
"""


def _run(code: str, *args: str, **env: str) -> dict:
  full_env = {k: v for k, v in os.environ.items() if k != "QNET_CPU_MALLOC"}
  full_env.update({"PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **env})
  out = subprocess.run(
    [sys.executable, "-c", code, *args],
    env=full_env,
    cwd=ROOT,
    capture_output=True,
    text=True,
    check=True,
    timeout=300,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_keep_freed_memory_stops_the_per_call_page_faults():
  default = _run(_FAULTS, "default")
  kept = _run(_FAULTS, "keep")
  assert not default["kept"]
  if not GLIBC:  # macOS, musl: no glibc malloc to set, and keep_freed_memory says so
    assert kept["kept"] is False, kept
    return
  assert kept["kept"]
  # 2 x 64 MiB of temporaries: ~32k pages (measured 44k) faulted in again every call by default.
  assert default["faults"] > 10_000, default
  assert kept["faults"] < 100, kept


@pytest.mark.slow
def test_switches_and_accelerator_hosts():
  code = """
import json
from qnet.platform import host_memory
cpu_only = host_memory.cpu_only_host()
print(json.dumps({"cpu_only": cpu_only, "kept": host_memory.keep_freed_memory()}))
"""
  assert _run(code, QNET_CPU_MALLOC="0")["kept"] is False
  # An accelerator host (decided without starting a backend): nothing is changed.
  assert _run(code, JAX_PLATFORMS="cuda") == {"cpu_only": False, "kept": False}
  assert _run(code, JAX_PLATFORMS="cpu")["cpu_only"] is True
