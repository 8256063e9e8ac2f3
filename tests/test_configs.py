"""Every shipped config, and every paper recipe, validates and traces a train step.

The recipes are for GPU/TPU clusters and are never trained in CI; this checks, without
data or compute (`jax.eval_shape`), that each one is accepted by the CLI's validation and
that its students, teacher and joint train step build at the recipe's input shape.
"""

import ast
import functools
import importlib
import pathlib
import re
import shlex
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import default, fashion_mnist_kd, paper_recipes
from qnet.train import build, config_validation, joint

_FILES = sorted(
  p.stem
  for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py")
  if p.stem not in ("__init__", "paper_recipes", "fashion_mnist_kd")
)
_CASES = [(f, None) for f in _FILES] + [("paper_recipes", v) for v in paper_recipes.VARIANTS]
_CASES += [("fashion_mnist_kd", v) for v in fashion_mnist_kd.VARIANTS]


def _load(name: str, variant: str | None):
  module = importlib.import_module(f"configs.{name}")
  return module.get_config() if variant is None else module.get_config(variant)


@pytest.mark.slow  # traces every shipped config at full size (ResNet-50 included)
@pytest.mark.parametrize("name,variant", _CASES, ids=[v or f for f, v in _CASES])
def test_config_validates_and_its_train_step_traces(name, variant):
  c = _load(name, variant)
  config_validation.validate(c, device_count=4, reference=default.get_config())
  _trace_train_step(c)


def _trace_train_step(c) -> None:
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


# ----------------------------------------------------------------------------- documented commands

_ROOT = pathlib.Path(__file__).parents[1]
_WORKDIR_FIELDS = ("--config.init_from=", "--config.distill.teacher_from=")


def _documented_commands() -> list[tuple[str, str]]:
  """`(where, command)` for every `python -m qnet.main` in the README, docs/ and the config
  docstrings, backslash continuations joined, cut at a shell comment or `&&`."""
  sources = [_ROOT / "README.md", *sorted((_ROOT / "docs").glob("*.md"))]
  sources += sorted((_ROOT / "configs").glob("*.py"))
  found = []
  for path in sources:
    text = path.read_text()
    if path.suffix == ".py":
      text = ast.get_docstring(ast.parse(text)) or ""
    text = text.replace("\\\n", " ")
    for n, line in enumerate(text.splitlines(), 1):
      i = line.find("python -m qnet.main ")
      if i < 0:
        continue
      command = re.split(r"\s(?:#|&&|;|\|)", line[i:])[0]
      command = command.split("`")[0].strip()
      found.append((f"{path.relative_to(_ROOT)}:{n}", command))
  return found


_COMMANDS = _documented_commands()


def readme_module(name: str) -> str:
  """The README's Python block that starts with `# NAME.py` (a user's file the README shows)."""
  text = (_ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  found = [b for b in blocks if b.startswith(f"# {name}.py\n")]
  assert len(found) == 1, f"README has {len(found)} blocks starting with # {name}.py"
  return found[0]


def _provide_readme_modules(command: str, tmp_path, monkeypatch) -> None:
  # A command that names a user's model from the README (`--config.model=my_cnn:Net`) gets
  # the README's own file for it, as a user who copied it would.
  for name in re.findall(r"--config\.model=(\w+):", command):
    (tmp_path / f"{name}.py").write_text(readme_module(name))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_the_design_card_command_is_documented():
  commands = [c for _, c in _COMMANDS]
  assert any(c.startswith("python -m qnet.main --config=configs/imagenet_w4a4.py ") for c in commands)
  assert len(_COMMANDS) >= 5


@pytest.mark.slow  # traces every shipped config at full size (ResNet-50 included)
@pytest.mark.parametrize("where,command", _COMMANDS, ids=[w for w, _ in _COMMANDS])
def test_documented_command_parses_validates_and_traces(where, command, tmp_path, monkeypatch):
  from absl import flags

  from qnet import main

  monkeypatch.chdir(_ROOT)
  _provide_readme_modules(command, tmp_path, monkeypatch)
  run = tmp_path / "run"  # stands for a trained run's workdir wherever a command names one
  (run / "checkpoints").mkdir(parents=True)
  args = shlex.split(command)[3:]  # after `python -m qnet.main`
  args = [
    next((f + str(run) for f in _WORKDIR_FIELDS if a.startswith(f)), a) for a in args
  ]
  argv = ["qnet.main", *args]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags reads the overrides from sys.argv
  flag_values = main.define_flags(flags.FlagValues())
  main.parse_flags(argv, flag_values)
  c = flag_values.config
  config_validation.validate(c, device_count=4, reference=default.get_config())
  key = c.to_json(sort_keys=True)
  if key not in _TRACED:  # many commands name the same config: trace each config once
    _trace_train_step(c)
    _TRACED.add(key)


_TRACED: set[str] = set()
