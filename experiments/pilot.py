"""Pilot for a setting hard enough to separate the remedies: one seed of FP (clip-ReLU and
plain ReLU) and direct W2A2 per candidate setting, each a `configs/fashion_mnist_*` run plus
the setting's overrides (same code path as experiments/sweep.py).

  python experiments/pilot.py

Resumable (a finished (setting, run) is skipped). Writes experiments/results/
fashion_mnist_pilot.json (one row per run, with its `setting`) and fashion_mnist_pilot.md;
the reference setting (the first sweep's: FP first and last layers, 3 epochs) is read from
fashion_mnist.json (seed 0) instead of being run again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


import sweep

NAME = "fashion_mnist_pilot"
EVERY_LAYER = ["--config.quant.keep_first_last_fp=False"]
REFERENCE = "first_last_fp_3ep"  # the first sweep's setting, from fashion_mnist.json
# Setting -> (overrides on top of configs/fashion_mnist_*.py, methods to run), in run order.
SETTINGS: dict[str, tuple[list[str], tuple[str, ...]]] = {
  "every_layer_3ep": (EVERY_LAYER, ("direct",)),
  "every_layer_6ep": (EVERY_LAYER + ["--config.num_epochs=6"], ("direct", "fp")),
}
# A setting that changes only which layers are quantized has no quantized layer at 32 bits,
# so its FP network is the reference's (same model, budget and seed): not run again.
FP_FROM = {"every_layer_3ep": REFERENCE}


def reference_rows() -> list[dict]:
  """Seed 0 of FP and direct W2A2 from the first sweep, labelled as the reference setting."""
  path = os.path.join(sweep.RESULTS, "fashion_mnist.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = json.load(f)
  keep = {("fp", 32), ("direct", 2)}
  return [
    r | {"setting": REFERENCE, "source": "fashion_mnist.json"}
    for r in rows
    if r["seed"] == 0 and (r["method"], r["weight_bits"]) in keep
  ]


def table(rows: list[dict]) -> str:
  """Markdown, one line per setting: FP, FP-ReLU and direct W2A2 accuracy, direct's gap to
  the better FP of the same setting (`FP_FROM`: another setting's), direct's times."""
  by = {(r["setting"], r["method"]): r for r in rows}
  for setting, source in FP_FROM.items():
    for m in ("fp", "fp_relu"):
      if (source, m) in by and (setting, m) not in by:
        by[(setting, m)] = by[(source, m)]
  settings = [REFERENCE, *SETTINGS]
  lines = [
    "| setting | overrides | fp | fp_relu | direct W2A2 | direct − best FP (points) | "
    "direct wall s | direct CPU s |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for s in settings:
    if not any(k[0] == s for k in by):
      continue
    acc = {m: by[(s, m)]["test_accuracy"] for m in ("fp", "fp_relu", "direct") if (s, m) in by}
    fps = [acc[m] for m in ("fp", "fp_relu") if m in acc]
    gap = f"{100 * (acc['direct'] - max(fps)):+.2f}" if fps and "direct" in acc else "n/a"
    d = by.get((s, "direct"), {})
    cell = lambda m: f"{100 * acc[m]:.2f}" if m in acc else "—"  # noqa: E731
    overrides = " ".join(SETTINGS[s][0]) if s in SETTINGS else "(first sweep, seed 0)"
    lines.append(
      f"| {s} | `{overrides}` | {cell('fp')} | {cell('fp_relu')} | {cell('direct')} | {gap} | "
      f"{d.get('wall_s', 'n/a')} | {d.get('cpu_s', 'n/a')} |"
    )
  return "\n".join(lines) + "\n"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--settings", default=",".join(SETTINGS), help=f"of {', '.join(SETTINGS)}")
  chosen = p.parse_args().settings.split(",")
  unknown = [s for s in chosen if s not in SETTINGS]
  if unknown:
    sys.exit(f"--settings: unknown {unknown}; allowed: {', '.join(SETTINGS)}")
  out = os.path.join(sweep.RESULTS, f"{NAME}.json")
  rows = json.load(open(out)) if os.path.exists(out) else []
  rows = [r for r in rows if r["setting"] != REFERENCE] + reference_rows()
  done = {(r["setting"], r["method"]) for r in rows}
  for setting in chosen:
    overrides, methods = SETTINGS[setting]
    for method in methods:
      if (setting, method) in done:
        continue
      print(f"{setting} {method} ...", flush=True)
      runs_dir = os.path.join(sweep.ROOT, "experiments", "runs", NAME, setting)
      row = sweep.run_one("fashion_mnist", method, 2, 0, runs_dir, overrides, f"{NAME}/{setting}")
      rows.append(row | {"setting": setting})
      with open(out, "w") as f:
        json.dump(rows, f, indent=1)
      with open(os.path.join(sweep.RESULTS, f"{NAME}.md"), "w") as f:
        f.write(table(rows))
      print(f"{setting} {method}: {row['test_accuracy']:.4f}, {row['wall_s']} s wall", flush=True)
  print(table(rows))


if __name__ == "__main__":
  main()
