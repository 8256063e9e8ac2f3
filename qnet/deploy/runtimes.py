"""The deployment runtimes as `uint8 images -> logits` functions, and how they are timed.

One place for what `qnet.evaluate`, `experiments/deploy_speed.py` and the other speed scripts
share: ONNX Runtime (CPU provider), OpenVINO (CPU plugin) and LiteRT sessions with a thread
count, the timing loop, and the machine facts recorded with every speed figure (CPU flags:
whether int8 kernels have VNNI; the load).
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

Fn = Callable[[np.ndarray], np.ndarray]
FLAGS = ("avx512_vnni", "avx_vnni", "avx512f", "avx512_bf16", "amx_int8", "avx2", "fma")


def cpu_flags() -> list[str]:
  """The CPU flags that decide which int8/float kernels run (from /proc/cpuinfo)."""
  try:
    with open("/proc/cpuinfo") as f:
      line = next(l for l in f if l.startswith("flags"))
  except (OSError, StopIteration):
    return []
  have = set(line.split(":", 1)[1].split())
  return [f for f in FLAGS if f in have]


def load() -> list[float]:
  """The 1-, 5- and 15-minute load averages."""
  with open("/proc/loadavg") as f:
    return [float(v) for v in f.read().split()[:3]]


def ort_fn(path: str, threads: int | None = None, output: str = "logits") -> Fn:
  """An ONNX file on ONNX Runtime's CPU provider (`threads` intra-op threads; None: its
  default), run sequentially."""
  import onnxruntime as ort

  so = ort.SessionOptions()
  if threads:
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
  so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
  sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
  return lambda x: sess.run([output], {"image": x})[0]


def openvino_fn(path: str, threads: int | None = None, batch: int | None = None) -> Fn:
  """An ONNX file on OpenVINO's CPU plugin: f32 precision hint (its float parts are not run
  in bf16 on CPUs that have it; the Q/DQ layers run int8), one stream; with `batch`, compiled
  for that static batch size."""
  import openvino as ov

  core = ov.Core()
  model = core.read_model(path)
  if batch:  # the input is [batch, H, W, C] with H, W, C static
    dims = [d.get_length() for d in list(model.input(0).get_partial_shape())[1:]]
    model.reshape({"image": [batch, *dims]})
  config = {"INFERENCE_PRECISION_HINT": "f32"}
  if threads:
    config.update(INFERENCE_NUM_THREADS=threads, NUM_STREAMS=1)
  request = core.compile_model(model, "CPU", config).create_infer_request()
  return lambda x: np.array(request.infer({0: x})[0])


def litert_fn(model: bytes | str, threads: int | None = None) -> Fn:
  """A `.tflite` file (path or bytes) on the LiteRT interpreter (XNNPACK)."""
  from qnet.deploy import litert

  return litert.interpreter_fn(model, threads)


def time_fn(fn: Fn, x: np.ndarray, seconds: float) -> float:
  """images/s: calls until `seconds` have passed (at least 3), after one warm-up call."""
  fn(x)
  calls, start = 0, time.perf_counter()
  while calls < 3 or time.perf_counter() - start < seconds:
    fn(x)
    calls += 1
  return calls * len(x) / (time.perf_counter() - start)

