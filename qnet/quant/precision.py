"""The precision pytree: one `(weight_bits, act_bits)` pair per quantizable layer.

The tree is the model's `precision` variable collection, keyed like the parameter tree,
e.g. `{'stem': {'weight_bits': 32., 'act_bits': 32.}, 'stage1_block1': {'conv1': {...}}}`.
Its structure comes from the model itself (`layout_of`), never written by hand. Leaves are
float32 scalars, so schedules can compute them inside a jitted step.

`Layout` is the static description (layer paths in a fixed order); the functions here map
per-layer vectors of bits to the tree and back.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from qnet.quant.quantizers import FULL_PRECISION

PyTree = Any
# The variable collection that holds the tree, and the names of the two edge layers: the
# first conv sees the image, the classifier makes the logits (`keep_first_last_fp`).
PRECISION = "precision"
STEM, HEAD = "stem", "head"
UNITS = ("layer", "block")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static list of the quantizable layers of a model (hashable: safe as a jit static)."""

  paths: tuple[tuple[str, ...], ...]

  @property
  def num_layers(self) -> int:
    return len(self.paths)

  def edge_mask(self) -> np.ndarray:
    """True for the first conv (`stem`) and the classifier (`head`)."""
    return np.array([p[0] in (STEM, HEAD) for p in self.paths])

  def unit_ids(self, unit: str) -> tuple[np.ndarray, int]:
    """Per-layer unit index and the number of units, for stochastic precision.

    `layer`: every layer is a unit. `block`: layers under the same top-level module (a
    residual block, or a single layer outside blocks) form one unit.
    """
    if unit not in UNITS:
      raise ValueError(f"schedule.sp_unit={unit!r}; allowed: {', '.join(UNITS)}")
    keys = [p if unit == "layer" else p[:1] for p in self.paths]
    index = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    return np.array([index[k] for k in keys], np.int32), len(index)

  def tree(self, weight_bits: jax.Array, act_bits: jax.Array) -> PyTree:
    """Builds the precision tree from per-layer vectors (length `num_layers`)."""
    tree: dict = {}
    for i, path in enumerate(self.paths):
      node = tree
      for key in path:
        node = node.setdefault(key, {})
      node["weight_bits"] = weight_bits[i]
      node["act_bits"] = act_bits[i]
    return tree

  def vectors(self, tree: PyTree) -> tuple[jax.Array, jax.Array]:
    """Inverse of `tree`: per-layer `(weight_bits, act_bits)` vectors (the export reads the
    bits of each layer this way)."""

    def get(path):
      node = tree
      for key in path:
        node = node[key]
      return node

    nodes = [get(p) for p in self.paths]
    return (
      jnp.stack([jnp.asarray(n["weight_bits"]) for n in nodes]),
      jnp.stack([jnp.asarray(n["act_bits"]) for n in nodes]),
    )


def layout_from_collection(collection: PyTree) -> Layout:
  """Layout of an initialised `precision` collection (a nested dict)."""
  paths = []

  def walk(node, prefix):
    if "weight_bits" in node:
      paths.append(prefix)
      return
    for key in sorted(node):
      walk(node[key], prefix + (key,))

  walk(dict(collection), ())
  return Layout(tuple(paths))


def layout_of(model, sample_input: jax.Array) -> Layout:
  """Reads the quantizable layers off `model` (shapes only, no compute)."""
  variables = jax.eval_shape(
    lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False), sample_input
  )
  if PRECISION not in variables:
    raise ValueError(f"{type(model).__name__} has no quantizable layers")
  return layout_from_collection(variables[PRECISION])


def layer_bits(
  layout: Layout, weight_bits, act_bits, keep_first_last_fp: bool = True
) -> tuple[jax.Array, jax.Array]:
  """Per-layer vectors for a uniform precision, edges at 32 bits if `keep_first_last_fp`."""
  shape = (layout.num_layers,)
  w = jnp.broadcast_to(jnp.asarray(weight_bits, jnp.float32), shape)
  a = jnp.broadcast_to(jnp.asarray(act_bits, jnp.float32), shape)
  if keep_first_last_fp:
    edge = jnp.asarray(layout.edge_mask())
    w = jnp.where(edge, jnp.float32(FULL_PRECISION), w)
    a = jnp.where(edge, jnp.float32(FULL_PRECISION), a)
  return w, a


def uniform(layout: Layout, weight_bits, act_bits, keep_first_last_fp: bool = True) -> PyTree:
  """Precision tree with the same bits everywhere (edges FP if `keep_first_last_fp`)."""
  return layout.tree(*layer_bits(layout, weight_bits, act_bits, keep_first_last_fp))


def full_precision(layout: Layout) -> PyTree:
  """Every layer at 32 bits: FP weights, clip-ReLU activations (the teacher's precision)."""
  return uniform(layout, FULL_PRECISION, FULL_PRECISION, keep_first_last_fp=False)


def stochastic_mask(
  key: jax.Array, ratio: jax.Array, layout: Layout, unit: str, keep_first_last_fp: bool = True
) -> tuple[jax.Array, jax.Array]:
  """Which layers run at low precision this step (stochastic precision, METHOD.md remedy 2).

  Each unit is drawn low-precision with probability `ratio`, independently; all layers of a
  unit share its draw. Layers kept FP by `keep_first_last_fp` are never sampled. Returns the
  per-layer boolean mask and the realised fraction of eligible units drawn.
  """
  ids, num_units = layout.unit_ids(unit)
  eligible_layers = ~layout.edge_mask() if keep_first_last_fp else np.ones(layout.num_layers, bool)
  eligible_units = np.zeros(num_units, bool)
  eligible_units[ids[eligible_layers]] = True
  draws = jax.random.uniform(key, (num_units,)) < ratio
  draws = draws & jnp.asarray(eligible_units)
  fraction = jnp.sum(draws) / max(int(eligible_units.sum()), 1)
  return draws[jnp.asarray(ids)] & jnp.asarray(eligible_layers), fraction
