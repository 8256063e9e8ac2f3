"""Compile time of qnet's init and train step under each JAX PRNG implementation, on CPU.

qnet makes every key with `qnet.train.joint.PRNG_IMPL` ("rbg": XLA's RngBitGenerator), chosen because
threefry keys made model initialisation slow to compile on jax 0.10.2. This re-measures it on the
running stack: for each model and each implementation, in alternating rounds (fresh jit objects
and `jax.clear_caches()` before each, no persistent cache), the wall time of lowering and
compiling the jitted `joint.init_state` and the train step (`build.compile_steps`, the
progressive+two-stage+stochastic schedule with distillation, so the step draws random masks),
and the median train-step time after compile. Prints a table and writes
experiments/results/prng_compile_cpu_jaxVERSION.json.

  PYTHONPATH=. python experiments/prng_compile.py [--models fmnist_cnn,resnet20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from benchmark import SHAPES, _batch, _config
from qnet.train import build, joint

IMPLS = ("rbg", "threefry2x32")


def _once(model: str, impl: str, mesh, steps: int) -> dict:
  """Compile seconds of init and train step, and median ms of `steps` train steps."""
  jax.clear_caches()
  joint.PRNG_IMPL = impl  # read by init_state and train_step when traced
  config = _config(model, 2, distill=True, kind="progressive+two_stage+stochastic")
  students, teacher = build.build_specs(config, 1000)
  sample = jnp.zeros((1, *SHAPES[model][1]))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  t = time.perf_counter()
  init = jax.jit(lambda: joint.init_state(students, teacher, 0, sample), out_shardings=replicated)
  init_c = init.lower().compile()
  init_s = time.perf_counter() - t
  state = init_c()
  p_train, _ = build.compile_steps(mesh, students, teacher, build.distill_spec(config))
  batch = _batch(config, mesh)
  t = time.perf_counter()
  step_c = p_train.lower(state, batch).compile()
  step_s = time.perf_counter() - t
  times = []
  for _ in range(steps + 1):  # the first step is a warm-up
    t = time.perf_counter()
    state, _ = step_c(state, batch)
    jax.block_until_ready(state)
    times.append(1e3 * (time.perf_counter() - t))
  step_ms = float(np.median(times[1:]))
  return {"init_compile_s": init_s, "step_compile_s": step_s, "step_ms": step_ms}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default="fmnist_cnn,resnet20")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=3, help="timed train steps per compile")
  p.add_argument("--out", default=None)
  args = p.parse_args()
  models = args.models.split(",")
  for m in models:
    if m not in SHAPES:
      p.error(f"--models: {m!r} not in {', '.join(SHAPES)}")
  load_start = _loadavg()
  out = args.out or os.path.join(
    os.path.dirname(os.path.abspath(__file__)),
    "results",
    f"prng_compile_cpu_jax{jax.__version__}.json",
  )
  stack = {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
  }
  print(f"{stack}, load average {load_start}", flush=True)
  mesh = build.create_mesh()
  runs = {m: {i: [] for i in IMPLS} for m in models}
  for r in range(args.rounds):
    for m in models:
      for impl in IMPLS:
        res = _once(m, impl, mesh, args.steps)
        runs[m][impl].append(res)
        print(
          f"round {r + 1} {m:10s} {impl:13s} init compile {res['init_compile_s']:5.2f} s  "
          f"step compile {res['step_compile_s']:5.2f} s  step {res['step_ms']:6.1f} ms",
          flush=True,
        )
        _write(out, stack, load_start, runs)  # each time: a cut-short run keeps what it measured
  print(f"\nmedians over {args.rounds} rounds (load average now {_loadavg()}):")
  for m, by_impl in _write(out, stack, load_start, runs)["medians"].items():
    for impl, med in by_impl.items():
      print(
        f"  {m:10s} {impl:13s} init compile {med['init_compile_s']:5.2f} s  "
        f"step compile {med['step_compile_s']:5.2f} s  step {med['step_ms']:6.1f} ms"
      )
  print(f"wrote {out}")


def _loadavg() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def _write(out: str, stack: dict, load_start: list[float], runs: dict) -> dict:
  medians = {
    m: {i: {k: float(np.median([x[k] for x in r])) for k in r[0]} for i, r in by.items() if r}
    for m, by in runs.items()
  }
  result = {
    "stack": stack,
    "loadavg_start": load_start,
    "loadavg_end": _loadavg(),
    "rounds": runs,
    "medians": medians,
  }
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
