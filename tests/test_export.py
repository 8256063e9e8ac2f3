"""Integer export: packing, exact weight levels, per-layer integer arithmetic vs fake quant,
the inference paths (qnet, StableHLO without qnet, the QDQ ONNX on ONNX Runtime and OpenVINO),
the CLIs' errors. The QDQ graph's fusions and its codes layer by layer: test_qdq_onnx.py."""

import json
import os
import subprocess
import sys

import flax
import hypothesis.strategies as st
from hypothesis import given, settings
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from qnet.deploy import export, integer, lowering, packing
from qnet.train import loop
from qnet import models
from qnet.models import rules
from qnet.quant import quantizers as quant
from qnet.quant import precision as precision_lib
from qnet.data.datasets import DATASETS
from qnet.models import layers as qlayers

import flax.linen as nn

LAYER_TYPES = (nn.Conv, nn.Dense, qlayers.QuantConv, qlayers.QuantDense)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
U = 2.0**-24  # float32 unit roundoff


# ----------------------------------------------------------------------------- packing


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), shape=st.lists(st.integers(1, 7), min_size=1, max_size=3), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip_every_bit_width_and_odd_sizes(bits, shape, seed):
  codes = np.random.default_rng(seed).integers(0, 1 << bits, shape).astype(np.uint8)
  stream = packing.pack(codes, bits)
  assert stream.dtype == np.uint8 and stream.size == -(-codes.size * bits // 8)
  np.testing.assert_array_equal(packing.unpack(stream, bits, codes.shape), codes)


def test_packing_layout_is_a_dense_lsb_first_bitstream():
  assert packing.pack(np.array([1, 2, 3, 0]), 2).tolist() == [0b00111001]  # 4 codes a byte
  assert packing.pack(np.array([0xA, 0x5]), 4).tolist() == [0x5A]  # 2 codes a byte
  assert packing.pack(np.full(8, 7), 3).tolist() == [255, 255, 255]  # 8 codes in 3 bytes
  with pytest.raises(ValueError, match="out of range"):
    packing.pack(np.array([4]), 2)
  with pytest.raises(ValueError, match="bits=9"):
    packing.pack(np.array([4]), 9)


def test_unpack_gives_uint8_codes_and_names_a_wrong_stream_length():
  codes = packing.unpack(np.array([0x5A, 0x03], np.uint8), 4, (3,))
  assert codes.dtype == np.uint8 and codes.tolist() == [0xA, 0x5, 0x3]
  for n in (2, 4):  # 5 codes of 4 bits take ceil(20 / 8) = 3 bytes
    with pytest.raises(ValueError, match=rf"^stream has {n} bytes; 5 codes of 4 bits need 3$"):
      packing.unpack(np.zeros(n, np.uint8), 4, (5,))


@pytest.mark.parametrize("per_channel", [False, True])
def test_unpacked_levels_times_scale_equal_fake_quantized_weights_exactly(per_channel):
  kernel = np.random.default_rng(0).normal(0, 0.1, (3, 3, 5, 7)).astype(np.float32)
  for bits in range(1, 9):
    i = integer.weight_codes(kernel, bits, per_channel)
    back = packing.unpack(packing.pack(i, bits), bits, kernel.shape)
    wq = np.asarray(jax.jit(quant.quantize_weights, static_argnums=2)(kernel, bits, per_channel))
    np.testing.assert_array_equal(integer.dequantize_weights(back, bits), wq)
    # The integer codes c = 2i - n are the weights times n (to the float rounding of wq).
    n = integer.levels(bits)
    c = integer.signed_codes(back, bits)
    assert np.all(np.abs(c) <= n) and np.all(c % 2 == 1)
    np.testing.assert_allclose(c / n, wq, rtol=0, atol=2 * U)


@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_levels_and_steps_reproduce_the_fake_quantized_kernel_exactly(per_channel):
  rng = np.random.default_rng(3)
  kernel = rng.normal(0, 0.1, (3, 3, 5, 7)).astype(np.float32)
  top = np.max(np.abs(kernel), axis=(0, 1, 2) if per_channel else None)
  level = (top * rng.uniform(0.3, 0.9, np.shape(top))).astype(np.float32)  # large weights clip
  if per_channel:  # LSQ's step can turn negative in training: a mirrored grid, still exact
    level[2] = -level[2]
  lsq = jax.jit(quant.lsq_quantize, static_argnums=3)
  for bits in range(2, 9):
    qn = 2 ** (bits - 1)
    sqrt_qp = np.sqrt(np.float32(qn - 1))
    clip = (level / sqrt_qp).astype(np.float32)  # qnet's parameter t: clip level Q_p s ~ level
    i, step = integer.lsq_weight_codes(kernel, clip, bits)
    assert i.dtype == np.uint8 and step.dtype == np.float32 and step.shape == np.shape(clip)
    back = packing.unpack(packing.pack(i, bits), bits, kernel.shape)
    wq = np.asarray(lsq(kernel, clip, bits, True))
    np.testing.assert_array_equal(integer.dequantize_weights(back, bits, "lsq", step), wq)
    q = integer.signed_codes(back, bits, "lsq")
    assert -qn <= q.min() < 0 and q.max() == qn - 1  # the clip level Q_p s is reached
    if per_channel:  # channel 2's step is negative: positive weights have negative codes
      np.testing.assert_array_equal(np.sign(wq[..., 2]), -np.sign(q[..., 2]))
    np.testing.assert_allclose(step, clip / sqrt_qp, rtol=1e-6)  # s = weight_clip / sqrt(Q_p)
    parts = integer.weight_int8_parts(back, bits, "lsq")
    assert len(parts) == 1 and parts[0][1].dtype == np.int8  # int8 at 8 bits too: no split
    np.testing.assert_array_equal(parts[0][1], q)


@pytest.mark.parametrize("quantizer", ["dorefa", "pact", "lsq"])
def test_activation_codes_and_their_values_are_the_fake_quantizers(quantizer):
  x = jnp.asarray(np.random.default_rng(4).normal(0.5, 1.5, 4000).astype(np.float32))
  lsq = jax.jit(quant.lsq_quantize, static_argnums=3)  # as in evaluation: the step is jitted
  for bits in range(1, 9):
    # The clip level (the top code's value) is 1.37 for PACT and LSQ (LSQ's t = 1.37 / sqrt(n)).
    n = integer.levels(bits)
    clip = {"dorefa": 1.0, "pact": 1.37, "lsq": 1.37 / np.sqrt(n)}[quantizer]
    aq = integer.ActQuant(quantizer, bits, float(np.float32(clip)))
    op = {"bits": bits, **aq.attrs()}
    if quantizer == "dorefa":
      fq = quant.quantize_activations(x, bits)
    elif quantizer == "pact":
      fq = quant.pact_quantize(x, jnp.float32(clip), bits)
    else:
      fq = lsq(x, jnp.float32(clip), bits, False)
    j = jax.jit(lambda x: integer.quantize_codes(x, op))(x)
    assert int(j.max()) == integer.levels(bits) and int(j.min()) == 0
    np.testing.assert_array_equal(integer.dequantize_codes(j, op), fq)
    num, den = aq.step_ratio()
    np.testing.assert_allclose(np.asarray(fq), np.asarray(j) * num / den, rtol=3 * U, atol=0)


def test_thresholds_reproduce_round_clip_of_the_affine_map():
  rng = np.random.default_rng(1)
  scale = np.array([0.013, -0.021, 0.0, 0.002])
  shift = np.array([-3.3, 8.1, 2.2, 40.0])
  acc = rng.integers(-3000, 3000, (500, 4))
  sign, u = integer.thresholds(scale, shift, 4)
  codes = np.sum((acc * sign)[..., None] >= u, axis=-1)
  np.testing.assert_array_equal(codes, np.clip(np.round(acc * scale + shift), 0, 15))


# ----------------------------------------------------------------------------- per layer


def random_net(name, shape, seed=0, **settings):
  """An initialised model with non-trivial BatchNorm statistics and affine parameters, and
  learned clip levels (LSQ, PACT; `settings` are the model's quantizer settings) away from
  their placeholders: a weight clip of 0.3..0.9 max|w| (so large weights clip; per channel,
  channel 0's negated), activation clips of 0.5..3."""
  model = models.create_model(name, 10, **settings)
  v = model.init(jax.random.key(seed), jnp.zeros((1, *shape)), train=False)
  rng = np.random.default_rng(seed)
  stats = jax.tree.map(lambda a: a + rng.uniform(0.05, 0.5, a.shape).astype(np.float32), v["batch_stats"])
  params = jax.tree_util.tree_map_with_path(
    lambda p, a: a + rng.normal(0, 0.3, a.shape).astype(np.float32)
    if jax.tree_util.keystr(p).endswith(("['bias']", "['scale']"))
    else a,
    v["params"],
  )

  def set_clips(node):
    if not isinstance(node, dict):
      return node
    node = {k: set_clips(a) for k, a in node.items()}
    if "weight_clip" in node:
      c = node["weight_clip"]
      axes = tuple(range(node["kernel"].ndim - 1)) if np.ndim(c) else None
      top = np.max(np.abs(np.asarray(node["kernel"])), axis=axes)
      node["weight_clip"] = (top * rng.uniform(0.3, 0.9, np.shape(c))).astype(np.float32)
      if np.ndim(c):  # a negative per-channel step, as LSQ training can make one
        node["weight_clip"][0] *= -1
    if "act_clip" in node:
      node["act_clip"] = np.float32(rng.uniform(0.5, 3.0))
    return node

  return model, set_clips(flax.core.unfreeze(params)), stats


def bits_for(model, shape, w, a, keep_first_last_fp, mixed=False, override=None):
  """`(bits dict, precision tree)`; `override` maps layer paths to their `(w, a)`."""
  layout = precision_lib.layout_of(model, jnp.zeros((1, *shape)))
  wv, av = precision_lib.layer_bits(layout, w, a, keep_first_last_fp)
  wv, av = np.asarray(wv).astype(int), np.asarray(av).astype(int)
  if mixed:  # per-layer bits: cycle through 2..8 where the layer is quantized
    cycle = [2, 5, 8, 3, 4, 6, 7]
    wv = np.where(wv < 32, [cycle[i % 7] for i in range(len(wv))], wv)
    av = np.where(av < 32, [cycle[(i + 3) % 7] for i in range(len(av))], av)
  for path, (wo, ao) in (override or {}).items():
    i = ["/".join(p) for p in layout.paths].index(path)
    wv[i], av[i] = wo, ao
  tree = layout.tree(jnp.asarray(wv, jnp.float32), jnp.asarray(av, jnp.float32))
  return {"/".join(p): (int(wv[i]), int(av[i])) for i, p in enumerate(layout.paths)}, tree


def _node(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


@pytest.fixture
def per_channel_weights(monkeypatch):
  """Makes the fake-quant model quantize weights per channel, as `quant.per_channel=True`
  does once build.py wires the flag into the layers (the exporter reads it from the config)."""
  original = quant.quantize_weights
  monkeypatch.setattr(quant, "quantize_weights", lambda w, b, per_channel=False: original(w, b, True))


USER_MODEL = "test_rules:UserResNet"  # importable: pytest puts tests/ on sys.path

# Rules that mix quantizers layer by layer (README: "Rules decide per layer"), every layer
# quantized; the stem's input stays the image.
MIXED_RULES = (
  rules.Rule(select="first_conv", quantize_input=False, weight_quantizer="lsq"),
  rules.Rule(pattern=".*/Conv_0", weight_quantizer="lsq", act_quantizer="pact", per_channel=True),
  rules.Rule(pattern=".*/Conv_1", act_quantizer="lsq"),
  rules.Rule(select="last_dense", weight_quantizer="lsq", act_quantizer="pact"),
)

CASES = [
  ("fmnist_cnn", 4, 4, True, False, False),
  ("fmnist_cnn", 2, 2, False, True, False),
  ("fmnist_cnn", 3, 3, True, False, False),
  ("fmnist_cnn", 0, 0, False, False, True),  # per-layer mixed bits 2..8
  ("resnet20", 2, 2, False, False, False),
  ("tiny_resnet", 4, 4, True, True, True),
  # A user's unmodified Flax ResNet quantized by rules (tests/test_rules.py), exported from
  # its own traced forward like every model.
  (USER_MODEL, 4, 4, True, False, False),
  (USER_MODEL, 2, 2, True, True, False),
  (USER_MODEL, 3, 3, True, False, True),
  # keep_first_last_fp=False: the stem and the classifier quantized; the classifier quantizes
  # the model's own global mean (a float `mean` op, then its quantizer).
  (USER_MODEL, 4, 4, False, False, False),
  (USER_MODEL, 2, 2, False, True, False),
  ("test_rules:BiasCNN", 4, 4, True, False, False),  # nn.Conv's default bias
  ("test_rules:BiasCNN", 3, 3, False, True, False),
  ("alexnet_bn", 4, 4, True, False, False),
  ("alexnet_bn", 3, 3, True, False, False),
  ("alexnet_bn", 2, 2, False, True, False),
]


@pytest.mark.parametrize("name,w,a,keep_fp,per_channel,mixed", CASES)
@pytest.mark.heavy
def test_integer_layers_equal_fake_quant_layer_by_layer(request, name, w, a, keep_fp, per_channel, mixed):
  if per_channel:
    request.getfixturevalue("per_channel_weights")
  ds = DATASETS["fashion_mnist" if "cnn" in name else "cifar10"]
  shape = (28, 28, 1) if "cnn" in name else (67, 67, 3) if "alexnet" in name else (32, 32, 3)
  settings = {} if ":" not in name else {"keep_first_last_fp": keep_fp}  # a user model's rules
  model, params, stats = random_net(name, shape, **settings)
  bits, tree = bits_for(model, shape, w or 4, a or 4, keep_fp, mixed)
  program = lowering.build_program(
    model, params, stats, bits, input_shape=shape, mean=ds.mean, std=ds.std, per_channel=per_channel
  )
  if name == USER_MODEL and not keep_fp:
    assert program.layers["Dense_0"]["integer"] and "mean" in {op["op"] for op in program.ops}
  check_against_fake_quant(
    program, model, params, stats, tree, ds, shape,
    require_requant=not keep_fp or "resnet" in name.lower(),
  )


LEARNED = [  # name, w, a, keep_fp, per_channel, mixed, weight_quantizer, act_quantizer
  ("tiny_cnn", 4, 4, False, False, False, "lsq", "lsq"),
  ("tiny_cnn", 3, 3, False, True, True, "lsq", "lsq"),  # per channel; mixed: 8-bit LSQ codes
  ("tiny_cnn", 2, 2, False, False, False, "dorefa", "pact"),
  ("tiny_resnet", 4, 4, True, True, True, "lsq", "pact"),  # float residual stream, relu edges
]


@pytest.mark.parametrize("name,w,a,keep_fp,per_channel,mixed,wq,aq", LEARNED)
@pytest.mark.heavy
def test_learned_quantizers_integer_program_equals_fake_quant_on_every_path(
  name, w, a, keep_fp, per_channel, mixed, wq, aq
):
  ds = DATASETS["fashion_mnist" if "cnn" in name else "cifar10"]
  shape = (28, 28, 1) if "cnn" in name else (32, 32, 3)
  settings = dict(per_channel=per_channel, weight_quantizer=wq, act_quantizer=aq)
  model, params, stats = random_net(name, shape, **settings)
  # A float head on quantized codes (dequantized by the activation quantizer's formula).
  override = {"head": (32, a)} if not keep_fp else None
  bits, tree = bits_for(model, shape, w, a, keep_fp, mixed, override)
  program = lowering.build_program(
    model, params, stats, bits, input_shape=shape, mean=ds.mean, std=ds.std, per_channel=per_channel,
    weight_quantizer=wq, act_quantizer=aq,
  )
  assert program.quantizers == {"weight": wq, "act": aq}
  kinds = {op["op"] for op in program.ops}
  assert {"requant", "quantize" if "resnet" in name else "dequant_codes"} <= kinds
  assert ("relu" in kinds) == keep_fp  # 32-bit inputs of a learned-quantizer net: plain ReLU
  for path, layer in program.layers.items():  # the steps come from this layer's clip levels
    node = _node(params, path)
    if layer["act_quantizer"]:
      clip = np.float32(node["act_clip"]) if aq != "dorefa" else np.float32(1)
      n = integer.levels(layer["act_bits"])
      step = float(clip / np.sqrt(np.float32(n))) if aq == "lsq" else float(clip) / n
      assert (layer["act_quantizer"], layer["act_clip"]) == (aq, float(clip))
      assert np.isclose(layer["act_step"], step, rtol=1e-6, atol=0)  # LSQ: rsqrt in the jit
    if layer["weight_quantizer"] == "lsq":
      qp = np.float32(2 ** (layer["weight_bits"] - 1) - 1)
      want = np.asarray(node["weight_clip"], np.float32) / np.sqrt(qp)
      np.testing.assert_allclose(program.arrays[f"{path}.weight_step"], want, rtol=1e-6)
      assert program.arrays[f"{path}.weight_step"].shape == ((want.size,) if per_channel else ())
  images, logits = check_against_fake_quant(
    program, model, params, stats, tree, ds, shape, require_requant=True
  )
  # The same program through StableHLO and the QDQ ONNX on ONNX Runtime.
  from jax import export as jax_export
  import onnxruntime as ort

  from qnet.deploy import qdq_onnx

  hlo = jax_export.deserialize(bytearray(export.stablehlo_bytes(program))).call(images)
  sess = ort.InferenceSession(
    qdq_onnx.to_onnx(program).SerializeToString(), providers=["CPUExecutionProvider"]
  )
  np.testing.assert_allclose(np.asarray(hlo), logits, rtol=0, atol=1e-5)
  onnx_logits = sess.run(["logits"], {"image": images})[0]
  np.testing.assert_array_equal(np.argmax(onnx_logits, -1), np.argmax(logits, -1))
  np.testing.assert_allclose(onnx_logits, logits, rtol=1e-5, atol=1e-4)


def _code_units(program, op):
  """`((w_num, w_den), (a_num, a_den))`: an integer layer's weight code `c` is worth
  `c w_num / w_den` (DoReFa `(1, n_w)`, LSQ `(s, 1)` per channel) and its input code `j`
  `j a_num / a_den` (DoReFa `(1, n_a)`, PACT / LSQ `(step, 1)`)."""
  nw, na = integer.levels(op["weight_bits"]), integer.levels(op["in_bits"])
  if op["weight_quantizer"] == "lsq":
    w = (np.asarray(program.arrays[op["weight_step"]], np.float64), 1)
  else:
    w = (1.0, nw)
  a = (1.0, na) if op["in_quantizer"] == "dorefa" else (op["in_step"], 1)
  return w, a


def fake_codes(z, op):
  """The codes the fake-quant network's activation quantizer gives the float32 input `z`
  (its own float32 formulas, transcribed), and `1 / step` (z times it is the unrounded code)."""
  n = integer.levels(op["bits"])
  if op["quantizer"] == "pact":
    alpha = np.float32(op["clip"])
    return np.round(np.clip(z, 0, alpha) * np.float32(n) / alpha), n / np.float64(alpha)
  if op["quantizer"] == "lsq":
    s = np.float32(op["step"])
    return np.round(np.clip(z / s, 0, np.float32(n))), 1 / np.float64(s)
  z = z.astype(np.float64)
  return np.clip(np.round(z * n), 0, n), n


def check_against_fake_quant(program, model, params, stats, tree, ds, shape, require_requant, logits_rtol=0.05):
  """The program's integer layers and requants vs the fake-quant network, layer by layer:
  every accumulator within the fake-quant side's float32 error, every code disagreement a
  tie, the same top-1 and close logits. Returns `(images, logits)`.

  The layer-by-layer check runs the program op by op with every integer layer fed the
  fake-quant network's own input codes: a tie changes one code, and downstream every value
  whose window covers it, so unforced the two networks compute the same function on slightly
  different inputs. Forced, the logits must agree within 1e-3 of their largest; unforced (as
  deployed) the top-1 must agree and the logits within `logits_rtol` (a deep float residual
  stream carries a tie's consequence further than a shallow net does)."""
  images = np.random.default_rng(2).integers(0, 256, (6, *shape)).astype(np.uint8)
  logits = integer.make_apply(program)(images)
  x = (images.astype(np.float32) / 255.0 - np.float32(ds.mean)) / np.float32(ds.std)
  variables = {"params": params, "batch_stats": stats, "precision": tree}

  def run(v, x):
    inputs = {}  # each layer's input as the fake-quant network sees it

    def grab(next_fun, args, kwargs, context):
      if context.method_name == "__call__" and isinstance(context.module, LAYER_TYPES):
        # The last call wins: a rules model first traces its layers for their paths.
        inputs["/".join(context.module.path)] = args[0]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
      out = model.apply(v, x, train=False, capture_intermediates=True, mutable=["intermediates"])
    return out, inputs

  (fq_logits, state), fq_inputs = jax.jit(run)(variables, x)
  inter = flax.core.unfreeze(state["intermediates"])

  def is_integer(op):
    return op["op"] in ("conv", "dense") and op["in_bits"] < 32 and op["weight_bits"] < 32

  producer = {op["out"]: op for op in program.ops}
  arrays = {k: jnp.asarray(v) for k, v in integer.runtime_arrays(program).items()}
  values, forced = {"image": jnp.asarray(images)}, {}
  for op in program.ops:  # the program, each integer layer on the fake-quant codes
    env = values
    if is_integer(op):
      source = producer[op["in"][0]]
      while source["op"] == "maxpool":
        source = producer[source["in"][0]]
      forced[op["out"]] = integer.quantize_codes(fq_inputs[op["layer"]], source)
      env = {**values, op["in"][0]: forced[op["out"]]}
    values[op["out"]] = integer._run_op(op, env, arrays)

  int_layers = [op for op in program.ops if is_integer(op)]
  assert int_layers, "no integer layer to check"
  acc_error = {}  # bound of the fake-quant side's float32 error, in accumulator units
  for op in int_layers:
    acc = np.asarray(values[op["out"]]).astype(np.float64)
    y = np.asarray(_node(inter, op["layer"])["__call__"][0]).astype(np.float64)
    nw = integer.levels(op["weight_bits"])
    (w_num, w_den), (a_num, a_den) = _code_units(program, op)
    j = np.asarray(forced[op["out"]]).astype(np.int32)
    signed = integer.signed_codes(program.arrays[op["weight"]], op["weight_bits"], op["weight_quantizer"])
    c = np.abs(signed).astype(np.int32)
    if op["weight_quantizer"] == "dorefa":
      # |c| + 2 n_w: a weight 2 (i / n) - 1 carries an absolute float32 error up to 2u (from
      # rounding i / n), which is 2 n_w u in code units, whatever the size of c. (LSQ's
      # weight q s is one rounding: relative.)
      c = c + 2 * nw
    fan_in = np.prod(c.shape[:-1])
    slack = 4 if op["in_quantizer"] == "pact" else 3  # PACT's j alpha / n: two roundings
    if op["op"] == "conv":
      total = integer._conv(j, c, op, jnp.int32)
    elif op["reduce"] == "mean" and j.ndim == 4:
      total = np.sum(np.asarray(integer._dot(j, c, jnp.int32)), axis=(1, 2))
      slack += j.shape[1] * j.shape[2]
      y = y * j.shape[1] * j.shape[2]
    else:
      total = integer._dot(j.reshape(j.shape[0], -1), c, jnp.int32)
    total = np.asarray(total).astype(np.float64)
    if "bias" in _node(params, op["layer"]):  # the fake-quant side added it: remove it (rounding included)
      bias = np.asarray(_node(params, op["layer"])["bias"]).astype(np.float64)
      total = total + 2 * np.abs(bias + y) * w_den * a_den / (w_num * a_num)
      mean = op["op"] == "dense" and op["reduce"] == "mean" and j.ndim == 4
      y = y - bias * (j.shape[1] * j.shape[2] if mean else 1)
    # acc is exact; the fake-quant sum of K rounded products is within (K + 3) u sum|terms|.
    err = (fan_in + slack) * U * total
    assert np.all(np.abs(y * w_den * a_den / (w_num * a_num) - acc) <= err), op["layer"]
    acc_error[op["out"]] = err

  requants = [op for op in program.ops if op["op"] == "requant"]
  checked = 0
  for op in requants:
    codes = np.asarray(values[op["out"]]).astype(np.int64)
    acc = np.asarray(values[op["in"][0]]).astype(np.float64)
    # The float value the fake quantizer rounds: the BatchNorm's output, or the layer's own.
    source = op["bn"] or next(o["layer"] for o in program.ops if o["out"] == op["in"][0])
    z32 = np.asarray(_node(inter, source)["__call__"][0])
    expected, inv_step = fake_codes(z32, op)
    z = z32.astype(np.float64) * inv_step  # the unrounded code
    differ = codes != expected
    # Every disagreement is a tie: z lies within the fake-quant side's float32 error (of the
    # accumulator, scaled, plus the BatchNorm's and the quantizer's few roundings) of a
    # boundary m - 1/2.
    scale, shift = program.arrays[op["scale"]], program.arrays[op["shift"]]
    tol = np.abs(scale) * acc_error[op["in"][0]] + 16 * U * (np.abs(scale * acc) + np.abs(shift) + 1)
    distance = np.abs(z - (np.floor(z) + 0.5))
    assert np.all(np.abs(codes - expected)[differ] == 1)
    assert np.all(distance[differ] <= tol[differ]), (op["bn"], distance[differ], tol[differ])
    assert differ.mean() < 0.01
    checked += codes.size
  if require_requant:
    assert requants and checked
  top = float(np.abs(fq_logits).max())
  np.testing.assert_allclose(values["logits"], fq_logits, atol=1e-3 * top)
  np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(fq_logits, -1))
  np.testing.assert_allclose(logits, fq_logits, atol=logits_rtol * top)
  return images, np.asarray(logits)


@pytest.mark.heavy
def test_resnet18_program_shapes_and_sizes():
  model = models.create_model("resnet18", 1000)
  shape = (224, 224, 3)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), v["params"])
  stats = jax.tree.map(lambda s: np.ones(s.shape, np.float32), v["batch_stats"])
  bits, _ = bits_for(model, shape, 2, 2, True)
  ds = DATASETS["imagenet2012"]
  program = lowering.build_program(model, params, stats, bits, input_shape=shape, mean=ds.mean, std=ds.std)
  out = jax.eval_shape(integer.make_apply(program), jax.ShapeDtypeStruct((2, *shape), jnp.uint8))
  assert out.shape == (2, 1000) and out.dtype == jnp.float32
  tensors, _ = export.stored_tensors(program)
  sizes = export.size_report(program, tensors, integer.fp32_bytes(params, stats))
  # The quantized layers take k/32 of their FP32 bytes, plus at most 2% for requant.
  assert sizes["quantized_weights_packed_bytes"] == sizes["quantized_weights_k_over_32_bytes"]
  assert sizes["quantized_weights_packed_bytes"] * 16 == sizes["quantized_weights_fp32_bytes"]
  assert sizes["requant_overhead_fraction_of_fp32"] < 0.02
  assert {op["op"] for op in program.ops} >= {"conv", "requant", "add", "maxpool", "relu", "batchnorm"}


# ----------------------------------------------------------------------------- end to end


def train_tiny(workdir, data_dir, **overrides):
  c = default.get_config()
  c.update_from_flattened_dict(
    {
      "dataset": "fashion_mnist",
      "data_dir": data_dir,
      "model": "tiny_cnn",
      "batch_size": 8,
      "num_train_steps": 3,
      "eval_every_steps": 3,
      "checkpoint_every_steps": 3,
      "log_every_steps": 3,
      "augment": False,
      "quant.weight_bits": 3,
      "quant.act_bits": 3,
      "quant.keep_first_last_fp": False,
      **overrides,
    }
  )
  loop.train_and_evaluate(c, str(workdir))
  return c


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, fake_data_dir):
  workdir = tmp_path_factory.mktemp("tiny_run")
  train_tiny(workdir, fake_data_dir)
  return str(workdir)


def cli(module, *args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run(
    [sys.executable, "-m", f"qnet.{module}", *args], capture_output=True, text=True, cwd=ROOT, env=env
  )


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("exports") / "tiny")
  r = cli("export", f"--workdir={tiny_run}", f"--out={out}")
  assert r.returncode == 0, r.stderr[-2000:]
  return out


_NO_QNET = """
import sys, json, numpy as np
sys.path = [p for p in sys.path if p not in ('', {root!r})]
try:
  import qnet
except ImportError:
  pass
else:
  raise SystemExit('qnet is importable')
import jax
from jax import export
images = np.load({images!r})
f = export.deserialize(open({hlo!r}, 'rb').read())
np.save({result!r}, np.asarray(f.call(images)))
"""


@pytest.mark.slow
def test_three_paths_agree_and_match_fake_quant_top1(exported, fake_data_dir, tmp_path):
  check_export_paths(exported, fake_data_dir, tmp_path)


@pytest.fixture(scope="module")
def lsq_exported(tmp_path_factory, fake_data_dir):
  """A tiny LSQ run (per-channel weights, LSQ activations; clip levels from the first-batch
  calibration, then trained) exported with the CLI."""
  workdir = tmp_path_factory.mktemp("lsq_run")
  overrides = {"quant.weight_quantizer": "lsq", "quant.act_quantizer": "lsq", "quant.per_channel": True}
  train_tiny(workdir, fake_data_dir, **overrides)
  out = str(tmp_path_factory.mktemp("exports") / "lsq")
  r = cli("export", f"--workdir={workdir}", f"--out={out}")
  assert r.returncode == 0, r.stderr[-2000:]
  return out


@pytest.mark.slow
def test_lsq_run_exports_and_its_three_paths_match_fake_quant(lsq_exported, fake_data_dir, tmp_path):
  program, manifest = check_export_paths(lsq_exported, fake_data_dir, tmp_path)
  assert manifest["format"] == export.FORMAT
  assert manifest["quantizers"] == {"weight": "lsq", "act": "lsq"}
  layer = manifest["layers"]["conv2_1"]
  assert (layer["weight_quantizer"], layer["act_quantizer"], layer["integer"]) == ("lsq", "lsq", True)
  assert layer["tensors"] == ["conv2_1.levels", "conv2_1.weight_step"]
  assert manifest["tensors"]["conv2_1.weight_step"] == {"dtype": "float32", "shape": [8]}
  assert manifest["tensors"]["conv2_1.levels"]["quantizer"] == "lsq"
  steps = [layer["act_step"] for layer in manifest["layers"].values() if layer["act_step"]]
  assert steps and all(s != 1 / 7 for s in steps)  # calibrated, not DoReFa's 1/n
  # The dequantized head is worth acc * (per-channel weight step) * (activation step).
  (dequant,) = [op for op in program.ops if op["op"] == "dequant"]
  want = program.arrays["head.weight_step"].astype(np.float64) * manifest["layers"]["head"]["act_step"]
  np.testing.assert_allclose(program.arrays[dequant["factor"]], want, rtol=U)


def check_export_paths(exported, fake_data_dir, tmp_path):
  """An export's qnet-integer, StableHLO (run where qnet is not importable) and ONNX Runtime
  logits agree, and `qnet.evaluate` finds no top-1 difference from fake quant. Returns
  `(program, manifest)`."""
  program, manifest = export.load_export(exported)
  assert manifest["source"]["step"] == 3 and manifest["source"]["eval_accuracy"] is not None
  assert {tuple(v) for v in export.info_bits(manifest)} == {(3, 3), (3, 32)}  # stem: image input
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (7, 28, 28, 1)).astype(np.uint8)
  np.save(tmp_path / "images.npy", images)
  ours = np.asarray(integer.make_apply(program)(images))

  # StableHLO in a Python where qnet is not importable (no worktree, no editable finder).
  script = _NO_QNET.format(
    root=ROOT, images=str(tmp_path / "images.npy"), hlo=os.path.join(exported, "model.stablehlo"),
    result=str(tmp_path / "hlo.npy"),
  )
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
  r = subprocess.run([sys.executable, "-S", "-c", _site_without_qnet() + script], capture_output=True, text=True, cwd=str(tmp_path), env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  hlo = np.load(tmp_path / "hlo.npy")

  import onnxruntime as ort

  sess = ort.InferenceSession(os.path.join(exported, "model.onnx"), providers=["CPUExecutionProvider"])
  onnx_logits = sess.run(["logits"], {"image": images})[0]
  np.testing.assert_allclose(hlo, ours, rtol=0, atol=1e-5)
  np.testing.assert_allclose(onnx_logits, ours, rtol=1e-5, atol=1e-4)

  from qnet.deploy import evaluate

  result = evaluate.evaluate(exported, fake_data_dir, batch_size=8)
  assert result["test_images"] == 23
  for name in evaluate.PATHS:
    row = result["paths"][name]
    assert row["top1_differs_from_fake_quant"] == 0, (name, row)
    assert row["accuracy"] == result["paths"]["fake_quant"]["accuracy"]
  assert result["paths"]["fake_quant"]["accuracy"] == pytest.approx(manifest["source"]["eval_accuracy"])
  assert set(result["paths"]) == {"fake_quant", *evaluate.PATHS, *evaluate.FLOAT_PATHS}
  return program, manifest


def _site_without_qnet() -> str:
  """Preamble for `python -S`: this environment's site-packages (as the test process sees
  them) with their .pth files processed, except qnet's editable-install finder."""
  import site

  return (
    "import site, sys, os\n"
    f"for d in {site.getsitepackages()!r}:\n"
    "  sys.path.append(d)\n"
    "  for f in sorted(os.listdir(d)):\n"
    "    if f.endswith('.pth') and 'qnet' not in f:\n"
    "      site.addpackage(d, f, set())\n"
  )


@pytest.mark.slow
def test_manifest_records_sizes_hashes_and_layers(exported):
  _, manifest = export.load_export(exported)
  assert set(manifest["files"]) == {
    "weights.safetensors", "model.stablehlo", "model.onnx", "model_fp32.onnx", "model.tflite"
  }
  forms = manifest["files"]["model.onnx"]["layer_forms"]
  assert forms["conv2_1"]["form"] == "QLinearConv"  # integer to integer: the int8 kernel
  assert manifest["files"]["model.tflite"]["layer_forms"]["conv2_1"]["form"] == "int8 CONV_2D"
  s = manifest["sizes"]
  # k/32 of the FP32 bytes (3 bits here), up to one padding byte a layer; requant < 2%.
  slack = s["quantized_weights_packed_bytes"] - s["quantized_weights_k_over_32_bytes"]
  assert s["quantized_weights_k_over_32_bytes"] == s["quantized_weights_fp32_bytes"] * 3 / 32
  assert 0 <= slack < len(manifest["layers"])
  assert s["requant_overhead_fraction_of_fp32"] < 0.02
  assert s["export_files_bytes"]["weights.safetensors"] == manifest["files"]["weights.safetensors"]["bytes"]
  assert manifest["input"] == {"name": "image", "shape": ["batch", 28, 28, 1], "dtype": "uint8", "layout": "NHWC"}
  assert manifest["layers"]["conv2_1"]["integer"] and manifest["layers"]["head"]["integer"]
  assert not manifest["layers"]["stem"]["integer"]


@pytest.mark.slow
def test_evaluate_speed_times_every_path_at_each_batch_and_thread_count(exported):
  from qnet.deploy import evaluate

  program, _ = export.load_export(exported)
  s = evaluate.speed(exported, program, batches=(1, 3), seconds=0.01, rounds=2)
  cores = os.cpu_count()
  want = {
    f"{p}|threads={t}|batch={b}"
    for p in (*evaluate.PATHS, *evaluate.FLOAT_PATHS)
    for t in sorted({1, cores}) if p not in evaluate.JAX_PATHS or t == cores
    for b in (1, 3)
  }
  assert set(s["median_images_per_s"]) == want
  assert all(v > 0 for v in s["median_images_per_s"].values())
  # Every path but the FP32 twin itself has its ratio to the twin at the same threads and batch.
  assert set(s["median_ratio_vs_onnxruntime_fp32"]) == {k for k in want if not k.startswith("onnxruntime_fp32|")}
  assert s["rounds"] == 2 and isinstance(s["cpu_flags"], list)
  assert "litert|threads=1|batch=3" in evaluate.format_speed({"speed": s})


@pytest.mark.slow
def test_tensorrt_flavour_export_keeps_tensorrts_rules(tiny_run, tmp_path):
  from qnet.deploy import qdq_onnx

  program, info = export.program_from_run(tiny_run)
  out = str(tmp_path / "trt")
  manifest = export.write_export(out, program, info, onnx_flavour="tensorrt")
  assert manifest["files"]["model.onnx"]["flavour"] == "tensorrt"
  onnx = pytest.importorskip("onnx")
  assert qdq_onnx.tensorrt_violations(onnx.load(os.path.join(out, "model.onnx"))) == []
  program_8, info_8 = export.program_from_run(tiny_run)
  for op in program_8.ops:  # the same network with 8-bit codes: int8 cannot hold them
    if op["op"] in ("quantize", "requant"):
      op["bits"] = 8
  with pytest.raises(export.ExportError, match="--onnx_flavour: .*at most 7 bits"):
    export.write_export(str(tmp_path / "trt8"), program_8, info_8, onnx_flavour="tensorrt")
  assert not os.path.exists(tmp_path / "trt8")
  assert [p for p in os.listdir(tmp_path) if p.startswith(".trt8")] == []  # no temporary left


def _one_line_exit_2(r, pattern):
  assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
  lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and pattern in lines[0], r.stderr[-2000:]


def _edited_run(tiny_run, tmp_path, edit):
  import shutil

  workdir = tmp_path / "run"
  shutil.copytree(tiny_run, workdir)
  path = workdir / "config.json"
  saved = json.loads(path.read_text())
  edit(saved)
  path.write_text(json.dumps(saved))
  return str(workdir)


@pytest.mark.slow
def test_bad_inputs_are_one_line_exit_2_and_leave_no_out(tiny_run, exported, tmp_path):
  out = tmp_path / "out"
  r = cli("export", f"--workdir={tmp_path}", f"--out={out}")
  _one_line_exit_2(r, "holds no checkpoint")
  assert not out.exists()
  r = cli("export", f"--workdir={tiny_run}", f"--out={out}", "--onnx_flavour=trt")
  _one_line_exit_2(r, "--onnx_flavour='trt': one of onnxruntime, tensorrt")
  assert not out.exists()

  fp = _edited_run(tiny_run, tmp_path / "fp", lambda s: s["config"]["quant"].update(weight_bits=32, act_bits=32))
  r = cli("export", f"--workdir={fp}", f"--out={out}")
  _one_line_exit_2(r, "nothing to quantize")
  assert not out.exists()

  relu = _edited_run(tiny_run, tmp_path / "relu", lambda s: s["config"].update(model_act="relu"))
  r = cli("export", f"--workdir={relu}", f"--out={out}")
  _one_line_exit_2(r, "config.model_act='relu' is the plain FP network")
  assert not out.exists()

  # A config whose quantizer the checkpoint has no clip levels for (edited, not trained):
  # found once the checkpoint is read (after orbax's log lines), still one error line.
  pact = _edited_run(tiny_run, tmp_path / "pact", lambda s: s["config"]["quant"].update(act_quantizer="pact"))
  r = cli("export", f"--workdir={pact}", f"--out={out}")
  assert r.returncode == 2, r.stderr[-2000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("qnet.export: error:") and "has no 'act_clip' parameter" in last
  assert not out.exists()

  w16 = _edited_run(tiny_run, tmp_path / "w16", lambda s: s["config"]["quant"].update(weight_bits=16))
  r = cli("export", f"--workdir={w16}", f"--out={out}")
  _one_line_exit_2(r, "weight_bits=16")
  assert not out.exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # no temporary left

  before = sorted(os.listdir(exported))
  r = cli("export", f"--workdir={tiny_run}", f"--out={exported}")
  _one_line_exit_2(r, "exists")
  assert sorted(os.listdir(exported)) == before

  import shutil

  damaged = tmp_path / "damaged"
  shutil.copytree(exported, damaged)
  with open(damaged / "weights.safetensors", "r+b") as f:
    f.seek(-1, 2)
    last = f.read(1)
    f.seek(-1, 2)
    f.write(bytes([last[0] ^ 1]))
  r = cli("evaluate", f"--export={damaged}")
  _one_line_exit_2(r, "sha256")


@pytest.mark.slow
def test_midway_progressive_checkpoint_exports_the_phase_precision(tiny_run, tmp_path):
  def progressive(s):
    s["config"]["schedule"]["kind"] = "progressive"
    s["config"]["quant"].update(weight_bits=2, act_bits=2)
    s["total_steps"] = 12  # ladder 32, 8, 4, 2: phases start at 0, 3, 6, 9; step 3 is W8A8

  workdir = _edited_run(tiny_run, tmp_path, progressive)
  program, info = export.program_from_run(workdir)
  p = info["precision"]
  assert (p["phase"], p["num_phases"], p["phase_bits"], p["target_bits"]) == (1, 4, [8.0, 8.0], [2, 2])
  assert not p["final_phase"]
  assert {(v["weight_bits"], v["act_bits"]) for v in program.layers.values()} == {(8, 8), (8, 32)}


def test_rules_that_mix_quantizers_export_each_layer_with_its_own():
  shape, ds = (16, 16, 1), DATASETS["fashion_mnist"]
  model, params, stats = random_net(USER_MODEL, shape, rules="test_export:MIXED_RULES")
  bits, tree = bits_for(model, shape, 3, 4, False)
  program = lowering.build_program(model, params, stats, bits, input_shape=shape, mean=ds.mean, std=ds.std)
  kinds = {p: (l["weight_quantizer"], l["act_quantizer"]) for p, l in program.layers.items()}
  assert kinds == {
    "Conv_0": ("lsq", None),  # its input is the float image
    "UserBlock_0/Conv_0": ("lsq", "pact"),
    "UserBlock_0/Conv_1": ("dorefa", "lsq"),
    "Dense_0": ("lsq", "pact"),
  }
  assert program.quantizers == {"weight": "mixed", "act": "mixed"}
  step = program.arrays["UserBlock_0/Conv_0.weight_step"]
  assert step.shape == (program.arrays["UserBlock_0/Conv_0.levels"].shape[-1],)  # per channel
  check_against_fake_quant(program, model, params, stats, tree, ds, shape, require_requant=True)


def test_an_op_the_lowering_cannot_handle_is_one_line_naming_it_and_the_layer():
  import flax.linen as nn

  class Gelu(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train=True):
      x = nn.Conv(4, (3, 3), use_bias=False)(x)
      x = nn.BatchNorm(use_running_average=not train)(x)
      x = nn.gelu(nn.Conv(4, (3, 3), use_bias=False)(nn.relu(x)))
      return nn.Dense(self.num_classes)(x.mean((1, 2)))

  model = rules.quantize(Gelu())
  shape = (16, 16, 1)
  v = model.init(jax.random.key(0), jnp.zeros((1, *shape)), train=False)
  bits, _ = bits_for(model, shape, 4, 4, True)
  ds = DATASETS["fashion_mnist"]
  with pytest.raises(integer.UnsupportedModel, match=r"^op (erf|tanh|integer_pow|mul|pow)\b.* \(after layer Conv_1\) has no integer lowering"):
    lowering.build_program(model, v["params"], v["batch_stats"], bits, input_shape=shape, mean=ds.mean, std=ds.std)



@pytest.mark.parametrize("cin,cout", [(16, 16), (3, 8), (16, 32)])
def test_small_integer_convs_are_widened_on_the_cpu_and_stay_exact(cin, cout):
  """XLA's CPU int8 conv with fewer than 32 input and output channels is slow: the kernel gets
  zero output channels up to `CPU_INT8_MIN_CHANNELS` there, sliced off again, and the int32
  sums equal a float32 reference (exact: every partial sum is an integer far below 2^24)."""
  rng = np.random.default_rng(cin * cout)
  x = jnp.asarray(rng.integers(0, 16, (2, 7, 9, cin)), jnp.int8)
  w = jnp.asarray(rng.integers(-7, 8, (3, 3, cin, cout)), jnp.int8)
  op = {"strides": [2, 1], "padding": [[1, 1], [0, 2]]}
  conv = jax.jit(lambda a, b: integer._conv(a, b, op, jnp.int32))
  got = np.asarray(conv(x, w))
  want = jax.lax.conv_general_dilated(
    np.asarray(x, np.float32), np.asarray(w, np.float32), (2, 1), [(1, 1), (0, 2)],
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )
  assert got.dtype == np.int32 and got.shape == want.shape
  np.testing.assert_array_equal(got, np.asarray(want))
  hlo = conv.lower(x, w).as_text()  # lowered for this CPU: the kernel padded, the sums sliced
  widened = "stablehlo.pad" in hlo and f"3x3x{cin}x{integer.CPU_INT8_MIN_CHANNELS}xi8" in hlo
  assert widened == (max(cin, cout) < integer.CPU_INT8_MIN_CHANNELS), hlo[:2000]
