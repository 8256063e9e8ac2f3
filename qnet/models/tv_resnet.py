"""torchvision-layout ResNets (`tv_resnet18/34/50`): post-activation ResNet v1.5, the layout of
torchvision's and timm's `resnet18/34/50`, so their pretrained weights load one to one
(`qnet.models.pretrained`).

Differences from qnet's own `PreActResNet` (pre-activation, BN before each conv):
- each block is conv-BN-ReLU-conv-BN, then the residual add, then an explicit ReLU, so the
  residual stream and every block input are non-negative as in torchvision;
- the bottleneck strides on its 3x3 (v1.5), the projection shortcut (`downsample`) is a
  strided 1x1 conv + BN;
- every padding is written out as torchvision's symmetric `padding=k // 2` (Flax `'SAME'` pads
  stride-2 convs of even inputs asymmetrically, which changes the logits).

qnet's layer convention holds: each conv quantizes its input activation (its quantizer plays
the ReLU inside the block; at the block end the explicit ReLU comes first, and the next conv's
quantizer then sees a non-negative input) and its kernel; the stem (`stem`, 7x7/2 + BN + ReLU +
3x3/2 max-pool) takes the image unquantized with the data's channel count; the classifier
`head` quantizes the pooled features' input. Blocks are top-level modules named
`stage{i}_block{j}` (stochastic precision's `sp_unit='block'`).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from qnet.models.layers import HEAD, STEM, QuantSettings, batch_norm, layer_defs

# torchvision's architectures: blocks per stage and block kind.
ARCHS: dict[str, tuple[tuple[int, ...], str]] = {
  "resnet18": ((2, 2, 2, 2), "basic"),
  "resnet34": ((3, 4, 6, 3), "basic"),
  "resnet50": ((3, 4, 6, 3), "bottleneck"),
}
WIDTHS = (64, 128, 256, 512)
EXPANSION = {"basic": 1, "bottleneck": 4}


def pad(k: int) -> list[tuple[int, int]]:
  """torchvision's symmetric padding `k // 2` on both spatial axes."""
  return [(k // 2, k // 2)] * 2


class TVBlock(nn.Module):
  """One torchvision `BasicBlock` (3x3, 3x3) or `Bottleneck` (1x1, 3x3 with the stride, 1x1)."""

  features: int
  strides: int
  kind: str
  conv: Callable[..., nn.Module]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    def conv(f: int, k: int, s: int, name: str) -> nn.Module:
      return self.conv(f, (k, k), (s, s), padding=pad(k), name=name)

    shapes = (
      ((self.features, 3, self.strides), (self.features, 3, 1))
      if self.kind == "basic"
      else ((self.features, 1, 1), (self.features, 3, self.strides), (self.features * 4, 1, 1))
    )
    y = x
    for i, (f, k, s) in enumerate(shapes, start=1):
      # The next conv's input quantizer (or ReLU with act='relu') is this BN's ReLU.
      y = conv(f, k, s, f"conv{i}")(y)
      y = batch_norm(train, self.dtype, f"bn{i}")(y)
    out = shapes[-1][0]
    if self.strides != 1 or x.shape[-1] != out:
      x = conv(out, 1, self.strides, "downsample")(x)
      x = batch_norm(train, self.dtype, "downsample_bn")(x)
    return nn.relu(x + y)


class TVResNet(QuantSettings):
  """A torchvision-layout ResNet; `arch` is a key of `ARCHS`."""

  num_classes: int
  arch: str = "resnet18"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    conv, dense = layer_defs(self)
    stage_sizes, kind = ARCHS[self.arch]
    x = x.astype(self.dtype)
    x = conv(WIDTHS[0], (7, 7), (2, 2), padding=pad(7), quantize_input=False, name=STEM)(x)
    x = nn.relu(batch_norm(train, self.dtype, "stem_bn")(x))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=pad(3))  # pads with -inf, as torch
    for i, (n, width) in enumerate(zip(stage_sizes, WIDTHS)):
      for j in range(n):
        strides = 2 if i > 0 and j == 0 else 1
        x = TVBlock(width, strides, kind, conv, self.dtype, name=f"stage{i + 1}_block{j + 1}")(
          x, train
        )
    self.sow("intermediates", "features", x)
    x = dense(self.num_classes, reduce="mean", name=HEAD)(x)
    return x.astype(jnp.float32)


def stage_outputs(arch: str) -> list[str]:
  """Names of the modules whose outputs end torchvision's `layer1..4` (for per-stage checks)."""
  return [f"stage{i + 1}_block{n}" for i, n in enumerate(ARCHS[arch][0])]
