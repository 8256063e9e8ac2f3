"""Test set-up: 4 fake CPU devices (before JAX initialises) and shared fixtures."""

import gzip
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Many tests compile the same small steps; a per-session persistent cache makes the
# repeats cheap (stack-notes: 3.2 s -> 0.27 s per compile).
_CACHE = os.environ.get("QNET_TEST_JAX_CACHE") or os.path.join(
  os.path.dirname(__file__), "..", ".pytest_cache", "jax"
)
jax.config.update("jax_compilation_cache_dir", os.path.abspath(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


FAKE_TRAIN, FAKE_TEST = 50, 23


def write_idx(path, array) -> None:
  """Writes a gzipped unsigned-byte IDX file (the Fashion-MNIST file format)."""
  header = (0x0800 | array.ndim).to_bytes(4, "big")
  header += b"".join(d.to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def fake_data_dir(tmp_path_factory):
  """A data_dir holding a tiny `fashion_mnist_offline` built from fake IDX files whose
  images are constant = example index (train 1..50, test 100..122), label = index % 10."""
  from qnet.data import fashion_mnist_offline
  from qnet.data import input_pipeline as ip

  src = tmp_path_factory.mktemp("fake_idx")
  for split, n, offset in (("train", FAKE_TRAIN, 1), ("t10k", FAKE_TEST, 100)):
    index = np.arange(offset, offset + n)
    write_idx(src / f"{split}-images-idx3-ubyte.gz", np.repeat(index, 784).reshape(n, 28, 28))
    write_idx(src / f"{split}-labels-idx1-ubyte.gz", index % 10)
  data_dir = tmp_path_factory.mktemp("fake_tfds")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv(fashion_mnist_offline.DIR_ENV_VAR, str(src))
    ip.get_builder("fashion_mnist", str(data_dir))
  return str(data_dir)


@pytest.fixture(scope="session")
def two_process_run(tmp_path_factory, fake_data_dir):
  """One undisturbed 2-process CLI run (2 CPU devices each, gloo; test_multiprocess.launch_two),
  made once per session: (its workdir, each process's stderr). test_multiprocess checks what it
  wrote; test_lost_host's killed-and-relaunched run must end bitwise equal to it. Read-only:
  copy it before resuming it."""
  from test_multiprocess import finish_two, launch_two

  work = str(tmp_path_factory.mktemp("two_process_run") / "work")
  return work, finish_two(launch_two(work, fake_data_dir))
