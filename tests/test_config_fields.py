"""Each configs/default.py field reaches what it sets: config -> build / loop -> the spec,
schedule, optimiser, iterator or checkpoint manager that acts on it. What each of those then
does with the value is pinned elsewhere (tests/README.md has the field -> test table)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import default
from qnet.data import input_pipeline
from qnet.models import layers
from qnet.train import build, checkpointing, joint, loop


def _config(**over):
  c = default.get_config()
  c.model = "tiny_cnn"
  c.update_from_flattened_dict(over)
  return c


def _leaf(tree, path):
  return functools.reduce(lambda d, k: d[k], path, tree)


# ----------------------------------------------------------------------------- data and budget


def test_data_fields_reach_the_train_and_eval_iterators(monkeypatch):
  seen = {}

  def fake(kind):
    def make(dataset, **kwargs):
      seen[kind] = {"dataset": dataset, **kwargs}
      n = 4
      return iter([{"image": np.zeros((n, 8, 8, 3), np.float32), "mask": np.ones(n)}])

    return make

  monkeypatch.setattr(input_pipeline, "create_train_iterator", fake("train"))
  monkeypatch.setattr(input_pipeline, "create_eval_iterator", fake("eval"))
  c = _config(
    dataset="cifar10",
    data_dir="/d",
    augment=False,
    image_size=8,
    seed=7,
    batch_size=4,
    train_examples=20,
  )
  sharding = NamedSharding(build.create_mesh(), P("data"))
  next(loop.train_batches(c, 5, sharding))
  assert seen["train"] == {
    "dataset": "cifar10",
    "global_batch_size": 4,
    "seed": 7,
    "start_step": 5,
    "data_dir": "/d",
    "augment": False,
    "image_size": 8,
    "train_examples": 20,
  }
  # Evaluation: the same data fields; the metrics are the batch sums over the count.
  sums = lambda state, batch: {"eval_count": jnp.float32(4), "eval_accuracy": jnp.float32(3)}
  assert loop.evaluate(sums, None, c, sharding) == {"eval_accuracy": 0.75, "eval_examples": 4}
  assert seen["eval"] == {
    "dataset": "cifar10",
    "global_batch_size": 4,
    "data_dir": "/d",
    "image_size": 8,
  }
  # "" and 0 are the defaults: TFDS's data dir, the dataset's native size.
  next(loop.train_batches(_config(dataset="cifar10", batch_size=4), 0, sharding))
  assert seen["train"]["data_dir"] is None and seen["train"]["image_size"] is None


def test_dataset_and_image_size_set_the_input_shape_and_classes():
  assert build.input_shape(_config(dataset="cifar100")) == (32, 32, 3)
  assert build.input_shape(_config(dataset="cifar10", image_size=24)) == (24, 24, 3)
  assert build.input_shape(_config()) == (28, 28, 1)
  (spec,), _ = build.build_specs(_config(dataset="cifar100"), 10)
  assert spec.model.num_classes == 100


def test_budget_fields_set_the_number_of_steps(monkeypatch):
  calls = []
  monkeypatch.setattr(input_pipeline, "steps_per_epoch", lambda *a: calls.append(a) or 10)
  assert loop.total_train_steps(_config(num_epochs=2.5, batch_size=64)) == (25, 10)
  assert calls[-1] == ("fashion_mnist", 64, None, -1)
  assert loop.total_train_steps(_config(num_train_steps=7, train_examples=30)) == (7, 10)
  assert calls[-1] == ("fashion_mnist", 128, None, 30)  # epochs over the subset


def test_periodic_fields_decide_what_each_step_does():
  c = _config(checkpoint_every_steps=4, log_every_steps=3, eval_every_steps=5)
  every = loop.eval_interval(c, steps_per_epoch=6)
  assert every == 5 and loop.eval_interval(_config(), steps_per_epoch=6) == 6
  dues = [loop.due(s, 12, c, every, stop=False) for s in range(1, 13)]
  steps = lambda what: [s for s, d in enumerate(dues, 1) if getattr(d, what)]
  assert steps("checkpoint") == [4, 8, 12]
  assert steps("evaluate") == [5, 10, 12]
  assert steps("log") == [3, 4, 6, 8, 9, 12]  # and before every checkpoint


def test_keep_checkpoints_and_init_from_reach_the_run(tmp_path):
  c = _config(keep_checkpoints=2, seed=1)
  students, _ = build.build_specs(c, 10)
  mesh = build.create_mesh()
  manager, state, resumed = loop.initial_state(c, str(tmp_path / "a"), students, None, mesh, {})
  assert not resumed
  for step in (1, 2, 3):
    checkpointing.save(manager, step, state, {})
    manager.wait_until_finished()
  assert manager.all_steps() == [2, 3]
  # init_from: a fresh run starts from that run's first student (its weights).
  other = _config(init_from=str(tmp_path / "a"), seed=2)
  _, fresh, _ = loop.initial_state(other, str(tmp_path / "b"), students, None, mesh, {})
  plain = _config(seed=2)
  _, unloaded, _ = loop.initial_state(plain, str(tmp_path / "c"), students, None, mesh, {})
  kernel = ("stem", "kernel")
  want = _leaf(state.students[0].params, kernel)
  np.testing.assert_array_equal(_leaf(fresh.students[0].params, kernel), want)
  assert not np.array_equal(_leaf(unloaded.students[0].params, kernel), want)
  # distill.teacher_from: the frozen teacher is that run's first student; students stay fresh.
  d = _config(seed=2, **{"distill.enabled": True, "distill.teacher_from": str(tmp_path / "a")})
  d_students, d_teacher = build.build_specs(d, 10)
  _, distilled, _ = loop.initial_state(d, str(tmp_path / "d"), d_students, d_teacher, mesh, {})
  np.testing.assert_array_equal(_leaf(distilled.teacher.params, kernel), want)
  assert not np.array_equal(_leaf(distilled.students[0].params, kernel), want)


# ----------------------------------------------------------------------------- model


def test_model_fields_reach_the_model():
  (spec,), _ = build.build_specs(
    _config(
      model="tiny_resnet",
      model_act="relu",
      dtype="bfloat16",
      **{"quant.weight_bits": 32, "quant.act_bits": 32},
    ),
    10,
  )
  assert spec.model.act == "relu" and spec.model.dtype == jnp.bfloat16
  assert spec.model.stage_sizes == (1, 1)  # tiny_resnet's
  (spec,), _ = build.build_specs(
    _config(**{"quant.weight_quantizer": "lsq", "quant.act_quantizer": "pact"}), 10
  )
  assert (spec.model.weight_quantizer, spec.model.act_quantizer) == ("lsq", "pact")


# ----------------------------------------------------------------------------- optimiser


def _updates(c, grads=(1.0, 1.0)):
  """The first student's optimiser updates for constant gradients, kernel and bias."""
  (spec,), _ = build.build_specs(c, 10)
  params = {"k": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0)}}
  opt = spec.tx.init(params)
  out = []
  for g in grads:
    u, opt = spec.tx.update(jax.tree.map(lambda p: jnp.full_like(p, g), params), opt, params)
    out.append((float(u["k"]["kernel"][0, 0]), float(u["k"]["bias"][0])))
  return out


def test_momentum_nesterov_and_weight_decay_reach_the_optimiser():
  plain = dict(momentum=0.5, weight_decay=0.0)
  assert _updates(_config(**plain)) == [(1.0, 1.0), (1.5, 1.5)]
  # Nesterov: g + momentum * buffer.
  assert _updates(_config(nesterov=True, **plain)) == [(1.5, 1.5), (1.75, 1.75)]
  # Decay on kernels only: 0.25 * 2.0 added to the kernel's gradient.
  assert _updates(_config(momentum=0.0, weight_decay=0.25), grads=(0.0,)) == [(0.5, 0.0)]


def test_clip_decay_reaches_the_learned_levels():
  c = _config(
    momentum=0.0,
    weight_decay=0.0,
    **{"quant.act_quantizer": "pact", "quant.weight_quantizer": "lsq", "quant.clip_decay": 0.1},
  )
  (spec,), _ = build.build_specs(c, 10)
  params = {"k": {layers.ACT_CLIP: jnp.float32(3.0), layers.WEIGHT_CLIP: jnp.float32(2.0)}}
  u, _ = spec.tx.update(jax.tree.map(jnp.zeros_like, params), spec.tx.init(params), params)
  np.testing.assert_allclose([u["k"][layers.ACT_CLIP], u["k"][layers.WEIGHT_CLIP]], [0.3, 0.2])


def test_learning_rate_fields_reach_every_student():
  c = _config(
    learning_rate=0.2,
    lr_schedule="step",
    warmup_steps=2,
    lr_step_at=(0.25,),
    lr_step_factor=0.5,
    **{"distill.enabled": True, "distill.extra_students": ((4, 4),)},
  )
  students, _ = build.build_specs(c, 22)
  for spec in students:
    lr = [float(spec.lr_fn(jnp.int32(s))) for s in (0, 1, 5, 6)]
    # Warm-up (s + 1) / 2; the drop at 25% of the run's 22 steps (step / 22 >= 0.25).
    np.testing.assert_allclose(lr, [0.1, 0.2, 0.2, 0.1], rtol=1e-6)
  # cosine: half the base rate half-way.
  (spec,), _ = build.build_specs(_config(learning_rate=0.2), 20)
  np.testing.assert_allclose(spec.lr_fn(jnp.int32(10)), 0.1, rtol=1e-6)
  (spec,), _ = build.build_specs(_config(learning_rate=0.2, lr_schedule="constant"), 20)
  np.testing.assert_allclose(spec.lr_fn(jnp.int32(19)), 0.2, rtol=1e-6)


# ----------------------------------------------------------------------------- precision


def test_quant_and_schedule_fields_reach_the_students_schedule():
  c = _config(
    **{
      "quant.weight_bits": 3,
      "quant.act_bits": 5,
      "schedule.kind": "two_stage+stochastic",
      "schedule.two_stage_at": 0.25,
      "schedule.sp_ratios": (0.5, 1.0),
      "schedule.sp_ramp": "linear",
      "schedule.sp_unit": "block",
      "schedule.sp_separate": True,
      "schedule.reset_momentum": True,
    }
  )
  (spec,), _ = build.build_specs(c, 100)
  s = spec.schedule
  assert s.starts == (0, 25) and s.weight_bits == (3, 3) and s.act_bits == (32, 5)
  assert s.stochastic and s.sp_ratios == (0.5, 1.0)
  assert (s.sp_ramp, s.sp_unit, s.sp_separate) == ("linear", "block", True)
  assert spec.reset_momentum and s.keep_first_last_fp
  # keep_first_last_fp: the stem stays at 32 bits, or is quantized too.
  for keep, stem in ((True, 32.0), (False, 3.0)):
    over = {"quant.weight_bits": 3, "quant.keep_first_last_fp": keep}
    (spec,), _ = build.build_specs(_config(**over), 10)
    tree = spec.schedule.deterministic(spec.layout, jnp.int32(0))
    assert float(tree["stem"]["weight_bits"]) == stem
  # Explicit phases override the kind; progressive follows its ladder.
  (spec,), _ = build.build_specs(_config(**{"schedule.phases": ((0, 8, 8), (5, 2, 2))}), 10)
  assert spec.schedule.starts == (0, 5) and spec.schedule.weight_bits == (8, 2)
  over = {"schedule.kind": "progressive", "schedule.ladder": (32, 4), "quant.weight_bits": 4}
  c = _config(**over)
  (spec,), _ = build.build_specs(c, 10)
  assert spec.schedule.weight_bits == (32, 4)


def test_lr_restart_restarts_the_rate_at_each_phase():
  over = {"learning_rate": 1.0, "schedule.kind": "two_stage", "schedule.lr_restart": True}
  (spec,), _ = build.build_specs(_config(**over), 20)
  lr = [spec.lr_fn(jnp.int32(s)) for s in (0, 5, 10)]
  np.testing.assert_allclose(lr, [1, 0.5, 1], atol=1e-6)
  (spec,), _ = build.build_specs(_config(**over | {"schedule.lr_restart": False}), 20)
  np.testing.assert_allclose(spec.lr_fn(jnp.int32(10)), 0.5, atol=1e-6)


# ----------------------------------------------------------------------------- distillation


def test_distill_fields_reach_the_teacher_students_and_losses():
  d = {
    "distill.enabled": True,
    "distill.temperature": 3.0,
    "distill.student_ce": 0.1,
    "distill.student_kl": 0.2,
    "distill.teacher_ce": 0.3,
    "distill.teacher_kl": 0.4,
    "distill.hint_weight": 0.5,
    "distill.teacher_model": "tiny_resnet",
    "distill.extra_students": ((8, 8), (2, 2)),
  }
  c = _config(**d)
  students, teacher = build.build_specs(c, 10)
  assert build.distill_spec(c) == joint.DistillSpec(3.0, 0.1, 0.2, 0.3, 0.4, 0.5)
  assert [s.schedule.weight_bits[-1] for s in students] == [4, 8, 2]
  assert teacher.model.stage_sizes == (1, 1) and not teacher.frozen  # tiny_resnet
  assert build.distill_spec(_config()) is None
  assert build.build_specs(_config(), 10)[1] is None
  # extra_students need distillation; teacher_from freezes the teacher.
  assert len(build.build_specs(_config(**{"distill.extra_students": ((8, 8),)}), 10)[0]) == 1
  frozen = build.build_specs(_config(**{"distill.enabled": True, "distill.teacher_from": "/w"}), 10)
  assert frozen[1].frozen
