"""Tests of qnet.data.input_pipeline and the offline Fashion-MNIST builder (offline, ~30 s)."""

import collections
import itertools
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from qnet.data import fashion_mnist_offline
from qnet.data import input_pipeline as ip
from qnet.data.datasets import DataError

DEBIAN_DIR = fashion_mnist_offline.DEFAULT_DIR
from conftest import FAKE_TEST, FAKE_TRAIN  # the fake_data_dir fixture's sizes


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _ids(batch):
  """Fake images are constant, equal to the example's index: read it back at the centre
  (augmentation only moves the image by <= 2 pixels)."""
  spec = ip.DATASETS["fashion_mnist"]
  pixel = batch["image"][:, 14, 14, 0] * spec.std[0] + spec.mean[0]
  return np.rint(pixel * 255).astype(int).tolist()


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(scope="session")
def real_data_dir(tmp_path_factory):
  if not os.path.exists(os.path.join(DEBIAN_DIR, "train-labels-idx1-ubyte.gz")):
    # CI installs the package (.ci/run), so there a missing directory is a failure.
    if os.environ.get("CI"):
      pytest.fail(f"{DEBIAN_DIR} missing in CI: .ci/run must install dataset-fashion-mnist")
    pytest.skip(f"{DEBIAN_DIR} missing: apt-get install dataset-fashion-mnist")
  data_dir = os.environ.get("QNET_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
  with pytest.MonkeyPatch.context() as mp:
    mp.delenv(fashion_mnist_offline.DIR_ENV_VAR, raising=False)
    ip.get_builder("fashion_mnist", data_dir)  # Builds on first use (~7 s).
  return data_dir


# ------------------------------------------------------------------ offline builder


@pytest.mark.heavy
def test_offline_builder_reads_debian_files(real_data_dir):
  builder = ip.get_builder("fashion_mnist", real_data_dir)
  assert builder.name == "fashion_mnist_offline"
  assert ip.num_examples("fashion_mnist", "train", real_data_dir) == 60000
  assert ip.num_examples("fashion_mnist", "test", real_data_dir) == 10000
  assert ip.steps_per_epoch("fashion_mnist", 128, real_data_dir) == 60000 // 128
  test = tfds.as_numpy(builder.as_dataset("test", batch_size=-1))
  assert test["image"].shape == (10000, 28, 28, 1) and test["image"].dtype == np.uint8
  assert test["image"].max() > 200
  counts = np.bincount(test["label"], minlength=10)
  assert len(counts) == 10 and counts.min() >= 900, counts  # 1000 each.
  # The train split through the pipeline (a 1/10 share keeps it fast).
  batch = next(
    ip.create_train_iterator(
      "fashion_mnist",
      global_batch_size=640,
      seed=0,
      data_dir=real_data_dir,
      process_index=3,
      process_count=10,
    )
  )
  assert batch["image"].shape == (64, 28, 28, 1) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32 and 0 <= batch["label"].min() <= batch["label"].max() < 10
  assert abs(batch["image"].mean()) < 0.5 and 0.5 < batch["image"].std() < 1.5


def test_missing_files_error_names_debian_package(tmp_path, monkeypatch):
  empty = tmp_path / "empty"
  empty.mkdir()
  monkeypatch.setenv(fashion_mnist_offline.DIR_ENV_VAR, str(empty))
  with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
    ip.get_builder("fashion_mnist", str(tmp_path / "tfds"))


def test_unprepared_dataset_that_cannot_be_prepared_is_a_data_error(tmp_path, monkeypatch):
  def offline(self, *a, **k):
    raise OSError("Temporary failure in name resolution")

  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", offline)
  with pytest.raises(DataError) as info:
    ip.get_builder("cifar10", str(tmp_path / "tfds"))
  message = str(info.value)
  assert message.startswith("config.dataset='cifar10': no prepared TFDS data in config.data_dir=")
  assert "Temporary failure in name resolution" in message and "tfds build cifar10" in message
  assert "\n" not in message


def test_unknown_dataset_names_the_field():
  with pytest.raises(ValueError, match=r"dataset='mnist'.*cifar10.*fashion_mnist"):
    ip.get_builder("mnist")


# ------------------------------------------------------------------ shapes (mock data)


@pytest.mark.parametrize(
  "dataset,image_size,shape",
  [
    ("cifar100", None, (32, 32, 3)),
    ("imagenet2012", 64, (64, 64, 3)),
  ],
)
@pytest.mark.heavy
def test_mock_datasets_shapes(tmp_path, dataset, image_size, shape):
  with tfds.testing.mock_data(num_examples=12):
    kwargs = dict(data_dir=str(tmp_path), process_index=0, process_count=1, image_size=image_size)
    train = next(ip.create_train_iterator(dataset, global_batch_size=4, seed=1, **kwargs))
    evals = list(ip.create_eval_iterator(dataset, global_batch_size=8, **kwargs))
    assert len(evals) == 2
  assert train["image"].shape == (4, *shape) and train["image"].dtype == np.float32
  assert train["label"].shape == (4,) and train["label"].dtype == np.int32
  assert np.all(np.isfinite(train["image"]))
  assert 0 <= train["label"].min() and train["label"].max() < ip.DATASETS[dataset].num_classes
  for batch in evals:
    assert batch["image"].shape == (8, *shape) and batch["image"].dtype == np.float32
    assert batch["mask"].dtype == np.float32 and batch["label"].dtype == np.int32
  assert sum(b["mask"].sum() for b in evals) == 12


# ------------------------------------------------------------------ determinism


@pytest.mark.heavy
def test_resume_is_bitwise_identical_across_epochs(fake_data_dir):
  kwargs = dict(
    global_batch_size=8, seed=7, data_dir=fake_data_dir, process_index=0, process_count=1
  )
  steps = ip.steps_per_epoch("fashion_mnist", 8, fake_data_dir)
  assert steps == FAKE_TRAIN // 8
  reference = _take(ip.create_train_iterator("fashion_mnist", **kwargs), 3 * steps + 2)
  for k in (steps - 1, steps, 2 * steps + 3):
    resumed = _take(
      ip.create_train_iterator("fashion_mnist", start_step=k, **kwargs), len(reference) - k
    )
    _assert_same_batches(reference[k:], resumed)
  # Each epoch is a permutation (without the dropped remainder) of the training set.
  for epoch in range(3):
    ids = sum((_ids(b) for b in reference[epoch * steps : (epoch + 1) * steps]), [])
    assert len(set(ids)) == steps * 8 and set(ids) <= set(range(1, FAKE_TRAIN + 1))
  assert _ids(reference[0]) != _ids(reference[steps])  # Reshuffled.


@pytest.mark.parametrize("dataset,image_size", [("cifar10", None), ("imagenet2012", 32)])
@pytest.mark.heavy
def test_resume_mock_data(tmp_path, dataset, image_size):
  with tfds.testing.mock_data(num_examples=10):
    kwargs = dict(
      global_batch_size=4,
      seed=3,
      data_dir=str(tmp_path),
      process_index=0,
      process_count=1,
      image_size=image_size,
    )
    reference = _take(ip.create_train_iterator(dataset, **kwargs), 5)  # 2 per epoch.
    resumed = _take(ip.create_train_iterator(dataset, start_step=3, **kwargs), 2)
  _assert_same_batches(reference[3:], resumed)


def test_seed_controls_order_and_augmentation(fake_data_dir):
  def batches(seed, augment=True):
    return _take(
      ip.create_train_iterator(
        "fashion_mnist",
        global_batch_size=10,
        seed=seed,
        data_dir=fake_data_dir,
        process_index=0,
        process_count=1,
        augment=augment,
      ),
      5,
    )

  a, b, c = batches(0), batches(0), batches(1)
  _assert_same_batches(a, b)
  assert [_ids(x) for x in a] != [_ids(x) for x in c]
  # The fake images are constant and non-zero; augmentation shows as padded (zero) borders.
  plain = batches(0, augment=False)
  assert [_ids(x) for x in plain] == [_ids(x) for x in a]
  spec = ip.DATASETS["fashion_mnist"]
  zero = -spec.mean[0] / spec.std[0]
  assert np.isclose(np.stack([x["image"] for x in a]), zero).any()
  assert not np.isclose(np.stack([x["image"] for x in plain]), zero).any()


# ------------------------------------------------------------------ multi-process


def test_train_shares_are_disjoint(fake_data_dir):
  steps = ip.steps_per_epoch("fashion_mnist", 6, fake_data_dir)
  shares = []
  for p in range(3):
    it = ip.create_train_iterator(
      "fashion_mnist",
      global_batch_size=6,
      seed=5,
      data_dir=fake_data_dir,
      process_index=p,
      process_count=3,
    )
    batches = _take(it, steps)
    assert all(b["image"].shape == (2, 28, 28, 1) for b in batches)
    shares.append(sum((_ids(b) for b in batches), []))
  for p, ids in enumerate(shares):
    assert len(ids) == len(set(ids)) == steps * 2
    for q in range(p):
      assert not set(ids) & set(shares[q]), (p, q)


def test_eval_covers_every_example_once(fake_data_dir):
  builder = ip.get_builder("fashion_mnist", fake_data_dir)
  labels = tfds.as_numpy(builder.as_dataset("test", batch_size=-1))["label"]
  num_batches = 4  # Every process: shares 8, 8, 7 at local batch 2, the largest sets the count.
  ids, seen_labels, mask_sum = [], [], 0.0
  for p in range(3):
    batches = list(
      ip.create_eval_iterator(
        "fashion_mnist",
        global_batch_size=6,
        data_dir=fake_data_dir,
        process_index=p,
        process_count=3,
      )
    )
    assert len(batches) == num_batches
    for b in batches:
      assert b["image"].shape == (2, 28, 28, 1) and b["mask"].shape == (2,)
      real = b["mask"] == 1
      mask_sum += b["mask"].sum()
      ids += [i for i, r in zip(_ids(b), real) if r]
      seen_labels += b["label"][real].tolist()
  assert mask_sum == FAKE_TEST
  assert sorted(ids) == list(range(100, 100 + FAKE_TEST))
  assert collections.Counter(seen_labels) == collections.Counter(labels.tolist())
