"""The QDQ ONNX graph (`qnet.deploy.qdq_onnx`) and the FP32 twin (`onnx_graph.to_fp32_onnx`):
ONNX Runtime's fusions, and the codes of ONNX Runtime and OpenVINO against qnet's integer
path layer by layer (equal in the fused layers; elsewhere any difference a rounding tie)."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qnet.data.datasets import DATASETS
from qnet.deploy import integer, lowering, onnx_graph, qdq_onnx
from test_export import USER_MODEL, bits_for, random_net

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


CASES = [  # name, w, a, keep_fp, quantizers
  ("fmnist_cnn", 2, 2, True, ("dorefa", "dorefa")),
  ("fmnist_cnn", 4, 4, False, ("lsq", "lsq")),  # integer fc -> requant -> integer head
  ("tiny_cnn", 3, 3, False, ("dorefa", "pact")),
  ("tiny_resnet", 2, 2, True, ("dorefa", "dorefa")),  # float residual stream
  # A user's Flax ResNet by rules, every layer quantized: its classifier quantizes a float mean.
  (USER_MODEL, 4, 4, False, ("dorefa", "pact")),
  ("test_rules:BiasCNN", 4, 4, True, ("dorefa", "dorefa")),  # biased convs (Flax's default)
  # Every layer quantized: qnet's head sums the codes over H, W (an integer `mean` dense).
  ("tiny_resnet", 4, 4, False, ("lsq", "lsq")),
]


def _program(name, w, a, keep_fp, quantizers):
  ds = DATASETS["fashion_mnist" if "cnn" in name else "cifar10"]
  shape = (28, 28, 1) if "cnn" in name else (32, 32, 3)
  wq, aq = quantizers
  settings = {"keep_first_last_fp": keep_fp} if ":" in name else {}
  model, params, stats = random_net(name, shape, weight_quantizer=wq, act_quantizer=aq, **settings)
  bits, tree = bits_for(model, shape, w, a, keep_fp)
  program = lowering.build_program(
    model, params, stats, bits, input_shape=shape, mean=ds.mean, std=ds.std, weight_quantizer=wq,
    act_quantizer=aq,
  )
  return program, model, params, stats, tree, ds, shape


def _optimized_ops(model_bytes, tmp_path) -> collections.Counter:
  so = ort.SessionOptions()
  so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
  ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
  return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


FUSED = ("QLinearConv", "QGemm", "int8 CONV_2D", "int8 1x1 CONV_2D")  # ORT's; LiteRT's


def _nhwc(v):
  return np.transpose(v, (0, 2, 3, 1)) if v.ndim == 4 else v


STREAM_OPS = integer.STREAM_OPS


def stream_values(program) -> tuple[list[str], list[str]]:
  """The program's int8 stream codes (the stream ops' outputs) and the `requant`s that read
  them (a block's BatchNorm + input quantizer on the stream)."""
  streams = [op["out"] for op in program.ops if op["op"] in STREAM_OPS]
  on_stream = [op["out"] for op in program.ops if op["op"] == "requant" and op["in"][0] in streams]
  return streams, on_stream


def _their_codes(theirs, op) -> np.ndarray:
  """A runtime's code tensor as qnet's integers (NHWC; int8 stream codes held as `uint8 =
  code + 128` back to signed)."""
  got = _nhwc(theirs[op["out"]])
  shift = 128 if op["op"] in STREAM_OPS and got.dtype == np.uint8 else 0
  return got.astype(np.int64) - shift


def check_codes(program, values, theirs, report, exact_fused: bool):
  """Per code tensor of the program: disagreements of `theirs` (a runtime's debug outputs)
  with qnet's `values`, each shown to be a rounding tie given the runtime's own inputs; fused
  layers (with `exact_fused`) must equal qnet's thresholds on the runtime's input codes.
  Returns {value: number of differing codes}."""
  layer_of = {op["out"]: op for op in program.ops}
  counts = {}
  for op in program.ops:
    if op["out"] not in theirs:
      continue
    got = _their_codes(theirs, op)
    ours = np.asarray(values[op["out"]]).astype(np.int64)
    counts[op["out"]] = int(np.sum(got != ours))
    if op["op"] == "quantize":  # the runtime's own float input, rounded by qnet's formula
      x = _nhwc(theirs[op["in"][0]])
      z = np.asarray(jax.jit(lambda v: integer.quantize_codes(v, op))(jnp.asarray(x))).astype(np.int64)
      differ = got != z
      if differ.any():  # Q's round of the same float32 ops: only an exact half can differ
        assert np.abs(got - z)[differ].max() == 1
      continue
    if op["op"] != "requant":
      continue
    conv = layer_of[op["in"][0]]
    if conv["op"] in STREAM_OPS:  # the stream's BatchNorm and quantizer: a float map here
      if conv["out"] not in theirs:
        continue
      acc, fused, where = _their_codes(theirs, conv), False, conv["out"]
    else:
      j = _nhwc(theirs[conv["in"][0]]).astype(np.int32) if conv["in"][0] in theirs else None
      if j is None:
        continue
      c = integer.signed_codes(program.arrays[conv["weight"]], conv["weight_bits"], integer.weight_quantizer_of(conv))
      c = c.astype(np.int32)
      if conv["op"] == "conv":
        acc = np.asarray(integer._conv(j, c, conv, jnp.int32))
      else:
        acc = np.asarray(integer._dot(j.reshape(len(j), -1), c, jnp.int32))
      entry = report.get(conv["layer"]) or report[f"{conv['layer']} -> requant"]  # several consumers
      fused, where = entry["form"] in FUSED, conv["layer"]
    scale, shift = program.arrays[op["scale"]], program.arrays[op["shift"]]
    sign, u = integer.thresholds(scale, shift, op["bits"])
    want = np.sum((acc * sign)[..., None] >= u, axis=-1)
    differ = got != want
    if fused and exact_fused:
      assert not differ.any(), (where, int(differ.sum()))
    z = scale * acc.astype(np.float64) + shift  # the unrounded code
    distance = np.abs(z - (np.floor(z) + 0.5))
    # A tie: the float32 map (or a runtime's float requant) meets qnet's exact one within
    # float32 error of a boundary m - 1/2.
    tol = 1e-5 * (np.abs(scale * acc) + np.abs(shift) + 1)
    assert np.all(np.abs(got - want)[differ] == 1), where
    assert np.all(distance[differ] <= tol[differ]), (where, distance[differ])
  return counts


@pytest.mark.parametrize("name,w,a,keep_fp,quantizers", CASES)
@pytest.mark.heavy
def test_qdq_graph_fuses_into_int8_kernels_and_its_codes_equal_qnets(tmp_path, name, w, a, keep_fp, quantizers):
  program, *_ = _program(name, w, a, keep_fp, quantizers)
  report = {}
  plain = qdq_onnx.to_onnx(program, report=report).SerializeToString()
  debug = qdq_onnx.to_onnx(program, debug_outputs=True).SerializeToString()
  forms = collections.Counter(v["form"] for v in report.values())
  ops = _optimized_ops(plain, tmp_path)
  # Every integer-to-integer conv became QLinearConv, every such dense QGemm, every dense into
  # float MatMulIntegerToFloat; no ConvInteger/MatMulInteger is left.
  assert forms["QLinearConv"] and ops["QLinearConv"] == forms["QLinearConv"], (forms, ops)
  assert ops.get("QGemm", 0) == forms["QGemm"]
  mmitf = forms["MatMulIntegerToFloat"] + forms["im2col MatMulIntegerToFloat"]
  assert ops.get("MatMulIntegerToFloat", 0) == mmitf
  assert not ops.get("ConvInteger") and not ops.get("MatMulInteger")
  if not keep_fp and name == "tiny_resnet":  # qnet's mean head: the summed codes, a float MatMul
    assert report["head"]["form"] == "float" and not forms["MatMulIntegerToFloat"]
  elif not keep_fp:  # an integer head: a dense into float
    assert forms["MatMulIntegerToFloat"] == 1
  if name == "fmnist_cnn" and not keep_fp:  # fc -> requant (these weights fit; see fit_requant)
    assert forms["QGemm"] == 1
  assert _optimized_ops(debug, tmp_path)["QLinearConv"] == forms["QLinearConv"]  # same kernels

  images = np.random.default_rng(2).integers(0, 256, (6, *program.input_shape)).astype(np.uint8)
  logits, values = integer.make_apply(program, with_values=True)(images)
  sess = ort.InferenceSession(debug, providers=["CPUExecutionProvider"])
  names = [o.name for o in sess.get_outputs()]
  theirs = dict(zip(names, sess.run(None, {"image": images})))
  counts = check_codes(program, values, theirs, report, exact_fused=True)
  assert counts and sum(counts.values()) <= 0.01 * sum(np.asarray(values[k]).size for k in counts)
  np.testing.assert_array_equal(np.argmax(theirs["logits"], -1), np.argmax(logits, -1))
  np.testing.assert_allclose(theirs["logits"], logits, atol=0.05 * float(np.abs(logits).max()))


def test_convs_into_the_float_stream_as_im2col_int8_matmuls_give_qnets_accumulators(tmp_path, monkeypatch):
  # tiny_resnet's convs are below the size where this form pays; force it on every one.
  monkeypatch.setattr(qdq_onnx, "IM2COL_MIN_K", 1)
  program, *_ = _program("tiny_resnet", 4, 4, True, ("dorefa", "dorefa"))
  report = {}
  model = qdq_onnx.to_onnx(program, debug_outputs=True, report=report).SerializeToString()
  forms = collections.Counter(v["form"] for v in report.values())
  # conv2 of each block and the strided 1x1 shortcut (a Slice with steps, no Concat)
  assert forms["im2col MatMulIntegerToFloat"] >= 3 and not forms["float"], forms
  assert _optimized_ops(model, tmp_path)["MatMulIntegerToFloat"] == forms["im2col MatMulIntegerToFloat"]
  images = np.random.default_rng(4).integers(0, 256, (6, *program.input_shape)).astype(np.uint8)
  logits, values = integer.make_apply(program, with_values=True)(images)
  sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
  theirs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": images})))
  counts = check_codes(program, values, theirs, report, exact_fused=True)
  # The residual stream's sums are qnet's own float32 `acc * factor` (no float conv's own
  # summation order): every code equals qnet's, not merely up to ties.
  assert sum(counts.values()) == 0, counts
  np.testing.assert_allclose(theirs["logits"], logits, rtol=1e-5, atol=1e-5)
  ov = pytest.importorskip("openvino")  # OpenVINO reads the same graph
  compiled = ov.Core().compile_model(ov.Core().read_model(model, b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
  out = compiled.create_infer_request().infer({0: images})
  theirs = {k.get_any_name(): np.asarray(v) for k, v in out.items()}
  counts = check_codes(program, values, theirs, report, exact_fused=False)
  assert sum(counts.values()) <= 0.01 * sum(np.asarray(values[k]).size for k in counts)
  np.testing.assert_array_equal(np.argmax(theirs["logits"], -1), np.argmax(logits, -1))


@pytest.mark.parametrize(
  "padding,strides,kernel",
  [
    (((0, 1), (1, 0)), (2, 1), (3, 2)),
    (((0, 0), (1, 0)), (1, 2), (3, 2)),
    (((1, 1), (0, 0)), (1, 1), (3, 2)),
    (((0, 1), (0, 0)), (1, 1), (1, 2)),  # two patches
    (((0, 0), (0, 0)), (2, 2), (1, 1)),  # one patch: no Concat
  ],
)
def test_im2col_matmul_is_the_integer_conv_on_non_square_inputs_and_one_sided_pads(padding, strides, kernel):
  """The im2col form alone on a 5x7 input, non-square kernels, one-sided and height- or
  width-only pads and unequal strides (the networks above are square with symmetric pads):
  its float output equals qnet's int32 convolution exactly."""
  rng = np.random.default_rng(0)
  b, h, w, cin, cout = 2, 5, 7, 3, 4
  codes = rng.integers(-7, 8, (*kernel, cin, cout))
  x = rng.integers(0, 16, (b, h, w, cin)).astype(np.uint8)
  op = {"padding": padding, "strides": strides}
  g = onnx_graph.Graph()
  g.flavour = "onnxruntime"
  y = qdq_onnx._im2col_matmul(g, "x", codes, op, (h, w, cin))
  tp, helper = onnx.TensorProto, onnx.helper
  model = helper.make_model(
    helper.make_graph(
      g.nodes, "im2col", [helper.make_tensor_value_info("x", tp.UINT8, [b, cin, h, w])],
      [helper.make_tensor_value_info(y, tp.FLOAT, None)], g.inits,
    ),
    opset_imports=[helper.make_opsetid("", onnx_graph.OPSET)],
  )  # fmt: skip
  sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
  got = sess.run(None, {"x": np.transpose(x, (0, 3, 1, 2))})[0]
  want = np.asarray(integer._conv(x.astype(np.int32), codes.astype(np.int32), op, jnp.int32))
  assert got.shape == want.shape
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name,w,a,keep_fp,quantizers", CASES[:2] + CASES[3:])
@pytest.mark.heavy
def test_openvino_runs_the_qdq_file_with_qnets_codes(name, w, a, keep_fp, quantizers):
  ov = pytest.importorskip("openvino")
  program, *_ = _program(name, w, a, keep_fp, quantizers)
  report = {}
  debug = qdq_onnx.to_onnx(program, debug_outputs=True, report=report)
  images = np.random.default_rng(2).integers(0, 256, (6, *program.input_shape)).astype(np.uint8)
  logits, values = integer.make_apply(program, with_values=True)(images)
  core = ov.Core()
  model = core.read_model(debug.SerializeToString(), b"")
  compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
  out = compiled.create_infer_request().infer({0: images})
  theirs = {k.get_any_name(): np.asarray(v) for k, v in out.items()}
  counts = check_codes(program, values, theirs, report, exact_fused=False)
  assert counts and sum(counts.values()) <= 0.01 * sum(np.asarray(values[k]).size for k in counts)
  np.testing.assert_array_equal(np.argmax(theirs["logits"], -1), np.argmax(logits, -1))
  np.testing.assert_allclose(theirs["logits"], logits, atol=0.05 * float(np.abs(logits).max()))


@pytest.mark.parametrize("name,w,a,keep_fp,quantizers", [CASES[0], CASES[3], CASES[4], CASES[1]])
@pytest.mark.heavy
def test_tensorrt_flavour_keeps_tensorrts_rules_and_qnets_codes(tmp_path, name, w, a, keep_fp, quantizers):
  program, *_ = _program(name, w, a, keep_fp, quantizers)
  ort_graph = qdq_onnx.to_onnx(program)
  assert qdq_onnx.tensorrt_violations(ort_graph)  # uint8 codes, int32 biases, integer clips
  report = {}
  plain = qdq_onnx.to_onnx(program, flavour="tensorrt", report=report)
  assert qdq_onnx.tensorrt_violations(plain) == []
  assert collections.Counter(v["form"] for v in report.values())["int8 Q/DQ Conv"]
  debug = qdq_onnx.to_onnx(program, flavour="tensorrt", debug_outputs=True)
  # Not TensorRT itself (not here): ONNX Runtime runs the same graph, with qnet's codes up
  # to float32 ties (its float-output convs are float convs on the DQ'd weights).
  images = np.random.default_rng(2).integers(0, 256, (6, *program.input_shape)).astype(np.uint8)
  logits, values = integer.make_apply(program, with_values=True)(images)
  sess = ort.InferenceSession(debug.SerializeToString(), providers=["CPUExecutionProvider"])
  theirs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": images})))
  counts = check_codes(program, values, theirs, report, exact_fused=False)
  assert counts and sum(counts.values()) <= 0.01 * sum(np.asarray(values[k]).size for k in counts)
  np.testing.assert_array_equal(np.argmax(theirs["logits"], -1), np.argmax(logits, -1))
  np.testing.assert_allclose(theirs["logits"], logits, atol=0.05 * float(np.abs(logits).max()))


STREAM_CASES = [  # tiny_resnet with an int8 residual stream: w, a, quantizers, per_channel
  (2, 2, ("dorefa", "dorefa"), False),
  (4, 4, ("lsq", "lsq"), True),  # per-channel steps: a multiplier per channel into the stream
  (4, 4, ("lsq", "lsq"), "negative step"),  # stage 2's step < 0 (LSQ's mirrored grid)
  # DoReFa's 8-bit weight codes (odd, up to 255) do not fit int8: every conv takes the float
  # form (into the stream: the float conv of the codes times M, then Q), still exact.
  (8, 4, ("dorefa", "dorefa"), False),
]


def _int8_weights(w, quantizers) -> bool:
  """Do the stream case's weight codes fit int8 (the fused forms)?"""
  return not (quantizers[0] == "dorefa" and w == 8)


def _stream_program(w, a, quantizers, per_channel):
  negative = per_channel == "negative step"
  per_channel = per_channel is True
  shape, ds = (32, 32, 3), DATASETS["cifar10"]
  wq, aq = quantizers
  model, params, stats = random_net(
    "tiny_resnet", shape, residual_bits=8, weight_quantizer=wq, act_quantizer=aq, per_channel=per_channel
  )
  if negative:  # its multipliers into the stream are negative: the sign goes into the weights
    params["stage2_stream"]["act_clip"] = -params["stage2_stream"]["act_clip"]
  bits, tree = bits_for(model, shape, w, a, True)
  program = lowering.build_program(
    model, params, stats, bits, input_shape=shape, mean=ds.mean, std=ds.std, per_channel=per_channel,
    weight_quantizer=wq, act_quantizer=aq,
  )
  return program, model, {"params": params, "batch_stats": stats, "precision": tree}, ds


@pytest.mark.parametrize("w,a,quantizers,per_channel", STREAM_CASES)
@pytest.mark.heavy
def test_int8_residual_stream_runs_as_qlinearconv_and_qlinearadd_with_qnets_codes(tmp_path, w, a, quantizers, per_channel):
  """`quant.residual_bits=8`: the program equals the fake-quant network; in the QDQ graph
  every integer conv (into k-bit codes or into the stream) is a QLinearConv, every block
  sum a QLinearAdd and every BatchNorm + quantizer on the stream (a `requant` of stream codes)
  a depthwise 1x1 QLinearConv, and the codes of ONNX Runtime are qnet's, those of its
  TensorRT flavour and OpenVINO too up to ties."""
  program, model, variables, ds = _stream_program(w, a, quantizers, per_channel)
  kinds = collections.Counter(op["op"] for op in program.ops)
  assert kinds["requant_stream"] == 3 and kinds["stream_add"] == 2 and kinds["stream_quantize"] == 1
  assert kinds["add"] == 0  # no float sum left
  images = np.random.default_rng(3).integers(0, 256, (8, *program.input_shape)).astype(np.uint8)
  logits, values = integer.make_apply(program, with_values=True)(images)
  x = (images.astype(np.float32) / 255.0 - np.asarray(ds.mean, np.float32)) / np.asarray(ds.std, np.float32)
  fake = model.apply(variables, x, train=False)
  np.testing.assert_allclose(logits, fake, rtol=1e-4, atol=1e-4)

  report = {}
  plain = qdq_onnx.to_onnx(program, report=report).SerializeToString()
  fused = _int8_weights(w, quantizers)
  forms = {"QLinearConv"} if fused else {"float", "float requant"}
  assert {f["form"] for f in report.values()} == forms and len(report) == 5
  assert sum(f.get("into") == "int8 stream" for f in report.values()) == 3
  ops = _optimized_ops(plain, tmp_path)
  streams, on_stream = stream_values(program)
  assert len(on_stream) == 2
  assert ops["QLinearConv"] == 5 * fused + len(on_stream) and ops["QLinearAdd"] == 2, ops
  assert ops["Conv"] == 1 + 5 * (not fused)  # the 32-bit stem (and the float forms)
  graphs = {"onnxruntime": qdq_onnx.to_onnx(program, debug_outputs=True)}
  trt_report = {}
  trt = qdq_onnx.to_onnx(program, flavour="tensorrt", report=trt_report)
  assert qdq_onnx.tensorrt_violations(trt) == []
  into_stream = {f["form"] for f in trt_report.values() if f.get("into") == "int8 stream"}
  assert into_stream == ({"int8 Q/DQ Conv"} if fused else {"float"}), trt_report
  graphs["tensorrt"] = qdq_onnx.to_onnx(program, flavour="tensorrt", debug_outputs=True)
  runs = {}
  for flavour, graph in graphs.items():
    sess = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    runs[flavour] = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": images})))
  ov = pytest.importorskip("openvino")
  compiled = ov.Core().compile_model(
    ov.Core().read_model(graphs["onnxruntime"].SerializeToString(), b""), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
  )
  out = compiled.create_infer_request().infer({0: images})
  runs["openvino"] = {name: np.asarray(v) for k, v in out.items() for name in k.get_names()}
  for where, theirs in runs.items():
    assert set(streams) <= set(theirs), where
    counts = check_codes(program, values, theirs, report, exact_fused=where == "onnxruntime")
    if where == "onnxruntime":  # QLinearConv and QLinearAdd are the program's formulas
      assert all(counts[s] == 0 for s in streams + on_stream), counts
    assert sum(counts.values()) <= 0.01 * sum(np.asarray(values[k]).size for k in counts), (where, counts)
    np.testing.assert_array_equal(np.argmax(theirs["logits"], -1), np.argmax(logits, -1))
    np.testing.assert_allclose(theirs["logits"], logits, atol=0.05 * float(np.abs(logits).max()))
  twin = ort.InferenceSession(onnx_graph.to_fp32_onnx(program).SerializeToString(), providers=["CPUExecutionProvider"])
  fp = twin.run(["logits"], {"image": images})[0]
  np.testing.assert_allclose(fp, logits, atol=0.5 * float(np.abs(logits).max()))  # unrounded: close, not equal


def test_stream_requant_falls_back_to_the_float_map_with_qnets_codes_up_to_ties(tmp_path, monkeypatch):
  """Where a channel of a stream requant did not fit (none has on the test networks), the map
  runs as float ops on the DQ'd stream codes: no depthwise conv, codes equal up to ties."""
  monkeypatch.setattr(qdq_onnx, "stream_requant_fit", lambda op, arrays: None)
  program, *_ = _stream_program(4, 4, ("lsq", "lsq"), True)
  report = {}
  assert _optimized_ops(qdq_onnx.to_onnx(program, report=report).SerializeToString(), tmp_path)["QLinearConv"] == 5
  images = np.random.default_rng(3).integers(0, 256, (8, *program.input_shape)).astype(np.uint8)
  logits, values = integer.make_apply(program, with_values=True)(images)
  sess = ort.InferenceSession(qdq_onnx.to_onnx(program, debug_outputs=True).SerializeToString(), providers=["CPUExecutionProvider"])
  theirs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": images})))
  _, on_stream = stream_values(program)
  counts = check_codes(program, values, theirs, report, exact_fused=True)
  assert set(on_stream) <= set(counts)  # each checked: equal, or a tie of the float map
  assert sum(counts[v] for v in on_stream) <= 0.01 * sum(np.asarray(values[v]).size for v in on_stream)
  np.testing.assert_array_equal(np.argmax(theirs["logits"], -1), np.argmax(logits, -1))


def _tiny(nodes, inits, inputs, outputs, shape=(2, 3)):
  """A model of `nodes` on named initializers (name -> array) and typed graph inputs/outputs."""
  h = onnx.helper
  graph = h.make_graph(
    nodes, "t", [h.make_tensor_value_info(n, t, shape) for n, t in inputs],
    [h.make_tensor_value_info(n, t, None) for n, t in outputs],
    [onnx.numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
  )  # fmt: skip
  return h.make_model(graph, opset_imports=[h.make_opsetid("", onnx_graph.OPSET), h.make_opsetid("custom", 1)])


@pytest.mark.parametrize(
  "op", ["ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd"]
)
def test_tensorrt_violations_names_every_integer_operator(op):
  tp = onnx.TensorProto
  # uint8 codes with float scales where the operator takes them (QLinear*: x, scale, zero, ...)
  ins = list("ufuufuf"[: 7 if op in ("QLinearConv", "QLinearMatMul") else 1])
  model = _tiny(
    [onnx.helper.make_node(op, ["u", *ins], ["y"])], {}, [("u", tp.UINT8), ("f", tp.FLOAT)], [("y", tp.FLOAT)], None
  )
  found = qdq_onnx.tensorrt_violations(model)
  assert found[0] == f"{op} y: an integer operator"
  assert set(found[1:]) == {f"{op} y: reads the integer tensor u"}


def test_tensorrt_violations_names_each_broken_q_dq_rule():
  """One graph per rule TensorRT's explicit quantization sets (zero point an int8 0, present;
  an activation scale one number; DQ of int8 only; integer tensors read only by DQ and shape
  ops), each giving exactly its line; the graphs that keep them all give none."""
  tp, node = onnx.TensorProto, onnx.helper.make_node
  s, s2 = np.float32(0.5), np.full(2, 0.5, np.float32)  # per tensor; per channel (axis 1 of 2)
  z8, zu8, z8_one, z2 = np.int8(0), np.uint8(0), np.int8(1), np.zeros(2, np.int8)

  def violations(nodes, inits, out=("y", tp.FLOAT)):
    return qdq_onnx.tensorrt_violations(_tiny(nodes, inits, [("x", tp.FLOAT)], [out], (2, 2)))

  def pair(q_ins, dq_ins, **dq_attrs):
    return [node("QuantizeLinear", q_ins, ["q"]), node("DequantizeLinear", dq_ins, ["y"], **dq_attrs)]

  assert violations(pair(["x", "s", "z"], ["q", "s", "z"]), {"s": s, "z": z8}) == []  # rule-abiding
  assert violations(pair(["x", "s", "z"], ["q", "s", "z"]), {"s": s, "z": zu8}) == [
    "QuantizeLinear q: zero point must be an int8 0",
    "DequantizeLinear y: zero point must be an int8 0",
    "DequantizeLinear y: dequantizes a UINT8 tensor",
  ]
  one = {"s": s, "z": z8, "z1": z8_one}
  assert violations(pair(["x", "s", "z1"], ["q", "s", "z"]), one) == ["QuantizeLinear q: zero point must be an int8 0"]
  assert violations(pair(["x", "s"], ["q", "s", "z"]), {"s": s, "z": z8}) == [  # no zero point: uint8
    "QuantizeLinear q: zero point must be an int8 0", "DequantizeLinear y: dequantizes a UINT8 tensor"
  ]  # fmt: skip
  per_channel = {"s": s, "s2": s2, "z": z8, "z2": z2}
  q_axis = [node("QuantizeLinear", ["x", "s2", "z2"], ["q"], axis=1), node("DequantizeLinear", ["q", "s", "z"], ["y"])]
  assert violations(q_axis, per_channel) == ["QuantizeLinear q: an activation scale must be one constant"]
  dq_axis = pair(["x", "s", "z"], ["q", "s2", "z2"], axis=1)  # an activation's DQ, per channel
  assert violations(dq_axis, per_channel) == ["DequantizeLinear y: an activation scale must be one constant"]
  weight = [node("DequantizeLinear", ["w", "s2", "z2"], ["wf"], axis=1), node("MatMul", ["x", "wf"], ["y"])]
  assert violations(weight, {"w": np.ones((2, 2), np.int8), **per_channel}) == []  # a weight's: fine
  custom = [node("Mystery", ["x"], ["u"], domain="custom"), node("DequantizeLinear", ["u", "s", "z"], ["y"])]
  assert violations(custom, {"s": s, "z": z8}) == ["DequantizeLinear y: dequantizes a UNDEFINED tensor"]
  shape_ops = [  # integer tensors through shape ops are fine; a float op reading one is not
    node("QuantizeLinear", ["x", "s", "z"], ["q"]),
    node("Flatten", ["q"], ["f"]), node("Reshape", ["q", "shape"], ["r"]), node("Identity", ["q"], ["i"]),
    node("Cast", ["q"], ["c"], to=tp.FLOAT), node("Add", ["c", "c"], ["y"]),
  ]  # fmt: skip
  assert violations(shape_ops, {"s": s, "z": z8, "shape": np.array([4], np.int64)}) == []
  reads = [node("QuantizeLinear", ["x", "s", "z"], ["q"]), node("Add", ["q", "q"], ["y"])]
  assert violations(reads, {"s": s, "z": z8}, out=("y", tp.INT8)) == [
    "Add y: reads the integer tensor q", "Add y: reads the integer tensor q"
  ]  # fmt: skip


def test_tensorrt_flavour_refuses_8_bit_activations():
  program, *_ = _program("tiny_cnn", 4, 8, False, ("dorefa", "dorefa"))
  with pytest.raises(ValueError, match="at most 7 bits.* has 8"):
    qdq_onnx.to_onnx(program, flavour="tensorrt")
  with pytest.raises(ValueError, match="flavour='trt'"):
    qdq_onnx.to_onnx(program, flavour="trt")


def test_fp32_twin_is_the_network_with_float_activations():
  """DoReFa's 32-bit activation is the quantizer's clip, so the FP32 twin equals the
  fake-quant network at (w, 32) bits: quantized weights, unrounded activations."""
  program, model, params, stats, _, ds, shape = _program("tiny_resnet", 2, 2, False, ("dorefa", "dorefa"))
  _, tree = bits_for(model, shape, 2, 32, False)
  fp32 = onnx_graph.to_fp32_onnx(program)
  kinds = {n.op_type for n in fp32.graph.node}
  assert not kinds & {"QuantizeLinear", "DequantizeLinear", "ConvInteger", "MatMulInteger"}
  images = np.random.default_rng(3).integers(0, 256, (5, *shape)).astype(np.uint8)
  sess = ort.InferenceSession(fp32.SerializeToString(), providers=["CPUExecutionProvider"])
  got = sess.run(["logits"], {"image": images})[0]
  x = (images.astype(np.float32) / 255.0 - np.float32(ds.mean)) / np.float32(ds.std)
  want = model.apply({"params": params, "batch_stats": stats, "precision": tree}, x, train=False)
  np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4)


def test_rules_that_mix_quantizers_run_in_onnx_runtime_with_qnets_codes(tmp_path):
  shape, ds = (16, 16, 1), DATASETS["fashion_mnist"]
  model, params, stats = random_net(USER_MODEL, shape, rules="test_export:MIXED_RULES")
  bits, _ = bits_for(model, shape, 3, 4, False)
  program = lowering.build_program(model, params, stats, bits, input_shape=shape, mean=ds.mean, std=ds.std)
  assert program.quantizers == {"weight": "mixed", "act": "mixed"}
  report = {}
  debug = qdq_onnx.to_onnx(program, debug_outputs=True, report=report).SerializeToString()
  images = np.random.default_rng(2).integers(0, 256, (6, *shape)).astype(np.uint8)
  logits, values = integer.make_apply(program, with_values=True)(images)
  sess = ort.InferenceSession(debug, providers=["CPUExecutionProvider"])
  theirs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"image": images})))
  counts = check_codes(program, values, theirs, report, exact_fused=True)
  assert counts and sum(counts.values()) <= 0.01 * sum(np.asarray(values[k]).size for k in counts)
  np.testing.assert_array_equal(np.argmax(theirs["logits"], -1), np.argmax(logits, -1))
  np.testing.assert_allclose(theirs["logits"], logits, atol=0.05 * float(np.abs(logits).max()))
