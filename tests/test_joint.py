"""The joint_state train step: determinism, device-count independence, compile-once, distillation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import default
from qnet.train import build, joint


def _config(model="tiny_resnet", **distill):
  c = default.get_config()
  c.model = model
  c.schedule.kind = "direct"
  c.quant.weight_bits = c.quant.act_bits = 2
  if distill:
    c.distill.enabled = True
    for k, v in distill.items():
      c.distill[k] = v
  return c


def _batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  return {
    "image": jnp.asarray(rng.normal(size=(n, 28, 28, 1)), jnp.float32),
    "label": jnp.asarray(rng.integers(0, 10, n), jnp.int32),
  }


def _setup(c, total=20):
  students, teacher = build.build_specs(c, total)
  state = joint.init_state(students, teacher, c.seed, jnp.zeros((1, 28, 28, 1)))
  step = jax.jit(
    functools.partial(
      joint.train_step, students=students, teacher=teacher, distill=build.distill_spec(c)
    )
  )
  return students, teacher, state, step


def _leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.heavy
def test_same_seed_gives_same_parameters_and_other_seed_differs():
  c = _config()
  runs = []
  for seed in (0, 0, 1):
    c.seed = seed
    _, _, state, step = _setup(c)
    for _ in range(3):
      state, _ = step(state, _batch())
    runs.append(state.students[0].params)
  assert _leaves_equal(runs[0], runs[1])
  assert not _leaves_equal(runs[0], runs[2])


@pytest.mark.heavy
def test_one_device_and_four_devices_give_the_same_loss():
  assert jax.device_count() == 4, "tests run with 4 fake CPU devices (conftest.py)"
  c = _config()
  students, teacher = build.build_specs(c, 20)
  losses = {}
  for n in (1, 4):
    mesh = jax.make_mesh(
      (n,), ("data",), devices=jax.devices()[:n], axis_types=(jax.sharding.AxisType.Auto,)
    )
    repl, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    state = jax.device_put(joint.init_state(students, teacher, 0, jnp.zeros((1, 28, 28, 1))), repl)
    step = jax.jit(
      functools.partial(joint.train_step, students=students),
      in_shardings=(repl, data),
      out_shardings=(repl, repl),
    )
    out = []
    for i in range(3):
      state, m = step(state, jax.device_put(_batch(16, i), data))
      out.append(float(m["train_loss"]))
    losses[n] = out
  np.testing.assert_allclose(losses[1], losses[4], rtol=2e-5)


@pytest.mark.heavy
def test_schedule_phases_and_stochastic_draws_never_recompile():
  c = _config()
  c.schedule.kind = "progressive+two_stage+stochastic"
  c.distill.enabled = True
  c.distill.extra_students = ((4, 4),)
  _, _, state, step = _setup(c, total=24)
  before = joint.TRACE_COUNTS["train_step"]
  bits = set()
  for _ in range(24):
    state, m = step(state, _batch())
    bits.add((float(m["weight_bits"]), float(m["act_bits"])))
  assert joint.TRACE_COUNTS["train_step"] - before == 1
  assert step._cache_size() == 1
  assert {(32, 32), (8, 32), (8, 8), (4, 8), (4, 4), (2, 4), (2, 2)} <= bits


# ----------------------------------------------------------------------------- distillation


@pytest.mark.heavy
def test_zero_distillation_weights_equal_independent_steps():
  c = _config(student_kl=0.0, teacher_kl=0.0, student_ce=1.0, teacher_ce=1.0)
  _, _, joint_state, step = _setup(c)
  # The same networks trained alone: the student by itself, the teacher as a W32A32 student.
  solo = _config()
  _, _, s_state, s_step = _setup(solo)
  fp = _config()
  fp.quant.weight_bits = fp.quant.act_bits = 32
  fp.quant.keep_first_last_fp = False
  _, _, t_state, t_step = _setup(fp)
  s_state = s_state.replace(students=joint_state.students)
  t_state = t_state.replace(students=(joint_state.teacher,))
  for i in range(3):
    joint_state, _ = step(joint_state, _batch(seed=i))
    s_state, _ = s_step(s_state, _batch(seed=i))
    t_state, _ = t_step(t_state, _batch(seed=i))
  for a, b in [
    (joint_state.students[0].params, s_state.students[0].params),
    (joint_state.teacher.params, t_state.students[0].params),
  ]:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_kl_matches_a_hand_computation():
  s = jnp.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
  t = jnp.array([[0.3, 0.1, 2.0], [1.0, 1.0, 1.0]])
  for temp in (1.0, 4.0):
    ps = np.exp(np.asarray(s) / temp) / np.exp(np.asarray(s) / temp).sum(-1, keepdims=True)
    pt = np.exp(np.asarray(t) / temp) / np.exp(np.asarray(t) / temp).sum(-1, keepdims=True)
    hand = temp**2 * np.mean(np.sum(pt * np.log(pt / ps), -1))
    np.testing.assert_allclose(joint.distill_kl(s, t, temp), hand, rtol=1e-5)


@pytest.mark.heavy
def test_no_distillation_gradient_reaches_the_target_side():
  s, t = jnp.array([[1.0, 2.0, 0.5]]), jnp.array([[0.3, 0.1, 2.0]])
  g_s, g_t = jax.grad(lambda s, t: joint.distill_kl(s, t, 2.0), argnums=(0, 1))(s, t)
  assert np.abs(g_s).sum() > 0 and np.all(g_t == 0)
  # In the joint_state step: the teacher's update with teacher_ce=0 comes only from its KL to the
  # students; its gradient must not depend on the student loss weights.
  grads = {}
  for student_kl in (0.0, 5.0):
    c = _config(teacher_ce=0.0, teacher_kl=1.0, student_kl=student_kl)
    _, _, state, step = _setup(c)
    new, _ = step(state, _batch())
    grads[student_kl] = jax.tree.map(lambda a, b: a - b, new.teacher.params, state.teacher.params)
  for a, b in zip(jax.tree.leaves(grads[0.0]), jax.tree.leaves(grads[5.0])):
    np.testing.assert_array_equal(a, b)


def test_frozen_teacher_never_changes(tmp_path):
  c2 = _config(enabled=True)
  students, teacher = build.build_specs(c2, 20)
  teacher = dataclasses.replace(teacher, frozen=True)
  state = joint.init_state(students, teacher, 0, jnp.zeros((1, 28, 28, 1)))
  step = jax.jit(
    functools.partial(
      joint.train_step, students=students, teacher=teacher, distill=joint.DistillSpec()
    )
  )
  new = state
  for i in range(3):
    new, m = step(new, _batch(seed=i))
  assert _leaves_equal(new.teacher, state.teacher)
  assert not _leaves_equal(new.students[0].params, state.students[0].params)
  assert "teacher_train_loss" not in m and "kl_student" in m


@pytest.mark.heavy
def test_two_students_update_independently():
  c = _config(extra_students=((4, 4),))
  _, _, state, step = _setup(c)
  new, m = step(state, _batch())
  assert float(m["weight_bits"]) == 2 and float(m["student1_weight_bits"]) == 4
  # Perturbing student 0 changes its own update and the teacher's (which learns from both),
  # but not student 1's: students only see the teacher, through a stop-gradient.
  s0 = state.students[0]
  moved = s0.replace(params=jax.tree.map(lambda p: p * 1.5, s0.params))
  new2, _ = step(state.replace(students=(moved, state.students[1])), _batch())
  assert _leaves_equal(new.students[1], new2.students[1])
  assert not _leaves_equal(new.teacher.params, new2.teacher.params)


@pytest.mark.heavy
def test_hint_term_trains_students_only():
  updates = {}
  for weight in (0.0, 1.0):
    c = _config(hint_weight=weight)
    _, _, state, step = _setup(c)
    new, m = step(state, _batch())
    updates[weight] = new
  assert float(m["hint_loss"]) > 0
  # The hint changes the students' update but not the teacher's (stop-gradient on f_t).
  assert not _leaves_equal(updates[0.0].students[0].params, updates[1.0].students[0].params)
  assert _leaves_equal(updates[0.0].teacher.params, updates[1.0].teacher.params)


def test_bfloat16_compute_keeps_float32_master_weights_and_statistics():
  c = _config()
  c.dtype = "bfloat16"
  _, _, state, step = _setup(c)
  new, m = step(state, _batch())
  assert np.isfinite(float(m["train_loss"]))
  dtypes = {x.dtype for x in jax.tree.leaves((new.students[0].params, new.students[0].batch_stats))}
  assert dtypes == {jnp.dtype("float32")}
