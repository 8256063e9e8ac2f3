"""`train_and_evaluate`: the training loop around the pure steps of `qnet.train.joint`.

Data parallel the `jit` way: a 1-D device `Mesh` with axis `data`; the state is replicated
(`P()`), the global batch is sharded over `data` (`P('data')`), and XLA inserts the
all-reduces (BatchNorm statistics are over the global batch). Works across hosts after
`jax.distributed.initialize()`: each process feeds its own share of the batch.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import os
import signal
import threading
from typing import Any, Iterator

from absl import logging
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np

from qnet.train import build, calibration, checkpointing, config_validation, joint
from qnet.data import input_pipeline
from qnet.data.datasets import DATASETS
from qnet.models import pretrained
from qnet.train import faults, metrics_io, run_config
from qnet.models import rules
from qnet.quant import precision as precision_lib
from qnet.quant import schedule as schedule_lib



# ----------------------------------------------------------------------------- set-up


def total_train_steps(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """(total steps, steps per epoch)."""
  per_epoch = input_pipeline.steps_per_epoch(
    config.dataset, config.batch_size, config.data_dir or None, config.train_examples
  )
  if config.num_train_steps >= 0:  # 0: evaluate the starting network only
    return config.num_train_steps, per_epoch
  return max(1, int(math.ceil(config.num_epochs * per_epoch))), per_epoch


def eval_interval(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """Steps between evaluations: `eval_every_steps`, or once per epoch when it is -1."""
  return config.eval_every_steps if config.eval_every_steps > 0 else steps_per_epoch


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
  students = tuple(checkpointing.load_first_student(workdir, n, what) for n in state.students)
  teacher = state.teacher
  if teacher_too:
    teacher = checkpointing.load_first_student(workdir, teacher, what)
  return state.replace(students=students, teacher=teacher)


def load_pretrained(
  config: ml_collections.ConfigDict, state: joint.TrainState, teacher_too: bool
) -> joint.TrainState:
  """`config.init_from=torchvision:PATH` (or `timm:PATH`): every student (and with
  `teacher_too` the trainable teacher) from one pretrained ResNet state_dict, read once
  (`qnet.models.pretrained`); optimisers stay fresh, learned clip levels are calibrated."""
  spec = DATASETS[config.dataset]
  params, batch_stats = pretrained.load(
    config.init_from, config.model, spec.channels, spec.num_classes
  )
  if config.model_act != "relu" and config.quant.act_quantizer == "dorefa":
    logging.warning(
      "init_from=%s under DoReFa: its 32-bit activation is clip(x, 0, 1), not the ReLU the "
      "network was trained with; LSQ or PACT (ReLU at 32 bits) keep its function "
      "(docs/results.md, 'Starting from torchvision')",
      config.init_from,
    )
  what = f"init_from={config.init_from}"
  students = tuple(
    checkpointing.with_variables(n, params, batch_stats, what) for n in state.students
  )
  teacher = state.teacher
  if teacher_too:
    teacher = checkpointing.with_variables(teacher, params, batch_stats, what)
  return state.replace(students=students, teacher=teacher)


def load_teacher_from(config: ml_collections.ConfigDict, state: joint.TrainState) -> joint.TrainState:
  """`config.distill.teacher_from`: a frozen teacher = the first student of another run, or a
  pretrained ResNet state_dict (`torchvision:PATH` / `timm:PATH`, `qnet.models.pretrained`)
  for the teacher's model (`distill.teacher_model`, else `model`)."""
  source = config.distill.teacher_from
  what = f"distill.teacher_from={source}"
  if not pretrained.parse_init_from(source):
    return state.replace(teacher=checkpointing.load_first_student(source, state.teacher, what))
  spec = DATASETS[config.dataset]
  model = config.distill.teacher_model or config.model
  params, batch_stats = pretrained.load(source, model, spec.channels, spec.num_classes)
  if config.distill.teacher_act != "relu":
    logging.warning(
      "%s with distill.teacher_act=%s: the teacher's 32-bit activation is clip(x, 0, 1), not "
      "the ReLU the network was trained with; distill.teacher_act=relu keeps its function",
      what, config.distill.teacher_act,
    )
  return state.replace(teacher=checkpointing.with_variables(state.teacher, params, batch_stats, what))


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


# ----------------------------------------------------------------------------- pieces of the run


@dataclasses.dataclass(frozen=True)
class Due:
  """What the loop does after a step: log, evaluate, checkpoint, stop."""

  log: bool
  evaluate: bool
  checkpoint: bool
  stop: bool


def due(
  step: int, total_steps: int, config: ml_collections.ConfigDict, eval_every: int, stop: bool
) -> Due:
  """The periodic conditions in one place. The last step does everything; a stop
  (preemption or `stop_at_step`) checkpoints; every checkpoint first flushes the logs, so a
  non-finite loss stops the run before its state is saved."""
  last = step == total_steps
  checkpoint = step % config.checkpoint_every_steps == 0 or last or stop
  return Due(
    log=step % config.log_every_steps == 0 or last or checkpoint,
    evaluate=step % eval_every == 0 or last,
    checkpoint=checkpoint,
    stop=stop,
  )


def initial_state(
  config: ml_collections.ConfigDict,
  workdir: str,
  students: tuple[joint.NetSpec, ...],
  teacher: joint.NetSpec | None,
  mesh: jax.sharding.Mesh,
  meta: dict,
) -> tuple[Any, joint.TrainState, bool]:
  """(checkpoint manager, state, resumed): the workdir's latest checkpoint if any, else a
  fresh state with `init_from` / `distill.teacher_from` weights loaded. `meta`
  (`build.run_meta`) must match the checkpoint's."""
  sample = jnp.zeros((1, *build.input_shape(config)), jnp.float32)
  init = functools.partial(joint.init_state, students, teacher, config.seed)
  state = jax.jit(init, out_shardings=NamedSharding(mesh, P()))(sample)
  manager, restored = checkpointing.restore_latest(
    workdir, checkpointing.abstract_like(state), meta, config.keep_checkpoints
  )
  if restored is not None:
    logging.info("resumed from %s at step %d", manager.directory, restored[0])
    return manager, restored[1], True
  if config.init_from:
    same_teacher = (
      teacher is not None
      and not teacher.frozen
      and (config.distill.teacher_model in ("", config.model))
    )
    if pretrained.parse_init_from(config.init_from):
      state = load_pretrained(config, state, teacher_too=same_teacher)
    else:
      state = load_students_from(config.init_from, state, teacher_too=same_teacher)
    logging.info("students%s initialised from %s", " and teacher" * same_teacher, config.init_from)
  if config.distill.teacher_from:
    state = load_teacher_from(config, state)
    logging.info("frozen teacher loaded from %s", config.distill.teacher_from)
  return manager, state, False


def evaluate(
  p_eval, state: joint.TrainState, config: ml_collections.ConfigDict, sharding: NamedSharding
) -> dict[str, float]:
  """Every network's eval metrics over the whole eval split (padding rows masked out)."""
  sums: dict[str, float] = collections.defaultdict(float)
  batches = input_pipeline.create_eval_iterator(
    config.dataset,
    global_batch_size=config.batch_size,
    data_dir=config.data_dir or None,
    image_size=config.image_size or None,
  )
  for batch in device_batches(batches, sharding):
    for k, v in jax.device_get(p_eval(state, batch)).items():
      sums[k] += float(v)
  count = sums.pop("eval_count")
  return {k: v / count for k, v in sums.items()} | {"eval_examples": count}


def train_batches(
  config: ml_collections.ConfigDict, start_step: int, sharding: NamedSharding
) -> Iterator[dict[str, jax.Array]]:
  """The training batches from `start_step` on, as global arrays."""
  batches = input_pipeline.create_train_iterator(
    config.dataset,
    global_batch_size=config.batch_size,
    seed=config.seed,
    start_step=start_step,
    data_dir=config.data_dir or None,
    augment=config.augment,
    image_size=config.image_size or None,
    train_examples=config.train_examples,
  )
  return device_batches(batches, sharding)


def calibrate_if_fresh(
  config: ml_collections.ConfigDict, state: joint.TrainState, batches: Iterator, mesh, students
) -> tuple[joint.TrainState, Iterator]:
  """A fresh run's learned clip levels (LSQ, PACT) start from its first batch, which it then
  trains on (`qnet.train.calibration`); a resumed run, or one without learned levels, is unchanged."""
  if int(state.step) != 0 or not calibration.learned_clips(config):
    return state, batches
  first = next(batches)
  state = calibration.compile_calibrate(mesh, students)(state, first)
  return state, itertools.chain([first], batches)


def check_rule_inputs(state: joint.TrainState, batches: Iterator, students) -> Iterator:
  """For a user's model quantized by rules: logs what the rules did, and stops with one line
  (`RuleError`) if a quantized layer's input is negative on the first batch while its rule
  does not say how to treat that (`qnet.models.rules.check_inputs`)."""
  if not isinstance(students[0].model, rules.QuantizedModel):
    return batches
  first = next(batches)
  images = np.asarray(first["image"].addressable_data(0))  # this process's first device shard
  model, net = students[0].model, state.students[0]
  found = rules.report(model, images)
  logging.info(
    "quantization rules: %d layers quantized, %d kept FP, unmatched (FP): %s, unused rules: %s",
    sum(1 for i in found["layers"].values() if i is not None and not model.rules[i].keep_fp),
    sum(1 for i in found["layers"].values() if i is None or model.rules[i].keep_fp),
    found["unmatched"] or "none",
    found["unused_rules"] or "none",
  )
  variables = jax.device_get({"params": net.params, "batch_stats": net.batch_stats})
  variables["precision"] = precision_lib.full_precision(students[0].layout)
  rules.check_inputs(model, variables, images)
  return itertools.chain([first], batches)


class TrainLog:
  """Buffers the train step's metrics on device; `flush` fetches them (the only host sync in
  the loop), stops on a non-finite value, writes their mean and the console line."""

  def __init__(self, writer, start_step: int, total_steps: int):
    self.writer, self.total = writer, total_steps
    self.progress = metrics_io.Progress(start_step, total_steps)
    self.pending: list[tuple[int, dict]] = []

  def append(self, step: int, metrics: dict) -> None:
    self.pending.append((step, metrics))

  def flush(self, step: int) -> None:
    rows = [(s, {k: float(v) for k, v in m.items()}) for s, m in jax.device_get(self.pending)]
    self.pending.clear()
    bad = first_nonfinite(rows)
    if bad is not None:
      raise FloatingPointError(
        f"non-finite {bad[1]}={bad[2]} at step {bad[0]}; stopping "
        f"without checkpointing the poisoned state"
      )
    if not rows:
      return
    mean = {k: float(np.mean([r[k] for _, r in rows])) for k in rows[-1][1]}
    rate, eta = self.progress.update(step)
    mean["steps_per_sec"] = rate
    self.writer.write_scalars(step, mean)
    logging.info("%s", metrics_io.train_line(step, self.total, mean, eta))


# ----------------------------------------------------------------------------- the loop


@faults.guarded  # one writer per workdir; full disk / lost peer -> one-line errors
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
  total_steps, per_epoch = total_train_steps(config)
  eval_every = eval_interval(config, per_epoch)
  # Schedules need a positive length; an eval-only run (0 steps) never reaches step 1.
  students, teacher = build.build_specs(config, max(total_steps, 1))
  for i, s in enumerate(students):
    logging.info("student %d precision schedule: %s", i, schedule_lib.describe(s.schedule))
  meta = build.run_meta(config, students, teacher)
  mesh = build.create_mesh()
  data_sharding = NamedSharding(mesh, P("data"))
  manager, state, resumed = initial_state(config, workdir, students, teacher, mesh, meta)
  p_train, p_eval = build.compile_steps(mesh, students, teacher, build.distill_spec(config, total_steps))
  is_chief = jax.process_index() == 0
  writer = metrics_io.create_writer(workdir, is_chief)
  if is_chief:  # what `qnet.export` / `qnet.evaluate` read back
    run_config.save(workdir, config, total_steps)
  step = int(state.step)
  if step == 0:
    writer.write_hparams({k: str(v) for k, v in config_validation.flatten(config).items()})
  batches = train_batches(config, step, data_sharding)
  state, batches = calibrate_if_fresh(config, state, batches, mesh, students)
  batches = check_rule_inputs(state, batches, students)
  log = TrainLog(writer, step, total_steps)
  eval_metrics: dict[str, float] = {}
  if step >= total_steps and (resumed or total_steps == 0):
    eval_metrics = evaluate(p_eval, state, config, data_sharding)
    if not resumed:  # num_train_steps=0: the starting network's metrics, at step 0
      writer.write_scalars(step, eval_metrics)
      logging.info("%s", metrics_io.eval_line(step, total_steps, eval_metrics))
  with _Preemption() as preemption:
    while step < total_steps:
      state, metrics = p_train(state, next(batches))
      step += 1
      log.append(step, metrics)
      now = due(step, total_steps, config, eval_every, preemption.requested or step == stop_at_step)
      if now.log:
        log.flush(step)
      if now.evaluate:
        eval_metrics = evaluate(p_eval, state, config, data_sharding)
        writer.write_scalars(step, eval_metrics)
        logging.info("%s", metrics_io.eval_line(step, total_steps, eval_metrics))
      if now.checkpoint:
        checkpointing.save(manager, step, state, meta)
      if now.stop:
        manager.wait_until_finished()
        why = "SIGTERM" if preemption.requested else "stop_at_step"
        logging.warning("checkpoint at step %d saved; stopping early (%s)", step, why)
        break
  manager.wait_until_finished()
  # Compile counts of this process (a precision change must never add one), for benchmarks.
  writer.write_scalars(
    step, {"train_step_compiles": p_train._cache_size(), "eval_step_compiles": p_eval._cache_size()}
  )
  writer.flush()
  return eval_metrics
