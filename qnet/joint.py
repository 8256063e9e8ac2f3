"""The joint teacher-student train state and the one compiled, data-parallel train step.

A run trains one or more low-precision students and, with distillation, a full-precision
teacher, all in the same jitted step on the same batch (paper.md remedy 3). Without
distillation there is one student and no teacher. Each network's precision comes from its
`Schedule`, evaluated on the traced step inside the step (remedies 1 and 2).

Everything here is pure; `qnet.loop` runs the loop (data, checkpoints, metrics).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from qnet import precision as precision_lib
from qnet import schedule as schedule_lib

PyTree = Any
# Incremented when a step function is traced: under jit a trace means a compilation, so
# tests and benchmarks count compiles with it (a precision change must never add one).
TRACE_COUNTS: collections.Counter = collections.Counter()
# XLA's RngBitGenerator instead of threefry for every key qnet makes: initialising a model
# with threefry keys took 9 s to compile on the 2-core CPU (tiny_cnn; jax 0.10.2), rbg 1 s.
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
  """Static description of one network: model, precision layout/schedule, optimiser, lr."""

  model: nn.Module
  layout: precision_lib.Layout
  schedule: schedule_lib.Schedule
  tx: optax.GradientTransformation = dataclasses.field(compare=False)
  lr_fn: Callable[[jax.Array, schedule_lib.Schedule], jax.Array] = dataclasses.field(compare=False)
  reset_momentum: bool = False
  frozen: bool = False


@dataclasses.dataclass(frozen=True)
class DistillSpec:
  """Loss weights of joint distillation (paper.md; defaults = released CIFAR-100 settings)."""

  temperature: float = 1.0
  student_ce: float = 0.7
  student_kl: float = 0.7
  teacher_ce: float = 1.0
  teacher_kl: float = 0.5
  hint_weight: float = 0.0


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
  named = lambda name: (
    lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) == name, params
    )
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
  base_lr: float, kind: str, warmup_steps: int, step_at: tuple, step_factor: float, restart: bool
) -> Callable[[jax.Array, schedule_lib.Schedule], jax.Array]:
  """lr(step, schedule): linear warmup then cosine / step / constant decay.

  With `restart` the decay runs over each phase of `schedule` separately (restarted at
  each phase start); otherwise over the whole run. `step_at` are fractions of that span.
  """

  def lr_fn(step, schedule):
    step = jnp.asarray(step, jnp.float32)
    if restart:
      start, end = schedule.phase_bounds(step.astype(jnp.int32))
      start, span = start.astype(jnp.float32), (end - start).astype(jnp.float32)
    else:
      start, span = jnp.float32(0.0), jnp.float32(schedule.total_steps)
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
  and paper.md writes `KL(p || sg(p_target))`. The target side is stop-gradient.
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


def _forward(spec: NetSpec, params, batch_stats, prec, images, train: bool, hint: bool):
  """Returns (logits, new batch stats, features or None)."""
  variables = {"params": params, "batch_stats": batch_stats, "precision": prec}
  mutable = (["batch_stats"] if train else []) + (["intermediates"] if hint else [])
  if not mutable:
    return spec.model.apply(variables, images, train=train), batch_stats, None
  logits, updates = spec.model.apply(variables, images, train=train, mutable=mutable)
  features = updates["intermediates"]["features"][0] if hint else None
  return logits, updates.get("batch_stats", batch_stats), features


def _update(spec: NetSpec, net: NetState, grads, batch_stats, lr, reset) -> NetState:
  opt_state = net.opt_state
  if spec.reset_momentum:
    opt_state = jax.tree.map(lambda x: jnp.where(reset, jnp.zeros_like(x), x), opt_state)
  updates, opt_state = spec.tx.update(grads, opt_state, net.params)
  params = jax.tree.map(lambda p, u: p - lr * u, net.params, updates)
  return NetState(params=params, batch_stats=batch_stats, opt_state=opt_state)


def train_step(
  state: TrainState,
  batch: dict[str, jax.Array],
  *,
  students: tuple[NetSpec, ...],
  teacher: NetSpec | None = None,
  distill: DistillSpec | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step of every network on the shared batch; returns the new state and metrics.

  Students: `a_s CE + b_s T^2 KL(p_s || sg(p_t)) [+ beta ||f_t - f_s||^2]`; teacher:
  `a_t CE + b_t mean_s T^2 KL(p_t || sg(p_s))`. Without a teacher, each student's loss is
  its CE. One `jax.grad` of the summed losses gives every network exactly its own gradient,
  because every cross-network term is stop-gradient on its target side.
  """
  TRACE_COUNTS["train_step"] += 1
  step = state.step
  key = jax.random.fold_in(jax.random.wrap_key_data(state.key, impl=PRNG_IMPL), step)
  images, labels = batch["image"], batch["label"]
  d = distill or DistillSpec()
  hint = teacher is not None and d.hint_weight > 0

  precs, fractions = [], []
  for i, spec in enumerate(students):
    prec, frac = spec.schedule.sample(spec.layout, step, jax.random.fold_in(key, i))
    precs.append(prec)
    fractions.append(frac)
  teacher_trains = teacher is not None and not teacher.frozen
  teacher_prec = None if teacher is None else precision_lib.full_precision(teacher.layout)

  def loss_fn(trainable):
    student_params, teacher_params = trainable
    metrics, aux = {}, {"batch_stats": []}
    outs = [
      _forward(spec, p, net.batch_stats, prec, images, True, hint)
      for spec, p, net, prec in zip(students, student_params, state.students, precs)
    ]
    total = 0.0
    t_logits = t_feat = None
    if teacher is not None:
      t_params = teacher_params if teacher_trains else state.teacher.params
      t_logits, t_bs, t_feat = _forward(
        teacher, t_params, state.teacher.batch_stats, teacher_prec, images, teacher_trains, hint
      )
      aux["teacher_batch_stats"] = t_bs
    for i, (logits, bs, feat) in enumerate(outs):
      ce = cross_entropy(logits, labels)
      prefix = "" if i == 0 else f"student{i}_"
      loss = ce
      if teacher is not None:
        kl = distill_kl(logits, t_logits, d.temperature)
        loss = d.student_ce * ce + d.student_kl * kl
        metrics[f"{prefix}kl_student"] = kl
        if hint:
          h = jnp.mean(jnp.square(feat.astype(jnp.float32) - jax.lax.stop_gradient(t_feat)))
          loss = loss + d.hint_weight * h
          metrics[f"{prefix}hint_loss"] = h
      metrics[f"{prefix}train_ce"] = ce
      metrics[f"{prefix}train_loss"] = loss
      metrics[f"{prefix}train_accuracy"] = jnp.mean(topk_correct(logits, labels, 1))
      aux["batch_stats"].append(bs)
      total = total + loss
    if teacher is not None:
      ce_t = cross_entropy(t_logits, labels)
      kl_t = jnp.mean(jnp.stack([distill_kl(t_logits, o[0], d.temperature) for o in outs]))
      metrics["teacher_train_ce"] = ce_t
      metrics["kl_teacher"] = kl_t
      metrics["teacher_train_accuracy"] = jnp.mean(topk_correct(t_logits, labels, 1))
      if teacher_trains:
        loss_t = d.teacher_ce * ce_t + d.teacher_kl * kl_t
        metrics["teacher_train_loss"] = loss_t
        total = total + loss_t
    return total, (metrics, aux)

  trainable = (
    tuple(n.params for n in state.students),
    state.teacher.params if teacher_trains else None,
  )
  grads, (metrics, aux) = jax.grad(loss_fn, has_aux=True)(trainable)
  student_grads, teacher_grads = grads

  new_students = []
  for i, (spec, net, g, bs) in enumerate(
    zip(students, state.students, student_grads, aux["batch_stats"])
  ):
    lr = spec.lr_fn(step, spec.schedule)
    start, _ = spec.schedule.phase_bounds(step)
    reset = (step == start) & (step > 0)
    new_students.append(_update(spec, net, g, bs, lr, reset))
    prefix = "" if i == 0 else f"student{i}_"
    w_bits, a_bits = spec.schedule.phase_bits(step)
    metrics[f"{prefix}learning_rate"] = lr
    metrics[f"{prefix}weight_bits"] = w_bits
    metrics[f"{prefix}act_bits"] = a_bits
    metrics[f"{prefix}quantized_fraction"] = fractions[i]
    metrics[f"{prefix}l2_grads"] = optax.global_norm(g)
  new_teacher = state.teacher
  if teacher_trains:
    lr_t = teacher.lr_fn(step, teacher.schedule)
    new_teacher = _update(
      teacher, state.teacher, teacher_grads, aux["teacher_batch_stats"], lr_t, jnp.bool_(False)
    )
    metrics["teacher_learning_rate"] = lr_t
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
  draws); the teacher at full precision.
  """
  TRACE_COUNTS["eval_step"] += 1
  images, labels, mask = batch["image"], batch["label"], batch["mask"]
  nets = [
    (
      ("" if i == 0 else f"student{i}_"),
      spec,
      net,
      spec.schedule.deterministic(spec.layout, state.step),
    )
    for i, (spec, net) in enumerate(zip(students, state.students))
  ]
  if teacher is not None:
    nets.append(("teacher_", teacher, state.teacher, precision_lib.full_precision(teacher.layout)))
  sums = {"eval_count": jnp.sum(mask)}
  for prefix, spec, net, prec in nets:
    logits, _, _ = _forward(spec, net.params, net.batch_stats, prec, images, False, False)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    sums[f"{prefix}eval_loss"] = jnp.sum(loss * mask)
    sums[f"{prefix}eval_accuracy"] = jnp.sum(topk_correct(logits, labels, 1) * mask)
    sums[f"{prefix}eval_top5_accuracy"] = jnp.sum(topk_correct(logits, labels, 5) * mask)
  return sums
