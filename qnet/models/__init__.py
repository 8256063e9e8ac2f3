"""Models: quantized layers (`layers`) and the model zoo, looked up by name with `create_model`.

May import `qnet.quant` and `qnet.platform`; nothing above them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn

from qnet.models.alexnet import AlexNetBN
from qnet.models.cnn import SimpleCNN
from qnet.models.resnet import PreActResNet

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
  # Tiny variants, for tests only.
  "tiny_cnn": functools.partial(SimpleCNN, stages=((4,), (8,))),
  "tiny_resnet": functools.partial(PreActResNet, stage_sizes=(1, 1), widths=(4, 8)),
}


def takes_width(name: str) -> bool:
  """Whether model `name` has a channel multiplier (`width`, config `model_width`)."""
  builder = MODELS[name]
  cls = builder.func if isinstance(builder, functools.partial) else builder
  return "width" in getattr(cls, "__dataclass_fields__", {})


def create_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds the model registered as `name` (see `MODELS`)."""
  if name not in MODELS:
    raise ValueError(f"model={name!r} is not known; allowed: {', '.join(sorted(MODELS))}")
  return MODELS[name](num_classes=num_classes, **kwargs)
