"""Plain conv nets: the Fashion-MNIST default and a tiny test model."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from qnet.models.layers import HEAD, STEM, QuantSettings, batch_norm, layer_defs


class SimpleCNN(QuantSettings):
  """VGG-style CNN: `stages` of conv-BN pairs, each stage ending in a 2x2 max-pool.

  Every conv after `stem` quantizes its input (the activation quantizer is the ReLU);
  max-pooling before a quantizer equals pooling after it because the quantizer is monotone.
  `hidden` adds a quantized fully-connected layer before the classifier. `width` multiplies
  every conv's channels and `hidden` (rounded, at least 1): a narrower or wider variant.
  """

  num_classes: int
  stages: Sequence[Sequence[int]] = ((32, 32), (64, 64))
  hidden: int = 0
  width: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    conv, dense = layer_defs(self)
    scaled = lambda n: max(1, round(n * self.width))
    x = x.astype(self.dtype)
    first = True
    for s, widths in enumerate(self.stages):
      for c, width in enumerate(widths):
        name = STEM if first else f"conv{s + 1}_{c + 1}"
        x = conv(scaled(width), quantize_input=not first, name=name)(x)
        x = batch_norm(train, self.dtype, name=f"{name}_bn")(x)
        first = False
      x = nn.max_pool(x, (2, 2), (2, 2))
    self.sow("intermediates", "features", x)
    if self.hidden:
      x = dense(scaled(self.hidden), reduce="flatten", name="fc")(x)
      x = batch_norm(train, self.dtype, name="fc_bn")(x)
    x = dense(self.num_classes, reduce="flatten", name=HEAD)(x)
    return x.astype(jnp.float32)
