"""Integer inference of a DoReFa-quantized network: the program, and its JAX interpreter.

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
manifest) and named arrays. `build_program` makes it from a trained network's parameter
and batch-statistics trees and its per-layer bits; `make_apply` turns it into a pure JAX
function of raw `uint8` images `[B, H, W, C]` returning float32 logits, which is what
`qnet.export` serializes with `jax.export`. `qnet.onnx_graph` emits the same ops as ONNX.

The structure (which BatchNorm follows which conv, pools, residuals) is read from the
parameter tree's names: `stem`, `conv{s}_{c}`, `fc`, `head` (SimpleCNN); `stem`,
`stage{i}_block{j}/{conv1,conv2,conv3,shortcut,bn1,...}`, `final_bn` (PreActResNet, the
first block of every stage after the first has stride 2, as in `qnet.models.resnet`).
Other quantizers (LSQ, PACT) would plug in at `weight_codes` (their codes and one scale per
tensor or channel) and in `_Builder._requant` (their activation step size instead of `1/n`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from qnet import quant

PyTree = Any
MAX_BITS = 8
FP = quant.FULL_PRECISION
_DIMS = ("NHWC", "HWIO", "NHWC")
_INT32 = np.iinfo(np.int32)


def levels(bits: int) -> int:
  """`n = 2**bits - 1`."""
  return (1 << int(bits)) - 1


@dataclasses.dataclass
class Program:
  """Integer inference program: `ops` (JSON-able dicts) over named `arrays`.

  Arrays: `NAME.levels` uint8 weight levels `i` (kernel shape), `NAME.kernel` float32 for
  32-bit kernels, `NAME.bias` float32, `NAME.requant_scale` / `.requant_shift` float64,
  BatchNorm `NAME.mean/.var/.scale/.bias` float32. `layers` lists per quantizable layer its
  bits and tensor names (for the manifest).
  """

  ops: list[dict]
  arrays: dict[str, np.ndarray]
  input_shape: tuple[int, int, int]
  num_classes: int
  layers: dict[str, dict]


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


def dequantize_weights(levels_i: np.ndarray, bits: int) -> np.ndarray:
  """`2 (i / n) - 1` in float32, the quantizer's own formula (so equality is exact)."""
  n = np.float32(levels(bits))
  return np.float32(2.0) * (np.asarray(levels_i).astype(np.float32) / n) - np.float32(1.0)


def signed_codes(levels_i: np.ndarray, bits: int) -> np.ndarray:
  """`c = 2i - n` (int16): the weight is `c / n`."""
  return (2 * np.asarray(levels_i).astype(np.int16) - levels(bits)).astype(np.int16)


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
  """The parameter tree is not one of the architectures the exporter knows."""


@dataclasses.dataclass
class _Acc:
  """An int32 accumulator not yet emitted further: value `acc * factor + bias`, then the
  pending BatchNorm and max-pools (folded into thresholds if a quantizer follows)."""

  name: str
  shape: tuple[int, ...]
  factor: float
  bias: str | None = None
  bn: str | None = None
  pools: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Val:
  name: str
  shape: tuple[int, ...]
  bits: int = FP  # < 32: uint8 codes of that many bits; 32: float32


def _window(size, window, strides, padding) -> tuple[tuple[int, int], list[list[int]]]:
  """Output size and explicit `[[lo, hi], [lo, hi]]` pads of a 2-D window op (XLA's SAME)."""
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(tuple(size), tuple(window), tuple(strides), padding)
  pads = [[int(lo), int(hi)] for lo, hi in padding]
  out = tuple((n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in zip(size, pads, window, strides))
  return out, pads


class _Builder:
  def __init__(self, params, batch_stats, bits: dict[str, tuple[int, int]], per_channel: bool):
    self.params, self.stats, self.bits, self.per_channel = params, batch_stats, bits, per_channel
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
    out = self._emit("dequant", [v.name], v.name, factor=v.factor, bias=v.bias)
    val = _Val(out, v.shape)
    if v.bn:
      val = self._batchnorm_float(val, v.bn)
    for pool in v.pools:
      val = self._pool(val, **pool)
    return val

  def _as_float(self, v: _Val) -> _Val:
    if v.bits == FP:
      return v
    return _Val(self._emit("dequant_codes", [v.name], v.name, bits=v.bits), v.shape)

  def act(self, v, bits: int, layer: str):
    """The layer-input quantizer: codes (bits <= 8) or the clip (32 bits)."""
    if bits == FP:
      return _Val(self._emit("clip", [self._materialize(v).name], layer + ".in"), v.shape)
    if isinstance(v, _Acc):
      return self._requant(v, bits, layer)
    return _Val(self._emit("quantize", [v.name], layer + ".in", bits=bits), v.shape, bits)

  def _requant(self, v: _Acc, bits: int, layer: str) -> _Val:
    n = levels(bits)
    c = v.shape[-1]
    bias = self.arrays[v.bias].astype(np.float64) if v.bias else np.zeros(c)
    if v.bn:
      mean, var, gamma, beta = self._bn_arrays(v.bn)
      g = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + np.float32(1e-5))
      scale = v.factor * g * n
      shift = ((bias - mean.astype(np.float64)) * g + beta.astype(np.float64)) * n
    else:
      scale, shift = np.full(c, v.factor * n), bias * n
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
      ),
      v.shape,
      bits,
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
    if isinstance(v, _Acc) and v.bn is None and not v.pools:
      return dataclasses.replace(v, bn=path)
    return self._batchnorm_float(self._materialize(v), path)

  def _pool(self, v: _Val, window, strides, padding) -> _Val:
    (oh, ow), pads = _window(v.shape[:2], window, strides, padding)
    out = self._emit(
      "maxpool", [v.name], "pool", window=list(window), strides=list(strides), padding=pads
    )
    return _Val(out, (oh, ow, v.shape[2]), v.bits)

  def maxpool(self, v, window, strides, padding="VALID"):
    if isinstance(v, _Acc) and v.bn is not None:
      v.pools.append(dict(window=window, strides=strides, padding=padding))
      return v
    return self._pool(self._materialize(v), window, strides, padding)

  def relu(self, v) -> _Val:
    v = self._materialize(v)
    return _Val(self._emit("relu", [v.name], "relu"), v.shape)

  def add(self, a, b) -> _Val:
    a, b = self._materialize(a), self._materialize(b)
    return _Val(self._emit("add", [a.name, b.name], "add"), a.shape)

  # --- layers
  def _weights(self, path: str, w_bits: int) -> str:
    kernel = np.asarray(self._node(path, self.params)["kernel"], np.float32)
    if w_bits == FP:
      self.arrays[f"{path}.kernel"] = kernel
      return f"{path}.kernel"
    self.arrays[f"{path}.levels"] = weight_codes(kernel, w_bits, self.per_channel)
    return f"{path}.levels"

  def _layer_bits(self, path: str, quantize_input: bool) -> tuple[int, int]:
    w, a = self.bits[path]
    return w, (a if quantize_input else FP)

  def _layer(self, kind: str, x: _Val, path: str, bits, shape, tensors, **attrs):
    """Emits a conv/dense op: integer (acc out) if input and weights are codes, else float."""
    w_bits, a_bits = bits
    integer = x.bits != FP and w_bits != FP
    if not integer:
      x = self._as_float(x)
    out = self._emit(
      kind, [x.name], path, layer=path, weight=tensors[0], weight_bits=w_bits, in_bits=x.bits, **attrs
    )
    self.layers[path] = {
      "kind": kind,
      "weight_bits": w_bits,
      "act_bits": a_bits,
      "integer": integer,
      "shape": list(shape),
      "tensors": tensors,
    }
    return out, integer, x.bits

  def conv(self, v, path: str, strides=(1, 1), padding: Any = "SAME", quantize_input=True):
    w_bits, a_bits = self._layer_bits(path, quantize_input)
    kernel = self._node(path, self.params)["kernel"]
    x = self.act(v, a_bits, path) if quantize_input else self._materialize(v)
    (oh, ow), pads = _window(x.shape[:2], kernel.shape[:2], strides, padding)
    weight = self._weights(path, w_bits)
    out, integer, in_bits = self._layer(
      "conv", x, path, (w_bits, a_bits), kernel.shape, [weight], strides=list(strides), padding=pads
    )
    shape = (oh, ow, kernel.shape[-1])
    if integer:
      return _Acc(out, shape, 1.0 / (levels(w_bits) * levels(in_bits)))
    return _Val(out, shape)

  def dense(self, v, path: str, reduce: str):
    w_bits, a_bits = self._layer_bits(path, True)
    x = self.act(v, a_bits, path)
    node = self._node(path, self.params)
    weight = self._weights(path, w_bits)
    bias = f"{path}.bias"
    self.arrays[bias] = np.asarray(node["bias"], np.float32)
    integer = x.bits != FP and w_bits != FP
    out, integer, in_bits = self._layer(
      "dense",
      x,
      path,
      (w_bits, a_bits),
      node["kernel"].shape,
      [weight, bias],
      reduce=reduce,
      bias=None if integer else bias,
    )
    shape = (node["kernel"].shape[-1],)
    if integer:
      pooled = x.shape[0] * x.shape[1] if reduce == "mean" and len(x.shape) == 3 else 1
      return _Acc(out, shape, 1.0 / (levels(w_bits) * levels(in_bits) * pooled), bias=bias)
    return _Val(out, shape)

  def output(self, v) -> None:
    v = self._materialize(v)
    self.ops.append({"op": "output", "in": [v.name], "out": "logits"})


def _simple_cnn(b: _Builder, params) -> None:
  convs = sorted(
    (int(m[1]), int(m[2]), k) for k in params if (m := re.fullmatch(r"conv(\d+)_(\d+)", k))
  )
  stages: dict[int, list[str]] = {1: ["stem"]}
  for s, _, name in convs:
    stages.setdefault(s, []).append(name)
  x = b.start
  for s in sorted(stages):
    for name in stages[s]:
      x = b.conv(x, name, quantize_input=name != "stem")
      x = b.batchnorm(x, f"{name}_bn")
    x = b.maxpool(x, (2, 2), (2, 2))
  if "fc" in params:
    x = b.dense(x, "fc", reduce="flatten")
    x = b.batchnorm(x, "fc_bn")
  b.output(b.dense(x, "head", reduce="flatten"))


def _preact_resnet(b: _Builder, params) -> None:
  x = b.start
  if "stem_bn" in params:  # ImageNet stem: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool
    x = b.conv(x, "stem", (2, 2), [(3, 3), (3, 3)], quantize_input=False)
    x = b.relu(b.batchnorm(x, "stem_bn"))
    x = b.maxpool(x, (3, 3), (2, 2), [(1, 1), (1, 1)])
  else:
    x = b.conv(x, "stem", quantize_input=False)
  blocks = sorted(
    (int(m[1]), int(m[2]), k) for k in params if (m := re.fullmatch(r"stage(\d+)_block(\d+)", k))
  )
  for i, j, name in blocks:
    stride = (2, 2) if i > 1 and j == 1 else (1, 1)
    block = params[name]
    pre = b.batchnorm(x, f"{name}/bn1")
    if "conv3" in block:  # bottleneck
      y = b.conv(pre, f"{name}/conv1")
      y = b.conv(b.batchnorm(y, f"{name}/bn2"), f"{name}/conv2", stride)
      y = b.conv(b.batchnorm(y, f"{name}/bn3"), f"{name}/conv3")
    else:
      y = b.conv(pre, f"{name}/conv1", stride)
      y = b.conv(b.batchnorm(y, f"{name}/bn2"), f"{name}/conv2")
    if "shortcut" in block:
      x = b.conv(pre, f"{name}/shortcut", stride)
    x = b.add(x, y)
  x = b.batchnorm(x, "final_bn")
  b.output(b.dense(x, "head", reduce="mean"))


def architecture(params: PyTree) -> str:
  """`simple_cnn` or `preact_resnet`, read off the parameter tree's names."""
  keys = set(params)
  if "stem" in keys and "head" in keys:
    if any(re.fullmatch(r"stage\d+_block\d+", k) for k in keys):
      return "preact_resnet"
    if all(k in ("stem", "head", "fc") or re.fullmatch(r"conv\d+_\d+(_bn)?|stem_bn|fc_bn", k) for k in keys):
      return "simple_cnn"
  raise UnsupportedModel(
    "the exporter knows the SimpleCNN (fmnist_cnn, tiny_cnn) and pre-activation ResNet "
    f"(resnet*, tiny_resnet) parameter trees; got top-level names {sorted(keys)}"
  )


def build_program(
  params: PyTree,
  batch_stats: PyTree,
  bits: dict[str, tuple[int, int]],
  *,
  input_shape: tuple[int, int, int],
  mean: tuple[float, ...],
  std: tuple[float, ...],
  per_channel: bool = False,
) -> Program:
  """The integer program of a trained SimpleCNN or PreActResNet.

  `bits` maps each quantizable layer path (`'stage1_block1/conv1'`) to its
  `(weight_bits, act_bits)`, each 1..8 or 32; `mean`/`std` are the dataset's
  normalisation (pixels in [0, 1]).
  """
  for path, (w, a) in bits.items():
    for kind, k in (("weight_bits", w), ("act_bits", a)):
      if not (1 <= k <= MAX_BITS or k == FP):
        raise ValueError(f"{path} {kind}={k}; allowed: 1..{MAX_BITS} or 32 (full precision)")
  params = jax.tree.map(np.asarray, params)
  batch_stats = jax.tree.map(np.asarray, batch_stats)
  kind = architecture(params)
  b = _Builder(params, batch_stats, {p: (int(w), int(a)) for p, (w, a) in bits.items()}, per_channel)
  b.start = b.preprocess(input_shape, mean, std)
  (_simple_cnn if kind == "simple_cnn" else _preact_resnet)(b, params)
  num_classes = int(np.asarray(params["head"]["kernel"]).shape[-1])
  return Program(b.ops, b.arrays, tuple(input_shape), num_classes, b.layers)


# ----------------------------------------------------------------------------- JAX


def _int_sum(x_parts, w_parts, fn) -> jax.Array:
  acc = None
  for kx, x in x_parts:
    for kw, w in w_parts:
      term = fn(x, w) * (kx * kw)
      acc = term if acc is None else acc + term
  return acc


def _conv(x, w, op, acc_type):
  return lax.conv_general_dilated(
    x,
    w,
    tuple(op["strides"]),
    [tuple(p) for p in op["padding"]],
    dimension_numbers=_DIMS,
    preferred_element_type=acc_type,
  )


def _reduce(x: jax.Array, how: str) -> jax.Array:
  if x.ndim == 2:
    return x
  if how == "mean":
    return jnp.mean(x, axis=(1, 2))
  return x.reshape(x.shape[0], -1)


def _dot(x, w, acc_type):
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=acc_type)


def runtime_arrays(program: Program) -> dict[str, np.ndarray]:
  """The arrays the interpreter uses, in their final dtypes (nothing left for XLA to
  constant-fold): int8 weight-code parts of integer layers (`NAME#0`, `NAME#1`), float32
  kernels of float layers (dequantized levels or 32-bit kernels), and the requant
  thresholds expanded from their scale/shift."""
  out = {k: v for k, v in program.arrays.items() if v.dtype == np.float32}
  for op in program.ops:
    if op["op"] in ("conv", "dense"):
      w, bits = program.arrays[op["weight"]], op["weight_bits"]
      if bits == FP:
        out[op["weight"]] = w
      elif op["in_bits"] == FP:
        out[op["weight"]] = dequantize_weights(w, bits)
      else:
        for t, (_, part) in enumerate(int8_parts(signed_codes(w, bits), bits, signed=True)):
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
    return (x.astype(jnp.float32) / 255.0 - mean) / std  # as qnet.input_pipeline
  if kind == "quantize":
    n = jnp.float32(levels(op["bits"]))
    return jnp.round(jnp.clip(x, 0.0, 1.0) * n).astype(jnp.uint8)
  if kind == "clip":
    return jnp.clip(x, 0.0, 1.0)
  if kind == "dequant_codes":
    return x.astype(jnp.float32) / jnp.float32(levels(op["bits"]))
  if kind in ("conv", "dense"):
    if op["weight_bits"] != FP and op["in_bits"] != FP:  # integer layer
      xs = int8_parts(x.astype(jnp.int16), op["in_bits"], signed=False)
      ks = [2, 1] if op["weight_bits"] == MAX_BITS else [1]
      ws = [(k, arrays[f"{op['weight']}#{t}"]) for t, k in enumerate(ks)]
      if kind == "conv":
        return _int_sum(xs, ws, lambda a, b: _conv(a, b, op, jnp.int32))
      if op["reduce"] == "mean" and x.ndim == 4:  # sum of per-position dots: int32 throughout
        return _int_sum(xs, ws, lambda a, b: jnp.sum(_dot(a, b, jnp.int32), axis=(1, 2)))
      return _int_sum(xs, ws, lambda a, b: _dot(_reduce(a, "flatten"), b, jnp.int32))
    w = arrays[op["weight"]]
    if kind == "conv":
      return _conv(x, w, op, None)
    y = _dot(_reduce(x, op["reduce"]), w, None)
    return y + arrays[op["bias"]]
  if kind == "dequant":
    y = x.astype(jnp.float32) * jnp.float32(op["factor"])
    return y + arrays[op["bias"]] if op["bias"] else y
  if kind == "requant":
    sign = arrays[op["out"] + ".sign"]
    u = arrays[op["out"] + ".thresholds"]
    return jnp.sum((x * sign)[..., None] >= u, axis=-1, dtype=jnp.int32).astype(jnp.uint8)
  if kind == "batchnorm":
    mul = lax.rsqrt(arrays[op["var"]] + jnp.float32(op["eps"])) * arrays[op["scale"]]
    return (x - arrays[op["mean"]]) * mul + arrays[op["bias"]]  # as flax's BatchNorm
  if kind == "maxpool":
    init = jnp.array(-jnp.inf if x.dtype == jnp.float32 else 0, x.dtype)
    pads = ((0, 0), *map(tuple, op["padding"]), (0, 0))
    return lax.reduce_window(
      x, init, lax.max, (1, *op["window"], 1), (1, *op["strides"], 1), pads
    )
  if kind == "relu":
    return jnp.maximum(x, 0.0)
  if kind == "add":
    return x + env[op["in"][1]]
  if kind == "output":
    return x.astype(jnp.float32)
  raise ValueError(f"unknown op {kind!r}")


def fp32_bytes(params: PyTree, batch_stats: PyTree) -> int:
  """Bytes of the network's parameters and BN statistics at 4 bytes each."""
  leaves = jax.tree.leaves(params) + jax.tree.leaves(batch_stats)
  return 4 * sum(math.prod(np.shape(x)) for x in leaves)
