"""Models: registry, output shapes, parameter counts, precision pytree built from the model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from qnet.train import build
from qnet import models
from qnet.quant import precision
from qnet.models import layers


def _count(model, shape):
  v = jax.eval_shape(
    lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False), jnp.zeros(shape)
  )
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(v["params"])), v


def _cifar_preact_resnet_params(n: int, in_ch: int, classes: int) -> int:
  """Hand count: bias-free 3x3 convs, BN (scale+bias) before each conv pair, 1x1 projection
  shortcuts where the shape changes, a final BN and a dense head with bias."""
  total, c_in = 3 * 3 * in_ch * 16, 16
  for width in (16, 32, 64):
    for _ in range(n):
      total += 2 * c_in + 9 * c_in * width + 2 * width + 9 * width * width
      total += c_in * width if c_in != width else 0
      c_in = width
  return total + 2 * 64 + 64 * classes + classes


@pytest.mark.parametrize(
  "name,n,shape,classes",
  [
    ("resnet20", 3, (1, 32, 32, 3), 10),
    ("resnet20", 3, (1, 28, 28, 1), 10),
    ("resnet32", 5, (1, 32, 32, 3), 100),
    ("resnet56", 9, (1, 32, 32, 3), 100),
  ],
)
@pytest.mark.heavy
def test_cifar_resnet_parameter_counts(name, n, shape, classes):
  got, _ = _count(models.create_model(name, classes), shape)
  assert got == _cifar_preact_resnet_params(n, shape[-1], classes)
  if name == "resnet20" and shape[-1] == 3:
    assert got == 272_282  # the familiar "0.27M" of He et al.


@pytest.mark.parametrize("name,reference", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
@pytest.mark.heavy
def test_imagenet_resnet_parameter_counts_match_torchvision_within_0_1_percent(name, reference):
  # torchvision's counts; pre-activation moves BNs around, which changes a few thousand.
  got, _ = _count(models.create_model(name, 1000), (1, 224, 224, 3))
  assert abs(got - reference) / reference < 1e-3


def test_fmnist_cnn_parameter_count():
  got, _ = _count(models.create_model("fmnist_cnn", 10), (1, 28, 28, 1))
  # 28 -> conv 32 -> pool 14 -> conv 64 -> pool 7 -> conv 128 -> pool 3 -> fc 256 -> 10
  convs = 9 * 1 * 32 + 9 * 32 * 64 + 9 * 64 * 128
  bns = 2 * (32 + 64 + 128 + 256)
  assert got == convs + bns + (3 * 3 * 128 * 256 + 256) + (256 * 10 + 10)


@pytest.mark.parametrize(
  "name,shape",
  [("tiny_cnn", (3, 28, 28, 1)), ("tiny_resnet", (3, 32, 32, 3)), ("resnet20", (2, 28, 28, 1))],
)
@pytest.mark.heavy
def test_output_shapes_and_precision_collection(name, shape):
  model = models.create_model(name, 7)
  x = jnp.ones(shape)
  v = jax.jit(lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False))(x)
  layout = precision.layout_of(model, x)
  out = jax.jit(
    lambda v, p: model.apply(
      {"params": v["params"], "batch_stats": v["batch_stats"], "precision": p}, x, train=False
    )
  )(v, precision.uniform(layout, 4, 4))
  assert out.shape == (shape[0], 7) and out.dtype == jnp.float32
  # One (weight_bits, act_bits) pair per layer with a kernel, keyed like the params.
  kernels = {
    p[:-1]
    for p in (
      tuple(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(v["params"])
    )
    if p[-1] == "kernel"
  }
  assert set(layout.paths) == kernels
  assert ("head",) in layout.paths and ("stem",) in layout.paths


def test_alexnet_shapes():
  n, v = _count(models.create_model("alexnet_bn", 1000), (1, 224, 224, 3))
  assert n > 40_000_000 and "fc6" in v["params"] and "fc6_bn" in v["params"]


def test_unknown_model_is_a_clear_error():
  with pytest.raises(ValueError, match="allowed: .*resnet20"):
    models.create_model("resnet21", 10)


def test_precision_changes_the_output_and_apply_requires_it():
  model = models.create_model("tiny_resnet", 10)
  x = jax.random.normal(jax.random.key(1, impl="rbg"), (2, 28, 28, 1))
  v = jax.jit(lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False))(x)
  layout = precision.layout_of(model, x)
  base = {"params": v["params"], "batch_stats": v["batch_stats"]}
  apply = jax.jit(lambda p: model.apply(base | {"precision": p}, x, train=False))
  outs = [apply(precision.uniform(layout, b, b)) for b in (32, 2)]
  assert not np.allclose(outs[0], outs[1])
  with pytest.raises(Exception, match="precision"):
    model.apply(base, x, train=False)


# Input per registered model: small, but past every stride and pool.
_SHAPES = {"alexnet_bn": (1, 67, 67, 3), "fmnist_cnn": (1, 28, 28, 1), "tiny_cnn": (1, 28, 28, 1)}


def test_relu_tiny_cnn_equals_raw_kernels_and_relu_by_hand():
  """`act='relu'`: the network is raw kernels and ReLU, written out here with lax ops."""
  x = jax.random.normal(jax.random.key(1, impl="rbg"), (2, 28, 28, 1))
  model = models.create_model("tiny_cnn", 10, act="relu")
  v = model.init(jax.random.key(0, impl="rbg"), x, train=False)
  # Non-trivial BN statistics, activations beyond 1 (a clip-ReLU left in would show).
  v = jax.tree.map(lambda a: a * 3.0 + 0.1, v)
  p, s = v["params"], v["batch_stats"]

  def conv_bn(h, name):
    dims = ("NHWC", "HWIO", "NHWC")
    h = jax.lax.conv_general_dilated(h, p[name]["kernel"], (1, 1), "SAME", dimension_numbers=dims)
    bn, st = p[f"{name}_bn"], s[f"{name}_bn"]
    h = (h - st["mean"]) / jnp.sqrt(st["var"] + 1e-5) * bn["scale"] + bn["bias"]
    return nn.max_pool(h, (2, 2), (2, 2))

  h = conv_bn(x, "stem")
  h = conv_bn(jax.nn.relu(h), "conv2_1")
  h = jax.nn.relu(h).reshape(2, -1)
  want = h @ p["head"]["kernel"] + p["head"]["bias"]
  layout = precision.layout_of(model, x)
  got = model.apply(v | {"precision": precision.full_precision(layout)}, x, train=False)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _plain_layer(next_fun, args, kwargs, context):
  """Interceptor: every QuantConv / QuantDense as the plain layer (ReLU input, raw kernel)."""
  m = context.module
  if context.method_name != "__call__" or not isinstance(m, (layers.QuantConv, layers.QuantDense)):
    return next_fun(*args, **kwargs)
  x, params = args[0], m.variables["params"]
  if m.quantize_input:
    x = jax.nn.relu(x)
  if isinstance(m, layers.QuantConv):
    return jax.lax.conv_general_dilated(
      x, params["kernel"], m.strides, m.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
  if x.ndim > 2:
    x = jnp.mean(x, axis=(1, 2)) if m.reduce == "mean" else x.reshape(x.shape[0], -1)
  return x @ params["kernel"] + params["bias"]


@pytest.mark.parametrize("name", sorted(models.MODELS))
@pytest.mark.heavy
def test_relu_model_compiles_no_quantizer_op(name):
  """`act='relu'` is the plain FP network on every model: no tanh/round lowered (stems
  included), whatever the bits; the quantized model has them (checked on the tiny ones)."""
  shape = _SHAPES.get(name, (1, 32, 32, 3))
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  acts = (("relu", False), ("quant", True)) if name.startswith("tiny") else (("relu", False),)
  for act, has_ops in acts:
    model = models.create_model(name, 10, act=act)
    v = jax.eval_shape(lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False), x)
    low = precision.uniform(precision.layout_of(model, jnp.zeros(shape)), 2, 2)
    text = (
      jax.jit(lambda v, x: model.apply(v | {"precision": low}, x, train=False))
      .lower(v, x)
      .as_text()
    )
    assert ("tanh" in text) == has_ops and ("round_nearest" in text) == has_ops, (name, act)


@pytest.mark.parametrize("name", ["tiny_cnn", "resnet20", "resnet18", "alexnet_bn"])
@pytest.mark.heavy
def test_relu_model_equals_raw_kernels_and_relu(name):
  """Each model family (CIFAR and ImageNet stems, AlexNet) run with `act='relu'` equals the
  same variables with every layer replaced by ReLU and its raw kernel."""
  shape = _SHAPES.get(name, (1, 32, 32, 3))
  x = jax.random.normal(jax.random.key(1, impl="rbg"), shape)
  model = models.create_model(name, 10, act="relu")
  v = jax.jit(lambda x: model.init(jax.random.key(0, impl="rbg"), x, train=False))(x)
  layout = precision.layout_of(model, x)
  v = v | {"precision": precision.uniform(layout, 2, 2)}

  def plain(v, x):
    with nn.intercept_methods(_plain_layer):
      return model.apply(v, x, train=False)

  got = jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x)
  np.testing.assert_allclose(got, jax.jit(plain)(v, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight_quantizer", ["dorefa", "lsq"])
def test_config_per_channel_reaches_the_layers(weight_quantizer):
  """`quant.per_channel` goes config -> build_specs -> every layer, and changes the output."""
  outs = []
  for per_channel in (False, True):
    c = default.get_config()
    c.model, c.quant.per_channel, c.quant.weight_quantizer = (
      "tiny_cnn",
      per_channel,
      weight_quantizer,
    )
    (spec,), _ = build.build_specs(c, 10)
    x = jax.random.normal(jax.random.key(1, impl="rbg"), (2, 28, 28, 1))
    v = jax.jit(lambda x: spec.model.init(jax.random.key(0, impl="rbg"), x, train=False))(x)
    prec = precision.uniform(spec.layout, 2, 2)
    outs.append(jax.jit(lambda v: spec.model.apply(v | {"precision": prec}, x, train=False))(v))
  assert not np.allclose(outs[0], outs[1])


def _stream_net(precision_bits):
  c = default.get_config()
  c.model, c.quant.residual_bits = "tiny_resnet", 8
  c.quant.weight_quantizer = c.quant.act_quantizer = "lsq"
  (spec,), _ = build.build_specs(c, 10)
  x = jax.random.normal(jax.random.key(1, impl="rbg"), (4, 16, 16, 3))
  v = spec.model.init(jax.random.key(0, impl="rbg"), x, train=False)
  prec = precision.uniform(spec.layout, *precision_bits)
  return spec, v, prec, x


def test_int8_residual_stream_is_on_its_grid_and_the_identity_at_full_precision():
  """`quant.residual_bits=8` (config -> model): each stage has one learned stream step; a
  quantized block's output is an int8 multiple of it; at 32 bits (the teacher, stage one of
  a two-stage run) the network is the float-stream one, parameter for parameter."""
  spec, v, prec, x = _stream_net((4, 4))
  assert {"stage1_stream", "stage2_stream"} <= set(v["params"])
  assert not any("stream" in "/".join(p) for p in spec.layout.paths)  # no bits of its own
  out, inter = spec.model.apply(v | {"precision": prec}, x, train=False, capture_intermediates=True)
  for stage, block in ((1, "stage1_block1"), (2, "stage2_block1")):
    s = float(v["params"][f"stage{stage}_stream"]["act_clip"]) / np.sqrt(127.0)
    u = np.asarray(inter["intermediates"][block]["__call__"][0]) / s
    np.testing.assert_allclose(u, np.round(u), atol=1e-4)
    assert -128 <= u.min() and u.max() <= 127 and len(np.unique(np.round(u))) > 8
  float_stream = models.create_model("tiny_resnet", 10, weight_quantizer="lsq", act_quantizer="lsq")
  fp = precision.full_precision(spec.layout)
  plain = {"params": {k: a for k, a in v["params"].items() if "stream" not in k}, "batch_stats": v["batch_stats"]}
  np.testing.assert_array_equal(
    spec.model.apply(v | {"precision": fp}, x, train=False), float_stream.apply(plain | {"precision": fp}, x, train=False)
  )
  assert not np.allclose(out, float_stream.apply(plain | {"precision": prec}, x, train=False), atol=1e-3)


def test_int8_residual_stream_step_learns_and_calibrates():
  spec, v, prec, x = _stream_net((4, 4))
  grads = jax.grad(lambda p: spec.model.apply(v | {"params": p, "precision": prec}, x, train=False).sum())(v["params"])
  assert all(float(jnp.abs(grads[f"stage{i}_stream"]["act_clip"])) > 0 for i in (1, 2))
  fp = precision.full_precision(spec.layout)
  grads = jax.grad(lambda p: spec.model.apply(v | {"params": p, "precision": fp}, x, train=False).sum())(v["params"])
  assert float(grads["stage1_stream"]["act_clip"]) == 0.0  # not used at full precision
  _, upd = spec.model.apply(v | {"precision": prec}, x, train=True, mutable=["batch_stats", layers.CALIBRATION])
  level = upd[layers.CALIBRATION]["stage1_stream"]["act_clip"]
  assert float(level) != 1.0 and np.isfinite(float(level)) and float(level) > 0
