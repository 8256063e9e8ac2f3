"""Precision schedules: progressive quantization and stochastic precision (remedies 1 and 2 of
qnet/METHOD.md).

A `Schedule` is static (phase boundaries as Python ints, bits as tuples) and hashable; its
methods are pure jnp functions of a traced step (and PRNG key), evaluated inside the one
compiled train step. Passing a phase boundary or drawing new units changes array values
only, never shapes or code, so nothing recompiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from qnet.quant import precision as precision_lib
from qnet.quant.quantizers import FULL_PRECISION

KINDS = ("direct", "two_stage", "progressive", "stochastic")
SP_RAMPS = ("step", "linear")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Phases `(start_step, weight_bits, act_bits)` plus stochastic-precision options."""

  starts: tuple[int, ...]
  weight_bits: tuple[float, ...]
  act_bits: tuple[float, ...]
  total_steps: int
  keep_first_last_fp: bool = True
  stochastic: bool = False
  sp_ratios: tuple[float, ...] = (0.5, 0.75, 0.875, 1.0)
  sp_ramp: str = "step"
  sp_unit: str = "layer"
  sp_separate: bool = False

  @property
  def num_phases(self) -> int:
    return len(self.starts)

  def phase(self, step: jax.Array) -> jax.Array:
    """Index of the phase that contains `step` (traced int32)."""
    return jnp.sum(jnp.asarray(step) >= jnp.asarray(self.starts, jnp.int32)) - 1

  def phase_bounds(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(start, end) steps of the phase that contains `step`."""
    idx = self.phase(step)
    ends = jnp.asarray(self.starts[1:] + (self.total_steps,), jnp.int32)
    return jnp.asarray(self.starts, jnp.int32)[idx], ends[idx]

  def phase_bits(self, step: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Target (weight_bits, act_bits) of the current phase."""
    idx = self.phase(step)
    return (
      jnp.asarray(self.weight_bits, jnp.float32)[idx],
      jnp.asarray(self.act_bits, jnp.float32)[idx],
    )

  def sp_ratio(self, step: jax.Array) -> jax.Array:
    """Quantized ratio at `step`, over the progress within the current phase."""
    if not self.stochastic:
      return jnp.float32(1.0)
    start, end = self.phase_bounds(step)
    progress = (jnp.asarray(step) - start) / jnp.maximum(end - start, 1)
    ratios = jnp.asarray(self.sp_ratios, jnp.float32)
    if self.sp_ramp == "linear":
      # Ramp over the first 3/4 of the phase, then fully quantized (like the step list's last part).
      return jnp.minimum(ratios[0] + (1.0 - ratios[0]) * progress / 0.75, 1.0)
    part = jnp.minimum((progress * len(self.sp_ratios)).astype(jnp.int32), len(self.sp_ratios) - 1)
    return ratios[part]

  def deterministic(self, layout: precision_lib.Layout, step: jax.Array) -> Any:
    """The fully quantized precision tree of the current phase (used for evaluation)."""
    w, a = self.phase_bits(step)
    return precision_lib.uniform(layout, w, a, self.keep_first_last_fp)

  def sample(
    self, layout: precision_lib.Layout, step: jax.Array, key: jax.Array
  ) -> tuple[Any, jax.Array]:
    """The precision tree for a training step, and the realised quantized fraction.

    Without stochastic precision this is `deterministic` and the fraction is 1.
    """
    w, a = precision_lib.layer_bits(layout, *self.phase_bits(step), self.keep_first_last_fp)
    if not self.stochastic:
      return layout.tree(w, a), jnp.float32(1.0)
    ratio = self.sp_ratio(step)
    key_w, key_a = jax.random.split(key)
    mask_w, frac_w = precision_lib.stochastic_mask(
      key_w, ratio, layout, self.sp_unit, self.keep_first_last_fp
    )
    if self.sp_separate:
      mask_a, frac_a = precision_lib.stochastic_mask(
        key_a, ratio, layout, self.sp_unit, self.keep_first_last_fp
      )
      fraction = (frac_w + frac_a) / 2
    else:
      mask_a, fraction = mask_w, frac_w
    fp = jnp.float32(FULL_PRECISION)
    return layout.tree(jnp.where(mask_w, w, fp), jnp.where(mask_a, a, fp)), fraction


def parse_kind(kind: str) -> frozenset[str]:
  """`'progressive+two_stage'` -> {'progressive', 'two_stage'}; validates the names."""
  parts = frozenset(p.strip() for p in kind.split("+") if p.strip())
  unknown = sorted(parts - set(KINDS))
  if not parts or unknown:
    raise ValueError(
      f"schedule.kind={kind!r}: unknown part {unknown or kind!r}; allowed: "
      f"{', '.join(KINDS)}, or several joined with '+'"
    )
  if "direct" in parts and len(parts) > 1:
    raise ValueError(
      f"schedule.kind={kind!r}: 'direct' cannot be combined; allowed: "
      "two_stage, progressive, stochastic joined with '+'"
    )
  return parts


def to_step(start: float | int, total_steps: int) -> int:
  """A phase start given as a fraction (float) or a step (int) -> step."""
  if isinstance(start, float):
    return int(round(start * total_steps))
  return int(start)


def default_phases(
  kind: str, weight_bits: int, act_bits: int, ladder: Sequence[int], two_stage_at: float
) -> list[tuple[float, int, int]]:
  """Phases as (start fraction, weight_bits, act_bits) for a schedule kind.

  direct: one phase at the target. two_stage: k-bit weights with FP activations, then
  both at k bits from `two_stage_at`. progressive: equal stages down `ladder` to the
  target (bits above the target only, then the target); with two_stage inside each
  stage, the weights drop first and the activations follow at `two_stage_at` of the stage.
  """
  parts = parse_kind(kind)
  if "progressive" in parts:
    steps = [b for b in ladder if b > max(weight_bits, act_bits)]
    stages = [(min(b, FULL_PRECISION), min(b, FULL_PRECISION)) for b in steps]
    stages.append((weight_bits, act_bits))
  else:
    stages = [(weight_bits, act_bits)]
  phases: list[tuple[float, int, int]] = []
  prev_a = FULL_PRECISION
  for i, (w, a) in enumerate(stages):
    start, length = i / len(stages), 1 / len(stages)
    if "two_stage" in parts and a != prev_a:
      phases.append((start, w, prev_a))
      phases.append((start + two_stage_at * length, w, a))
    else:
      phases.append((start, w, a))
    prev_a = a
  return phases


def from_config(
  sched_cfg: Any, weight_bits: int, act_bits: int, total_steps: int, keep_first_last_fp: bool
) -> Schedule:
  """Builds the schedule of one network from `config.schedule` and its target bits."""
  parts = parse_kind(sched_cfg.kind)
  phases = list(sched_cfg.phases) or default_phases(
    sched_cfg.kind, weight_bits, act_bits, sched_cfg.ladder, sched_cfg.two_stage_at
  )
  starts = [to_step(p[0], total_steps) for p in phases]
  if starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
    raise ValueError(
      f"schedule.phases={tuple(map(tuple, phases))!r}: starts must begin at 0 "
      f"and strictly increase (as steps: {starts})"
    )
  return Schedule(
    starts=tuple(starts),
    weight_bits=tuple(float(p[1]) for p in phases),
    act_bits=tuple(float(p[2]) for p in phases),
    total_steps=int(total_steps),
    keep_first_last_fp=bool(keep_first_last_fp),
    stochastic="stochastic" in parts,
    sp_ratios=tuple(float(r) for r in sched_cfg.sp_ratios),
    sp_ramp=str(sched_cfg.sp_ramp),
    sp_unit=str(sched_cfg.sp_unit),
    sp_separate=bool(sched_cfg.sp_separate),
  )


def describe(schedule: Schedule) -> str:
  """One line per phase, for the log."""
  ends = schedule.starts[1:] + (schedule.total_steps,)
  rows = [
    f"steps [{s}, {e}): W{w:g}A{a:g}"
    for s, e, w, a in zip(schedule.starts, ends, schedule.weight_bits, schedule.act_bits)
  ]
  sp = (
    f"; stochastic precision {schedule.sp_ratios} ({schedule.sp_ramp}, per {schedule.sp_unit})"
    if schedule.stochastic
    else ""
  )
  return "; ".join(rows) + sp
