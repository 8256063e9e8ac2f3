"""LiteRT (`.tflite`) files of an integer `Program`: full-int8 kernels with qnet's exact codes.

The graph is TensorFlow ops with fake-quant nodes, converted by `tf.lite.TFLiteConverter`
(quantization-aware form: the fake-quant ranges set every scale, nothing is calibrated) and
run by the LiteRT interpreter (`ai-edge-litert`, XNNPACK). NHWC throughout, as the program;
uint8 images in, float32 logits out. What each program op becomes:

* activation codes `j` are int8 tensors with scale 1 and zero point -128 (the fake-quant
  range `[0, 255]`): the value of a code tensor is the code itself, so k-bit codes up to
  8 bits fit, and every multiplier is explicit, as in the QDQ ONNX (`qnet.deploy.qdq_onnx`).
* `quantize`: the program's own float32 operations (`integer.quantize_codes`), then the
  fake quant as the round and cast.
* `conv`/`dense` -> `requant`: an int8 `CONV_2D` (a dense as a 1x1 one) whose per-channel int8
  weights `sign K c`, int32 bias `B` and multiplier `M` are `qdq_onnx.fit_requant`'s (the
  weight's fake-quant range is `+-127 M`, so its scale is `M`; the bias is `B M`, which the
  converter divides back to `B`), then the fake quant (round, saturate below at 0) and an
  int8 `MINIMUM` with `n`. XNNPACK requantizes as `round(float(acc + B) M)` half to even, the
  kernel `fit_requant` proves exact, so these codes equal qnet's thresholds.
* the int8 residual stream (`quant.residual_bits=8`): int8 codes with scale 1 and zero point
  0 (fake-quant range `[-128, 127]`); a conv into it is an int8 `CONV_2D` with the int8 weight
  codes and multiplier `|factor / s|` and an int8 output (`round(float(acc) M)`, the program's
  formula), a block's sum an int8 `ADD` of equal scales (the saturating integer sum), the
  stream's BatchNorm and a block's input quantizer an int8 1x1 `DEPTHWISE_CONV_2D`
  (`qdq_onnx.stream_requant_fit`'s `K`, `B`, `M`: exact, as the QDQ graph's).
* everything else is float, as in the QDQ graph: a layer into the float stream (`dequant`),
  a layer the fit does not cover, the 32-bit layers, BatchNorm, the residual sums; a code
  there differs from qnet's only at a float32 rounding tie.

`to_tflite(program)` is that file; `to_tflite(program, float_twin=True)` is the FP32 twin of
`onnx_graph.to_fp32_onnx` (the network a user would deploy without qnet) for speed
comparisons. Both need `tensorflow` (a core dependency, for the data) and, to run them,
`ai-edge-litert` (the `export` extra).
"""

from __future__ import annotations

import numpy as np

from qnet.deploy import integer
from qnet.deploy.onnx_graph import act_range, bn_folds, float_weights, fold_bn, twin_layer, twin_stream_requant
from qnet.deploy.qdq_onnx import layer_fit, stream_fit, stream_requant_fit


def _tf():
  import tensorflow as tf

  return tf


def _codes(tf, y, n: int):
  """The fake quant of `y` (code units) as codes: round, saturate to [0, 255], then `<= n`."""
  q = tf.quantization.fake_quant_with_min_max_vars(y, 0.0, 255.0, num_bits=8)
  return tf.minimum(q, float(n)) if n < 255 else q


def _pad(tf, x, padding, value: float = 0.0):
  (t, b), (l, r) = padding
  if t == b == l == r == 0:
    return x
  return tf.pad(x, [[0, 0], [t, b], [l, r], [0, 0]], constant_values=value)


def _int8_kernel(tf, w: np.ndarray, m: np.ndarray):
  """Float32 weights `w = K M` (per channel on the last axis) as the converter's int8 weights:
  the fake quant's range `+-127 M` makes their scale `M`, so the codes are `K` exactly."""
  return tf.quantization.fake_quant_with_min_max_vars_per_channel(
    tf.constant(w), tf.constant(-127 * m), tf.constant(127 * m), num_bits=8, narrow_range=True
  )


def _conv(tf, x, kernel, op):
  x = _pad(tf, x, op["padding"])  # zero: code 0 is the value 0 in every quantizer
  return tf.nn.conv2d(x, kernel, strides=[1, *op["strides"], 1], padding="VALID")


def _linear(tf, x, kernel, op, bias=None):
  """A float conv or dense (flattening or averaging a rank-4 input) on `kernel`, plus `bias`."""
  kernel = tf.constant(np.asarray(kernel, np.float32))
  if op["op"] == "conv":
    y = _conv(tf, x, kernel, op)
  else:
    if x.shape.rank == 4 and op["reduce"] == "mean":
      x = tf.reduce_mean(x, axis=[1, 2])
    elif x.shape.rank == 4:
      x = tf.reshape(x, [-1, int(np.prod(x.shape[1:]))])  # NHWC order, the program's
    y = tf.matmul(x, kernel)
  return y if bias is None else y + np.asarray(bias, np.float32)


def _float_op(tf, op: dict, x, arrays, env, on_codes: bool = False):
  """A program op that is float in every graph (`on_codes`: its input is codes); None if
  `op` is not one."""
  kind = op["op"]
  if kind == "preprocess":
    y = tf.cast(x, tf.float32) / np.float32(255.0)
    return (y - np.asarray(op["mean"], np.float32)) / np.asarray(op["std"], np.float32)
  if kind == "batchnorm":
    var, scale = arrays[op["var"]], arrays[op["scale"]]
    mul = ((np.float32(1.0) / np.sqrt(var + np.float32(op["eps"]))) * scale).astype(np.float32)
    return (x - np.asarray(arrays[op["mean"]], np.float32)) * mul + np.asarray(arrays[op["bias"]], np.float32)
  if kind == "maxpool":  # codes (>= 0) pad with 0, floats with -inf: the same maximum
    low = 0.0 if on_codes else -np.inf
    y = _pad(tf, x, op["padding"], low)
    return tf.nn.max_pool2d(y, op["window"], op["strides"], "VALID")
  if kind == "relu":
    return tf.nn.relu(x)
  if kind == "mean":
    return tf.reduce_mean(x, axis=[1, 2])
  if kind == "clip":
    return tf.clip_by_value(x, 0.0, 1.0)
  if kind == "add":
    return x + env[op["in"][1]]
  if kind == "output":
    return tf.identity(x)
  return None


def _quantize(tf, op: dict, x):
  """`integer.quantize_codes`' float32 operations, then the fake quant as the round."""
  n = np.float32(integer.levels(op["bits"]))
  quantizer = op.get("quantizer", "dorefa")
  if quantizer == "lsq":
    y = tf.clip_by_value(x / np.float32(op["step"]), 0.0, n)
  elif quantizer == "pact":
    a = np.float32(op["clip"])
    y = tf.clip_by_value(x, 0.0, a) * n / a
  else:
    y = tf.clip_by_value(x, 0.0, 1.0) * n
  return _codes(tf, y, 255)


def _dequantize_codes(tf, op: dict, x):
  quantizer = op.get("quantizer", "dorefa")
  if quantizer == "lsq":
    return x * np.float32(op["step"])
  if quantizer == "pact":
    x = x * np.float32(op["clip"])
  return x / np.float32(integer.levels(op["bits"]))


def _stream_codes(tf, y):
  """The fake quant of `y` (code units) as int8 stream codes: round, saturate to [-128, 127]."""
  lo, hi = integer.stream_range()
  return tf.quantization.fake_quant_with_min_max_vars(y, float(lo), float(hi), num_bits=8)


def _stream_op(tf, op: dict, x, env, arrays, twin: bool, step: float | None):
  """A stream op on its own (`qdq_onnx._stream_op`'s forms); with the float `twin`, the stream
  stays float and `step` is that of the stream value `x` a `requant` reads."""
  kind = op["op"]
  if kind == "stream_quantize":
    return x if twin else _stream_codes(tf, x / np.float32(op["step"]))
  if kind == "stream_add":
    y = x + env[op["in"][1]]
    return y if twin else _stream_codes(tf, y)
  if kind == "dequant":
    factor = op["factor"]
    factor = np.asarray(arrays[factor] if isinstance(factor, str) else factor, np.float32)
    y = x if twin else x * factor
    return y + np.asarray(arrays[op["bias"]], np.float32) if op["bias"] else y
  if twin:
    mul, add, top = twin_stream_requant(op, arrays, step)
    return tf.clip_by_value(x * mul + add, 0.0, np.float32(top))
  n = integer.levels(op["bits"])
  fit = stream_requant_fit(op, arrays) if x.shape.rank == 4 else None
  if fit is not None:  # an int8 DEPTHWISE_CONV_2D (1x1, weight K per channel), as in the QDQ graph
    c = len(fit.k)
    w = (fit.k.astype(np.float32) * fit.m).reshape(1, 1, 1, c)  # per channel on the last axis
    y = tf.nn.depthwise_conv2d(x, tf.reshape(_int8_kernel(tf, w, fit.m), [1, 1, c, 1]), [1, 1, 1, 1], "VALID")
    return _codes(tf, y + (fit.b.astype(np.float32) * fit.m), n)
  scale, shift = arrays[op["scale"]].astype(np.float32), arrays[op["shift"]].astype(np.float32)
  return _codes(tf, x * scale + shift, n)


def _unquantized(tf, x):
  """Codes `x` as a float tensor the converter leaves float: a layer's float form whose output
  is fake-quantized would otherwise become an int8 kernel whose float weights the converter
  quantizes itself (losing DoReFa's 8-bit weight codes, up to 255). The round trip through
  int32 is exact on codes."""
  return tf.cast(tf.cast(x, tf.int32), tf.float32)


def _stream_layer(tf, op: dict, nxt: dict, x, arrays, report: dict):
  """An integer conv into the int8 stream (`requant_stream`): an int8 `CONV_2D` with the int8
  weight codes (sign folded), per-channel multiplier `|M|` and an int8 output (XNNPACK's
  `round(float(acc) M)`, the program's formula); a dense or a biased layer in float."""
  codes, m, fused = stream_fit(op, nxt, arrays)
  if fused:
    am = np.abs(m).astype(np.float32)
    w = (codes * np.where(m < 0, -1, 1)).astype(np.float32) * am
    report[op["layer"]] = {"form": "int8 CONV_2D", "into": "int8 stream"}
    return _stream_codes(tf, _conv(tf, x, _int8_kernel(tf, w, am), op))
  y = _linear(tf, _unquantized(tf, x), codes.astype(np.float32), op) * m
  if nxt["bias"]:
    y = y + np.asarray(arrays[nxt["bias"]], np.float32) / np.float32(nxt["step"])
  report[op["layer"]] = {"form": "float", "into": "int8 stream"}
  return _stream_codes(tf, y)


def _integer_layer(tf, op: dict, nxt: dict, x, arrays, report: dict):
  """An integer conv/dense into its consumer (`requant`, `dequant` or `requant_stream`)."""
  if nxt["op"] == "requant_stream":
    return _stream_layer(tf, op, nxt, x, arrays, report)
  dense = op["op"] == "dense"
  mean = dense and x.shape.rank == 4 and op["reduce"] == "mean"
  codes, fit = layer_fit(op, nxt, arrays, mean)
  if fit is not None:
    w = (codes * fit.k).astype(np.float32) * fit.m  # float32: the converter divides back by m
    out_channels = w.shape[-1]
    if dense:  # as a 1x1 conv: the converter's FULLY_CONNECTED transposes the weights and
      w = w.reshape(1, 1, *w.shape)  # loses their per-channel axis ("mismatched quantized axes")
    wq = _int8_kernel(tf, w, fit.m)
    if dense:
      x = tf.reshape(x, [-1, 1, 1, int(np.prod(x.shape[1:]))])
      y = tf.nn.conv2d(x, wq, strides=[1, 1, 1, 1], padding="VALID")
    else:
      y = _conv(tf, x, wq, op)
    y = _codes(tf, y + (fit.b.astype(np.float32) * fit.m), integer.levels(nxt["bits"]))
    report[op["layer"]] = {"form": "int8 1x1 CONV_2D" if dense else "int8 CONV_2D"}
    return tf.reshape(y, [-1, out_channels]) if dense else y
  if nxt["op"] == "dequant":
    factor = nxt["factor"]  # a number, or a per-channel tensor's name
    factor = np.asarray(arrays[factor] if isinstance(factor, str) else factor, np.float64)
    kernel = (codes.astype(np.float64) * factor).astype(np.float32)
    bias = arrays[nxt["bias"]] if nxt["bias"] else None
    if mean:  # the program sums the codes; the factor holds the 1 / count
      x = tf.reduce_sum(x, axis=[1, 2])
    report[op["layer"]] = {"form": "float"}
    return _linear(tf, x, kernel, op, bias)
  scale, shift = arrays[nxt["scale"]].astype(np.float32), arrays[nxt["shift"]].astype(np.float32)
  x = _unquantized(tf, x)
  if mean:
    x = tf.reduce_sum(x, axis=[1, 2])
  y = _linear(tf, x, codes.astype(np.float32), op) * scale + shift
  report[op["layer"]] = {"form": "float requant"}
  return _codes(tf, y, integer.levels(nxt["bits"]))


def graph_fn(program: integer.Program, *, float_twin: bool = False, debug_outputs: bool = False, report=None):
  """The program as a function of TensorFlow ops: uint8 `[B, H, W, C]` images -> `{"logits":
  ...}`, with `debug_outputs` also every code tensor (and every float input of
  a `quantize`) by program value name. `report` receives each integer layer's form."""
  tf = _tf()
  report = {} if report is None else report
  folds = bn_folds(program)
  consumers = integer.consumers_of(program)

  def fn(images):
    env: dict = {"image": images}
    done, codes, shown = set(), set(), {}
    stream: dict[str, float] = {}  # int8 stream values and their steps
    for op in program.ops:
      kind, x = op["op"], env.get(op["in"][0], images)
      if op["out"] in done:
        continue
      if integer.on_stream_codes(op, stream):
        env[op["out"]] = _stream_op(tf, op, x, env, program.arrays, float_twin, stream.get(op["in"][0]))
        if kind in ("stream_quantize", "stream_add"):
          stream[op["out"]] = float(op["step"])
        elif kind == "requant" and not float_twin:
          codes.add(op["out"])
        continue
      if kind == "maxpool" and op["in"][0] in stream:
        raise ValueError(f"op maxpool -> {op['out']}: a max-pool on the int8 stream has no LiteRT form yet")
      on_codes = op["in"][0] in codes
      y = _float_op(tf, op, x, program.arrays, env, on_codes)
      if y is not None:
        env[op["out"]] = y
        if kind == "maxpool" and on_codes:
          codes.add(op["out"])
      elif kind == "quantize":
        if float_twin:
          env[op["out"]] = tf.clip_by_value(x, 0.0, np.float32(act_range(op)))
          continue
        shown[op["in"][0]] = x
        env[op["out"]] = _quantize(tf, op, x)
        codes.add(op["out"])
      elif kind == "dequant_codes":
        env[op["out"]] = x if float_twin else _dequantize_codes(tf, op, x)
      elif kind in ("conv", "dense"):
        if op["weight_bits"] == integer.FP or op["in_bits"] == integer.FP:
          bias = program.arrays[op["bias"]] if op.get("bias") else None
          kernel, bias, bn_out = fold_bn(op, float_weights(op, program.arrays), bias, folds, program.arrays)
          env[op["out"]] = _linear(tf, x, kernel, op, bias)
          if bn_out:  # its BatchNorm folded into its kernel and bias
            env[bn_out] = env[op["out"]]
            done.add(bn_out)
          continue
        many = len(consumers[op["out"]]) > 1
        for nxt in consumers[op["out"]]:
          if float_twin:
            kernel, bias, top = twin_layer(op, nxt, program.arrays)
            y = _linear(tf, x, kernel, op, bias)
            y = y if top is None else tf.clip_by_value(y, 0.0, np.float32(top))
          else:
            form: dict = {}
            y = _integer_layer(tf, op, nxt, x, program.arrays, form)
            for layer, entry in form.items():
              report[f"{layer} -> {nxt['op']}" if many else layer] = entry
            if nxt["op"] == "requant":
              codes.add(nxt["out"])
          env[nxt["out"]] = y
          done.add(nxt["out"])
          if nxt["op"] == "requant_stream":
            stream[nxt["out"]] = float(nxt["step"])
      else:
        raise ValueError(f"op {kind!r} outside an integer layer's pattern")
    out = {"logits": env[program.ops[-1]["out"]]}
    if not debug_outputs:
      return out
    out.update({k: env[k] for k in sorted(codes)})
    if not float_twin:
      out.update({k: env[k] for k in sorted(stream)})
    out.update(shown)
    return out

  return fn


def to_tflite(program: integer.Program, *, float_twin: bool = False, debug_outputs: bool = False, report=None) -> bytes:
  """The `.tflite` flatbuffer of `program` (see the module docstring); batch size dynamic."""
  tf = _tf()
  fn = graph_fn(program, float_twin=float_twin, debug_outputs=debug_outputs, report=report)
  spec = tf.TensorSpec([None, *program.input_shape], tf.uint8, name="image")
  module = tf.Module()  # the trackable object: the converter keeps the signature's names
  module.serve = tf.function(fn, input_signature=[spec], autograph=False)
  converter = tf.lite.TFLiteConverter.from_concrete_functions([module.serve.get_concrete_function()], module)
  if not float_twin:
    converter.optimizations = [tf.lite.Optimize.DEFAULT]  # honour the fake-quant nodes
  import warnings

  with warnings.catch_warnings():  # "statistics for quantized inputs": the input is uint8 images
    warnings.simplefilter("ignore", UserWarning)
    return converter.convert()


def interpreter_fn(model: bytes | str, threads: int | None = None, *, outputs: bool = False):
  """A LiteRT interpreter of a `.tflite` file (bytes or path) as `uint8 images -> logits` (or
  with `outputs`, a dict of every output by name), resizing its batch as the input needs."""
  from ai_edge_litert.interpreter import Interpreter

  kw = {"model_content": model} if isinstance(model, bytes) else {"model_path": model}
  it = Interpreter(num_threads=threads, **kw)
  it.allocate_tensors()
  runner = it.get_signature_runner()
  key = next(iter(runner.get_input_details()))

  def run(images: np.ndarray):
    got = runner(**{key: np.asarray(images, np.uint8)})
    return got if outputs else got["logits"]

  return run
