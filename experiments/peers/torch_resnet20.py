"""PyTorch peer benchmark: pre-activation ResNet-20 with DoReFa W{k}A{k} quantizers, on CPU.

Mirrors qnet's `PreActResNet` (qnet/models/resnet.py) and quantizers (qnet/quant/quantizers.py):
full-precision stem (input not quantized), 3 stages of 16/32/64 channels x 3 basic blocks,
each conv quantizing its own input activation and its kernel, and a full-precision head
whose input activation is clip-to-[0, 1] only. Times one SGD step (forward, backward,
update) on a random batch and prints the median (min, max) ms/step.

Torch is not a qnet dependency; install it in its own venv, e.g.
  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 numpy
  /tmp/torchvenv/bin/python experiments/peers/torch_resnet20.py --steps 10 --warmup 3 --bits 4
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

FULL_PRECISION = 32
_TINY = 1e-12  # floor of max|tanh(w)|, as qnet.quant.quantizers


class _RoundSTE(torch.autograd.Function):
  """round() forward, identity gradient."""

  @staticmethod
  def forward(ctx, x):
    return torch.round(x)

  @staticmethod
  def backward(ctx, g):
    return g


def uniform_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
  """q_k(x) = round(n x) / n, n = 2^k - 1; gradient 1 (STE). No clipping."""
  if bits >= FULL_PRECISION:
    return x
  n = float(2**bits - 1)
  return _RoundSTE.apply(x * n) / n


def quantize_weights(w: torch.Tensor, bits: int) -> torch.Tensor:
  """2 q_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1, max over the whole kernel.

  Gradients flow through tanh and the normalisation; only round is straight-through.
  """
  if bits >= FULL_PRECISION:
    return w
  t = torch.tanh(w)
  m = t.abs().max().clamp_min(_TINY)
  w01 = t / (2.0 * m) + 0.5
  return 2.0 * uniform_quantize(w01, bits) - 1.0


class _ActQuant(torch.autograd.Function):
  """q_k(clamp(x, 0, 1)); gradient 1 on [0, 1] (boundaries included), 0 outside."""

  @staticmethod
  def forward(ctx, x, n):
    ctx.save_for_backward(x)
    c = x.clamp(0.0, 1.0)
    return c if n is None else torch.round(c * n) / n

  @staticmethod
  def backward(ctx, g):
    (x,) = ctx.saved_tensors
    mask = (x >= 0.0) & (x <= 1.0)
    return g * mask.to(g.dtype), None


def quantize_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
  n = None if bits >= FULL_PRECISION else float(2**bits - 1)
  return _ActQuant.apply(x, n)


class QConv(nn.Module):
  """Bias-free conv with a k-bit kernel and (optionally) a k-bit input activation."""

  def __init__(self, cin, cout, k, stride, bits, quantize_input=True):
    super().__init__()
    self.weight = nn.Parameter(torch.empty(cout, cin, k, k))
    # He-normal over fan-out, as qnet's conv_init.
    nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")
    self.stride, self.pad, self.bits, self.quantize_input = stride, k // 2, bits, quantize_input

  def forward(self, x):
    if self.quantize_input:
      x = quantize_activations(x, self.bits)
    w = quantize_weights(self.weight, self.bits)
    return F.conv2d(x, w, stride=self.stride, padding=self.pad)


class BasicBlock(nn.Module):
  def __init__(self, cin, cout, stride, bits):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = QConv(cin, cout, 3, stride, bits)
    self.bn2 = nn.BatchNorm2d(cout)
    self.conv2 = QConv(cout, cout, 3, 1, bits)
    self.shortcut = QConv(cin, cout, 1, stride, bits) if (stride != 1 or cin != cout) else None

  def forward(self, x):
    pre = self.bn1(x)
    y = self.conv1(pre)
    y = self.bn2(y)
    y = self.conv2(y)
    sc = x if self.shortcut is None else self.shortcut(pre)
    return y + sc


class PreActResNet20(nn.Module):
  def __init__(self, bits, num_classes=10, widths=(16, 32, 64), blocks=3):
    super().__init__()
    # Stem: full-precision kernel, image input not quantized.
    self.stem = QConv(3, widths[0], 3, 1, FULL_PRECISION, quantize_input=False)
    layers, cin = [], widths[0]
    for i, w in enumerate(widths):
      for j in range(blocks):
        layers.append(BasicBlock(cin, w, 2 if i > 0 and j == 0 else 1, bits))
        cin = w
    self.blocks = nn.Sequential(*layers)
    self.final_bn = nn.BatchNorm2d(cin)
    self.head = nn.Linear(cin, num_classes)  # full precision, with bias
    nn.init.zeros_(self.head.bias)

  def forward(self, x):
    x = self.blocks(self.stem(x))
    x = self.final_bn(x)
    x = quantize_activations(x, FULL_PRECISION)  # head input: clip to [0, 1] only
    x = x.mean(dim=(2, 3))
    return self.head(x)


def make_train_step(bits: int, batch: int):
  """One SGD step (forward, backward, update) of a fresh W{bits}A{bits} ResNet-20 on a fixed
  random batch; returns the closure, which returns the loss."""
  model = PreActResNet20(bits).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
  x = torch.rand(batch, 3, 32, 32)
  y = torch.randint(0, 10, (batch,))

  def step():
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss

  return step


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=10, help="timed steps")
  p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps")
  p.add_argument("--bits", type=int, default=4, help="weight/activation bits (32 = FP)")
  p.add_argument(
    "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
  )
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", default=None, help="optional path for a JSON summary")
  args = p.parse_args()
  if args.steps < 1:
    p.error("--steps must be >= 1")

  if args.threads is not None:
    torch.set_num_threads(args.threads)
  torch.manual_seed(args.seed)
  step = make_train_step(args.bits, args.batch)

  for _ in range(args.warmup):
    step()
  times, faults = [], []
  for _ in range(args.steps):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t0 = time.perf_counter()
    loss = step()
    loss.item()  # CPU is synchronous; keeps the step's result materialised
    times.append((time.perf_counter() - t0) * 1e3)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)

  result = {
    "median_ms": statistics.median(times),
    "min_ms": min(times),
    "max_ms": max(times),
    "median_page_faults": statistics.median(faults),
    "steps": args.steps,
    "bits": args.bits,
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
  }
  print(
    f"torch {result['torch']} threads={result['threads']} bits={args.bits} batch={args.batch} "
    f"steps={args.steps} warmup={args.warmup} loss={loss.item():.4f}"
  )
  print(
    f"median {result['median_ms']:.1f} ms/step (min {result['min_ms']:.1f}, "
    f"max {result['max_ms']:.1f})"
  )
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  main()
