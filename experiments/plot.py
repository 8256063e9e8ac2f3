"""Plots of a sweep's results (matplotlib, PNG into experiments/results/).

  python experiments/plot.py --name fashion_mnist

Writes NAME_accuracy_vs_bits.png (mean +- std test accuracy per method against bit-width)
and NAME_curves_w2a2.png (training loss and eval accuracy of every W2A2 run, from the
curves the sweep keeps in experiments/results/curves/NAME/).
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sweep import FP_METHODS, METHODS, RESULTS, curve_path, run_key  # noqa: E402

# One colour per method in both plots (more methods than the default cycle has colours).
COLORS = dict(zip(METHODS, plt.get_cmap("tab20").colors))


def accuracy_vs_bits(rows: list[dict], path: str) -> None:
  fig, ax = plt.subplots(figsize=(8, 4))
  for method, ls in zip(FP_METHODS, ("--", ":")):
    fp = [r["test_accuracy"] for r in rows if r["method"] == method]
    if fp:
      ax.axhline(100 * np.mean(fp), color="k", ls=ls, lw=1, label=f"{method} (n={len(fp)})")
  methods = [m for m in METHODS if m not in FP_METHODS]
  for i, method in enumerate(methods):
    bits = sorted({r["weight_bits"] for r in rows if r["method"] == method})
    if not bits:
      continue
    acc = [
      [100 * r["test_accuracy"] for r in rows if r["method"] == method and r["weight_bits"] == b]
      for b in bits
    ]
    n = sorted({len(a) for a in acc})
    dodge = 0.04 * (i - (len(methods) - 1) / 2)  # side by side, so error bars stay readable
    ax.errorbar(
      [b + dodge for b in bits],
      [np.mean(a) for a in acc],
      yerr=[np.std(a, ddof=1) if len(a) > 1 else 0.0 for a in acc],  # as the table's std
      marker="o",
      capsize=3,
      color=COLORS[method],
      label=f"{method} (n={n[0]}{f'-{n[-1]}' if len(n) > 1 else ''})",
    )
  ax.set_xlabel("bits (weights = activations)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_xticks(sorted({r["weight_bits"] for r in rows if r["method"] not in FP_METHODS}))
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # off the lines
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def curves(rows: list[dict], name: str, bits: int, path: str) -> None:
  fig, (ax_err, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  for r in rows:
    if r["weight_bits"] != bits:
      continue
    curve_file = curve_path(RESULTS, name, run_key(r["method"], bits, r["seed"]))
    if not os.path.exists(curve_file):
      continue
    with open(curve_file) as f:
      points = json.load(f)
    label = (
      r["method"]
      if r["seed"] == min(x["seed"] for x in rows if x["method"] == r["method"])
      else None
    )
    # Train error, not train loss: a distilled student's loss also holds its KL term, so
    # losses are not comparable across methods; its accuracy on the batch is.
    tr = [(p["step"], 100 * (1 - p["train_accuracy"])) for p in points if "train_accuracy" in p]
    if len(tr) > 2 and tr[-1][0] - tr[-2][0] < tr[-2][0] - tr[-3][0]:
      tr = tr[:-1]  # The last, partial log interval (4 steps at 1,404) is too few to average.
    ev = [(p["step"], 100 * p["eval_accuracy"]) for p in points if "eval_accuracy" in p]
    ax_err.plot(*zip(*tr), color=COLORS[r["method"]], alpha=0.7, label=label)
    ax_acc.plot(*zip(*ev), color=COLORS[r["method"]], marker="o", alpha=0.7, label=label)
  ax_err.set(xlabel="step", ylabel="train error (%, mean over log interval)")
  ax_acc.set(xlabel="step", ylabel="test accuracy (%)")
  for ax in (ax_err, ax_acc):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(f"W{bits}A{bits} runs (every seed)")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--name", default="fashion_mnist")
  p.add_argument("--curve_bits", type=int, default=2)
  args = p.parse_args()
  with open(os.path.join(RESULTS, f"{args.name}.json")) as f:
    rows = json.load(f)
  accuracy_vs_bits(rows, os.path.join(RESULTS, f"{args.name}_accuracy_vs_bits.png"))
  curves(
    rows,
    args.name,
    args.curve_bits,
    os.path.join(RESULTS, f"{args.name}_curves_w{args.curve_bits}a{args.curve_bits}.png"),
  )
  print("wrote plots to", RESULTS)


if __name__ == "__main__":
  main()
