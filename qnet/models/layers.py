"""Quantized Flax layers.

Every quantizable layer reads its bit-widths from the `precision` variable collection
(`weight_bits`, `act_bits`, float32 scalars), which the caller passes to `apply` like any
other collection. Bit-widths are therefore data, keyed like the parameter tree, and never
Python constants inside the model: changing them never recompiles.

Convention used by every model in qnet: a layer quantizes its *input* activation with
`act_bits` (the DoReFa activation quantizer, which also plays the role of the ReLU) and
its kernel with `weight_bits`. The first layer (named `stem`) sees the image, so it never
quantizes its input; the classifier is named `head`. `precision.keep_first_last_fp`
relies on these two names.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qnet import conv as conv_lib
from qnet import quant

PRECISION = "precision"
STEM, HEAD = "stem", "head"
# He-normal over fan-out, as torchvision's ResNets; keeps deep stacks trainable from scratch.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _bits(module: nn.Module) -> tuple[jax.Array, jax.Array]:
  # Initialised to full precision by `init`; in `apply` the caller must pass the
  # collection (flax raises if it is missing and immutable), so no layer silently runs FP.
  w = module.variable(PRECISION, "weight_bits", lambda: jnp.float32(quant.FULL_PRECISION))
  a = module.variable(PRECISION, "act_bits", lambda: jnp.float32(quant.FULL_PRECISION))
  return w.value, a.value


def activation(x: jax.Array, act_bits: jax.Array, kind: str) -> jax.Array:
  """The layer-input nonlinearity: `quant` (DoReFa clip-and-quantize) or `relu` (plain FP net)."""
  if kind == "relu":
    return nn.relu(x)
  return quant.quantize_activations(x, act_bits)


def _weights(kernel: jax.Array, weight_bits: jax.Array, module: nn.Module) -> jax.Array:
  # `relu` is the plain FP network: no quantizer op in the graph at all, which makes it the
  # reference for the fake-quant overhead (validation keeps its bit-widths at 32).
  if module.act == "relu":
    return kernel
  return quant.quantize_weights(kernel, weight_bits, module.per_channel)


class QuantConv(nn.Module):
  """Conv (NHWC, HWIO) with a k-bit kernel and a k-bit input activation."""

  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: Any = "SAME"
  use_bias: bool = False
  quantize_input: bool = True
  per_channel: bool = False
  act: str = "quant"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight_bits, act_bits = _bits(self)
    kernel = self.param(
      "kernel", conv_init, (*self.kernel_size, x.shape[-1], self.features), jnp.float32
    )
    if self.quantize_input:
      x = activation(x, act_bits, self.act)
    w = _weights(kernel, weight_bits, self)
    y = conv_lib.conv(
      x.astype(self.dtype), w.astype(self.dtype), strides=tuple(self.strides), padding=self.padding
    )
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32).astype(
        self.dtype
      )
    return y


class QuantDense(nn.Module):
  """Dense layer with a k-bit kernel and a k-bit input activation.

  `reduce` says how a 4-D input becomes a vector after the input quantizer: `mean`
  (global average pooling, the ResNet classifier) or `flatten`.
  """

  features: int
  quantize_input: bool = True
  per_channel: bool = False
  reduce: str = "mean"
  act: str = "quant"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight_bits, act_bits = _bits(self)
    if self.quantize_input:
      x = activation(x, act_bits, self.act)
    if x.ndim > 2:
      x = jnp.mean(x, axis=(1, 2)) if self.reduce == "mean" else x.reshape(x.shape[0], -1)
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32
    )
    bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    w = _weights(kernel, weight_bits, self)
    y = jnp.dot(x.astype(self.dtype), w.astype(self.dtype))
    return y + bias.astype(self.dtype)


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
