"""qnet against the PyTorch peer, ResNet-20 W4A4 train step on CPU, back to back.

  python experiments/peers/alternate.py --torch_python /tmp/torchvenv/bin/python

Runs `torch_resnet20.py` and then qnet's `benchmark.py` (ResNet-20, W4A4 only) as separate
processes, `--alternations` times in turn, so both see the same machine state. Each process
reports the median ms of its timed steps (after warm-up; qnet's compile is not timed).
Prints the pairs and the ratio of medians, and writes experiments/results/peer_resnet20_cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _torch(python: str, bits: int, steps: int, warmup: int, path: str) -> float:
  cmd = [python, os.path.join(HERE, "torch_resnet20.py"), "--bits", str(bits)]
  cmd += ["--steps", str(steps), "--warmup", str(warmup), "--json", path]
  subprocess.run(cmd, check=True, cwd=ROOT)
  with open(path) as f:
    return json.load(f)["median_ms"]


def _qnet(bits: int, steps: int, warmup: int, path: str) -> float:
  variant = "w4a4" if bits == 4 else "fp_plain"
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "benchmark.py"), "--models", "resnet20"]
  cmd += ["--variants", variant, "--rounds", "1", "--steps", str(steps), "--warmup", str(warmup)]
  cmd += ["--skip_pipeline", "--skip_compile_count", "--out", path]
  subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
  with open(path) as f:
    return json.load(f)["models"]["resnet20"][variant]["median_ms"]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--torch_python", default="/tmp/torchvenv/bin/python")
  p.add_argument("--alternations", type=int, default=3)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--bits", type=int, default=4, choices=(4, 32))
  p.add_argument(
    "--out", default=os.path.join(ROOT, "experiments", "results", "peer_resnet20_cpu.json")
  )
  args = p.parse_args()
  pairs = []
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(args.alternations):
      t = _torch(args.torch_python, args.bits, args.steps, args.warmup, os.path.join(tmp, "t.json"))
      q = _qnet(args.bits, args.steps, args.warmup, os.path.join(tmp, "q.json"))
      pairs.append({"torch_ms": t, "qnet_ms": q, "ratio": q / t})
      print(
        f"alternation {i + 1}: torch {t:.1f} ms, qnet {q:.1f} ms, qnet/torch {q / t:.3f}",
        flush=True,
      )
  t_med = float(np.median([x["torch_ms"] for x in pairs]))
  q_med = float(np.median([x["qnet_ms"] for x in pairs]))
  print(
    f"median over alternations: torch {t_med:.1f} ms, qnet {q_med:.1f} ms, qnet/torch {q_med / t_med:.3f}"
  )
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(
      {
        "bits": args.bits,
        "batch": 128,
        "steps": args.steps,
        "warmup": args.warmup,
        "pairs": pairs,
        "torch_median_ms": t_med,
        "qnet_median_ms": q_med,
        "ratio_qnet_over_torch": q_med / t_med,
      },
      f,
      indent=1,
    )


if __name__ == "__main__":
  main()
