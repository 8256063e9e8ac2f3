"""experiments/sweep.py and plot.py: real qnet.main runs, result rows, resuming, table, plots."""

import json
import os
import sys

import jax
import pytest

from test_reliability import ROOT

sys.path.insert(0, os.path.join(ROOT, "experiments"))
import plot  # noqa: E402
import sweep  # noqa: E402


def _main(monkeypatch, *argv):
  monkeypatch.setattr(sys, "argv", ["sweep.py", *argv])
  sweep.main()


@pytest.mark.slow
def test_sweep_runs_records_and_resumes(tmp_path, fake_data_dir, monkeypatch, capsys):
  results = tmp_path / "results"
  monkeypatch.setattr(sweep, "RESULTS", str(results))
  # Children share the tests' compilation cache (the 4 fake devices come from conftest).
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", jax.config.jax_compilation_cache_dir)
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  args = ["--methods", "fp,direct", "--bits", "2", "--seeds", "0", "--name", "t"]
  args += ["--runs_dir", str(tmp_path / "runs"), "--"]
  args += [
    f"--config.data_dir={fake_data_dir}",
    "--config.model=tiny_cnn",
    "--config.batch_size=8",
    "--config.num_train_steps=6",
    "--config.eval_every_steps=6",
    "--config.checkpoint_every_steps=6",
    "--config.log_every_steps=3",
  ]
  _main(monkeypatch, *args)
  rows = json.loads((results / "t.json").read_text())
  assert [(r["method"], r["weight_bits"], r["act_bits"], r["seed"]) for r in rows] == [
    ("fp", 32, 32, 0),
    ("direct", 2, 2, 0),
  ]
  for r in rows:
    assert {"test_accuracy", "train_steps", "wall_s"} <= r.keys()
    assert 0.0 <= r["test_accuracy"] <= 1.0 and r["train_steps"] == 6 and r["wall_s"] > 0
    assert r["train_step_compiles"] == 1
    assert r["extra_overrides"] == args[args.index("--") + 1 :]  # what the run was given
  curve = json.loads((results / "curves" / "t" / "direct_w2a2_s0.json").read_text())
  assert [c["step"] for c in curve if "train_loss" in c] == [3, 6]
  assert any(c.get("weight_bits") == 2 for c in curve)
  table = (results / "t.md").read_text()
  assert "| W32A32 | fp | 1 |" in table and "| W2A2 | direct | 1 |" in table
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

  def fake_run(config, method, bits, seed, runs_dir, extra, name):
    # Each sweep gets its own default workdirs, so two sweeps never resume each other's runs.
    assert runs_dir == os.path.join(sweep.ROOT, "experiments", "runs", "t") and name == "t"
    started.append(sweep.run_key(method, 32 if method == "fp" else bits, seed))
    if len(started) == 3 and not failed:
      failed.append(True)
      raise RuntimeError("killed")
    b = 32 if method == "fp" else bits
    return {
      "method": method,
      "weight_bits": b,
      "act_bits": b,
      "seed": seed,
      "test_accuracy": 0.9,
      "train_steps": 1,
      "wall_s": 1.0,
    }

  monkeypatch.setattr(sweep, "run_one", fake_run)
  args = ["--methods", "fp,direct", "--bits", "4,2", "--seeds", "0,1", "--name", "t"]
  with pytest.raises(RuntimeError):
    _main(monkeypatch, *args)
  # Seed 0 of every setting before seed 1; FP (bits 32) only once per seed.
  assert started == ["fp_w32a32_s0", "direct_w4a4_s0", "direct_w2a2_s0"]
  assert len(json.loads((tmp_path / "t.json").read_text())) == 2
  started.clear()
  _main(monkeypatch, *args)
  assert started == ["direct_w2a2_s0", "fp_w32a32_s1", "direct_w4a4_s1", "direct_w2a2_s1"]
  assert len(json.loads((tmp_path / "t.json").read_text())) == 6


def test_sweep_rejects_an_unknown_method(monkeypatch):
  with pytest.raises(SystemExit, match=r"--methods: unknown \['dorefa'\]; allowed: fp, direct"):
    _main(monkeypatch, "--methods", "direct,dorefa")


def test_table_mean_std_gap_and_paused_time():
  rows = [
    {"method": "fp", "weight_bits": 32, "seed": s, "test_accuracy": a, "wall_s": 100.0}
    for s, a in ((0, 0.92), (1, 0.94))
  ] + [
    {
      "method": "direct",
      "weight_bits": 2,
      "seed": 0,
      "test_accuracy": 0.90,
      "wall_s": 500.0,
      "paused_s": 300.0,
      "train_step_compiles": 1,
    },
    {
      "method": "direct",
      "weight_bits": 2,
      "seed": 1,
      "test_accuracy": 0.91,
      "wall_s": 200.0,
      "train_step_compiles": 1,
    },
  ]
  resumed = {"method": "fp", "weight_bits": 32, "seed": 2, "test_accuracy": 0.93}
  rows.append(resumed | {"wall_s": 10.0, "resumed_from_step": 500})  # timed only its rest
  lines = sweep.table(rows).splitlines()
  assert lines[2] == "| W32A32 | fp | 3 | 93.00 ± 1.00 | +0.00 | 100 |  |"
  assert lines[3] == "| W2A2 | direct | 2 | 90.50 ± 0.71 | -2.50 | 200 | 1 |"
  only_resumed = [r for r in rows if r["method"] == "direct"] + [rows[-1]]
  assert "| n/a (resumed) |" in sweep.table(only_resumed).splitlines()[2]


def test_latest_checkpoint_ignores_unfinished_and_damaged_saves(tmp_path):
  assert sweep._latest_checkpoint(str(tmp_path)) is None
  for d in ("500", "1000", "1500.orbax-checkpoint-tmp-7", "2000.damaged"):
    (tmp_path / "checkpoints" / d).mkdir(parents=True)
  assert sweep._latest_checkpoint(str(tmp_path)) == 1000
