"""Export sizes: FP32 checkpoint bytes vs the integer export, per model and precision.

  PYTHONPATH=. python experiments/export_sizes.py [--out experiments/results/export_sizes.json]

Sizes do not depend on trained values, so each model is initialised (random weights, unit
BN statistics; no training) and exported in memory exactly as `qnet.export` does:
`weights.safetensors` (serialized with the `safetensors` package) and `model.onnx` (QDQ). Uniform
precision with the stem and classifier kept at 32 bits (`keep_first_last_fp`, the default).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save

from qnet.deploy import export, integer, lowering, qdq_onnx
from qnet import models
from qnet.quant import precision as precision_lib
from qnet.data.datasets import DATASETS

MODELS = (
  ("fmnist_cnn", "fashion_mnist"),
  ("resnet20", "cifar10"),
  ("resnet18", "imagenet2012"),
  ("resnet50", "imagenet2012"),
)
PRECISIONS = ((4, 4), (3, 3), (2, 2))


def measure(name: str, dataset: str, w: int, a: int) -> dict:
  ds = DATASETS[dataset]
  shape = (ds.image_size, ds.image_size, ds.channels)
  model = models.create_model(name, ds.num_classes)
  sample = jnp.zeros((1, *shape))
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), sample, train=False))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), abstract["params"])
  stats = jax.tree.map(lambda s: np.ones(s.shape, np.float32), abstract["batch_stats"])
  layout = precision_lib.layout_of(model, sample)
  wv, av = precision_lib.layer_bits(layout, w, a, keep_first_last_fp=True)
  bits = {"/".join(p): (int(wv[i]), int(av[i])) for i, p in enumerate(layout.paths)}
  program = lowering.build_program(model, params, stats, bits, input_shape=shape, mean=ds.mean, std=ds.std)
  tensors, _ = export.stored_tensors(program)
  sizes = export.size_report(program, tensors, integer.fp32_bytes(params, stats))
  sizes["weights_safetensors_bytes"] = len(save(tensors))
  sizes["onnx_bytes"] = qdq_onnx.to_onnx(program).ByteSize()
  return {"model": name, "dataset": dataset, "weight_bits": w, "act_bits": a, **sizes}


def markdown(rows: list[dict]) -> str:
  out = [
    "| model | W/A | FP32 checkpoint | weights.safetensors | ratio | quantized layers: packed / FP32 | requant scale+shift (% of their FP32) | model.onnx |",
    "|---|---|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    out.append(
      f"| {r['model']} | W{r['weight_bits']}A{r['act_bits']} | {r['fp32_checkpoint_bytes']:,} | "
      f"{r['weights_safetensors_bytes']:,} | {r['fp32_checkpoint_bytes'] / r['weights_safetensors_bytes']:.1f}x | "
      f"{r['quantized_weights_packed_bytes'] / r['quantized_weights_fp32_bytes']:.4f} "
      f"(k/32 = {r['weight_bits'] / 32:.4f}) | "
      f"{100 * r['requant_overhead_fraction_of_fp32']:.2f}% | {r['onnx_bytes']:,} |"
    )
  return "\n".join(out)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="experiments/results/export_sizes.json")
  args = parser.parse_args()
  rows = []
  for name, dataset in MODELS:
    for w, a in PRECISIONS:
      t = time.perf_counter()
      rows.append(measure(name, dataset, w, a))
      print(f"{name} W{w}A{a}: {time.perf_counter() - t:.1f} s", flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"rows": rows, "jax": jax.__version__}, f, indent=1)
  table = markdown(rows)
  with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
    f.write(table + "\n")
  print(table)


if __name__ == "__main__":
  main()
