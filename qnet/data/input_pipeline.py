"""Deterministic, resumable tf.data input pipelines for Fashion-MNIST, CIFAR and ImageNet.

Training data is produced one epoch at a time. Epoch `e` is shuffled with a seed derived
from `(seed, e)`, and each example's augmentation uses stateless random ops seeded by
`(seed, e, position in epoch)`. Hence `create_train_iterator(start_step=k)` yields bitwise
the same batches as a `start_step=0` iterator after `k` batches, and the skip happens
before decoding/augmentation. Every process reads its own `tfds.even_splits` share.

Determinism assumes the same TF version and no change of TF's global seed
(`tf.random.set_seed`), which `Dataset.shuffle` combines with its op seed.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from qnet.data import fashion_mnist_offline
from qnet.data.datasets import DATASETS, DataError, DatasetSpec

try:  # Keep TensorFlow off the accelerators; JAX owns them.
  tf.config.set_visible_devices([], "GPU")
except (RuntimeError, ValueError):  # Devices already initialised.
  pass

AUTOTUNE = tf.data.AUTOTUNE
_DATA_THREADS = int(os.environ.get("QNET_DATA_THREADS", "2"))
_STREAM_SHUFFLE_BUFFER = 10_000  # Examples (encoded) for datasets too big to cache.
_IMAGENET_CROP_FRACTION = 0.875


def _spec(dataset: str) -> DatasetSpec:
  if dataset not in DATASETS:
    raise ValueError(
      f"dataset={dataset!r} is not supported; allowed values: {', '.join(sorted(DATASETS))}"
    )
  return DATASETS[dataset]


def get_builder(dataset: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """TFDS builder of `dataset`, prepared in `data_dir` (default ~/tensorflow_datasets) on
  first use. Fashion-MNIST uses the offline builder (never the network); the others are
  prepared as `tfds.load` would (`_prepare`). Raises `DataError` when that is impossible."""
  spec = _spec(dataset)
  builder = _get_builder(dataset, data_dir)
  if spec.cache:
    verify_records(builder)
  return builder


def _get_builder(dataset: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  if dataset != "fashion_mnist":
    builder = tfds.builder(dataset, data_dir=data_dir)
    if not builder.is_prepared():
      _prepare(builder, dataset, data_dir)
    return builder
  builder = fashion_mnist_offline.FashionMnistOffline(data_dir=data_dir)
  if not builder.is_prepared() and not fashion_mnist_offline.files_present():
    tfds_builder = tfds.builder("fashion_mnist", data_dir=data_dir)
    if tfds_builder.is_prepared():  # prepared elsewhere with `tfds build fashion_mnist`
      return tfds_builder
  if not builder.is_prepared():
    builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False)
    )
  return builder


def _prepare(builder: tfds.core.DatasetBuilder, dataset: str, data_dir: str | None) -> None:
  """`download_and_prepare`, as `tfds.load` would, with a one-line `DataError` on failure.

  CIFAR downloads itself; ImageNet needs its two tars in `DATA_DIR/downloads/manual` first.
  Every process of a multi-host run prepares on its own, so prepare shared storage once
  beforehand (`tfds build DATASET --data_dir=DIR`).
  """
  try:
    builder.download_and_prepare()
  except Exception as e:  # network, manual download, disk: the cause goes into the message
    cause = " ".join(str(e).split()) or type(e).__name__
    where = repr(data_dir) if data_dir else "'' (TFDS's default, ~/tensorflow_datasets)"
    raise DataError(
      f"config.dataset={dataset!r}: no prepared TFDS data in config.data_dir={where}, and "
      f"preparing it failed: {cause.rstrip('.')}. Prepare it with "
      f"`tfds build {dataset} --data_dir=DIR` and pass --config.data_dir=DIR."
    ) from e


def _decoders(builder: tfds.core.DatasetBuilder) -> dict | None:
  if isinstance(builder, fashion_mnist_offline.FashionMnistOffline):
    return fashion_mnist_offline.decoders()
  return None


_VERIFIED: set[str] = set()


def verify_records(builder: tfds.core.DatasetBuilder) -> None:
  """Reads every TFRecord file of `builder` once per process, checking each record's CRC,
  so a damaged file stops the run before its first step with a `DataError` naming it.

  Done for the small, cached datasets (a second or two for CIFAR); a damaged ImageNet
  record is found when read (`_translate_data_loss`), still as a one-line `DataError`.
  """
  files = sorted(tf.io.gfile.glob(os.path.join(str(builder.data_dir), "*.tfrecord*")))
  for path in files:
    if path in _VERIFIED:
      continue
    try:
      tf.data.TFRecordDataset(path).reduce(np.int64(0), lambda n, _: n + 1)
    except tf.errors.OpError as e:  # DataLossError: bad CRC, truncated record
      raise _record_error(path, e) from None
    _VERIFIED.add(path)


def _record_error(where: str, e: Exception) -> DataError:
  cause = " ".join(str(getattr(e, "message", e)).split())[:200]
  return DataError(
    f"corrupted record in {where} ({type(e).__name__}: {cause}); rebuild the data set "
    f"(delete its directory and run again, or `tfds build`)"
  )


def _translate_data_loss(batches: Iterator, where: str) -> Iterator:
  """`batches`, with a damaged record read mid-run turned into a one-line `DataError`."""
  try:
    yield from batches
  except tf.errors.DataLossError as e:
    raise _record_error(f"the TFDS files under {where}", e) from None


def _split_size(builder: tfds.core.DatasetBuilder, split: Any) -> int:
  try:
    n = builder.info.splits[split].num_examples
  except KeyError:  # Split sizes unknown, e.g. under tfds.testing.mock_data.
    n = 0
  if not n:
    n = int(builder.as_dataset(split=split).cardinality())
    if n < 0:
      raise ValueError(f"Cannot determine the size of split {split!r} of {builder.name}.")
  return n


def num_examples(dataset: str, split: str, data_dir: str | None = None) -> int:
  """Number of examples of `split` (tfds split syntax, e.g. 'train[:10%]')."""
  return _split_size(get_builder(dataset, data_dir), split)


def train_split(dataset: str, train_examples: int = -1, data_dir: str | None = None) -> str:
  """The TFDS split a run trains on: the whole training split (`train_examples=-1`), or its
  first `train_examples` examples (`config.train_examples`, a fixed subset)."""
  spec = _spec(dataset)
  if train_examples == -1:
    return spec.train_split
  available = num_examples(dataset, spec.train_split, data_dir)
  if train_examples > available:
    raise DataError(
      f"config.train_examples={train_examples} is more than the {available} examples of "
      f"{dataset}'s {spec.train_split!r} split; allowed: -1 or 1..{available}"
    )
  return f"{spec.train_split}[:{train_examples}]"


def steps_per_epoch(
  dataset: str, global_batch_size: int, data_dir: str | None = None, train_examples: int = -1
) -> int:
  """Training steps per epoch: train examples // global batch size (remainder dropped)."""
  split = train_split(dataset, train_examples, data_dir)
  return num_examples(dataset, split, data_dir) // global_batch_size


def _process_info(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  return process_index, process_count


def _local_batch(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size={global_batch_size} must be a positive multiple "
      f"of process_count={process_count}"
    )
  return global_batch_size // process_count


def _epoch_seeds(seed: int, epoch: int) -> tuple[int, tf.Tensor]:
  """(shuffle seed, stateless augmentation key) for one epoch, derived from (seed, epoch)."""
  shuffle_seed = int(np.random.SeedSequence([seed, epoch, 0]).generate_state(1)[0])
  aug_key = np.random.SeedSequence([seed, epoch, 1]).generate_state(2).astype(np.int64)
  return shuffle_seed, tf.constant(aug_key)


# ----------------------------------------------------------------------------- preprocessing


def _normalize(image: tf.Tensor, spec: DatasetSpec) -> tf.Tensor:
  image = tf.cast(image, tf.float32) / 255.0
  return (image - tf.constant(spec.mean)) / tf.constant(spec.std)


def _resize_if_needed(image: tf.Tensor, spec: DatasetSpec, size: int) -> tf.Tensor:
  if size != spec.image_size:
    image = tf.image.resize(image, [size, size], antialias=True)
  return image


def _augment_batch(images, spec: DatasetSpec, key: tf.Tensor):
  """Pad + random crop back to the native size + horizontal flip, for a whole uint8 batch
  (CIFAR, Fashion-MNIST); one gather per axis instead of per-example ops."""
  crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  n, p, size = tf.shape(images)[0], spec.crop_padding, spec.image_size
  offsets = tf.random.stateless_uniform([n, 2], crop_key, 0, 2 * p + 1, tf.int32)
  flip = tf.random.stateless_uniform([n, 1], flip_key, 0, 2, tf.int32) == 1
  positions = tf.range(size)
  rows = offsets[:, :1] + positions
  cols = offsets[:, 1:] + tf.where(flip, positions[::-1], positions)
  images = tf.pad(images, [[0, 0], [p, p], [p, p], [0, 0]])
  images = tf.gather(images, rows, axis=1, batch_dims=1)
  return tf.gather(images, cols, axis=2, batch_dims=1)


def _random_resized_crop(encoded: tf.Tensor, size: int, key: tf.Tensor) -> tf.Tensor:
  """Inception-style crop of a JPEG (decodes only the crop) + flip, resized to `size`."""
  crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  shape = tf.image.extract_jpeg_shape(encoded)
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
    shape,
    bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
    seed=crop_key,
    min_object_covered=0.1,
    aspect_ratio_range=(3 / 4, 4 / 3),
    area_range=(0.08, 1.0),
    max_attempts=10,
    use_image_if_no_bounding_boxes=True,
  )
  window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
  image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
  image = tf.image.resize(image, [size, size], antialias=True)
  return tf.image.stateless_random_flip_left_right(image, seed=flip_key)


def _resize_center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """Resizes the shorter side to size / 0.875, then takes the central size x size crop."""
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = math.ceil(size / _IMAGENET_CROP_FRACTION) / tf.reduce_min(shape)
  new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
  image = tf.image.resize(image, new_shape, antialias=True)
  top, left = (new_shape[0] - size) // 2, (new_shape[1] - size) // 2
  return image[top : top + size, left : left + size]


def _train_preprocess_batch(spec: DatasetSpec, size: int, augment: bool, aug_key: tf.Tensor):
  """Batch-level train preprocessing for the cached datasets; keyed by batch position."""

  def fn(batch_index, batch):
    images = batch["image"]
    if augment:
      images = _augment_batch(
        images, spec, tf.random.experimental.stateless_fold_in(aug_key, batch_index)
      )
    images = _normalize(_resize_if_needed(images, spec, size), spec)
    return {
      "image": tf.ensure_shape(images, [None, size, size, spec.channels]),
      "label": tf.cast(batch["label"], tf.int32),
    }

  return fn


def _train_preprocess_jpeg(spec: DatasetSpec, size: int, augment: bool, aug_key: tf.Tensor):
  """Per-example train preprocessing of JPEG-encoded images; keyed by example position."""

  def fn(index, example):
    image = example["image"]
    if augment:
      key = tf.random.experimental.stateless_fold_in(aug_key, index)
      image = _random_resized_crop(image, size, key)
    else:
      image = _resize_center_crop(tf.io.decode_jpeg(image, channels=3), size)
    return {
      "image": tf.ensure_shape(_normalize(image, spec), [size, size, spec.channels]),
      "label": tf.cast(example["label"], tf.int32),
    }

  return fn


def _eval_preprocess(spec: DatasetSpec, size: int):
  def fn(example):
    image = example["image"]
    image = (
      _resize_center_crop(image, size)
      if spec.crop_padding == 0
      else _resize_if_needed(image, spec, size)
    )
    image = tf.ensure_shape(_normalize(image, spec), [size, size, spec.channels])
    return {
      "image": image,
      "label": tf.cast(example["label"], tf.int32),
      "mask": tf.constant(1.0, tf.float32),
    }

  return fn


def _image_label(example):
  return {"image": example["image"], "label": example["label"]}


def _with_options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  # A small private pool: the pipeline needs a few percent of a core for the datasets
  # here, and TF's default (one thread per core, spinning) competes with XLA's step.
  options.threading.private_threadpool_size = _DATA_THREADS
  # No autotuning thread: deleting an iterator (qnet makes one per epoch and evaluation)
  # waits for that thread, and on TF 2.21 it sometimes sleeps through its wake-up: 30-40 s
  # stalls at epoch boundaries of the default demo (experiments/README.md, "Host memory").
  # AUTOTUNE parallelism is then the private pool's size; measured throughput unchanged.
  options.autotune.enabled = False
  return ds.with_options(options)


# ----------------------------------------------------------------------------- iterators


def _steps_per_epoch_checked(
  builder: tfds.core.DatasetBuilder,
  spec: DatasetSpec,
  split: str,
  global_batch_size: int,
  start_step: int,
) -> int:
  steps = _split_size(builder, split) // global_batch_size
  if steps == 0 or start_step < 0:
    raise ValueError(
      f"Need 0 < global_batch_size={global_batch_size} <= the {spec.name} "
      f"training set size ({split!r}) and start_step={start_step} >= 0"
    )
  return steps


def _streamed_share(
  builder: tfds.core.DatasetBuilder, share: Any, share_size: int, shuffle_seed: int
) -> tf.data.Dataset:
  """Encoded (image, label) pairs of one epoch: shuffled files, then a bounded shuffle buffer."""
  ds = builder.as_dataset(
    split=share,
    shuffle_files=True,
    decoders={"image": tfds.decode.SkipDecoding()},
    read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False),
  )
  return ds.map(_image_label).shuffle(
    min(share_size, _STREAM_SHUFFLE_BUFFER), seed=shuffle_seed, reshuffle_each_iteration=False
  )


def create_train_iterator(
  dataset: str,
  *,
  global_batch_size: int,
  seed: int,
  start_step: int = 0,
  data_dir: str | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  augment: bool = True,
  image_size: int | None = None,
  train_examples: int = -1,
) -> Iterator[dict[str, np.ndarray]]:
  """Infinite iterator of this process's training batches (of the first `train_examples`
  training examples only, unless -1).

  Yields {'image': float32 [B, H, W, C] (normalized), 'label': int32 [B]} with
  B = global_batch_size // process_count. Batch `k` depends only on (dataset, seed, k,
  process_index, process_count, augment, image_size), so `start_step=k` resumes exactly.
  `seed` must be a non-negative integer.
  """
  spec = _spec(dataset)
  size = image_size or spec.image_size
  process_index, process_count = _process_info(process_index, process_count)
  local_batch = _local_batch(global_batch_size, process_count)
  builder = get_builder(dataset, data_dir)
  split = train_split(dataset, train_examples, data_dir)
  steps = _steps_per_epoch_checked(builder, spec, split, global_batch_size, start_step)
  share = tfds.even_splits(split, n=process_count)[process_index]
  share_size = _split_size(builder, share)
  examples_per_epoch = steps * local_batch  # Same for every process.
  cached = _cached_share(builder, share) if spec.cache else None

  def epoch_dataset(epoch: int, skip_batches: int) -> tf.data.Dataset:
    shuffle_seed, aug_key = _epoch_seeds(seed, epoch)
    # Augmentation is keyed by position in the epoch; skipping happens before it.
    if cached is not None:
      ds = cached.shuffle(share_size, seed=shuffle_seed, reshuffle_each_iteration=False)
      preprocess = _train_preprocess_batch(spec, size, augment, aug_key)
      ds = ds.take(examples_per_epoch)
      ds = _batched_then_augmented(ds, skip_batches, local_batch, preprocess)
    else:
      ds = _streamed_share(builder, share, share_size, shuffle_seed).take(examples_per_epoch)
      preprocess = _train_preprocess_jpeg(spec, size, augment, aug_key)
      ds = ds.enumerate().skip(skip_batches * local_batch)
      ds = ds.map(preprocess, num_parallel_calls=AUTOTUNE)
      ds = ds.batch(local_batch, drop_remainder=True)
    return _with_options(ds.prefetch(AUTOTUNE))

  def generate() -> Iterator[dict[str, np.ndarray]]:
    first_epoch, skip = divmod(start_step, steps)
    for epoch in itertools.count(first_epoch):
      yield from tfds.as_numpy(epoch_dataset(epoch, skip if epoch == first_epoch else 0))

  return _translate_data_loss(generate(), str(builder.data_dir))


def _cached_share(builder, share: str) -> tf.data.Dataset:
  """This process's share decoded once and kept in memory, reused by every epoch."""
  ds = builder.as_dataset(
    split=share,
    shuffle_files=False,
    read_config=tfds.ReadConfig(try_autocache=False),
    decoders=_decoders(builder),
  )
  return ds.map(_image_label, num_parallel_calls=AUTOTUNE).cache()


def _batched_then_augmented(
  ds: tf.data.Dataset, skip_batches: int, local_batch: int, preprocess_batch
) -> tf.data.Dataset:
  """Batches from `skip_batches` on, each augmented as a batch keyed by its index in the epoch."""
  ds = ds.skip(skip_batches * local_batch).batch(local_batch, drop_remainder=True)
  return ds.enumerate(start=skip_batches).map(preprocess_batch, num_parallel_calls=AUTOTUNE)


def _eval_shares(builder, spec: DatasetSpec, process_count: int) -> list[int]:
  return [_split_size(builder, s) for s in tfds.even_splits(spec.eval_split, n=process_count)]


def create_eval_iterator(
  dataset: str,
  *,
  global_batch_size: int,
  data_dir: str | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  image_size: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Finite iterator over this process's share of the eval split, in file order.

  Yields {'image', 'label', 'mask'} batches of B = global_batch_size // process_count;
  `mask` (float32 [B]) is 1 for real examples, 0 for padding. Every process yields
  ceil(largest process share / B) batches (the collective eval step needs the same count
  everywhere), so all eval examples are scored exactly once overall.
  """
  spec = _spec(dataset)
  size = image_size or spec.image_size
  process_index, process_count = _process_info(process_index, process_count)
  local_batch = _local_batch(global_batch_size, process_count)
  builder = get_builder(dataset, data_dir)
  shares = _eval_shares(builder, spec, process_count)
  num_batches = -(-max(shares) // local_batch)
  share = tfds.even_splits(spec.eval_split, n=process_count)[process_index]

  ds = builder.as_dataset(split=share, shuffle_files=False, decoders=_decoders(builder))
  ds = ds.map(_eval_preprocess(spec, size), num_parallel_calls=AUTOTUNE)
  padding = {
    "image": tf.zeros([size, size, spec.channels], tf.float32),
    "label": tf.constant(0, tf.int32),
    "mask": tf.constant(0.0, tf.float32),
  }
  num_padding = num_batches * local_batch - shares[process_index]
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(num_padding))
  ds = _with_options(ds.batch(local_batch).prefetch(AUTOTUNE))
  return _translate_data_loss(iter(tfds.as_numpy(ds)), str(builder.data_dir))
