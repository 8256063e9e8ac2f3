"""Building the compiled steps from a config: the mesh, the network specs, the jitted train
and eval steps. Kept apart from the training loop (`loop`) so that step-level tools (the
benchmark, tests) need neither the input pipeline nor the writers.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import ml_collections

from qnet.platform import conv
from qnet.train import joint
from qnet import models
from qnet.models import layers
from qnet.quant import precision as precision_lib
from qnet.quant import schedule as schedule_lib
from qnet.data.datasets import DATASETS


def create_mesh() -> jax.sharding.Mesh:
  """1-D mesh over every device of every process, axis `data`."""
  return jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def input_shape(config: ml_collections.ConfigDict) -> tuple[int, int, int]:
  spec = DATASETS[config.dataset]
  size = config.image_size or spec.image_size
  return size, size, spec.channels


def build_specs(
  config: ml_collections.ConfigDict, total_steps: int
) -> tuple[tuple[joint.NetSpec, ...], joint.NetSpec | None]:
  """Static descriptions of the students and (with distillation) the teacher."""
  sample = jnp.zeros((1, *input_shape(config)), jnp.float32)
  tx = joint.create_optimizer(
    config.momentum, config.weight_decay, config.nesterov, clip_decays(config)
  )
  lr_fn = functools.partial(_lr_fn, config, total_steps)
  make_model = functools.partial(_make_model, config)
  student_model = make_model(config.model)
  layout = precision_lib.layout_of(student_model, sample)
  targets = [(config.quant.weight_bits, config.quant.act_bits)]
  if config.distill.enabled:
    targets += [tuple(p) for p in config.distill.extra_students]
  students = []
  for w, a in targets:
    schedule = schedule_lib.from_config(
      config.schedule, w, a, total_steps, config.quant.keep_first_last_fp
    )
    students.append(
      joint.NetSpec(
        model=student_model,
        layout=layout,
        tx=tx,
        lr_fn=lr_fn(config.learning_rate, schedule if config.schedule.lr_restart else None),
        schedule=schedule,
        reset_momentum=config.schedule.reset_momentum,
      )
    )
  teacher = None
  if config.distill.enabled:
    t_model = make_model(
      config.distill.teacher_model or config.model,
      act=teacher_act(config),
      width=config.distill.teacher_width,
    )
    t_layout = precision_lib.layout_of(t_model, sample)
    t_lr = config.distill.teacher_learning_rate
    teacher = joint.NetSpec(
      model=t_model,
      layout=t_layout,
      tx=tx,
      lr_fn=lr_fn(config.learning_rate if t_lr == -1 else t_lr),
      frozen=bool(config.distill.teacher_from),
    )
  return tuple(students), teacher


def _lr_fn(
  config: ml_collections.ConfigDict,
  total_steps: int,
  base_lr: float,
  restart_at: schedule_lib.Schedule | None = None,
):
  """The config's learning-rate schedule from `base_lr` (restarting with `restart_at`'s phases)."""
  return joint.create_learning_rate_fn(
    base_lr,
    config.lr_schedule,
    config.warmup_steps,
    tuple(config.lr_step_at),
    config.lr_step_factor,
    total_steps,
    restart_at,
  )


def _make_model(
  config: ml_collections.ConfigDict, name: str, act: str | None = None, width: float = -1
):
  """Model `name` built with the config's dataset, activation (or `act`), width (or `width`
  if not -1), dtype and quantizer settings."""
  dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
  width = config.model_width if width == -1 else width
  extra = {"width": width} if width != 1.0 else {}  # only the SimpleCNN models take one
  if config.quant.residual_bits != 32 and models.takes(name, "residual_bits"):
    extra["residual_bits"] = config.quant.residual_bits  # not to a teacher of another family
  if models.is_foreign(name):  # a user's model: quantized by rules (`qnet.models.rules`)
    extra = {"rules": config.quant.rules, "keep_first_last_fp": config.quant.keep_first_last_fp}
  return models.create_model(
    name,
    DATASETS[config.dataset].num_classes,
    act=act or config.model_act,
    dtype=dtype,
    per_channel=config.quant.per_channel,
    weight_quantizer=config.quant.weight_quantizer,
    act_quantizer=config.quant.act_quantizer,
    **extra,
  )


def teacher_act(config: ml_collections.ConfigDict) -> str:
  """The teacher's `act`: the student's (`distill.teacher_act='clip'`) or a plain ReLU
  network (`'relu'`, the authors' released teacher)."""
  return "relu" if config.distill.teacher_act == "relu" else config.model_act


def clip_decays(config: ml_collections.ConfigDict) -> dict[str, float]:
  """Weight decay of each learned clip level (`quant.clip_decay`; -1: PACT's alpha gets
  `weight_decay`, its L2 penalty, and LSQ's steps none, as in the two papers)."""
  d, q = config.quant.clip_decay, config.quant
  act_default = config.weight_decay if q.act_quantizer == "pact" else 0.0
  return {
    layers.WEIGHT_CLIP: 0.0 if d == -1 else d,
    layers.ACT_CLIP: act_default if d == -1 else d,
  }


def run_meta(config: ml_collections.ConfigDict, students, teacher) -> dict:
  """What a checkpoint must agree on with the config that resumes it (`model_width` only when
  it is not 1 and `residual_bits` when not 32, so checkpoints written before the fields
  existed still resume)."""
  widths = {"model_width": config.model_width} if config.model_width != 1.0 else {}
  if config.quant.residual_bits != 32:
    widths["residual_bits"] = config.quant.residual_bits
  return widths | {
    "dataset": config.dataset,
    "model": config.model,
    "batch_size": config.batch_size,
    "image_size": list(input_shape(config)),
    "quantized_layers": ["/".join(p) for p in students[0].layout.paths],
    "num_students": len(students),
    "teacher_model": None if teacher is None else (config.distill.teacher_model or config.model),
  }


def compile_steps(
  mesh: jax.sharding.Mesh,
  students: tuple[joint.NetSpec, ...],
  teacher: joint.NetSpec | None,
  distill: joint.DistillSpec | None,
):
  """The jitted, data-parallel train and eval steps (state replicated, batch on `data`).

  The train step donates the old state. On CPU both get qnet.platform.conv's compiler options.
  """
  replicated, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  options = conv.cpu_compiler_options() or None
  p_train = jax.jit(
    functools.partial(joint.train_step, students=students, teacher=teacher, distill=distill),
    in_shardings=(replicated, data),
    out_shardings=(replicated, replicated),
    donate_argnums=(0,),
    compiler_options=options,
  )
  p_eval = jax.jit(
    functools.partial(joint.eval_step, students=students, teacher=teacher),
    in_shardings=(replicated, data),
    out_shardings=replicated,
    compiler_options=options,
  )
  return p_train, p_eval


def distill_spec(
  config: ml_collections.ConfigDict, total_steps: int = 0
) -> joint.DistillSpec | None:
  """The loss weights of `config.distill`, or None without distillation. `total_steps`
  turns `distill.kd_warmup` (a fraction) into steps."""
  if not config.distill.enabled:
    return None
  d = config.distill
  return joint.DistillSpec(
    kd_warmup_steps=int(round(d.kd_warmup * total_steps)),
    temperature=d.temperature,
    student_ce=d.student_ce,
    student_kl=d.student_kl,
    teacher_ce=d.teacher_ce,
    teacher_kl=d.teacher_kl,
    hint_weight=d.hint_weight,
  )
