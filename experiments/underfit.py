"""Train vs test accuracy per method of a finished sweep, from its curves (issue: where joint
KD helps, stage 2: do the students underfit?).

  python experiments/underfit.py --name fashion_mnist_hard --bits 2

The train accuracy is the mean of the last `--last` logged `train_accuracy` points of a run
(each a mean over one log interval of training batches, in train mode, at the sampled
precision); the test accuracy is the run's final `eval_accuracy`. Writes
experiments/results/NAME_underfit.md. A train accuracy no higher than the test accuracy means
the network fits its training set no better than unseen data: it underfits, and a
regulariser such as distillation cannot be expected to help it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def runs(name: str, bits: int) -> dict[str, list[tuple[float, float]]]:
  """Method -> [(train accuracy, test accuracy)] over its seeds."""
  out: dict[str, list[tuple[float, float]]] = {}
  for path in sorted(glob.glob(os.path.join(RESULTS, "curves", name, f"*_w*a*_s*.json"))):
    key = os.path.basename(path)[: -len(".json")]
    method, wa, _ = key.rsplit("_", 2)
    if wa not in (f"w{bits}a{bits}", "w32a32"):
      continue
    with open(path) as f:
      points = json.load(f)
    train = [p["train_accuracy"] for p in points if "train_accuracy" in p]
    test = [p["eval_accuracy"] for p in points if "eval_accuracy" in p]
    out.setdefault(f"{method} ({wa.upper()})", []).append((train, test[-1]))
  return out


def table(found: dict, last: int) -> str:
  lines = [
    f"| run | seeds | train accuracy (last {last} log points) | test accuracy | train - test (points) |",
    "|---|---|---|---|---|",
  ]
  for method, rows in sorted(found.items()):
    train = 100 * np.array([np.mean(t[-last:]) for t, _ in rows])
    test = 100 * np.array([e for _, e in rows])
    lines.append(
      f"| {method} | {len(rows)} | {train.mean():.2f} ± {train.std(ddof=1) if len(rows) > 1 else 0:.2f} | "
      f"{test.mean():.2f} ± {test.std(ddof=1) if len(rows) > 1 else 0:.2f} | {train.mean() - test.mean():+.2f} |"
    )
  return "\n".join(lines) + "\n"


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--name", default="fashion_mnist_hard")
  p.add_argument("--bits", type=int, default=2)
  p.add_argument("--last", type=int, default=3)
  args = p.parse_args()
  md = table(runs(args.name, args.bits), args.last)
  with open(os.path.join(RESULTS, f"{args.name}_underfit.md"), "w") as f:
    f.write(md)
  print(md)


if __name__ == "__main__":
  main()
