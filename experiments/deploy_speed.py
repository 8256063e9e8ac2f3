"""Deployment speed: images/s of one network on each runtime path, measured side by side.

  PYTHONPATH=. python experiments/deploy_speed.py [--models fmnist_cnn,resnet20,resnet18]
      [--bits 4,2] [--batches 1,64] [--rounds 3] [--seconds 1.0] [--out FILE.json]
      [--residual_bits 8]   # the ResNets with an int8 residual stream (quant.residual_bits)
  PYTHONPATH=. python experiments/deploy_speed.py --table FILE.json   # its markdown table
  (--append adds to an existing --out: run the networks in separate processes)

With `--out`, the table is also written beside the JSON (`FILE.md`).

Per network (initialised weights with non-trivial BatchNorm statistics: speed does not depend
on trained values; stem and classifier at 32 bits, the default) and bits it builds the
integer program and its files in memory, then times, in alternating rounds (the order flips
each round), every path at every batch size and thread count (1, and all cores):

* `ort_fp32`: `qnet.deploy.onnx_graph.to_fp32_onnx`, the float network a user would deploy;
* `ort_qdq`: qnet's `model.onnx` (`qnet.deploy.qdq_onnx`);
* `ort_peer_int8`: ONNX Runtime's own `quantize_static` (QDQ, uint8 activations, int8
  per-channel weights, MinMax calibration on random images) applied to `ort_fp32`'s file:
  the peer the issue names, on exactly the same network;
* `ov_fp32`, `ov_int8`: OpenVINO's CPU plugin on the FP32 file and on the QDQ file
  (`INFERENCE_PRECISION_HINT=f32`, one stream, static batch);
* `litert_fp32`, `litert_int8`: the LiteRT interpreter (XNNPACK) on `qnet.deploy.litert`'s FP32
  twin and on its int8 file (`model.tflite`), one interpreter per batch size;
* `stablehlo`: `model.stablehlo` through `jax.export` (all cores only: XLA's CPU thread pool
  is fixed per process).

Speed ratios are each path's images/s over `ort_fp32`'s in the same round; the report
gives their medians. The load (`/proc/loadavg`) before and after each network and the CPU's
flags are recorded with the figures (the machines differ; the 2 cores are shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
import numpy as np

from qnet import models
from qnet.data.datasets import DATASETS
from qnet.deploy import export, integer, litert, lowering, onnx_graph, qdq_onnx
from qnet.deploy.runtimes import cpu_flags, load, openvino_fn, ort_fn, time_fn
from qnet.quant import precision as precision_lib

NETWORKS = {"fmnist_cnn": "fashion_mnist", "resnet20": "cifar10", "resnet18": "imagenet2012"}


def initialised_program(name: str, w: int, a: int, seed: int = 0, residual_bits: int = 32) -> integer.Program:
  """The program of an initialised `name` at WwAa with BatchNorm statistics and affine
  parameters away from their defaults (so thresholds are spread as in a trained net), its
  residual stream at `residual_bits` where the model has one (the stream steps at LSQ's
  initial value for the stream's values on random images: `layers.StreamQuant`'s first-batch
  calibration)."""
  ds = DATASETS[NETWORKS[name]]
  shape = (ds.image_size, ds.image_size, ds.channels)
  extra = {"residual_bits": residual_bits} if residual_bits != 32 and models.takes(name, "residual_bits") else {}
  model = models.create_model(name, ds.num_classes, **extra)
  sample = jnp.zeros((1, *shape))
  v = model.init(jax.random.key(seed), sample, train=False)
  rng = np.random.default_rng(seed)
  stats = jax.tree.map(lambda x: np.asarray(x) + rng.uniform(0.05, 0.5, x.shape).astype(np.float32), v["batch_stats"])
  params = jax.tree_util.tree_map_with_path(
    lambda p, x: np.asarray(x) + rng.normal(0, 0.3, x.shape).astype(np.float32)
    if jax.tree_util.keystr(p).endswith(("['bias']", "['scale']"))
    else np.asarray(x),
    v["params"],
  )
  layout = precision_lib.layout_of(model, sample)
  wv, av = precision_lib.layer_bits(layout, w, a, keep_first_last_fp=True)
  bits = {"/".join(p): (int(wv[i]), int(av[i])) for i, p in enumerate(layout.paths)}
  if extra:
    from qnet.models.layers import CALIBRATION

    images = jnp.asarray(rng.normal(0, 1, (8, *shape)), jnp.float32)
    variables = {"params": params, "batch_stats": stats, "precision": layout.tree(wv, av)}
    _, upd = model.apply(variables, images, train=True, mutable=["batch_stats", CALIBRATION])
    params = {**params, **{k: {**params[k], **upd[CALIBRATION][k]} for k in upd[CALIBRATION] if "stream" in k}}
  return lowering.build_program(model, params, stats, bits, input_shape=shape, mean=ds.mean, std=ds.std)


def peer_int8(fp32_path: str, out_path: str, shape, batches: int = 4) -> None:
  """ONNX Runtime's `quantize_static` on the FP32 file (the issue's peer settings)."""
  from onnxruntime import quantization as q

  rng = np.random.default_rng(1)

  class Reader(q.CalibrationDataReader):
    def __init__(self):
      self.batches = iter(
        [{"image": rng.integers(0, 256, (8, *shape)).astype(np.uint8)} for _ in range(batches)]
      )

    def get_next(self):
      return next(self.batches, None)

  q.quantize_static(
    fp32_path, out_path, Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
    activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
  )


def measure(name: str, w: int, a: int, batches, rounds: int, seconds: float, tmp: str, residual_bits: int = 32) -> dict:
  program = initialised_program(name, w, a, residual_bits=residual_bits)
  stream = any(op["op"] == "stream_add" for op in program.ops)
  shape = program.input_shape
  report: dict = {}
  files = {
    "fp32": onnx_graph.to_fp32_onnx(program),
    "qdq": qdq_onnx.to_onnx(program, report=report),
  }
  paths = {}
  for key, model in files.items():
    paths[key] = os.path.join(tmp, f"{name}_w{w}a{a}_{key}.onnx")
    with open(paths[key], "wb") as f:
      f.write(model.SerializeToString())
  paths["peer"] = os.path.join(tmp, f"{name}_w{w}a{a}_peer.onnx")
  peer_int8(paths["fp32"], paths["peer"], shape)
  tflite = {"litert_fp32": litert.to_tflite(program, float_twin=True), "litert_int8": litert.to_tflite(program)}
  hlo = jax.jit(jax.export.deserialize(bytearray(export.stablehlo_bytes(program))).call)
  all_cores = os.cpu_count() or 1
  threads = sorted({1, all_cores})
  fns = {}  # (path, threads) -> {batch: fn}
  for t in threads:
    for key, label in (("fp32", "ort_fp32"), ("qdq", "ort_qdq"), ("peer", "ort_peer_int8")):
      f = ort_fn(paths[key], t)
      fns[(label, t)] = {b: f for b in batches}
    fns[("ov_fp32", t)] = {b: openvino_fn(paths["fp32"], t, b) for b in batches}
    fns[("ov_int8", t)] = {b: openvino_fn(paths["qdq"], t, b) for b in batches}
    for label, blob in tflite.items():
      fns[(label, t)] = {b: litert.interpreter_fn(blob, t) for b in batches}
  fns[("stablehlo", all_cores)] = {b: (lambda x: np.asarray(hlo(x))) for b in batches}
  rng = np.random.default_rng(0)
  images = {b: rng.integers(0, 256, (b, *shape)).astype(np.uint8) for b in batches}
  load_before = load()
  rows: dict = {}
  for r in range(rounds):
    order = list(fns) if r % 2 == 0 else list(fns)[::-1]
    for b in batches:
      for key in order:
        ips = time_fn(fns[key][b], images[b], seconds)
        rows.setdefault(f"{key[0]}|threads={key[1]}|batch={b}", []).append(ips)
  result = {
    "model": name, "bits": [w, a], "residual_bits": 8 if stream else 32, "input_shape": list(shape), "forms": report,
    "load_before": load_before, "load_after": load(), "rounds": rows, "median_images_per_s": {},
    "median_ratio_vs_ort_fp32": {},
  }
  for key, values in rows.items():
    path, t, b = key.split("|")
    base = rows.get(f"ort_fp32|{t}|{b}")
    result["median_images_per_s"][key] = statistics.median(values)
    if base:
      result["median_ratio_vs_ort_fp32"][key] = statistics.median(v / u for v, u in zip(values, base))
  return result


COLUMNS = (  # (path, header): ratios to ort_fp32 in the same rounds
  ("ort_qdq", "ORT QDQ (qnet)"), ("ort_peer_int8", "ORT quantize_static peer"),
  ("ov_fp32", "OpenVINO FP32"), ("ov_int8", "OpenVINO int8 (QDQ file)"),
  ("litert_fp32", "LiteRT FP32"), ("litert_int8", "LiteRT int8 (qnet)"), ("stablehlo", "StableHLO"),
)


def markdown(report: dict) -> str:
  """The report (this script's JSON) as a table: per network, bits, batch and threads, ORT
  FP32 images/s and every other path's median ratio to it."""
  head = ["model", "W/A", "batch", "threads", "ORT FP32 images/s"] + [h for _, h in COLUMNS] + ["load before -> after"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for res in report["results"]:
    keys = {tuple(k.split("|")[1:]) for k in res["median_images_per_s"]}
    for t, b in sorted(keys, key=lambda tb: (-int(tb[1].split("=")[1]), int(tb[0].split("=")[1]))):
      base = res["median_images_per_s"].get(f"ort_fp32|{t}|{b}")
      model = res["model"] + (" (int8 stream)" if res.get("residual_bits", 32) != 32 else "")
      cells = [model, "W{}A{}".format(*res["bits"]), b.split("=")[1], t.split("=")[1], f"{base:,.0f}"]
      for path, _ in COLUMNS:
        r = res["median_ratio_vs_ort_fp32"].get(f"{path}|{t}|{b}")
        cells.append(f"{r:.2f}x" if r else "-")
      cells.append(f"{res['load_before'][0]:.1f} -> {res['load_after'][0]:.1f}")
      lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--table", default="", help="print the markdown table of this JSON report and stop")
  parser.add_argument("--models", default="fmnist_cnn,resnet20,resnet18")
  parser.add_argument("--bits", default="4,2")
  parser.add_argument("--batches", default="1,64")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--seconds", type=float, default=1.0)
  parser.add_argument("--out", default="")
  parser.add_argument("--residual_bits", type=int, default=32, help="8: the ResNets' int8 residual stream")
  parser.add_argument(
    "--append", action="store_true",
    help="add to --out's results (one process per network keeps memory bounded: the TF "
    "conversions and runtime sessions of all six networks outgrew 24 GB in one process)",
  )
  args = parser.parse_args()
  if args.table:
    with open(args.table) as f:
      print(markdown(json.load(f)), end="")
    return
  import onnxruntime
  import openvino

  meta = {
    "cpu_flags": cpu_flags(), "cpu": platform.processor() or platform.machine(),
    "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__,
    "openvino": openvino.__version__, "jax": jax.__version__,
    "command": "PYTHONPATH=. python experiments/deploy_speed.py " + " ".join(
      f"--{k}={v}" for k, v in vars(args).items() if v != ""
    ),
  }
  print(json.dumps(meta))
  results, metas = [], [meta]
  if args.append and os.path.exists(args.out):  # a run continued in a fresh process
    with open(args.out) as f:
      earlier = json.load(f)
    results, metas = earlier["results"], earlier.get("metas", [earlier["meta"]]) + [meta]
  batches = [int(b) for b in args.batches.split(",")]
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.models.split(","):
      for bits in args.bits.split(","):
        k = int(bits)
        res = measure(name, k, k, batches, args.rounds, args.seconds, tmp, args.residual_bits)
        results.append(res)
        print(f"== {name} W{k}A{k}  load {res['load_before']} -> {res['load_after']}  flags {meta['cpu_flags']}")
        forms = sorted({v['form'] for v in res['forms'].values()})
        print(f"   integer layers' forms: {forms}")
        for key, ips in res["median_images_per_s"].items():
          ratio = res["median_ratio_vs_ort_fp32"].get(key)
          print(f"   {key:<36} {ips:>9.0f} images/s" + (f"  x{ratio:.2f} vs ort_fp32" if ratio else ""))
        if args.out:
          with open(args.out, "w") as f:
            json.dump({"meta": metas[0], "metas": metas, "results": results}, f, indent=1)
          with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
            f.write(markdown({"meta": meta, "results": results}))


if __name__ == "__main__":
  main()
