"""Models: quantized layers (`layers`) and the model zoo, looked up by name with `create_model`.

May import `qnet.quant` and `qnet.platform`; nothing above them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn

import importlib
import inspect

from qnet.models.alexnet import AlexNetBN
from qnet.models.cnn import SimpleCNN
from qnet.models.resnet import PreActResNet
from qnet.models.rules import QuantizedModel, Rule, RuleError, default_rules, quantize
from qnet.models.tv_resnet import TVResNet

_CIFAR = dict(widths=(16, 32, 64))
_IMAGENET = dict(widths=(64, 128, 256, 512), imagenet_stem=True)

MODELS: dict[str, Callable[..., nn.Module]] = {
  # Fashion-MNIST default (see configs/fashion_mnist_w4a4.py for why this one).
  "fmnist_cnn": functools.partial(SimpleCNN, stages=((32,), (64,), (128,)), hidden=256),
  "resnet20": functools.partial(PreActResNet, stage_sizes=(3, 3, 3), **_CIFAR),
  "resnet32": functools.partial(PreActResNet, stage_sizes=(5, 5, 5), **_CIFAR),
  "resnet56": functools.partial(PreActResNet, stage_sizes=(9, 9, 9), **_CIFAR),
  "resnet18": functools.partial(PreActResNet, stage_sizes=(2, 2, 2, 2), **_IMAGENET),
  "resnet34": functools.partial(PreActResNet, stage_sizes=(3, 4, 6, 3), **_IMAGENET),
  "resnet50": functools.partial(
    PreActResNet, stage_sizes=(3, 4, 6, 3), block="bottleneck", **_IMAGENET
  ),
  "alexnet_bn": AlexNetBN,
  # torchvision / timm layout (post-activation v1.5), for their pretrained weights
  # (`init_from=torchvision:PATH`, qnet.models.pretrained).
  "tv_resnet18": functools.partial(TVResNet, arch="resnet18"),
  "tv_resnet34": functools.partial(TVResNet, arch="resnet34"),
  "tv_resnet50": functools.partial(TVResNet, arch="resnet50"),
  # Tiny variants, for tests only.
  "tiny_cnn": functools.partial(SimpleCNN, stages=((4,), (8,))),
  "tiny_resnet": functools.partial(PreActResNet, stage_sizes=(1, 1), widths=(4, 8)),
}


def is_foreign(name: str) -> bool:
  """Whether `name` names a user's model class, `PACKAGE.MODULE:ClassName`."""
  return ":" in name


def import_object(spec: str, what: str) -> Any:
  """The object `PACKAGE.MODULE:NAME` names; `RuleError` with one line if it cannot be had."""
  module_name, _, attr = spec.partition(":")
  try:
    module = importlib.import_module(module_name)
  except Exception as e:  # noqa: BLE001 - any import failure is the user's to fix
    raise RuleError(f"{what}={spec!r}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
  if not hasattr(module, attr):
    raise RuleError(f"{what}={spec!r}: module {module_name!r} has no {attr!r}")
  return getattr(module, attr)


def foreign_class(spec: str) -> type:
  """The user's `nn.Module` class `spec` names, checked against the convention qnet calls it
  by: built as `ClassName(num_classes=N)`, called as `model(x, train=...)`."""
  cls = import_object(spec, "config.model")
  if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
    raise RuleError(f"config.model={spec!r}: not a flax.linen Module class")
  if "num_classes" not in getattr(cls, "__dataclass_fields__", {}):
    raise RuleError(f"config.model={spec!r}: has no field `num_classes` (built as {cls.__name__}(num_classes=N))")
  if "train" not in inspect.signature(cls.__call__).parameters:
    raise RuleError(f"config.model={spec!r}: its __call__ takes no `train` (called as model(x, train=...))")
  return cls


def foreign_rules(spec: str, keep_first_last_fp: bool, **quantizers: Any) -> tuple[Rule, ...]:
  """`config.quant.rules`: '' for `default_rules`, or `PACKAGE.MODULE:NAME`, a sequence of `Rule`."""
  if not spec:
    return default_rules(keep_first_last_fp, **quantizers)
  rules = import_object(spec, "config.quant.rules")
  if not (isinstance(rules, (tuple, list)) and rules and all(isinstance(r, Rule) for r in rules)):
    raise RuleError(f"config.quant.rules={spec!r}: not a non-empty sequence of qnet Rule objects")
  return tuple(rules)


def takes(name: str, field: str) -> bool:
  """Whether model `name` has the field `field` (`width`: config `model_width`;
  `residual_bits`: config `quant.residual_bits`)."""
  if is_foreign(name) or name not in MODELS:
    return False
  builder = MODELS[name]
  cls = builder.func if isinstance(builder, functools.partial) else builder
  return field in getattr(cls, "__dataclass_fields__", {})


def takes_width(name: str) -> bool:
  """Whether model `name` has a channel multiplier (`width`, config `model_width`)."""
  return takes(name, "width")


def create_model(
  name: str,
  num_classes: int,
  *,
  rules: str = "",
  keep_first_last_fp: bool = True,
  **kwargs: Any,
) -> nn.Module:
  """Builds the model registered as `name` (see `MODELS`), or a user's model class
  `PACKAGE.MODULE:ClassName` quantized by `rules` (`foreign_rules`)."""
  if is_foreign(name):
    act = kwargs.get("act", "quant")
    quantizers = {
      k: kwargs[k] for k in ("weight_quantizer", "act_quantizer", "per_channel") if k in kwargs
    }
    return quantize(
      foreign_class(name)(num_classes=num_classes),
      foreign_rules(rules, keep_first_last_fp, **quantizers),
      act=act,
    )
  if name not in MODELS:
    raise ValueError(f"model={name!r} is not known; allowed: {', '.join(sorted(MODELS))}")
  return MODELS[name](num_classes=num_classes, **kwargs)
