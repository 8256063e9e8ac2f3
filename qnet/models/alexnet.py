"""AlexNet with batch normalisation, the paper's AlexNet (BN after every conv and FC)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qnet.models.layers import HEAD, STEM, QuantConv, QuantDense, batch_norm


class AlexNetBN(nn.Module):
  num_classes: int
  act: str = "quant"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    x = x.astype(self.dtype)
    pool = lambda y: nn.max_pool(y, (3, 3), (2, 2))
    x = QuantConv(
      96, (11, 11), (4, 4), padding="VALID", quantize_input=False, dtype=self.dtype, name=STEM
    )(x)
    x = pool(batch_norm(train, self.dtype, "stem_bn")(x))
    specs = [(256, 5, True), (384, 3, False), (384, 3, False), (256, 3, True)]
    for i, (f, k, do_pool) in enumerate(specs):
      x = QuantConv(f, (k, k), act=self.act, dtype=self.dtype, name=f"conv{i + 2}")(x)
      x = batch_norm(train, self.dtype, f"conv{i + 2}_bn")(x)
      if do_pool:
        x = pool(x)
    self.sow("intermediates", "features", x)
    x = QuantDense(4096, reduce="flatten", act=self.act, dtype=self.dtype, name="fc6")(x)
    x = batch_norm(train, self.dtype, "fc6_bn")(x)
    x = QuantDense(4096, act=self.act, dtype=self.dtype, name="fc7")(x)
    x = batch_norm(train, self.dtype, "fc7_bn")(x)
    x = QuantDense(self.num_classes, act=self.act, dtype=self.dtype, name=HEAD)(x)
    return x.astype(jnp.float32)
