"""train_and_evaluate end to end on mock data: loss, metrics, checkpoints, resume, compiles."""

import os
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import default
from qnet.train import build, checkpointing, joint, loop, metrics_io


def mock_config(**overrides):
  c = default.get_config()
  c.dataset = "cifar10"
  c.model = "tiny_cnn"
  c.batch_size = 16
  c.num_train_steps = 12
  c.eval_every_steps = 6
  c.checkpoint_every_steps = 6
  c.log_every_steps = 3
  c.learning_rate = 0.05
  c.quant.weight_bits = c.quant.act_bits = 4
  c.update_from_flattened_dict(overrides)
  return c


_SAVE = checkpointing.save


def _save_and_wait(manager, step, state, meta):
  _SAVE(manager, step, state, meta)
  manager.wait_until_finished()


def run(config, workdir, stop_at_step=None):
  # tfds's mock_data patches file opens process-wide while it builds a dataset, so an orbax
  # commit finishing in the background at that moment writes into the mock's temp dir (seen
  # once under load). Synchronous saves close that window; the CLI tests keep async saves.
  with (
    tfds.testing.mock_data(num_examples=64),
    mock.patch.object(checkpointing, "save", _save_and_wait),
  ):
    return loop.train_and_evaluate(config, str(workdir), stop_at_step)


def saved_state(config, workdir):
  with tfds.testing.mock_data(num_examples=64):
    students, teacher = build.build_specs(config, loop.total_train_steps(config)[0])
  state = joint.init_state(students, teacher, 0, jnp.zeros((1, 32, 32, 3)))
  with tfds.testing.mock_data(num_examples=64):
    meta = build.run_meta(config, students, teacher)
  _, (step, restored) = checkpointing.restore_latest(
    str(workdir), checkpointing.abstract_like(state), meta
  )
  return step, restored


@pytest.mark.slow
def test_train_and_eval_loss_goes_down_and_metrics_are_written(tmp_path):
  c = mock_config(num_train_steps=60, eval_every_steps=30, log_every_steps=10)
  result = run(c, tmp_path)
  rows = metrics_io.read_jsonl(tmp_path / "metrics.jsonl")
  train_rows = [r for r in rows if "train_loss" in r]
  evals = [r for r in rows if "eval_accuracy" in r]
  assert train_rows[-1]["train_loss"] < 0.8 * train_rows[0]["train_loss"]
  assert [r["step"] for r in evals] == [30, 60]
  assert 0.0 <= result["eval_accuracy"] <= 1.0 and result["eval_examples"] == 64
  assert {"steps_per_sec", "weight_bits", "act_bits", "quantized_fraction", "learning_rate"} <= set(
    train_rows[-1]
  )
  assert os.listdir(tmp_path / "checkpoints")
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
  # Joint distillation too: teacher, student and their optimiser states all resume.
  c = mock_config(**{"schedule.kind": "two_stage+stochastic", "distill.enabled": True})
  run(c, tmp_path / "full")
  # Interrupted at step 5 (inside the first phase, between checkpoints), resumed into the
  # second phase. Note 12 steps of batch 16 over 64 examples also cross epoch boundaries.
  run(c, tmp_path / "split", stop_at_step=5)
  assert saved_state(c, tmp_path / "split")[0] == 5
  run(c, tmp_path / "split")
  step_a, a = saved_state(c, tmp_path / "full")
  step_b, b = saved_state(c, tmp_path / "split")
  assert step_a == step_b == 12
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_checkpoint_save_then_restore_is_equal(tmp_path):
  c = mock_config(**{"distill.enabled": True})
  students, teacher = build.build_specs(c, 10)
  state = joint.init_state(students, teacher, 3, jnp.zeros((1, 32, 32, 3)))
  state = state.replace(step=jnp.int32(7))
  manager = checkpointing.create_manager(str(tmp_path))
  checkpointing.save(manager, 7, state, {"model": "tiny_cnn"})
  manager.wait_until_finished()
  fresh = joint.init_state(students, teacher, 0, jnp.zeros((1, 32, 32, 3)))
  _, (step, restored) = checkpointing.restore_latest(
    str(tmp_path), checkpointing.abstract_like(fresh), {"model": "tiny_cnn"}
  )
  assert step == 7 and int(restored.step) == 7
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_full_schedule_run_compiles_train_and_eval_once(tmp_path):
  c = mock_config(
    **{
      "schedule.kind": "progressive+two_stage+stochastic",
      "num_train_steps": 16,
      "eval_every_steps": 4,
      "distill.enabled": True,
    }
  )
  before = dict(joint.TRACE_COUNTS)
  run(c, tmp_path)
  assert joint.TRACE_COUNTS["train_step"] - before.get("train_step", 0) == 1
  assert joint.TRACE_COUNTS["eval_step"] - before.get("eval_step", 0) == 1
  rows = metrics_io.read_jsonl(tmp_path / "metrics.jsonl")
  assert {"teacher_eval_accuracy", "eval_accuracy", "kl_teacher", "kl_student"} <= set().union(
    *rows
  )
  assert len({r["weight_bits"] for r in rows if "weight_bits" in r}) >= 3
  # The compile counts the run writes for benchmarks are these same single compiles.
  compiles = [r for r in rows if "train_step_compiles" in r]
  assert compiles == [{"step": 16, "train_step_compiles": 1.0, "eval_step_compiles": 1.0}]


@pytest.mark.slow
def test_init_from_loads_weights_with_a_fresh_optimizer_and_rejects_other_shapes(tmp_path):
  c = mock_config(num_train_steps=6)
  run(c, tmp_path / "a")
  _, trained = saved_state(c, tmp_path / "a")
  c2 = mock_config(**{"distill.enabled": True})
  with tfds.testing.mock_data(num_examples=64):
    students, teacher = build.build_specs(c2, 12)
  fresh = joint.init_state(students, teacher, 1, jnp.zeros((1, 32, 32, 3)))
  loaded = loop.load_students_from(str(tmp_path / "a"), fresh, teacher_too=True)
  for net in (loaded.students[0], loaded.teacher):
    for x, y in zip(jax.tree.leaves(net.params), jax.tree.leaves(trained.students[0].params)):
      np.testing.assert_array_equal(x, y)
  assert all(float(jnp.abs(x).sum()) == 0 for x in jax.tree.leaves(loaded.students[0].opt_state))
  c3 = mock_config(model="tiny_resnet")
  with tfds.testing.mock_data(num_examples=64):
    students, teacher = build.build_specs(c3, 12)
  other = joint.init_state(students, teacher, 1, jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="init_from=.*do not match the model"):
    loop.load_students_from(str(tmp_path / "a"), other, teacher_too=False)
