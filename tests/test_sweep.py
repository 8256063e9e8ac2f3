"""experiments/sweep.py and plot.py: real qnet.main runs, result rows, resuming, rounds,
timing, table statistics, plots."""

import importlib
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_reliability import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import pilot  # noqa: E402
import plot  # noqa: E402
import sweep  # noqa: E402


def _main(monkeypatch, *argv):
  monkeypatch.setattr(sys, "argv", ["sweep.py", *argv])
  sweep.main()


def _row(method: str, bits: int, seed: int, accuracy: float, cpu_s: float = 1.0) -> dict:
  """A result row as `sweep.run_one` returns it, for a fake run."""
  return {
    "method": method,
    "weight_bits": bits,
    "act_bits": bits,
    "seed": seed,
    "test_accuracy": accuracy,
    "train_steps": 1,
    "wall_s": 1.0,
    "cpu_s": cpu_s,
  }


@pytest.mark.slow
def test_sweep_runs_records_and_resumes(tmp_path, fake_data_dir, monkeypatch, capsys):
  results = tmp_path / "results"
  monkeypatch.setattr(sweep, "RESULTS", str(results))
  # Children share the tests' compilation cache (the 4 fake devices come from conftest).
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  trained, interrupt = [], ["two_stage_rounds_w2a2_s0/round2_w2a2"]
  real_train = sweep._train

  def train(config, workdir, overrides):
    key = os.path.relpath(workdir, tmp_path / "runs")
    trained.append(key)
    if key in interrupt:  # the sweep is stopped as this round starts
      interrupt.remove(key)
      raise RuntimeError("interrupted")
    return real_train(config, workdir, overrides)

  monkeypatch.setattr(sweep, "_train", train)
  args = ["--methods", "fp,two_stage_rounds", "--bits", "2", "--seeds", "0", "--name", "t"]
  args += ["--runs_dir", str(tmp_path / "runs"), "--"]
  args += [
    f"--config.data_dir={fake_data_dir}",
    "--config.model=tiny_cnn",
    "--config.batch_size=8",
    "--config.num_train_steps=6",
    "--config.eval_every_steps=6",
    "--config.checkpoint_every_steps=6",
    "--config.log_every_steps=2",
  ]
  # A sweep interrupted in a chain's last round keeps the finished run's row and rounds...
  with pytest.raises(RuntimeError, match="interrupted"):
    _main(monkeypatch, *args)
  runs = tmp_path / "runs" / "two_stage_rounds_w2a2_s0"
  rounds = ["round0_w32a32", "round1_w2a32", "round2_w2a2"]
  assert trained == ["fp_w32a32_s0"] + [f"two_stage_rounds_w2a2_s0/{r}" for r in rounds]
  assert [r["method"] for r in json.loads((results / "t.json").read_text())] == ["fp"]
  timings = [json.loads((runs / r / sweep.TIMING_FILE).read_text()) for r in rounds[:2]]
  # ...and the next invocation resumes there: finished runs and rounds are not rerun.
  trained.clear()
  _main(monkeypatch, *args)
  assert trained == ["two_stage_rounds_w2a2_s0/round2_w2a2"]
  rows = json.loads((results / "t.json").read_text())
  assert [(r["method"], r["weight_bits"], r["act_bits"], r["seed"]) for r in rows] == [
    ("fp", 32, 32, 0),
    ("two_stage_rounds", 2, 2, 0),
  ]
  assert [r["config"] for r in rows] == [
    "configs/fashion_mnist_fp.py",
    "configs/fashion_mnist_w2a2_two_stage.py",
  ]
  for r in rows:
    assert 0.0 <= r["test_accuracy"] <= 1.0 and r["train_steps"] == 6
    assert r["wall_s"] > 0 and r["cpu_s"] > 0  # measured by the sweep, no field typed by hand
    assert r["train_step_compiles"] == 1
    assert r["extra_overrides"] == args[args.index("--") + 1 :]  # what the run was given
  # The chain: an FP round, then the two-stage phases, each a run of 6 / 3 steps started
  # from the previous round's checkpoint; the row's times are the rounds' sums, the finished
  # rounds' as the interrupted invocation measured them.
  chain = rows[1]["rounds"]
  assert [(c["weight_bits"], c["act_bits"], c["steps"], c["train_steps"]) for c in chain] == [
    (32, 32, 2, 2),
    (2, 32, 2, 2),
    (2, 2, 2, 2),
  ]
  assert [{k: c[k] for k in t} for c, t in zip(chain, timings)] == timings
  assert rows[1]["wall_s"] == pytest.approx(sum(c["wall_s"] for c in chain), abs=0.2)
  assert rows[1]["test_accuracy"] == chain[-1]["test_accuracy"]
  assert "initialised from" not in (runs / "round0_w32a32.log").read_text()
  assert f"initialised from {runs / 'round1_w2a32'}" in (runs / "round2_w2a2.log").read_text()
  curve = json.loads((results / "curves" / "t" / "two_stage_rounds_w2a2_s0.json").read_text())
  # One curve over the chain: steps continue across rounds, bits follow the rounds.
  assert [(c["step"], c["weight_bits"], c["act_bits"]) for c in curve if "train_loss" in c] == [
    (2, 32, 32),
    (4, 2, 32),
    (6, 2, 2),
  ]
  curve = json.loads((results / "curves" / "t" / "fp_w32a32_s0.json").read_text())
  assert [c["step"] for c in curve if "train_loss" in c] == [2, 4, 6]
  table = (results / "t.md").read_text()
  assert "| W32A32 | fp | 1 |" in table and "| W2A2 | two_stage_rounds | 1 |" in table
  monkeypatch.setattr(plot, "RESULTS", str(results))
  monkeypatch.setattr(sys, "argv", ["plot.py", "--name", "t", "--curve_bits", "2"])
  plot.main()
  for png in ("t_accuracy_vs_bits.png", "t_curves_w2a2.png"):
    assert (results / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

  # Finished runs are skipped: a rerun must not start any.
  def no_run(*a, **k):
    raise AssertionError("a finished run was started again")

  monkeypatch.setattr(sweep, "run_one", no_run)
  capsys.readouterr()
  _main(monkeypatch, *args)
  assert "2 runs done, 0 to go" in capsys.readouterr().out


def test_sweep_plan_is_seed_major_and_survives_a_failed_run(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(sweep, "RESULTS", str(tmp_path))
  started, failed = [], []

  def fake_run(family, method, bits, seed, runs_dir, extra, name):
    # Each sweep gets its own default workdirs, so two sweeps never resume each other's runs.
    assert runs_dir == os.path.join(sweep.ROOT, "experiments", "runs", "t") and name == "t"
    assert family == "fashion_mnist"
    started.append(sweep.run_key(method, sweep.method_bits(method, bits), seed))
    if len(started) == 4 and not failed:
      failed.append(True)
      raise RuntimeError("killed")
    return _row(method, sweep.method_bits(method, bits), seed, 0.9, cpu_s=1.5)

  monkeypatch.setattr(sweep, "run_one", fake_run)
  args = ["--methods", "fp,fp_relu,direct", "--bits", "4,2", "--seeds", "0,1", "--name", "t"]
  with pytest.raises(RuntimeError):
    _main(monkeypatch, *args)
  # Seed 0 of every setting before seed 1; each FP network (bits 32) only once per seed.
  assert started == ["fp_w32a32_s0", "fp_relu_w32a32_s0", "direct_w4a4_s0", "direct_w2a2_s0"]
  assert len(json.loads((tmp_path / "t.json").read_text())) == 3
  started.clear()
  _main(monkeypatch, *args)
  assert started == [
    "direct_w2a2_s0",
    "fp_w32a32_s1",
    "fp_relu_w32a32_s1",
    "direct_w4a4_s1",
    "direct_w2a2_s1",
  ]
  assert len(json.loads((tmp_path / "t.json").read_text())) == 8


def test_redo_forgets_a_run_and_runs_it_afresh(tmp_path, monkeypatch):
  monkeypatch.setattr(sweep, "RESULTS", str(tmp_path / "results"))
  runs = tmp_path / "runs"
  started = []

  def fake_run(family, method, bits, seed, runs_dir, extra, name):
    key = sweep.run_key(method, bits, seed)
    started.append(key)
    # A run that is not fresh would resume this workdir; --redo must have moved it aside.
    assert not (runs / key / "old").exists()
    (runs / key).mkdir(parents=True)
    (runs / key / "old").write_text("")
    curve = sweep.curve_path(sweep.RESULTS, name, key)
    os.makedirs(os.path.dirname(curve), exist_ok=True)
    open(curve, "w").close()
    acc = 0.5 + 0.1 * len(started)
    return {
      "method": method,
      "weight_bits": bits,
      "act_bits": bits,
      "seed": seed,
      "test_accuracy": acc,
      "train_steps": 1,
      "wall_s": 1.0,
      "cpu_s": 1.0,
    }

  monkeypatch.setattr(sweep, "run_one", fake_run)
  args = ["--methods", "direct,lsq", "--bits", "2", "--seeds", "0", "--name", "t"]
  args += ["--runs_dir", str(runs)]
  _main(monkeypatch, *args)
  assert started == ["direct_w2a2_s0", "lsq_w2a2_s0"]
  with pytest.raises(SystemExit, match=r"--redo: no row for \['lsq_w4a4_s0'\]"):
    _main(monkeypatch, *args, "--redo", "lsq_w4a4_s0")
  started.clear()
  _main(monkeypatch, *args, "--redo", "lsq_w2a2_s0")
  assert started == ["lsq_w2a2_s0"]  # only the forgotten run
  rows = json.loads((tmp_path / "results" / "t.json").read_text())
  # The old lsq row (0.7, the 2nd run) is gone; the new one is the 1st run since the clear.
  assert [(r["method"], r["test_accuracy"]) for r in rows] == [("direct", 0.6), ("lsq", 0.6)]
  assert (runs / "lsq_w2a2_s0.superseded.1" / "old").exists()
  assert not (runs / "direct_w2a2_s0.superseded.1").exists()


def test_redo_in_a_one_file_family_keeps_its_other_rows(tmp_path, monkeypatch):
  """A family of variants in one file (configs/fashion_mnist_kd.py): the table of the rows left
  after --redo still knows the family's order, and the forgotten run reruns."""
  monkeypatch.setattr(sweep, "RESULTS", str(tmp_path))
  family = "fashion_mnist_kd"

  def fake_run(family_, method, bits, seed, runs_dir, extra, name):
    assert family_ == family
    row = _row(method, sweep.variant_bits(family, method), seed, 0.5)
    return row | {"config": sweep.config_file(family, method)}

  monkeypatch.setattr(sweep, "run_one", fake_run)
  args = ["--family", family, "--methods", "fp_teacher,fp_student_ce,w2a2_ce", "--seeds", "0"]
  args += ["--name", "t"]
  args += ["--runs_dir", str(tmp_path / "runs")]
  _main(monkeypatch, *args)
  _main(monkeypatch, *args, "--redo", "w2a2_ce_w2a2_s0")
  rows = json.loads((tmp_path / "t.json").read_text())
  assert [r["method"] for r in rows] == ["fp_teacher", "fp_student_ce", "w2a2_ce"]
  md = (tmp_path / "t.md").read_text()
  assert md.index("| fp_teacher |") < md.index("| w2a2_ce |")


def test_rows_written_meanwhile_are_kept(tmp_path, monkeypatch):
  """A sweep appends its row to the file as it is on disk, not as it was when it started."""
  monkeypatch.setattr(sweep, "RESULTS", str(tmp_path))

  def fake_run(family, method, bits, seed, runs_dir, extra, name):
    other = {
      "method": "fp",
      "weight_bits": 32,
      "act_bits": 32,
      "seed": 9,
      "test_accuracy": 0.9,
      "train_steps": 1,
      "wall_s": 1.0,
      "cpu_s": 1.0,
    }
    sweep.write_report(sweep.load_rows(name) + [other], name)  # another invocation's row
    return {**other, "method": "direct", "weight_bits": bits, "act_bits": bits, "seed": seed}

  monkeypatch.setattr(sweep, "run_one", fake_run)
  _main(monkeypatch, "--methods", "direct", "--bits", "2", "--seeds", "0", "--name", "t")
  rows = json.loads((tmp_path / "t.json").read_text())
  assert [(r["method"], r["seed"]) for r in rows] == [("fp", 9), ("direct", 0)]


def test_sweep_rejects_an_unknown_method_or_family(monkeypatch):
  with pytest.raises(SystemExit, match=r"--methods: unknown \['dorefa'\]; allowed: fp, fp_relu"):
    _main(monkeypatch, "--methods", "direct,dorefa")
  with pytest.raises(
    SystemExit, match=r"--family=nope: no config configs/nope_fp.py, configs/nope_w2a2_direct.py"
  ):
    _main(monkeypatch, "--family", "nope", "--methods", "direct,fp")


@pytest.mark.parametrize("family", ["fashion_mnist", "fashion_mnist_hard"])
def test_each_method_is_its_config_with_the_familys_model_and_budget(family):
  """The configs are the one source of a method; within a family only the method's own
  fields differ from direct, so every row trains the same model for the same steps."""
  from qnet.train import config_validation

  direct = config_validation.flatten(sweep.load_config(family, "direct", []))
  own = {"schedule.kind", "distill.enabled", "quant.weight_bits", "quant.act_bits", "model_act"}
  own |= {"quant.weight_quantizer", "quant.act_quantizer"}
  lsq = {"quant.weight_quantizer": "lsq", "quant.act_quantizer": "lsq"}
  expect = {
    "fp": {"quant.weight_bits": 32, "quant.act_bits": 32},
    "fp_relu": {"quant.weight_bits": 32, "quant.act_bits": 32, "model_act": "relu"},
    "direct": {"schedule.kind": "direct", "quant.weight_bits": 2, "distill.enabled": False},
    "two_stage": {"schedule.kind": "two_stage"},
    "progressive": {"schedule.kind": "progressive"},
    "stochastic": {"schedule.kind": "stochastic"},
    "distill": {"schedule.kind": "direct", "distill.enabled": True},
    "progressive+distill": {"schedule.kind": "progressive", "distill.enabled": True},
    "stochastic+distill": {"schedule.kind": "stochastic", "distill.enabled": True},
    "lsq": {"schedule.kind": "direct", **lsq},
    "pact": {
      "schedule.kind": "direct",
      "quant.weight_quantizer": "dorefa",
      "quant.act_quantizer": "pact",
    },
    "progressive+lsq": {"schedule.kind": "progressive", **lsq},
    "progressive_rounds": {"schedule.kind": "progressive"},
    "two_stage_rounds": {"schedule.kind": "two_stage"},
  }
  assert set(expect) == set(sweep.METHODS)
  for method, fields in expect.items():
    c = config_validation.flatten(sweep.load_config(family, method, []))
    assert {k: c[k] for k in fields} == fields, method
    assert {k for k in c if c[k] != direct[k]} <= own, method


def test_load_config_applies_overrides_as_the_cli_does():
  c = sweep.load_config(
    "fashion_mnist", "progressive", ["--config.seed=3", "--config.schedule.ladder=(32,4,2)"]
  )
  assert c.seed == 3 and tuple(c.schedule.ladder) == (32, 4, 2)
  assert sweep.rounds_of(c, 2) == [(32, 32), (4, 4), (2, 2)]


def test_rounds_start_from_fp_then_follow_the_in_run_phases():
  progressive = sweep.load_config("fashion_mnist", "progressive_rounds", [])
  assert sweep.rounds_of(progressive, 2) == [(32, 32), (8, 8), (4, 4), (2, 2)]
  assert sweep.rounds_of(progressive, 4) == [(32, 32), (8, 8), (4, 4)]
  two_stage = sweep.load_config("fashion_mnist", "two_stage_rounds", [])
  assert sweep.rounds_of(two_stage, 2) == [(32, 32), (2, 32), (2, 2)]


def test_split_steps_adds_up_to_the_total():
  assert sweep.split_steps(1404, 4) == [351, 351, 351, 351]
  assert sweep.split_steps(10, 3) == [3, 3, 4]
  assert sum(sweep.split_steps(1405, 4)) == 1405


def test_timed_run_tells_a_busy_child_from_an_idle_one(tmp_path):
  busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"
  code, wall, cpu = sweep.timed_run([sys.executable, "-c", busy], str(tmp_path / "busy.log"))
  assert code == 0 and cpu >= 0.4 and wall >= 0.4
  idle = "import time; time.sleep(0.5)"
  code, wall, cpu = sweep.timed_run([sys.executable, "-c", idle], str(tmp_path / "idle.log"))
  assert code == 0 and wall >= 0.5 and cpu < wall - 0.3  # idle or paused: CPU << wall
  code, *_ = sweep.timed_run([sys.executable, "-c", "raise SystemExit(3)"], str(tmp_path / "x"))
  assert code == 3


def test_welch_gain_interval_and_p_value():
  # t = -3 / sqrt(2/3) = -3.674 on 4 degrees of freedom (equal variances, n = 3 each):
  # two-sided p = 0.02131, t_0.975(4) = 2.776445.
  gain, lo, hi, p = sweep.welch([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
  half = 2.776445 * (2 / 3) ** 0.5
  assert gain == pytest.approx(-3.0)
  assert (lo, hi) == pytest.approx((-3.0 - half, -3.0 + half), abs=1e-5)
  assert p == pytest.approx(0.02131, abs=5e-5)


def _row(method, bits, seed, acc, **kw):
  return (
    {"method": method, "weight_bits": bits, "seed": seed, "test_accuracy": acc}
    | {
      "wall_s": 100.0,
      "cpu_s": 150.0,
      "train_steps": 1404,
      "train_step_compiles": 1,
    }
    | kw
  )


def test_table_gap_to_the_better_fp_gain_interval_p_and_times():
  rows = [_row("fp", 32, s, a) for s, a in ((0, 0.92), (1, 0.94))]
  rows += [_row("fp_relu", 32, s, a) for s, a in ((0, 0.94), (1, 0.96))]  # the better FP
  rows += [_row("direct", 2, s, a) for s, a in ((0, 0.01), (1, 0.02), (2, 0.03))]
  rows += [_row("progressive", 2, s, a, wall_s=300.0) for s, a in ((0, 0.04), (1, 0.05), (2, 0.06))]
  rows.append(_row("fp", 32, 2, 0.93, wall_s=10.0, cpu_s=5.0, resumed_from_step=500))
  lines = sweep.table(rows).splitlines()
  assert "gap to best FP" in lines[0] and "p (Welch)" in lines[0] and "CPU s / run" in lines[0]
  # The resumed run counts in the accuracy, not in the times (it timed only its remainder).
  assert lines[2] == "| W32A32 | fp | 3 | 93.00 ± 1.00 | -2.00 |  |  | 100 | 150 | 1404 | 1 |"
  assert lines[3] == "| W32A32 | fp_relu | 2 | 95.00 ± 1.41 | +0.00 |  |  | 100 | 150 | 1404 | 1 |"
  assert lines[4] == "| W2A2 | direct | 3 | 2.00 ± 1.00 | -93.00 |  |  | 100 | 150 | 1404 | 1 |"
  assert lines[5] == (
    "| W2A2 | progressive | 3 | 5.00 ± 1.00 | -90.00 | +3.00 [+0.73, +5.27] | 0.021 | "
    "300 | 150 | 1404 | 1 |"
  )
  only_resumed = [r for r in rows if r["method"] == "direct"] + [rows[-1]]
  assert "| n/a (resumed) | n/a (resumed) |" in sweep.table(only_resumed).splitlines()[2]
  one_seed = [r for r in rows if r["method"] != "progressive" or r["seed"] == 0]
  assert "| -91.00 |  |  |" in sweep.table(one_seed).splitlines()[-1]  # no test on one seed


def test_latest_checkpoint_ignores_unfinished_and_damaged_saves(tmp_path):
  assert sweep._latest_checkpoint(str(tmp_path)) is None
  for d in ("500", "1000", "1500.orbax-checkpoint-tmp-7", "2000.damaged"):
    (tmp_path / "checkpoints" / d).mkdir(parents=True)
  assert sweep._latest_checkpoint(str(tmp_path)) == 1000


def test_fp_network_is_the_same_whichever_layers_the_hard_setting_quantizes():
  """Why the pilot reuses the first sweep's FP for the every-layer setting."""
  from qnet.train import build

  trees = []
  for name in ("fashion_mnist_fp", "fashion_mnist_hard_fp"):
    (student,), _ = build.build_specs(importlib.import_module(f"configs.{name}").get_config(), 100)
    trees.append(student.schedule.sample(student.layout, jnp.int32(5), jax.random.key(0))[0])
  leaves = [np.asarray(x) for x in jax.tree.leaves(trees)]
  assert len(leaves) > 4 and all((x == 32).all() for x in leaves)
  assert jax.tree.structure(trees[0]) == jax.tree.structure(trees[1])


def test_pilot_table_gap_to_the_better_fp_and_borrowed_fp():
  ref = {"setting": pilot.REFERENCE}
  rows = [
    _row("fp", 32, 0, 0.92) | ref,
    _row("direct", 2, 0, 0.91) | ref,
    _row("direct", 2, 0, 0.88, wall_s=210.0) | {"setting": "every_layer_3ep"},
    _row("direct", 2, 0, 0.89) | {"setting": "every_layer_6ep"},
    _row("fp", 32, 0, 0.93) | {"setting": "every_layer_6ep"},
  ]
  lines = pilot.table(rows).splitlines()
  ref_line = f"| {pilot.REFERENCE} | `(first sweep, seed 0)` | 92.00 | — | 91.00 |"
  assert lines[2].startswith(ref_line)
  assert "| 91.00 | -1.00 |" in lines[2]
  # The every-layer FP is the reference's (no quantized layer at 32 bits: test above).
  assert lines[3].startswith("| every_layer_3ep | `--config.quant.keep_first_last_fp=False` |")
  assert "| 92.00 | — | 88.00 |" in lines[3]
  assert lines[3].endswith("| 88.00 | -4.00 | 210.0 | 150.0 |")
  assert "| 93.00 | — | 89.00 | -4.00 |" in lines[4]
