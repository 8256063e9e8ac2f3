"""Any Flax CNN: an unmodified linen model quantized by rules (`qnet.models.rules`).

The model below is written the way Flax users write CNNs (nn.Conv, nn.BatchNorm, nn.relu,
nn.max_pool, a residual block, a mean, nn.Dense). qnet must quantize it without changing it,
with bits read from the `precision` collection, and train it with every remedy.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from qnet import models
from qnet.models import layers, rules
from qnet.quant import precision
from qnet.train import build, config_validation, joint

from test_loop import mock_config, run, saved_state

USER_MODEL = "test_rules:UserResNet"  # importable: pytest puts tests/ on sys.path


class UserBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x, train):
    y = nn.Conv(self.features, (3, 3), use_bias=False)(x)
    y = nn.BatchNorm(use_running_average=not train)(y)
    y = nn.relu(y)
    y = nn.Conv(self.features, (3, 3), use_bias=False)(y)
    y = nn.BatchNorm(use_running_average=not train)(y)
    return nn.relu(y + x)


class UserResNet(nn.Module):
  num_classes: int = 10
  width: int = 8

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(self.width, (3, 3), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = UserBlock(self.width)(x, train)
    x = x.mean((1, 2))
    return nn.Dense(self.num_classes)(x)


class BiasCNN(nn.Module):
  """Flax's defaults: convs with a bias, one without a BatchNorm after it."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.relu(nn.Conv(8, (3, 3))(x))  # bias, no BatchNorm: into the next codes
    x = nn.max_pool(nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(8, (3, 3))(x))), (2, 2), (2, 2))
    y = nn.relu(nn.Conv(8, (3, 3))(x))
    x = nn.Conv(8, (3, 3))(y) + x  # a biased conv into a float residual sum
    return nn.Dense(self.num_classes)(nn.relu(x).mean((1, 2)))


class NoNumClasses(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    return nn.Dense(3)(x.mean((1, 2)))


class NoTrain(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.num_classes)(x.mean((1, 2)))


class QnetTwin(nn.Module):
  """UserResNet built from qnet's own layers: the quantizer of a layer's input is its ReLU."""

  num_classes: int = 10
  width: int = 8

  @nn.compact
  def __call__(self, x, train=True):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, name=name)
    x = layers.QuantConv(self.width, quantize_input=False, name="Conv_0")(x)
    x = nn.relu(bn("BatchNorm_0")(x))  # the residual path needs the ReLU itself
    x = nn.max_pool(x, (2, 2), (2, 2))
    y = layers.QuantConv(self.width, name="Conv_1")(x)  # UserBlock_0's convs, renamed below
    y = bn("BatchNorm_1")(y)
    y = layers.QuantConv(self.width, name="Conv_2")(y)
    y = bn("BatchNorm_2")(y)
    x = nn.relu(y + x)
    return nn.Dense(self.num_classes, name="Dense_0")(x.mean((1, 2)))


def _images(n=4, size=16, seed=1):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 1))


def _without_clips(tree):
  return jax.tree.map(
    lambda x: x, {k: _without_clips(v) if isinstance(v, dict) else v for k, v in tree.items()
                  if k not in (layers.ACT_CLIP, layers.WEIGHT_CLIP)}
  )  # fmt: skip


def _randomize_bn(variables, seed=3):
  """BN scale/bias/mean/var away from 1/0/0/1, so equalities test the BN paths too."""
  rng = np.random.default_rng(seed)

  def walk(params, stats):
    for k in params:
      if "scale" in params[k] and "mean" in stats.get(k, {}):
        c = params[k]["scale"].shape
        params[k] = {"scale": rng.uniform(0.5, 1.5, c), "bias": rng.normal(0, 0.2, c)}
        stats[k] = {"mean": rng.normal(0, 0.2, c), "var": rng.uniform(0.5, 1.5, c)}
      elif isinstance(params[k], dict) and k in stats:
        walk(params[k], stats[k])

  p, s = jax.tree.map(np.asarray, variables["params"]), jax.tree.map(np.asarray, variables["batch_stats"])
  p, s = jax.tree.map(lambda x: x, p), jax.tree.map(lambda x: x, s)
  walk(p, s)
  return {**variables, "params": jax.tree.map(jnp.asarray, p), "batch_stats": jax.tree.map(jnp.asarray, s)}


@pytest.mark.parametrize("act_quantizer,weight_quantizer", [("dorefa", "dorefa"), ("pact", "dorefa"), ("lsq", "lsq")])
def test_parameter_tree_is_the_users_plus_clip_levels(act_quantizer, weight_quantizer):
  net, x = UserResNet(), _images()
  q = rules.quantize(net, rules.default_rules(act_quantizer=act_quantizer, weight_quantizer=weight_quantizer))
  plain = net.init(jax.random.key(0), x, train=False)
  quantized = q.init(jax.random.key(0), x, train=False)
  assert jax.tree.structure(_without_clips(quantized["params"])) == jax.tree.structure(plain["params"])
  assert jax.tree.map(jnp.shape, quantized["batch_stats"]) == jax.tree.map(jnp.shape, plain["batch_stats"])
  block = quantized["params"]["UserBlock_0"]
  assert (layers.ACT_CLIP in block["Conv_0"]) == (act_quantizer != "dorefa")
  assert (layers.WEIGHT_CLIP in block["Conv_0"]) == (weight_quantizer == "lsq")
  # The edges stay FP by default: no clip level, no precision entry.
  assert set(quantized["params"]["Conv_0"]) == {"kernel"} and set(quantized["params"]["Dense_0"]) == {"kernel", "bias"}
  assert precision.layout_of(q, x).paths == (("UserBlock_0", "Conv_0"), ("UserBlock_0", "Conv_1"))


@pytest.mark.parametrize("quantizer", ["pact", "lsq", "relu"])
def test_at_32_bits_with_relu_semantics_the_logits_are_the_unmodified_models(quantizer):
  net, x = UserResNet(), _images()
  act = "relu" if quantizer == "relu" else "quant"
  q = rules.quantize(net, rules.default_rules(False, act_quantizer="pact" if act == "relu" else quantizer), act=act)
  v = _randomize_bn(q.init(jax.random.key(0), x, train=False))
  layout = precision.layout_of(q, x)
  assert layout.num_layers == 4  # keep_first_last_fp=False: every conv and dense
  fp = precision.uniform(layout, 32, 32, keep_first_last_fp=False)
  got = q.apply({**v, "precision": fp}, x, train=False)
  want = net.apply({"params": _without_clips(v["params"]), "batch_stats": v["batch_stats"]}, x, train=False)
  np.testing.assert_array_equal(got, want)
  low = q.apply({**v, "precision": precision.uniform(layout, 2, 2, False)}, x, train=False)
  assert (quantizer == "relu") == bool(np.array_equal(low, want))  # relu: no quantizer at all


def test_at_w4a4_the_logits_equal_the_same_network_in_qnets_layers():
  x = _images()
  q = rules.quantize(UserResNet())
  v = _randomize_bn(q.init(jax.random.key(0), x, train=False))
  twin = QnetTwin()
  tv = twin.init(jax.random.key(0), x, train=False)
  rename = {"Conv_0": "Conv_0", "BatchNorm_0": "BatchNorm_0", "Dense_0": "Dense_0"}
  params = {rename[k]: v["params"][k] for k in rename}
  stats = {"BatchNorm_0": v["batch_stats"]["BatchNorm_0"]}
  for i in (0, 1):
    params[f"Conv_{i + 1}"] = v["params"]["UserBlock_0"][f"Conv_{i}"]
    params[f"BatchNorm_{i + 1}"] = v["params"]["UserBlock_0"][f"BatchNorm_{i}"]
    stats[f"BatchNorm_{i + 1}"] = v["batch_stats"]["UserBlock_0"][f"BatchNorm_{i}"]
  assert jax.tree.structure(params) == jax.tree.structure(tv["params"])
  twin_prec = precision.uniform(precision.layout_of(twin, x), 4, 4, keep_first_last_fp=False)
  twin_prec["Conv_0"] = {"weight_bits": jnp.float32(32), "act_bits": jnp.float32(32)}  # the FP stem
  want = twin.apply({"params": params, "batch_stats": stats, "precision": twin_prec}, x, train=False)
  got = q.apply({**v, "precision": precision.uniform(precision.layout_of(q, x), 4, 4)}, x, train=False)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(got, q.apply({**v, "precision": precision.uniform(precision.layout_of(q, x), 32, 32)}, x, train=False))


@pytest.mark.heavy
def test_gradients_reach_every_kernel_through_the_quantizers():
  x = _images()
  q = rules.quantize(UserResNet(), rules.default_rules(False, act_quantizer="lsq", weight_quantizer="lsq"))
  v = q.init(jax.random.key(0), x, train=False)
  prec = precision.uniform(precision.layout_of(q, x), 2, 2, False)
  loss = lambda p: q.apply({**v, "params": p, "precision": prec}, x, train=False).sum()
  grads = jax.grad(loss)(v["params"])
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    name = jax.tree_util.keystr(path)
    if "kernel" in name or "clip" in name:
      assert float(jnp.abs(g).sum()) > 0, name


def _user_config(**overrides):
  c = mock_config(**{"model": USER_MODEL, **overrides})
  return c


def test_the_cli_model_field_builds_the_users_class_quantized_by_the_config():
  c = _user_config(**{"quant.act_quantizer": "pact", "quant.keep_first_last_fp": False})
  config_validation.validate(c, device_count=4, reference=default.get_config())
  students, _ = build.build_specs(c, 10)
  model = students[0].model
  assert isinstance(model, rules.QuantizedModel) and isinstance(model.inner, UserResNet)
  assert model.inner.num_classes == 10 and all(r.act_quantizer == "pact" for r in model.rules)
  assert students[0].layout.num_layers == 4


@pytest.mark.parametrize(
  "model,message",
  [
    ("test_rules:NoNumClasses", "has no field `num_classes`"),
    ("test_rules:NoTrain", "its __call__ takes no `train`"),
    ("test_rules:Missing", "module 'test_rules' has no 'Missing'"),
    ("no_such_module_here:Net", "cannot import 'no_such_module_here'"),
    ("test_rules:USER_MODEL", "not a flax.linen Module class"),
  ],
)
def test_a_model_off_the_convention_is_one_line_naming_what_is_missing(model, message):
  with pytest.raises(config_validation.ConfigError, match=message):
    config_validation.validate(_user_config(model=model), device_count=4, reference=default.get_config())


class AuxHeadInTraining(nn.Module):
  """An auxiliary classifier that only training calls (Inception's): eval has one dense."""

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.relu(nn.Conv(4, (3, 3), use_bias=False)(x))
    if train:
      self.sow("intermediates", "aux", nn.Dense(3, name="aux")(x.mean((1, 2))))
    return nn.Dense(3, name="head")(nn.relu(nn.Conv(4, (3, 3))(x)).mean((1, 2)))


def test_report_describes_the_network_evaluation_runs():
  """`report` traces eval mode (the deployed network): a train-only layer is not in it, and
  the last dense of eval mode is the one `last_dense` keeps FP."""
  q = rules.quantize(AuxHeadInTraining())
  found = rules.report(q, _images())
  assert found["layers"] == {"Conv_0": 0, "Conv_1": 2, "head": 1}
  assert rules.layer_calls(AuxHeadInTraining(), _images(), train=True)[1] == ("aux", "dense")


def test_first_match_wins_and_unused_rules_and_unmatched_layers_are_reported():
  x = _images()
  ours = (
    rules.Rule(pattern="UserBlock_0/Conv_1", weight_bits=8, act_bits=8),
    rules.Rule(pattern="UserBlock_0/.*", act_quantizer="pact"),
    rules.Rule(pattern="Dense_.*", keep_fp=True),
    rules.Rule(pattern="Nothing/.*"),
  )
  q = rules.quantize(UserResNet(), ours)
  found = rules.report(q, x)
  assert found["layers"] == {"Conv_0": None, "UserBlock_0/Conv_0": 1, "UserBlock_0/Conv_1": 0, "Dense_0": 2}
  assert found["unmatched"] == ["Conv_0"] and found["unused_rules"] == [3]
  v = q.init(jax.random.key(0), x, train=False)
  assert layers.ACT_CLIP in v["params"]["UserBlock_0"]["Conv_0"]  # rule 1: PACT
  assert layers.ACT_CLIP not in v["params"]["UserBlock_0"]["Conv_1"]  # rule 0 won: DoReFa
  # Rule 0's bits are a floor: at W2A2 that layer still runs at 8 bits.
  layout = precision.layout_of(q, x)
  at2 = q.apply({**v, "precision": precision.uniform(layout, 2, 2)}, x, train=False)
  eight = precision.uniform(layout, 2, 2)
  eight["UserBlock_0"]["Conv_1"] = {"weight_bits": jnp.float32(8), "act_bits": jnp.float32(8)}
  np.testing.assert_array_equal(at2, q.apply({**v, "precision": eight}, x, train=False))
  with pytest.raises(rules.RuleError, match="Rule.act_quantizer='gelu'; allowed: dorefa, pact, lsq"):
    rules.Rule(act_quantizer="gelu")
  with pytest.raises(rules.RuleError, match=r"^Rule.weight_quantizer='pact'; allowed: dorefa, lsq$"):
    rules.Rule(weight_quantizer="pact")
  with pytest.raises(rules.RuleError, match=r"^Rule.select='last_conv'; allowed: any, first_conv, last_dense$"):
    rules.Rule(select="last_conv")
  with pytest.raises(rules.RuleError, match=r"^Rule\(pattern='Conv_\('\): not a regex"):
    rules.Rule(pattern="Conv_(")
  with pytest.raises(rules.RuleError, match=r"^Rule.negative_input='relu'; allowed: error, clip, signed$"):
    rules.Rule(negative_input="relu")
  with pytest.raises(
    rules.RuleError, match=r"^Rule.negative_input='signed' needs act_quantizer='lsq' \(signed codes\)$"
  ):
    rules.Rule(negative_input="signed", act_quantizer="pact")
  assert rules.Rule(negative_input="signed", act_quantizer="lsq").negative_input == "signed"


def test_first_conv_and_last_dense_in_a_model_with_no_dense_or_no_conv():
  """`assign` on layer-call lists alone: an MLP keeps its last dense FP, a conv-only net
  its first conv; the rest take the catch-all rule."""
  r = rules.default_rules()
  assert rules.assign(r, [("Dense_0", "dense"), ("Dense_1", "dense")]) == {"Dense_0": 2, "Dense_1": 1}
  assert rules.assign(r, [("Conv_0", "conv"), ("Conv_1", "conv")]) == {"Conv_0": 0, "Conv_1": 2}
  assert rules.assign(r, []) == {}


class NegativeInside(nn.Module):
  """A negative value reaches a quantized conv after the first layer (no ReLU before it)."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.relu(nn.Conv(4, (3, 3), use_bias=False)(x))
    x = nn.Conv(4, (3, 3), use_bias=False)(x) - 1.0
    return nn.Dense(self.num_classes)(nn.Conv(4, (3, 3), use_bias=False)(x).mean((1, 2)))


def test_a_negative_quantized_input_is_an_error_naming_the_layer_unless_the_rule_says():
  x = _images()
  q = rules.quantize(UserResNet(), (rules.Rule(),))  # the first conv quantizes the image too
  v = q.init(jax.random.key(0), x, train=False)
  with pytest.raises(rules.RuleError, match=r"layer Conv_0: its quantized input is negative"):
    rules.check_inputs(q, v, x)
  for ok in (rules.Rule(negative_input="clip"), rules.Rule(negative_input="signed", act_quantizer="lsq")):
    q = rules.quantize(UserResNet(), (ok,))
    rules.check_inputs(q, q.init(jax.random.key(0), x, train=False), x)
  rules.check_inputs(rules.quantize(UserResNet()), rules.quantize(UserResNet()).init(jax.random.key(0), x, train=False), x)
  # Layers with nothing to check (the first conv's input is not quantized) do not end the
  # walk: the negative input of a later layer is found.
  q = rules.quantize(NegativeInside())
  with pytest.raises(rules.RuleError, match=r"layer Conv_2: its quantized input is negative"):
    rules.check_inputs(q, q.init(jax.random.key(0), x, train=False), x)
  q = rules.quantize(NegativeInside(), (rules.Rule(keep_fp=True),))  # no quantized input at all
  rules.check_inputs(q, q.init(jax.random.key(0), x, train=False), x)


def test_the_loop_stops_at_the_first_batch_on_a_negative_input(tmp_path, monkeypatch):
  monkeypatch.setattr(models, "default_rules", lambda *a, **k: (rules.Rule(**k),))
  with pytest.raises(rules.RuleError, match="layer Conv_0: its quantized input is negative"):
    run(_user_config(), tmp_path)
  assert not (tmp_path / "metrics.jsonl").exists() or "train_loss" not in (tmp_path / "metrics.jsonl").read_text()


@pytest.mark.heavy
def test_progressive_stochastic_and_distillation_compile_the_train_step_once():
  c = _user_config(**{"schedule.kind": "progressive+stochastic", "distill.enabled": True, "quant.act_quantizer": "lsq"})
  total = 8
  students, teacher = build.build_specs(c, total)
  assert isinstance(teacher.model, rules.QuantizedModel)  # the teacher: the same model at FP
  state = joint.init_state(students, teacher, 0, jnp.zeros((1, 32, 32, 3)))
  joint.TRACE_COUNTS["train_step"] = 0
  step = jax.jit(functools.partial(joint.train_step, students=students, teacher=teacher, distill=build.distill_spec(c, total)))
  rng = np.random.default_rng(0)
  bits = set()
  for _ in range(total):
    batch = {"image": jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32), "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32)}
    state, m = step(state, batch)
    bits.add(float(m["weight_bits"]))
  assert len(bits) >= 3  # 32 -> 8 -> 4: several phases ran
  assert joint.TRACE_COUNTS["train_step"] == 1


@pytest.mark.slow
def test_killed_and_resumed_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path):
  c = _user_config(**{"schedule.kind": "two_stage+stochastic", "distill.enabled": True, "quant.act_quantizer": "pact"})
  run(c, tmp_path / "full")
  run(c, tmp_path / "split", stop_at_step=5)
  run(c, tmp_path / "split")
  (sa, a), (sb, b) = saved_state(c, tmp_path / "full"), saved_state(c, tmp_path / "split")
  assert sa == sb == 12
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.heavy
def test_the_readme_example_trains_as_written(tmp_path, monkeypatch):
  from test_configs import readme_module

  (tmp_path / "my_cnn.py").write_text(readme_module("my_cnn"))
  monkeypatch.syspath_prepend(str(tmp_path))
  # The README's command: fashion_mnist_w4a4 + model=my_cnn:Net + progressive, on mock data
  # with a short budget instead of 3 epochs of Fashion-MNIST.
  c = mock_config(**{"model": "my_cnn:Net", "schedule.kind": "progressive", "num_train_steps": 9})
  joint.TRACE_COUNTS["train_step"] = 0
  result = run(c, tmp_path / "run")
  rows = [r for r in __import__("qnet.train.metrics_io", fromlist=["x"]).read_jsonl(tmp_path / "run" / "metrics.jsonl") if "weight_bits" in r]
  assert {r["weight_bits"] for r in rows} == {32.0, 8.0, 4.0}  # the phases ran in one compile
  assert joint.TRACE_COUNTS["train_step"] == 1 and 0.0 <= result["eval_accuracy"] <= 1.0


EDGES_FP_PACT = (  # for --config.quant.rules=test_rules:EDGES_FP_PACT
  rules.Rule(select="first_conv", keep_fp=True),
  rules.Rule(select="last_dense", keep_fp=True),
  rules.Rule(pattern="UserBlock_0/Conv_1", keep_fp=True),
  rules.Rule(act_quantizer="pact"),
)


def test_quant_rules_names_the_rules_the_users_model_is_quantized_by():
  c = _user_config(**{"quant.rules": "test_rules:EDGES_FP_PACT"})
  config_validation.validate(c, device_count=4, reference=default.get_config())
  students, _ = build.build_specs(c, 10)
  assert students[0].model.rules == EDGES_FP_PACT
  assert students[0].layout.paths == (("UserBlock_0", "Conv_0"),)  # Conv_1 kept FP by rule 2
  for bad, message in (
    ("test_rules:USER_MODEL", "not a non-empty sequence of qnet Rule objects"),
    ("test_rules:NOPE", "module 'test_rules' has no 'NOPE'"),
  ):
    c.quant.rules = bad
    with pytest.raises(config_validation.ConfigError, match=message):
      config_validation.validate(c, device_count=4, reference=default.get_config())


def test_signed_codes_keep_a_negative_input_that_clip_sets_to_zero():
  """`negative_input='signed'` (LSQ) gives the image's negative values negative codes; `clip`
  sets them to 0, so under `clip` the image and its ReLU give the same logits."""
  x = _images()
  lsq = dict(act_quantizer="lsq", weight_quantizer="lsq")
  signed = rules.quantize(UserResNet(), (rules.Rule(negative_input="signed", **lsq),))
  clipped = rules.quantize(UserResNet(), (rules.Rule(negative_input="clip", **lsq),))
  v = clipped.init(jax.random.key(0), x, train=False)
  v = {**v, "precision": precision.uniform(precision.layout_of(clipped, x), 4, 4)}
  run = lambda q, images: np.asarray(q.apply(v, images, train=False))
  np.testing.assert_array_equal(run(clipped, x), run(clipped, jax.nn.relu(x)))
  assert np.abs(run(signed, x) - run(signed, jax.nn.relu(x))).max() > 1e-3


class Outer(nn.Module):
  """A quantized network as a submodule of the user's own module (paths below `net/`)."""

  @nn.compact
  def __call__(self, x, train=True):
    return rules.QuantizedModel(UserResNet(), (rules.Rule(act_quantizer="pact"),), name="net")(x, train)


def test_a_nested_quantized_model_matches_its_rules_by_its_own_paths():
  v = Outer().init(jax.random.key(0), _images(), train=False)
  (net,) = v["params"].values()  # the user's network, in the outer module's scope
  assert layers.ACT_CLIP in net["Conv_0"] and layers.ACT_CLIP in net["UserBlock_0"]["Conv_1"]


def test_train_is_the_default_and_runs_batchnorm_on_batch_statistics():
  x = _images()
  q = rules.quantize(UserResNet())
  v = q.init(jax.random.key(0), x, train=False)
  v = {**v, "precision": precision.uniform(precision.layout_of(q, x), 4, 4)}
  default, updated = q.apply(v, x, mutable=["batch_stats"])
  train, _ = q.apply(v, x, train=True, mutable=["batch_stats"])
  np.testing.assert_array_equal(default, train)
  assert np.abs(np.asarray(updated["batch_stats"]["BatchNorm_0"]["mean"])).max() > 0  # updated
  assert [p for p, _ in rules.layer_calls(AuxHeadInTraining(), x)] == ["Conv_0", "Conv_1", "head"]


def test_a_layer_with_a_custom_op_class_is_refused_naming_it():
  class CustomDot(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
      x = nn.relu(nn.Conv(4, (3, 3), use_bias=False)(x)).mean((1, 2))
      x = nn.Dense(4, dot_general_cls=lambda: jax.lax.dot_general)(x)
      return nn.Dense(3)(x)

  q = rules.quantize(CustomDot())
  with pytest.raises(
    rules.RuleError, match=r"^layer Dense_0: a layer with a custom \*_cls op cannot be quantized by rules(\n|$)"
  ):
    q.init(jax.random.key(0), _images(), train=False)


def test_per_channel_rule_scales_each_output_channel_of_the_kernel():
  """`per_channel=True` gives each output channel its own weight scale (DoReFa: its own max):
  with one channel's weights 100x smaller, per-channel and per-tensor logits differ."""
  x = _images()
  per_tensor = rules.quantize(UserResNet(), (rules.Rule(),))
  per_channel = rules.quantize(UserResNet(), (rules.Rule(per_channel=True),))
  v = per_channel.init(jax.random.key(0), x, train=False)
  v = {**v, "precision": precision.uniform(precision.layout_of(per_channel, x), 2, 8)}
  run = lambda q, variables: np.asarray(q.apply(variables, x, train=False))
  conv = v["params"]["Conv_0"]
  small = {**v, "params": {**v["params"], "Conv_0": {**conv, "kernel": conv["kernel"].at[..., 0].multiply(0.01)}}}
  assert np.abs(run(per_tensor, small) - run(per_channel, small)).max() > 1e-3
