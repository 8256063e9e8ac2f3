"""Evaluate an export: `python -m qnet.evaluate --export=OUT [--config.data_dir=DIR]`.

Runs the test split through each path of the export (qnet's integer JAX function, the
deserialized `model.stablehlo`, the QDQ `model.onnx` on onnxruntime's CPU provider and on
OpenVINO's CPU plugin, `model.tflite` on the LiteRT interpreter, and the float twin `model_fp32.onnx` on onnxruntime, which is not
exact to the integer program: it is there for speed) and the fake-quant evaluation of the
source checkpoint (the model, its saved config and the
checkpoint named in the manifest, at the exported precision), and prints per path: test
accuracy, images/s (after a warm-up batch, so compilation is excluded) and the number of
test images whose top-1 class differs from the fake-quant evaluation's. `--json=PATH`
also writes those figures; `--speed` adds images/s of every path at batch 1 and 64, with one
thread and with all cores, beside the CPU's flags. `--config.*` overrides work as in `qnet.main` (data_dir,
batch_size); the dataset is the export's. Bad input: one line, exit status 2.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, Iterator

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

# The paths that compute the integer program (top-1 equal to fake quant, up to rounding
# ties), and the float twin (reported for speed; its activations are not rounded).
PATHS = ("qnet_integer", "stablehlo", "onnxruntime", "openvino", "litert")
FLOAT_PATHS = ("onnxruntime_fp32",)


def raw_test_batches(
  dataset: str, batch_size: int, data_dir: str | None, limit: int = 0
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """(uint8 images, normalized float32 images, labels) of the test split, in file order.

  The normalized images are `qnet.data.input_pipeline`'s evaluation batches themselves, so the
  fake-quant side sees exactly what training's evaluation saw; the raw bytes come from the
  same TFDS split (labels are checked to match).
  """
  import tensorflow_datasets as tfds

  from qnet.data import input_pipeline
  from qnet.data.datasets import DATASETS

  spec = DATASETS[dataset]
  builder = input_pipeline.get_builder(dataset, data_dir)
  raw = tfds.as_numpy(
    builder.as_dataset(split=spec.eval_split, shuffle_files=False).batch(batch_size)
  )
  norm = input_pipeline.create_eval_iterator(
    dataset, global_batch_size=batch_size, data_dir=data_dir, process_index=0, process_count=1
  )
  seen = 0
  for r, n in zip(raw, norm):
    count = len(r["label"])
    if not np.array_equal(r["label"], n["label"][:count]):
      raise RuntimeError("raw and normalized test batches are out of step")
    yield r["image"], n["image"][:count], r["label"]
    seen += count
    if limit and seen >= limit:
      return


def fake_quant_fn(manifest: dict) -> Callable[[np.ndarray], np.ndarray]:
  """Logits of the source checkpoint's fake-quant network at the exported precision."""
  import jax

  from qnet.train import build, checkpointing, run_config
  from qnet.platform import conv
  from qnet.deploy import export

  source = manifest["source"]
  try:
    config, total_steps = run_config.load(source["workdir"])
  except FileNotFoundError as e:
    raise export.ExportError(f"the source run of the export is not available: {e}") from e
  students, _ = build.build_specs(config, total_steps)
  spec = students[0]
  params, batch_stats = checkpointing.read_first_student(source["workdir"], source["step"])
  prec = spec.schedule.deterministic(spec.layout, source["step"])
  variables = {"params": params, "batch_stats": batch_stats, "precision": prec}
  apply = jax.jit(
    lambda v, x: spec.model.apply(v, x, train=False),
    compiler_options=conv.cpu_compiler_options() or None,
  )
  return lambda x: np.asarray(apply(variables, x))


def path_fns(out: str, program, threads: int | None = None) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
  """The export's paths (`PATHS`, `FLOAT_PATHS`) as `uint8 images -> logits` functions; the
  runtimes' intra-op threads `threads` (None: their defaults; the JAX paths use XLA's pool)."""
  import jax
  from jax import export as jax_export

  from qnet.deploy import integer, runtimes

  f_int = integer.make_apply(program)
  with open(os.path.join(out, "model.stablehlo"), "rb") as f:
    exported = jax_export.deserialize(bytearray(f.read()))
  f_hlo = jax.jit(exported.call)
  fns = {
    "qnet_integer": lambda x: np.asarray(f_int(x)),
    "stablehlo": lambda x: np.asarray(f_hlo(x)),
    "onnxruntime": runtimes.ort_fn(os.path.join(out, "model.onnx"), threads),
    "openvino": runtimes.openvino_fn(os.path.join(out, "model.onnx"), threads),
  }
  tflite = os.path.join(out, "model.tflite")
  if os.path.isfile(tflite):  # exports written before LiteRT have none
    fns["litert"] = runtimes.litert_fn(tflite, threads)
  fp32 = os.path.join(out, "model_fp32.onnx")
  if os.path.isfile(fp32):  # exports written before the QDQ graph have none
    fns["onnxruntime_fp32"] = runtimes.ort_fn(fp32, threads)
  return fns


def evaluate(out: str, data_dir: str | None, batch_size: int, limit: int = 0) -> dict:
  """Accuracy, images/s and top-1 differences vs fake quant of every path."""
  from qnet.deploy import export

  program, manifest = export.load_export(out)
  fns = {"fake_quant": fake_quant_fn(manifest), **path_fns(out, program)}
  top1 = {k: [] for k in fns}
  seconds = {k: 0.0 for k in fns}
  timed = {k: 0 for k in fns}
  max_logit_diff = {k: 0.0 for k in fns if k != "fake_quant"}
  labels = []
  for b, (raw, norm, label) in enumerate(raw_test_batches(manifest["dataset"], batch_size, data_dir, limit)):
    logits = {}
    for name, fn in fns.items():
      x = norm if name == "fake_quant" else raw
      if b == 0:
        fn(x)  # warm-up: compile outside the timing
      t = time.perf_counter()
      logits[name] = fn(x)
      if len(label) == batch_size:  # a short last batch would recompile the jitted paths
        seconds[name] += time.perf_counter() - t
        timed[name] += len(label)
      top1[name].append(np.argmax(logits[name], -1))
    for name in max_logit_diff:
      diff = float(np.max(np.abs(logits[name] - logits["qnet_integer"])))
      max_logit_diff[name] = max(max_logit_diff[name], diff)
    labels.append(label)
  labels = np.concatenate(labels)
  top1 = {k: np.concatenate(v) for k, v in top1.items()}
  rows = {
    name: {
      "accuracy": float(np.mean(top1[name] == labels)),
      "images_per_sec": timed[name] / seconds[name] if seconds[name] else float("nan"),
      "top1_differs_from_fake_quant": int(np.sum(top1[name] != top1["fake_quant"])),
      **({"max_abs_logit_diff_vs_qnet_integer": max_logit_diff[name]} if name != "fake_quant" else {}),
    }
    for name in fns
  }
  return {
    "export": os.path.abspath(out),
    "model": manifest["model"],
    "dataset": manifest["dataset"],
    "precision": manifest["precision"],
    "bits": sorted({(v["weight_bits"], v["act_bits"]) for v in manifest["layers"].values()}),
    "source": manifest["source"],
    "test_images": int(len(labels)),
    "batch_size": batch_size,
    "paths": rows,
  }


JAX_PATHS = ("qnet_integer", "stablehlo")  # XLA's CPU thread pool is fixed per process


def speed(out: str, program, batches=(1, 64), seconds: float = 0.5, rounds: int = 3) -> dict:
  """images/s of every path at each batch size, with one thread and with all cores (the JAX
  paths: all cores only), timed in alternating rounds on random images (speed does not
  depend on them): per `path|threads=T|batch=B`, the median and the median ratio to
  `onnxruntime_fp32` in the same round; with the CPU flags and the load."""
  import statistics

  from qnet.deploy import runtimes

  cores = os.cpu_count() or 1
  fns = {}
  for t in sorted({1, cores}):
    for name, fn in path_fns(out, program, t).items():
      if name not in JAX_PATHS or t == cores:
        fns[f"{name}|threads={t}"] = fn
  rng = np.random.default_rng(0)
  rows: dict[str, list[float]] = {}
  load_before = runtimes.load()
  for r in range(rounds):
    for b in batches:
      x = rng.integers(0, 256, (b, *program.input_shape)).astype(np.uint8)
      for key in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
        rows.setdefault(f"{key}|batch={b}", []).append(runtimes.time_fn(fns[key], x, seconds))
  ratios = {}
  for key, values in rows.items():
    _, t, b = key.split("|")
    base = rows.get(f"onnxruntime_fp32|{t}|{b}")
    if base and not key.startswith("onnxruntime_fp32|"):
      ratios[key] = statistics.median(v / u for v, u in zip(values, base))
  return {
    "cpu_flags": runtimes.cpu_flags(), "cores": cores, "load_before": load_before,
    "load_after": runtimes.load(), "rounds": rounds,
    "median_images_per_s": {k: statistics.median(v) for k, v in rows.items()},
    "median_ratio_vs_onnxruntime_fp32": ratios,
  }


def format_speed(result: dict) -> str:
  s = result["speed"]
  lines = [f"speed: cpu flags {' '.join(s['cpu_flags'])}, {s['cores']} cores, load {s['load_before'][0]} -> {s['load_after'][0]}"]
  for key, ips in s["median_images_per_s"].items():
    ratio = s["median_ratio_vs_onnxruntime_fp32"].get(key)
    lines.append(f"  {key:<40} {ips:>9.0f} images/s" + (f"  x{ratio:.2f} vs onnxruntime_fp32" if ratio else ""))
  return "\n".join(lines)


def format_report(result: dict) -> str:
  lines = [
    f"{result['model']} on {result['dataset']} test ({result['test_images']} images, batch "
    f"{result['batch_size']}); checkpoint step {result['source']['step']}, recorded "
    f"eval_accuracy {result['source']['eval_accuracy']}",
    f"{'path':<17} {'accuracy':>9} {'images/s':>10} {'top-1 != fake-quant':>20}",
  ]
  for name, r in result["paths"].items():
    lines.append(
      f"{name:<17} {r['accuracy']:>9.4f} {r['images_per_sec']:>10.0f} "
      f"{r['top1_differs_from_fake_quant']:>20d}"
    )
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  """`python -m qnet.evaluate`'s body, run by absl after `cli` defined the flags."""
  from absl import app, flags

  from qnet.deploy import export

  flags_ = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    result = evaluate(
      flags_.export, flags_.config.data_dir or None, flags_.config.batch_size, flags_.limit
    )
    if flags_.speed:
      program, _ = export.load_export(flags_.export)
      result["speed"] = speed(flags_.export, program)
  except export.ExportError as e:
    print(f"qnet.evaluate: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_report(result))
  if flags_.speed:
    print(format_speed(result))
  if flags_.json:
    os.makedirs(os.path.dirname(os.path.abspath(flags_.json)), exist_ok=True)
    with open(flags_.json, "w") as f:
      json.dump(result, f, indent=1)



def cli() -> None:
  """Defines the flags and runs `main` (the entry module `qnet.evaluate` calls this)."""
  from absl import app, flags
  from ml_collections import config_flags

  from configs import default

  flags.DEFINE_string("export", None, "Directory written by `python -m qnet.export`.")
  flags.DEFINE_string("json", "", "Also write the results to this JSON file.")
  flags.DEFINE_integer("limit", 0, "Evaluate only the first LIMIT test images (0: all).")
  flags.DEFINE_bool(
    "speed", False, "Also time every path at batch 1 and 64, with 1 thread and all cores "
    "(alternating rounds; ratios to the FP32 twin in ONNX Runtime)."
  )
  config_flags.DEFINE_config_dict("config", default.get_config(), "data_dir, batch_size.")
  flags.mark_flags_as_required(["export"])
  app.run(main)
