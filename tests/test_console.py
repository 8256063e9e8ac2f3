"""The console of a CLI run: one line per log step and per evaluation, library chatter only
with --verbose."""

import re
import subprocess
import sys

import pytest

from qnet.train import metrics_io
from test_reliability import ROOT, _env

ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]")
CHATTER = ("FeatureConnector", "libtpu", "Hyperparameters", "oneDNN", "dataset_info", "reader.py")


def _run(tmp_path, data_dir, *extra):
  cmd = [
    sys.executable,
    "-m",
    "qnet.main",
    "--config=configs/fashion_mnist_w4a4.py",
    f"--workdir={tmp_path / 'w'}",
    f"--config.data_dir={data_dir}",
    "--config.model=tiny_cnn",
    "--config.batch_size=8",
    *extra,
  ]
  proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return (proc.stdout + proc.stderr).splitlines()


@pytest.mark.slow
def test_default_console_is_one_line_per_log_step_and_evaluation(tmp_path, fake_data_dir):
  lines = _run(
    tmp_path,
    fake_data_dir,
    "--config.num_train_steps=6",
    "--config.log_every_steps=2",
    "--config.eval_every_steps=3",
  )
  steps = [l for l in lines if l.startswith("step ")]
  evals = [l for l in lines if l.startswith("eval ")]
  assert [l.split()[1] for l in steps] == ["2/6", "4/6", "6/6"]
  assert [l.split()[1] for l in evals] == ["3/6", "6/6"]
  step_line = r"step \d+/6  loss [\d.]+  train_acc [\d.]+  W4A4  q-frac 1.000  [\d.]+ steps/s"
  step_line += r"  ETA \S+"
  assert all(re.fullmatch(step_line, l) for l in steps), steps
  eval_line = r"eval \d/6  accuracy [\d.]+  top-5 [\d.]+  loss [\d.]+  \(23 examples\)"
  assert all(re.fullmatch(eval_line, l) for l in evals), evals
  # Besides those, only the run's own set-up lines (devices, the precision schedule).
  others = [l for l in lines if l not in steps + evals]
  assert len(others) <= 3, others
  assert not any(ABSL_PREFIX.match(l) for l in lines), lines
  assert not [l for l in lines if any(c in l for c in CHATTER)], lines


@pytest.mark.slow
def test_verbose_brings_back_library_lines(tmp_path, fake_data_dir):
  lines = _run(tmp_path, fake_data_dir, "--config.num_train_steps=2", "--verbose")
  assert any(ABSL_PREFIX.match(l) for l in lines)
  assert any("Hyperparameters" in l for l in lines) and any("dataset_info" in l for l in lines)
  # The deprecated TFDS call is gone at its source, verbose or not.
  assert not [l for l in lines if "FeatureConnector.dtype" in l]


def test_console_lines_name_every_network():
  mean = dict(train_loss=0.5, train_accuracy=0.75, weight_bits=2.0, act_bits=4.0)
  mean |= dict(quantized_fraction=0.5, steps_per_sec=12.345)
  assert metrics_io.train_line(30, 100, mean, 65.0) == (
    "step 30/100  loss 0.5000  train_acc 0.7500  W2A4  q-frac 0.500  12.35 steps/s  ETA 1m05s"
  )
  metrics = dict(eval_accuracy=0.8, eval_top5_accuracy=0.99, eval_loss=0.6, eval_examples=100.0)
  metrics |= dict(teacher_eval_accuracy=0.9, student1_eval_accuracy=0.85)
  metrics |= dict(teacher_eval_top5_accuracy=1.0, teacher_eval_loss=0.3)
  assert metrics_io.eval_line(30, 100, metrics) == (
    "eval 30/100  accuracy 0.8000  top-5 0.9900  loss 0.6000  student1 0.8500  teacher 0.9000"
    "  (100 examples)"
  )


def test_steps_per_second_and_eta_are_steps_over_the_interval(monkeypatch):
  clock = iter([100.0, 104.0, 105.0])
  monkeypatch.setattr(metrics_io.time, "perf_counter", lambda: next(clock))
  progress = metrics_io.Progress(start_step=10, total_steps=50)
  assert progress.update(20) == (2.5, 12.0)  # 10 steps in 4 s; 30 left
  assert progress.update(25) == (5.0, 5.0)
