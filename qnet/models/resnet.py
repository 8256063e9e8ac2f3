"""Pre-activation ResNets (He et al. 2016), the family the paper quantizes.

CIFAR family (ResNet-20/32/56, 3 stages of 16/32/64 channels, any input >= 28x28) and the
ImageNet family (ResNet-18/34 basic blocks, ResNet-50 bottlenecks, 7x7 stem + max-pool).
Each residual block is one top-level module named `stage{i}_block{j}`; stochastic precision
with `sp_unit='block'` samples those modules as units. Each conv quantizes its own input (the
pre-activation) and its kernel. The residual stream is full precision (`residual_bits=32`,
the paper's networks) or int8 (`residual_bits=8`, `layers.StreamQuant`: one learned step per
stage), which lets the exported network run every conv as an int8-in, int8-out kernel and
every sum as an integer add (docs/deploying.md, "An int8 residual stream").
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qnet.models.layers import HEAD, STEM, STREAM_BITS, QuantSettings, StreamQuant, batch_norm, layer_defs
from qnet.quant.precision import PRECISION


def _join(x: jax.Array, y: jax.Array, last: nn.Module, stream: nn.Module | None) -> jax.Array:
  """A block's output: `x + y`, or with a quantized stream `q(q(x) + q(y))` at the bits of
  the block's last conv (`last`, already called)."""
  if stream is None:
    return x + y
  bits = last.variables[PRECISION]["act_bits"]
  q = lambda v: stream(v, bits)
  return q(q(x) + q(y))


class BasicBlock(nn.Module):
  """Two 3x3 convs; `conv` is the model's layer constructor (carries its quantizer settings)."""

  features: int
  strides: int
  conv: Callable[..., nn.Module]
  dtype: Any = jnp.float32
  stream: nn.Module | None = None  # the stage's `StreamQuant`, or None: a float stream

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = lambda f, k, s, name: self.conv(f, (k, k), (s, s), name=name)
    pre = batch_norm(train, self.dtype, "bn1")(x)
    y = conv(self.features, 3, self.strides, "conv1")(pre)
    y = batch_norm(train, self.dtype, "bn2")(y)
    last = conv(self.features, 3, 1, "conv2")
    y = last(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv(self.features, 1, self.strides, "shortcut")(pre)
    return _join(x, y, last, self.stream)


class Bottleneck(nn.Module):
  """1x1-3x3-1x1 convs, `expansion` times wider out; `conv` as in `BasicBlock`."""

  features: int
  strides: int
  conv: Callable[..., nn.Module]
  dtype: Any = jnp.float32
  expansion: int = 4
  stream: nn.Module | None = None  # as in `BasicBlock`

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    conv = lambda f, k, s, name: self.conv(f, (k, k), (s, s), name=name)
    out = self.features * self.expansion
    pre = batch_norm(train, self.dtype, "bn1")(x)
    y = conv(self.features, 1, 1, "conv1")(pre)
    y = batch_norm(train, self.dtype, "bn2")(y)
    y = conv(self.features, 3, self.strides, "conv2")(y)
    y = batch_norm(train, self.dtype, "bn3")(y)
    last = conv(out, 1, 1, "conv3")
    y = last(y)
    if self.strides != 1 or x.shape[-1] != out:
      x = conv(out, 1, self.strides, "shortcut")(pre)
    return _join(x, y, last, self.stream)


class PreActResNet(QuantSettings):
  num_classes: int
  stage_sizes: Sequence[int]
  widths: Sequence[int]
  block: str = "basic"
  imagenet_stem: bool = False
  residual_bits: int = 32  # 32: a float residual stream; 8: int8 (`StreamQuant`)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    conv, dense = layer_defs(self)
    x = x.astype(self.dtype)
    if self.imagenet_stem:
      x = conv(
        self.widths[0], (7, 7), (2, 2), padding=[(3, 3), (3, 3)], quantize_input=False, name=STEM
      )(x)
      x = batch_norm(train, self.dtype, "stem_bn")(x)
      x = nn.relu(x)
      x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    else:
      x = conv(self.widths[0], quantize_input=False, name=STEM)(x)
    block_cls = BasicBlock if self.block == "basic" else Bottleneck
    if self.residual_bits not in (32, STREAM_BITS):
      raise ValueError(f"residual_bits={self.residual_bits}; allowed: 32, {STREAM_BITS}")
    for i, (n, width) in enumerate(zip(self.stage_sizes, self.widths)):
      stream = StreamQuant(name=f"stage{i + 1}_stream") if self.residual_bits != 32 else None
      for j in range(n):
        strides = 2 if i > 0 and j == 0 else 1
        x = block_cls(
          width, strides, conv=conv, dtype=self.dtype, stream=stream,
          name=f"stage{i + 1}_block{j + 1}",
        )(x, train)
    x = batch_norm(train, self.dtype, "final_bn")(x)
    self.sow("intermediates", "features", x)
    x = dense(self.num_classes, reduce="mean", name=HEAD)(x)
    return x.astype(jnp.float32)
