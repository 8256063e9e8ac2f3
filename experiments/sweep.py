"""Resumable sweep over methods x bit-widths x seeds, each run a plain `python -m qnet.main`.

  python experiments/sweep.py --methods direct,two_stage,progressive,stochastic --bits 2 \
      --seeds 0,1,2 --name fashion_mnist

Each method is a shipped config: `configs/FAMILY_SUFFIX.py` with SUFFIX from `METHODS`
(e.g. `--family fashion_mnist_hard --methods distill` runs
`configs/fashion_mnist_hard_w2a2_distill.py`), so a sweep row is exactly what a user gets
from `python -m qnet.main --config=...`. The sweep only sets the bit-width (`--bits`; FP
methods are 32 bits), the seed, and any extra `--config.X=Y` overrides after a `--`.
`progressive_rounds` and `two_stage_rounds` run their config's precision phases as separate
training runs ("rounds", the paper's multi-round protocol): an FP round, then one round per
phase, each a full run (its own lr schedule, fresh optimizer) initialised from the previous
round's checkpoint (`init_from`); the rounds share the config's total steps equally, so
every row of a sweep has the same total steps.

A finished run is recorded in `experiments/results/NAME.json` and skipped next time; an
interrupted run resumes from its own checkpoints (workdir under --runs_dir), an interrupted
chain of rounds from its last finished round. Every row carries the wall time and the CPU
time (user + system) of its training processes, both measured here: CPU time well under
about 1.3-2x the wall time on these 2 cores means the run shared the machine or was paused.
A family that is one file, `configs/FAMILY.py` with `VARIANTS` (e.g. `--family
fashion_mnist_kd`), names its methods by variant (`configs/FAMILY.py:VARIANT`); the variant
sets its own bits (`--bits` is not used), `TEACHERS` in that file makes a variant's frozen
teacher the trained run of another variant with the same seed (run first), and `BASELINES`
says which variant each one is compared with (instead of `direct`).

Writes NAME.json (one object per run), NAME.md (mean/std per method and bit-width, gap to
the better FP network, each method's gain over direct with its 95% interval and Welch's
t-test p-value) and keeps each run's curve in experiments/results/curves/NAME/. Workdirs
default to experiments/runs/NAME/, so two sweeps never share a run's workdir or curve.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata

import numpy as np

from qnet.train import metrics_io

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")

# Method -> suffix of its config file, configs/FAMILY_SUFFIX.py. The configs are the one
# source of what a method is; the sweep only names them.
METHODS: dict[str, str] = {
  "fp": "fp",
  "fp_relu": "fp_relu",
  "direct": "w2a2_direct",
  "two_stage": "w2a2_two_stage",
  "progressive": "w2a2_progressive",
  "stochastic": "w2a2_stochastic",
  "distill": "w2a2_distill",
  "progressive+distill": "w2a2_progressive_distill",
  "stochastic+distill": "w2a2_stochastic_distill",
  # Learned quantizers (LSQ weights and activations; PACT activations on DoReFa weights),
  # direct and with the paper's best remedy here (progressive).
  "lsq": "w2a2_lsq",
  "pact": "w2a2_pact",
  "progressive+lsq": "w2a2_progressive_lsq",
  # The same configs' phases, each phase its own training run (see the module docstring).
  "progressive_rounds": "w2a2_progressive",
  "two_stage_rounds": "w2a2_two_stage",
}
FP_METHODS = ("fp", "fp_relu")  # 32-bit networks: one set of seeds serves every bit-width
ROUND_METHODS = ("progressive_rounds", "two_stage_rounds")
TIMING_FILE = "sweep_timing.json"  # a finished round's measured times, kept in its workdir


def run_key(method: str, bits: int, seed: int) -> str:
  return f"{method}_w{bits}a{bits}_s{seed}"


def method_bits(method: str, bits: int) -> int:
  """The bit-width a method runs at in the `bits` column of a sweep."""
  return 32 if method in FP_METHODS else bits


def variant_family(family: str):
  """The config module of a one-file family (`configs/FAMILY.py` with `VARIANTS`), or None."""
  if not os.path.exists(os.path.join(ROOT, "configs", f"{family}.py")):
    return None
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  import importlib

  module = importlib.import_module(f"configs.{family}")
  return module if hasattr(module, "VARIANTS") else None


def config_file(family: str, method: str) -> str:
  """The config of `method` in `family`, relative to the repository root."""
  if variant_family(family) is not None:
    return os.path.join("configs", f"{family}.py:{method}")
  return os.path.join("configs", f"{family}_{METHODS[method]}.py")


def family_methods(family: str) -> tuple[str, ...]:
  """The methods `family` can run: its variants, or every key of `METHODS`."""
  module = variant_family(family)
  return tuple(module.VARIANTS) if module is not None else tuple(METHODS)


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


def curve(metrics: list[dict], step_offset: int = 0) -> list[dict]:
  """The train and eval points of a run's metrics.jsonl that the plots use."""
  return [
    {k: r[k] + step_offset if k == "step" else r[k] for k in CURVE_KEYS if k in r}
    for r in metrics
    if "train_loss" in r or "eval_accuracy" in r
  ]


def load_config(family: str, method: str, extra: list[str]):
  """The config a run of `method` gets: its file plus the `--config.X=Y` overrides in `extra`,
  parsed by the same absl/ml_collections flag code as `python -m qnet.main`."""
  from absl import flags
  from ml_collections import config_flags

  if ROOT not in sys.path:  # the config files import their siblings as `configs.X`
    sys.path.insert(0, ROOT)
  fv = flags.FlagValues()
  path = os.path.join(ROOT, config_file(family, method))  # `file.py:variant` stays one argument
  argv = ["sweep", f"--config={path}", *[a for a in extra if a.startswith("--config.")]]
  # The override flags are found in `sys_argv` (sys.argv unless given).
  config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def rounds_of(config, bits: int) -> list[tuple[int, int]]:
  """(weight_bits, act_bits) of each round: FP first (the paper starts every chain from a
  trained FP net), then one round per phase of the config's in-run schedule at `bits`."""
  from qnet.quant import schedule as schedule_lib

  s = config.schedule
  phases = list(s.phases) or schedule_lib.default_phases(
    s.kind, bits, bits, s.ladder, s.two_stage_at
  )
  chain = [(int(p[1]), int(p[2])) for p in phases]
  return chain if chain[0] == (32, 32) else [(32, 32), *chain]


def split_steps(total: int, parts: int) -> list[int]:
  """`total` steps in `parts` near-equal integer shares that add up to `total`."""
  return [total * (i + 1) // parts - total * i // parts for i in range(parts)]


def timed_run(cmd: list[str], log_path: str) -> tuple[int, float, float]:
  """Runs `cmd` from the repository root, appending its output to `log_path`; returns
  (exit status, wall seconds, CPU seconds of the child: user + system)."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  with open(log_path, "a") as log:
    code = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
  return code, wall, cpu


def _train(config: str, workdir: str, overrides: list[str]) -> dict:
  """One `python -m qnet.main` run (resuming its own checkpoints): its metrics and times."""
  cmd = [sys.executable, "-m", "qnet.main", f"--config={config}", f"--workdir={workdir}"]
  resumed_from = _latest_checkpoint(workdir)
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  code, wall, cpu = timed_run(cmd + overrides, workdir + ".log")
  if code != 0:
    raise RuntimeError(f"run {workdir} failed (exit {code}); see {workdir}.log")
  rows = metrics_io.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return {
    "metrics": rows,
    "wall_s": round(wall, 1),
    "cpu_s": round(cpu, 1),
    "resumed_from_step": resumed_from,
  }


def _summary(rows: list[dict]) -> dict:
  evals = [r for r in rows if "eval_accuracy" in r]
  compiles = [r for r in rows if "train_step_compiles" in r]
  return {
    "test_accuracy": evals[-1]["eval_accuracy"],
    "teacher_test_accuracy": evals[-1].get("teacher_eval_accuracy"),
    "train_steps": [r for r in rows if "train_loss" in r][-1]["step"],
    "train_step_compiles": compiles[-1]["train_step_compiles"] if compiles else None,
  }


def stack() -> dict:
  """The software a run trained on (the runs use this Python) and the CPU conv overrides set."""
  env = {k: v for k, v in os.environ.items() if k.startswith("QNET_CPU_CONV_")}
  versions = {p: metadata.version(p) for p in ("jax", "jaxlib", "flax")}
  return {"python": platform.python_version(), **versions, "env": env}


def run_one(
  family: str, method: str, bits: int, seed: int, runs_dir: str, extra: list[str], name: str
) -> dict:
  """Runs (or resumes) one training run, or one chain of rounds, and returns its result row."""
  variants = variant_family(family)
  b = variant_bits(family, method) if variants else method_bits(method, bits)
  key = run_key(method, b, seed)
  config = config_file(family, method)
  own = [f"--config.seed={seed}"]
  if variants is None and method not in FP_METHODS:
    own += [f"--config.quant.weight_bits={b}", f"--config.quant.act_bits={b}"]
  teacher = getattr(variants, "TEACHERS", {}).get(method)
  if teacher:
    teacher_key = run_key(teacher, variant_bits(family, teacher), seed)
    own += [f"--config.distill.teacher_from={os.path.join(runs_dir, teacher_key)}"]
  if method in ROUND_METHODS:
    result, points, rounds = _run_rounds(family, method, b, runs_dir, key, extra + own)
  else:
    result = _train(config, os.path.join(runs_dir, key), own + extra)
    result |= _summary(result["metrics"])
    points, rounds = curve(result["metrics"]), None
  path = curve_path(RESULTS, name, key)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(points, f)
  row = {"method": method, "weight_bits": b, "act_bits": b, "seed": seed, "config": config}
  row["stack"] = stack()
  row |= {k: v for k, v in result.items() if k not in ("metrics", "resumed_from_step")}
  if result["resumed_from_step"] is not None:
    row["resumed_from_step"] = result["resumed_from_step"]
  if rounds:
    row["rounds"] = rounds
  if extra:
    row["extra_overrides"] = extra
  return row


def variant_bits(family: str, method: str) -> int:
  """The weight bit-width variant `method` of a one-file family trains at."""
  return int(load_config(family, method, []).quant.weight_bits)


def _run_rounds(
  family: str, method: str, bits: int, runs_dir: str, key: str, overrides: list[str]
) -> tuple[dict, list[dict], list[dict]]:
  """The chain of rounds of a round method: (summary with summed times, joined curve, rounds)."""
  from qnet.train import loop

  cfg = load_config(family, method, overrides)
  chain = rounds_of(cfg, bits)
  steps = split_steps(loop.total_train_steps(cfg)[0], len(chain))
  points, rounds, prev, resumed = [], [], "", None
  for i, ((w, a), n) in enumerate(zip(chain, steps)):
    workdir = os.path.join(runs_dir, key, f"round{i}_w{w}a{a}")
    timing_file = os.path.join(workdir, TIMING_FILE)
    round_overrides = overrides + [
      "--config.schedule.kind=direct",
      f"--config.quant.weight_bits={w}",
      f"--config.quant.act_bits={a}",
      f"--config.num_train_steps={n}",
      f"--config.init_from={prev}",
    ]
    if os.path.exists(timing_file):  # finished in an earlier invocation
      with open(timing_file) as f:
        timing = json.load(f)
      metrics = metrics_io.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    else:
      r = _train(config_file(family, method), workdir, round_overrides)
      metrics, timing = r["metrics"], {"wall_s": r["wall_s"], "cpu_s": r["cpu_s"]}
      if r["resumed_from_step"] is not None:
        timing["resumed_from_step"] = r["resumed_from_step"]
      with open(timing_file, "w") as f:
        json.dump(timing, f)
    if "resumed_from_step" in timing:  # this round timed only its remainder
      resumed = sum(steps[:i]) + timing["resumed_from_step"]
    points += curve(metrics, step_offset=sum(steps[:i]))
    rounds.append({"weight_bits": w, "act_bits": a, "steps": n} | _summary(metrics) | timing)
    prev = workdir
  summary = _summary(metrics) | {
    "train_steps": sum(steps),
    "train_step_compiles": max(r["train_step_compiles"] or 0 for r in rounds) or None,
    "wall_s": round(sum(r["wall_s"] for r in rounds), 1),
    "cpu_s": round(sum(r["cpu_s"] for r in rounds), 1),
    "resumed_from_step": resumed,
  }
  return summary, points, rounds


def _latest_checkpoint(workdir: str) -> int | None:
  """Step of the newest finished checkpoint in workdir (orbax's STEP folders), if any."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  steps = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if os.path.isdir(ckpt_dir) else []
  return max(steps, default=None)


def welch(a: list[float], b: list[float]) -> tuple[float, float, float, float]:
  """Mean of `a` minus mean of `b`, its 95% interval (Welch-Satterthwaite degrees of
  freedom) and the two-sided p-value of Welch's t-test; each sample needs >= 2 values."""
  from scipy import stats

  res = stats.ttest_ind(a, b, equal_var=False)
  ci = res.confidence_interval(0.95)
  return float(np.mean(a) - np.mean(b)), float(ci.low), float(ci.high), float(res.pvalue)


def table(rows: list[dict], family: str = "") -> str:
  """Markdown: mean +- std of test accuracy per (method, bits); gap to the better of the FP
  networks (clip-ReLU `fp`, plain-ReLU `fp_relu`); gain over direct at the same bits with
  its 95% interval and Welch p-value; mean wall and CPU time of a run.

  A run resumed from a checkpoint (`resumed_from_step`) timed only its remainder, so it is
  left out of the time means.
  """
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault((r["weight_bits"], r["method"]), []).append(r)
  fp_means = [np.mean([r["test_accuracy"] for r in g]) for (b, _), g in groups.items() if b == 32]
  best_fp = max(fp_means, default=None)
  module = variant_family(family) if family else None
  order = list(module.VARIANTS) if module is not None else list(METHODS)
  baselines = getattr(module, "BASELINES", None)
  baseline_of = (lambda m: baselines.get(m)) if baselines is not None else (lambda m: "direct")
  against = "the baseline of BASELINES" if baselines is not None else "direct"
  lines = [
    "| bits | method | seeds | test accuracy (mean ± std) | gap to best FP (points) | "
    f"gain over {against} [95% CI] (points) | p (Welch) | wall s / run | CPU s / run | "
    "train steps | train-step compiles |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for bits, method in sorted(groups, key=lambda k: (-k[0], order.index(k[1]))):
    g = groups[(bits, method)]
    acc = 100 * np.array([r["test_accuracy"] for r in g])
    gap = f"{acc.mean() - 100 * best_fp:+.2f}" if best_fp is not None else "n/a"
    base = baseline_of(method)
    ref = 100 * np.array([r["test_accuracy"] for r in groups.get((bits, base), [])])
    gain, p = "", ""
    compared = base is not None and method not in FP_METHODS + (base,)
    if compared and len(acc) > 1 and len(ref) > 1:
      d, lo, hi, pv = welch(acc, ref)
      gain, p = (
        f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]" + (f" vs {base}" if baselines else ""),
        f"{pv:.3f}",
      )
    compiles = sorted({int(r["train_step_compiles"]) for r in g if r.get("train_step_compiles")})
    steps = sorted({int(r["train_steps"]) for r in g})
    lines.append(
      f"| W{bits}A{bits} | {method} | {len(g)} | {acc.mean():.2f} ± "
      f"{acc.std(ddof=1) if len(g) > 1 else 0:.2f} | {gap} | {gain} | {p} | "
      f"{_mean_time(g, 'wall_s')} | {_mean_time(g, 'cpu_s')} | "
      f"{','.join(map(str, steps))} | {','.join(map(str, compiles))} |"
    )
  return "\n".join(lines) + "\n"


def _mean_time(rows: list[dict], field: str) -> str:
  times = [r[field] for r in rows if field in r and "resumed_from_step" not in r]
  if times:
    return f"{np.mean(times):.0f}"
  return "n/a (resumed)" if any(field in r for r in rows) else "n/a"


def write_report(rows: list[dict], name: str, family: str = "") -> str:
  """Writes NAME.json and NAME.md from `rows`; returns the table."""
  md = table(rows, family or _family_of(rows))  # first: a table that fails leaves both files
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, f"{name}.json"), "w") as f:
    json.dump(rows, f, indent=1)
  with open(os.path.join(RESULTS, f"{name}.md"), "w") as f:
    f.write(md)
  return md


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--family", default="fashion_mnist", help="configs/FAMILY_<method suffix>.py")
  p.add_argument("--methods", default="all", help="comma list, or all of the family's methods")
  p.add_argument("--bits", default="4,3,2")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--name", default="fashion_mnist")
  p.add_argument("--runs_dir", default="", help="run workdirs (default: experiments/runs/NAME)")
  p.add_argument("--report_only", action="store_true", help="rewrite NAME.md from NAME.json")
  p.add_argument(
    "--redo",
    default="",
    help="comma list of run keys (e.g. direct_w2a2_s0) to forget and run again: their rows and "
    "curves are removed and their workdirs moved aside (KEY.superseded.N)",
  )
  p.add_argument("extra", nargs="*", help="more --config.X=Y overrides for every run, after a `--`")
  args = p.parse_args()
  runs_dir = args.runs_dir or os.path.join(ROOT, "experiments", "runs", args.name)
  allowed = family_methods(args.family)
  methods = allowed if args.methods == "all" else tuple(args.methods.split(","))
  unknown = [m for m in methods if m not in allowed]
  if unknown:
    sys.exit(f"--methods: unknown {unknown}; allowed: {', '.join(allowed)}")
  files = {config_file(args.family, m).split(":")[0] for m in methods}
  missing = sorted(files - _existing_configs())
  if missing:
    sys.exit(f"--family={args.family}: no config {', '.join(missing)}")
  if args.redo:
    forget(args.redo.split(","), args.name, runs_dir, args.family)
  rows = load_rows(args.name)
  if args.report_only:
    print(write_report(rows, args.name))
    return
  done = {run_key(r["method"], r["weight_bits"], r["seed"]) for r in rows}
  plan = []
  # Seed-major order: an interrupted sweep leaves every method with the same seeds done.
  variants = variant_family(args.family) is not None
  for seed in map(int, args.seeds.split(",")):
    for bits in [0] if variants else map(int, args.bits.split(",")):
      for method in methods:
        b = variant_bits(args.family, method) if variants else method_bits(method, bits)
        key = run_key(method, b, seed)
        if key not in done and key not in [k for k, *_ in plan]:
          plan.append((key, method, bits, seed))
  print(f"{len(done)} runs done, {len(plan)} to go", flush=True)
  for i, (key, method, bits, seed) in enumerate(plan):
    print(f"[{i + 1}/{len(plan)}] {key} ...", flush=True)
    row = run_one(args.family, method, bits, seed, runs_dir, args.extra, args.name)
    rows = load_rows(args.name) + [row]  # as on disk now: another invocation may have edited it
    write_report(rows, args.name, args.family)
    print(
      f"[{i + 1}/{len(plan)}] {key}: test accuracy {row['test_accuracy']:.4f} "
      f"in {row['wall_s']:.0f} s wall, {row['cpu_s']:.0f} s CPU",
      flush=True,
    )
  print(table(rows, args.family))


def _family_of(rows: list[dict]) -> str:
  """The one-file family the rows were run from (`configs/FAMILY.py:VARIANT`), or ''."""
  configs = {r["config"].split(":")[0] for r in rows if ":" in r.get("config", "")}
  return os.path.basename(configs.pop())[: -len(".py")] if len(configs) == 1 else ""


def load_rows(name: str) -> list[dict]:
  """The rows of sweep `name` (experiments/results/NAME.json; none yet: [])."""
  path = os.path.join(RESULTS, f"{name}.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return json.load(f)


def forget(keys: list[str], name: str, runs_dir: str, family: str = "") -> None:
  """Makes runs `keys` of sweep `name` not done: drops their rows and curves, and moves their
  workdirs and logs aside (so the next run starts fresh instead of resuming the old one)."""
  rows = load_rows(name)
  known = {run_key(r["method"], r["weight_bits"], r["seed"]) for r in rows}
  unknown = [k for k in keys if k not in known]
  if unknown:
    sys.exit(f"--redo: no row for {unknown}; done runs: {', '.join(sorted(known))}")
  kept = [r for r in rows if run_key(r["method"], r["weight_bits"], r["seed"]) not in keys]
  write_report(kept, name, family)  # first: if the table fails, nothing has moved
  for key in keys:
    for path in (os.path.join(runs_dir, key), os.path.join(runs_dir, key + ".log")):
      if os.path.exists(path):
        n = 1
        while os.path.exists(f"{path}.superseded.{n}"):
          n += 1
        os.rename(path, f"{path}.superseded.{n}")
    curve_file = curve_path(RESULTS, name, key)
    if os.path.exists(curve_file):
      os.remove(curve_file)
  print(f"--redo: forgot {', '.join(keys)}", flush=True)


def _existing_configs() -> set[str]:
  return {os.path.join("configs", f) for f in os.listdir(os.path.join(ROOT, "configs"))}


if __name__ == "__main__":
  main()
