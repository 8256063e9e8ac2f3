"""Static facts about the supported datasets (no TensorFlow import: the step-building code
and the GPU benchmark use them without the input pipeline)."""

from __future__ import annotations

import dataclasses


class DataError(RuntimeError):
  """The data set cannot be found or prepared; the message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Static facts about a dataset. `mean`/`std` are per channel, for pixels in [0, 1]."""

  name: str
  image_size: int
  channels: int
  num_classes: int
  train_split: str
  eval_split: str
  mean: tuple[float, ...]
  std: tuple[float, ...]
  crop_padding: int = 0  # Pad-and-random-crop augmentation; 0 = random-resized crop.
  cache: bool = True  # Small enough to cache decoded in memory.


DATASETS: dict[str, DatasetSpec] = {
  "fashion_mnist": DatasetSpec(
    "fashion_mnist", 28, 1, 10, "train", "test", (0.2860,), (0.3530,), crop_padding=2
  ),
  "cifar10": DatasetSpec(
    "cifar10",
    32,
    3,
    10,
    "train",
    "test",
    (0.4914, 0.4822, 0.4465),
    (0.2470, 0.2435, 0.2616),
    crop_padding=4,
  ),
  "cifar100": DatasetSpec(
    "cifar100",
    32,
    3,
    100,
    "train",
    "test",
    (0.5071, 0.4865, 0.4409),
    (0.2673, 0.2564, 0.2762),
    crop_padding=4,
  ),
  "imagenet2012": DatasetSpec(
    "imagenet2012",
    224,
    3,
    1000,
    "train",
    "validation",
    (0.485, 0.456, 0.406),
    (0.229, 0.224, 0.225),
    cache=False,
  ),
}
