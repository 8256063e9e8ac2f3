"""Entry point: `python -m qnet.main --config=configs/fashion_mnist_w4a4.py --workdir=DIR`.

Overrides: `--config.batch_size=64`, `--config.quant.weight_bits=2`, ... A bad config stops
before any data loading or compilation with a one-line error and exit status 2.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard logs.")
flags.mark_flags_as_required(["config", "workdir"])


def _reference_config():
  from configs import default  # the schema of every field
  return default.get_config()


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import jax
  from qnet import config_validation

  if os.environ.get("QNET_DISTRIBUTED") == "1":  # multi-host: coordinator from the environment
    jax.distributed.initialize()
  try:
    config_validation.validate(FLAGS.config, jax.device_count(), jax.process_count(),
                               reference=_reference_config())
  except config_validation.ConfigError as e:
    print(f"qnet: config error: {e}", file=sys.stderr)
    sys.exit(2)
  logging.info("JAX process %d/%d, %d local devices (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.default_backend())
  from qnet import trainer
  trainer.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
