"""Every shipped config, and every paper recipe, validates and traces a train step.

The recipes are for GPU/TPU clusters and are never trained in CI; this checks, without
data or compute (`jax.eval_shape`), that each one is accepted by the CLI's validation and
that its students, teacher and joint train step build at the recipe's input shape.
"""

import functools
import importlib
import pathlib

import jax
import jax.numpy as jnp
import pytest

from configs import default, paper_recipes
from qnet import build, config_validation, joint

_FILES = sorted(
  p.stem
  for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py")
  if p.stem not in ("__init__", "paper_recipes")
)
_CASES = [(f, None) for f in _FILES] + [("paper_recipes", v) for v in paper_recipes.VARIANTS]


def _load(name: str, variant: str | None):
  module = importlib.import_module(f"configs.{name}")
  return module.get_config() if variant is None else module.get_config(variant)


@pytest.mark.parametrize("name,variant", _CASES, ids=[v or f for f, v in _CASES])
def test_config_validates_and_its_train_step_traces(name, variant):
  c = _load(name, variant)
  config_validation.validate(c, device_count=4, reference=default.get_config())
  students, teacher = build.build_specs(c, total_steps=1000)
  assert (teacher is not None) == bool(c.distill.enabled)
  shape = build.input_shape(c)
  state = jax.eval_shape(
    functools.partial(joint.init_state, students, teacher, c.seed),
    jax.ShapeDtypeStruct((1, *shape), jnp.float32),
  )
  batch = {
    "image": jax.ShapeDtypeStruct((4, *shape), jnp.float32),
    "label": jax.ShapeDtypeStruct((4,), jnp.int32),
  }
  # The trainer's own jitted, sharded step, traced only.
  p_train, _ = build.compile_steps(build.create_mesh(), students, teacher, build.distill_spec(c))
  new_state, metrics = jax.eval_shape(p_train, state, batch)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert metrics["train_loss"].shape == ()


def test_unknown_recipe_lists_the_variants():
  with pytest.raises(ValueError, match="unknown variant; allowed: cifar100_resnet20_kd, "):
    paper_recipes.get_config("imagenet_resnet34_w4")
