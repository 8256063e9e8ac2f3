"""The joint teacher-student train state and the one compiled, data-parallel train step.

A run trains one or more low-precision students and, with distillation, a full-precision
teacher, all in the same jitted step on the same batch (qnet/METHOD.md, remedy 3). Without
distillation there is one student and no teacher. Each network's precision comes from its
`Schedule`, evaluated on the traced step inside the step (remedies 1 and 2).

Everything here is pure; `qnet.train.loop` runs the loop (data, checkpoints, metrics).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from qnet.quant import precision as precision_lib
from qnet.quant import schedule as schedule_lib

PyTree = Any
# Incremented when a step function is traced: under jit a trace means a compilation, so
# tests and benchmarks count compiles with it (a precision change must never add one).
TRACE_COUNTS: collections.Counter = collections.Counter()
# XLA's RngBitGenerator instead of threefry for every key qnet makes: initialising a model
# with threefry keys took 9 s to compile on the 2-core CPU (tiny_cnn; jax 0.10.2), rbg 1 s.
# Re-measured on jax 0.12 (experiments/prng_compile.py, experiments/README.md): init still
# compiles faster with rbg (resnet20 > 3x); the key layout is part of every checkpoint.
PRNG_IMPL = "rbg"


@flax.struct.dataclass
class NetState:
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: steps taken.
  key: jax.Array  # raw PRNG key data (PRNG_IMPL); per-step keys fold in `step`.
  students: tuple[NetState, ...]
  teacher: NetState | None


@dataclasses.dataclass(frozen=True)
class NetSpec:
  """Static description of one network: model, precision layout/schedule, optimiser, lr.

  `schedule` is None for a network that always runs at full precision (the teacher);
  `lr_fn` maps the step to the learning rate (it closes over its own schedule).
  """

  model: nn.Module
  layout: precision_lib.Layout
  tx: optax.GradientTransformation = dataclasses.field(compare=False)
  lr_fn: Callable[[jax.Array], jax.Array] = dataclasses.field(compare=False)
  schedule: schedule_lib.Schedule | None = None
  reset_momentum: bool = False
  frozen: bool = False


@dataclasses.dataclass(frozen=True)
class DistillSpec:
  """Loss weights of joint distillation (METHOD.md; defaults = released CIFAR-100 settings)."""

  temperature: float = 1.0
  student_ce: float = 0.7
  student_kl: float = 0.7
  teacher_ce: float = 1.0
  teacher_kl: float = 0.5
  hint_weight: float = 0.0
  # Steps with CE only (no KL, no hint) before the distillation terms start (QKD's first
  # stage). Compared with the traced step inside the one compiled step: no recompile.
  kd_warmup_steps: int = 0


# ----------------------------------------------------------------------------- optimiser


def create_optimizer(
  momentum: float,
  weight_decay: float,
  nesterov: bool = False,
  clip_decays: dict[str, float] | None = None,
) -> optax.GradientTransformation:
  """SGD direction (PyTorch semantics: decay added to the gradient, then momentum).

  The learning rate is applied by the step (`params - lr * update`), not inside optax, so a
  phase can restart the lr schedule and the momentum buffer can be reset independently.
  Weight decay applies to kernels only (ndim > 1), not to BN parameters, biases or learned
  clip levels; `clip_decays` maps a clip level's parameter name to its own decay (PACT's L2
  penalty on alpha is this decay). Zero decays add no transform (the state keeps its shape).
  """
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)

  def named(name: str):  # mask: the parameters called `name`, wherever they sit
    return lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == name, params
    )

  clip = [
    optax.add_decayed_weights(d, mask=named(n)) for n, d in sorted((clip_decays or {}).items()) if d
  ]
  return optax.chain(
    optax.add_decayed_weights(weight_decay, mask=decay_mask),
    *clip,
    optax.trace(decay=momentum, nesterov=nesterov),
  )


def create_learning_rate_fn(
  base_lr: float,
  kind: str,
  warmup_steps: int,
  step_at: tuple,
  step_factor: float,
  total_steps: int,
  restart_at: schedule_lib.Schedule | None = None,
) -> Callable[[jax.Array], jax.Array]:
  """lr(step): linear warmup then cosine / step / constant decay over `total_steps`.

  With `restart_at` (a precision schedule) the warmup and decay restart at each of its
  phase starts and run over that phase only. `step_at` are fractions of the span.
  """

  def lr_fn(step):
    step = jnp.asarray(step, jnp.float32)
    if restart_at is not None:
      start, end = restart_at.phase_bounds(step.astype(jnp.int32))
      start, span = start.astype(jnp.float32), (end - start).astype(jnp.float32)
    else:
      start, span = jnp.float32(0.0), jnp.float32(total_steps)
    t = step - start
    warm = jnp.minimum(1.0, (t + 1.0) / warmup_steps) if warmup_steps > 0 else 1.0
    progress = jnp.clip((t - warmup_steps) / jnp.maximum(span - warmup_steps, 1.0), 0.0, 1.0)
    if kind == "cosine":
      decay = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif kind == "step":
      decay = step_factor ** jnp.sum(
        t / jnp.maximum(span, 1.0) >= jnp.asarray(step_at, jnp.float32)
      )
    else:
      decay = 1.0
    return base_lr * warm * decay

  return lr_fn


# ----------------------------------------------------------------------------- init


def init_net(spec: NetSpec, key: jax.Array, sample: jax.Array) -> NetState:
  """Parameters and BN statistics of `spec.model`, and a fresh optimiser state."""
  variables = spec.model.init(key, sample, train=False)
  params = variables["params"]
  return NetState(
    params=params, batch_stats=variables.get("batch_stats", {}), opt_state=spec.tx.init(params)
  )


def init_state(
  students: tuple[NetSpec, ...], teacher: NetSpec | None, seed: int, sample: jax.Array
) -> TrainState:
  """The joint state; every network gets its own init key from `seed`."""
  root = jax.random.key(seed, impl=PRNG_IMPL)
  init_key, step_key = jax.random.split(root)
  keys = jax.random.split(init_key, len(students) + 1)
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    key=jax.random.key_data(step_key),
    students=tuple(init_net(s, k, sample) for s, k in zip(students, keys)),
    teacher=None if teacher is None else init_net(teacher, keys[-1], sample),
  )


# ----------------------------------------------------------------------------- losses


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def distill_kl(logits: jax.Array, target_logits: jax.Array, temperature: float) -> jax.Array:
  """`T^2 * KL` of the softened distributions, gradient to `logits` only.

  Computes `sum p_target (log p_target - log p)`, the quantity of PyTorch's
  `F.kl_div(log_softmax(logits / T), softmax(target / T))` that the authors' code uses
  and METHOD.md writes `KL(p_target || p)`. The target side is stop-gradient.
  """
  t = temperature
  target = jax.lax.stop_gradient(target_logits)
  log_p = jax.nn.log_softmax(logits / t)
  log_q = jax.nn.log_softmax(target / t)
  kl = jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1)
  return (t * t) * kl.mean()


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """Per-example 1.0 if the label is among the top-k logits."""
  k = min(k, logits.shape[-1])
  _, top = jax.lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


# ----------------------------------------------------------------------------- steps


class Forward(NamedTuple):
  logits: jax.Array
  batch_stats: PyTree  # updated in training mode, unchanged in eval mode
  features: jax.Array | None  # the penultimate features, only when asked for (hint loss)


class NetLoss(NamedTuple):
  loss: jax.Array
  batch_stats: PyTree
  metrics: dict[str, jax.Array]
  logits: jax.Array


def metric_prefix(student: int) -> str:
  """Prefix of a student's metric names: none for the first, `studentI_` for the others."""
  return "" if student == 0 else f"student{student}_"


def _prefixed(prefix: str, metrics: dict[str, jax.Array]) -> dict[str, jax.Array]:
  return {prefix + k: v for k, v in metrics.items()}


def forward(
  spec: NetSpec,
  params: PyTree,
  batch_stats: PyTree,
  prec: PyTree,
  images: jax.Array,
  train: bool,
  features: bool = False,
) -> Forward:
  """`spec.model` at precision `prec`; BatchNorm in batch mode and updated when `train`."""
  variables = {"params": params, "batch_stats": batch_stats, "precision": prec}
  mutable = (["batch_stats"] if train else []) + (["intermediates"] if features else [])
  if not mutable:
    return Forward(spec.model.apply(variables, images, train=train), batch_stats, None)
  logits, updates = spec.model.apply(variables, images, train=train, mutable=mutable)
  feats = updates["intermediates"]["features"][0] if features else None
  return Forward(logits, updates.get("batch_stats", batch_stats), feats)


def student_loss(
  spec: NetSpec,
  params: PyTree,
  net: NetState,
  step: jax.Array,
  key: jax.Array,
  batch: dict[str, jax.Array],
  teacher_out: Forward | None,
  d: DistillSpec,
) -> NetLoss:
  """One student's training loss at this step's (sampled) precision, and its metrics.

  Alone: CE. With a teacher: `a_s CE + b_s T^2 KL(p_s || sg(p_t)) [+ beta ||f_t - f_s||^2]`,
  or plain CE while `step < d.kd_warmup_steps`.
  """
  prec, fraction = spec.schedule.sample(spec.layout, step, key)
  hint = teacher_out is not None and d.hint_weight > 0
  out = forward(spec, params, net.batch_stats, prec, batch["image"], True, hint)
  ce = cross_entropy(out.logits, batch["label"])
  w_bits, a_bits = spec.schedule.phase_bits(step)
  metrics = {
    "train_ce": ce,
    "train_accuracy": jnp.mean(topk_correct(out.logits, batch["label"], 1)),
    "weight_bits": w_bits,
    "act_bits": a_bits,
    "quantized_fraction": fraction,
  }
  loss = ce
  if teacher_out is not None:
    kl = distill_kl(out.logits, teacher_out.logits, d.temperature)
    loss = d.student_ce * ce + d.student_kl * kl
    metrics["kl_student"] = kl
    if hint:
      target = jax.lax.stop_gradient(teacher_out.features)
      h = jnp.mean(jnp.square(out.features.astype(jnp.float32) - target))
      loss = loss + d.hint_weight * h
      metrics["hint_loss"] = h
    if d.kd_warmup_steps:
      loss = jnp.where(step < d.kd_warmup_steps, ce, loss)
  metrics["train_loss"] = loss
  return NetLoss(loss, out.batch_stats, metrics, out.logits)


def teacher_loss(
  out: Forward,
  labels: jax.Array,
  student_logits: list[jax.Array],
  d: DistillSpec,
  trains: bool,
  step: jax.Array | int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The teacher's loss `a_t CE + b_t mean_s T^2 KL(p_t || sg(p_s))` (0 when frozen; plain CE
  while `step < d.kd_warmup_steps`), and its metrics."""
  ce = cross_entropy(out.logits, labels)
  kl = jnp.mean(jnp.stack([distill_kl(out.logits, s, d.temperature) for s in student_logits]))
  metrics = {
    "teacher_train_ce": ce,
    "kl_teacher": kl,
    "teacher_train_accuracy": jnp.mean(topk_correct(out.logits, labels, 1)),
  }
  if not trains:
    return jnp.float32(0.0), metrics
  loss = d.teacher_ce * ce + d.teacher_kl * kl
  if d.kd_warmup_steps:
    loss = jnp.where(step < d.kd_warmup_steps, ce, loss)
  return loss, metrics | {"teacher_train_loss": loss}


def apply_gradients(
  spec: NetSpec, net: NetState, grads: PyTree, batch_stats: PyTree, step: jax.Array
) -> tuple[NetState, dict[str, jax.Array]]:
  """`params - lr(step) * sgd_direction`, momentum zeroed at phase starts with
  `reset_momentum`; returns the new state and (learning_rate, l2_grads)."""
  opt_state = net.opt_state
  if spec.reset_momentum:
    start, _ = spec.schedule.phase_bounds(step)
    reset = (step == start) & (step > 0)
    opt_state = jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), opt_state)
  updates, opt_state = spec.tx.update(grads, opt_state, net.params)
  lr = spec.lr_fn(step)
  params = jax.tree.map(lambda p, u: p - lr * u, net.params, updates)
  new = NetState(params=params, batch_stats=batch_stats, opt_state=opt_state)
  return new, {"learning_rate": lr, "l2_grads": optax.global_norm(grads)}


def joint_loss(
  student_params: tuple[PyTree, ...],
  teacher_params: PyTree | None,
  state: TrainState,
  batch: dict[str, jax.Array],
  key: jax.Array,
  students: tuple[NetSpec, ...],
  teacher: NetSpec | None,
  d: DistillSpec,
) -> tuple[jax.Array, tuple[list[PyTree], PyTree | None, dict[str, jax.Array]]]:
  """The sum of every network's loss, and (students' new BN statistics, the teacher's,
  metrics). A frozen teacher runs in eval mode and adds no loss."""
  teacher_trains = teacher is not None and not teacher.frozen
  t_out = None
  if teacher is not None:
    prec = precision_lib.full_precision(teacher.layout)
    hint = d.hint_weight > 0
    stats = state.teacher.batch_stats
    t_out = forward(teacher, teacher_params, stats, prec, batch["image"], teacher_trains, hint)
  outs = [
    student_loss(spec, p, net, state.step, jax.random.fold_in(key, i), batch, t_out, d)
    for i, (spec, p, net) in enumerate(zip(students, student_params, state.students))
  ]
  total = sum(o.loss for o in outs)
  metrics = {}
  for i, o in enumerate(outs):
    metrics |= _prefixed(metric_prefix(i), o.metrics)
  if t_out is None:
    return total, ([o.batch_stats for o in outs], None, metrics)
  logits = [o.logits for o in outs]
  t_loss, t_metrics = teacher_loss(t_out, batch["label"], logits, d, teacher_trains, state.step)
  return total + t_loss, ([o.batch_stats for o in outs], t_out.batch_stats, metrics | t_metrics)


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  students: tuple[NetSpec, ...],
  teacher: NetSpec | None = None,
  distill: DistillSpec | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step of every network on the shared batch; returns the new state and metrics.

  Losses: `student_loss`, `teacher_loss`. One `jax.grad` of their sum (`joint_loss`) gives
  every network exactly its own gradient, because every cross-network term is
  stop-gradient on its target side.
  """
  TRACE_COUNTS["train_step"] += 1
  step = state.step
  key = jax.random.fold_in(jax.random.wrap_key_data(state.key, impl=PRNG_IMPL), step)
  d = distill or DistillSpec()
  loss = functools.partial(
    joint_loss, state=state, batch=batch, key=key, students=students, teacher=teacher, d=d
  )
  student_params = tuple(n.params for n in state.students)
  teacher_params = None if teacher is None else state.teacher.params
  teacher_trains = teacher is not None and not teacher.frozen
  argnums = (0, 1) if teacher_trains else (0,)
  grads, (s_stats, t_stats, metrics) = jax.grad(loss, argnums, has_aux=True)(
    student_params, teacher_params
  )

  new_students = []
  for i, (spec, net, g, bs) in enumerate(zip(students, state.students, grads[0], s_stats)):
    new_net, m = apply_gradients(spec, net, g, bs, step)
    new_students.append(new_net)
    metrics |= _prefixed(metric_prefix(i), m)
  new_teacher = state.teacher
  if teacher_trains:
    new_teacher, m = apply_gradients(teacher, state.teacher, grads[1], t_stats, step)
    metrics["teacher_learning_rate"] = m["learning_rate"]
  new_state = state.replace(step=step + 1, students=tuple(new_students), teacher=new_teacher)
  return new_state, metrics


def eval_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  students: tuple[NetSpec, ...],
  teacher: NetSpec | None = None,
) -> dict[str, jax.Array]:
  """Masked sums (loss, top-1, top-5 correct, count) of every network on one eval batch.

  Students are evaluated fully quantized at the current phase's bits (no stochastic
  draws), the teacher at full precision; BatchNorm uses its running statistics.
  """
  TRACE_COUNTS["eval_step"] += 1
  nets = [
    (metric_prefix(i), spec, net, spec.schedule.deterministic(spec.layout, state.step))
    for i, (spec, net) in enumerate(zip(students, state.students))
  ]
  if teacher is not None:
    nets.append(("teacher_", teacher, state.teacher, precision_lib.full_precision(teacher.layout)))
  labels, mask = batch["label"], batch["mask"]
  sums = {"eval_count": jnp.sum(mask)}
  for prefix, spec, net, prec in nets:
    logits = forward(spec, net.params, net.batch_stats, prec, batch["image"], False).logits
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    sums[f"{prefix}eval_loss"] = jnp.sum(loss * mask)
    sums[f"{prefix}eval_accuracy"] = jnp.sum(topk_correct(logits, labels, 1) * mask)
    sums[f"{prefix}eval_top5_accuracy"] = jnp.sum(topk_correct(logits, labels, 5) * mask)
  return sums
