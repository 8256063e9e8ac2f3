"""Integer inference of a quantized network (DoReFa, LSQ, PACT): the program, and its JAX
interpreter.

DoReFa's levels have an exact integer form. A k-bit weight is `2 (i / n) - 1` with level
`i` in `[0, n]`, `n = 2**k - 1`, i.e. the odd integer `c = 2i - n` over `n`; a k-bit
activation is `j / n` with code `j` in `[0, n]`. A quantized conv or dense of codes `j`
(act bits) with codes `c` (weight bits) is therefore `acc / (n_w n_a)` with the integer
accumulator `acc = sum c j`, computed here with int8 operands and int32 accumulation
(`preferred_element_type`). 8-bit codes do not fit int8; they are split exactly into two
int8 operands (`j = 2 (j >> 1) + (j & 1)`, `c = 2 ((c - 1) / 2) + 1`).

The next layer's input codes come straight from the accumulator. What lies between (the
BatchNorm, the dense bias, the clip and the rounding of the next activation quantizer)
is one per-channel affine map `z n' = scale acc + shift` followed by `round(clip(z, 0, 1)
n')`, a non-decreasing step function of `acc` (for `scale > 0`). It is stored as that exact
`scale`/`shift` pair (float64, 16 bytes a channel) and evaluated as `n'` integer
thresholds per channel, derived at load time (`thresholds`): the code is the number of
thresholds `U_m <= s acc` (`s` = sign of the scale). A max-pool between the BatchNorm and
the quantizer commutes with that monotone map and runs on the codes. So a chain of
quantized layers computes in integers only.

Float remains only where the network itself is float: the image preprocessing, layers
kept at 32 bits (`keep_first_last_fp`: the stem and the classifier), a stem with
quantized weights (its input is the float image), the pre-activation ResNets' residual
stream (its BatchNorms `bn1`/`final_bn`, the additions, the stem's BN/ReLU/max-pool), and the
dequantization `acc / (n_w n_a)` of a quantized layer whose output goes there.

A `Program` is that network as data: a list of ops (JSON, stored in the export's
manifest) and named arrays. `qnet.deploy.lowering.build_program` makes it from the model's
own traced evaluation function, driving the `Builder` here layer by layer; `make_apply`
turns it into a pure JAX function of raw `uint8` images `[B, H, W, C]` returning float32
logits, which is what `qnet.export` serializes with `jax.export`. `qnet.deploy.onnx_graph`
emits the same ops as ONNX.

LSQ and PACT (`weight_quantizer` / `act_quantizer`) have the same integer form with a learned
step. An LSQ weight is `q s` with the signed code `q = round(clip(w / s, -Q_n, Q_p))`, `Q_n =
2**(k-1)`, `Q_p = Q_n - 1` (int8 for k <= 8, so never split), `s = weight_clip / sqrt(Q_p)` float32,
per tensor or per output channel (`lsq_weight_codes`); it is stored as the level `i = q + Q_n`
in `[0, 2**k - 1]` beside the step. An activation code `j` in `[0, n]` is worth `j / n`
(DoReFa), `j alpha / n` (PACT, `alpha = act_clip`) or `j s` (LSQ, `s = act_clip / sqrt(n)`), so an
integer layer's accumulator is worth `acc w_step a_step` (a per-channel factor with
per-channel LSQ steps), and the fold into the next codes divides by the next activation
step instead of multiplying by `n` (`ActQuant`). At 32 bits a learned-quantizer network has
raw weights and a plain ReLU (DoReFa: the clip to [0, 1]).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from qnet.quant import quantizers as quant
from qnet.models.layers import ACT_CLIP, ACT_QUANTIZERS, STREAM_BITS, WEIGHT_CLIP, WEIGHT_QUANTIZERS

PyTree = Any
MAX_BITS = 8
FP = quant.FULL_PRECISION
_DIMS = ("NHWC", "HWIO", "NHWC")
_INT32 = np.iinfo(np.int32)
# A program's quantizers when none are named (exports of format /1 are DoReFa throughout).
DOREFA_QUANTIZERS = {"weight": "dorefa", "act": "dorefa"}


def levels(bits: int) -> int:
  """`n = 2**bits - 1`."""
  return (1 << int(bits)) - 1


@dataclasses.dataclass
class Program:
  """Integer inference program: `ops` (JSON-able dicts) over named `arrays`.

  Arrays: `NAME.levels` uint8 weight levels `i` (kernel shape), `NAME.weight_step` float32
  LSQ steps (`[]` or `[C_out]`), `NAME.kernel` float32 for 32-bit kernels, `NAME.bias`
  float32, `NAME.requant_scale` / `.requant_shift` float64, `NAME.acc_factor` float32
  per-channel accumulator factors (per-channel LSQ), BatchNorm `NAME.mean/.var/.scale/.bias`
  float32. `layers` lists per quantizable layer its bits, quantizers and tensor names (for the
  manifest); `quantizers` the network's weight and activation quantizer kinds.
  """

  ops: list[dict]
  arrays: dict[str, np.ndarray]
  input_shape: tuple[int, int, int]
  num_classes: int
  layers: dict[str, dict]
  quantizers: dict = dataclasses.field(default_factory=lambda: dict(DOREFA_QUANTIZERS))


def weight_quantizer_of(op: dict) -> str:
  """A conv/dense op's weight quantizer (`/1` exports and 32-bit kernels name none: DoReFa's
  codes, or no codes at all)."""
  return op.get("weight_quantizer") or "dorefa"


# ----------------------------------------------------------------------------- weights


def weight_codes(kernel: np.ndarray, bits: int, per_channel: bool) -> np.ndarray:
  """Levels `i` (uint8, `[0, 2**bits - 1]`) of DoReFa's k-bit kernel.

  Computed from `quant.quantize_weights` itself (jitted, as in evaluation), so
  `dequantize_weights(i, bits)` equals the fake-quantized kernel bit for bit (checked).
  """
  n = levels(bits)
  wq = np.asarray(
    jax.jit(quant.quantize_weights, static_argnums=2)(jnp.asarray(kernel), bits, per_channel)
  )
  i = np.rint((wq.astype(np.float64) + 1.0) / 2.0 * n).astype(np.int64)
  if not np.array_equal(dequantize_weights(i, bits), wq):
    raise AssertionError("integer weight levels do not reproduce the fake-quantized kernel")
  return i.astype(np.uint8)


def dequantize_weights(
  levels_i: np.ndarray, bits: int, quantizer: str = "dorefa", step: np.ndarray | None = None
) -> np.ndarray:
  """The weights in float32 by the quantizer's own formula (so equality is exact): DoReFa
  `2 (i / n) - 1`, LSQ `q s` (`q = i - 2**(bits-1)`, `step` broadcast over the last axis)."""
  if quantizer == "lsq":
    return signed_codes(levels_i, bits, "lsq").astype(np.float32) * np.asarray(step, np.float32)
  n = np.float32(levels(bits))
  return np.float32(2.0) * (np.asarray(levels_i).astype(np.float32) / n) - np.float32(1.0)


def signed_codes(levels_i: np.ndarray, bits: int, quantizer: str = "dorefa") -> np.ndarray:
  """Signed weight codes (int16): DoReFa `c = 2i - n` (the weight is `c / n`), LSQ
  `q = i - 2**(bits-1)` (the weight is `q s`)."""
  i = np.asarray(levels_i).astype(np.int16)
  if quantizer == "lsq":
    return (i - (1 << (int(bits) - 1))).astype(np.int16)
  return (2 * i - levels(bits)).astype(np.int16)


def lsq_step(clip, bits: int, signed: bool) -> np.ndarray:
  """LSQ's float32 step as the jitted fake quantizer computes it (`quant.lsq_step` with traced
  bits: XLA turns `t / sqrt(Q_p)` into `t * rsqrt(Q_p)` there, which eager ops do not)."""
  fn = jax.jit(quant.lsq_step, static_argnums=2)
  return np.asarray(fn(jnp.asarray(clip, jnp.float32), jnp.float32(bits), signed), np.float32)


def lsq_weight_codes(kernel: np.ndarray, clip: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
  """Levels `i = q + 2**(bits-1)` (uint8, `[0, 2**bits - 1]`) and float32 step `s` of LSQ's
  k-bit kernel with clip level `clip` (a scalar, or one per output channel).

  The step is the quantizer's own `quant.lsq_step` in float32 and the codes come from
  `quant.lsq_quantize` itself (jitted, as in evaluation), so `dequantize_weights(i, bits,
  'lsq', s)` equals the fake-quantized kernel bit for bit (checked).
  """
  clip = np.asarray(clip, np.float32)
  qn = 1 << (int(bits) - 1)
  step = lsq_step(clip, bits, signed=True)
  wq = np.asarray(
    jax.jit(quant.lsq_quantize, static_argnums=3)(jnp.asarray(kernel), jnp.asarray(clip), bits, True)
  )
  q = np.rint(wq.astype(np.float64) / step.astype(np.float64)).astype(np.int64)
  i = q + qn
  if i.min() < 0 or i.max() > 2 * qn - 1:
    raise AssertionError("LSQ weight codes out of range")
  if not np.array_equal(dequantize_weights(i, bits, "lsq", step), wq):
    raise AssertionError("integer weight levels do not reproduce the fake-quantized kernel")
  return i.astype(np.uint8), step


# ----------------------------------------------------------------------------- thresholds


def thresholds(scale: np.ndarray, shift: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel integer thresholds of `code = clip(round(scale acc + shift), 0, n)`.

  Returns `(sign [C] int32, U [C, n] int32)` with `code = sum_m [sign acc >= U_m]`:
  `scale > 0`: `acc >= ceil((m - 1/2 - shift) / scale)`; `scale < 0`: the same inequality
  flipped; `scale == 0`: a constant code. Exact-tie rounding (half to even) is ignored: it
  needs `scale acc + shift` to hit a half-integer exactly.
  """
  scale = np.asarray(scale, np.float64)
  shift = np.asarray(shift, np.float64)
  n = levels(bits)
  m = np.arange(1, n + 1, dtype=np.float64)[None, :] - 0.5
  sign = np.where(scale < 0, -1, 1).astype(np.int32)
  with np.errstate(divide="ignore", invalid="ignore"):
    t = (m - shift[:, None]) / scale[:, None]
  u = np.ceil(sign[:, None] * t)
  const = np.clip(np.round(shift), 0, n)[:, None]
  u = np.where(scale[:, None] == 0, np.where(m + 0.5 <= const, -np.inf, np.inf), u)
  u = np.clip(u, _INT32.min, _INT32.max)
  return sign, u.astype(np.int32)


# ----------------------------------------------------------------------------- building


class UnsupportedModel(ValueError):
  """The model has an op or layer with no integer form, or bad clip levels; the message says which."""


@dataclasses.dataclass(frozen=True)
class ActQuant:
  """A layer input's quantizer at `bits` (< 32): codes `j` in `[0, n]` and what one is worth.

  `clip` is the float32 range parameter: DoReFa 1, PACT alpha, LSQ `t` (its step
  `s = t / sqrt(n)`, `quant.lsq_step`).
  """

  quantizer: str
  bits: int
  clip: float = 1.0

  def step_ratio(self) -> tuple[float, int]:
    """`(num, den)` with the step `num / den` exactly: DoReFa `(1, n)`, PACT `(alpha, n)`,
    LSQ `(s, 1)` with LSQ's float32 step `s = fl(t / sqrt(n))`."""
    n = levels(self.bits)
    if self.quantizer == "lsq":
      return float(lsq_step(self.clip, self.bits, signed=False)), 1
    return float(self.clip), n

  def attrs(self) -> dict:
    """The op attributes: `quantizer`, `clip`, `step` (the value of one code)."""
    num, den = self.step_ratio()
    return {"quantizer": self.quantizer, "clip": float(self.clip), "step": num / den}


def quantize_codes(x: jax.Array, op: dict) -> jax.Array:
  """uint8 codes of float32 values `x` by the op's activation quantizer, in the fake quantizer's
  own float32 operations (`quant.quantize_activations`, `pact_quantize`, `lsq_quantize`)."""
  n = jnp.float32(levels(op["bits"]))
  kind = op.get("quantizer", "dorefa")
  if kind == "pact":
    a = jnp.float32(op["clip"])
    j = jnp.round(jnp.clip(x, 0.0, a) * n / a)
  elif kind == "lsq":
    j = jnp.round(jnp.clip(x / jnp.float32(op["step"]), 0.0, n))
  else:
    j = jnp.round(jnp.clip(x, 0.0, 1.0) * n)
  return j.astype(jnp.uint8)


def dequantize_codes(j: jax.Array, op: dict) -> jax.Array:
  """float32 values of activation codes, the fake quantizer's formula: DoReFa `j / n`, PACT
  `j alpha / n`, LSQ `j s`."""
  x = j.astype(jnp.float32)
  n = jnp.float32(levels(op["bits"]))
  kind = op.get("quantizer", "dorefa")
  if kind == "pact":
    return x * jnp.float32(op["clip"]) / n
  if kind == "lsq":
    return x * jnp.float32(op["step"])
  return x / n


@dataclasses.dataclass
class _Acc:
  """An int32 accumulator not yet emitted further: value `acc * factor + bias`, then the
  pending BatchNorm and max-pools (folded into thresholds if a quantizer follows)."""

  name: str
  shape: tuple[int, ...]
  factor: Any  # float, or a per-output-channel float64 vector (per-channel LSQ steps)
  layer: str
  bias: str | None = None
  bn: str | None = None
  # A ReLU after the BatchNorm: the next quantizer clamps at 0 anyway (so thresholds ignore
  # it), a float consumer gets it applied.
  relu: bool = False
  pools: list = dataclasses.field(default_factory=list)
  # Set for int8 residual-stream codes (value `codes * factor`): the `StreamQuant` path.
  stream: str | None = None

  def plain(self) -> bool:
    """Nothing folded onto the accumulator yet (no BatchNorm, ReLU or max-pool pending)?"""
    return self.bn is None and not self.relu and not self.pools

  def on_stream(self, path: str) -> bool:
    """Are these the untouched codes of stream `path`?"""
    return self.stream == path and self.plain()


@dataclasses.dataclass
class _Val:
  name: str
  shape: tuple[int, ...]
  bits: int = FP  # < 32: uint8 codes of that many bits; 32: float32
  act: ActQuant | None = None  # the quantizer that made the codes


def window_of(size, window, strides, padding) -> tuple[tuple[int, int], list[list[int]]]:
  """Output size and explicit `[[lo, hi], [lo, hi]]` pads of a 2-D window op (XLA's SAME)."""
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(tuple(size), tuple(window), tuple(strides), padding)
  pads = [[int(lo), int(hi)] for lo, hi in padding]
  out = tuple((n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(size, pads, window, strides))
  return out, pads


class Builder:
  def __init__(
    self, params, batch_stats, bits: dict[str, tuple[int, int]], per_channel: bool, quantizers
  ):
    self.params, self.stats, self.bits, self.per_channel = params, batch_stats, bits, per_channel
    self.weight_quantizer, self.act_quantizer = quantizers
    # Per-layer `(weight_quantizer, act_quantizer, per_channel)` where a layer's differ from
    # the network's (a model quantized by rules: each rule names its own).
    self.kinds: dict[str, tuple[str, str, bool]] = {}
    self.ops: list[dict] = []
    self.arrays: dict[str, np.ndarray] = {}
    self.layers: dict[str, dict] = {}
    self._count = 0

  def _new(self, hint: str) -> str:
    self._count += 1
    return f"v{self._count}_{hint.replace('/', '.')}"

  def _emit(self, op: str, ins: list[str], out_hint: str, **attrs) -> str:
    out = self._new(out_hint)
    self.ops.append({"op": op, "in": ins, "out": out, **attrs})
    return out

  def _node(self, path: str, tree) -> dict:
    node = tree
    for key in path.split("/"):
      node = node[key]
    return node

  # --- values
  def preprocess(self, shape, mean, std) -> _Val:
    out = self._emit(
      "preprocess", ["image"], "image", mean=[float(m) for m in mean], std=[float(s) for s in std]
    )
    return _Val(out, tuple(shape))

  def _materialize(self, v) -> _Val:
    if isinstance(v, _Val):
      return v
    factor = v.factor
    if np.ndim(factor):  # one factor per output channel: a tensor
      self.arrays[f"{v.layer}.acc_factor"] = np.asarray(factor, np.float32)
      factor = f"{v.layer}.acc_factor"
    else:
      factor = float(factor)
    out = self._emit("dequant", [v.name], v.name, factor=factor, bias=v.bias)
    val = _Val(out, v.shape)
    if v.bn:
      val = self._batchnorm_float(val, v.bn)
    if v.relu:  # commutes with the max-pools
      val = _Val(self._emit("relu", [val.name], "relu"), val.shape)
    for pool in v.pools:
      val = self._pool(val, **pool)
    return val

  def _as_float(self, v: _Val) -> _Val:
    if v.bits == FP:
      return v
    attrs = v.act.attrs()
    return _Val(self._emit("dequant_codes", [v.name], v.name, bits=v.bits, **attrs), v.shape)

  def _kind(self, layer: str) -> tuple[str, str, bool]:
    """`(weight_quantizer, act_quantizer, per_channel)` of `layer`."""
    return self.kinds.get(layer, (self.weight_quantizer, self.act_quantizer, self.per_channel))

  def _clip(self, layer: str, name: str) -> np.ndarray:
    """A learned clip level (float32) of `layer`: positive and finite."""
    node = self._node(layer, self.params)
    weight_kind, act_kind, _ = self._kind(layer)
    if name not in node:
      field, kind = (
        ("weight_quantizer", weight_kind) if name == WEIGHT_CLIP else ("act_quantizer", act_kind)
      )
      raise UnsupportedModel(
        f"{layer} has no {name!r} parameter, which quant.{field}={kind!r} needs (was the "
        "checkpoint trained with another quantizer?)"
      )
    clip = np.asarray(node[name], np.float32)
    # LSQ's step may turn negative in training (its grid is then mirrored, still exact);
    # PACT's fold into thresholds needs alpha > 0 (alpha <= 0 makes every code n).
    pact = name == ACT_CLIP and act_kind == "pact"
    if not np.all(np.isfinite(clip) & ((clip > 0) if pact else (clip != 0))):
      need = "positive" if pact else "non-zero"
      raise UnsupportedModel(f"{layer}/{name} must be finite and {need}; got {clip.tolist()}")
    return clip

  def _act_quant(self, layer: str, bits: int) -> ActQuant:
    kind = self._kind(layer)[1]
    if kind == "dorefa":
      return ActQuant("dorefa", bits)
    return ActQuant(kind, bits, float(self._clip(layer, ACT_CLIP)))

  def act(self, v, bits: int, layer: str):
    """The layer-input quantizer: codes (bits <= 8), or at 32 bits DoReFa's clip to [0, 1]
    (LSQ/PACT: a plain ReLU)."""
    if bits == FP:
      kind = "clip" if self._kind(layer)[1] == "dorefa" else "relu"
      return _Val(self._emit(kind, [self._materialize(v).name], layer + ".in"), v.shape)
    aq = self._act_quant(layer, bits)
    if isinstance(v, _Acc):
      return self._requant(v, aq, layer)
    out = self._emit("quantize", [v.name], layer + ".in", bits=bits, **aq.attrs())
    return _Val(out, v.shape, bits, aq)

  def _requant(self, v: _Acc, aq: ActQuant, layer: str) -> _Val:
    bits = aq.bits
    num, den = aq.step_ratio()
    inv = den / num  # 1 / the next step: DoReFa n
    c = v.shape[-1]
    bias = self.arrays[v.bias].astype(np.float64) if v.bias else np.zeros(c)
    if v.bn:
      mean, var, gamma, beta = self._bn_arrays(v.bn)
      g = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + np.float32(1e-5))
      scale = v.factor * g * inv
      shift = ((bias - mean.astype(np.float64)) * g + beta.astype(np.float64)) * inv
    else:
      scale, shift = np.broadcast_to(np.asarray(v.factor * inv, np.float64), (c,)).copy(), bias * inv
    prefix = f"{layer}.requant"
    self.arrays[f"{prefix}_scale"] = scale
    self.arrays[f"{prefix}_shift"] = shift
    out = _Val(
      self._emit(
        "requant",
        [v.name],
        layer + ".in",
        bits=bits,
        scale=f"{prefix}_scale",
        shift=f"{prefix}_shift",
        bn=v.bn,
        **aq.attrs(),
      ),
      v.shape,
      bits,
      aq,
    )
    for pool in v.pools:
      out = self._pool(out, **pool)
    return out

  def _bn_arrays(self, path):
    p, s = self._node(path, self.params), self._node(path, self.stats)
    return (np.asarray(s["mean"]), np.asarray(s["var"]), np.asarray(p["scale"]), np.asarray(p["bias"]))

  def _batchnorm_float(self, v: _Val, path: str) -> _Val:
    names = {}
    for key, arr in zip(("mean", "var", "scale", "bias"), self._bn_arrays(path)):
      names[key] = f"{path}.{key}"
      self.arrays[names[key]] = np.asarray(arr, np.float32)
    return _Val(self._emit("batchnorm", [v.name], path, eps=1e-5, **names), v.shape)

  def batchnorm(self, v, path: str):
    if isinstance(v, _Acc) and v.bn is None and not v.pools and not v.relu:
      return dataclasses.replace(v, bn=path)
    return self._batchnorm_float(self._materialize(v), path)

  def _pool(self, v: _Val, window, strides, padding) -> _Val:
    (oh, ow), pads = window_of(v.shape[:2], window, strides, padding)
    out = self._emit(
      "maxpool", [v.name], "pool", window=list(window), strides=list(strides), padding=pads
    )
    return _Val(out, (oh, ow, v.shape[2]), v.bits, v.act)

  def maxpool(self, v, window, strides, padding="VALID"):
    if isinstance(v, _Acc) and v.bn is not None:
      v.pools.append(dict(window=window, strides=strides, padding=padding))
      return v
    return self._pool(self._materialize(v), window, strides, padding)

  def relu(self, v):
    if isinstance(v, _Acc):  # every activation quantizer clamps at 0: fold it (`_Acc.relu`)
      return dataclasses.replace(v, relu=True)
    v = self._materialize(v)
    return _Val(self._emit("relu", [v.name], "relu"), v.shape)

  def mean(self, v) -> _Val:
    """The float mean over H, W (`[H, W, C] -> [C]`) of a value the model reduces before a
    quantized dense (the dense then quantizes the mean, as the model does)."""
    v = self._as_float(self._materialize(v))
    return _Val(self._emit("mean", [v.name], "mean"), (v.shape[-1],))

  def stream(self, v, path: str) -> _Acc:
    """Stream `path`'s quantizer (signed LSQ, `layers.STREAM_BITS`): int8 codes. Codes of the
    same stream pass (the model's re-quantization of an on-grid value is the identity); an
    integer layer's accumulator is requantized (`requant_stream`); anything else is float and
    quantized (`stream_quantize`)."""
    if isinstance(v, _Acc) and v.on_stream(path):
      return v
    self.kinds.setdefault(path, ("lsq", "lsq", False))
    step = float(lsq_step(self._clip(path, ACT_CLIP), STREAM_BITS, signed=True))
    if isinstance(v, _Acc) and v.stream is None and v.plain():
      scale = np.asarray(v.factor, np.float64) / step
      if np.ndim(scale):
        self.arrays[f"{v.layer}.stream_scale"] = scale.astype(np.float32)
        scale = f"{v.layer}.stream_scale"
      else:
        scale = float(np.float32(scale))
      out = self._emit(
        "requant_stream", [v.name], path, bits=STREAM_BITS, scale=scale, bias=v.bias, step=step
      )
    else:
      x = self._as_float(self._materialize(v))
      out = self._emit("stream_quantize", [x.name], path, bits=STREAM_BITS, step=step)
    return _Acc(out, v.shape, step, path, stream=path)

  def add(self, a, b):
    if isinstance(a, _Acc) and a.stream and a.plain() and isinstance(b, _Acc) and b.on_stream(a.stream):
      out = self._emit("stream_add", [a.name, b.name], a.stream, bits=STREAM_BITS, step=a.factor)
      return _Acc(out, a.shape, a.factor, a.stream, stream=a.stream)
    a, b = self._materialize(a), self._materialize(b)
    return _Val(self._emit("add", [a.name, b.name], "add"), a.shape)

  # --- layers
  def _weights(self, path: str, w_bits: int) -> tuple[list[str], tuple[Any, int] | None]:
    """Stores the layer's kernel: its tensor names (levels first, then an LSQ step) and the
    weight step as `(num, den)` (DoReFa `(1, n)` for the codes `c`, LSQ `(s, 1)`)."""
    kernel = np.asarray(self._node(path, self.params)["kernel"], np.float32)
    if w_bits == FP:
      self.arrays[f"{path}.kernel"] = kernel
      return [f"{path}.kernel"], None
    weight_kind, _, per_channel = self._kind(path)
    if weight_kind == "lsq":
      i, step = lsq_weight_codes(kernel, self._clip(path, WEIGHT_CLIP), w_bits)
      self.arrays[f"{path}.levels"], self.arrays[f"{path}.weight_step"] = i, step
      return [f"{path}.levels", f"{path}.weight_step"], (step.astype(np.float64), 1)
    self.arrays[f"{path}.levels"] = weight_codes(kernel, w_bits, per_channel)
    return [f"{path}.levels"], (1.0, levels(w_bits))

  def _layer_bits(self, path: str, quantize_input: bool) -> tuple[int, int]:
    w, a = self.bits[path]
    return w, (a if quantize_input else FP)

  def _layer(self, kind: str, x: _Val, path: str, bits, shape, tensors, w_step, bias=None, **attrs):
    """Emits a conv/dense op: integer (acc out) if input and weights are codes, else float
    (then with its `bias`, if any; an integer op's bias goes to its consumer, via `_Acc`).
    Returns the op's output, and for an integer op the accumulator's factor `w_step a_step`
    (divided by `pooled`, the positions a `mean` reduce sums)."""
    w_bits, a_bits = bits
    integer = x.bits != FP and w_bits != FP
    attrs["bias"] = None if integer else bias
    act = x.act
    if not integer:
      x = self._as_float(x)
    w_quant = None if w_bits == FP else self._kind(path)[0]
    step_name = tensors[1] if w_quant == "lsq" else None
    in_attrs = act.attrs() if act else {"quantizer": None, "clip": None, "step": None}
    out = self._emit(
      kind,
      [x.name],
      path,
      layer=path,
      weight=tensors[0],
      weight_bits=w_bits,
      weight_quantizer=w_quant,
      weight_step=step_name,
      in_bits=x.bits,
      in_quantizer=in_attrs["quantizer"] if integer else None,
      in_step=in_attrs["step"] if integer else None,
      **attrs,
    )
    self.layers[path] = {
      "kind": kind,
      "weight_bits": w_bits,
      "act_bits": a_bits,
      "weight_quantizer": w_quant,
      "act_quantizer": in_attrs["quantizer"],
      "act_clip": in_attrs["clip"],
      "act_step": in_attrs["step"],
      "integer": integer,
      "shape": list(shape),
      "tensors": tensors,
    }
    if not integer:
      return out, None
    (w_num, w_den), (a_num, a_den) = w_step, act.step_ratio()
    pooled = attrs.get("pooled", 1)
    return out, (w_num * a_num) / (w_den * a_den * pooled)

  def conv(self, v, path: str, strides=(1, 1), padding: Any = "SAME", quantize_input=True, bias=False):
    w_bits, a_bits = self._layer_bits(path, quantize_input)
    node = self._node(path, self.params)
    kernel = node["kernel"]
    x = self.act(v, a_bits, path) if quantize_input else self._materialize(v)
    (oh, ow), pads = window_of(x.shape[:2], kernel.shape[:2], strides, padding)
    tensors, w_step = self._weights(path, w_bits)
    bias_name = None
    if bias:  # like a dense's: folded into the next codes, or added in float
      bias_name = f"{path}.bias"
      self.arrays[bias_name] = np.asarray(node["bias"], np.float32)
      tensors = [*tensors, bias_name]
    out, factor = self._layer(
      "conv", x, path, (w_bits, a_bits), kernel.shape, tensors, w_step, bias_name,
      strides=list(strides), padding=pads,
    )
    shape = (oh, ow, kernel.shape[-1])
    if factor is not None:
      return _Acc(out, shape, factor, path, bias=bias_name)
    return _Val(out, shape)

  def dense(self, v, path: str, reduce: str, quantize_input: bool = True, bias: bool = True):
    w_bits, a_bits = self._layer_bits(path, quantize_input)
    x = self.act(v, a_bits, path) if quantize_input else self._materialize(v)
    node = self._node(path, self.params)
    tensors, w_step = self._weights(path, w_bits)
    bias_values = node["bias"] if bias else np.zeros(node["kernel"].shape[-1], np.float32)
    bias = f"{path}.bias"
    self.arrays[bias] = np.asarray(bias_values, np.float32)
    integer = x.bits != FP and w_bits != FP
    pooled = x.shape[0] * x.shape[1] if reduce == "mean" and len(x.shape) == 3 else 1
    out, factor = self._layer(
      "dense",
      x,
      path,
      (w_bits, a_bits),
      node["kernel"].shape,
      [*tensors, bias],
      w_step,
      bias,
      reduce=reduce,
      **({"pooled": pooled} if integer else {}),
    )
    shape = (node["kernel"].shape[-1],)
    if factor is not None:
      return _Acc(out, shape, factor, path, bias=bias)
    return _Val(out, shape)

  def output(self, v) -> None:
    v = self._materialize(v)
    self.ops.append({"op": "output", "in": [v.name], "out": "logits"})


def check_quantizers_and_bits(
  bits: dict[str, tuple[int, int]], weight_quantizer: str, act_quantizer: str
) -> None:
  """`ValueError` unless the quantizers are known and every layer's bits are 1..8 or 32."""
  for name, value, allowed in (
    ("weight_quantizer", weight_quantizer, WEIGHT_QUANTIZERS),
    ("act_quantizer", act_quantizer, ACT_QUANTIZERS),
  ):
    if value not in allowed:
      raise ValueError(f"{name}={value!r}; allowed: {', '.join(allowed)}")
  for path, (w, a) in bits.items():
    low = 2 if weight_quantizer == "lsq" else 1  # LSQ's signed grid needs 2 bits
    for kind, k, lo in (("weight_bits", w, low), ("act_bits", a, 1)):
      if not (lo <= k <= MAX_BITS or k == FP):
        raise ValueError(f"{path} {kind}={k}; allowed: {lo}..{MAX_BITS} or 32 (full precision)")


# ----------------------------------------------------------------------------- JAX


def _int_sum(x_parts, w_parts, fn) -> jax.Array:
  acc = None
  for kx, x in x_parts:
    for kw, w in w_parts:
      term = fn(x, w) * (kx * kw)
      acc = term if acc is None else acc + term
  return acc


# XLA's CPU int8 convolution takes a generic path, 4-9x slower than float32, when the input and
# the output both have fewer than 32 channels (jax 0.12.0.1, batch 64 at 32x32, 3x3, 16 -> 16
# channels: 33 ms against 4 ms in float32; 16 -> 32 channels: 6 ms; lab notes, session 18).
# There the kernel gets zero output channels up to this count, sliced off again (exact).
CPU_INT8_MIN_CHANNELS = 32


def _conv(x, w, op, acc_type):
  def conv(kernel):
    return lax.conv_general_dilated(
      x,
      kernel,
      tuple(op["strides"]),
      [tuple(p) for p in op["padding"]],
      dimension_numbers=_DIMS,
      preferred_element_type=acc_type,
    )

  cout = w.shape[-1]
  if acc_type != jnp.int32 or max(w.shape[-2], cout) >= CPU_INT8_MIN_CHANNELS:
    return conv(w)
  widened = ((0, 0),) * 3 + ((0, CPU_INT8_MIN_CHANNELS - cout),)
  return lax.platform_dependent(
    cpu=lambda: conv(jnp.pad(w, widened))[..., :cout], default=lambda: conv(w)
  )


def _reduce(x: jax.Array, how: str) -> jax.Array:
  if x.ndim == 2:
    return x
  if how == "mean":
    return jnp.mean(x, axis=(1, 2))
  return x.reshape(x.shape[0], -1)


def _dot(x, w, acc_type):
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=acc_type)


def layer_weights(op: dict, arrays: dict) -> list[tuple[int, np.ndarray]]:
  """A conv/dense op's kernel as `sum k * part`: int8 code parts of an integer layer
  (`weight_int8_parts`), else one float32 kernel (dequantized levels or 32 bits)."""
  w, bits = arrays[op["weight"]], op["weight_bits"]
  quantizer = weight_quantizer_of(op)
  if bits == FP:
    return [(1, np.asarray(w, np.float32))]
  if op["in_bits"] == FP:
    step = arrays[op["weight_step"]] if quantizer == "lsq" else None
    return [(1, dequantize_weights(w, bits, quantizer, step))]
  return weight_int8_parts(w, bits, quantizer)


def weight_int8_parts(levels_i: np.ndarray, bits: int, quantizer: str) -> list:
  """Signed weight codes as int8 parts `[(k, part)]`: LSQ's `[-2**(b-1), 2**(b-1) - 1]` always
  fits int8; DoReFa's odd codes are split at 8 bits (`int8_parts`)."""
  c = signed_codes(levels_i, bits, quantizer)
  if quantizer == "lsq":
    return [(1, c.astype(np.int8))]
  return int8_parts(c, bits, signed=True)


def _weight_part_factors(op: dict) -> list[int]:
  split = op["weight_bits"] == MAX_BITS and weight_quantizer_of(op) == "dorefa"
  return [2, 1] if split else [1]


def runtime_arrays(program: Program) -> dict[str, np.ndarray]:
  """The arrays the interpreter uses, in their final dtypes (nothing left for XLA to
  constant-fold): int8 weight-code parts of integer layers (`NAME#0`, `NAME#1`), float32
  kernels of float layers (dequantized levels or 32-bit kernels), and the requant
  thresholds expanded from their scale/shift."""
  out = {k: v for k, v in program.arrays.items() if v.dtype == np.float32}
  for op in program.ops:
    if op["op"] in ("conv", "dense"):
      parts = layer_weights(op, program.arrays)
      if op["weight_bits"] == FP or op["in_bits"] == FP:
        out[op["weight"]] = parts[0][1]
      else:
        for t, (_, part) in enumerate(parts):
          out[f"{op['weight']}#{t}"] = part
    if op["op"] == "requant":
      sign, u = thresholds(program.arrays[op["scale"]], program.arrays[op["shift"]], op["bits"])
      out[op["out"] + ".sign"], out[op["out"] + ".thresholds"] = sign, u
  return out


def int8_parts(codes, bits: int, signed: bool) -> list:
  """`codes = sum k * part` with int8 parts: one part if the codes fit, two at 8 bits
  (`c = 2 (c - 1) / 2 + 1` for odd weight codes, `j = 2 (j >> 1) + (j & 1)` for
  activation codes). Works on numpy and JAX arrays."""
  xp = jnp if isinstance(codes, jax.Array) else np
  if bits < MAX_BITS:
    return [(1, codes.astype(xp.int8))]
  if signed:
    return [(2, ((codes - 1) // 2).astype(xp.int8)), (1, xp.ones_like(codes, xp.int8))]
  return [(2, (codes >> 1).astype(xp.int8)), (1, (codes & 1).astype(xp.int8))]


def interpret(ops: list[dict], arrays: dict, images: jax.Array, with_values: bool = False):
  """Runs the program's ops on `uint8 [B, H, W, C]` images; float32 logits (and, with
  `with_values`, every op's output by value name)."""
  env: dict[str, jax.Array] = {"image": images}
  for op in ops:
    env[op["out"]] = _run_op(op, env, arrays)
  return (env["logits"], env) if with_values else env["logits"]


def make_apply(program: Program, *, with_values: bool = False) -> Callable[[jax.Array], Any]:
  """Jitted `uint8 images [B, H, W, C] -> float32 logits [B, classes]` (arrays passed as
  arguments, so compiling does not fold them). With `with_values` it returns
  `(logits, {value name: array})` for every op (tests compare layer by layer)."""
  arrays = {k: jnp.asarray(v) for k, v in runtime_arrays(program).items()}
  core = jax.jit(lambda a, x: interpret(program.ops, a, x, with_values))
  return lambda images: core(arrays, images)


def _run_op(op: dict, env: dict, arrays: dict) -> jax.Array:
  kind, x = op["op"], env[op["in"][0]]
  if kind == "preprocess":
    mean = jnp.asarray(op["mean"], jnp.float32)
    std = jnp.asarray(op["std"], jnp.float32)
    return (x.astype(jnp.float32) / 255.0 - mean) / std  # as qnet.data.input_pipeline
  if kind == "quantize":
    return quantize_codes(x, op)
  if kind == "clip":
    return jnp.clip(x, 0.0, 1.0)
  if kind == "dequant_codes":
    return dequantize_codes(x, op)
  if kind in ("conv", "dense"):
    if op["weight_bits"] != FP and op["in_bits"] != FP:  # integer layer
      xs = int8_parts(x.astype(jnp.int16), op["in_bits"], signed=False)
      ks = _weight_part_factors(op)
      ws = [(k, arrays[f"{op['weight']}#{t}"]) for t, k in enumerate(ks)]
      if kind == "conv":
        return _int_sum(xs, ws, lambda a, b: _conv(a, b, op, jnp.int32))
      if op["reduce"] == "mean" and x.ndim == 4:  # sum of per-position dots: int32 throughout
        return _int_sum(xs, ws, lambda a, b: jnp.sum(_dot(a, b, jnp.int32), axis=(1, 2)))
      return _int_sum(xs, ws, lambda a, b: _dot(_reduce(a, "flatten"), b, jnp.int32))
    w = arrays[op["weight"]]
    if kind == "conv":
      y = _conv(x, w, op, None)
      return y + arrays[op["bias"]] if op.get("bias") else y
    y = _dot(_reduce(x, op["reduce"]), w, None)
    return y + arrays[op["bias"]]
  if kind == "dequant":
    factor = op["factor"]  # a number, or the name of a per-channel float32 tensor
    y = x.astype(jnp.float32) * (arrays[factor] if isinstance(factor, str) else jnp.float32(factor))
    return y + arrays[op["bias"]] if op["bias"] else y
  if kind == "requant":
    sign = arrays[op["out"] + ".sign"]
    u = arrays[op["out"] + ".thresholds"]
    return jnp.sum((x * sign)[..., None] >= u, axis=-1, dtype=jnp.int32).astype(jnp.uint8)
  if kind == "batchnorm":
    mul = lax.rsqrt(arrays[op["var"]] + jnp.float32(op["eps"])) * arrays[op["scale"]]
    return (x - arrays[op["mean"]]) * mul + arrays[op["bias"]]  # as flax's BatchNorm
  if kind == "maxpool":
    init = jnp.array(-jnp.inf if x.dtype == jnp.float32 else jnp.iinfo(x.dtype).min, x.dtype)
    pads = ((0, 0), *map(tuple, op["padding"]), (0, 0))
    return lax.reduce_window(
      x, init, lax.max, (1, *op["window"], 1), (1, *op["strides"], 1), pads
    )
  if kind == "relu":
    return jnp.maximum(x, 0.0)
  if kind == "mean":
    return jnp.mean(x, axis=(1, 2))
  if kind == "add":
    return x + env[op["in"][1]]
  if kind in STREAM_OPS:
    return _stream_op(op, x, env, arrays)
  if kind == "output":
    return x.astype(jnp.float32)
  raise ValueError(f"unknown op {kind!r}")


# The ops that write int8 residual-stream codes.
STREAM_OPS = ("stream_quantize", "requant_stream", "stream_add")


def consumers_of(program: Program) -> dict[str, list[dict]]:
  """Every program value's consumer ops, in program order (the emitters' pattern lookups)."""
  found: dict[str, list[dict]] = {}
  for op in program.ops:
    for name in op["in"]:
      found.setdefault(name, []).append(op)
  return found


def on_stream_codes(op: dict, stream: Any) -> bool:
  """Does `op` run on its own in an emitter's stream form: a `stream_quantize` or
  `stream_add`, or a `requant` / `dequant` whose input is among the `stream` values
  (a `requant_stream` goes with the integer layer it follows)?"""
  return op["op"] in ("stream_quantize", "stream_add") or (
    op["op"] in ("requant", "dequant") and op["in"][0] in stream
  )


def stream_range() -> tuple[int, int]:
  """The stream codes' range: LSQ's signed `[-2^(b-1), 2^(b-1) - 1]`, the int8 range."""
  half = 2 ** (STREAM_BITS - 1)
  return -half, half - 1


def _stream_op(op: dict, x: jax.Array, env: dict, arrays: dict) -> jax.Array:
  # int8 codes of the residual stream; each the fake quantizer's float32 operations
  # (`quant.lsq_quantize`: `round(clip(v / s))`), or the saturating integer sum.
  lo, hi = stream_range()
  if op["op"] == "stream_add":
    y = x.astype(jnp.int32) + env[op["in"][1]].astype(jnp.int32)
    return jnp.clip(y, lo, hi).astype(jnp.int8)
  if op["op"] == "stream_quantize":
    u = x / jnp.float32(op["step"])
  else:  # requant_stream: `acc * (factor / s)` (+ bias / s), the accumulator in the stream's step
    scale = op["scale"]
    u = x.astype(jnp.float32) * (arrays[scale] if isinstance(scale, str) else jnp.float32(scale))
    if op["bias"]:
      u = u + arrays[op["bias"]] / jnp.float32(op["step"])
  return jnp.round(jnp.clip(u, lo, hi)).astype(jnp.int8)


def fp32_bytes(params: PyTree, batch_stats: PyTree) -> int:
  """Bytes of the network's parameters and BN statistics at 4 bytes each."""
  leaves = jax.tree.leaves(params) + jax.tree.leaves(batch_stats)
  return 4 * sum(math.prod(np.shape(x)) for x in leaves)
