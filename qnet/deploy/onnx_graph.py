"""ONNX form of an integer `Program` (qnet.deploy.integer), built with the `onnx` helper API.

Same input and output as the StableHLO export: raw `uint8` images `[B, H, W, C]` (batch
symbolic) in, float32 logits `[B, classes]` out. Inside, the network runs NCHW (ONNX's
layout). Integer layers are `ConvInteger` / `MatMulInteger` with `uint8` activation codes
and `int8` weight codes (DoReFa `2i - n`, LSQ `i - 2**(k-1)`; int32 accumulators); 8-bit
DoReFa weights, whose codes do not fit int8, are split exactly as `2 ((c - 1) / 2) + 1`
into two integer ops. Activation codes are made and read by the program's quantizer
(DoReFa, PACT, LSQ) with the same float32 operations as `qnet.deploy.integer`. The requant
step is the integer thresholds of `qnet.deploy.integer.thresholds` (`GreaterOrEqual` on int32,
summed). Opset 17; runs on onnxruntime's CPU provider.
"""

from __future__ import annotations

import numpy as np

from qnet.deploy import integer

OPSET = 17


def _onnx():
  try:
    import onnx
  except ImportError as e:  # optional extra
    raise ImportError("ONNX export needs the `onnx` package: pip install 'qnet[export]'") from e
  return onnx


class _Graph:
  def __init__(self):
    onnx = _onnx()
    self.helper, self.numpy_helper, self.TensorProto = onnx.helper, onnx.numpy_helper, onnx.TensorProto
    self.nodes, self.inits = [], []
    self._count = 0

  def const(self, array: np.ndarray, hint: str = "c") -> str:
    self._count += 1
    name = f"{hint}_{self._count}"
    self.inits.append(self.numpy_helper.from_array(np.asarray(array), name))
    return name

  def node(self, op: str, ins: list[str], hint: str = "t", **attrs) -> str:
    self._count += 1
    out = f"{hint}_{self._count}"
    self.nodes.append(self.helper.make_node(op, ins, [out], **attrs))
    return out


def _pads(padding) -> list[int]:
  (t, b), (l, r) = padding
  return [int(t), int(l), int(b), int(r)]


def to_onnx(program: integer.Program, opset: int = OPSET):
  """The `onnx.ModelProto` of `program` (checked with `onnx.checker`)."""
  onnx = _onnx()
  g = _Graph()
  env: dict[str, tuple[str, int]] = {}  # value name -> (onnx name, rank)
  for op in program.ops:
    x, rank = env.get(op["in"][0], ("image", 4))
    env[op["out"]] = _op(g, op, x, rank, program.arrays, env)
  model = _model(g, program, opset)
  onnx.checker.check_model(model)
  return model


def _chw(vec: np.ndarray, rank: int) -> np.ndarray:
  """A per-channel vector shaped to broadcast over NCHW (rank 4) or NC (rank 2)."""
  return vec.reshape((-1, 1, 1) if rank == 4 else (-1,))


def _op(g: _Graph, op: dict, x: str, rank: int, arrays, env) -> tuple[str, int]:
  """Emits one program op reading `x` (of `rank`); its output name and rank."""
  kind = op["op"]
  if kind in ("conv", "dense"):
    return _layer(g, op, x, rank, arrays)
  if kind in ("preprocess", "quantize", "clip", "dequant_codes", "dequant", "requant"):
    return _codes_op(g, op, x, rank, arrays), rank
  if kind == "batchnorm":
    var, scale = arrays[op["var"]], arrays[op["scale"]]
    mul = (np.float32(1.0) / np.sqrt(var + np.float32(op["eps"]))) * scale
    y = g.node("Sub", [x, g.const(_chw(arrays[op["mean"]], rank))])
    y = g.node("Mul", [y, g.const(_chw(mul.astype(np.float32), rank))])
    return g.node("Add", [y, g.const(_chw(arrays[op["bias"]], rank))]), rank
  if kind == "maxpool":
    attrs = dict(kernel_shape=op["window"], strides=op["strides"], pads=_pads(op["padding"]))
    return g.node("MaxPool", [x], **attrs), rank
  if kind == "relu":
    return g.node("Relu", [x]), rank
  if kind == "add":
    return g.node("Add", [x, env[op["in"][1]][0]]), rank
  if kind == "output":
    g.node("Identity", [x])
    g.nodes[-1].output[0] = "logits"
    return "logits", rank
  raise ValueError(f"unknown op {kind!r}")


def _codes_op(g: _Graph, op: dict, x: str, rank: int, arrays) -> str:
  """Emits an op that moves between float values and integer activation codes."""
  tp = g.TensorProto
  kind = op["op"]
  if kind == "preprocess":
    y = g.node("Cast", [x], to=tp.FLOAT)
    y = g.node("Div", [y, g.const(np.float32(255.0))])
    y = g.node("Sub", [y, g.const(np.asarray(op["mean"], np.float32))])
    y = g.node("Div", [y, g.const(np.asarray(op["std"], np.float32))])
    return g.node("Transpose", [y], perm=[0, 3, 1, 2])
  if kind == "clip":
    return g.node("Clip", [x, g.const(np.float32(0)), g.const(np.float32(1))])
  if kind == "dequant":
    factor = op["factor"]  # a number, or a per-channel tensor's name
    f = _chw(arrays[factor], rank) if isinstance(factor, str) else np.float32(factor)
    y = g.node("Mul", [g.node("Cast", [x], to=tp.FLOAT), g.const(np.asarray(f, np.float32))])
    return g.node("Add", [y, g.const(_chw(arrays[op["bias"]], rank))]) if op["bias"] else y
  n = np.float32(integer.levels(op["bits"]))
  quantizer = op.get("quantizer", "dorefa")
  if kind == "quantize":  # the float32 operations of integer.quantize_codes
    if quantizer == "lsq":
      y = g.node("Div", [x, g.const(np.float32(op["step"]))])
      y = g.node("Round", [g.node("Clip", [y, g.const(np.float32(0)), g.const(n)])])
    else:
      a = np.float32(op["clip"]) if quantizer == "pact" else np.float32(1)
      y = g.node("Mul", [g.node("Clip", [x, g.const(np.float32(0)), g.const(a)]), g.const(n)])
      y = g.node("Round", [g.node("Div", [y, g.const(a)]) if quantizer == "pact" else y])
    return g.node("Cast", [y], to=tp.UINT8)
  if kind == "dequant_codes":  # integer.dequantize_codes
    y = g.node("Cast", [x], to=tp.FLOAT)
    if quantizer == "lsq":
      return g.node("Mul", [y, g.const(np.float32(op["step"]))])
    if quantizer == "pact":
      y = g.node("Mul", [y, g.const(np.float32(op["clip"]))])
    return g.node("Div", [y, g.const(n)])
  # requant
  sign, u = integer.thresholds(arrays[op["scale"]], arrays[op["shift"]], op["bits"])
  y = g.node("Mul", [x, g.const(_chw(sign, rank))])
  y = g.node("Unsqueeze", [y, g.const(np.array([-1], np.int64))])
  u = u.reshape(u.shape[0], 1, 1, u.shape[1]) if rank == 4 else u
  y = g.node("Cast", [g.node("GreaterOrEqual", [y, g.const(u)])], to=tp.INT32)
  y = g.node("ReduceSum", [y, g.const(np.array([-1], np.int64))], keepdims=0)
  return g.node("Cast", [y], to=tp.UINT8)


def _model(g: _Graph, program: integer.Program, opset: int):
  """The model around the emitted nodes: uint8 NHWC images in, float logits out."""
  tp = g.TensorProto
  h, w, c = program.input_shape
  graph = g.helper.make_graph(
    g.nodes,
    "qnet_integer",
    [g.helper.make_tensor_value_info("image", tp.UINT8, ["batch", h, w, c])],
    [g.helper.make_tensor_value_info("logits", tp.FLOAT, ["batch", program.num_classes])],
    g.inits,
  )
  return g.helper.make_model(
    graph, opset_imports=[g.helper.make_opsetid("", opset)], producer_name="qnet"
  )


def _layer(g: _Graph, op: dict, x: str, rank: int, arrays) -> tuple[str, int]:
  tp = g.TensorProto
  w_bits, in_bits = op["weight_bits"], op["in_bits"]
  integer_layer = w_bits != integer.FP and in_bits != integer.FP
  parts = integer.layer_weights(op, arrays)

  def combine(terms):
    out = None
    for k, t in terms:
      t = t if k == 1 else g.node("Mul", [t, g.const(np.int32(k))])
      out = t if out is None else g.node("Add", [out, t])
    return out

  if op["op"] == "conv":
    attrs = dict(strides=op["strides"], pads=_pads(op["padding"]))
    oihw = lambda w: np.ascontiguousarray(w.transpose(3, 2, 0, 1))
    if integer_layer:
      return combine([(k, g.node("ConvInteger", [x, g.const(oihw(w), "w")], **attrs)) for k, w in parts]), 4
    return g.node("Conv", [x, g.const(oihw(parts[0][1]), "w")], **attrs), 4
  # dense
  reduce = op["reduce"]
  if rank == 4 and (reduce == "flatten" or integer_layer):
    x = g.node("Transpose", [x], perm=[0, 2, 3, 1])  # NHWC: the model's flatten order
    if reduce == "flatten":
      x = g.node("Flatten", [x], axis=1)
  elif rank == 4:
    x = g.node("ReduceMean", [x], axes=[2, 3], keepdims=0)
  if integer_layer:
    terms = [(k, g.node("MatMulInteger", [x, g.const(w, "w")])) for k, w in parts]
    out = combine(terms)
    if rank == 4 and reduce == "mean":  # per-position products, summed in int32
      out = g.node("ReduceSum", [out, g.const(np.array([1, 2], np.int64))], keepdims=0)
    return out, 2
  y = g.node("MatMul", [x, g.const(parts[0][1], "w")])
  return g.node("Add", [y, g.const(arrays[op["bias"]].astype(np.float32))]), 2
