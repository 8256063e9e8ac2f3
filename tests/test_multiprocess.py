"""Two JAX processes (2 CPU devices each, gloo collectives) train as one 4-device run, and
one process resumes their checkpoint."""

import os
import shutil
import socket
import subprocess

import jax
import numpy as np
import pytest

from conftest import FAKE_TEST
from qnet.train import metrics_io
from test_reliability import ROOT, STEPS, _cli, _env, _final_params


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(port: int, index: int, **extra: str) -> dict:
  """Environment of process `index` of a 2-process CPU job (2 devices each) on `port`."""
  return _env() | {
    "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    "QNET_DISTRIBUTED": "1",
    "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
    "QNET_NUM_PROCESSES": "2",
    "QNET_PROCESS_ID": str(index),
  } | extra


def launch_two(work: str, data_dir: str, *extra: str, **env: str) -> list[subprocess.Popen]:
  """Starts the 2-process CLI job (test_reliability's config, the direct schedule) on `work`."""
  port = _free_port()
  cmd = _cli(work, data_dir, "--config.schedule.kind=direct", *extra)
  return [
    subprocess.Popen(
      cmd,
      cwd=ROOT,
      env=process_env(port, i, **env),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]


def finish_two(procs: list[subprocess.Popen], timeout: float = 400) -> list[str]:
  """Waits for both processes, kills them whatever happens, asserts both exited 0; their
  stderr."""
  try:
    errs = [p.communicate(timeout=timeout)[1] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-3000:]
  return errs


@pytest.mark.slow
def test_two_processes_train_evaluate_and_checkpoint(tmp_path, fake_data_dir, two_process_run):
  ref, errs = two_process_run
  work = str(tmp_path / "two")
  shutil.copytree(ref, work)  # the shared run stays as it ended (test_lost_host compares to it)
  assert "JAX process 1/2, 2 local devices" in errs[1]

  rows = metrics_io.read_jsonl(os.path.join(work, "metrics.jsonl"))
  train_steps = [r["step"] for r in rows if "train_loss" in r]
  assert train_steps == sorted(set(train_steps)), "only the chief writes metrics"
  evals = [r for r in rows if "eval_accuracy" in r]
  assert [r["step"] for r in evals] == [12, 24]
  # Each process evaluates its own share, padded and masked: every test example once.
  assert all(r["eval_examples"] == FAKE_TEST for r in evals)
  assert all(np.isfinite(r["train_loss"]) for r in rows if "train_loss" in r)
  step, state = _final_params(work)
  assert step == STEPS
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state))

  # The same workdir resumes in one process with 4 devices (another topology) and goes on.
  more = _cli(work, fake_data_dir, "--config.schedule.kind=direct")
  more = [a for a in more if not a.startswith("--config.num_train_steps=")]
  more.append(f"--config.num_train_steps={STEPS + 2}")
  proc = subprocess.run(more, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"at step {STEPS}" in proc.stderr
  assert _final_params(work)[0] == STEPS + 2
