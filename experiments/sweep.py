"""Resumable sweep over methods x bit-widths x seeds, each run a plain `python -m qnet.main`.

  python experiments/sweep.py --methods direct,two_stage,progressive,stochastic --bits 2 \
      --seeds 0,1,2 --name fashion_mnist

Every run uses `--config` (default configs/fashion_mnist_w4a4.py: its model and total steps)
plus command-line overrides, so it is exactly the code path a user runs. A finished run is
recorded in `experiments/results/NAME.json` and skipped next time; an interrupted run
resumes from its own checkpoints (workdir under --runs_dir). Writes NAME.json (one object
per run), NAME.md (mean/std per method and bit-width, gap to FP) and keeps each run's
curve in experiments/results/curves/NAME/. Workdirs default to experiments/runs/NAME/, so two
sweeps (say, from scratch and fine-tuned) never share a run's workdir or curve.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from qnet import metrics_io

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

# Method -> config overrides (on top of the base config's model and budget).
METHODS: dict[str, dict[str, str]] = {
  "fp": {"schedule.kind": "direct"},
  "direct": {"schedule.kind": "direct"},
  "two_stage": {"schedule.kind": "two_stage"},
  "progressive": {"schedule.kind": "progressive"},
  "stochastic": {"schedule.kind": "stochastic"},
  "distill": {"schedule.kind": "direct", "distill.enabled": "True"},
  "progressive+distill": {"schedule.kind": "progressive", "distill.enabled": "True"},
  "stochastic+distill": {"schedule.kind": "stochastic", "distill.enabled": "True"},
}


def run_key(method: str, bits: int, seed: int) -> str:
  return f"{method}_w{bits}a{bits}_s{seed}"


def curve_path(results: str, name: str, key: str) -> str:
  """The curve file of run `key` of sweep `name`."""
  return os.path.join(results, "curves", name, key + ".json")


# The metrics.jsonl fields a run's curve keeps (what the plots read).
CURVE_KEYS = (
  "step",
  "train_loss",
  "train_accuracy",
  "eval_accuracy",
  "weight_bits",
  "act_bits",
  "quantized_fraction",
)


def curve(metrics: list[dict]) -> list[dict]:
  """The train and eval points of a run's metrics.jsonl that the plots use."""
  return [
    {k: r[k] for k in CURVE_KEYS if k in r}
    for r in metrics
    if "train_loss" in r or "eval_accuracy" in r
  ]


def run_one(
  config: str, method: str, bits: int, seed: int, runs_dir: str, extra: list[str], name: str
) -> dict:
  """Runs (or resumes) one training run and returns its result row."""
  b = 32 if method == "fp" else bits
  key = run_key(method, b, seed)
  workdir = os.path.join(runs_dir, key)
  overrides = {
    **METHODS[method],
    "quant.weight_bits": str(b),
    "quant.act_bits": str(b),
    "seed": str(seed),
  }
  cmd = [sys.executable, "-m", "qnet.main", f"--config={config}", f"--workdir={workdir}"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()] + extra
  resumed_from = _latest_checkpoint(workdir)
  start = time.time()
  log_path = workdir + ".log"
  os.makedirs(runs_dir, exist_ok=True)
  with open(log_path, "a") as log:
    proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  wall = time.time() - start
  if proc.returncode != 0:
    raise RuntimeError(f"run {workdir} failed (exit {proc.returncode}); see {log_path}")
  rows = metrics_io.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  evals = [r for r in rows if "eval_accuracy" in r]
  train_rows = [r for r in rows if "train_loss" in r]
  compiles = [r for r in rows if "train_step_compiles" in r]
  path = curve_path(RESULTS, name, key)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(curve(rows), f)
  return (
    {
      "method": method,
      "weight_bits": b,
      "act_bits": b,
      "seed": seed,
      "test_accuracy": evals[-1]["eval_accuracy"],
      "teacher_test_accuracy": evals[-1].get("teacher_eval_accuracy"),
      "train_steps": train_rows[-1]["step"],
      "wall_s": round(wall, 1),
      "train_step_compiles": compiles[-1]["train_step_compiles"] if compiles else None,
    }
    | ({"resumed_from_step": resumed_from} if resumed_from is not None else {})
    | ({"extra_overrides": extra} if extra else {})
  )


def _latest_checkpoint(workdir: str) -> int | None:
  """Step of the newest finished checkpoint in workdir (orbax's STEP folders), if any."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
  return max(steps, default=None)


def table(rows: list[dict]) -> str:
  """Markdown: mean +- std of test accuracy per (method, bits), gap to FP, wall time.

  A row's optional `paused_s` (time its process was stopped, e.g. by SIGSTOP while a
  benchmark needed the machine) is left out of the wall time. A run resumed from a
  checkpoint (`resumed_from_step`) timed only its remainder, so it is left out of the mean.
  """
  fp = [r["test_accuracy"] for r in rows if r["method"] == "fp"]
  fp_mean = float(np.mean(fp)) if fp else None
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["weight_bits"], r["method"]), []).append(r)
  order = list(METHODS)
  lines = [
    "| bits | method | seeds | test accuracy (mean ± std) | gap to FP (points) | "
    "wall s / run | train-step compiles |",
    "|---|---|---|---|---|---|---|",
  ]
  for bits, method in sorted(groups, key=lambda k: (-k[0], order.index(k[1]))):
    g = groups[(bits, method)]
    acc = np.array([r["test_accuracy"] for r in g])
    gap = f"{100 * (acc.mean() - fp_mean):+.2f}" if fp_mean is not None else "n/a"
    compiles = sorted({int(r["train_step_compiles"]) for r in g if r.get("train_step_compiles")})
    lines.append(
      f"| W{bits}A{bits} | {method} | {len(g)} | {100 * acc.mean():.2f} ± "
      f"{100 * acc.std(ddof=1) if len(g) > 1 else 0:.2f} | {gap} | "
      f"{_mean_wall(g)} | "
      f"{','.join(map(str, compiles))} |"
    )
  return "\n".join(lines) + "\n"


def _mean_wall(rows: list[dict]) -> str:
  walls = [r["wall_s"] - r.get("paused_s", 0) for r in rows if "resumed_from_step" not in r]
  return f"{np.mean(walls):.0f}" if walls else "n/a (resumed)"


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--config", default="configs/fashion_mnist_w4a4.py")
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--bits", default="4,3,2")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--name", default="fashion_mnist")
  p.add_argument("--runs_dir", default="", help="run workdirs (default: experiments/runs/NAME)")
  p.add_argument("--report_only", action="store_true", help="rewrite NAME.md from NAME.json")
  p.add_argument("extra", nargs="*", help="more --config.X=Y overrides for every run, after a `--`")
  args = p.parse_args()
  runs_dir = args.runs_dir or os.path.join(ROOT, "experiments", "runs", args.name)
  methods = args.methods.split(",")
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    sys.exit(f"--methods: unknown {unknown}; allowed: {', '.join(METHODS)}")
  out_json = os.path.join(RESULTS, f"{args.name}.json")
  rows = json.load(open(out_json)) if os.path.exists(out_json) else []
  if args.report_only:
    with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as f:
      f.write(table(rows))
    print(table(rows))
    return
  done = {run_key(r["method"], r["weight_bits"], r["seed"]) for r in rows}
  plan = []
  # Seed-major order: an interrupted sweep leaves every method with the same seeds done.
  for seed in map(int, args.seeds.split(",")):
    for bits in map(int, args.bits.split(",")):
      for method in methods:
        key = run_key(method, 32 if method == "fp" else bits, seed)
        if key not in done and key not in [k for k, *_ in plan]:
          plan.append((key, method, bits, seed))
  print(f"{len(done)} runs done, {len(plan)} to go", flush=True)
  for i, (key, method, bits, seed) in enumerate(plan):
    t0 = time.time()
    print(f"[{i + 1}/{len(plan)}] {key} ...", flush=True)
    row = run_one(args.config, method, bits, seed, runs_dir, args.extra, args.name)
    rows.append(row)
    os.makedirs(RESULTS, exist_ok=True)
    with open(out_json, "w") as f:
      json.dump(rows, f, indent=1)
    with open(os.path.join(RESULTS, f"{args.name}.md"), "w") as f:
      f.write(table(rows))
    print(
      f"[{i + 1}/{len(plan)}] {key}: test accuracy {row['test_accuracy']:.4f} "
      f"in {time.time() - t0:.0f} s",
      flush=True,
    )
  print(table(rows))


if __name__ == "__main__":
  main()
