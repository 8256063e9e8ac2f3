"""The traced lowering's own decisions, on tiny Flax models (fast: no fake-quant comparison).

`tests/test_export.py` checks that programs compute what the fake-quant network computes;
these check what the lowering reads off a model: paddings and strides as the model wrote
them, the rule's bit floors, which glue ops it folds, and the one-line refusals.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qnet.data.datasets import DATASETS
from qnet.deploy import integer, lowering
from qnet.models import rules
from qnet.quant import precision

DS = DATASETS["fashion_mnist"]
SHAPE = (12, 12, 1)


EVERY_LAYER = (rules.Rule(select="first_conv", quantize_input=False), rules.Rule())


def _program(module, rule_set=EVERY_LAYER, w=4, a=4, shape=SHAPE):
  model = rules.quantize(module, rule_set)
  x = jnp.zeros((1, *shape))
  v = model.init(jax.random.key(0), x, train=False)
  layout = precision.layout_of(model, x)
  wv, av = precision.layer_bits(layout, w, a, keep_first_last_fp=False)
  bits = {"/".join(p): (int(wv[i]), int(av[i])) for i, p in enumerate(layout.paths)}
  return lowering.build_program(
    model, v["params"], v.get("batch_stats", {}), bits, input_shape=shape, mean=DS.mean, std=DS.std
  )


def _convs(program):
  return {op["layer"]: op for op in program.ops if op["op"] == "conv"}


class Padded(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), padding="SAME", use_bias=False)(x))
    x = nn.relu(nn.Conv(4, (3, 3), padding=2, use_bias=False)(x))
    x = nn.relu(nn.Conv(4, (3, 1), strides=(1, 2), padding=((1, 0), (0, 1)), use_bias=False)(x))
    x = nn.relu(nn.Conv(4, (2, 2), padding="VALID", use_bias=False)(x))
    x = nn.relu(nn.Conv(4, (3, 3), padding=(1, 2), use_bias=False)(x))  # per dimension
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


@pytest.mark.heavy
def test_paddings_and_strides_are_the_models_own():
  convs = _convs(_program(Padded()))
  # XLA's SAME at stride 2 on 12: (0, 1); an int pads both sides; explicit pairs as written.
  assert convs["Conv_0"]["padding"] == [[0, 1], [0, 1]] and convs["Conv_0"]["strides"] == [2, 2]
  assert convs["Conv_1"]["padding"] == [[2, 2], [2, 2]] and convs["Conv_1"]["strides"] == [1, 1]
  assert convs["Conv_2"]["padding"] == [[1, 0], [0, 1]] and convs["Conv_2"]["strides"] == [1, 2]
  assert convs["Conv_3"]["padding"] == [[0, 0], [0, 0]]
  assert convs["Conv_4"]["padding"] == [[1, 1], [2, 2]]
  out = jax.eval_shape(
    integer.make_apply(_program(Padded())), jax.ShapeDtypeStruct((2, *SHAPE), jnp.uint8)
  )
  assert out.shape == (2, 3)


class Plain(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3), use_bias=False)(x)))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3), use_bias=False)(x)))
    return nn.Dense(self.num_classes)(x.mean((1, 2)))


def test_the_ops_follow_the_models_dataflow_and_rule_bits_are_floors():
  rule_set = (
    rules.Rule(select="first_conv", quantize_input=False),
    rules.Rule(pattern="Conv_1", weight_bits=6, act_bits=5),
    rules.Rule(),
  )
  program = _program(Plain(), rule_set, w=2, a=3)
  kinds = [op["op"] for op in program.ops]
  # BN, ReLU and the max-pool between Conv_0 and Conv_1 are one requant (then a pool on codes).
  # The W2 stem on the float image is a float conv; the integer Conv_1 feeds the model's own
  # float mean, which the dense then quantizes.
  assert kinds == [
    "preprocess",
    "conv",
    "batchnorm",
    "relu",
    "maxpool",
    "quantize",
    "conv",
    "dequant",
    "batchnorm",
    "relu",
    "mean",
    "quantize",
    "dense",
    "dequant",
    "output",
  ]
  layers = program.layers
  assert (layers["Conv_1"]["weight_bits"], layers["Conv_1"]["act_bits"]) == (6, 5)  # floors
  assert (layers["Dense_0"]["weight_bits"], layers["Dense_0"]["act_bits"]) == (2, 3)
  assert (
    not layers["Conv_0"]["integer"] and layers["Conv_1"]["integer"] and layers["Dense_0"]["integer"]
  )
  assert kinds.count("mean") == 1  # the dense quantizes the model's own mean
  (dense,) = [op for op in program.ops if op["op"] == "dense"]
  assert dense["reduce"] == "flatten"  # it reads the mean's codes, already reduced
  # A rule that keeps the dense's input float: a float dense that takes the mean itself.
  kernel_only = (rule_set[0], rules.Rule(select="last_dense", quantize_input=False), rules.Rule())
  ops = _program(Plain(), kernel_only, w=2, a=3).ops
  (dense,) = [op for op in ops if op["op"] == "dense"]
  assert dense["in_bits"] == 32 and dense["weight_bits"] == 2 and dense["reduce"] == "mean"
  assert [op["op"] for op in ops][-3:] == ["relu", "dense", "output"]


@pytest.mark.parametrize(
  "conv,message",
  [
    (lambda: nn.Conv(4, (3, 3), feature_group_count=2, use_bias=False), "feature_group_count"),
    (lambda: nn.Conv(4, (3, 3), kernel_dilation=2, use_bias=False), "kernel_dilation"),
    (lambda: nn.Conv(4, (3, 3), input_dilation=2, padding=1, use_bias=False), "input_dilation"),
    (lambda: nn.Conv(4, (3, 3), padding="CIRCULAR", use_bias=False), "padding='CIRCULAR'"),
    (
      lambda: nn.Conv(4, (3, 3), feature_group_count=2, kernel_dilation=2, use_bias=False),
      "feature_group_count, kernel_dilation",
    ),
  ],
)
def test_a_conv_with_no_integer_form_is_refused_naming_the_layer_and_the_setting(conv, message):
  class Net(nn.Module):
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train=True):
      x = nn.relu(nn.Conv(4, (3, 3), use_bias=False)(x))
      return nn.Dense(self.num_classes)(conv()(x).mean((1, 2)))

  with pytest.raises(
    integer.UnsupportedModel,
    match=rf"^layer Conv_1: nn\.Conv (with )?{re.escape(message)} has no integer form yet(\n|$)",
  ):
    _program(Net())


class BatchNormAfterMean(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.relu(nn.Conv(4, (3, 3), use_bias=False)(x))
    x = nn.BatchNorm(use_running_average=not train)(x.mean((1, 2)))
    return nn.Dense(self.num_classes)(x)


class NoDense(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train=True):
    return nn.Conv(self.num_classes, (3, 3), use_bias=False)(x).mean((1, 2))


class OtherBatchNorm(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(4, (3, 3), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, epsilon=1e-3)(x))
    return nn.Dense(self.num_classes)(x.mean((1, 2)))


class SineFirst(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(4, (3, 3), use_bias=False)(jnp.sin(x))
    return nn.Dense(self.num_classes)(x.mean((1, 2)))


class ConstantAdded(nn.Module):
  """A fixed array (a mask, a positional pattern) added to the stream: a jaxpr constant."""

  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(4, (3, 3), use_bias=False)(x) + np.full((1, *SHAPE[:2], 4), 0.5, np.float32)
    return nn.Dense(self.num_classes)(nn.Conv(4, (3, 3), use_bias=False)(x).mean((1, 2)))


def _glue(tail):
  """A model class: a conv, then `tail` on its output, then a dense (a refusal in `tail`
  names Conv_0)."""

  class Net(nn.Module):
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train=True):
      return nn.Dense(self.num_classes)(tail(nn.relu(nn.Conv(4, (3, 3), use_bias=False)(x))))

  return Net


@pytest.mark.parametrize(
  "module,message",
  [
    (_glue(lambda x: x.sum((1, 2))), r"^layer Dense_0: a sum over H, W that is not a mean$"),
    (BatchNormAfterMean, r"^layer BatchNorm_0: a BatchNorm after a mean or flatten$"),
    (NoDense, r"^the model's logits do not come from a dense layer"),
    (OtherBatchNorm, r"^layer BatchNorm_0: BatchNorm needs use_scale, use_bias, epsilon=1e-5"),
    # The first refused op names itself and the layer before it (or the input).
    (SineFirst, r"^op sin \(after the input\) has no integer lowering$"),
    # A constant operand is read as the array it is: an add of one is not a residual.
    (ConstantAdded, r"^op add \(after layer Conv_0\) has no integer lowering$"),
    # A sum divided by anything but H * W is not a mean: the div itself is refused.
    (
      _glue(lambda x: x.sum((1, 2)) / 7.0),
      r"^op div \(after layer Conv_0\) has no integer lowering$",
    ),
    (
      _glue(lambda x: x.sum((1, 2)) / np.full((1, 4), 144.0, np.float32)),
      r"^op div \(after layer Conv_0\) has no integer lowering$",
    ),
    (
      _glue(lambda x: (x / 2.0).mean((1, 2))),
      r"^op div \(after layer Conv_0\) has no integer lowering$",
    ),
    (
      _glue(
        lambda x: jax.lax.reduce_window(
          x, -jnp.inf, jax.lax.max, (1, 1, 1, 2), (1, 1, 1, 2), "VALID"
        ).mean((1, 2))
      ),
      r"^op reduce_window_max \(after layer Conv_0\) pools over batch or channels$",
    ),
  ],
)
@pytest.mark.heavy
def test_glue_with_no_integer_form_is_one_line_naming_the_layer(module, message):
  with pytest.raises(integer.UnsupportedModel, match=message):
    _program(module())


def test_a_layer_its_rule_keeps_fp_stays_float_with_no_precision_entry():
  program = _program(Plain(), (rules.Rule(pattern="Conv_1", keep_fp=True), rules.Rule()))
  conv1 = _convs(program)["Conv_1"]
  assert conv1["weight_bits"] == 32 and conv1["in_bits"] == 32
  assert program.layers["Dense_0"]["integer"]
  np.testing.assert_array_equal(
    program.arrays["Conv_1.kernel"].shape, (3, 3, 4, 4)
  )  # the raw float kernel is stored


@pytest.mark.parametrize("floor", [0.5, np.full((1, *SHAPE[:2], 4), 0.25, np.float32)])
def test_only_a_max_with_zero_is_a_relu(floor):
  """`max(x, 0)` folds into the next codes as a ReLU; a max with another constant (a scalar, or
  an array of the value's shape) is a different function and is refused in one line."""

  class Floor(nn.Module):
    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train=True):
      x = jnp.maximum(nn.Conv(4, (3, 3), use_bias=False)(x), floor)
      return nn.Dense(self.num_classes)(nn.Conv(4, (3, 3), use_bias=False)(x).mean((1, 2)))

  with pytest.raises(
    integer.UnsupportedModel, match=r"^op max \(after layer Conv_0\) has no integer lowering"
  ):
    _program(Floor())


class ByKeyword(nn.Module):
  """Plain's layers, each called with its input by name."""

  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(4, (3, 3), use_bias=False)(inputs=x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train)(x=x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(
      nn.BatchNorm(use_running_average=not train)(x=nn.Conv(4, (3, 3), use_bias=False)(inputs=x))
    )
    return nn.Dense(self.num_classes)(inputs=x.mean((1, 2)))


def test_a_layer_called_with_its_input_by_name_lowers_as_a_positional_call():
  rule_set = (rules.Rule(select="first_conv", quantize_input=False), rules.Rule())
  by_name, positional = _program(ByKeyword(), rule_set), _program(Plain(), rule_set)
  assert by_name.ops == positional.ops and by_name.layers == positional.layers


class PoolsAndResidual(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.relu(nn.Conv(4, (3, 3), use_bias=False)(x))
    x = nn.max_pool(x, (3, 2), strides=(2, 1), padding=((1, 0), (0, 1)))
    y = nn.relu(nn.Conv(4, (3, 3), use_bias=True)(x))
    x = x + nn.Conv(4, (3, 3), use_bias=False)(y)
    return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def test_a_pool_a_residual_add_and_a_flatten_are_read_as_written():
  program = _program(PoolsAndResidual())
  ops = program.ops
  by_kind = {}
  for op in ops:
    by_kind.setdefault(op["op"], []).append(op)
  (pool,) = by_kind["maxpool"]
  assert (pool["window"], pool["strides"], pool["padding"]) == ([3, 2], [2, 1], [[1, 0], [0, 1]])
  (add,) = by_kind["add"]
  conv2 = next(op["out"] for op in ops if op.get("layer") == "Conv_2")
  conv2_float = next(op["out"] for op in ops if op["op"] == "dequant" and op["in"] == [conv2])
  assert add["in"] == [pool["out"], conv2_float]  # the skip (the pool), then the branch
  (dense,) = by_kind["dense"]
  assert dense["reduce"] == "flatten" and dense["pooled"] == 1
  # Biases as the model has them (non-zero here): Conv_1's (folded into the next requant) and
  # the dense's (in its dequant) are stored with their values; the bias-free convs have none.
  model = rules.quantize(PoolsAndResidual(), EVERY_LAYER)
  v = model.init(jax.random.key(0), jnp.zeros((1, *SHAPE)), train=False)
  params = jax.tree.map(lambda a: a, v["params"])
  for layer in ("Conv_1", "Dense_0"):
    params[layer]["bias"] = jnp.linspace(0.1, 0.4, params[layer]["bias"].size)
  bits = {"/".join(p): (4, 4) for p in precision.layout_of(model, jnp.zeros((1, *SHAPE))).paths}
  biased = lowering.build_program(
    model, params, {}, bits, input_shape=SHAPE, mean=DS.mean, std=DS.std
  )
  assert sorted(k for k in biased.arrays if k.endswith(".bias")) == ["Conv_1.bias", "Dense_0.bias"]
  for layer in ("Conv_1", "Dense_0"):
    np.testing.assert_array_equal(biased.arrays[f"{layer}.bias"], np.asarray(params[layer]["bias"]))
  assert biased.ops[-2]["op"] == "dequant" and biased.ops[-2]["bias"] == "Dense_0.bias"


def test_qnets_own_layers_lower_with_their_bits_strides_and_head():
  """A qnet model (`QuantConv` / `QuantDense`, no rules): every layer at the layout's bits,
  the stride-2 block's convs as written, and the head summing its 6 x 6 codes (`pooled`)."""
  from qnet import models

  model = models.create_model("tiny_resnet", 10)
  x = jnp.zeros((1, *SHAPE))
  v = model.init(jax.random.key(0), x, train=False)
  layout = precision.layout_of(model, x)
  wv, av = precision.layer_bits(layout, 4, 3, keep_first_last_fp=False)
  bits = {"/".join(p): (int(wv[i]), int(av[i])) for i, p in enumerate(layout.paths)}
  program = lowering.build_program(
    model, v["params"], v["batch_stats"], bits, input_shape=SHAPE, mean=DS.mean, std=DS.std
  )
  layer_ops = {op["layer"]: op for op in program.ops if "layer" in op}
  assert list(layer_ops) == [  # call order
    "stem",
    "stage1_block1/conv1",
    "stage1_block1/conv2",
    "stage2_block1/conv1",
    "stage2_block1/conv2",
    "stage2_block1/shortcut",
    "head",
  ]
  for path, op in layer_ops.items():
    want = bits[path] if path != "stem" else (4, 32)  # the image is never quantized
    assert (op["weight_bits"], op["in_bits"]) == want, path
  conv1, shortcut = layer_ops["stage2_block1/conv1"], layer_ops["stage2_block1/shortcut"]
  assert (conv1["strides"], conv1["padding"]) == ([2, 2], [[0, 1], [0, 1]])  # SAME at 12
  assert (shortcut["strides"], shortcut["padding"]) == ([2, 2], [[0, 0], [0, 0]])
  head = layer_ops["head"]
  assert head["op"] == "dense" and head["reduce"] == "mean" and head["pooled"] == 36
  assert program.layers["head"]["integer"] and "head.bias" in program.arrays
  assert [op["op"] for op in program.ops].count("add") == 2  # one per residual block
  assert program.num_classes == 10 and program.input_shape == SHAPE
  assert program.quantizers == {"weight": "dorefa", "act": "dorefa"}


class TwoDenseHead(nn.Module):
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.relu(nn.Conv(4, (3, 3), use_bias=False)(x)).mean((1, 2))
    x = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(16)(x)))  # eval: identity
    return nn.Dense(self.num_classes)(x)


@pytest.mark.heavy
def test_the_last_dense_gives_the_classes_and_mixed_rules_are_named_mixed():
  """Traced in eval mode (the dropout is no op), the logits' width is the last dense's; the
  program names its quantizers, `mixed` where rules give layers different ones; a signed-code
  rule has no integer form and says so in one line."""
  first = rules.Rule(select="first_conv", quantize_input=False)
  program = _program(TwoDenseHead(), (first, rules.Rule()))
  assert program.num_classes == 3
  assert [op["op"] for op in program.ops].count("dense") == 2
  assert program.quantizers == {"weight": "dorefa", "act": "dorefa"}
  lsq_dense = (
    first,
    rules.Rule(pattern="Dense_1", weight_quantizer="lsq", act_quantizer="lsq"),
    rules.Rule(),
  )
  assert _program(TwoDenseHead(), lsq_dense).quantizers == {"weight": "mixed", "act": "mixed"}
  all_lsq = (
    rules.Rule(select="first_conv", quantize_input=False, weight_quantizer="lsq"),
    rules.Rule(weight_quantizer="lsq", act_quantizer="pact"),
  )
  assert _program(TwoDenseHead(), all_lsq).quantizers == {"weight": "lsq", "act": "pact"}
  signed = (first, rules.Rule(negative_input="signed", act_quantizer="lsq"))
  with pytest.raises(
    integer.UnsupportedModel,
    match=r"^layer Dense_0: signed activation codes have no integer form yet(\n|$)",
  ):
    _program(TwoDenseHead(), signed)
