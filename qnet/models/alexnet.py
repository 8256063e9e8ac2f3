"""AlexNet with batch normalisation, the paper's AlexNet (BN after every conv and FC)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qnet.models.layers import HEAD, STEM, QuantSettings, batch_norm, layer_defs


class AlexNetBN(QuantSettings):
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    conv, dense = layer_defs(self)
    x = x.astype(self.dtype)
    pool = lambda y: nn.max_pool(y, (3, 3), (2, 2))
    x = conv(96, (11, 11), (4, 4), padding="VALID", quantize_input=False, name=STEM)(x)
    x = pool(batch_norm(train, self.dtype, "stem_bn")(x))
    specs = [(256, 5, True), (384, 3, False), (384, 3, False), (256, 3, True)]
    for i, (f, k, do_pool) in enumerate(specs):
      x = conv(f, (k, k), name=f"conv{i + 2}")(x)
      x = batch_norm(train, self.dtype, f"conv{i + 2}_bn")(x)
      if do_pool:
        x = pool(x)
    self.sow("intermediates", "features", x)
    x = dense(4096, reduce="flatten", name="fc6")(x)
    x = batch_norm(train, self.dtype, "fc6_bn")(x)
    x = dense(4096, name="fc7")(x)
    x = batch_norm(train, self.dtype, "fc7_bn")(x)
    x = dense(self.num_classes, name=HEAD)(x)
    return x.astype(jnp.float32)
