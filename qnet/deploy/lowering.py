"""The integer program of a model, derived from the model's own evaluation function.

`build_program` traces `model.apply(variables, x, train=False)` with `jax.make_jaxpr` while
an interceptor (`nn.intercept_methods`) stands every layer call (qnet's `QuantConv` /
`QuantDense`, `nn.Conv` / `nn.Dense` quantized by rules or kept FP, `nn.BatchNorm`) in for
one opaque `qnet_layer` equation that remembers the module. The jaxpr then holds the layers
in the order and with the dataflow the model really has, and between them the model's own
glue: ReLUs, max-pools, residual additions, means, flattens, dtype casts. `_Lowering` walks
it and drives `integer.Builder`, which folds BatchNorm, bias, clip and rounding between two
quantized layers into the next codes exactly as before. No architecture is described twice:
what the model computes is what is exported. An equation with no integer form stops the
export with `UnsupportedModel` naming the op and the layer before it.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import flax.linen as nn
import jax
from jax.extend import core as jex_core
import jax.numpy as jnp
import numpy as np

from qnet.deploy import integer
from qnet.deploy.integer import FP, UnsupportedModel
from qnet.models import layers, rules

PyTree = Any
_LAYER = jex_core.Primitive("qnet_layer")


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One layer call of the traced model: what the builder needs to emit it."""

  kind: str  # conv | dense | batchnorm | stream
  path: str
  out_shape: tuple[int, ...]
  attrs: dict


_CALLS: list[LayerCall] = []  # filled while tracing; read by the abstract eval and the walk


def _layer_abstract_eval(x, *, index, out_shape):
  # The shape travels in the params: JAX caches abstract evaluations by (avals, params).
  return jax.core.ShapedArray(out_shape, jnp.float32)


_LAYER.def_abstract_eval(_layer_abstract_eval)


def _pair(v, default) -> tuple[int, int]:
  if v is None:
    return default
  return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)


def _conv_call(m, path: str, x, quantize_input: bool, bits) -> LayerCall:
  if isinstance(m, nn.Conv):
    bad = [
      f
      for f, ok in (
        ("feature_group_count", m.feature_group_count == 1),
        ("input_dilation", _pair(m.input_dilation, (1, 1)) == (1, 1)),
        ("kernel_dilation", _pair(m.kernel_dilation, (1, 1)) == (1, 1)),
      )
      if not ok
    ]
    if bad:
      raise UnsupportedModel(f"layer {path}: nn.Conv with {', '.join(bad)} has no integer form yet")
    padding = m.padding
    if isinstance(padding, int):
      padding = [(padding, padding)] * 2
    elif not isinstance(padding, str):
      padding = [(p, p) if isinstance(p, int) else tuple(p) for p in padding]
    if isinstance(padding, str) and padding not in ("SAME", "VALID"):
      raise UnsupportedModel(f"layer {path}: nn.Conv padding={padding!r} has no integer form yet")
  else:
    padding = m.padding
  kernel = _pair(m.kernel_size, None)
  strides = _pair(m.strides, (1, 1))
  (oh, ow), pads = integer.window_of(x.shape[1:3], kernel, strides, padding)
  attrs = dict(
    strides=strides, padding=pads, quantize_input=quantize_input, bits=bits, bias=m.use_bias
  )
  return LayerCall("conv", path, (x.shape[0], oh, ow, m.features), attrs)


class _Tracer:
  """The interceptor: every layer call becomes one `qnet_layer` equation."""

  def __init__(self, model: nn.Module, x_shape: tuple[int, ...], precision_bits: dict):
    self.bits = precision_bits
    self.kinds: dict[str, tuple[str, str, bool]] = {}  # a rule's quantizers, by layer
    self.plan: dict[str, rules.Rule | None] = {}
    if isinstance(model, rules.QuantizedModel):
      calls = rules.layer_calls(model.inner, jnp.zeros(x_shape, jnp.float32))
      index = rules.assign(model.rules, calls)
      self.plan = {p: None if i is None else model.rules[i] for p, i in index.items()}
      self.rules_model = model
    else:
      self.rules_model = None

  def _layer_bits(self, path: str, rule) -> tuple[int, int]:
    if path not in self.bits:  # a layer kept FP by its rule: no precision entry
      return FP, FP
    w, a = self.bits[path]
    if rule is not None:  # a rule's bits are a floor (`qnet.models.rules.Rule`)
      w, a = max(w, rule.weight_bits), max(a, rule.act_bits)
    return w, a

  def __call__(self, next_fun, args, kwargs, context):
    m = context.module
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    if not (
      isinstance(m, (layers.QuantConv, layers.QuantDense, nn.BatchNorm, layers.StreamQuant))
      or type(m) in (nn.Conv, nn.Dense)
    ):
      return next_fun(*args, **kwargs)  # not a layer the program has
    path = "/".join(m.path)
    x = _layer_input(m, args, kwargs)
    if isinstance(m, (layers.QuantConv, layers.QuantDense)):
      bits = self._layer_bits(path, None)
      if isinstance(m, layers.QuantConv):
        call = _conv_call(m, path, x, m.quantize_input, bits)
      else:
        n = x.shape[0]
        attrs = dict(reduce=m.reduce, quantize_input=m.quantize_input, bits=bits, bias=True)
        call = LayerCall("dense", path, (n, m.features), attrs)
    elif isinstance(m, layers.StreamQuant):
      # The block's bits come in as the call's argument, read from the precision tree (a
      # constant here): on or off is known when tracing.
      on = float(np.asarray(args[1])) < FP
      call = LayerCall("stream", path, tuple(x.shape), {"on": on})
    elif type(m) in (nn.Conv, nn.Dense):
      rule = self.plan.get(path) if self.rules_model is not None else None
      quantized = rule is not None and not rule.keep_fp
      bits = self._layer_bits(path, rule) if quantized else (FP, FP)
      quantize_input = quantized and rule.quantize_input
      if quantized:
        self._check_rule(path, rule)
        self.kinds[path] = (rule.weight_quantizer, rule.act_quantizer, rule.per_channel)
      if isinstance(m, nn.Conv):
        call = _conv_call(m, path, x, quantize_input, bits)
      else:
        attrs = dict(reduce="flatten", quantize_input=quantize_input, bits=bits, bias=m.use_bias)
        call = LayerCall("dense", path, (*x.shape[:-1], m.features), attrs)
    else:  # a BatchNorm
      if not (m.use_scale and m.use_bias and m.epsilon == 1e-5 and m.axis == -1):
        raise UnsupportedModel(
          f"layer {path}: BatchNorm needs use_scale, use_bias, epsilon=1e-5 and axis=-1 here"
        )
      call = LayerCall("batchnorm", path, tuple(x.shape), {})
    _CALLS.append(call)
    return _LAYER.bind(x, index=len(_CALLS) - 1, out_shape=tuple(call.out_shape))

  def _check_rule(self, path: str, rule: rules.Rule) -> None:
    if rule.negative_input == "signed":
      raise UnsupportedModel(f"layer {path}: signed activation codes have no integer form yet")


def _layer_input(m: nn.Module, args: tuple, kwargs: dict) -> Any:
  """The input a layer was called with, positionally or by its parameter's name
  (`nn.Dense(3)(inputs=x)`; the model's init has run, so the call is valid)."""
  if args:
    return args[0]
  return kwargs[list(inspect.signature(type(m).__call__).parameters)[1]]


@dataclasses.dataclass
class _Reduced:
  """A 4-D value reduced over H, W (`mean`) or flattened, waiting for the dense it feeds."""

  value: Any
  how: str
  divided: bool = False


def _sub_jaxpr(eqn):
  for key in ("jaxpr", "call_jaxpr"):
    if key in eqn.params:
      sub = eqn.params[key]
      return sub.jaxpr if hasattr(sub, "jaxpr") else sub, getattr(sub, "consts", ())
  return None


_PASS_THROUGH = {"convert_element_type", "copy", "copy_p", "optimization_barrier"}


class _Lowering:
  def __init__(self, builder: integer.Builder):
    self.b = builder
    self.last = "the input"

  def run(self, jaxpr, consts, args) -> list:
    env: dict = {}
    read = lambda v: v.val if isinstance(v, jax.extend.core.Literal) else env[v]
    for var, c in zip(jaxpr.constvars, consts):
      env[var] = np.asarray(c)
    for var, a in zip(jaxpr.invars, args):
      env[var] = a
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      outs = self.eqn(eqn, ins)
      for var, out in zip(eqn.outvars, outs):
        env[var] = out
    return [read(v) for v in jaxpr.outvars]

  def _fail(self, eqn, why: str = "has no integer lowering"):
    raise UnsupportedModel(f"op {eqn.primitive.name} (after {self.last}) {why}")

  def eqn(self, eqn, ins) -> list:
    name = eqn.primitive.name
    sub = _sub_jaxpr(eqn)
    if sub is not None:  # jit, custom_jvp_call (nn.relu), ...: their body, inline
      return self.run(sub[0], sub[1], ins)
    if name == "qnet_layer":
      return [self.layer(_CALLS[eqn.params["index"]], ins[0])]
    if name in _PASS_THROUGH:
      return ins[:1]
    x = ins[0]
    if name == "max" and _is_zero(ins[1]):
      return [self.b.relu(x)]
    if name == "reduce_window_max":
      p = eqn.params
      if p["window_dimensions"][0] != 1 or p["window_dimensions"][3] != 1:
        self._fail(eqn, "pools over batch or channels")
      pads = [tuple(int(a) for a in p["padding"][i]) for i in (1, 2)]
      return [self.b.maxpool(x, p["window_dimensions"][1:3], p["window_strides"][1:3], pads)]
    if name in ("add", "add_any") and not any(
      np.isscalar(i) or isinstance(i, np.ndarray) for i in ins
    ):
      return [self.b.add(ins[0], ins[1])]
    if name == "reduce_sum" and tuple(eqn.params["axes"]) == (1, 2):
      return [_Reduced(x, "mean")]
    if name == "div" and isinstance(x, _Reduced) and x.how == "mean" and not x.divided:
      h, w = x.value.shape[:2]
      if np.ndim(ins[1]) == 0 and float(ins[1]) == h * w:
        return [dataclasses.replace(x, divided=True)]
    if name == "reshape" and len(eqn.params["new_sizes"]) == 2 and not isinstance(x, _Reduced):
      return [_Reduced(x, "flatten", divided=True)]
    if name == "squeeze" and isinstance(x, _Reduced):
      return [x]
    self._fail(eqn)

  def layer(self, call: LayerCall, x):
    a = call.attrs
    self.last = f"layer {call.path}"
    if call.kind == "batchnorm":
      if isinstance(x, _Reduced):
        raise UnsupportedModel(f"layer {call.path}: a BatchNorm after a mean or flatten")
      return self.b.batchnorm(x, call.path)
    if call.kind == "stream":
      if isinstance(x, _Reduced):
        raise UnsupportedModel(f"layer {call.path}: a residual stream after a mean or flatten")
      return self.b.stream(x, call.path) if a["on"] else x
    self.b.bits[call.path] = a["bits"]
    if call.kind == "conv":
      if isinstance(x, _Reduced):
        raise UnsupportedModel(f"layer {call.path}: a conv after a mean or flatten")
      return self.b.conv(x, call.path, a["strides"], a["padding"], a["quantize_input"], a["bias"])
    reduce = a["reduce"]
    if isinstance(x, _Reduced):
      if not x.divided:
        raise UnsupportedModel(f"layer {call.path}: a sum over H, W that is not a mean")
      if x.how == "mean" and a["quantize_input"] and a["bits"][1] != FP:
        # The model quantizes the mean (qnet's QuantDense sums the codes instead): a float
        # mean, then the dense's own quantizer.
        x, reduce = self.b.mean(x.value), "flatten"
      else:
        x, reduce = x.value, x.how
    return self.b.dense(x, call.path, reduce, a["quantize_input"], bias=a["bias"])


def _is_zero(v) -> bool:
  return (np.isscalar(v) or isinstance(v, np.ndarray)) and np.ndim(v) == 0 and float(v) == 0.0


def build_program(
  model: nn.Module,
  params: PyTree,
  batch_stats: PyTree,
  bits: dict[str, tuple[int, int]],
  *,
  input_shape: tuple[int, int, int],
  mean: tuple[float, ...],
  std: tuple[float, ...],
  per_channel: bool = False,
  weight_quantizer: str = "dorefa",
  act_quantizer: str = "dorefa",
) -> integer.Program:
  """The integer program of `model` with `params` / `batch_stats`, read from its traced
  evaluation. `bits` maps each layer of its precision layout (`'stage1_block1/conv1'`) to
  `(weight_bits, act_bits)`, each 1..8 or 32; `mean`/`std` are the dataset's normalisation
  (pixels in [0, 1]); the quantizers are the run's `config.quant` kinds (LSQ and PACT read
  their clip levels from `params`)."""
  integer.check_quantizers_and_bits(bits, weight_quantizer, act_quantizer)
  params = jax.tree.map(np.asarray, params)
  batch_stats = jax.tree.map(np.asarray, batch_stats)
  b = integer.Builder(
    params,
    batch_stats,
    {p: (int(w), int(a)) for p, (w, a) in bits.items()},
    per_channel,
    (weight_quantizer, act_quantizer),
  )
  start = b.preprocess(input_shape, mean, std)
  x_shape = (1, *input_shape)
  tracer = _Tracer(model, x_shape, b.bits)
  b.kinds = tracer.kinds  # filled while tracing, read while lowering
  precision = _precision_tree(bits)
  variables = {"params": params, "batch_stats": batch_stats, "precision": precision}
  _CALLS.clear()
  with nn.intercept_methods(tracer):
    closed = jax.make_jaxpr(lambda x: model.apply(variables, x, train=False))(
      jnp.zeros(x_shape, jnp.float32)
    )
  try:
    (out,) = _Lowering(b).run(closed.jaxpr, closed.consts, [start])
  finally:
    calls = list(_CALLS)
    _CALLS.clear()
  heads = [c for c in calls if c.kind == "dense"]
  if not heads or isinstance(out, _Reduced):
    raise UnsupportedModel("the model's logits do not come from a dense layer: no integer form")
  b.output(out)
  num_classes = int(heads[-1].out_shape[-1])
  quantizers = {"weight": weight_quantizer, "act": act_quantizer}
  for key, field in (("weight", "weight_quantizer"), ("act", "act_quantizer")):
    used = {layer[field] for layer in b.layers.values() if layer[field]}
    if used:  # what the layers use ("mixed": a model whose rules differ; see `layers`)
      quantizers[key] = used.pop() if len(used) == 1 else "mixed"
  return integer.Program(b.ops, b.arrays, tuple(input_shape), num_classes, b.layers, quantizers)


def _precision_tree(bits: dict[str, tuple[int, int]]) -> dict:
  tree: dict = {}
  for path, (w, a) in bits.items():
    node = tree
    for key in path.split("/"):
      node = node.setdefault(key, {})
    node["weight_bits"], node["act_bits"] = np.float32(w), np.float32(a)
  return tree
