"""Test set-up: 4 fake CPU devices (before JAX initialises) and shared fixtures."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fmnist_data_dir(tmp_path_factory):
  """TFDS data dir holding the offline Fashion-MNIST build (built once per session)."""
  path = os.environ.get("QNET_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tfds"))
  from qnet import input_pipeline
  input_pipeline.get_builder("fashion_mnist", path)
  return path
