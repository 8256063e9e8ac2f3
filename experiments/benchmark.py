"""Speed benchmark: one process, same batch, alternating rounds, median and spread.

  python experiments/benchmark.py                      # CPU: fmnist_cnn and resnet20
  python experiments/benchmark.py --models resnet50    # GPU: ImageNet-shaped ResNet-50 (bf16)

Times (ms/step; median over rounds x steps after warm-up, with min and max):
  * the FP and the W4A4 train step of the same model (ratio W4A4 / FP);
  * the joint distillation step (FP teacher + W4A4 student) against teacher step + student
    step run separately (ratio);
  * the eval step;
  * the input pipeline alone (images/s) against what the train step consumes;
  * the train-step compile count over a full progressive+two-stage+stochastic schedule run.
Steps are built by the same functions the trainer uses (`trainer.build_specs`,
`trainer.compile_steps`). Prints a table and writes experiments/results/benchmark_BACKEND.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from configs import default
from qnet import train, trainer

SHAPES = {  # model -> (dataset for the config, input shape, classes, batch)
  "fmnist_cnn": ("fashion_mnist", (28, 28, 1), 10, 128),
  "resnet20": ("cifar10", (32, 32, 3), 10, 128),
  "resnet50": ("imagenet2012", (224, 224, 3), 1000, 128),
}


def _config(model: str, bits: int, distill: bool = False, kind: str = "direct", dtype="float32"):
  dataset, shape, _, batch = SHAPES[model]
  c = default.get_config()
  c.dataset, c.model, c.batch_size, c.dtype = dataset, model, batch, dtype
  c.image_size = shape[0] if dataset == "imagenet2012" else 0
  c.quant.weight_bits = c.quant.act_bits = bits
  c.schedule.kind = kind
  c.distill.enabled = distill
  return c


def _steps(config, total_steps: int, mesh):
  students, teacher = trainer.build_specs(config, total_steps)
  shape = SHAPES[config.model][1]
  state = jax.jit(
    lambda: train.init_state(students, teacher, 0, jnp.zeros((1, *shape))),
    out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
  )()
  p_train, p_eval = trainer.compile_steps(mesh, students, teacher, trainer.distill_spec(config))
  return state, p_train, p_eval


def _batch(model: str, mesh, with_mask=False):
  _, shape, classes, batch = SHAPES[model]
  rng = np.random.default_rng(0)
  b = {
    "image": rng.normal(size=(batch, *shape)).astype(np.float32),
    "label": rng.integers(0, classes, batch).astype(np.int32),
  }
  if with_mask:
    b["mask"] = np.ones(batch, np.float32)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  return {k: jax.device_put(v, sharding) for k, v in b.items()}


class Timer:
  """Runs named step closures in alternating rounds; keeps per-step wall times."""

  def __init__(self):
    self.fns, self.times = {}, {}

  def add(self, name, fn):
    self.fns[name], self.times[name] = fn, []

  def run(self, rounds: int, steps: int, warmup: int):
    for fn in self.fns.values():
      for _ in range(warmup):
        fn()
    for _ in range(rounds):
      for name, fn in self.fns.items():
        for _ in range(steps):
          t = time.perf_counter()
          fn()
          self.times[name].append(1e3 * (time.perf_counter() - t))

  def stats(self, name):
    t = np.array(self.times[name])
    return {
      "median_ms": float(np.median(t)),
      "min_ms": float(t.min()),
      "max_ms": float(t.max()),
      "n": int(t.size),
    }


def _train_closure(state, p_train, batch):
  box = [state]

  def fn():
    box[0], m = p_train(box[0], batch)
    jax.block_until_ready(box[0])

  return fn


def bench_model(model: str, mesh, rounds: int, steps: int, warmup: int, dtype: str) -> dict:
  batch = _batch(model, mesh)
  timer = Timer()
  specs = {
    "fp": _config(model, 32, dtype=dtype),
    "w4a4": _config(model, 4, dtype=dtype),
    "joint_distill_w4a4": _config(model, 4, distill=True, dtype=dtype),
  }
  evals = {}
  for name, cfg in specs.items():
    state, p_train, p_eval = _steps(cfg, 1000, mesh)
    evals[name] = (jax.tree.map(jnp.copy, state), p_eval)  # the train closure donates `state`
    timer.add(name, _train_closure(state, p_train, batch))
  state, p_eval = evals["w4a4"]
  eval_batch = _batch(model, mesh, with_mask=True)
  timer.add("eval_w4a4", lambda: jax.block_until_ready(p_eval(state, eval_batch)))
  timer.run(rounds, steps, warmup)
  out = {k: timer.stats(k) for k in timer.fns}
  fp, q, joint = (out[k]["median_ms"] for k in ("fp", "w4a4", "joint_distill_w4a4"))
  out["ratio_w4a4_over_fp"] = q / fp
  # teacher step = the FP step, student step = the W4A4 step (same model, same batch).
  out["ratio_joint_over_teacher_plus_student"] = joint / (fp + q)
  out["images_per_s_w4a4_train"] = SHAPES[model][3] / (q / 1e3)
  return out


def bench_pipeline(dataset: str, batch: int, n: int = 200) -> float:
  """Images/s of the training iterator alone (after its first batch)."""
  from qnet import input_pipeline

  it = input_pipeline.create_train_iterator(dataset, global_batch_size=batch, seed=0)
  next(it)
  t = time.perf_counter()
  for _ in range(n):
    next(it)
  return batch * n / (time.perf_counter() - t)


def compile_count(mesh, steps: int = 12) -> int:
  """Train-step compilations over a run that passes every phase of PQ+TS+SP with KD."""
  c = _config("fmnist_cnn", 2, distill=True, kind="progressive+two_stage+stochastic")
  state, p_train, _ = _steps(c, steps, mesh)
  batch = _batch("fmnist_cnn", mesh)
  for _ in range(steps):
    state, _ = p_train(state, batch)
  jax.block_until_ready(state)
  return p_train._cache_size()


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  backend = jax.default_backend()
  p.add_argument("--models", default="fmnist_cnn,resnet20" if backend == "cpu" else "resnet50")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--dtype", default="float32" if backend == "cpu" else "bfloat16")
  p.add_argument("--skip_pipeline", action="store_true")
  p.add_argument("--out", default=None)
  args = p.parse_args()
  mesh = trainer.create_mesh()
  result = {
    "backend": backend,
    "devices": [str(d) for d in jax.devices()],
    "device_kind": jax.devices()[0].device_kind,
    "dtype": args.dtype,
    "jax": jax.__version__,
    "models": {},
  }
  for model in args.models.split(","):
    print(f"timing {model} ...", flush=True)
    result["models"][model] = bench_model(
      model, mesh, args.rounds, args.steps, args.warmup, args.dtype
    )
  if not args.skip_pipeline:
    result["pipeline_fashion_mnist_images_per_s"] = bench_pipeline("fashion_mnist", 128)
  result["train_step_compiles_full_schedule"] = compile_count(mesh)
  print(f"\nbackend {backend} ({result['device_kind']}), dtype {args.dtype}, jax {jax.__version__}")
  print("| model | step | median ms | min | max |\n|---|---|---|---|---|")
  for model, r in result["models"].items():
    for k in ("fp", "w4a4", "joint_distill_w4a4", "eval_w4a4"):
      print(
        f"| {model} | {k} | {r[k]['median_ms']:.1f} | {r[k]['min_ms']:.1f} | {r[k]['max_ms']:.1f} |"
      )
  for model, r in result["models"].items():
    print(
      f"{model}: W4A4/FP {r['ratio_w4a4_over_fp']:.3f}; joint/(teacher+student) "
      f"{r['ratio_joint_over_teacher_plus_student']:.3f}; W4A4 train {r['images_per_s_w4a4_train']:.0f} img/s"
    )
  if "pipeline_fashion_mnist_images_per_s" in result:
    print(
      f"input pipeline (fashion_mnist, batch 128): {result['pipeline_fashion_mnist_images_per_s']:.0f} img/s"
    )
  print(
    f"train-step compiles over a full PQ+TS+SP+KD schedule run: {result['train_step_compiles_full_schedule']}"
  )
  out = args.out or os.path.join(os.path.dirname(__file__), "results", f"benchmark_{backend}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
