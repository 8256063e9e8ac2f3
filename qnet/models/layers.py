"""Quantized Flax layers.

Every quantizable layer reads its bit-widths from the `precision` variable collection
(`weight_bits`, `act_bits`, float32 scalars), which the caller passes to `apply` like any
other collection. Bit-widths are therefore data, keyed like the parameter tree, and never
Python constants inside the model: changing them never recompiles.

Convention used by every model in qnet: a layer quantizes its *input* activation with
`act_bits` (the activation quantizer, DoReFa, PACT or LSQ, also plays the role of the
ReLU) and its kernel with `weight_bits` (DoReFa or LSQ). LSQ and PACT keep their learned
clip levels as parameters of the layer (docs/results.md, "Learned quantizers (LSQ, PACT)"). The
first layer (named `stem`) sees the image, so it never quantizes its input; the classifier
is named `head`. `precision.keep_first_last_fp` relies on these two names.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qnet.platform import conv as conv_lib
from qnet.quant import quantizers as quant
from qnet.quant.precision import HEAD, PRECISION, STEM

# He-normal over fan-out, as torchvision's ResNets; keeps deep stacks trainable from scratch.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def bits(module: nn.Module) -> tuple[jax.Array, jax.Array]:
  """`module`'s `(weight_bits, act_bits)` from the `precision` collection (created at init)."""
  return _bits(module)


def _bits(module: nn.Module) -> tuple[jax.Array, jax.Array]:
  # Initialised to full precision by `init`; in `apply` the caller must pass the
  # collection (flax raises if it is missing and immutable), so no layer silently runs FP.
  w = module.variable(PRECISION, "weight_bits", lambda: jnp.float32(quant.FULL_PRECISION))
  a = module.variable(PRECISION, "act_bits", lambda: jnp.float32(quant.FULL_PRECISION))
  return w.value, a.value


WEIGHT_QUANTIZERS = ("dorefa", "lsq")
ACT_QUANTIZERS = ("dorefa", "pact", "lsq")
# Learned range parameters (PACT's clip level alpha; LSQ's `t = step * sqrt(Q_p)`, see
# `qnet.quant.quantizers`): parameters next to the kernel.
WEIGHT_CLIP, ACT_CLIP = "weight_clip", "act_clip"
# Collection written by the first-batch calibration pass (`qnet.train.calibration.calibrate`):
# with it mutable, a layer computes its clip levels from the data it sees, uses them at once
# (so later layers calibrate on calibrated inputs) and records them there.
CALIBRATION = "calibration"


def activation(module: nn.Module, x: jax.Array, act_bits: jax.Array) -> jax.Array:
  """`module`'s input nonlinearity: `relu` for the plain FP network (`module.act`), else its
  `act_quantizer` (`dorefa` clip-and-quantize; `pact` / `lsq` with a learned clip level)."""
  if module.act == "relu":
    return nn.relu(x)
  return quantize_input(module, x, act_bits, module.act_quantizer)


def quantize_input(
  module: nn.Module, x: jax.Array, act_bits: jax.Array, quantizer: str, signed: bool = False
) -> jax.Array:
  """A layer's input activation fake-quantized by `quantizer` (`dorefa`, `pact`, `lsq`; `lsq`
  also `signed`) at `act_bits`; PACT's and LSQ's clip levels are parameters of `module`.
  Used by qnet's layers and by rule-quantized foreign layers alike (`qnet.models.rules`)."""
  if quantizer == "dorefa":
    return quant.quantize_activations(x, act_bits)
  ones = lambda: jnp.ones(())
  if quantizer == "pact":
    init = lambda: quant.pact_init_alpha(x, act_bits)
    alpha = _clip_level(module, ACT_CLIP, act_bits, ones, init)
    return quant.pact_quantize(x, alpha, act_bits)
  init = lambda: quant.lsq_init_clip(x, signed=signed)
  t = _clip_level(module, ACT_CLIP, act_bits, ones, init)
  return quant.lsq_quantize(x, t, act_bits, signed=signed)


def _clip_level(module, name, bits, default, init) -> jax.Array:
  # `default` holds until the calibration pass replaces it with `init()` (a fresh run
  # calibrates before its first step): DoReFa's range 1 for activations, LSQ's initial value
  # for weights.
  param = module.param(name, lambda _: default())
  if not module.is_mutable_collection(CALIBRATION):
    return param
  value = jnp.where(quant.is_full_precision(bits), param, init())
  module.put_variable(CALIBRATION, name, value)
  return value


def _weights(kernel: jax.Array, weight_bits: jax.Array, module: nn.Module) -> jax.Array:
  # `relu` is the plain FP network: no quantizer op in the graph at all, which makes it the
  # reference for the fake-quant overhead (validation keeps its bit-widths at 32).
  if module.act == "relu":
    return kernel
  return quantize_kernel(module, kernel, weight_bits, module.weight_quantizer, module.per_channel)


def quantize_kernel(
  module: nn.Module, kernel: jax.Array, weight_bits: jax.Array, quantizer: str, per_channel: bool
) -> jax.Array:
  """A layer's kernel (output channels last) fake-quantized by `quantizer` (`dorefa`, `lsq`)
  at `weight_bits`, per output channel if `per_channel`; LSQ's step is a parameter of
  `module`. Used by qnet's layers and by rule-quantized foreign layers alike."""
  if quantizer == "dorefa":
    return quant.quantize_weights(kernel, weight_bits, per_channel)
  axes = tuple(range(kernel.ndim - 1)) if per_channel else None
  init = lambda: quant.lsq_init_clip(kernel, True, axes)
  clip = _clip_level(module, WEIGHT_CLIP, weight_bits, init, init)
  return quant.lsq_quantize(kernel, clip, weight_bits, signed=True)


class QuantSettings(nn.Module):
  """The settings every quantizable layer is built with, carried by qnet's models and layers
  alike (keyword-only fields): `act` (`quant`, or `relu` for the plain FP network), the
  compute `dtype`, per-channel weight scales, and the weight / activation quantizer kinds."""

  _: dataclasses.KW_ONLY
  act: str = "quant"
  dtype: Any = jnp.float32
  per_channel: bool = False
  weight_quantizer: str = "dorefa"
  act_quantizer: str = "dorefa"


class QuantConv(QuantSettings):
  """Conv (NHWC, HWIO) with a k-bit kernel and a k-bit input activation."""

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Any = "SAME"
  use_bias: bool = False
  quantize_input: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight_bits, act_bits = _bits(self)
    kernel = self.param(
      "kernel", conv_init, (*self.kernel_size, x.shape[-1], self.features), jnp.float32
    )
    if self.quantize_input:
      x = activation(self, x, act_bits)
    w = _weights(kernel, weight_bits, self)
    y = conv_lib.conv(
      x.astype(self.dtype), w.astype(self.dtype), strides=tuple(self.strides), padding=self.padding
    )
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(
        self.dtype
      )
    return y


class QuantDense(QuantSettings):
  """Dense layer with a k-bit kernel and a k-bit input activation.

  `reduce` says how a 4-D input becomes a vector after the input quantizer: `mean`
  (global average pooling, the ResNet classifier) or `flatten`.
  """

  features: int
  quantize_input: bool = True
  reduce: str = "mean"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight_bits, act_bits = _bits(self)
    if self.quantize_input:
      x = activation(self, x, act_bits)
    if x.ndim > 2:
      x = jnp.mean(x, axis=(1, 2)) if self.reduce == "mean" else x.reshape(x.shape[0], -1)
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32
    )
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    w = _weights(kernel, weight_bits, self)
    y = jnp.dot(x.astype(self.dtype), w.astype(self.dtype))
    return y + bias.astype(self.dtype)


def layer_defs(model: QuantSettings) -> tuple[Callable[..., QuantConv], Callable[..., QuantDense]]:
  """`QuantConv` and `QuantDense` constructors carrying `model`'s `act`, `dtype`,
  `per_channel` and quantizer kinds: a model builds every layer with these (and hands them
  to its blocks), so no layer can miss a setting."""
  kw = {
    f.name: getattr(model, f.name)
    for f in dataclasses.fields(QuantSettings)
    if f.name not in ("parent", "name")  # nn.Module's own fields
  }
  return functools.partial(QuantConv, **kw), functools.partial(QuantDense, **kw)


# The residual stream's codes (`PreActResNet(residual_bits=8)`): int8, what the runtimes' int8
# convs write and their integer adds read.
STREAM_BITS = 8


class StreamQuant(nn.Module):
  """A quantized residual stream's quantizer: signed LSQ at `STREAM_BITS` with one learned step
  per stage, one instance shared by the stage's blocks (so an identity shortcut is already on
  the grid and a block's sum is an integer sum). Called as `q(v, act_bits)` with the block's
  own `act_bits` (data): the stream is quantized while the block is (`act_bits < 32`) and
  full precision (the identity) when it is not, so progressive and stochastic precision and
  the FP teacher need no second switch. A block adds `q(q(shortcut) + q(residual))`: each
  branch rounded onto the grid and saturated to int8, then the int8 sum saturated."""

  @nn.compact
  def __call__(self, x: jax.Array, act_bits: jax.Array) -> jax.Array:
    bits = jnp.where(quant.is_full_precision(act_bits), quant.FULL_PRECISION, STREAM_BITS)
    return quantize_input(self, x, bits, "lsq", signed=True)


def batch_norm(train: bool, dtype: Any, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.9 here = 0.1 there); fp32 statistics."""
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )
