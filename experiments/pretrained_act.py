"""The imported PyTorch ResNet-18's Fashion-MNIST test accuracy in qnet, at 32 bits, under each
32-bit activation (issue 26, items 4 and 5's first step): plain ReLU (`model_act=relu`, the
network PyTorch trained), DoReFa's `clip(x, 0, 1)`, and LSQ / PACT (whose 32-bit form is ReLU).
Each row is one eval-only `python -m qnet.main ... --config.num_train_steps=0` (resumable: a
row already in the output is kept).

  python experiments/pretrained_act.py --pth experiments/runs/tv_resnet18_fmnist/model.safetensors \
      --torch_result experiments/runs/tv_resnet18_fmnist/result.json \
      --out experiments/results/tv_resnet18_fmnist_import.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
  "relu": ["--config.model_act=relu"],
  "dorefa_clip": ["--config.quant.act_quantizer=dorefa"],
  "lsq": ["--config.quant.act_quantizer=lsq", "--config.quant.weight_quantizer=lsq"],
  "pact": ["--config.quant.act_quantizer=pact"],
}


def command(init_from: str, workdir: str, extra: list[str]) -> list[str]:
  return [
    sys.executable,
    "-m",
    "qnet.main",
    "--config=configs/fashion_mnist_w4a4.py",
    "--config.model=tv_resnet18",
    "--config.quant.weight_bits=32",
    "--config.quant.act_bits=32",
    f"--config.init_from={init_from}",
    "--config.num_train_steps=0",
    f"--workdir={workdir}",
    *extra,
  ]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pth", required=True, help="the PyTorch state_dict (.pth or .safetensors)")
  parser.add_argument(
    "--torch_result", required=True, help="torch_fmnist_resnet18.py's result.json"
  )
  parser.add_argument("--out", required=True)
  parser.add_argument("--runs", default=os.path.join(ROOT, "experiments", "runs", "pretrained_act"))
  args = parser.parse_args()
  rows = json.load(open(args.out)) if os.path.exists(args.out) else {}
  torch_result = json.load(open(args.torch_result))
  rows["pytorch"] = {"eval_accuracy": torch_result["test_accuracy"], **torch_result}
  for name, extra in VARIANTS.items():
    if name in rows:
      continue
    workdir = os.path.join(args.runs, name)
    cmd = command(f"torchvision:{os.path.abspath(args.pth)}", workdir, extra)
    start = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    evals = [
      json.loads(line)
      for line in open(os.path.join(workdir, "metrics.jsonl"))
      if "eval_accuracy" in line
    ]
    rows[name] = {
      "eval_accuracy": evals[-1]["eval_accuracy"],
      "step": evals[-1]["step"],
      "eval_examples": evals[-1]["eval_examples"],
      "seconds": round(time.time() - start, 1),
      "command": " ".join(cmd[1:]),
    }
    print(name, rows[name]["eval_accuracy"], flush=True)
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)
  with open(args.out, "w") as f:
    json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
