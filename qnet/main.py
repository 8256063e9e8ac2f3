"""Entry point: `python -m qnet.main --config=configs/fashion_mnist_w4a4.py --workdir=DIR`.

Overrides: `--config.batch_size=64`, `--config.quant.weight_bits=2`, ... A bad config stops
before any data loading or compilation with a one-line error and exit status 2. The console
shows one line per log step and per evaluation; `--verbose` adds every library's log lines.

Several processes (hosts): set QNET_DISTRIBUTED=1 in each. On Cloud TPU, SLURM and other
clusters JAX finds its peers itself; by hand, also set JAX_COORDINATOR_ADDRESS=host0:PORT,
QNET_NUM_PROCESSES=N and QNET_PROCESS_ID=0..N-1. A process that stops sending heartbeats
(its host is lost) stops the others within QNET_HEARTBEAT_TIMEOUT_S seconds (default 100).

Faults that need a person end with one line `qnet: KIND: ...` on stderr and exit status 2
(config error, data error, workdir busy, storage error); a lost peer process ends the
survivors with `qnet: lost a peer process: ...` and exit status 1 (relaunch all of them).
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF is only our data loader: keep it quiet

from absl import app, flags, logging
from ml_collections import config_flags

from qnet.train import faults
from qnet.platform import workdir_lock
from qnet.data.datasets import DataError

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def define_flags(flag_values: flags.FlagValues) -> flags.FlagValues:
  """Defines `--config`, `--workdir` and `--verbose` in `flag_values` (tests parse the
  documented commands with a fresh `FlagValues` through the same definitions)."""
  config_flags.DEFINE_config_file(
    "config", None, "Training configuration file.", flag_values=flag_values, lock_config=True
  )
  flags.DEFINE_string(
    "workdir",
    None,
    "Directory for checkpoints, metrics and TensorBoard logs.",
    flag_values=flag_values,
  )
  flags.DEFINE_bool(
    "verbose",
    False,
    "Show every library's log lines with absl's prefixes (TFDS readers, orbax, JAX backends, "
    "the hyperparameters, each metric write). Default: one line per log step and evaluation.",
    flag_values=flag_values,
  )
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)
  return flag_values


FLAGS = define_flags(flags.FLAGS)


def _reference_config():
  from configs import default  # the schema of every field

  return default.get_config()


def _initialize_distributed() -> None:
  """`jax.distributed.initialize`: cluster auto-detection (Cloud TPU, SLURM, ...), or a hand
  launch with JAX_COORDINATOR_ADDRESS=host:port, QNET_NUM_PROCESSES and QNET_PROCESS_ID."""
  import jax

  n, i = os.environ.get("QNET_NUM_PROCESSES"), os.environ.get("QNET_PROCESS_ID")
  jax.distributed.initialize(
    num_processes=int(n) if n else None,
    process_id=int(i) if i else None,
    heartbeat_timeout_seconds=heartbeat_timeout_s(),
  )


def heartbeat_timeout_s() -> int:
  """`QNET_HEARTBEAT_TIMEOUT_S`: seconds without heartbeats after which a process counts as
  dead and the job stops (default 100, JAX's own)."""
  text = os.environ.get("QNET_HEARTBEAT_TIMEOUT_S", "100")
  if not text.isdigit() or int(text) < 1:
    print(
      f"qnet: config error: QNET_HEARTBEAT_TIMEOUT_S={text!r}; allowed: seconds >= 1",
      file=sys.stderr,
    )
    sys.exit(2)
  return int(text)


# Errors that end a run with one line `qnet: KIND: message` and an exit status.
ONE_LINE_ERRORS = (
  (DataError, "data error", 2),
  (workdir_lock.WorkdirBusyError, "workdir busy", 2),
  (faults.StorageError, "storage error", 2),
  (faults.PeerLostError, "lost a peer process", 1),
)


def one_line_errors() -> tuple:
  """`ONE_LINE_ERRORS` plus a user model's rule errors (imported late: flax loads with it)."""
  from qnet.models.rules import RuleError

  return (*ONE_LINE_ERRORS, (RuleError, "model error", 2))


def _exit_with_one_line(e: Exception) -> None:
  for kind, label, status in one_line_errors():
    if isinstance(e, kind):
      print(f"qnet: {label}: {e}", file=sys.stderr, flush=True)
      if isinstance(e, faults.PeerLostError):
        # jax.distributed's exit barrier would wait for the dead peer (minutes): skip it.
        logging.flush()
        os._exit(status)
      sys.exit(status)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  from qnet.train import console

  console.configure(verbose=FLAGS.verbose)
  from qnet.platform import host_memory

  kept = host_memory.keep_freed_memory()  # before JAX starts its backends (its docstring)
  import jax
  from qnet.train import config_validation

  if os.environ.get("QNET_DISTRIBUTED") == "1":
    _initialize_distributed()
  try:
    config_validation.validate(
      FLAGS.config, jax.device_count(), jax.process_count(), reference=_reference_config()
    )
  except config_validation.ConfigError as e:
    print(f"qnet: config error: {e}", file=sys.stderr)
    sys.exit(2)
  logging.info(
    "JAX process %d/%d, %d local devices (%s%s)",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.default_backend(),
    "; malloc keeps freed memory: qnet.platform.host_memory" if kept else "",
  )
  try:
    # The lock first (before TensorFlow loads): a second run on a busy workdir stops at once.
    with faults.guard(FLAGS.workdir, is_chief=jax.process_index() == 0):
      from qnet.train import loop

      loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except tuple(kind for kind, _, _ in one_line_errors()) as e:
    _exit_with_one_line(e)


def parse_flags(argv: list[str], flag_values: flags.FlagValues | None = None) -> list[str]:
  """absl flag parsing, but a missing `--config` file or a bad `--config.FIELD=VALUE` is one
  line and exit status 2."""
  flag_values = FLAGS if flag_values is None else flag_values
  missing = missing_config_file(argv)
  if missing:
    print(f"qnet: config error: {missing}", file=sys.stderr)
    sys.exit(2)
  try:
    return flag_values(argv)
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    print(f"qnet: config error: {_flag_error(argv, e)}", file=sys.stderr)
    sys.exit(2)


def missing_config_file(argv: list[str]) -> str:
  """The one-line message for a `--config` file that does not exist ('' if it does, or if
  there is no `--config`: absl reports that), listing the config files that do."""
  value = None
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith("--config="):
      value = arg[len("--config=") :]
    elif arg == "--config" and i + 1 < len(argv):
      value = argv[i + 1]
  if value is None:
    return ""
  path = value.split(":", 1)[0]  # `file.py:variant` (config_flags' argument syntax)
  if os.path.isfile(path):
    return ""
  shown = sorted(f for f in os.listdir(CONFIGS_DIR) if f.endswith(".py") and f != "__init__.py")
  return f"--config={path}: no such file; the configs are configs/{{{', '.join(shown)}}}"


def _flag_error(argv: list[str], error: Exception) -> str:
  """The one-line message for a failed `--config.FIELD=VALUE`: an unknown field (with the
  nearest known one), else absl's first line plus what the field allows."""
  from qnet.train import config_validation

  reference = config_validation.flatten(_reference_config())
  fields = [a[len("--config.") :].split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
  try:
    for field in fields:
      config_validation.check_field_name(field, reference)
  except config_validation.ConfigError as unknown:
    return str(unknown)
  first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  expected = ""
  for field in (f for f in fields if f in first):
    default = reference[field]
    allowed = (
      config_validation.BITS_ALLOWED
      if field.endswith("_bits")
      else f"a {type(default).__name__} like the default {default!r}"
    )
    expected = f"; allowed: {allowed}"
  return f"{first}{expected}"


def run() -> None:
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
