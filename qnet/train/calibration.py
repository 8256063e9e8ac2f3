"""First-batch initialisation of learned clip levels (LSQ, PACT; docs/results.md, "Learned
quantizers (LSQ, PACT)"): the pure `calibrate` and its jitted form for the loop.
"""

from __future__ import annotations

import functools

import flax.traverse_util
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections

from qnet.platform import conv
from qnet.train import joint
from qnet.models.layers import CALIBRATION


def calibrate(
  state: joint.TrainState, batch: dict[str, jax.Array], *, students: tuple[joint.NetSpec, ...]
) -> joint.TrainState:
  """Data-dependent init of the students' learned clip levels from one (the first) batch.

  Runs each student in training mode (batch statistics) at the bits its schedule ends at,
  every layer at once, and sets each learned range parameter to LSQ's initial value `t = 2
  mean|v|` (step `2 mean|v| / sqrt(Q_p)`; PACT's alpha the same value), computed on the inputs
  the layer sees with the layers before it already calibrated. Layers at 32 bits there keep
  their level. BN statistics and everything else are unchanged. The teacher is FP: no-op.
  """
  images = batch["image"]
  nets = []
  for spec, net in zip(students, state.students):
    prec = spec.schedule.deterministic(spec.layout, spec.schedule.total_steps - 1)
    variables = {"params": net.params, "batch_stats": net.batch_stats, "precision": prec}
    _, updates = spec.model.apply(
      variables, images, train=True, mutable=["batch_stats", CALIBRATION]
    )
    params = flax.traverse_util.flatten_dict(net.params)
    for path, value in flax.traverse_util.flatten_dict(updates.get(CALIBRATION, {})).items():
      params[path] = value.astype(params[path].dtype)
    nets.append(net.replace(params=flax.traverse_util.unflatten_dict(params)))
  return state.replace(students=tuple(nets))


def learned_clips(config: ml_collections.ConfigDict) -> bool:
  """Does the student have learned clip levels (LSQ or PACT, or an int8 residual stream's
  steps), to calibrate on the first batch?"""
  q = config.quant
  learned = (q.weight_quantizer, q.act_quantizer) != ("dorefa",) * 2 or q.residual_bits != 32
  return config.model_act != "relu" and learned


def compile_calibrate(mesh: jax.sharding.Mesh, students: tuple[joint.NetSpec, ...]):
  """The jitted `calibrate` (state replicated, batch on `data`)."""
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(
    functools.partial(calibrate, students=students),
    in_shardings=(replicated, data),
    out_shardings=replicated,
    compiler_options=conv.cpu_compiler_options() or None,
  )
