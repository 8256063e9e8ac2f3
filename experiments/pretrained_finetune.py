"""The paper's ImageNet protocol transposed to Fashion-MNIST (issue 26, item 5): W4A4 and W2A2
`tv_resnet18` fine-tuned from the PyTorch-trained ResNet-18 (experiments/peers/
torch_fmnist_resnet18.py) with joint distillation (student lr 5x the teacher's, step decay),
against the same budget from scratch and from the import without distillation; 3 seeds each,
Welch's p. One `python -m qnet.main` per run; resumable (a finished run is read back, not rerun).

  python experiments/pretrained_finetune.py \
      --init_from torchvision:experiments/runs/tv_resnet18_fmnist/model.safetensors --epochs 1

Writes experiments/results/NAME.json (every run's accuracy, and its wall and CPU seconds) and
NAME.md (the table). `--train_examples 20000` fine-tunes on the images the PyTorch network was
trained on (18 runs of a ResNet-18 on all 60,000 are hours on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sweep  # noqa: E402  (experiments/sweep.py: welch, timed_run)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("scratch", "import", "import_kd")


def overrides(method: str, bits: int, seed: int, args) -> list[str]:
  """The run's flags: the quantizer whose 32-bit form is the pretrained ReLU (docs/results.md,
  "Starting from torchvision"), step decay; scratch keeps the default schedule's lr."""
  common = [
    "--config=configs/fashion_mnist_w4a4.py",
    "--config.model=tv_resnet18",
    f"--config.quant.weight_bits={bits}",
    f"--config.quant.act_bits={bits}",
    f"--config.quant.act_quantizer={args.act_quantizer}",
    f"--config.num_epochs={args.epochs}",
    f"--config.seed={seed}",
    "--config.lr_schedule=step",
  ]
  if args.train_examples:
    common.append(f"--config.train_examples={args.train_examples}")
  if method == "scratch":
    return common + [f"--config.learning_rate={args.scratch_lr}"]
  out = common + [f"--config.init_from={args.init_from}", f"--config.learning_rate={args.lr}"]
  if method == "import_kd":
    out += [
      "--config.distill.enabled=True",
      "--config.distill.teacher_act=relu",
      f"--config.distill.teacher_learning_rate={args.lr / 5}",
    ]
  return out


def run(cmd: list[str], workdir: str) -> None:
  """Runs (or resumes) one run, its output in WORKDIR.log, and writes its wall and CPU seconds
  to WORKDIR/timing.json (those of this invocation's part of it, if it resumed)."""
  print(f"{os.path.basename(workdir)} ... (log: {workdir}.log)", flush=True)
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  code, wall, cpu = sweep.timed_run([*cmd, f"--workdir={workdir}"], workdir + ".log")
  if code != 0:
    raise RuntimeError(f"run {workdir} failed (exit {code}); see {workdir}.log")
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "timing.json"), "w") as f:
    json.dump({"wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}, f)


def final_accuracy(workdir: str) -> float | None:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  rows = [json.loads(line) for line in open(path)]
  done = any("train_step_compiles" in r for r in rows)  # written once, at the end
  evals = [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]
  return evals[-1] if done and evals else None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--init_from", required=True)
  parser.add_argument("--name", default="tv_resnet18_fmnist_finetune")
  parser.add_argument("--epochs", type=float, default=1.0)
  parser.add_argument("--lr", type=float, default=0.01, help="student lr of the fine-tunes")
  parser.add_argument("--scratch_lr", type=float, default=0.1)
  parser.add_argument("--act_quantizer", default="lsq")
  parser.add_argument("--bits", type=int, nargs="+", default=[4, 2])
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--train_examples", type=int, default=0, help="0: the whole training set")
  args = parser.parse_args()
  runs = os.path.join(ROOT, "experiments", "runs", args.name)
  results: dict[str, list[float]] = {f"W{b}A{b} {m}": [] for b in args.bits for m in METHODS}
  timing: dict[str, dict] = {}
  # Seed-major: an interrupted protocol leaves every setting with the same seeds done.
  for seed in range(args.seeds):
    for bits in args.bits:
      for method in METHODS:
        key = f"w{bits}a{bits}_{method}_s{seed}"
        workdir = os.path.join(runs, key)
        acc = final_accuracy(workdir)
        if acc is None:  # absent or interrupted: the same command resumes it
          run([sys.executable, "-m", "qnet.main", *overrides(method, bits, seed, args)], workdir)
          acc = final_accuracy(workdir)
        results[f"W{bits}A{bits} {method}"].append(100 * acc)
        if os.path.exists(os.path.join(workdir, "timing.json")):
          with open(os.path.join(workdir, "timing.json")) as f:
            timing[key] = json.load(f)
        out = os.path.join(ROOT, "experiments", "results", args.name)
        with open(out + ".json", "w") as f:
          json.dump({"args": vars(args), "accuracy": results, "timing": timing}, f, indent=1)
  results = {k: v for k, v in results.items() if v}
  lines = [
    "| setting | runs | accuracy (mean ± sd) | vs scratch (points) [95% CI] | p (Welch) "
    "| KD vs the import without KD [95% CI] | p (Welch) |",
    "|---|---|---|---|---|---|---|",
  ]

  def versus(accs, other) -> str:
    if len(accs) > 1 and len(other) > 1:
      d, lo, hi, p = sweep.welch(accs, other)
      return f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}] | {p:.3g}"
    return "- | -"

  for key, accs in results.items():
    setting = key.rsplit(" ", 1)[0]
    mean = sum(accs) / len(accs)
    sd = (sum((a - mean) ** 2 for a in accs) / max(len(accs) - 1, 1)) ** 0.5
    vs_scratch = (
      "- | -" if key.endswith("scratch") else versus(accs, results.get(setting + " scratch", []))
    )
    vs_import = (
      versus(accs, results.get(setting + " import", [])) if key.endswith("import_kd") else "- | -"
    )
    lines.append(f"| {key} | {len(accs)} | {mean:.2f} ± {sd:.2f} | {vs_scratch} | {vs_import} |")
  with open(os.path.join(ROOT, "experiments", "results", args.name + ".md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
