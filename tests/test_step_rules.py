"""The documented rules of the learning rate, the optimiser and the train/eval steps, each
pinned by values that a small bug (a span, an off-by-one, a wrong key or mode) would change."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import default
from qnet.train import build, joint
from qnet import models
from qnet.quant import precision, schedule


def _lr(kind="cosine", warmup=0, total=100, step_at=(0.5, 0.75), restart_at=None):
  return joint.create_learning_rate_fn(1.0, kind, warmup, step_at, 0.1, total, restart_at)


def _at(lr_fn, steps):
  return [float(lr_fn(jnp.int32(s))) for s in steps]


# ----------------------------------------------------------------------------- learning rate


def test_cosine_decays_over_exactly_the_run():
  c = 0.5 * np.cos(np.pi / 4)
  want = [1.0, 0.5 + c, 0.5, 0.5 - c, 0.0]
  np.testing.assert_allclose(_at(_lr(), [0, 25, 50, 75, 100]), want, atol=1e-6)


def test_warmup_reaches_the_base_lr_at_its_last_step_then_cosine_starts():
  lr = _lr(warmup=10, total=110)
  # Step s of the warm-up trains at (s + 1) / warmup: never a step at lr 0.
  np.testing.assert_allclose(_at(lr, [0, 4, 9]), [0.1, 0.5, 1.0], atol=1e-6)
  # The cosine spans the 100 steps after the warm-up.
  np.testing.assert_allclose(_at(lr, [10, 60, 110]), [1.0, 0.5, 0.0], atol=1e-6)


def test_step_schedule_drops_at_its_fractions():
  lr = _lr(kind="step", total=100)
  want = [1, 1, 0.1, 0.1, 0.01, 0.01]
  np.testing.assert_allclose(_at(lr, [0, 49, 50, 74, 75, 99]), want, rtol=1e-5)
  np.testing.assert_allclose(_at(_lr(kind="constant"), [0, 50, 99]), [1, 1, 1])


def test_lr_restart_runs_the_schedule_over_each_phase():
  phases = schedule.Schedule(
    starts=(0, 40), weight_bits=(8.0, 2.0), act_bits=(8.0, 2.0), total_steps=100
  )
  lr = _lr(warmup=4, restart_at=phases)
  # Phase 1 is steps [0, 40), phase 2 [40, 100): each warms up and decays over itself.
  want = [0.25, 1, 0.5, 0.25, 1, 0.5]
  np.testing.assert_allclose(_at(lr, [0, 3, 22, 40, 43, 72]), want, atol=1e-6)


# ----------------------------------------------------------------------------- optimiser


def _spec(starts=(0,), reset_momentum=False, momentum=0.9, weight_decay=0.0):
  return joint.NetSpec(
    model=None,
    layout=None,
    tx=joint.create_optimizer(momentum, weight_decay),
    lr_fn=lambda step: jnp.float32(1.0),
    schedule=schedule.Schedule(
      starts=starts, weight_bits=(4.0,) * len(starts), act_bits=(4.0,) * len(starts), total_steps=10
    ),
    reset_momentum=reset_momentum,
  )


def _moves(spec, grads_per_step):
  """Which steps move the parameters, for the given gradient (a scalar per step)."""
  params = {"kernel": jnp.ones((2, 2))}
  net = joint.NetState(params=params, batch_stats={}, opt_state=spec.tx.init(params))
  moved = []
  for step, g in enumerate(grads_per_step):
    grads = {"kernel": jnp.full((2, 2), g, jnp.float32)}
    new, _ = joint.apply_gradients(spec, net, grads, {}, jnp.int32(step))
    moved.append(not np.array_equal(new.params["kernel"], net.params["kernel"]))
    net = new
  return moved


def test_reset_momentum_zeroes_the_buffer_exactly_at_phase_starts():
  grads = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]  # after step 1 only momentum can move the weights
  assert _moves(_spec(starts=(0, 3)), grads) == [True] * 6
  # Reset at the phase start 3: steps 3 and later no longer move; step 2 still does.
  assert _moves(_spec(starts=(0, 3), reset_momentum=True), grads) == [True] * 3 + [False] * 3
  # Never at step 0 (the run's start is not a phase change), nor without a phase start.
  assert _moves(_spec(starts=(0,), reset_momentum=True), grads) == [True] * 6


def test_weight_decay_reaches_kernels_only():
  model = models.create_model("tiny_resnet", 10)
  variables = model.init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 28, 28, 1)), train=False)
  params = variables["params"]
  tx = joint.create_optimizer(momentum=0.0, weight_decay=0.5)
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  names = set()
  for path, u in jax.tree_util.tree_leaves_with_path(updates):
    name = path[-1].key
    names.add(name)
    p = params
    for k in path:
      p = p[k.key]
    want = 0.5 * p if name == "kernel" else jnp.zeros_like(p)
    np.testing.assert_allclose(u, want, err_msg=jax.tree_util.keystr(path))
  assert {"kernel", "scale", "bias"} <= names


# ----------------------------------------------------------------------------- train step


def _config(**overrides):
  c = default.get_config()
  c.model = "tiny_resnet"
  c.schedule.kind = "direct"
  c.quant.weight_bits = c.quant.act_bits = 2
  c.update_from_flattened_dict(overrides)
  return c


def _batch(n=8, seed=0, masked=0):
  rng = np.random.default_rng(seed)
  return {
    "image": jnp.asarray(rng.normal(size=(n, 28, 28, 1)) * 2 + 0.5, jnp.float32),
    "label": jnp.asarray(rng.integers(0, 10, n), jnp.int32),
    "mask": jnp.asarray([1.0] * (n - masked) + [0.0] * masked, jnp.float32),
  }


def _state(c, total=20):
  students, teacher = build.build_specs(c, total)
  state = joint.init_state(students, teacher, c.seed, jnp.zeros((1, 28, 28, 1)))
  return students, teacher, state


def test_teacher_kl_is_the_mean_over_students():
  rng = np.random.default_rng(0)
  t, s1, s2 = (jnp.asarray(rng.normal(size=(4, 10)), jnp.float32) for _ in range(3))
  labels = jnp.zeros(4, jnp.int32)
  d = joint.DistillSpec(temperature=2.0)
  out = joint.Forward(t, {}, None)
  loss2, m2 = joint.teacher_loss(out, labels, [s1, s2], d, trains=True)
  want = (joint.distill_kl(t, s1, 2.0) + joint.distill_kl(t, s2, 2.0)) / 2
  np.testing.assert_allclose(m2["kl_teacher"], want, rtol=1e-6)
  # Two identical students pull the teacher as one does.
  loss1, _ = joint.teacher_loss(out, labels, [s1], d, trains=True)
  loss11, _ = joint.teacher_loss(out, labels, [s1, s1], d, trains=True)
  np.testing.assert_allclose(loss11, loss1, rtol=1e-6)
  want_loss = d.teacher_ce * m2["teacher_train_ce"] + d.teacher_kl * want
  np.testing.assert_allclose(loss2, want_loss, rtol=1e-6)


def test_sp_separate_draws_weights_and_activations_independently():
  layout = precision.layout_of(models.create_model("tiny_resnet", 10), jnp.zeros((1, 28, 28, 1)))

  def masks(separate, seed):
    sched = schedule.Schedule(
      starts=(0,),
      weight_bits=(2.0,),
      act_bits=(2.0,),
      total_steps=100,
      stochastic=True,
      sp_ratios=(0.5,),
      sp_separate=separate,
    )
    tree, _ = sched.sample(layout, jnp.int32(0), jax.random.key(seed, impl="rbg"))
    nodes = [functools.reduce(lambda node, k: node[k], path, tree) for path in layout.paths]
    w = np.array([float(n["weight_bits"]) for n in nodes])
    a = np.array([float(n["act_bits"]) for n in nodes])
    return w < 32, a < 32

  shared = [masks(False, s) for s in range(8)]
  separate = [masks(True, s) for s in range(8)]
  assert all(np.array_equal(w, a) for w, a in shared)
  assert any(not np.array_equal(w, a) for w, a in separate)


@pytest.mark.heavy
def test_eval_step_runs_batchnorm_on_running_statistics_and_masks_padding():
  c = _config()
  students, _, state = _state(c)
  train = jax.jit(functools.partial(joint.train_step, students=students))
  for i in range(2):  # running statistics away from their initial values
    state, _ = train(state, _batch(seed=i))
  spec, net = students[0], state.students[0]
  batch = _batch(n=8, seed=5, masked=3)
  sums = jax.jit(functools.partial(joint.eval_step, students=students))(state, batch)
  prec = spec.schedule.deterministic(spec.layout, state.step)
  variables = {"params": net.params, "batch_stats": net.batch_stats, "precision": prec}
  # The 5 real rows alone, in eval mode: BN in eval mode treats each row on its own.
  logits = spec.model.apply(variables, batch["image"][:5], train=False)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"][:5])
  assert float(sums["eval_count"]) == 5
  np.testing.assert_allclose(sums["eval_loss"], jnp.sum(losses), rtol=1e-5)
  correct = jnp.sum(jnp.argmax(logits, -1) == batch["label"][:5])
  assert float(sums["eval_accuracy"]) == float(correct)


def test_topk_counts_a_label_ranked_2nd_to_5th_in_top5_only():
  # Row i's logits rank the classes 0, 1, 2, ... (class 0 highest); label r is ranked r+1.
  logits = jnp.tile(-jnp.arange(10, dtype=jnp.float32), (7, 1))
  labels = jnp.asarray([0, 1, 2, 3, 4, 5, 9], jnp.int32)
  assert joint.topk_correct(logits, labels, 1).tolist() == [1, 0, 0, 0, 0, 0, 0]
  assert joint.topk_correct(logits, labels, 5).tolist() == [1, 1, 1, 1, 1, 0, 0]
  # A permutation per row: the rank, not the class index, decides.
  perm = jnp.asarray(np.random.default_rng(0).permutation(10))
  shuffled = jnp.zeros_like(logits).at[:, perm].set(logits)
  assert joint.topk_correct(shuffled, perm[labels], 5).tolist() == [1, 1, 1, 1, 1, 0, 0]
  # k counts classes, not rows: a batch of 2 still gets its top 5; fewer classes than k: all.
  assert joint.topk_correct(logits[:2], jnp.asarray([3, 4]), 5).tolist() == [1, 1]
  assert joint.topk_correct(logits[:, :3], jnp.asarray([2] * 7), 5).tolist() == [1] * 7


def test_eval_step_top5_counts_labels_ranked_2nd_to_5th_and_masks_padding():
  c = _config(**{"distill.enabled": True})
  students, teacher, state = _state(c)
  spec, net = students[0], state.students[0]
  batch = _batch(n=8, seed=3, masked=1)
  prec = spec.schedule.deterministic(spec.layout, state.step)
  variables = {"params": net.params, "batch_stats": net.batch_stats, "precision": prec}
  logits = np.asarray(spec.model.apply(variables, batch["image"], train=False))
  order = np.argsort(-logits, axis=-1)
  assert all(len(set(np.round(row, 6))) == 10 for row in logits)  # no ties: ranks are defined
  ranks = [0, 1, 2, 3, 4, 5, 9, 1]  # 0-based rank of each row's label; the last row is padding
  batch["label"] = jnp.asarray([order[i, r] for i, r in enumerate(ranks)], jnp.int32)
  step = functools.partial(joint.eval_step, students=students, teacher=teacher)
  sums = jax.jit(step)(state, batch)
  assert float(sums["eval_count"]) == 7
  assert float(sums["eval_accuracy"]) == 1  # rank 0 only
  assert float(sums["eval_top5_accuracy"]) == 5  # ranks 0-4 among the 7 real rows
  # The teacher's sums, at full precision, over the same 7 rows.
  t_vars = {
    "params": state.teacher.params,
    "batch_stats": state.teacher.batch_stats,
    "precision": precision.full_precision(teacher.layout),
  }
  t_logits = np.asarray(teacher.model.apply(t_vars, batch["image"], train=False))[:7]
  labels = np.asarray(batch["label"])[:7]
  t_order = np.argsort(-t_logits, axis=-1)
  assert float(sums["teacher_eval_accuracy"]) == np.sum(t_order[:, 0] == labels)
  top5 = np.sum([label in row[:5] for row, label in zip(t_order, labels)])
  assert float(sums["teacher_eval_top5_accuracy"]) == top5
  t_loss = optax.softmax_cross_entropy_with_integer_labels(t_logits, labels).sum()
  np.testing.assert_allclose(sums["teacher_eval_loss"], t_loss, rtol=1e-5)


@pytest.mark.heavy
def test_train_step_metrics_are_their_values():
  """Every metric of a distilling train step, recomputed from the step's own inputs."""
  over = {
    "distill.enabled": True,
    "distill.hint_weight": 0.3,
    "distill.temperature": 2.0,
    "momentum": 0.0,
    "weight_decay": 0.0,
    "learning_rate": 0.5,
  }
  c = _config(model="tiny_cnn", **over)
  students, teacher, state = _state(c)
  spec, batch, d = students[0], _batch(), build.distill_spec(c)
  step = functools.partial(joint.train_step, students=students, teacher=teacher, distill=d)
  new, m = jax.jit(step)(state, batch)
  images, labels = batch["image"], batch["label"]
  prec = spec.schedule.deterministic(spec.layout, 0)  # direct: every step fully quantized
  net, t_net = state.students[0], state.teacher
  s = joint.forward(spec, net.params, net.batch_stats, prec, images, True, True)
  t_prec = precision.full_precision(teacher.layout)
  t = joint.forward(teacher, t_net.params, t_net.batch_stats, t_prec, images, True, True)
  ce = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  acc = lambda logits: np.mean(np.argmax(logits, -1) == np.asarray(labels))
  kl_s, kl_t = joint.distill_kl(s.logits, t.logits, 2.0), joint.distill_kl(t.logits, s.logits, 2.0)
  hint = jnp.mean(jnp.square(s.features - t.features))
  want = {
    "train_ce": ce(s.logits),
    "train_accuracy": acc(s.logits),
    "kl_student": kl_s,
    "hint_loss": hint,
    "train_loss": d.student_ce * ce(s.logits) + d.student_kl * kl_s + 0.3 * hint,
    "weight_bits": 2.0,  # _config: W2A2
    "act_bits": 2.0,
    "quantized_fraction": 1.0,
    "learning_rate": 0.5 * 0.5 * (1 + np.cos(0.0)),
    "teacher_train_ce": ce(t.logits),
    "teacher_train_accuracy": acc(t.logits),
    "kl_teacher": kl_t,
    "teacher_train_loss": d.teacher_ce * ce(t.logits) + d.teacher_kl * kl_t,
    "teacher_learning_rate": 0.5,
  }
  # Plain SGD (no momentum, no decay): the gradient is the step taken over the rate.
  grads = jax.tree.map(lambda a, b: (a - b) / 0.5, net.params, new.students[0].params)
  want["l2_grads"] = optax.global_norm(grads)
  assert set(m) == set(want)
  for k, v in want.items():
    np.testing.assert_allclose(m[k], v, rtol=2e-4, atol=1e-6, err_msg=k)


@pytest.mark.heavy
def test_teacher_learning_rate_sets_the_teachers_rate_and_update_only():
  # The paper's ImageNet recipe: teacher 0.001, students 0.005 (cosine over 20 steps).
  over = {"distill.enabled": True, "learning_rate": 0.005, "num_train_steps": 20}
  c = _config(model="tiny_cnn", **over, **{"distill.teacher_learning_rate": 0.001})
  students, teacher, state = _state(c)
  cos = lambda base, s: base * 0.5 * (1 + np.cos(np.pi * s / 20))
  for s in (0, 5, 10, 19):
    np.testing.assert_allclose(teacher.lr_fn(jnp.int32(s)), cos(0.001, s), rtol=1e-5)
    np.testing.assert_allclose(students[0].lr_fn(jnp.int32(s)), cos(0.005, s), rtol=1e-5)
  # -1 (the default): the teacher follows learning_rate.
  _, same, _ = _state(_config(model="tiny_cnn", **over))
  np.testing.assert_allclose(same.lr_fn(jnp.int32(5)), cos(0.005, 5), rtol=1e-5)

  def one_step(students, teacher):
    step = functools.partial(
      joint.train_step, students=students, teacher=teacher, distill=build.distill_spec(c)
    )
    return jax.jit(step)(state, _batch())

  new, m = one_step(students, teacher)
  np.testing.assert_allclose(m["learning_rate"], 0.005, rtol=1e-6)
  np.testing.assert_allclose(m["teacher_learning_rate"], 0.001, rtol=1e-6)
  # The update itself: from one state and batch, the teacher's step is 1/5 of what it takes
  # at the students' rate, and the students' step does not change.
  new5, _ = one_step(students, same)
  move = lambda a, b: jax.tree.map(lambda x, y: np.asarray(x) - np.asarray(y), a, b)
  t1 = move(new.teacher.params, state.teacher.params)
  t5 = move(new5.teacher.params, state.teacher.params)
  # atol: float32 rounding of `p - lr * u` (|p| <= ~1); the steps themselves are ~1e-3.
  for x, y in zip(jax.tree.leaves(t1), jax.tree.leaves(t5)):
    np.testing.assert_allclose(5 * x, y, rtol=1e-4, atol=5e-7)
  assert max(np.abs(x).max() for x in jax.tree.leaves(t5)) > 1e-4
  for x, y in zip(jax.tree.leaves(new.students), jax.tree.leaves(new5.students)):
    np.testing.assert_array_equal(x, y)
