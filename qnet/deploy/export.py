"""Export a trained low-bit network: `python -m qnet.export --workdir=WORKDIR --out=OUT`.

Reads the run's saved config (`WORKDIR/config.json`) and a checkpoint (`--step`, default
the latest), and writes OUT atomically (a temporary directory renamed to OUT at the end;
an existing OUT is refused unless `--overwrite`):

* `weights.safetensors`: the quantized layers' weight levels packed into a k-bit
  bitstream (`qnet.deploy.packing`; uint8 tensors named `LAYER.levels`; with LSQ weights also
  the float32 steps `LAYER.weight_step`), the per-channel
  `requant_scale`/`requant_shift` (float64) that fold BatchNorm, bias, clip and rounding
  into the next activation codes (`qnet.deploy.integer.thresholds`), and float32 tensors only
  for what the network keeps in float (32-bit kernels, biases, BatchNorms the float parts
  use). safetensors: a flat, zero-copy, header-plus-bytes format with no code execution
  on load (unlike pickle), read by numpy, PyTorch, JAX and Rust alike;
* `manifest.json`: model, input/output, preprocessing, the quantizers (DoReFa, LSQ, PACT),
  the precision and where it comes from, per layer its bits, quantizers (with the input's
  activation clip level and step) and tensor names, the program (ops), tensor shapes and
  dtypes, byte sizes, sha256 of every other file, the source checkpoint and its
  recorded `eval_accuracy`, versions;
* `model.stablehlo`: `jax.export` of the integer inference function (batch symbolic):
  `jax.export.deserialize(open(f, 'rb').read()).call(images)` with `uint8 [B, H, W, C]`
  images gives float32 logits, in a Python that has jax but not qnet;
* `model.onnx`: the same network as a QDQ graph (`qnet.deploy.qdq_onnx`): uint8 codes, int8
  per-channel weights, int32 biases, which ONNX Runtime fuses into `QLinearConv` (its int8
  kernels) and OpenVINO runs as int8; the codes equal qnet's integer ones;
* `model_fp32.onnx`: the float twin (`qnet.deploy.onnx_graph.to_fp32_onnx`): the same
  layers in float32 with the quantizers' clips, what one would deploy without qnet (for
  speed comparisons in one runtime; not exact to the integer program);
* `model.tflite`: the LiteRT file (`qnet.deploy.litert`): int8 `CONV_2D` kernels with the
  QDQ graph's exact integer weights, biases and multipliers, run by `ai-edge-litert`.

The exported network is the run's first student (with distillation: not the teacher,
nor `extra_students`), in float32 whatever `config.dtype` trained it. The exported
precision is the one evaluation uses at the checkpoint's step: the
schedule's deterministic, fully quantized precision of the phase that step is in (so a
checkpoint taken mid-way through a progressive schedule exports that phase's bits; the
manifest's `precision` says which). Bad input is one line on stderr and exit status 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from qnet.deploy import integer, packing

# /2 added the LSQ and PACT quantizers (`quantizers`, the ops' quantizer attributes); a /1
# export is DoReFa throughout and reads as such. /3 added the float `mean` op (a model that
# quantizes its global mean before the classifier); /1 and /2 programs are /3 programs.
FORMAT = "qnet-integer-export/4"
FORMATS = ("qnet-integer-export/1", "qnet-integer-export/2", "qnet-integer-export/3", FORMAT)
WEIGHTS, MANIFEST, STABLEHLO, ONNX = "weights.safetensors", "manifest.json", "model.stablehlo", "model.onnx"
ONNX_FP32 = "model_fp32.onnx"
TFLITE = "model.tflite"
MODEL_FILES = (WEIGHTS, STABLEHLO, ONNX, ONNX_FP32, TFLITE)


class ExportError(ValueError):
  """Bad input to export or load: the message is one line naming what and why."""


# ----------------------------------------------------------------------------- the run


def _checkpoint_steps(workdir: str) -> list[int]:
  ckpt = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(ckpt):
    return []
  return sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())


def recorded_accuracy(workdir: str, step: int) -> float | None:
  """`eval_accuracy` that the run logged at `step` (metrics.jsonl), if any."""
  from qnet.train import metrics_io

  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    return None
  rows = [r for r in metrics_io.read_jsonl(path) if r["step"] == step and "eval_accuracy" in r]
  return rows[-1]["eval_accuracy"] if rows else None


def eval_precision(config, total_steps: int, step: int) -> tuple[dict[str, tuple[int, int]], dict]:
  """Per-layer `(weight_bits, act_bits)` that evaluation uses at `step`, and a description."""
  import jax

  from qnet.train import build

  students, _ = build.build_specs(config, total_steps)
  spec = students[0]
  sched = spec.schedule
  w, a = spec.layout.vectors(sched.deterministic(spec.layout, step))
  w, a = np.asarray(w), np.asarray(a)
  bits = {"/".join(p): (int(w[i]), int(a[i])) for i, p in enumerate(spec.layout.paths)}
  phase = int(jax.device_get(sched.phase(step)))
  desc = {
    "source": "the schedule's evaluation precision at the checkpoint's step (fully quantized, "
    "as qnet's evaluation; stochastic precision draws none)",
    "schedule": config.schedule.kind,
    "phase": phase,
    "num_phases": sched.num_phases,
    "phase_bits": [sched.weight_bits[phase], sched.act_bits[phase]],
    "target_bits": [config.quant.weight_bits, config.quant.act_bits],
    "final_phase": phase == sched.num_phases - 1,
    "keep_first_last_fp": bool(config.quant.keep_first_last_fp),
    "per_channel": bool(config.quant.per_channel),
    "stochastic": sched.stochastic,
  }
  return bits, desc


def check_bits(bits: dict[str, tuple[int, int]], config) -> None:
  """ExportError for a network the integer form does not cover: an unknown quantizer, a
  full-precision network, or bits it cannot hold."""
  for field, allowed in (
    ("weight_quantizer", integer.WEIGHT_QUANTIZERS),
    ("act_quantizer", integer.ACT_QUANTIZERS),
  ):
    if config.quant[field] not in allowed:
      raise ExportError(
        f"config.quant.{field}={config.quant[field]!r}; allowed: {', '.join(allowed)}"
      )
  if config.model_act == "relu":
    raise ExportError("config.model_act='relu' is the plain FP network: nothing to quantize")
  if all(w == integer.FP and a == integer.FP for w, a in bits.values()):
    raise ExportError("the run is full precision at this step (all bits 32): nothing to quantize")
  for path, (w, a) in bits.items():
    for name, k in (("weight_bits", w), ("act_bits", a)):
      if integer.MAX_BITS < k < integer.FP:
        raise ExportError(
          f"layer {path} has {name}={k}; export allows 1..{integer.MAX_BITS} or 32 (full precision)"
        )


def program_from_run(workdir: str, step: int | None = None):
  """(program, info) of a run's checkpoint; `info` feeds the manifest."""
  from qnet import models
  from qnet.deploy import lowering
  from qnet.train import build, checkpointing, run_config
  from qnet.data.datasets import DATASETS

  steps = _checkpoint_steps(workdir)
  if not steps:
    raise ExportError(f"--workdir={workdir} holds no checkpoint ({workdir}/checkpoints/STEP)")
  if step is None or step < 0:
    step = steps[-1]
  elif step not in steps:
    raise ExportError(f"--step={step} has no checkpoint; allowed: {', '.join(map(str, steps))}")
  try:
    config, total_steps = run_config.load(workdir)
  except FileNotFoundError as e:
    raise ExportError(str(e)) from e
  ds = DATASETS[config.dataset]
  if config.image_size and config.image_size != ds.image_size:
    raise ExportError(
      f"config.image_size={config.image_size}: export takes the dataset's native "
      f"{ds.image_size}x{ds.image_size} images (resizing is not part of the exported graph)"
    )
  bits, precision = eval_precision(config, total_steps, step)
  check_bits(bits, config)
  params, batch_stats = checkpointing.read_first_student(workdir, step)
  try:
    model = build.build_specs(config, total_steps)[0][0].model
    program = lowering.build_program(
      model,
      params,
      batch_stats,
      bits,
      input_shape=build.input_shape(config),
      mean=ds.mean,
      std=ds.std,
      per_channel=bool(config.quant.per_channel),
      weight_quantizer=config.quant.weight_quantizer,
      act_quantizer=config.quant.act_quantizer,
    )
  except (integer.UnsupportedModel, models.RuleError) as e:
    raise ExportError(f"config.model={config.model!r}: {e}") from e
  info = {
    "model": config.model,
    "dataset": config.dataset,
    "precision": precision,
    "fp32_checkpoint_bytes": integer.fp32_bytes(params, batch_stats),
    "source": {
      "workdir": os.path.abspath(workdir),
      "step": int(step),
      "total_steps": int(total_steps),
      "eval_accuracy": recorded_accuracy(workdir, step),
    },
  }
  return program, info


# ----------------------------------------------------------------------------- files


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def stored_tensors(program: integer.Program) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
  """What `weights.safetensors` holds (weight levels packed) and each tensor's description."""
  quantized = {
    op["weight"]: op
    for op in program.ops
    if op["op"] in ("conv", "dense") and op["weight_bits"] != integer.FP
  }
  tensors, desc = {}, {}
  for name, arr in sorted(program.arrays.items()):
    arr = np.asarray(arr)
    if name in quantized:
      op = quantized[name]
      bits, quantizer = op["weight_bits"], integer.weight_quantizer_of(op)
      value = (
        f"w = (i - {1 << (bits - 1)}) * {op['weight_step']} (per output channel: last axis)"
        if quantizer == "lsq"
        else "w = 2 i / n - 1"
      )
      tensors[name] = packing.pack(arr, bits)
      desc[name] = {
        "dtype": "uint8",
        "shape": list(arr.shape),
        "bits": bits,
        "quantizer": quantizer,
        "stored_as": f"{bits}-bit levels i, packed LSB-first (qnet.deploy.packing); {value}",
      }
    else:
      # ascontiguousarray makes a 0-d array 1-d: keep a per-tensor step's shape ().
      tensors[name] = np.ascontiguousarray(arr).reshape(arr.shape)
      desc[name] = {"dtype": str(arr.dtype), "shape": list(arr.shape)}
  return tensors, desc


def size_report(program: integer.Program, tensors: dict, fp32_checkpoint_bytes: int) -> dict:
  """Byte sizes: weights of the quantized layers vs their FP32 bytes, and the overheads."""
  quantized = [
    op for op in program.ops if op["op"] in ("conv", "dense") and op["weight_bits"] != integer.FP
  ]
  q_fp32 = sum(4 * program.arrays[op["weight"]].size for op in quantized)
  q_packed = sum(tensors[op["weight"]].nbytes for op in quantized)
  q_ideal = sum(program.arrays[op["weight"]].size * op["weight_bits"] / 8 for op in quantized)
  requant = sum(v.nbytes for k, v in tensors.items() if ".requant_" in k)
  floats = sum(v.nbytes for k, v in tensors.items() if v.dtype == np.float32)
  return {
    "fp32_checkpoint_bytes": int(fp32_checkpoint_bytes),
    "tensor_bytes": int(sum(v.nbytes for v in tensors.values())),
    "quantized_weights_fp32_bytes": int(q_fp32),
    "quantized_weights_packed_bytes": int(q_packed),
    "quantized_weights_k_over_32_bytes": float(q_ideal),
    "requant_scale_shift_bytes": int(requant),
    "requant_overhead_fraction_of_fp32": requant / q_fp32 if q_fp32 else 0.0,
    "float32_bytes": int(floats),
  }


def stablehlo_bytes(program: integer.Program) -> bytes:
  """`jax.export` serialization of the integer function, batch dimension symbolic."""
  import jax
  from jax import export as jax_export

  (batch,) = jax_export.symbolic_shape("batch")
  spec = jax.ShapeDtypeStruct((batch, *program.input_shape), np.uint8)
  arrays = {k: np.asarray(v) for k, v in integer.runtime_arrays(program).items()}
  exported = jax_export.export(jax.jit(lambda x: integer.interpret(program.ops, arrays, x)))(spec)
  return bytes(exported.serialize())


def write_export(
  out: str, program: integer.Program, info: dict, overwrite: bool = False, onnx_flavour: str = "onnxruntime"
) -> dict:
  """Writes the six files into a temporary sibling of `out`, then renames it to `out`
  (`onnx_flavour`: `model.onnx`'s, `qdq_onnx.FLAVOURS`)."""
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite:
    raise ExportError(f"--out={out} exists; choose a new directory or pass --overwrite")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  try:
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; OUT is an ordinary directory
    tensors, desc, files = _write_model_files(tmp, program, onnx_flavour)
    manifest = _manifest(program, info, tensors, desc, files)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    for name in (MANIFEST, *MODEL_FILES):
      os.chmod(os.path.join(tmp, name), 0o666 & ~umask)
    _swap_in(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def _write_model_files(tmp: str, program: integer.Program, onnx_flavour: str = "onnxruntime") -> tuple[dict, dict, dict]:
  """Writes weights, StableHLO and the two ONNX files into `tmp`; (tensors, their
  descriptions, files' sizes and sha256 with the QDQ and LiteRT graphs' form per integer
  layer)."""
  from safetensors.numpy import save_file

  from qnet.deploy import litert, onnx_graph, qdq_onnx

  tensors, desc = stored_tensors(program)
  save_file(tensors, os.path.join(tmp, WEIGHTS))
  with open(os.path.join(tmp, STABLEHLO), "wb") as f:
    f.write(stablehlo_bytes(program))
  forms: dict = {}
  with open(os.path.join(tmp, ONNX), "wb") as f:
    try:
      f.write(qdq_onnx.to_onnx(program, report=forms, flavour=onnx_flavour).SerializeToString())
    except ValueError as e:  # a flavour this network's bits do not fit
      raise ExportError(f"--onnx_flavour: {e}") from e
  with open(os.path.join(tmp, ONNX_FP32), "wb") as f:
    f.write(onnx_graph.to_fp32_onnx(program).SerializeToString())
  tflite_forms: dict = {}
  with open(os.path.join(tmp, TFLITE), "wb") as f:
    f.write(litert.to_tflite(program, report=tflite_forms))
  files = {
    name: {"bytes": os.path.getsize(os.path.join(tmp, name)), "sha256": _sha256(os.path.join(tmp, name))}
    for name in MODEL_FILES
  }
  files[ONNX]["layer_forms"] = forms
  files[ONNX]["flavour"] = onnx_flavour
  files[TFLITE]["layer_forms"] = tflite_forms
  return tensors, desc, files


def _manifest(program: integer.Program, info: dict, tensors: dict, desc: dict, files: dict) -> dict:
  """The manifest.json contents of an export."""
  import jax

  import qnet

  h, w, c = program.input_shape
  return {
    "format": FORMAT,
    "model": info["model"],
    "dataset": info["dataset"],
    "input": {"name": "image", "shape": ["batch", h, w, c], "dtype": "uint8", "layout": "NHWC"},
    "output": {"name": "logits", "shape": ["batch", program.num_classes], "dtype": "float32"},
    "preprocessing": {
      "formula": "x = (image / 255 - mean) / std (float32, per channel); inside every model file",
      "mean": program.ops[0]["mean"],
      "std": program.ops[0]["std"],
    },
    "precision": info["precision"],
    "quantizers": program.quantizers,
    "layers": program.layers,
    "ops": program.ops,
    "tensors": desc,
    "sizes": size_report(program, tensors, info["fp32_checkpoint_bytes"]) | {
      "export_files_bytes": {k: v["bytes"] for k, v in files.items()}
    },
    "files": files,
    "source": info["source"],
    "qnet_version": qnet.__version__,
    "jax_version": jax.__version__,
  }


def _swap_in(tmp: str, out: str) -> None:
  """Renames `tmp` to `out`; an existing `out` (--overwrite) is moved aside first, then dropped."""
  if os.path.exists(out):
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=os.path.dirname(out))
    os.rename(out, os.path.join(old, "x"))
    os.rename(tmp, out)
    shutil.rmtree(old)
  else:
    os.rename(tmp, out)


def load_export(out: str) -> tuple[integer.Program, dict]:
  """(program, manifest) of an export directory; every file's sha256 is checked first."""
  path = os.path.join(out, MANIFEST)
  if not os.path.isfile(path):
    raise ExportError(f"--export={out} has no {MANIFEST}: not a qnet export")
  with open(path) as f:
    manifest = json.load(f)
  if manifest.get("format") not in FORMATS:
    raise ExportError(
      f"{path}: format {manifest.get('format')!r}; this qnet reads {', '.join(map(repr, FORMATS))}"
    )
  for name, meta in manifest["files"].items():
    file = os.path.join(out, name)
    if not os.path.isfile(file):
      raise ExportError(f"{file} is missing")
    if _sha256(file) != meta["sha256"]:
      raise ExportError(f"{file} is damaged: sha256 differs from the manifest's")
  from safetensors.numpy import load_file

  stored = load_file(os.path.join(out, WEIGHTS))
  arrays = {}
  for name, d in manifest["tensors"].items():
    arr = stored[name]
    arrays[name] = packing.unpack(arr, d["bits"], tuple(d["shape"])) if "bits" in d else arr
  h, w, c = manifest["input"]["shape"][1:]
  program = integer.Program(
    ops=manifest["ops"],
    arrays=arrays,
    input_shape=(h, w, c),
    num_classes=manifest["output"]["shape"][1],
    layers=manifest["layers"],
    quantizers=dict(manifest.get("quantizers", integer.DOREFA_QUANTIZERS)),
  )
  return program, manifest


# ----------------------------------------------------------------------------- CLI


def _flags():
  from absl import flags

  flags.DEFINE_string("workdir", None, "Workdir of a qnet run (holds config.json, checkpoints/).")
  flags.DEFINE_string("out", None, "Directory to write; must not exist unless --overwrite.")
  flags.DEFINE_integer("step", -1, "Checkpoint step to export; -1: the latest.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
  flags.DEFINE_string(
    "onnx_flavour", "onnxruntime",
    "model.onnx's QDQ form: onnxruntime (uint8 codes; its QLinearConv fusions, OpenVINO) or "
    "tensorrt (int8 codes, float clips and biases: TensorRT's explicit quantization; "
    "activations of at most 7 bits).",
  )
  flags.mark_flags_as_required(["workdir", "out"])
  return flags.FLAGS


def main(argv: list[str]) -> None:
  """`python -m qnet.export`'s body, run by absl after `cli` defined the flags."""
  from absl import app, flags

  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    out = os.path.abspath(FLAGS.out)
    if os.path.exists(out) and not FLAGS.overwrite:
      raise ExportError(f"--out={out} exists; choose a new directory or pass --overwrite")
    from qnet.deploy import qdq_onnx

    if FLAGS.onnx_flavour not in qdq_onnx.FLAVOURS:
      raise ExportError(f"--onnx_flavour={FLAGS.onnx_flavour!r}: one of {', '.join(qdq_onnx.FLAVOURS)}")
    program, info = program_from_run(FLAGS.workdir, FLAGS.step)
    manifest = write_export(out, program, info, FLAGS.overwrite, onnx_flavour=FLAGS.onnx_flavour)
  except ExportError as e:
    print(f"qnet.export: error: {e}", file=sys.stderr)
    sys.exit(2)
  s = manifest["sizes"]
  print(
    f"wrote {out}: step {info['source']['step']}, "
    f"W/A per layer {sorted(set(tuple(v) for v in info_bits(manifest)))}; weights.safetensors "
    f"{manifest['files'][WEIGHTS]['bytes']:,} bytes vs FP32 checkpoint {s['fp32_checkpoint_bytes']:,}"
  )


def info_bits(manifest: dict) -> list[tuple[int, int]]:
  """Per-layer `(weight_bits, act_bits)` of an export's manifest."""
  return [(v["weight_bits"], v["act_bits"]) for v in manifest["layers"].values()]



def cli() -> None:
  """Defines the flags and runs `main` (the entry module `qnet.export` calls this)."""
  from absl import app

  _flags()
  app.run(main)
