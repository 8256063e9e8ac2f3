"""qnet.host_memory: glibc malloc settings that keep XLA:CPU's per-step buffers mapped.

Each case runs in a fresh Python: the settings only act before JAX starts its backends.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jit whose temporaries (a 64 MiB sort buffer) are freed after each call; page faults per
# call after warm-up, with or without `keep_freed_memory()` first.
_FAULTS = """
import json, resource, sys
from qnet import host_memory
kept = host_memory.keep_freed_memory() if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sort(x * 2.0)[::1024] + jnp.sort(x[::-1])[::1024])
x = jnp.arange(1 << 24, dtype=jnp.float32)
for _ in range(3):
  f(x).block_until_ready()
faults = []
for _ in range(5):
  r = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r)
print(json.dumps({"kept": kept, "faults": sorted(faults)[2]}))
"""


def _run(code: str, *args: str, **env: str) -> dict:
  full_env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **env}
  full_env.pop("QNET_CPU_MALLOC", None)
  full_env.update(env)
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings: Linux")
def test_keep_freed_memory_stops_the_per_call_page_faults():
  default = _run(_FAULTS, "default")
  kept = _run(_FAULTS, "keep")
  assert not default["kept"] and kept["kept"]
  # 2 x 64 MiB of temporaries: ~32k pages faulted in again on every call by default.
  assert default["faults"] > 10_000, default
  assert kept["faults"] < 100, kept


def test_switches_and_accelerator_hosts():
  code = """
import json
from qnet import host_memory
cpu_only = host_memory.cpu_only_host()
print(json.dumps({"cpu_only": cpu_only, "kept": host_memory.keep_freed_memory()}))
"""
  assert _run(code, QNET_CPU_MALLOC="0")["kept"] is False
  # An accelerator host (decided without starting a backend): nothing is changed.
  assert _run(code, JAX_PLATFORMS="cuda") == {"cpu_only": False, "kept": False}
  assert _run(code, JAX_PLATFORMS="cpu")["cpu_only"] is True
