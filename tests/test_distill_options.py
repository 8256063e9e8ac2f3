"""The options the distillation experiments need: a training subset, a width multiplier,
the released code's plain-ReLU teacher and a CE-only warm-up (issue: where joint KD helps)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from qnet.data import input_pipeline as ip
from qnet.data.datasets import DATASETS, DataError
from qnet.quant import precision as precision_lib
from qnet.train import build, config_validation, joint


def _config(**fields):
  c = default.get_config()
  c.model = "tiny_cnn"
  c.quant.weight_bits = c.quant.act_bits = 2
  for k, v in fields.items():
    node = c
    *path, leaf = k.split("__")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def _kernel_shapes(model, x):
  init = functools.partial(model.init, train=False)
  params = jax.eval_shape(init, jax.random.key(0), x)["params"]
  return {k: v["kernel"].shape for k, v in params.items() if "kernel" in v}


def _validate(c):
  config_validation.validate(c, device_count=4, reference=default.get_config())


# ----------------------------------------------------------------------------- model_width


def test_model_width_scales_every_conv_and_the_hidden_layer():
  x = jnp.zeros((1, 28, 28, 1))
  base = _kernel_shapes(build.build_specs(_config(model="fmnist_cnn"), 10)[0][0].model, x)
  half = _kernel_shapes(
    build.build_specs(_config(model="fmnist_cnn", model_width=0.5), 10)[0][0].model, x
  )
  assert base["stem"] == (3, 3, 1, 32) and half["stem"] == (3, 3, 1, 16)
  assert base["conv3_1"] == (3, 3, 64, 128) and half["conv3_1"] == (3, 3, 32, 64)
  assert base["fc"][1] == 256 and half["fc"][1] == 128
  assert half["head"][1] == base["head"][1] == 10  # the classes never scale


def test_teacher_width_builds_a_wider_teacher_and_leaves_the_student():
  c = _config(model="fmnist_cnn", distill__enabled=True, distill__teacher_width=2.0)
  students, teacher = build.build_specs(c, 10)
  x = jnp.zeros((1, 28, 28, 1))
  assert _kernel_shapes(students[0].model, x)["stem"] == (3, 3, 1, 32)
  assert _kernel_shapes(teacher.model, x)["stem"] == (3, 3, 1, 64)
  c.distill.teacher_width = -1.0  # the student's width
  c.model_width = 0.5
  students, teacher = build.build_specs(c, 10)
  assert _kernel_shapes(teacher.model, x)["stem"] == (3, 3, 1, 16)


def test_width_is_refused_for_a_model_without_one():
  with pytest.raises(config_validation.ConfigError, match=r"config.model_width=2.0 is invalid; "
                     r"allowed: 1.0 for model 'resnet20'; other widths only for fmnist_cnn"):
    _validate(_config(model="resnet20", model_width=2.0))
  with pytest.raises(config_validation.ConfigError, match="config.model_width=0.0 is invalid"):
    _validate(_config(model_width=0.0))
  with pytest.raises(config_validation.ConfigError, match="config.distill.teacher_width=3.0"):
    _validate(_config(model="resnet20", distill__enabled=True, distill__teacher_width=3.0))
  _validate(_config(model="fmnist_cnn", model_width=0.25, distill__teacher_width=4.0))


def test_a_width_checkpoint_does_not_resume_under_another_width():
  from qnet.train import checkpointing

  c = _config(model="fmnist_cnn", model_width=2.0)
  students, teacher = build.build_specs(c, 10)
  wide = build.run_meta(c, students, teacher)
  c.model_width = 1.0
  plain = build.run_meta(c, *build.build_specs(c, 10))
  assert "model_width" not in plain  # checkpoints from before the field still resume
  with pytest.raises(checkpointing.IncompatibleCheckpointError, match="model_width: checkpoint"):
    checkpointing.check_compatible(wide, plain)


def test_residual_bits_is_refused_outside_the_preact_resnets_and_its_checkpoints_keep_to_it():
  from qnet.train import checkpointing

  with pytest.raises(config_validation.ConfigError, match=r"config.quant.residual_bits=4 is invalid; "
                     r"allowed: 32 \(a float residual stream\) or 8 \(int8\)"):
    _validate(_config(model="resnet20", quant__residual_bits=4))
  with pytest.raises(config_validation.ConfigError, match=r"config.quant.residual_bits=8 is invalid; "
                     r"allowed: 32 for model 'tiny_cnn'; 8 only for resnet18, resnet20"):
    _validate(_config(quant__residual_bits=8))
  c = _config(model="tiny_resnet", quant__residual_bits=8, distill__enabled=True, distill__teacher_model="tiny_cnn")
  _validate(c)
  students, teacher = build.build_specs(c, 10)  # a teacher of another family: a float stream
  assert "residual_bits" not in {f for f in type(teacher.model).__dataclass_fields__}
  stream = build.run_meta(c, students, teacher)
  c.quant.residual_bits = 32
  plain = build.run_meta(c, *build.build_specs(c, 10))
  assert "residual_bits" not in plain
  with pytest.raises(checkpointing.IncompatibleCheckpointError, match="residual_bits: checkpoint"):
    checkpointing.check_compatible(stream, plain)


# ----------------------------------------------------------------------------- teacher_act


def test_relu_teacher_is_the_plain_network_and_clip_teacher_clips():
  x = jnp.linspace(-3.0, 3.0, 2 * 28 * 28).reshape(2, 28, 28, 1)
  outs = {}
  for act in ("clip", "relu"):
    c = _config(distill__enabled=True, distill__teacher_act=act)
    students, teacher = build.build_specs(c, 10)
    assert students[0].model.act == "quant"  # the students keep their quantizers
    assert teacher.model.act == ("relu" if act == "relu" else "quant")
    v = teacher.model.init(jax.random.key(0), x, train=False)
    prec = precision_lib.full_precision(teacher.layout)
    outs[act] = teacher.model.apply({**v, "precision": prec}, x, train=False)
  # Same weights; the stem's outputs exceed 1, where DoReFa's 32-bit activation clips and
  # a ReLU does not.
  assert not np.allclose(outs["clip"], outs["relu"])
  with pytest.raises(config_validation.ConfigError, match="distill.teacher_act='gelu'"):
    _validate(_config(distill__enabled=True, distill__teacher_act="gelu"))


# ----------------------------------------------------------------------------- kd_warmup


def test_kd_warmup_trains_on_ce_alone_then_distills_in_one_compiled_step():
  c = _config(distill__enabled=True, distill__kd_warmup=0.3)
  total = 10
  students, teacher = build.build_specs(c, total)
  d = build.distill_spec(c, total)
  assert d.kd_warmup_steps == 3
  state = joint.init_state(students, teacher, 0, jnp.zeros((1, 28, 28, 1)))
  joint.TRACE_COUNTS["train_step"] = 0
  step = jax.jit(functools.partial(joint.train_step, students=students, teacher=teacher, distill=d))
  rng = np.random.default_rng(0)
  for i in range(5):
    batch = {
      "image": jnp.asarray(rng.normal(size=(8, 28, 28, 1)), jnp.float32),
      "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32),
    }
    state, m = step(state, batch)
    s_kd = 0.7 * m["train_ce"] + 0.7 * m["kl_student"]
    t_kd = 1.0 * m["teacher_train_ce"] + 0.5 * m["kl_teacher"]
    assert m["kl_student"] > 0 and m["kl_teacher"] > 0
    if i < 3:
      np.testing.assert_allclose(m["train_loss"], m["train_ce"], rtol=1e-6)
      np.testing.assert_allclose(m["teacher_train_loss"], m["teacher_train_ce"], rtol=1e-6)
    else:
      np.testing.assert_allclose(m["train_loss"], s_kd, rtol=1e-5)
      np.testing.assert_allclose(m["teacher_train_loss"], t_kd, rtol=1e-5)
  assert joint.TRACE_COUNTS["train_step"] == 1
  with pytest.raises(config_validation.ConfigError, match="config.distill.kd_warmup=1.0"):
    _validate(_config(distill__enabled=True, distill__kd_warmup=1.0))


# ----------------------------------------------------------------------------- train_examples


def _raw_index(images: np.ndarray) -> set[int]:
  # The fake data set's images are constant = example index (conftest.fake_data_dir).
  spec = DATASETS["fashion_mnist"]
  raw = (images[:, 0, 0, 0] * spec.std[0] + spec.mean[0]) * 255.0
  return set(np.round(raw).astype(int).tolist())


def test_train_examples_trains_on_the_first_n_examples_only(fake_data_dir):
  assert ip.steps_per_epoch("fashion_mnist", 4, fake_data_dir, train_examples=16) == 4
  it = ip.create_train_iterator(
    "fashion_mnist",
    global_batch_size=4,
    seed=3,
    data_dir=fake_data_dir,
    augment=False,
    train_examples=16,
    process_index=0,
    process_count=1,
  )
  seen = [next(it)["image"] for _ in range(8)]  # two epochs of the subset
  first, second = _raw_index(np.concatenate(seen[:4])), _raw_index(np.concatenate(seen[4:]))
  subset = set(
    int(e["image"][0, 0, 0])
    for e in ip.get_builder("fashion_mnist", fake_data_dir).as_dataset(split="train[:16]").as_numpy_iterator()
  )  # fmt: skip
  assert first == second == subset and len(subset) == 16


def test_train_examples_beyond_the_split_is_one_data_error(fake_data_dir):
  with pytest.raises(DataError, match=r"config.train_examples=51 is more than the 50 examples"):
    ip.steps_per_epoch("fashion_mnist", 4, fake_data_dir, train_examples=51)
  with pytest.raises(config_validation.ConfigError, match="config.train_examples=0 is invalid"):
    _validate(_config(train_examples=0))
