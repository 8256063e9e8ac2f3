"""`train_and_evaluate`: the training loop around the pure steps of `qnet.joint`.

Data parallel the `jit` way: a 1-D device `Mesh` with axis `data`; the state is replicated
(`P()`), the global batch is sharded over `data` (`P('data')`), and XLA inserts the
all-reduces (BatchNorm statistics are over the global batch). Works across hosts after
`jax.distributed.initialize()`: each process feeds its own share of the batch.
"""

from __future__ import annotations

import collections
import functools
import itertools
import math
import os
import signal
import threading
from typing import Any, Iterator

from absl import logging
import flax.traverse_util
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np

from qnet import build, calibration, checkpointing, config_validation, input_pipeline, joint
from qnet import metrics_io
from qnet import schedule as schedule_lib
from qnet.models import layers

PyTree = Any


# ----------------------------------------------------------------------------- set-up


def total_train_steps(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(total steps, steps per epoch)."""
  per_epoch = input_pipeline.steps_per_epoch(
    config.dataset, config.batch_size, config.data_dir or None
  )
  if config.num_train_steps > 0:
    return config.num_train_steps, per_epoch
  return max(1, int(math.ceil(config.num_epochs * per_epoch))), per_epoch


# ----------------------------------------------------------------------------- helpers


def device_batches(
  batches: Iterator[dict[str, np.ndarray]], sharding: NamedSharding, prefetch: int = 2
) -> Iterator[dict[str, jax.Array]]:
  """Global arrays from each process's local batches, `prefetch` transfers in flight."""
  queue: collections.deque = collections.deque()
  for batch in batches:
    queue.append({k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()})
    if len(queue) > prefetch:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def first_nonfinite(rows: list[tuple[int, dict[str, float]]]) -> tuple[int, str, float] | None:
  """(step, metric, value) of the first non-finite metric, losses checked first."""
  for step, row in rows:
    for name in sorted(row, key=lambda k: ("loss" not in k, k)):
      if not math.isfinite(row[name]):
        return step, name, row[name]
  return None


def load_students_from(
  workdir: str, state: joint.TrainState, teacher_too: bool
) -> joint.TrainState:
  """`config.init_from`: every student's weights and BN statistics (and, with `teacher_too`,
  the trainable teacher's, as the paper's ImageNet recipe starts both from one pretrained
  net) from another run's latest checkpoint (its first student); optimisers stay fresh."""
  what = f"init_from={workdir}"
  students = tuple(_net_from(workdir, net, what) for net in state.students)
  teacher = _net_from(workdir, state.teacher, what) if teacher_too else state.teacher
  return state.replace(students=students, teacher=teacher)


def load_teacher_from(workdir: str, state: joint.TrainState) -> joint.TrainState:
  """`config.distill.teacher_from`: a frozen teacher = the first student of another run."""
  return state.replace(teacher=_net_from(workdir, state.teacher, f"distill.teacher_from={workdir}"))


def _net_from(workdir: str, net: joint.NetState, what: str) -> joint.NetState:
  params, batch_stats = _read_net(workdir, "students", "0")
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


def _read_net(workdir: str, *path: str) -> tuple[PyTree, PyTree]:
  import orbax.checkpoint as ocp

  manager = checkpointing.create_manager(workdir)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"{workdir}/checkpoints holds no checkpoint")
  raw = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  node = raw
  for key in path:
    node = node[key] if isinstance(node, dict) else node[int(key)]
  return node["params"], node["batch_stats"]


def _check_shapes(expected: PyTree, got: PyTree, what: str) -> None:
  want = {
    jax.tree_util.keystr(k): tuple(v.shape)
    for k, v in jax.tree_util.tree_leaves_with_path(expected)
  }
  have = {
    jax.tree_util.keystr(k): tuple(np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(got)
  }
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
  flat = dict((jax.tree_util.keystr(k), v) for k, v in jax.tree_util.tree_leaves_with_path(source))
  return jax.tree_util.tree_map_with_path(
    lambda k, t: jax.device_put(np.asarray(flat[jax.tree_util.keystr(k)], t.dtype), t.sharding),
    target,
  )


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (save, then exit 0)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and exiting")
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# ----------------------------------------------------------------------------- the loop


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, stop_at_step: int | None = None
) -> dict[str, float]:
  """Trains (resuming from `WORKDIR/checkpoints` if present), evaluates, and returns the
  final evaluation metrics (`eval_accuracy` is the first student's top-1).

  `stop_at_step` ends the run early at that step, after checkpointing it, exactly as a
  preemption would (used to test resumption).
  """
  config_validation.validate(config, jax.device_count(), jax.process_count())
  os.makedirs(workdir, exist_ok=True)
  is_chief = jax.process_index() == 0
  data_dir = config.data_dir or None
  total_steps, per_epoch = total_train_steps(config)
  students, teacher = build.build_specs(config, total_steps)
  for i, s in enumerate(students):
    logging.info("student %d precision schedule: %s", i, schedule_lib.describe(s.schedule))
  meta = build.run_meta(config, students, teacher)

  mesh = build.create_mesh()
  replicated = NamedSharding(mesh, P())
  data_sharding = NamedSharding(mesh, P("data"))
  sample = jnp.zeros((1, *build.input_shape(config)), jnp.float32)
  init = functools.partial(joint.init_state, students, teacher, config.seed)
  state = jax.jit(init, out_shardings=replicated)(sample)

  manager, restored = checkpointing.restore_latest(
    workdir, checkpointing.abstract_like(state), meta, config.keep_checkpoints
  )
  if restored is not None:
    step0, state = restored
    logging.info("resumed from %s at step %d", manager.directory, step0)
  else:
    if config.init_from:
      same_teacher = (
        teacher is not None
        and not teacher.frozen
        and (config.distill.teacher_model in ("", config.model))
      )
      state = load_students_from(config.init_from, state, teacher_too=same_teacher)
      logging.info(
        "students%s initialised from %s", " and teacher" * same_teacher, config.init_from
      )
    if config.distill.teacher_from:
      state = load_teacher_from(config.distill.teacher_from, state)
      logging.info("frozen teacher loaded from %s", config.distill.teacher_from)
  start_step = int(state.step)

  p_train, p_eval = build.compile_steps(mesh, students, teacher, build.distill_spec(config))

  writer = metrics_io.create_writer(workdir, is_chief)
  if start_step == 0:
    writer.write_hparams({k: str(v) for k, v in config_validation.flatten(config).items()})
  eval_every = config.eval_every_steps if config.eval_every_steps > 0 else per_epoch

  def evaluate(state) -> dict[str, float]:
    sums = collections.defaultdict(float)
    batches = input_pipeline.create_eval_iterator(
      config.dataset,
      global_batch_size=config.batch_size,
      data_dir=data_dir,
      image_size=config.image_size or None,
    )
    for batch in device_batches(batches, data_sharding):
      for k, v in jax.device_get(p_eval(state, batch)).items():
        sums[k] += float(v)
    count = sums.pop("eval_count")
    return {k: v / count for k, v in sums.items()} | {"eval_examples": count}

  train_iter = device_batches(
    input_pipeline.create_train_iterator(
      config.dataset,
      global_batch_size=config.batch_size,
      seed=config.seed,
      start_step=start_step,
      data_dir=data_dir,
      augment=config.augment,
      image_size=config.image_size or None,
    ),
    data_sharding,
  )
  if start_step == 0 and calibration.learned_clips(config):
    # A fresh run's learned clip levels start from its first batch, which it then trains on.
    first = next(train_iter)
    state = calibration.compile_calibrate(mesh, students)(state, first)
    train_iter = itertools.chain([first], train_iter)
  progress = metrics_io.Progress(start_step, total_steps)
  pending: list[tuple[int, dict]] = []
  eval_metrics: dict[str, float] = {}

  def flush(step: int) -> None:
    """Fetches buffered metrics (the only host sync in the loop), checks them, logs them."""
    rows = [(s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(pending)]
    pending.clear()
    bad = first_nonfinite(rows)
    if bad is not None:
      raise FloatingPointError(
        f"non-finite {bad[1]}={bad[2]} at step {bad[0]}; stopping "
        f"without checkpointing the poisoned state"
      )
    if not rows:
      return
    mean = {k: float(np.mean([r[k] for _, r in rows])) for k in rows[-1][1]}
    rate, eta = progress.update(step)
    mean["steps_per_sec"] = rate
    writer.write_scalars(step, mean)
    logging.info(
      "step %d/%d  loss %.4f  train_acc %.4f  W%gA%g  q-frac %.3f  %.2f steps/s  ETA %s",
      step,
      total_steps,
      mean["train_loss"],
      mean["train_accuracy"],
      mean["weight_bits"],
      mean["act_bits"],
      mean["quantized_fraction"],
      rate,
      metrics_io.format_duration(eta),
    )

  with _Preemption() as preemption:
    step = start_step
    if step >= total_steps and restored is not None:
      eval_metrics = evaluate(state)
    while step < total_steps:
      batch = next(train_iter)
      state, metrics = p_train(state, batch)
      step += 1
      pending.append((step, metrics))
      last = step == total_steps
      if step % config.log_every_steps == 0 or last:
        flush(step)
      if step % eval_every == 0 or last:
        eval_metrics = evaluate(state)
        writer.write_scalars(step, eval_metrics)
        logging.info(
          "eval at step %d: %s",
          step,
          "  ".join(f"{k} {v:.4f}" for k, v in sorted(eval_metrics.items())),
        )
      stop = preemption.requested or step == stop_at_step
      if step % config.checkpoint_every_steps == 0 or last or stop:
        flush(step)
        checkpointing.save(manager, step, state, meta)
      if stop:
        manager.wait_until_finished()
        logging.warning(
          "checkpoint at step %d saved; stopping early (%s)",
          step,
          "SIGTERM" if preemption.requested else "stop_at_step",
        )
        break
  manager.wait_until_finished()
  # Compile counts of this process (a precision change must never add one), for benchmarks.
  writer.write_scalars(
    step, {"train_step_compiles": p_train._cache_size(), "eval_step_compiles": p_eval._cache_size()}
  )
  writer.flush()
  return eval_metrics
