"""QDQ ONNX of an integer `Program`: the form ONNX Runtime runs on its int8 kernels.

ONNX Runtime fuses `DequantizeLinear -> Conv -> QuantizeLinear` into `QLinearConv` (MLAS,
VNNI), `DequantizeLinear -> Gemm -> QuantizeLinear` into `QGemm` and `DequantizeLinear ->
MatMul` into `MatMulIntegerToFloat`; OpenVINO reads the same graph as FakeQuantize and runs
int8. What each program op becomes (NCHW inside; uint8 NHWC images in, float32 logits out):

* `quantize` (float to codes): the program's own float32 operations (`integer.quantize_codes`)
  and a `QuantizeLinear` with scale 1 as the round (half to even) and cast.
* activation codes `j` are `uint8` tensors (zero point 0) whose DQ scale is 1: the graph's
  float values between a DQ and a Q are in code units, so every multiplier is explicit.
* `conv`/`dense` -> `requant` (integer to integer): DQ(codes) -> `Conv`/`Gemm` with int8
  weights `w = sign K c` (per output channel: the weight codes `c` times an integer `K`, so
  `acc' = sign K acc` in int32), DQ weight scale `M` per channel, an int32 bias `B` -> Q
  (scale 1) -> an integer `Clip` to `[0, n]` on the uint8 codes (the fusion keeps it: it
  lies between the Q and the next DQ). The fused kernel computes `round(float(acc' + B) M)`;
  `fit_requant` picks `K`, `B`, `M` per channel so that this equals qnet's thresholds for
  every reachable accumulator (proved by checking both sides of every threshold, the map
  being monotone), which is why the codes are exact, not merely close. A negative scale
  (BatchNorm) is the sign folded into the weights.
* `dense` -> `dequant` (integer to float): DQ(codes) -> `MatMul` with DQ(int8 codes), both
  scale 1 (`MatMulIntegerToFloat`: the exact int32 accumulator), then `* factor + bias`.
* `conv` -> `dequant` (into the float residual stream: ONNX Runtime has no int8 conv with a
  float output): with at least `IM2COL_MIN_K` weights per output channel (3x3x128 and up), the patches of the
  uint8 codes (Pad, Slice, Concat) times the int8 codes, `MatMulIntegerToFloat` (the exact
  accumulator), then `* factor + bias`; smaller ones, where that is slower, DQ(codes) -> a
  float `Conv` whose weights are the codes times the factor (a float32 sum like the
  fake-quant network's own).
* layers that cannot take the fused form (DoReFa 8-bit weight codes, odd numbers up to 255,
  do not fit int8; a `mean` dense; a channel `fit_requant` cannot fit) run a float conv on
  the integer codes and the requant as float `scale * acc + shift` -> Q -> Clip.
* so a code differs from qnet's only at a rounding tie of a float32 sum or map (the fused
  layers: never).
* max-pools on codes run on the uint8 tensor; the float parts (preprocessing, BatchNorm,
  the residual stream, 32-bit layers) are `qnet.deploy.onnx_graph`'s float ops.

* the int8 residual stream (`quant.residual_bits=8`): codes `uint8 = code + 128` (zero point
  128; TensorRT: int8, zero point 0), scale 1. `requant_stream` (a conv into the stream):
  DQ(codes) -> Conv with the int8 weight codes, DQ scale `|factor / s|` -> Q, which ONNX
  Runtime fuses into a QLinearConv with an 8-bit output computing `round(float(acc) M)`, the
  program's own formula; `stream_add`: DQ + DQ -> Add -> Q, its `QLinearAdd` (scales 1: the
  saturating integer sum); `stream_quantize`: `v / s` -> Q; the stream's BatchNorm and a
  block's input quantizer (a `requant` of stream codes): DQ -> a depthwise 1x1 Conv whose
  per-channel int8 weight `K`, int32 bias `B` and multiplier `M` are `fit_requant`'s on the
  codes themselves (`|acc| <= 128`) -> Q -> Clip, a depthwise QLinearConv, exact (a channel
  that does not fit: the float map on the DQ'd codes).

`to_onnx(program, report=...)` records per integer layer which form it took.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qnet.deploy import integer
from qnet.deploy.onnx_graph import OPSET, Graph, bn_folds, chw, chw_rows, float_layer, float_op, float_weights, fold_bn
from qnet.deploy.onnx_graph import oihw, onnx_module, value_shapes

_I32 = np.iinfo(np.int32)


@dataclasses.dataclass
class RequantFit:
  """Per output channel: int8 weight multiplier `k` (signed: the threshold sign folded in; 0
  for a constant channel), int32 bias `b`, float32 multiplier `m`; `margin` (accumulator
  units) is the least distance of a code boundary from a reachable accumulator; `ok`."""

  k: np.ndarray
  b: np.ndarray
  m: np.ndarray
  margin: np.ndarray
  ok: np.ndarray


def requant_codes(acc2: np.ndarray, b: np.ndarray, m: np.ndarray, n: int) -> np.ndarray:
  """The fused kernels' requantization, emulated: `min(n, clip(round(float32(float32(acc2 +
  b) * m)), 0, 255))`, round half to even (MLAS's float multiply and magic-number round)."""
  z = (acc2 + b).astype(np.float32) * np.asarray(m, np.float32)
  return np.minimum(np.maximum(np.rint(z), 0), n).astype(np.int64)  # n <= 255: the uint8 range


def fit_requant(
  scale: np.ndarray, shift: np.ndarray, bits: int, max_abs_w: np.ndarray, acc_max: np.ndarray,
  in_bits: int,
) -> RequantFit:
  """`k`, `b`, `m` per channel with `requant_codes(k acc, b, m, n)` equal to qnet's threshold
  codes of `acc` (`integer.thresholds(scale, shift, bits)`) for every `|acc| <= acc_max`.

  With `t = sign acc` and `a = |k| t`, code `>= j` must hold exactly for `t >= U_j`: the
  boundary `(j - 1/2) / m - b` of the fused map must lie in `(|k| (U_j - 1), |k| U_j]`. In
  accumulator units those windows do not depend on `|k|`, but the integer `b` moves the
  boundaries in steps of `1 / |k|`: `|k|` starts as large as int8 allows (`127 // max|c|`;
  64 with 8-bit inputs, where AVX2's 16-bit pair sums would saturate), and a channel whose
  windows leave no room on that grid tries the smaller ones (a grid of other fractions).
  For each integer `b` near the program's own map the best `1/m` (largest margin) is found
  by bisection, and the fit is checked with `requant_codes` on both sides of every threshold.
  """
  n = integer.levels(bits)
  sign, u = integer.thresholds(scale, shift, bits)
  limit = 64 if in_bits >= 8 else 127
  max_abs_w = np.asarray(max_abs_w, np.int64)
  a_max = np.asarray(acc_max, np.int64)
  k_max = limit // np.maximum(max_abs_w, 1)  # (a zero channel is constant: never fitted)
  uu = u.astype(np.int64)
  always, never = uu <= -a_max[:, None], uu > a_max[:, None]
  const = np.all(always | never, axis=1)
  c = len(scale)
  kk, b, m = np.zeros(c, np.int64), np.sum(always, axis=1).astype(np.int64), np.ones(c, np.float32)
  margin, ok = np.full(c, np.inf), const.copy()
  for ch in np.flatnonzero(~const):
    for k in range(int(k_max[ch]), 0, -1):
      got = _fit_channel(k, uu[ch], always[ch], never[ch], int(a_max[ch]), abs(float(scale[ch])), float(shift[ch]), n)
      if got is not None:
        b[ch], m[ch], margin[ch] = got
        kk[ch], ok[ch] = k * sign[ch], True
        break
  return RequantFit(kk, b, m, margin, ok)


def _fit_channel(k: int, u, always, never, a_max: int, absscale: float, shift: float, n: int):
  """`(b, m, margin)` of one channel at weight multiplier `k`, proved; None if none fits."""
  lo = np.where(always, -np.inf, np.where(never, k * a_max, k * (u - 1.0)))
  hi = np.where(never, np.inf, np.where(always, -k * a_max, k * u * 1.0))
  half = np.arange(1, n + 1, dtype=np.float64) - 0.5
  p0, b0 = k / absscale, k * shift / absscale
  radius = min(k, 48) + 2
  cand = np.round(b0) + np.arange(-radius, radius + 1, dtype=np.float64)
  fin_lo, fin_hi = np.isfinite(lo), np.isfinite(hi)

  def gaps(pp):
    bound = half[None, :] * pp[:, None] - cand[:, None]  # the boundaries, [cand, n]
    g = np.where(fin_lo, bound - lo, np.inf).min(axis=1)
    h = np.where(fin_hi, hi - bound, np.inf).min(axis=1)
    return g, h

  lo_p, hi_p = np.full(len(cand), p0 / 16), np.full(len(cand), p0 * 16)
  for _ in range(80):  # g - h increases with p: bisect for g = h
    mid = np.sqrt(lo_p * hi_p)
    g, h = gaps(mid)
    up = g < h
    lo_p, hi_p = np.where(up, mid, lo_p), np.where(up, hi_p, mid)
  g, h = gaps(lo_p)
  best = int(np.argmax(np.minimum(g, h)))
  b, margin = int(cand[best]), float(min(g[best], h[best]) / k)
  m = np.float32(1.0 / lo_p[best])
  if not margin > 0 or abs(b) + k * a_max >= _I32.max:
    return None
  # The proof: just below and at every threshold that a reachable accumulator can meet.
  with np.errstate(invalid="ignore"):
    for point, least in ((lo, np.arange(n)), (hi, np.arange(1, n + 1))):
      fin = np.isfinite(point)
      codes = requant_codes(np.where(fin, point, 0).astype(np.int64), b, m, n)
      if np.any(fin & ((codes < least) if point is hi else (codes > least))):
        return None
  return b, m, margin


def layer_fit(op: dict, nxt: dict, arrays, mean: bool = False) -> tuple[np.ndarray, RequantFit | None]:
  """An integer conv/dense's signed weight codes (int64, HWIO or `[in, out]`) and, into a
  `requant`, the fused kernels' `fit_requant` (None: the layer cannot take the fused form, as
  a `mean` dense or a channel that does not fit)."""
  quantizer = integer.weight_quantizer_of(op)
  codes = integer.signed_codes(arrays[op["weight"]], op["weight_bits"], quantizer).astype(np.int64)
  if nxt["op"] != "requant" or mean:
    return codes, None
  axes = tuple(range(codes.ndim - 1))
  max_abs = np.abs(codes).max(axis=axes)
  acc_max = integer.levels(op["in_bits"]) * np.abs(codes).sum(axis=axes)
  scale, shift = arrays[nxt["scale"]], arrays[nxt["shift"]]
  fit = fit_requant(scale, shift, nxt["bits"], max_abs, acc_max, op["in_bits"])
  return codes, (fit if fit.ok.all() else None)


def _dq(g: Graph, x: str, scale, zero, axis: int | None = None) -> str:
  attrs = {} if axis is None else {"axis": axis}
  return g.node("DequantizeLinear", [x, g.const(scale, "s"), g.const(zero, "z")], "dq", **attrs)


FLAVOURS = ("onnxruntime", "tensorrt")


def _zero(g: Graph):
  """The codes' zero point: uint8 (ONNX Runtime's x86 kernels), int8 for TensorRT."""
  return np.int8(0) if g.flavour == "tensorrt" else np.uint8(0)


def _dq_codes(g: Graph, x: str) -> str:
  """Codes to float (their value in code units: scale 1, zero point 0)."""
  return _dq(g, x, np.float32(1), _zero(g))


def _q_codes(g: Graph, y: str, n: int) -> str:
  """Q (scale 1, round half to even) to codes in `[0, n]`. ONNX Runtime: uint8, saturating at
  0, then an integer `Clip` to `n` on the codes (the QLinearConv fusion keeps it: a float Clip
  before the Q would block it); TensorRT: the float `Clip(0, n)` before an int8 Q (which it
  fuses into the conv as its activation; it runs no integer ops)."""
  if g.flavour == "tensorrt":
    if n < 255:
      y = g.node("Clip", [y, g.const(np.float32(0)), g.const(np.float32(n))])
    return g.node("QuantizeLinear", [y, g.const(np.float32(1), "s"), g.const(np.int8(0), "z")], "q")
  q = g.node("QuantizeLinear", [y, g.const(np.float32(1), "s"), g.const(np.uint8(0), "z")], "q")
  if n < 255:
    q = g.node("Clip", [q, g.const(np.uint8(0), "lo"), g.const(np.uint8(n), "hi")], "codes")
  return q


def _fit_bias(g: Graph, fit: RequantFit) -> str:
  """A fused layer's bias `B` at scale `M`: an int32 DQ (ONNX Runtime), or its float value
  `B M` (TensorRT dequantizes no int32)."""
  if g.flavour == "tensorrt":
    return g.const((fit.b.astype(np.float32) * fit.m).astype(np.float32), "b")
  return _dq(g, g.const(fit.b.astype(np.int32), "b"), fit.m, np.zeros(len(fit.b), np.int32), axis=0)


def _float_codes(g: Graph, x: str) -> str:
  """Codes as floats for an integer layer's float form: a Cast (their value in code units),
  not a DQ. ONNX Runtime's WeightBiasQuantization pass takes DQ -> Conv (float weights) -> Q
  for a QDQ group, quantizes the float weights to int8 itself and fuses the group into a
  QLinearConv, which loses the codes the float form exists for (DoReFa's 8-bit weight codes,
  up to 255); a quantizing builder (TensorRT) could do the same."""
  return g.node("Cast", [x], to=g.TensorProto.FLOAT)


def _stream_zero(g: Graph):
  """The int8 stream codes' zero point: ONNX Runtime holds them as uint8 `code + 128` (its
  QDQ conv fusion needs the input and output types equal, and the k-bit codes are uint8);
  TensorRT as int8 with zero point 0."""
  return np.int8(0) if g.flavour == "tensorrt" else np.uint8(128)


def _dq_stream(g: Graph, x: str) -> str:
  """Stream codes to float, in code units (scale 1)."""
  return _dq(g, x, np.float32(1), _stream_zero(g))


def _q_stream(g: Graph, y: str) -> str:
  """Q (scale 1, round half to even, saturating to the int8 range) to stream codes."""
  return g.node("QuantizeLinear", [y, g.const(np.float32(1), "s"), g.const(_stream_zero(g), "z")], "stream")


def _stream_op(g: Graph, op: dict, x: str, env: dict, arrays, rank: int) -> str:
  """A stream op on its own: `stream_quantize` (the fake quantizer's `v / s`, then Q as its
  round), `stream_add` (DQ + DQ -> Add -> Q: ONNX Runtime's `QLinearAdd`, exact: both scales
  are 1), or a `requant` / `dequant` reading stream codes (their map in float on the DQ'd
  codes)."""
  kind = op["op"]
  if kind == "stream_quantize":
    return _q_stream(g, g.node("Div", [x, g.const(np.float32(op["step"]))]))
  if kind == "stream_add":
    return _q_stream(g, g.node("Add", [_dq_stream(g, x), _dq_stream(g, env[op["in"][1]][0])]))
  y = _dq_stream(g, x)
  if kind == "dequant":
    factor = op["factor"]
    factor = np.asarray(arrays[factor] if isinstance(factor, str) else factor, np.float32)
    y = g.node("Mul", [y, g.const(chw(factor, rank).astype(np.float32))])
    if op["bias"]:
      y = g.node("Add", [y, g.const(chw(arrays[op["bias"]], rank).astype(np.float32))])
    return y
  n = integer.levels(op["bits"])
  if rank == 4:
    fit = stream_requant_fit(op, arrays)
    if fit is not None:  # DQ -> depthwise 1x1 Conv -> Q: a QLinearConv, int8 in and out
      c = len(fit.k)
      w = _dq(g, g.const(fit.k.astype(np.int8).reshape(c, 1, 1, 1), "w"), fit.m, np.zeros(c, np.int8), axis=0)
      return _q_codes(g, g.node("Conv", [y, w, _fit_bias(g, fit)], group=c, kernel_shape=[1, 1]), n)
  scale = chw(arrays[op["scale"]].astype(np.float32), rank)
  shift = chw(arrays[op["shift"]].astype(np.float32), rank)
  y = g.node("Add", [g.node("Mul", [y, g.const(scale)]), g.const(shift)])
  return _q_codes(g, y, n)


def stream_requant_fit(op: dict, arrays) -> RequantFit | None:
  """The stream's BatchNorm and next quantizer (a `requant` of int8 stream codes) as the fused
  kernels' map (`fit_requant`, proved on every threshold): each channel's code is its own
  accumulator (a depthwise 1x1 conv of weight 1, `|acc| <= 128`), so ONNX Runtime runs it as a
  QLinearConv on the int8 stream, not as float ops between layout transposes. None where a
  channel does not fit (then the float map)."""
  c = len(arrays[op["scale"]])
  lo, _ = integer.stream_range()
  fit = fit_requant(
    arrays[op["scale"]], arrays[op["shift"]], op["bits"], np.ones(c, np.int64), np.full(c, -lo), integer.STREAM_BITS
  )
  return fit if fit.ok.all() else None


def stream_fit(op: dict, nxt: dict, arrays) -> tuple[np.ndarray, np.ndarray, bool]:
  """An integer layer into the stream (`requant_stream`): its signed weight codes, the float32
  multiplier `M = factor / s` per output channel, and whether it takes the fused int8 form (a
  conv without bias whose codes fit int8; the runtimes then compute `round(float(acc) M)`)."""
  codes, _ = layer_fit(op, nxt, arrays)
  scale = nxt["scale"]
  m = np.asarray(arrays[scale] if isinstance(scale, str) else scale, np.float32)
  m = np.broadcast_to(m, codes.shape[-1:]).astype(np.float32)
  return codes, m, op["op"] == "conv" and not nxt["bias"] and np.abs(codes).max() <= 127


def _stream_layer(g: Graph, op: dict, nxt: dict, x: str, rank: int, arrays, report):
  """An integer conv/dense into the int8 stream (`requant_stream`): `round(acc M)` with `M =
  factor / s` per channel. A conv whose weight codes fit int8 is DQ(codes) -> Conv with the
  int8 codes and DQ scale `|M|` (the sign folded into the weights) -> Q: ONNX Runtime's
  QLinearConv with an int8 (uint8 + 128) output, which computes exactly `round(float(acc) M)`,
  the program's formula. Others: a float layer on the codes, its output times `M`, then Q."""
  codes, m, fused = stream_fit(op, nxt, arrays)
  dense = op["op"] == "dense"
  if fused:
    w = (codes * np.where(m < 0, -1, 1)).astype(np.int8)
    wdq = _dq(g, g.const(oihw(w), "w"), np.abs(m), np.zeros(len(m), np.int8), axis=0)
    y = g.node("Conv", [_dq_codes(g, x), wdq], strides=op["strides"], pads=_pads(op))
    report[op["layer"]] = {"form": "QLinearConv" if g.flavour == "onnxruntime" else "int8 Q/DQ Conv", "into": "int8 stream"}
    return _q_stream(g, y), 4
  out_rank = 2 if dense else 4
  xf = _float_codes(g, x)
  if dense and rank == 4:
    raise ValueError(f"{op['layer']}: a dense into the residual stream has no QDQ form")
  w = g.const(codes.astype(np.float32) if dense else oihw(codes.astype(np.float32)), "w")
  y = g.node("MatMul", [xf, w]) if dense else g.node("Conv", [xf, w], strides=op["strides"], pads=_pads(op))
  y = g.node("Mul", [y, g.const(chw(m, out_rank))])
  if nxt["bias"]:
    b = np.asarray(arrays[nxt["bias"]], np.float32) / np.float32(nxt["step"])
    y = g.node("Add", [y, g.const(chw(b.astype(np.float32), out_rank))])
  report[op["layer"]] = {"form": "float", "into": "int8 stream"}
  return _q_stream(g, y), out_rank


def _quantize(g: Graph, op: dict, x: str) -> str:
  """`integer.quantize_codes`' float32 operations, then Q as its round and cast."""
  n = np.float32(integer.levels(op["bits"]))
  quantizer = op.get("quantizer", "dorefa")
  zero = g.const(np.float32(0))
  if quantizer == "lsq":
    y = g.node("Div", [x, g.const(np.float32(op["step"]))])
    y = g.node("Clip", [y, zero, g.const(n)])
  else:
    a = np.float32(op["clip"]) if quantizer == "pact" else np.float32(1)
    y = g.node("Mul", [g.node("Clip", [x, zero, g.const(a)]), g.const(n)])
    y = g.node("Div", [y, g.const(a)]) if quantizer == "pact" else y
  return _q_codes(g, y, 255)  # already within [0, n]


def _dequantize_codes(g: Graph, op: dict, x: str) -> str:
  """`integer.dequantize_codes`' float32 operations."""
  y = _dq_codes(g, x)
  quantizer = op.get("quantizer", "dorefa")
  if quantizer == "lsq":
    return g.node("Mul", [y, g.const(np.float32(op["step"]))])
  if quantizer == "pact":
    y = g.node("Mul", [y, g.const(np.float32(op["clip"]))])
  return g.node("Div", [y, g.const(np.float32(integer.levels(op["bits"])))])


def _integer_layer(g: Graph, op: dict, nxt: dict, x: str, rank: int, arrays, in_shape, report):
  """An integer conv/dense with its consumer (`requant`, `dequant` or `requant_stream`);
  (output, rank)."""
  if nxt["op"] == "requant_stream":
    return _stream_layer(g, op, nxt, x, rank, arrays, report)
  dense, mean = op["op"] == "dense", op["op"] == "dense" and rank == 4 and op["reduce"] == "mean"
  codes, fit = layer_fit(op, nxt, arrays, mean)
  max_abs = np.abs(codes).max(axis=tuple(range(codes.ndim - 1)))
  if dense and rank == 4 and not mean:
    codes = chw_rows(codes, in_shape)
    x = g.node("Flatten", [x], axis=1)  # uint8, NCHW order (the rows were reordered)
  n_out = integer.levels(nxt["bits"]) if nxt["op"] == "requant" else None
  if fit is not None:
    w = (codes * fit.k).astype(np.int8)
    xdq = _dq_codes(g, x)
    c = len(fit.k)
    if dense:
      wdq = _dq(g, g.const(w, "w"), fit.m, np.zeros(c, np.int8), axis=1)
    else:
      wdq = _dq(g, g.const(oihw(w), "w"), fit.m, np.zeros(c, np.int8), axis=0)
    bdq = _fit_bias(g, fit)
    if dense:
      y = g.node("Gemm", [xdq, wdq, bdq])
    else:
      y = g.node("Conv", [xdq, wdq, bdq], strides=op["strides"], pads=_pads(op))
    finite = fit.margin[np.isfinite(fit.margin)]
    report[op["layer"]] = {
      "form": ("QGemm" if dense else "QLinearConv") if g.flavour == "onnxruntime" else (
        "int8 Q/DQ " + ("Gemm" if dense else "Conv")
      ),
      "min_margin_acc_units": float(finite.min()) if finite.size else None,
      "k": [int(v) for v in np.unique(np.abs(fit.k))],
    }
    return _q_codes(g, y, n_out), (2 if dense else 4)
  # Not fused: a float layer on the codes (ONNX Runtime has no int8 conv with a float
  # output; a DQ'd weight would keep it off its fast float kernels: measured 262 vs 467
  # images/s on resnet20). Into the float stream (`dequant`) the weights are the codes times
  # the accumulator's factor, one rounding each, the fake-quant network's own kind of float
  # sum; before a requant they are the integer codes and the map is float.
  out_rank = 2 if dense else 4
  factor = None
  if nxt["op"] == "dequant":
    factor = nxt["factor"]  # a number, or a per-channel tensor's name
    factor = np.asarray(arrays[factor] if isinstance(factor, str) else factor, np.float64)
  if dense and not mean and nxt["op"] == "dequant":  # DQ -> MatMul: MatMulIntegerToFloat
    xdq = _dq_codes(g, x)
    if max_abs.max() <= 127:
      w = _dq(g, g.const(codes.astype(np.int8), "w"), np.float32(1), np.int8(0))
    else:
      w = g.const(codes.astype(np.float32), "w")
    y = g.node("Mul", [g.node("MatMul", [xdq, w]), g.const(chw(factor, 2).astype(np.float32))])
    form = "MatMulIntegerToFloat"
  elif g.flavour == "tensorrt" and not mean and max_abs.max() <= 127:
    # TensorRT runs DQ -> Conv/MatMul as an int8 kernel, with a float output when no Q
    # follows: the weight codes with the accumulator's factor (or 1) as their scale.
    c = codes.shape[-1]
    f = np.broadcast_to(factor if factor is not None else 1.0, (c,)).astype(np.float32)
    xdq = _dq_codes(g, x)
    if dense:
      y = g.node("MatMul", [xdq, _dq(g, g.const(codes.astype(np.int8), "w"), f, np.zeros(c, np.int8), axis=1)])
    else:
      wdq = _dq(g, g.const(oihw(codes.astype(np.int8)), "w"), f, np.zeros(c, np.int8), axis=0)
      y = g.node("Conv", [xdq, wdq], strides=op["strides"], pads=_pads(op))
    form = "int8 DQ " + ("MatMul" if dense else "Conv")
    if nxt["op"] == "requant":  # the map on the accumulator, in float
      scale = chw(arrays[nxt["scale"]].astype(np.float32), out_rank)
      shift = chw(arrays[nxt["shift"]].astype(np.float32), out_rank)
      report[op["layer"]] = {"form": form + ", float requant"}
      return _q_codes(g, g.node("Add", [g.node("Mul", [y, g.const(scale)]), g.const(shift)]), n_out), out_rank
    if nxt["bias"]:
      y = g.node("Add", [y, g.const(chw(arrays[nxt["bias"]], out_rank).astype(np.float32))])
    report[op["layer"]] = {"form": form}
    return y, out_rank
  elif not dense and factor is not None and max_abs.max() <= 127 and codes[..., 0].size >= IM2COL_MIN_K:
    y = _im2col_matmul(g, x, codes, op, in_shape)  # NHWC [B, H', W', C_out], the exact acc
    y = g.node("Mul", [y, g.const(np.broadcast_to(factor, codes.shape[-1:]).astype(np.float32))])
    if nxt["bias"]:
      y = g.node("Add", [y, g.const(np.asarray(arrays[nxt["bias"]], np.float32))])
    report[op["layer"]] = {"form": "im2col MatMulIntegerToFloat"}
    return g.node("Transpose", [y], perm=[0, 3, 1, 2]), 4
  else:
    w = codes.astype(np.float64) * (factor if factor is not None else 1.0)
    w = w.astype(np.float32)
    # Into a requant (a Q follows): the codes Cast to float (`_float_codes`); into the float
    # stream a DQ, which ONNX Runtime runs faster (0.88x with a Cast on resnet20, float stream).
    to_float = _float_codes if nxt["op"] == "requant" else _dq_codes
    if mean:
      xf = to_float(g, x)
      xf = g.node("ReduceSum", [xf, g.const(np.array([2, 3], np.int64))], keepdims=0)
      y = g.node("MatMul", [xf, g.const(w, "w")])
    else:
      xdq = to_float(g, x)
      if dense:
        y = g.node("MatMul", [xdq, g.const(w, "w")])
      else:
        y = g.node("Conv", [xdq, g.const(oihw(w), "w")], strides=op["strides"], pads=_pads(op))
    form = "float"
  if nxt["op"] == "dequant":
    if nxt["bias"]:
      y = g.node("Add", [y, g.const(chw(arrays[nxt["bias"]], out_rank).astype(np.float32))])
    report[op["layer"]] = {"form": form}
    return y, out_rank
  scale = chw(arrays[nxt["scale"]].astype(np.float32), out_rank)
  shift = chw(arrays[nxt["shift"]].astype(np.float32), out_rank)
  y = g.node("Add", [g.node("Mul", [y, g.const(scale)]), g.const(shift)])
  report[op["layer"]] = {"form": "float requant"}
  return _q_codes(g, y, n_out), out_rank


# A conv into the float stream with at least this many weights per output channel (kh kw
# C_in) runs as im2col + `MatMulIntegerToFloat` (VNNI int8 GEMM, exact int32 sums): measured
# against a float conv, 2-core AVX-512 VNNI Xeon, one thread (`experiments/qdq_before_after.py`
# and docs/deploying.md): slower at 3x3x16 (0.5x), about even at 3x3x64 (and slower in
# OpenVINO, which runs the float-output conv int8 itself), faster from 3x3x128 (1.6-3.5x).
IM2COL_MIN_K = 1024


def _im2col_matmul(g: Graph, x: str, codes: np.ndarray, op: dict, in_shape) -> str:
  """A conv on uint8 codes `x` (NCHW) as its patches (uint8, NHWC, `[B, H', W', kh kw C]`)
  times the int8 weight codes: ONNX Runtime fuses the two DQs and the MatMul into
  `MatMulIntegerToFloat`, whose float output is the exact accumulator."""
  kh, kw, cin, cout = codes.shape
  (t, b), (l, r) = op["padding"]
  sh, sw = op["strides"]
  h, w = in_shape[0] + t + b, in_shape[1] + l + r
  ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
  xt = g.node("Transpose", [x], perm=[0, 2, 3, 1])
  if t or b or l or r:  # code 0 is the value 0
    xt = g.node("Pad", [xt, g.const(np.array([0, t, l, 0, 0, b, r, 0], np.int64)), g.const(np.uint8(0))])
  cols = []
  for dy in range(kh):
    for dx in range(kw):
      starts, ends = np.array([dy, dx], np.int64), np.array([dy + sh * (ho - 1) + 1, dx + sw * (wo - 1) + 1], np.int64)
      ins = [xt, g.const(starts), g.const(ends), g.const(np.array([1, 2], np.int64)), g.const(np.array([sh, sw], np.int64))]
      cols.append(g.node("Slice", ins, "patch"))
  col = cols[0] if len(cols) == 1 else g.node("Concat", cols, "im2col", axis=3)
  weights = codes.reshape(kh * kw * cin, cout).astype(np.int8)  # rows (dy, dx, c): HWIO's order
  wdq = _dq(g, g.const(weights, "w"), np.float32(1), np.int8(0))
  return g.node("MatMul", [_dq(g, col, np.float32(1), np.uint8(0)), wdq])


def _pads(op: dict) -> list[int]:
  (t, b), (l, r) = op["padding"]
  return [int(t), int(l), int(b), int(r)]


def tensorrt_violations(model) -> list[str]:
  """What in an ONNX model breaks TensorRT's explicit-quantization rules (TensorRT is not a
  dependency; these are its documented constraints, checked on the graph): no integer
  operators (`ConvInteger`, `QLinear*`, ...); every Q/DQ zero point an int8 0 and every DQ's
  input int8 (no uint8 or int32 tensors); activation scales per tensor, weight scales per
  output channel; integer tensors read only by DQ and shape ops (or as graph outputs)."""
  onnx = onnx_module()
  model = onnx.shape_inference.infer_shapes(model)
  g = model.graph
  inits = {t.name: onnx.numpy_helper.to_array(t) for t in g.initializer}
  types = {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]}
  types.update({k: onnx.helper.np_dtype_to_tensor_dtype(v.dtype) for k, v in inits.items()})
  tp = onnx.TensorProto
  integer_types = {tp.INT8, tp.UINT8, tp.INT32, tp.INT16, tp.UINT16}
  bad = []
  for node in g.node:
    where = f"{node.op_type} {node.output[0]}"
    if node.op_type in ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd"):
      bad.append(f"{where}: an integer operator")
    if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
      zero = inits.get(node.input[2]) if len(node.input) > 2 else None
      if zero is None or zero.dtype != np.int8 or np.any(zero != 0):
        bad.append(f"{where}: zero point must be an int8 0")
      scale = inits.get(node.input[1])
      weight = node.op_type == "DequantizeLinear" and node.input[0] in inits
      if scale is None or (scale.size > 1 and not weight):
        bad.append(f"{where}: an activation scale must be one constant")
      if node.op_type == "DequantizeLinear" and types.get(node.input[0]) != tp.INT8:
        bad.append(f"{where}: dequantizes a {tp.DataType.Name(types.get(node.input[0], 0))} tensor")
    elif node.op_type not in ("Flatten", "Reshape", "Identity", "Cast"):
      for name in node.input:
        if name and name not in inits and types.get(name) in integer_types:
          bad.append(f"{where}: reads the integer tensor {name}")
  return bad


def to_onnx(
  program: integer.Program, opset: int = OPSET, *, debug_outputs: bool = False, report=None,
  flavour: str = "onnxruntime",
):
  """The QDQ `onnx.ModelProto` of `program` (checked with `onnx.checker`).

  `debug_outputs` adds every code tensor and every float input of a `quantize` as an extra
  output named after its program value (tests compare layer by layer); `report`, a dict,
  receives per integer layer the form it took. `flavour="tensorrt"` is the graph TensorRT's
  explicit quantization takes (see `tensorrt_violations`): int8 codes (so activations of at most
  7 bits), float clips before the Qs, float biases, DQ -> MaxPool -> Q, and a conv into the
  float stream as DQ(codes) -> Conv with DQ'd int8 weights."""
  if flavour not in FLAVOURS:
    raise ValueError(f"flavour={flavour!r}: one of {', '.join(FLAVOURS)}")
  if flavour == "tensorrt":
    wide = [op for op in program.ops if op["op"] in ("quantize", "requant") and op["bits"] > 7]
    if wide:
      raise ValueError(
        f"flavour='tensorrt' holds activation codes as int8: at most 7 bits, and "
        f"{wide[0]['op']} -> {wide[0]['out']} has {wide[0]['bits']}"
      )
  g = Graph()
  g.flavour = flavour
  report = {} if report is None else report
  shapes = value_shapes(program)
  consumers = integer.consumers_of(program)
  env: dict[str, tuple[str, int]] = {}
  done: set[str] = set()
  folds = bn_folds(program)
  codes: set[str] = set()  # program values held as uint8 codes
  stream: set[str] = set()  # program values held as int8 stream codes

  code_type = g.TensorProto.INT8 if flavour == "tensorrt" else g.TensorProto.UINT8

  def expose(value: str) -> None:
    if debug_outputs and value not in [o[0] for o in g.outputs]:
      tp = code_type if value in codes or value in stream else g.TensorProto.FLOAT
      g.node("Identity", [env[value][0]])
      g.nodes[-1].output[0] = value
      g.outputs.append((value, tp, env[value][1]))

  for op in program.ops:
    kind = op["op"]
    if op["out"] in done:
      continue
    x, rank = env.get(op["in"][0], ("image", 4))
    if integer.on_stream_codes(op, stream):
      env[op["out"]] = _stream_op(g, op, x, env, program.arrays, rank), rank
      if kind != "dequant":
        (codes if kind == "requant" else stream).add(op["out"])
        expose(op["out"])
      continue
    if kind == "maxpool" and op["in"][0] in stream:
      raise ValueError(f"op maxpool -> {op['out']}: a max-pool on the int8 stream has no QDQ form yet")
    if kind == "maxpool" and flavour == "tensorrt" and op["in"][0] in codes:
      y, rank = float_op(g, op, _dq_codes(g, x), rank, program.arrays, env)
      emitted = _q_codes(g, y, 255), rank  # a max of codes: within [0, n] already
    else:
      emitted = float_op(g, op, x, rank, program.arrays, env)
    if emitted is not None:
      env[op["out"]] = emitted
      if kind == "maxpool" and op["in"][0] in codes:
        codes.add(op["out"])
        expose(op["out"])
    elif kind == "quantize":
      expose(op["in"][0])
      env[op["out"]] = _quantize(g, op, x), rank
      codes.add(op["out"])
      expose(op["out"])
    elif kind == "dequant_codes":
      env[op["out"]] = _dequantize_codes(g, op, x), rank
    elif kind in ("conv", "dense"):
      if op["weight_bits"] == integer.FP or op["in_bits"] == integer.FP:
        bias = program.arrays[op["bias"]] if op.get("bias") else None
        kernel, bias, bn_out = fold_bn(op, float_weights(op, program.arrays), bias, folds, program.arrays)
        env[op["out"]] = float_layer(g, op, x, rank, kernel, bias, shapes[op["in"][0]])
        if bn_out:  # its BatchNorm folded into its kernel and bias
          env[bn_out] = env[op["out"]]
          done.add(bn_out)
        continue
      # An accumulator both requantized and dequantized (a value that feeds a quantized layer
      # and a float residual sum): the layer once per consumer, each in its own fused form.
      many = len(consumers[op["out"]]) > 1
      for nxt in consumers[op["out"]]:
        form: dict = {}
        y = _integer_layer(g, op, nxt, x, rank, program.arrays, shapes[op["in"][0]], form)
        for layer, entry in form.items():  # with several consumers, one entry each
          report[f"{layer} -> {nxt['op']}" if many else layer] = entry
        env[nxt["out"]] = y
        done.add(nxt["out"])
        if nxt["op"] == "requant":
          codes.add(nxt["out"])
          expose(nxt["out"])
        elif nxt["op"] == "requant_stream":
          stream.add(nxt["out"])
          expose(nxt["out"])
    else:
      raise ValueError(f"op {kind!r} outside an integer layer's pattern")
  return g.model(program, "qnet_qdq", opset)
