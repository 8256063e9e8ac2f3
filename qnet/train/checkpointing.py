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
import flax.traverse_util
import jax
import numpy as np
import orbax.checkpoint as ocp

from qnet.models import layers

PyTree = Any


class IncompatibleCheckpointError(ValueError):
  """The workdir's checkpoint was written by a run with a different setup."""


def create_manager(workdir: str, max_to_keep: int = 3) -> ocp.CheckpointManager:
  """A manager for `WORKDIR/checkpoints` (created on first save)."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), "checkpoints"), options=options
  )


def save(manager: ocp.CheckpointManager, step: int, state: PyTree, meta: dict) -> None:
  """Saves asynchronously; call `manager.wait_until_finished()` before exiting."""
  manager.save(
    step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
  )


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict:
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def restore_latest(
  workdir: str, abstract_state: PyTree, current_meta: dict, max_to_keep: int = 3
) -> tuple[ocp.CheckpointManager, tuple[int, PyTree] | None]:
  """The manager and (step, state) of the newest checkpoint that loads (None if none).

  The run metadata is read and compared with `current_meta` first, so a checkpoint of a
  different run is an `IncompatibleCheckpointError` (naming what differs), never
  mistaken for damage. A checkpoint that fails to load is logged and moved aside to
  `STEP.damaged` (kept for inspection, never deleted), and the previous one is tried.
  """
  manager = create_manager(workdir, max_to_keep)
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      saved_meta = read_meta(manager, step)
    except Exception as e:  # noqa: BLE001 - unreadable metadata: a damaged checkpoint.
      manager = _quarantine(manager, workdir, step, e, max_to_keep)
      continue
    check_compatible(saved_meta, current_meta)
    try:
      restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
      )
      return manager, (step, restored["state"])
    except Exception as e:  # noqa: BLE001 - any failure to read means "damaged", try older.
      manager = _quarantine(manager, workdir, step, e, max_to_keep)
  return manager, None


def _quarantine(
  manager, workdir: str, step: int, error: Exception, max_to_keep: int
) -> ocp.CheckpointManager:
  path = os.path.join(str(manager.directory), str(step))
  target = f"{path}.damaged"
  logging.error(
    "checkpoint at step %d is damaged or unreadable (%s: %s); moved to %s, trying an older one",
    step,
    type(error).__name__,
    (str(error).splitlines() or [""])[0][:300],
    target,
  )
  manager.close()
  os.replace(path, target) if not os.path.exists(target) else None
  return create_manager(workdir, max_to_keep)


def check_compatible(saved: dict, current: dict) -> None:
  """Raises `IncompatibleCheckpointError` naming every field that differs."""
  diffs = [
    f"{k}: checkpoint has {saved.get(k)!r}, config has {current.get(k)!r}"
    for k in sorted(set(current) | set(saved))
    if saved.get(k) != current.get(k)
  ]
  if diffs:
    raise IncompatibleCheckpointError(
      "the workdir holds a checkpoint of a different run; use a new --workdir or the "
      "original config. Differences: " + "; ".join(diffs)
    )


def abstract_like(state: PyTree) -> PyTree:
  """ShapeDtypeStructs (with shardings) of `state`, the restore target."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


# ----------------------------------------------------------------------------- one network

# Where a network's variables sit in a saved `TrainState`: its first student (the network a
# run exists to train), as `{"students": {"0": {"params": ..., "batch_stats": ...}}}`.
_FIRST_STUDENT = ("students", "0")


def read_first_student(workdir: str, step: int | None = None) -> tuple[PyTree, PyTree]:
  """(params, batch_stats) of the first student at `step` (default: the latest checkpoint in
  `WORKDIR/checkpoints`), as numpy arrays.

  The restore target is built from the checkpoint's own metadata on one local device, so a
  checkpoint saved on another topology (e.g. 4 devices) loads here.
  """
  if step is None:
    step = create_manager(workdir).latest_step()
    if step is None:
      raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint")
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step), "state")
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(path)
  tree = getattr(meta, "item_metadata", meta)
  tree = getattr(tree, "tree", tree)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  node = checkpointer.restore(path, target)
  checkpointer.close()
  for key in _FIRST_STUDENT:
    node = node[key] if isinstance(node, dict) else node[int(key)]
  return jax.tree.map(np.asarray, node["params"]), jax.tree.map(np.asarray, node["batch_stats"])


def load_first_student(workdir: str, net: PyTree, what: str) -> PyTree:
  """`net` (a `joint.NetState`) with the params and BN statistics of another run's first
  student, in `net`'s dtypes and shardings; its optimiser state is kept. `what` names the
  config field in the error raised when shapes differ."""
  params, batch_stats = read_first_student(workdir)
  return with_variables(net, params, batch_stats, what)


def with_variables(net: PyTree, params: PyTree, batch_stats: PyTree, what: str) -> PyTree:
  """`net` with `params` and `batch_stats` (numpy trees; learned clip levels they lack are
  `net`'s own), in `net`'s dtypes and shardings; every leaf must match in path and shape."""
  params = _keep_missing_clips(net.params, params)
  _check_shapes(net.params, params, f"{what}: params")
  _check_shapes(net.batch_stats, batch_stats, f"{what}: batch_stats")
  return net.replace(
    params=_like(net.params, params), batch_stats=_like(net.batch_stats, batch_stats)
  )


def _keep_missing_clips(target: PyTree, source: PyTree) -> PyTree:
  """`source` plus `target`'s learned clip levels where `source` has none (a DoReFa or FP
  run loaded into an LSQ/PACT model: a fresh run calibrates them on its first batch)."""
  flat = flax.traverse_util.flatten_dict(source)
  for path, value in flax.traverse_util.flatten_dict(target).items():
    if path[-1] in (layers.WEIGHT_CLIP, layers.ACT_CLIP) and path not in flat:
      flat[path] = np.asarray(value)
  return flax.traverse_util.unflatten_dict(flat)


def _shapes(tree: PyTree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in leaves}


def _check_shapes(expected: PyTree, got: PyTree, what: str) -> None:
  want, have = _shapes(expected), _shapes(got)
  diffs = [
    f"{k}: model {want.get(k)} vs checkpoint {have.get(k)}"
    for k in sorted(set(want) | set(have))
    if want.get(k) != have.get(k)
  ]
  if diffs:
    raise ValueError(
      f"{what} do not match the model ({len(diffs)} differences): "
      + "; ".join(diffs[:5])
      + ("; ..." if len(diffs) > 5 else "")
    )


def _like(target: PyTree, source: PyTree) -> PyTree:
  """`source` values in `target`'s structure, dtype and sharding."""
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(source)}
  return jax.tree_util.tree_map_with_path(
    lambda k, t: jax.device_put(np.asarray(flat[jax.tree_util.keystr(k)], t.dtype), t.sharding),
    target,
  )
