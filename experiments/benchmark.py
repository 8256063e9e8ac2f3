"""Speed benchmark: one process, same batch, alternating rounds, median and spread.

  python experiments/benchmark.py                      # CPU: fmnist_cnn and resnet20
  python experiments/benchmark.py --models resnet50    # GPU: ImageNet-shaped ResNet-50 (bf16)
  python experiments/benchmark.py --recipe imagenet_resnet18_w4a4_kd   # a paper recipe's step

Times (ms/step; median over rounds x steps after warm-up, with min and max):
  * the W4A4 train step against the plain FP network's (ReLU, no quantizer op compiled in):
    the fake-quant overhead, ratio W4A4 / FP; and against the same network with 32 bits in
    the precision pytree (the paper's clip-ReLU FP reference, the same compiled graph);
  * the joint distillation step (FP teacher + W4A4 student) against teacher step + student
    step run separately (ratio);
  * the eval step;
  * the input pipeline alone (images/s) against what the train step consumes;
  * the train-step compile count over a full progressive+two-stage+stochastic schedule run.
`--recipe VARIANT` times a `configs/paper_recipes.py` variant's own config instead (its model,
image size, dtype and distillation settings; synthetic batches at its input shape): the recipe's
step, its student alone (distillation off) and its teacher alone (the same network at 32 bits
with the teacher's activation), and the eval step.
Steps are built by the same functions the training loop uses (`build.build_specs`,
`build.compile_steps`). Prints a table and writes experiments/results/benchmark_BACKEND.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from configs import default
from qnet.data.datasets import DATASETS
from qnet.train import build, joint
from qnet.platform import host_memory

SHAPES = {  # model -> (dataset for the config, input shape, classes)
  "fmnist_cnn": ("fashion_mnist", (28, 28, 1), 10),
  "resnet20": ("cifar10", (32, 32, 3), 10),
  "resnet50": ("imagenet2012", (224, 224, 3), 1000),
}
BATCH = 128


def _config(
  model: str,
  bits: int,
  distill: bool = False,
  kind: str = "direct",
  dtype: str = "float32",
  act: str = "quant",
  batch: int = BATCH,
):
  dataset, shape, _ = SHAPES[model]
  c = default.get_config()
  c.dataset, c.model, c.batch_size, c.dtype, c.model_act = dataset, model, batch, dtype, act
  c.image_size = shape[0] if dataset == "imagenet2012" else 0
  c.quant.weight_bits = c.quant.act_bits = bits
  c.schedule.kind = kind
  c.distill.enabled = distill
  return c


def _steps(config, total_steps: int, mesh):
  students, teacher = build.build_specs(config, total_steps)
  state = jax.jit(
    lambda: joint.init_state(students, teacher, 0, jnp.zeros((1, *build.input_shape(config)))),
    out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()),
  )()
  p_train, p_eval = build.compile_steps(mesh, students, teacher, build.distill_spec(config))
  return state, p_train, p_eval


def _batch(config, mesh, with_mask=False):
  """A synthetic batch of the config's input shape, classes and global batch size."""
  batch, classes = config.batch_size, DATASETS[config.dataset].num_classes
  shape = build.input_shape(config)
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
    self.fns, self.times, self.cpu, self.faults, self.steps = {}, {}, {}, {}, 1

  def add(self, name, fn):
    self.fns[name], self.times[name], self.cpu[name], self.faults[name] = fn, [], [], []

  def run(self, rounds: int, steps: int, warmup: int):
    for fn in self.fns.values():
      for _ in range(warmup):
        fn()
    self.steps = steps
    for _ in range(rounds):
      for name, fn in self.fns.items():
        for _ in range(steps):
          f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
          t, c = time.perf_counter(), time.process_time()
          fn()
          self.times[name].append(1e3 * (time.perf_counter() - t))
          self.cpu[name].append(1e3 * (time.process_time() - c))
          self.faults[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)

  def stats(self, name):
    t = np.array(self.times[name])
    return {
      "median_ms": float(np.median(t)),
      "min_ms": float(t.min()),
      "max_ms": float(t.max()),
      "n": int(t.size),
      # One median per alternating round: a difference is real only if it holds in each.
      "round_medians_ms": [float(np.median(r)) for r in t.reshape(-1, self.steps)],
      # CPU time of this process (all threads) per step: less swayed by other processes
      # on a shared machine than wall time, though spinning worker threads count in it.
      "median_cpu_ms": float(np.median(self.cpu[name])),
      # Page faults per step: memory the step maps afresh (experiments/README, "Host memory").
      "median_page_faults": float(np.median(self.faults[name])),
    }


def _train_closure(state, p_train, batch):
  box = [state]

  def fn():
    box[0], m = p_train(box[0], batch)
    jax.block_until_ready(box[0])

  return fn


# name -> (bits, distill, model_act). `fp_plain` is the plain FP network (ReLU, raw kernels,
# no quantizer op compiled in): the reference for the fake-quant overhead. `fp32_as_data` is
# the quantized network with every bit-width 32 in the precision pytree, i.e. the paper's FP
# reference (clip-ReLU), the same compiled graph as W4A4; the teacher step alone.
VARIANTS = {
  "fp_plain": (32, False, "relu"),
  "fp32_as_data": (32, False, "quant"),
  "w4a4": (4, False, "quant"),
  "joint_distill_w4a4": (4, True, "quant"),
}


def bench_model(
  model: str,
  mesh,
  rounds: int,
  steps: int,
  warmup: int,
  dtype: str,
  variants: list[str],
  batch_size: int = BATCH,
) -> dict:
  batch = _batch(_config(model, 32, batch=batch_size), mesh)
  timer = Timer()
  evals = {}
  for name in variants:
    bits, distill, act = VARIANTS[name]
    state, p_train, p_eval = _steps(
      _config(model, bits, distill, dtype=dtype, act=act, batch=batch_size), 1000, mesh
    )
    evals[name] = (jax.tree.map(jnp.copy, state), p_eval)  # the train closure donates `state`
    timer.add(name, _train_closure(state, p_train, batch))
  if "w4a4" in evals:
    state, p_eval = evals["w4a4"]
    eval_batch = _batch(_config(model, 32, batch=batch_size), mesh, with_mask=True)
    timer.add("eval_w4a4", lambda: jax.block_until_ready(p_eval(state, eval_batch)))
  timer.run(rounds, steps, warmup)
  out = {k: timer.stats(k) for k in timer.fns}
  med = {k: v["median_ms"] for k, v in out.items()}
  if {"w4a4", "fp_plain"} <= med.keys():
    out["ratio_w4a4_over_fp_plain"] = med["w4a4"] / med["fp_plain"]
  if {"w4a4", "fp32_as_data"} <= med.keys():
    out["ratio_w4a4_over_fp32_as_data"] = med["w4a4"] / med["fp32_as_data"]
  if {"joint_distill_w4a4", "w4a4", "fp32_as_data"} <= med.keys():
    # Teacher step = the 32-bit step of the same network, student step = the W4A4 step.
    out["ratio_joint_over_teacher_plus_student"] = med["joint_distill_w4a4"] / (
      med["fp32_as_data"] + med["w4a4"]
    )
  for k in VARIANTS:
    if k in med:
      out[f"images_per_s_{k}"] = batch_size / (med[k] / 1e3)
  return out


def _recipe_configs(recipe: str, dtype: str | None, batch: int | None) -> dict:
  """The recipe's config and its two halves, each as one network would train alone."""
  from configs import paper_recipes  # pylint: disable=import-outside-toplevel

  c = paper_recipes.get_config(recipe)
  if dtype:
    c.dtype = dtype
  if batch:
    c.batch_size = batch
  student = c.copy_and_resolve_references()
  student.distill.enabled = False
  teacher = c.copy_and_resolve_references()
  teacher.distill.enabled = False
  teacher.quant.weight_bits = teacher.quant.act_bits = 32
  if c.distill.teacher_act == "relu":
    teacher.model_act = "relu"  # the plain FP network, as the joint step's teacher
  return {"recipe": c, "recipe_student": student, "recipe_teacher": teacher}


def bench_recipe(recipe: str, mesh, rounds: int, steps: int, warmup: int, dtype, batch) -> dict:
  """Median step times of a paper recipe's joint step against its student and teacher alone."""
  configs = _recipe_configs(recipe, dtype, batch)
  c = configs["recipe"]
  timer = Timer()
  for name, config in configs.items():
    state, p_train, p_eval = _steps(config, 1000, mesh)
    if name == "recipe":
      eval_state = jax.tree.map(jnp.copy, state)  # the train closure donates `state`
    timer.add(name, _train_closure(state, p_train, _batch(config, mesh)))
  eval_batch = _batch(c, mesh, with_mask=True)
  timer.add("recipe_eval", lambda: jax.block_until_ready(p_eval(eval_state, eval_batch)))
  timer.run(rounds, steps, warmup)
  out = {k: timer.stats(k) for k in timer.fns}
  med = {k: v["median_ms"] for k, v in out.items()}
  out["ratio_recipe_over_teacher_plus_student"] = med["recipe"] / (
    med["recipe_teacher"] + med["recipe_student"]
  )
  for k, ms in med.items():
    out[f"images_per_s_{k}"] = c.batch_size / (ms / 1e3)
  out["config"] = {
    "model": c.model,
    "input_shape": list(build.input_shape(c)),
    "batch": c.batch_size,
    "dtype": c.dtype,
    "bits": [c.quant.weight_bits, c.quant.act_bits],
    "distill": c.distill.to_dict(),
  }
  return out


def bench_pipeline(dataset: str, batch: int, n: int = 200) -> float:
  """Images/s of the training iterator alone (after its first batch)."""
  from qnet.data import input_pipeline

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
  batch = _batch(c, mesh)
  for _ in range(steps):
    state, _ = p_train(state, batch)
  jax.block_until_ready(state)
  return p_train._cache_size()


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  kept = host_memory.keep_freed_memory()  # as `qnet.main` does, before JAX's backends start
  backend = jax.default_backend()
  p.add_argument("--models", default="fmnist_cnn,resnet20" if backend == "cpu" else "resnet50")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--dtype", default=None, help="default: float32 on CPU, else bfloat16")
  p.add_argument("--variants", default=",".join(VARIANTS), help="subset of " + ",".join(VARIANTS))
  p.add_argument("--skip_pipeline", action="store_true")
  p.add_argument("--skip_compile_count", action="store_true")
  p.add_argument("--batch", type=int, default=None, help=f"global batch (default {BATCH})")
  p.add_argument("--out", default=None)
  p.add_argument(
    "--recipe", default=None, help="a configs/paper_recipes.py variant instead of --models"
  )
  args = p.parse_args()
  dtype = args.dtype or ("float32" if backend == "cpu" else "bfloat16")
  batch = args.batch or BATCH
  mesh = build.create_mesh()
  result = {
    "backend": backend,
    "devices": [str(d) for d in jax.devices()],
    "device_kind": jax.devices()[0].device_kind,
    "dtype": dtype,
    "batch": batch,
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "python": platform.python_version(),
    "keep_freed_memory": kept,
    "models": {},
  }
  if args.recipe:
    print(f"timing {args.recipe} ...", flush=True)
    # The recipe's own dtype and batch unless given.
    r = bench_recipe(
      args.recipe, mesh, args.rounds, args.steps, args.warmup, args.dtype, args.batch
    )
    result["recipes"] = {args.recipe: r}
    print(f"\n{args.recipe} on {backend} ({result['device_kind']}), {r['config']}")
    print("| step | median ms | min | max | images/s |\n|---|---|---|---|---|")
    for k in ("recipe", "recipe_student", "recipe_teacher", "recipe_eval"):
      print(
        f"| {k} | {r[k]['median_ms']:.1f} | {r[k]['min_ms']:.1f} | {r[k]['max_ms']:.1f} "
        f"| {r[f'images_per_s_{k}']:.0f} |"
      )
    print(f"joint / (teacher + student): {r['ratio_recipe_over_teacher_plus_student']:.3f}")
  for model in [] if args.recipe else args.models.split(","):
    print(f"timing {model} ...", flush=True)
    result["models"][model] = bench_model(
      model,
      mesh,
      args.rounds,
      args.steps,
      args.warmup,
      dtype,
      args.variants.split(","),
      batch,
    )
  if not args.skip_pipeline:
    result["pipeline_fashion_mnist_images_per_s"] = bench_pipeline("fashion_mnist", 128)
  if not args.skip_compile_count:
    result["train_step_compiles_full_schedule"] = compile_count(mesh)
  if result["models"]:
    print(f"\nbackend {backend} ({result['device_kind']}), dtype {dtype}, jax {jax.__version__}")
    print("| model | step | median ms | min | max | images/s |\n|---|---|---|---|---|---|")
  for model, r in result["models"].items():
    for k in (*VARIANTS, "eval_w4a4"):
      if k in r:
        ips = batch / (r[k]["median_ms"] / 1e3)
        print(
          f"| {model} | {k} | {r[k]['median_ms']:.1f} | {r[k]['min_ms']:.1f} "
          f"| {r[k]['max_ms']:.1f} | {ips:.0f} |"
        )
  for model, r in result["models"].items():
    ratios = {k[len("ratio_") :]: v for k, v in r.items() if k.startswith("ratio_")}
    print(f"{model}: " + "; ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
  if "pipeline_fashion_mnist_images_per_s" in result:
    print(
      "input pipeline (fashion_mnist, batch 128): "
      f"{result['pipeline_fashion_mnist_images_per_s']:.0f} img/s"
    )
  if "train_step_compiles_full_schedule" in result:
    print(
      "train-step compiles over a full PQ+TS+SP+KD schedule run: "
      f"{result['train_step_compiles_full_schedule']}"
    )
  out = args.out or os.path.join(os.path.dirname(__file__), "results", f"benchmark_{backend}.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
