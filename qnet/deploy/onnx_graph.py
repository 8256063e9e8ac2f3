"""ONNX graphs of an integer `Program` (qnet.deploy.integer): the shared builder and the float
ops, and the plain FP32 network (`to_fp32_onnx`).

Every graph has the StableHLO export's input and output: raw `uint8` images `[B, H, W, C]`
(batch symbolic) in, float32 logits `[B, classes]` out. Inside, the network runs NCHW
(ONNX's layout). The quantized graph that `qnet.export` writes as `model.onnx` is
`qnet.deploy.qdq_onnx`; it emits its float parts (preprocessing, BatchNorm, pools, float
layers) with the functions here.

`to_fp32_onnx` is the network a user would deploy without qnet, for speed comparisons in one
runtime: the same layers in float32, on the quantized weights' values (`2 i / n - 1`, `q s`),
with every activation quantizer replaced by its clip range (DoReFa `[0, 1]`, PACT `[0,
alpha]`, LSQ `[0, n s]`) and the BatchNorm and bias before a quantizer folded into the
conv's weights and bias (`Conv` + `Clip`, as an FP32 deployment fuses them). It is not
exact to the integer program (its activations are not rounded); it is its float twin.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qnet.deploy import integer

OPSET = 17


def onnx_module():
  """The `onnx` package (an optional extra)."""
  try:
    import onnx
  except ImportError as e:
    raise ImportError("ONNX export needs the `onnx` package: pip install 'qnet[export]'") from e
  return onnx


class Graph:
  """Nodes and initializers under construction, with fresh names."""

  def __init__(self):
    onnx = onnx_module()
    self.helper, self.numpy_helper, self.TensorProto = onnx.helper, onnx.numpy_helper, onnx.TensorProto
    self.nodes, self.inits, self.outputs = [], [], []
    self._count = 0

  def const(self, array: np.ndarray, hint: str = "c") -> str:
    self._count += 1
    name = f"{hint}_{self._count}"
    self.inits.append(self.numpy_helper.from_array(np.asarray(array), name))
    return name

  def node(self, op: str, ins: list[str], hint: str = "t", domain: str = "", **attrs) -> str:
    self._count += 1
    out = f"{hint}_{self._count}"
    self.nodes.append(self.helper.make_node(op, ins, [out], domain=domain or None, **attrs))
    return out

  def model(self, program: integer.Program, name: str, opset: int = OPSET):
    """The checked model: uint8 NHWC images in, float logits (and any extra outputs) out."""
    onnx, tp = onnx_module(), self.TensorProto
    h, w, c = program.input_shape
    outputs = [self.helper.make_tensor_value_info("logits", tp.FLOAT, ["batch", program.num_classes])]
    outputs += [
      self.helper.make_tensor_value_info(n, t, [f"{n}_{i}" for i in range(r)]) for n, t, r in self.outputs
    ]
    graph = self.helper.make_graph(
      self.nodes,
      name,
      [self.helper.make_tensor_value_info("image", tp.UINT8, ["batch", h, w, c])],
      outputs,
      self.inits,
    )
    model = self.helper.make_model(
      graph, opset_imports=[self.helper.make_opsetid("", opset)], producer_name="qnet"
    )
    onnx.checker.check_model(model)
    return model


def pads(padding) -> list[int]:
  """ONNX `pads` of explicit `[[top, bottom], [left, right]]`."""
  (t, b), (l, r) = padding
  return [int(t), int(l), int(b), int(r)]


def chw(vec: np.ndarray, rank: int) -> np.ndarray:
  """A per-channel vector shaped to broadcast over NCHW (rank 4) or NC (rank 2)."""
  return np.asarray(vec).reshape((-1, 1, 1) if rank == 4 else (-1,))


def oihw(kernel: np.ndarray) -> np.ndarray:
  """An HWIO kernel in ONNX's OIHW order."""
  return np.ascontiguousarray(np.asarray(kernel).transpose(3, 2, 0, 1))


def chw_rows(kernel: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """A flatten-dense kernel's rows reordered from the model's NHWC flatten order to NCHW's,
  so the graph flattens its NCHW tensor without a transpose. `shape` is the input's (H, W, C)."""
  if len(shape) != 3:
    return kernel
  h, w, c = shape
  k = np.asarray(kernel)
  return np.ascontiguousarray(k.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1))


def float_op(g: Graph, op: dict, x: str, rank: int, arrays, env) -> tuple[str, int] | None:
  """Emits a program op that is float in every graph; None if `op` is not one."""
  kind = op["op"]
  tp = g.TensorProto
  if kind == "preprocess":
    # Transposed before the arithmetic: ONNX Runtime's per-channel broadcast over NHWC's last
    # axis (3 channels) ran 5-10x slower than over NCHW's planes (the same values, bit for bit).
    # Cast first: TensorRT reads a uint8 input only through a Cast.
    y = g.node("Transpose", [g.node("Cast", [x], to=tp.FLOAT)], perm=[0, 3, 1, 2])
    y = g.node("Div", [y, g.const(np.float32(255.0))])
    y = g.node("Sub", [y, g.const(chw(np.asarray(op["mean"], np.float32), 4))])
    return g.node("Div", [y, g.const(chw(np.asarray(op["std"], np.float32), 4))]), 4
  if kind == "batchnorm":
    var, scale = arrays[op["var"]], arrays[op["scale"]]
    mul = (np.float32(1.0) / np.sqrt(var + np.float32(op["eps"]))) * scale
    y = g.node("Sub", [x, g.const(chw(arrays[op["mean"]], rank))])
    y = g.node("Mul", [y, g.const(chw(mul.astype(np.float32), rank))])
    return g.node("Add", [y, g.const(chw(arrays[op["bias"]], rank))]), rank
  if kind == "maxpool":  # on floats or on uint8 codes alike
    attrs = dict(kernel_shape=op["window"], strides=op["strides"], pads=pads(op["padding"]))
    return g.node("MaxPool", [x], **attrs), rank
  if kind == "relu":
    return g.node("Relu", [x]), rank
  if kind == "mean":
    return g.node("Flatten", [g.node("GlobalAveragePool", [x])], axis=1), 2
  if kind == "clip":
    return g.node("Clip", [x, g.const(np.float32(0)), g.const(np.float32(1))]), rank
  if kind == "add":
    return g.node("Add", [x, env[op["in"][1]][0]]), rank
  if kind == "output":
    g.node("Identity", [x])
    g.nodes[-1].output[0] = "logits"
    return "logits", rank
  return None


def float_layer(g: Graph, op: dict, x: str, rank: int, kernel: np.ndarray, bias, in_shape) -> tuple[str, int]:
  """A float conv or dense on the float32 `kernel` (HWIO / [in, out]) plus `bias` (float32
  or None). `in_shape` is the program's (H, W, C) or (C,) of the input."""
  if op["op"] == "conv":
    ins = [x, g.const(oihw(kernel), "w")] + ([g.const(bias.astype(np.float32), "b")] if bias is not None else [])
    return g.node("Conv", ins, strides=op["strides"], pads=pads(op["padding"])), 4
  if rank == 4 and op["reduce"] == "mean":
    x = g.node("GlobalAveragePool", [x])
  elif rank == 4:
    kernel = chw_rows(kernel, in_shape)
  if rank == 4:
    x = g.node("Flatten", [x], axis=1)
  ins = [x, g.const(np.asarray(kernel, np.float32), "w")]
  if bias is None:
    return g.node("MatMul", ins), 2
  return g.node("Gemm", ins + [g.const(np.asarray(bias, np.float32), "b")]), 2


def value_shapes(program: integer.Program) -> dict[str, tuple[int, ...]]:
  """Each program value's NHWC shape without the batch (`(H, W, C)` or `(C,)`), by name."""
  import jax

  spec = jax.ShapeDtypeStruct((1, *program.input_shape), np.uint8)
  arrays = integer.runtime_arrays(program)
  _, values = jax.eval_shape(lambda x: integer.interpret(program.ops, arrays, x, True), spec)
  return {k: tuple(v.shape[1:]) for k, v in values.items()}


def float_weights(op: dict, arrays) -> np.ndarray:
  """A conv/dense op's weights as float32 values (dequantized levels, or the 32-bit kernel)."""
  w, bits = arrays[op["weight"]], op["weight_bits"]
  if bits == integer.FP:
    return np.asarray(w, np.float32)
  quantizer = integer.weight_quantizer_of(op)
  step = arrays[op["weight_step"]] if quantizer == "lsq" else None
  return integer.dequantize_weights(w, bits, quantizer, step)


def bn_folds(program: integer.Program) -> dict[str, dict]:
  """Float convs whose one consumer is a `batchnorm` (the 32-bit stem and its BatchNorm):
  `{conv output: that batchnorm op}`. The runtimes' graphs fold the BatchNorm into the conv's
  kernel and bias (`fold_bn`), which spares them three elementwise passes over the layer's
  largest output and its layout reorders; a code after it can then differ from qnet's only
  at a float32 rounding tie, as after any float conv."""
  consumers = integer.consumers_of(program)
  folds = {}
  for op in program.ops:
    if op["op"] != "conv" or (op["weight_bits"] != integer.FP and op["in_bits"] != integer.FP):
      continue
    (nxt, *more) = consumers.get(op["out"], [None])
    if nxt is not None and not more and nxt["op"] == "batchnorm":
      folds[op["out"]] = nxt
  return folds


def fold_bn(op: dict, kernel: np.ndarray, bias, folds: dict, arrays) -> tuple[np.ndarray, Any, str | None]:
  """A float conv's HWIO `kernel` and `bias` (or None), with the BatchNorm after it folded in
  if `op` is in `folds` (float32, the multiplier as `float_op` computes it); and that
  BatchNorm's output, which the emitter binds to the conv's (None: nothing folded)."""
  bn = folds.get(op["out"])
  if bn is None:
    return kernel, bias, None
  var, scale = arrays[bn["var"]], arrays[bn["scale"]]
  mul = ((np.float32(1.0) / np.sqrt(var + np.float32(bn["eps"]))) * scale).astype(np.float32)
  b = np.zeros(kernel.shape[-1], np.float32) if bias is None else np.asarray(bias, np.float32)
  b = ((b - arrays[bn["mean"]]) * mul + arrays[bn["bias"]]).astype(np.float32)
  return (kernel * mul).astype(np.float32), b, bn["out"]


def code_unit(op: dict, arrays) -> np.ndarray:
  """What one accumulator unit of an integer layer is worth (float64, scalar or `[C_out]`):
  the weight code's value times the input code's (`w_unit * in_step`)."""
  if integer.weight_quantizer_of(op) == "lsq":
    w_unit = np.asarray(arrays[op["weight_step"]], np.float64)
  else:
    w_unit = 1.0 / integer.levels(op["weight_bits"])
  return w_unit * float(op["in_step"])


def act_range(op: dict) -> float:
  """The top of a quantizer's range: the value of code n."""
  return integer.levels(op["bits"]) * float(op["step"]) if op.get("quantizer") == "lsq" else (
    float(op["clip"]) if op.get("quantizer") == "pact" else 1.0
  )


def twin_layer(op: dict, nxt: dict | None, arrays) -> tuple[np.ndarray, np.ndarray | None, float | None]:
  """The float twin of a conv/dense `op` into its consumer `nxt` (None: a 32-bit layer):
  float32 kernel, bias (or None) and the top of the clip that follows (None: no clip)."""
  kernel, bias, top = float_weights(op, arrays), None, None
  if nxt is not None and nxt["op"] == "requant":
    # acc * unit is the float conv's output; the requant's affine map in code units, times
    # the next step, folds into the kernel and bias; then the quantizer's clip.
    scale, shift = arrays[nxt["scale"]], arrays[nxt["shift"]]
    step = float(nxt["step"])
    unit = code_unit(op, arrays) / op.get("pooled", 1)
    kernel = (kernel * (scale * step / unit)).astype(np.float32)
    bias, top = (shift * step).astype(np.float32), act_range(nxt)
  elif nxt is not None:  # dequant: acc * factor + bias is the float layer plus its bias
    bias = arrays[nxt["bias"]] if nxt["bias"] else None
  elif op.get("bias"):
    bias = arrays[op["bias"]]
  return kernel, bias, top


def twin_stream_requant(op: dict, arrays, step: float) -> tuple[np.ndarray, np.ndarray, float]:
  """A `requant` of int8 stream codes in a float twin, whose stream values are the codes
  times `step`: `(mul, add, top)` with the twin's activation `clip(x * mul + add, 0, top)`
  (the map in code units, times the next step, then the quantizer's clip)."""
  s = float(op["step"])
  mul = (arrays[op["scale"]].astype(np.float64) * s / step).astype(np.float32)
  return mul, (arrays[op["shift"]] * s).astype(np.float32), act_range(op)


def _twin_from_stream(g: Graph, op: dict, x: str, rank: int, arrays, step: float) -> str:
  """A `requant` (`twin_stream_requant`) or `dequant` (the value itself, plus the bias) of
  int8 stream codes in the float twin, on the stream's float values `x`."""
  if op["op"] == "dequant":
    return g.node("Add", [x, g.const(chw(arrays[op["bias"]], rank).astype(np.float32))]) if op["bias"] else x
  mul, add, top = twin_stream_requant(op, arrays, step)
  y = g.node("Add", [g.node("Mul", [x, g.const(chw(mul, rank))]), g.const(chw(add, rank))])
  return g.node("Clip", [y, g.const(np.float32(0)), g.const(np.float32(top))])


def to_fp32_onnx(program: integer.Program, opset: int = OPSET):
  """The program's network in float32 (see the module docstring), as an `onnx.ModelProto`."""
  g = Graph()
  shapes = value_shapes(program)
  consumers = integer.consumers_of(program)
  env: dict[str, tuple[str, int]] = {}
  done = set()
  folds = bn_folds(program)
  stream_steps: dict[str, float] = {}  # int8 stream values (float here) and their steps
  for op in program.ops:
    if op["out"] in done:
      continue
    x, rank = env.get(op["in"][0], ("image", 4))
    kind = op["op"]
    if integer.on_stream_codes(op, stream_steps):
      if kind in ("requant", "dequant"):
        y = _twin_from_stream(g, op, x, rank, program.arrays, stream_steps[op["in"][0]])
      else:  # the stream stays float: no rounding
        y = x if kind == "stream_quantize" else g.node("Add", [x, env[op["in"][1]][0]])
        stream_steps[op["out"]] = float(op["step"])
      env[op["out"]] = y, rank
      continue
    emitted = float_op(g, op, x, rank, program.arrays, env)
    if emitted is not None:
      env[op["out"]] = emitted
    elif kind in ("quantize", "dequant_codes"):  # values stay float: the quantizer's clip
      top = np.float32(act_range(op))
      env[op["out"]] = (
        g.node("Clip", [x, g.const(np.float32(0)), g.const(top)]) if kind == "quantize" else x
      ), rank
    elif kind in ("conv", "dense"):
      integer_layer = op["weight_bits"] != integer.FP and op["in_bits"] != integer.FP
      # An integer layer per consumer of its accumulator (requant or dequant), each folded.
      for nxt in consumers[op["out"]] if integer_layer else [None]:
        kernel, bias, top = twin_layer(op, nxt, program.arrays)
        kernel, bias, bn_out = fold_bn(op, kernel, bias, folds, program.arrays)
        y, r = float_layer(g, op, x, rank, kernel, bias, shapes[op["in"][0]])
        if bn_out:
          env[bn_out] = (y, r)
          done.add(bn_out)
        if nxt is not None:
          if top is not None:
            y = g.node("Clip", [y, g.const(np.float32(0)), g.const(np.float32(top))])
          env[nxt["out"]] = (y, r)
          done.add(nxt["out"])
          if nxt["op"] == "requant_stream":
            stream_steps[nxt["out"]] = float(nxt["step"])
        env[op["out"]] = (y, r)
    else:
      raise ValueError(f"unknown op {kind!r}")
  return g.model(program, "qnet_fp32", opset)
