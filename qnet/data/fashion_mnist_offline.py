"""Offline TFDS builder for Fashion-MNIST, reading the local IDX `.gz` files.

tfds's own `fashion_mnist` downloads from the internet and checks checksums, which
Debian's recompressed copies (package `dataset-fashion-mnist`) do not match. This
builder reads those files directly and never touches the network.
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np
import tensorflow_datasets as tfds

from qnet.data.datasets import DataError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
DIR_ENV_VAR = "QNET_FASHION_MNIST_DIR"

_FILES = {
  "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
  "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_CLASS_NAMES = [
  "T-shirt/top",
  "Trouser",
  "Pullover",
  "Dress",
  "Coat",
  "Sandal",
  "Shirt",
  "Sneaker",
  "Bag",
  "Ankle boot",
]


def source_dir() -> str:
  """Directory holding the IDX files: `$QNET_FASHION_MNIST_DIR` or the Debian path."""
  return os.environ.get(DIR_ENV_VAR) or DEFAULT_DIR


def files_present(directory: str | None = None) -> bool:
  """Whether all four IDX files are in `directory` (default: `source_dir()`)."""
  directory = directory or source_dir()
  return all(os.path.exists(os.path.join(directory, n)) for pair in _FILES.values() for n in pair)


def _missing_files_error(directory: str, missing: list[str]) -> DataError:
  return DataError(
    f"Fashion-MNIST IDX files not found in {directory!r} (missing: {', '.join(missing)}). "
    f"Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or put the "
    f"four *-ubyte.gz files in a directory and set {DIR_ENV_VAR} to it. Alternatively, run "
    f"`tfds build fashion_mnist` on a machine with internet and copy its data_dir to "
    f"--config.data_dir (qnet then uses TFDS's prepared `fashion_mnist`)."
  )


def _read_idx(path: str) -> np.ndarray:
  """Reads one gzipped IDX file (unsigned-byte data) into a numpy array; a truncated or
  corrupt file is a `DataError` naming it."""
  try:
    with gzip.open(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError, zlib.error) as e:  # cut gzip stream, bad CRC, not gzip
    raise _corrupt_file_error(path, f"{type(e).__name__}: {e}") from e
  magic = int.from_bytes(data[0:4], "big")
  if len(data) < 4 or magic >> 8 != 0x08:  # 0x08 = unsigned byte
    raise _corrupt_file_error(path, f"not an unsigned-byte IDX file (magic {magic:#x})")
  ndim = magic & 0xFF
  shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  expected = 4 + 4 * ndim + int(np.prod(shape))
  if len(data) != expected:
    raise _corrupt_file_error(
      path, f"{len(data)} bytes where its header {shape} needs {expected}: truncated"
    )
  return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _corrupt_file_error(path: str, why: str) -> DataError:
  return DataError(
    f"Fashion-MNIST file {path} is truncated or corrupt ({why}); replace it "
    f"(`apt-get install --reinstall dataset-fashion-mnist` or a fresh download)"
  )


def load_split(split: str, directory: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Returns (images uint8 [N, 28, 28, 1], labels int64 [N]) of `split` ('train'/'test')."""
  directory = directory or source_dir()
  paths = [os.path.join(directory, name) for name in _FILES[split]]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise _missing_files_error(directory, [os.path.basename(p) for p in missing])
  images, labels = (_read_idx(p) for p in paths)
  if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
    raise _corrupt_file_error(
      paths[0], f"{images.shape} images vs {labels.shape} labels in {paths[1]}"
    )
  return images[..., None], labels.astype(np.int64)


@tfds.decode.make_decoder()
def _decode_raw_tensor(serialized, feature):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  return tf.reshape(tf.io.decode_raw(serialized, feature.tf_dtype), feature.shape)


def decoders() -> dict:
  """`as_dataset(decoders=...)` for this builder. TFDS's own decoder of a raw-bytes `Tensor`
  reads the deprecated `FeatureConnector.dtype` (a warning each time a dataset is built);
  this one decodes the same bytes the same way through `tf_dtype`."""
  return {"image": _decode_raw_tensor()}


class FashionMnistOffline(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (60,000 train / 10,000 test, 28x28x1, 10 classes) from local IDX files."""

  name = "fashion_mnist_offline"
  VERSION = tfds.core.Version("1.0.0")
  disable_shuffling = True  # Stored in file order; the input pipeline shuffles.
  RELEASE_NOTES = {"1.0.0": "Reads the IDX files of Debian's dataset-fashion-mnist."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Fashion-MNIST read offline from local IDX files.",
      features=tfds.features.FeaturesDict(
        {
          # Raw uint8 tensors: ~10x faster to write/read than PNG for 28x28 images.
          "image": tfds.features.Tensor(
            shape=(28, 28, 1), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
          ),
          "label": tfds.features.ClassLabel(names=_CLASS_NAMES),
        }
      ),
      supervised_keys=("image", "label"),
      homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Never downloads.
    directory = source_dir()
    missing = [
      n
      for names in _FILES.values()
      for n in names
      if not os.path.exists(os.path.join(directory, n))
    ]
    if missing:
      raise _missing_files_error(directory, missing)
    return {split: self._generate_examples(split, directory) for split in _FILES}

  def _generate_examples(self, split: str, directory: str):
    images, labels = load_split(split, directory)
    for i in range(images.shape[0]):
      yield i, {"image": images[i], "label": int(labels[i])}
