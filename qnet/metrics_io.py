"""Metric output: clu writers (TensorBoard + log) and `WORKDIR/metrics.jsonl`, plus progress."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

from clu import metric_writers
from clu.metric_writers import interface
import numpy as np


class JsonlWriter(interface.MetricWriter):
  """Appends one JSON object per `write_scalars` call: `{"step": s, name: value, ...}`.

  Non-scalar summaries are ignored (TensorBoard keeps those).
  """

  def __init__(self, path: str):
    self._path = path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    row = {"step": int(step)}
    row.update({k: float(np.asarray(v)) for k, v in scalars.items()})
    with open(self._path, "a") as f:
      f.write(json.dumps(row, allow_nan=True) + "\n")

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
  """TensorBoard + log + metrics.jsonl on the chief process; log only elsewhere."""
  if not is_chief:
    return metric_writers.create_default_writer(workdir, just_logging=True)
  return metric_writers.MultiWriter(
    [
      metric_writers.create_default_writer(workdir, asynchronous=False),
      JsonlWriter(os.path.join(workdir, "metrics.jsonl")),
    ]
  )


def read_jsonl(path: str) -> list[dict]:
  """All rows of a metrics.jsonl file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def format_metrics(metrics: Mapping[str, float]) -> str:
  """`name value  name value ...`, sorted by name, for a log line."""
  return "  ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))


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
