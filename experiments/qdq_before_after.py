"""A change to the QDQ graph, timed: the same program's `model.onnx` from `qnet.deploy.qdq_onnx`
at a git revision against the working tree's, side by side in ONNX Runtime (and OpenVINO).

  PYTHONPATH=. python experiments/qdq_before_after.py --rev=HEAD [--models resnet20,resnet18]
      [--bits 4] [--batch 64] [--threads 1] [--rounds 5] [--seconds 1.0] [--out FILE.json]
      [--residual_bits 8] [--openvino] [--litert] [--stablehlo]

Per network (`deploy_speed.initialised_program`'s initialised weights), the revision's
exporters are loaded from `git show REV:qnet/deploy/{integer,onnx_graph,qdq_onnx,litert,export}.py` beside the
current ones (`modules_at`); each round times `before`, `after` and ORT's FP32 twin at `REV`
and now (the order flips each round; with `--openvino` the QDQ files in OpenVINO too, with
`--litert` `qnet.deploy.litert`'s int8 file, with `--stablehlo` the integer program through
`jax.export`, each at `REV` and now) and the report gives the medians
of the per-round ratios `after / before` (`ort_fp32`: the twin's) and of each QDQ file over
its own revision's FP32 twin, with each file's per-layer forms, the load and the CPU's flags.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
import deploy_speed  # noqa: E402

from qnet.deploy import export, litert, onnx_graph, qdq_onnx  # noqa: E402
from qnet.deploy.runtimes import cpu_flags, load, openvino_fn, ort_fn, time_fn  # noqa: E402


def modules_at(
  rev: str, tmp: str, names=("integer", "onnx_graph", "qdq_onnx", "litert", "export")
) -> dict:
  """`qnet.deploy.NAME` for each of `names` as it was at git revision `rev`, in dependency order:
  each one's imports of the others (`from qnet.deploy import integer` as well as `from
  qnet.deploy.onnx_graph import ...`) resolve to their `rev` versions too (the rest of qnet is
  today's), so a change to the float parts (`onnx_graph`) or to the integer program's ops
  (`integer`, with `--stablehlo`) is timed too."""
  import qnet.deploy as package

  found: dict = {}
  saved = {n: sys.modules.get(f"qnet.deploy.{n}") for n in names}
  try:
    for name in names:
      src = subprocess.run(
        ["git", "show", f"{rev}:qnet/deploy/{name}.py"], capture_output=True, text=True, check=True
      ).stdout
      path = os.path.join(tmp, f"{name}_before.py")
      with open(path, "w") as f:
        f.write(src)
      spec = importlib.util.spec_from_file_location(f"{name}_before", path)
      module = importlib.util.module_from_spec(spec)
      sys.modules[spec.name] = module  # (its dataclasses look their module up)
      spec.loader.exec_module(module)
      found[name] = sys.modules[f"qnet.deploy.{name}"] = module
      setattr(package, name, module)  # what `from qnet.deploy import NAME` reads first
  finally:
    for name, module in saved.items():
      if module is not None:
        sys.modules[f"qnet.deploy.{name}"] = module
        setattr(package, name, module)
  return found


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--rev", default="HEAD")
  parser.add_argument("--models", default="resnet20,resnet18")
  parser.add_argument("--bits", type=int, default=4)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--seconds", type=float, default=1.0)
  parser.add_argument("--openvino", action="store_true")
  parser.add_argument("--litert", action="store_true", help="also qnet.deploy.litert's int8 file, before and after")
  parser.add_argument(
    "--stablehlo", action="store_true",
    help="also the integer program through jax.export at REV and now (XLA's CPU threads: all cores)",
  )
  parser.add_argument("--residual_bits", type=int, default=32, help="8: the ResNets' int8 residual stream")
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  rev = subprocess.run(["git", "rev-parse", "--short", args.rev], capture_output=True, text=True, check=True).stdout.strip()
  meta = {"cpu_flags": cpu_flags(), "cores": os.cpu_count(), "before": rev, "after": "working tree",
          "command": "PYTHONPATH=. python experiments/qdq_before_after.py " + " ".join(
            f"--{k}={v}" for k, v in vars(args).items() if v not in ("", False))}
  print(json.dumps(meta))
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    old = modules_at(args.rev, tmp)
    for name in args.models.split(","):
      program = deploy_speed.initialised_program(name, args.bits, args.bits, residual_bits=args.residual_bits)
      files, forms = {}, {}
      for key, make in (("before", old["qdq_onnx"].to_onnx), ("after", qdq_onnx.to_onnx)):
        report: dict = {}
        files[key] = make(program, report=report).SerializeToString()
        forms[key] = dict(collections.Counter(v["form"] for v in report.values()))
      files["fp32_before"] = old["onnx_graph"].to_fp32_onnx(program).SerializeToString()
      files["fp32"] = onnx_graph.to_fp32_onnx(program).SerializeToString()
      fns = {}
      for key, model in files.items():
        path = os.path.join(tmp, f"{name}_{key}.onnx")
        with open(path, "wb") as f:
          f.write(model)
        fns[f"ort_{key}"] = ort_fn(path, args.threads)
        if args.openvino and not key.startswith("fp32"):
          fns[f"ov_{key}"] = openvino_fn(path, args.threads, args.batch)
      if args.litert:
        for key, module in (("before", old["litert"]), ("after", litert)):
          fns[f"litert_{key}"] = litert.interpreter_fn(module.to_tflite(program), args.threads)
      import numpy as np

      if args.stablehlo:  # `model.stablehlo` as each revision's export writes it
        import jax

        for key, module in (("before", old["export"]), ("after", export)):
          call = jax.jit(jax.export.deserialize(bytearray(module.stablehlo_bytes(program))).call)
          fns[f"stablehlo_{key}"] = lambda x, c=call: np.asarray(c(x))
      x = np.random.default_rng(0).integers(0, 256, (args.batch, *program.input_shape)).astype(np.uint8)
      load_before, rows = load(), collections.defaultdict(list)
      for r in range(args.rounds):
        for key in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
          rows[key].append(time_fn(fns[key], x, args.seconds))
      ratio = lambda a, b: statistics.median(u / v for u, v in zip(rows[a], rows[b]))  # noqa: E731
      res = {
        "model": name, "bits": args.bits, "batch": args.batch, "threads": args.threads, "forms": forms,
        "load_before": load_before, "load_after": load(), "images_per_s": dict(rows),
        "after_over_before": {p: ratio(f"{p}_after", f"{p}_before") for p in ("ort", "ov", "litert", "stablehlo") if f"{p}_after" in rows}
        | {"ort_fp32": ratio("ort_fp32", "ort_fp32_before")},
        # each QDQ file over its own revision's FP32 twin
        "over_ort_fp32": {k: ratio(k, "ort_fp32_before" if k.endswith("_before") else "ort_fp32") for k in rows if not k.startswith("ort_fp32")},
      }
      results.append(res)
      print(f"== {name} W{args.bits}A{args.bits} batch {args.batch} threads {args.threads} "
            f"load {res['load_before']} -> {res['load_after']}")
      print(f"   forms before {forms['before']}\n   forms after  {forms['after']}")
      for k, v in rows.items():
        print(f"   {k:<12} {statistics.median(v):>8.1f} images/s" + (f"  x{res['over_ort_fp32'][k]:.2f} vs ort_fp32" if k in res["over_ort_fp32"] else ""))
      print(f"   after / before: {res['after_over_before']}")
      if args.out:
        with open(args.out, "w") as f:
          json.dump({"meta": meta, "results": results}, f, indent=1)


if __name__ == "__main__":
  main()
