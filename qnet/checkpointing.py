"""Orbax checkpoints of the joint train state, plus run metadata for compatibility checks.

Each checkpoint holds the whole `TrainState` (every network's parameters, BN statistics and
optimiser state, the step and the PRNG key) and a small JSON `meta` item (model names,
quantized layer paths, dataset, batch size). The input pipeline's position is the step
itself: the training iterator is deterministic and resumes by skipping (input_pipeline).

Orbax writes each step into a temporary directory and renames it when complete, so a
killed save leaves no half-written checkpoint under a step's name. A checkpoint that still
fails to load (truncated or deleted file) is reported and the previous one is used.
"""
from __future__ import annotations

import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

PyTree = Any


class IncompatibleCheckpointError(ValueError):
  """The workdir's checkpoint was written by a run with a different setup."""


def create_manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  """A manager for `WORKDIR/checkpoints` (created on first save)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, meta: dict) -> None:
  """Saves asynchronously; call `manager.wait_until_finished()` before exiting."""
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             meta=ocp.args.JsonSave(meta)))


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_latest(manager: ocp.CheckpointManager, abstract_state: PyTree
                   ) -> tuple[int, PyTree, dict] | None:
  """(step, state, meta) of the newest checkpoint that loads, or None if there is none.

  A checkpoint that fails to load is logged and skipped (never deleted), falling back to
  the previous one; if none loads, the last error is raised.
  """
  steps = sorted(manager.all_steps(), reverse=True)
  last_error = None
  for step in steps:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
      return step, restored["state"], restored["meta"]
    except Exception as e:  # noqa: BLE001 - any failure to read means "damaged", try older.
      logging.error("checkpoint at step %d is damaged or unreadable (%s: %s); trying an older one",
                    step, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
      last_error = e
  if last_error is not None:
    raise RuntimeError(f"no readable checkpoint in {manager.directory}: all of steps {steps} "
                       "failed to load") from last_error
  return None


def check_compatible(saved: dict, current: dict) -> None:
  """Raises `IncompatibleCheckpointError` naming every field that differs."""
  diffs = [f"{k}: checkpoint has {saved.get(k)!r}, config has {current.get(k)!r}"
           for k in sorted(current) if saved.get(k) != current.get(k)]
  if diffs:
    raise IncompatibleCheckpointError(
        "the workdir holds a checkpoint of a different run; use a new --workdir or the "
        "original config. Differences: " + "; ".join(diffs))


def abstract_like(state: PyTree) -> PyTree:
  """ShapeDtypeStructs (with shardings) of `state`, the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
