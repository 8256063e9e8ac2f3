"""LiteRT (`qnet.deploy.litert`): the `.tflite` file runs its integer layers on int8 kernels
with qnet's exact codes, and its FP32 twin is the network with float activations."""

import collections

import numpy as np
import pytest

from qnet.deploy import integer, litert, onnx_graph
from test_qdq_onnx import CASES, STREAM_CASES, _int8_weights, _program, _stream_program, check_codes, stream_values

pytest.importorskip("ai_edge_litert")
tf = pytest.importorskip("tensorflow")


def _ops(model: bytes) -> collections.Counter:
  """(op name, dtype of its first input) of every op LiteRT runs, without its delegate."""
  from ai_edge_litert.interpreter import Interpreter, OpResolverType

  it = Interpreter(model_content=model, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
  it.allocate_tensors()
  dtypes = {d["index"]: d["dtype"] for d in it.get_tensor_details()}
  return collections.Counter(
    (op["op_name"], np.dtype(dtypes[op["inputs"][0]]).name) for op in it._get_ops_details()
  )


def _debug_run(program, seed: int):
  """6 random images, qnet's logits and values, and LiteRT's debug outputs (as NCHW, the
  layout `check_codes` compares: LiteRT's tensors are NHWC already)."""
  images = np.random.default_rng(seed).integers(0, 256, (6, *program.input_shape)).astype(np.uint8)
  logits, values = integer.make_apply(program, with_values=True)(images)
  debug = litert.interpreter_fn(litert.to_tflite(program, debug_outputs=True), outputs=True)
  theirs = {k: np.asarray(v) for k, v in debug(images).items()}
  theirs = {k: (v.transpose(0, 3, 1, 2) if v.ndim == 4 else v) for k, v in theirs.items()}
  return images, logits, values, theirs


@pytest.mark.parametrize("name,w,a,keep_fp,quantizers", CASES)
@pytest.mark.heavy
def test_tflite_runs_int8_kernels_with_qnets_codes(name, w, a, keep_fp, quantizers):
  program, *_ = _program(name, w, a, keep_fp, quantizers)
  report = {}
  plain = litert.to_tflite(program, report=report)
  forms = collections.Counter(v["form"] for v in report.values())
  ops = _ops(plain)
  # Every fused layer is an int8 kernel; no integer layer is left to a float conv beyond the
  # forms the report names.
  assert forms["int8 CONV_2D"], forms
  assert ops[("CONV_2D", "int8")] == forms["int8 CONV_2D"] + forms["int8 1x1 CONV_2D"], (forms, ops)
  assert not ops[("FULLY_CONNECTED", "int8")], ops
  if name == "fmnist_cnn" and not keep_fp:  # fc -> requant (as in the QDQ graph's QGemm)
    assert forms["int8 1x1 CONV_2D"] == 1

  images, logits, values, theirs = _debug_run(program, seed=2)
  counts = check_codes(program, values, theirs, report, exact_fused=True)
  assert counts and sum(counts.values()) <= 0.01 * sum(np.asarray(values[k]).size for k in counts)
  np.testing.assert_array_equal(np.argmax(theirs["logits"], -1), np.argmax(logits, -1))
  np.testing.assert_allclose(theirs["logits"], logits, atol=0.05 * float(np.abs(logits).max()))
  got = litert.interpreter_fn(plain, threads=2)(images)  # the plain file: the same logits
  np.testing.assert_allclose(got, theirs["logits"], rtol=1e-5, atol=1e-5)


def test_tflite_fp32_twin_equals_the_onnx_twin():
  ort = pytest.importorskip("onnxruntime")
  program, *_ = _program("tiny_resnet", 2, 2, True, ("dorefa", "dorefa"))
  model = litert.to_tflite(program, float_twin=True)
  assert not {k for k, _ in _ops(model)} & {"QUANTIZE", "DEQUANTIZE"}
  images = np.random.default_rng(3).integers(0, 256, (5, *program.input_shape)).astype(np.uint8)
  got = litert.interpreter_fn(model)(images)
  sess = ort.InferenceSession(onnx_graph.to_fp32_onnx(program).SerializeToString(), providers=["CPUExecutionProvider"])
  np.testing.assert_allclose(got, sess.run(["logits"], {"image": images})[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("w,a,quantizers,per_channel", STREAM_CASES)
@pytest.mark.heavy
def test_tflite_int8_residual_stream_runs_int8_convs_and_adds_with_qnets_codes(w, a, quantizers, per_channel):
  program, *_ = _stream_program(w, a, quantizers, per_channel)
  report = {}
  plain = litert.to_tflite(program, report=report)
  fused = _int8_weights(w, quantizers)
  forms = {"int8 CONV_2D"} if fused else {"float", "float requant"}
  assert {f["form"] for f in report.values()} == forms and len(report) == 5
  ops = _ops(plain)
  assert ops[("CONV_2D", "int8")] == 5 * fused and ops[("ADD", "int8")] == 2, ops
  # The float forms stay float (the converter would quantize their weights itself otherwise).
  assert ops[("CONV_2D", "float32")] == 1 + 5 * (not fused), ops
  # The BatchNorm + quantizer on the stream: int8 1x1 depthwise convs (TF merges two equal ones:
  # DoReFa's conv1 and shortcut quantizers of one stream value are the same map).
  assert ops[("DEPTHWISE_CONV_2D", "int8")] == (1 if quantizers[1] == "dorefa" else 2), ops
  images, logits, values, theirs = _debug_run(program, seed=3)
  counts = check_codes(program, values, theirs, report, exact_fused=True)
  streams, on_stream = stream_values(program)
  assert len(on_stream) == 2  # XNNPACK's int8 conv, depthwise conv and add: qnet's formulas
  assert all(counts[s] == 0 for s in streams + on_stream), counts
  assert sum(counts.values()) <= 0.01 * sum(np.asarray(values[k]).size for k in counts)
  np.testing.assert_array_equal(np.argmax(theirs["logits"], -1), np.argmax(logits, -1))
  twin = litert.interpreter_fn(litert.to_tflite(program, float_twin=True))(images)
  ort = pytest.importorskip("onnxruntime")
  sess = ort.InferenceSession(onnx_graph.to_fp32_onnx(program).SerializeToString(), providers=["CPUExecutionProvider"])
  np.testing.assert_allclose(twin, sess.run(["logits"], {"image": images})[0], rtol=1e-4, atol=1e-4)
