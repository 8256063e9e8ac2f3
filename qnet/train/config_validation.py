"""Up-front config checks: every field, before any data loading or compilation.

Each error is one line that names the field, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, Iterable

import ml_collections

from qnet import models
from qnet.quant import precision, quantizers as quant, schedule
from qnet.data.datasets import DATASETS
from qnet.models import layers, pretrained


class ConfigError(ValueError):
  """A config field has a value qnet cannot run with."""


def _fail(field: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"config.{field}={value!r} is invalid; allowed: {allowed}")


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
  """`{'quant.weight_bits': 4, ...}`: every leaf field of a config by its dotted name."""
  out = {}
  for key, value in cfg.items():
    name = f"{prefix}{key}"
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      out.update(flatten(value, name + "."))
    else:
      out[name] = value
  return out


def check_field_name(name: str, known: Iterable[str]) -> None:
  """Rejects a dotted field name that is not in `known`, suggesting the nearest."""
  known = list(known)
  if name not in known:
    near = difflib.get_close_matches(name, known, n=1, cutoff=0.5)
    hint = f"did you mean config.{near[0]}?" if near else "see configs/default.py"
    raise ConfigError(f"config.{name} is not a known field; {hint}")


def check_known_fields(
  config: ml_collections.ConfigDict, reference: ml_collections.ConfigDict
) -> None:
  """Rejects fields that `reference` (configs/default.py) does not have, suggesting the nearest."""
  known = flatten(reference)
  for name in flatten(config):
    check_field_name(name, known)


def _int(config, field: str, lo: int | None = None, allow: tuple = ()) -> int:
  value = _get(config, field)
  ok = isinstance(value, int) and not isinstance(value, bool)
  if ok and (value in allow or lo is None or value >= lo):
    return value
  extra = f" or {', '.join(map(str, allow))}" if allow else ""
  _fail(field, value, f"an integer >= {lo}{extra}" if lo is not None else "an integer")


def _num(config, field: str, lo: float, hi: float, lo_open=False, hi_open=False) -> float:
  value = _get(config, field)
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  if ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi):
    return float(value)
  _fail(field, value, f"a number in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")


def _bool(config, field: str) -> None:
  if not isinstance(_get(config, field), bool):
    _fail(field, _get(config, field), "True or False")


def _choice(config, field: str, choices) -> None:
  if _get(config, field) not in choices:
    _fail(field, _get(config, field), ", ".join(map(str, choices)))


def _get(config, field: str) -> Any:
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def valid_bits(value: Any) -> bool:
  """Bits are integers 1..16, or 32 (full precision)."""
  return (
    isinstance(value, int) and not isinstance(value, bool) and (1 <= value <= 16 or value == 32)
  )


BITS_ALLOWED = "an integer 1..16, or 32 (full precision)"


def _bits(field: str, value: Any) -> None:
  if not valid_bits(value):
    _fail(field, value, BITS_ALLOWED)


def _workdir_with_checkpoints(config, field: str) -> None:
  path = _get(config, field)
  if path and not os.path.isdir(os.path.join(path, "checkpoints")):
    _fail(
      field,
      path,
      "'' or the workdir of a run that has written checkpoints "
      f"({os.path.join(path, 'checkpoints')} does not exist)",
    )


def validate(
  config: ml_collections.ConfigDict,
  device_count: int,
  process_count: int = 1,
  reference: ml_collections.ConfigDict | None = None,
) -> None:
  """Raises `ConfigError` on the first invalid field."""
  if reference is not None:
    check_known_fields(config, reference)
  _choice(config, "dataset", sorted(DATASETS))
  _model(config, "model")
  _choice(config, "model_act", ("quant", "relu"))
  _width(config, "model_width", config.model)
  _choice(config, "dtype", ("float32", "bfloat16"))
  if not isinstance(config.data_dir, str):
    _fail("data_dir", config.data_dir, "a path string ('' for TFDS's default)")
  _bool(config, "augment")
  _int(config, "train_examples", 1, allow=(-1,))
  _int(config, "image_size", 0)
  batch = _int(config, "batch_size", 1)
  if batch % device_count or batch % process_count:
    _fail(
      "batch_size",
      batch,
      f"a multiple of the device count {device_count} (and of the process count {process_count})",
    )
  _num(config, "num_epochs", 0.0, float("inf"), lo_open=True)
  _int(config, "num_train_steps", 0, allow=(-1,))
  for field in ("eval_every_steps", "checkpoint_every_steps", "log_every_steps"):
    _int(config, field, 1, allow=(-1,) if field == "eval_every_steps" else ())
  _int(config, "keep_checkpoints", 1)
  _int(config, "seed", 0)
  _num(config, "learning_rate", 0.0, float("inf"), lo_open=True)
  _num(config, "momentum", 0.0, 1.0, hi_open=True)
  _bool(config, "nesterov")
  _num(config, "weight_decay", 0.0, float("inf"))
  _choice(config, "lr_schedule", ("cosine", "step", "constant"))
  _int(config, "warmup_steps", 0)
  at = tuple(config.lr_step_at)
  if not all(isinstance(a, (int, float)) and 0 < a < 1 for a in at) or list(at) != sorted(at):
    _fail("lr_step_at", at, "increasing fractions of training in (0, 1)")
  _num(config, "lr_step_factor", 0.0, 1.0, lo_open=True)
  _bits("quant.weight_bits", config.quant.weight_bits)
  _bits("quant.act_bits", config.quant.act_bits)
  _bool(config, "quant.keep_first_last_fp")
  _bool(config, "quant.per_channel")
  _residual_bits(config)
  _validate_schedule(config)
  _validate_init_from(config)
  _validate_distill(config)
  _validate_quantizers(config)
  _validate_fp_baseline(config)


def _validate_init_from(config, field: str = "init_from", model: str = "") -> None:
  # A pretrained file's keys and shapes are checked here, before any data or compute.
  value = _get(config, field)
  if not (isinstance(value, str) and pretrained.parse_init_from(value)):
    _workdir_with_checkpoints(config, field)
    return
  spec = DATASETS[config.dataset]
  try:
    pretrained.check_file(value, model or config.model, spec.channels, spec.num_classes)
  except pretrained.PretrainedError as e:
    raise ConfigError(f"config.{field}={value!r}: {e}") from None


def _validate_quantizers(config) -> None:
  q = config.quant
  if q.weight_quantizer == "pact":
    _fail("quant.weight_quantizer", q.weight_quantizer, "dorefa, lsq (PACT clips activations only)")
  _choice(config, "quant.weight_quantizer", layers.WEIGHT_QUANTIZERS)
  _choice(config, "quant.act_quantizer", layers.ACT_QUANTIZERS)
  d = q.clip_decay
  if not (isinstance(d, (int, float)) and not isinstance(d, bool) and (d == -1 or d >= 0)):
    _fail("quant.clip_decay", d, "-1 (PACT's alpha: weight_decay; LSQ: 0) or a number >= 0")
  if q.weight_quantizer != "lsq":
    return
  # LSQ's signed grid [-2^(b-1), 2^(b-1) - 1] has no positive level at 1 bit.
  bits = [("quant.weight_bits", q.weight_bits)]
  bits += [
    (f"schedule.phases[{i}].weight_bits", p[1]) for i, p in enumerate(config.schedule.phases)
  ]
  bits += [("schedule.ladder", b) for b in config.schedule.ladder if b >= q.weight_bits]
  bits += [
    (f"distill.extra_students[{i}].weight_bits", p[0])
    for i, p in enumerate(config.distill.extra_students)
  ]
  for field, b in bits:
    if b == 1:
      _fail(field, b, "2..16 or 32 with quant.weight_quantizer='lsq'")


def _validate_fp_baseline(config) -> None:
  # A `relu` model has no quantizers at all, so any bit-width below 32 would be ignored.
  if config.model_act != "relu":
    return
  for name in ("weight_bits", "act_bits"):
    if config.quant[name] != quant.FULL_PRECISION:
      _fail(
        f"quant.{name}",
        config.quant[name],
        "32 with model_act='relu' (the plain FP network has no quantizers)",
      )
  if config.schedule.kind != "direct" or tuple(config.schedule.phases):
    _fail("schedule.kind", config.schedule.kind, "'direct' without phases with model_act='relu'")
  if tuple(config.distill.extra_students):
    _fail(
      "distill.extra_students",
      tuple(config.distill.extra_students),
      "() with model_act='relu'",
    )


def _validate_schedule(config) -> None:
  s = config.schedule
  try:
    schedule.parse_kind(s.kind)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  for i, phase in enumerate(s.phases):
    if len(phase) != 3 or not isinstance(phase[0], (int, float)) or phase[0] < 0:
      _fail(
        f"schedule.phases[{i}]",
        phase,
        "(start, weight_bits, act_bits) with start a fraction (float) or a step (int) >= 0",
      )
    _bits(f"schedule.phases[{i}].weight_bits", phase[1])
    _bits(f"schedule.phases[{i}].act_bits", phase[2])
  starts = [p[0] for p in s.phases]
  if starts and (starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:]))):
    _fail("schedule.phases", tuple(s.phases), "phase starts beginning at 0 and strictly increasing")
  ladder = tuple(s.ladder)
  for b in ladder:
    _bits("schedule.ladder", b)
  if list(ladder) != sorted(ladder, reverse=True):
    _fail("schedule.ladder", ladder, "strictly decreasing bit-widths, e.g. (32, 8, 4, 2)")
  _num(config, "schedule.two_stage_at", 0.0, 1.0, lo_open=True, hi_open=True)
  _bool(config, "schedule.lr_restart")
  _bool(config, "schedule.reset_momentum")
  ratios = tuple(s.sp_ratios)
  if (
    not ratios
    or not all(isinstance(r, (int, float)) and 0 < r <= 1 for r in ratios)
    or list(ratios) != sorted(ratios)
  ):
    _fail(
      "schedule.sp_ratios", ratios, "non-decreasing ratios in (0, 1], e.g. (0.5, 0.75, 0.875, 1.0)"
    )
  _choice(config, "schedule.sp_ramp", schedule.SP_RAMPS)
  _choice(config, "schedule.sp_unit", precision.UNITS)
  _bool(config, "schedule.sp_separate")


def _model(config, field: str) -> None:
  name = _get(config, field)
  if not (isinstance(name, str) and models.is_foreign(name)):
    _choice(config, field, sorted(models.MODELS) + ["PACKAGE.MODULE:ClassName"])
    return
  try:
    models.foreign_class(name)
    if field == "model":
      models.foreign_rules(config.quant.rules, True)
  except models.RuleError as e:
    raise ConfigError(str(e)) from None


def _residual_bits(config) -> None:
  value = _get(config, "quant.residual_bits")
  if value not in (32, layers.STREAM_BITS) or isinstance(value, bool):
    _fail("quant.residual_bits", value, f"32 (a float residual stream) or {layers.STREAM_BITS} (int8)")
  if value != 32 and not models.takes(config.model, "residual_bits"):
    takes = [m for m in sorted(models.MODELS) if models.takes(m, "residual_bits")]
    _fail("quant.residual_bits", value, f"32 for model {config.model!r}; {layers.STREAM_BITS} only for {', '.join(takes)}")


def _width(config, field: str, model: str, allow: tuple = ()) -> None:
  value = _get(config, field)
  if value in allow:
    return
  _num(config, field, 0.0, 64.0, lo_open=True)
  if value != 1.0 and not models.takes_width(model):
    takes = [m for m in sorted(models.MODELS) if models.takes_width(m)]
    _fail(field, value, f"1.0 for model {model!r}; other widths only for {', '.join(takes)}")


def _validate_distill(config) -> None:
  _bool(config, "distill.enabled")
  _num(config, "distill.temperature", 0.0, float("inf"), lo_open=True)
  for field in ("student_ce", "student_kl", "teacher_ce", "teacher_kl", "hint_weight"):
    _num(config, f"distill.{field}", 0.0, float("inf"))
  if config.distill.teacher_model:
    _model(config, "distill.teacher_model")
  _width(config, "distill.teacher_width", config.distill.teacher_model or config.model, (-1,))
  _choice(config, "distill.teacher_act", ("clip", "relu"))
  _num(config, "distill.kd_warmup", 0.0, 1.0, hi_open=True)
  lr = config.distill.teacher_learning_rate
  if not (isinstance(lr, (int, float)) and (lr == -1 or lr > 0)):
    _fail("distill.teacher_learning_rate", lr, "-1 (same as learning_rate) or a number > 0")
  _validate_init_from(config, "distill.teacher_from", config.distill.teacher_model)
  for i, pair in enumerate(config.distill.extra_students):
    if len(pair) != 2:
      _fail(f"distill.extra_students[{i}]", pair, "(weight_bits, act_bits)")
    _bits(f"distill.extra_students[{i}].weight_bits", pair[0])
    _bits(f"distill.extra_students[{i}].act_bits", pair[1])
  if config.distill.extra_students and not config.distill.enabled:
    _fail(
      "distill.extra_students",
      tuple(config.distill.extra_students),
      "() unless distill.enabled=True (extra students share the teacher)",
    )
