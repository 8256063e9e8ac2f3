"""A torchvision ResNet-18 with a 1-channel stem trained in PyTorch on Fashion-MNIST: the
pretrained network of the transposed paper protocol (issue 26), saved as a state_dict.

Runs in the torch venv (torch, torchvision, safetensors; no jax), e.g. the one `.ci/run` makes:

  .venv-torch/bin/python experiments/peers/torch_fmnist_resnet18.py --epochs 3 \
      --out experiments/runs/tv_resnet18_fmnist

Data and preprocessing are qnet's (`qnet.data`): the Debian IDX files, pixels / 255, then
(x - 0.2860) / 0.3530, no augmentation; the test split is scored in eval mode (BN running
statistics). Writes OUT/model.safetensors and OUT/model.pth (the state_dict), OUT/result.json
(test accuracy, per-example predictions' digest, timing, versions) and skips the training when
OUT/result.json exists (resumable by rerunning).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import platform
import time

import numpy as np
import torch
import torchvision
from safetensors.torch import save_file

IDX_DIR = os.environ.get("QNET_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist")
MEAN, STD = np.float32(0.2860), np.float32(0.3530)  # qnet.data.datasets, fashion_mnist


def read_idx(path: str) -> np.ndarray:
  with gzip.open(path, "rb") as f:
    data = f.read()
  ndim = data[3]
  shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
  """NCHW float32 images normalised as qnet does, and int64 labels."""
  images = read_idx(os.path.join(IDX_DIR, f"{split}-images-idx3-ubyte.gz"))
  labels = read_idx(os.path.join(IDX_DIR, f"{split}-labels-idx1-ubyte.gz"))
  x = (images.astype(np.float32) / np.float32(255.0) - MEAN) / STD
  return x[:, None], labels.astype(np.int64)


def build() -> torch.nn.Module:
  """torchvision's resnet18 for 10 classes with the usual 1-channel adaptation of its stem."""
  model = torchvision.models.resnet18(weights=None, num_classes=10)
  model.conv1 = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
  return model


@torch.no_grad()
def predict(model: torch.nn.Module, x: np.ndarray, batch: int = 500) -> np.ndarray:
  model.eval()
  out = [
    model(torch.from_numpy(x[i : i + batch])).argmax(1).numpy() for i in range(0, len(x), batch)
  ]
  return np.concatenate(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--lr", type=float, default=0.05)
  parser.add_argument(
    "--train_examples", type=int, default=60000, help="the first N training images"
  )
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args()
  result_path = os.path.join(args.out, "result.json")
  if os.path.exists(result_path):
    print(f"{result_path} exists: nothing to do")
    return
  os.makedirs(args.out, exist_ok=True)
  torch.manual_seed(args.seed)
  torch.set_num_threads(args.threads)
  x_train, y_train = load("train")
  x_train, y_train = x_train[: args.train_examples], y_train[: args.train_examples]
  x_test, y_test = load("t10k")
  model = build()
  steps_per_epoch = len(x_train) // args.batch
  total = steps_per_epoch * args.epochs
  opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
  sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=total, pct_start=0.15)
  rng = np.random.default_rng(args.seed)
  start = time.time()
  for epoch in range(args.epochs):
    model.train()
    order = rng.permutation(len(x_train))
    for s in range(steps_per_epoch):
      if s % 50 == 0:
        print(
          f"epoch {epoch + 1} step {s}/{steps_per_epoch} {time.time() - start:.0f}s", flush=True
        )
      idx = order[s * args.batch : (s + 1) * args.batch]
      loss = torch.nn.functional.cross_entropy(
        model(torch.from_numpy(x_train[idx])), torch.from_numpy(y_train[idx])
      )
      opt.zero_grad()
      loss.backward()
      opt.step()
      sched.step()
    pred = predict(model, x_test)
    print(
      f"epoch {epoch + 1}: loss {loss.item():.4f} test {np.mean(pred == y_test):.4f}", flush=True
    )
  train_s = time.time() - start
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  save_file(state, os.path.join(args.out, "model.safetensors"))
  torch.save(state, os.path.join(args.out, "model.pth"))
  pred = predict(model, x_test)
  np.save(os.path.join(args.out, "test_predictions.npy"), pred)
  row = {
    "test_accuracy": float(np.mean(pred == y_test)),
    "test_correct": int(np.sum(pred == y_test)),
    "test_examples": len(y_test),
    "predictions_sha256": hashlib.sha256(pred.astype(np.int64).tobytes()).hexdigest(),
    "epochs": args.epochs,
    "train_examples": len(y_train),
    "batch": args.batch,
    "lr": args.lr,
    "seed": args.seed,
    "train_seconds": round(train_s, 1),
    "threads": args.threads,
    "torch": torch.__version__,
    "torchvision": torchvision.__version__,
    "python": platform.python_version(),
  }
  with open(result_path, "w") as f:
    json.dump(row, f, indent=1)
  print(json.dumps(row))


if __name__ == "__main__":
  main()
