"""Metric output: TensorBoard (clu) and `WORKDIR/metrics.jsonl`, plus the console lines."""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from typing import Any, Mapping

from clu import metric_writers
from clu.metric_writers import interface
import numpy as np

from qnet.train import console


class JsonlWriter(interface.MetricWriter):
  """Appends one JSON object per `write_scalars` call: `{"step": s, name: value, ...}`.

  A run killed mid-write leaves a torn last line; the next append starts on a fresh line
  so only that fragment is lost (`read_jsonl` skips it). Non-scalar summaries are ignored
  (TensorBoard keeps those).
  """

  def __init__(self, path: str):
    self._path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    line = (json.dumps(row, allow_nan=True) + "\n").encode()
    try:
      with open(self._path, "a+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end:
          f.seek(end - 1)
          if f.read(1) != b"\n":
            line = b"\n" + line
        f.write(line)  # one write call: a line is torn only by a kill or a full disk
    except OSError as e:  # name the file: the caller reports "no space" / "read-only"
      raise OSError(e.errno, e.strerror, self._path) from e

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def create_writer(workdir: str, is_chief: bool) -> metric_writers.MetricWriter:
  """TensorBoard + metrics.jsonl on the chief process, nothing elsewhere; with a verbose
  console (`console.verbose()`) every process also logs each write (clu's logging writer)."""
  writers: list[metric_writers.MetricWriter] = []
  if console.verbose():
    writers.append(metric_writers.LoggingWriter())
  if is_chief:
    writers.append(metric_writers.SummaryWriter(workdir))
    writers.append(JsonlWriter(os.path.join(workdir, "metrics.jsonl")))
  return metric_writers.MultiWriter(writers)


def read_jsonl(path: str) -> list[dict]:
  """All rows of a metrics.jsonl file. Lines that do not parse as a JSON object (torn by a
  run killed mid-write) are skipped with one `RuntimeWarning` counting them."""
  rows, bad = [], []
  with open(path, errors="replace") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except ValueError:
        row = None
      if isinstance(row, dict):
        rows.append(row)
      else:
        bad.append(number)
  if bad:
    shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
    warnings.warn(
      f"{path}: skipped {len(bad)} unreadable line(s) (torn by a run killed mid-write?): "
      f"line {shown}",
      RuntimeWarning,
      stacklevel=2,
    )
  return rows


def train_line(step: int, total: int, mean: Mapping[str, float], eta: float) -> str:
  """The console line of a log step: step, loss, accuracy, bits, steps/s and ETA."""
  return (
    f"step {step}/{total}  loss {mean['train_loss']:.4f}  train_acc {mean['train_accuracy']:.4f}"
    f"  W{mean['weight_bits']:g}A{mean['act_bits']:g}  q-frac {mean['quantized_fraction']:.3f}"
    f"  {mean['steps_per_sec']:.2f} steps/s  ETA {format_duration(eta)}"
  )


def eval_line(step: int, total: int, metrics: Mapping[str, float]) -> str:
  """The console line of an evaluation: the first student's accuracy, top-5 and loss, then
  every other network's accuracy (`teacher`, `student1`, ...)."""
  others = "".join(
    f"  {k[: -len('_eval_accuracy')]} {v:.4f}"
    for k, v in sorted(metrics.items())
    if k.endswith("_eval_accuracy") and "top5" not in k
  )
  return (
    f"eval {step}/{total}  accuracy {metrics['eval_accuracy']:.4f}"
    f"  top-5 {metrics['eval_top5_accuracy']:.4f}  loss {metrics['eval_loss']:.4f}{others}"
    f"  ({metrics['eval_examples']:.0f} examples)"
  )


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """Steps/s over the last interval and ETA to `total_steps`, for the console line."""

  def __init__(self, start_step: int, total_steps: int):
    self.total = total_steps
    self._last_step, self._last_time = start_step, time.perf_counter()

  def update(self, step: int) -> tuple[float, float]:
    """(steps per second since the previous update, estimated seconds left)."""
    now = time.perf_counter()
    rate = (step - self._last_step) / max(now - self._last_time, 1e-9)
    self._last_step, self._last_time = step, now
    return rate, (self.total - step) / rate if rate > 0 else float("inf")
