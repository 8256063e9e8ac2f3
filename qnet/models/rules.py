"""Quantizing an unmodified Flax model by rules: `quantize(model, rules)`.

A user's `flax.linen` CNN, written with `nn.Conv`, `nn.Dense`, `nn.BatchNorm`, `nn.relu`,
pools, means and residual additions, is run under `nn.intercept_methods`. Each call of an
`nn.Conv` or `nn.Dense` whose module path matches a rule runs again as a copy of itself bound
to its own scope (same variables), whose `conv_general_dilated` / `dot_general` fake-quantizes
both operands with the quantizers of qnet's own layers (`layers.quantize_input`,
`layers.quantize_kernel`): the input activation and the kernel. Bit-widths are read from the
`precision` collection exactly as qnet's layers read them, so progressive and stochastic
precision stay pytree changes inside one compiled step. The parameter tree is the user's,
plus the learned clip levels LSQ and PACT add (`act_clip`, `weight_clip` beside the kernel).

Rules are tried in order; the first whose `pattern` (a regex, `re.fullmatch` on the path
joined with `/`, e.g. `ResBlock_0/Conv_1`) and `select` match a layer decides it. A layer
no rule matches stays full precision; `report` lists those and the rules nothing used.
`default_rules` keeps the first conv (its input is the image) and the last dense at full
precision (`keep_first_last_fp`) and quantizes every other conv and dense.

The quantizers are unsigned (the ReLU's output): a quantized input that can be negative is
an error at the first batch (`check_inputs`), naming the layer, unless its rule says how to
treat it (`negative_input='clip'`: accept the clamp at 0; `'signed'`: LSQ's signed codes).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import re
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from qnet.models import layers

FIRST_CONV, LAST_DENSE, ANY = "first_conv", "last_dense", "any"
NEGATIVE_INPUT = ("error", "clip", "signed")
# Collection that `check_inputs` makes mutable: each quantized layer records its input's min.
INPUT_MIN = "input_min"
_INTERCEPTED = (nn.Conv, nn.Dense)


class RuleError(ValueError):
  """A rule or a layer cannot be quantized as asked; the message names the layer or rule."""


@dataclasses.dataclass(frozen=True)
class Rule:
  """How the layers a rule matches are quantized.

  `pattern`: regex, full match on the layer's path (`Block_0/Conv_1`); `select`: `any`, or
  only the model's `first_conv` / `last_dense` (in call order). `keep_fp`: leave the layer
  at full precision (no quantizer, no precision entry). `weight_bits` / `act_bits`: floors on
  the scheduled bits (0: none), so a rule can hold a layer at 8 bits while the rest goes to 2.
  `quantize_input=False` quantizes the kernel only (the first conv: its input is the image).
  """

  pattern: str = ".*"
  select: str = ANY
  keep_fp: bool = False
  weight_quantizer: str = "dorefa"
  act_quantizer: str = "dorefa"
  per_channel: bool = False
  weight_bits: int = 0
  act_bits: int = 0
  quantize_input: bool = True
  negative_input: str = "error"

  def __post_init__(self):
    try:
      re.compile(self.pattern)
    except re.error as e:
      raise RuleError(f"Rule(pattern={self.pattern!r}): not a regex ({e})") from None
    checks = (
      ("select", self.select, (ANY, FIRST_CONV, LAST_DENSE)),
      ("weight_quantizer", self.weight_quantizer, layers.WEIGHT_QUANTIZERS),
      ("act_quantizer", self.act_quantizer, layers.ACT_QUANTIZERS),
      ("negative_input", self.negative_input, NEGATIVE_INPUT),
    )
    for field, value, allowed in checks:
      if value not in allowed:
        raise RuleError(f"Rule.{field}={value!r}; allowed: {', '.join(allowed)}")
    if self.negative_input == "signed" and self.act_quantizer != "lsq":
      raise RuleError("Rule.negative_input='signed' needs act_quantizer='lsq' (signed codes)")

  def matches(self, path: str, first_conv: str, last_dense: str) -> bool:
    if self.select == FIRST_CONV and path != first_conv:
      return False
    if self.select == LAST_DENSE and path != last_dense:
      return False
    return re.fullmatch(self.pattern, path) is not None


def default_rules(keep_first_last_fp: bool = True, **quantizers: Any) -> tuple[Rule, ...]:
  """Every conv and dense quantized with `quantizers` (Rule fields: `weight_quantizer`,
  `act_quantizer`, `per_channel`); the first conv never quantizes its input (the image) and,
  with `keep_first_last_fp`, it and the last dense stay full precision."""
  first = Rule(select=FIRST_CONV, keep_fp=keep_first_last_fp, quantize_input=False, **quantizers)
  edges = (first, Rule(select=LAST_DENSE, keep_fp=True)) if keep_first_last_fp else (first,)
  return (*edges, Rule(**quantizers))


def _join(path: Sequence[str]) -> str:
  return "/".join(path)


def assign(rules: Sequence[Rule], calls: Sequence[tuple[str, str]]) -> dict[str, int | None]:
  """Layer path -> index of the first rule that matches it (None: no rule, stays FP), for the
  `(path, kind)` layer calls of a model in call order (`kind`: `conv` or `dense`)."""
  convs = [p for p, k in calls if k == "conv"]
  denses = [p for p, k in calls if k == "dense"]
  first_conv = convs[0] if convs else ""
  last_dense = denses[-1] if denses else ""
  return {
    path: next((i for i, r in enumerate(rules) if r.matches(path, first_conv, last_dense)), None)
    for path, kind in calls
  }


_ACTIVE = contextvars.ContextVar("qnet_rules_active", default=False)


class QuantizedModel(nn.Module):
  """`inner` (an unmodified Flax model called as `inner(x, train=...)`) with its convs and
  denses fake-quantized by `rules`, in `inner`'s own scope: the same parameter tree.

  `act='relu'` is the plain FP network: the layers keep their precision entries (so the
  layout is the same) but no quantizer op runs, i.e. `inner` itself.
  """

  inner: nn.Module
  rules: tuple[Rule, ...]
  act: str = "quant"

  def setup(self):
    nn.share_scope(self, self.inner)

  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    plan = assign(self.rules, layer_calls(self.inner, x, train))
    intercept = functools.partial(
      _intercept, plan=plan, rules=self.rules, act=self.act, prefix=len(self.path)
    )
    with nn.intercept_methods(intercept):
      return self.inner(x, train=train)


def quantize(model: nn.Module, rules: Sequence[Rule] | None = None, act: str = "quant") -> QuantizedModel:
  """`model` with every conv and dense that `rules` (default: `default_rules()`) quantize
  reading its bits from the `precision` collection; same parameter tree plus clip levels."""
  return QuantizedModel(model, tuple(default_rules() if rules is None else rules), act)


def layer_calls(model: nn.Module, x: jax.Array, train: bool = False) -> list[tuple[str, str]]:
  """`(path, 'conv' | 'dense')` of every `nn.Conv` / `nn.Dense` call of `model(x, train)` in
  call order (shapes only: `jax.eval_shape` of a fresh init)."""
  calls: list[tuple[str, str]] = []

  def record(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == "__call__" and type(m) in _INTERCEPTED:
      path = _join(m.path)
      if path not in [p for p, _ in calls]:
        calls.append((path, "conv" if isinstance(m, nn.Conv) else "dense"))
    return next_fun(*args, **kwargs)

  def init(x):
    with nn.intercept_methods(record):
      return model.clone(parent=None).init(jax.random.key(0, impl="rbg"), x, train=train)

  jax.eval_shape(init, jax.ShapeDtypeStruct(x.shape, x.dtype))
  return calls


def _intercept(next_fun, args, kwargs, context, *, plan, rules, act, prefix):
  m = context.module
  if context.method_name != "__call__" or type(m) not in _INTERCEPTED or _ACTIVE.get():
    return next_fun(*args, **kwargs)
  path = _join(m.path[prefix:])  # relative to the quantized model (it may be nested)
  index = plan.get(path)
  if index is None or rules[index].keep_fp:
    return next_fun(*args, **kwargs)
  rule = rules[index]
  if m.conv_general_dilated_cls if isinstance(m, nn.Conv) else m.dot_general_cls:
    raise RuleError(f"layer {path}: a layer with a custom *_cls op cannot be quantized by rules")
  copy: list[nn.Module] = []

  def quantized(lhs, rhs):
    q = copy[0]  # the module now running: the clip levels and bits are created in its scope
    w_bits, a_bits = layers.bits(q)
    if act == "relu":
      return lhs, rhs
    w_bits = jnp.maximum(w_bits, rule.weight_bits)
    a_bits = jnp.maximum(a_bits, rule.act_bits)
    if rule.quantize_input:
      if q.is_mutable_collection(INPUT_MIN):
        q.put_variable(INPUT_MIN, "min", jnp.min(lhs).astype(jnp.float32))
      signed = rule.negative_input == "signed"
      lhs = layers.quantize_input(q, lhs, a_bits, rule.act_quantizer, signed).astype(lhs.dtype)
    rhs = layers.quantize_kernel(q, rhs, w_bits, rule.weight_quantizer, rule.per_channel)
    return lhs, rhs.astype(lhs.dtype)

  if isinstance(m, nn.Conv):
    base = m.conv_general_dilated or lax.conv_general_dilated
    op = lambda lhs, rhs, *a, **k: base(*quantized(lhs, rhs), *a, **k)
    q = m.clone(parent=m.scope, conv_general_dilated=op, conv_general_dilated_cls=None)
  else:
    base = m.dot_general or lax.dot_general
    op = lambda lhs, rhs, *a, **k: base(*quantized(lhs, rhs), *a, **k)
    q = m.clone(parent=m.scope, dot_general=op, dot_general_cls=None)
  copy.append(q)
  token = _ACTIVE.set(True)
  try:
    return q(*args, **kwargs)
  finally:
    _ACTIVE.reset(token)


def report(model: QuantizedModel, x: jax.Array) -> dict[str, Any]:
  """What the rules of `model` do on input `x`: per layer its rule index (or None), the
  layers no rule matched (they stay FP) and the rules nothing used."""
  calls = layer_calls(model.inner, x, False)
  plan = assign(model.rules, calls)
  used = {i for i in plan.values() if i is not None}
  return {
    "layers": plan,
    "unmatched": [p for p, i in plan.items() if i is None],
    "unused_rules": [i for i in range(len(model.rules)) if i not in used],
  }


def check_inputs(model: QuantizedModel, variables: dict, x: jax.Array) -> None:
  """Raises `RuleError` naming the first layer (in call order) whose quantized input has
  negative values on batch `x` while its rule says `negative_input='error'`."""
  _, state = model.apply(
    {k: v for k, v in variables.items() if k != INPUT_MIN}, x, train=False, mutable=[INPUT_MIN]
  )
  mins = _flatten(state.get(INPUT_MIN, {}))
  plan = assign(model.rules, layer_calls(model.inner, x, False))
  for path, index in plan.items():
    value = mins.get(path)
    if index is None or value is None or model.rules[index].negative_input != "error":
      continue
    if float(value) < 0:
      raise RuleError(
        f"layer {path}: its quantized input is negative (min {float(value):.4g}) and the "
        f"activation quantizer is unsigned, so it would act as a ReLU there; quantize it after "
        f"a ReLU, or give its rule (#{index}) negative_input='clip' (accept the clamp at 0) or "
        f"'signed' (LSQ signed codes), or quantize_input=False"
      )


def _flatten(tree: dict, prefix: str = "") -> dict[str, jax.Array]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):  # flax returns mutable collections as plain dicts
      out |= _flatten(dict(value), f"{prefix}{key}/")
    else:
      out[prefix[:-1]] = value  # the `min` leaf: its layer's path
  return out

