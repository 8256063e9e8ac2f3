"""CPU train-step speed of ResNet-20 (CIFAR, batch 128) with three conv set-ups.

  stock+default : lax.conv_general_dilated, plain jax.jit
  stock+options : lax.conv_general_dilated, jit with qnet.conv.cpu_compiler_options()
  qnet+options  : qnet.conv.conv (cond barrier in backward), same options

Variants are timed in alternating rounds (the machine is noisy), after warm-up.
Usage (repo root): PYTHONPATH=. python experiments/conv_speed.py [--rounds 3] [--steps 10]

`--per_op` instead times each ResNet-20 convolution shape alone (forward, input gradient,
kernel gradient) under three CPU library choices, in alternating rounds:
  eigen : qnet's options (XLA's Eigen convolutions, YNNPACK kept for dots and reductions)
  ynn   : XLA defaults (YNNPACK convolutions)
  xnn   : qnet's options plus XNNPACK convolutions
and prints ms per op and the per-step total (each shape weighted by its count in ResNet-20).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from benchmark import Timer
from qnet import conv as qconv


def stock_conv(x, kernel, *, strides=(1, 1), padding="SAME", precision=None):
  return lax.conv_general_dilated(
    x, kernel, strides, padding, precision=precision, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


class Conv(nn.Module):
  features: int
  ksize: int = 3
  strides: int = 1
  conv_fn: Callable = stock_conv

  @nn.compact
  def __call__(self, x):
    k = self.param(
      "kernel", nn.initializers.he_normal(), (self.ksize, self.ksize, x.shape[-1], self.features)
    )
    return self.conv_fn(x, k, strides=(self.strides,) * 2, padding="SAME")


class PreActBlock(nn.Module):
  features: int
  strides: int
  conv_fn: Callable

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    h = nn.relu(bn()(x))
    short = x
    if self.strides != 1 or x.shape[-1] != self.features:
      short = Conv(self.features, 1, self.strides, self.conv_fn)(h)
    h = Conv(self.features, 3, self.strides, self.conv_fn)(h)
    h = Conv(self.features, 3, 1, self.conv_fn)(nn.relu(bn()(h)))
    return h + short


class ResNet20(nn.Module):
  conv_fn: Callable = stock_conv
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = Conv(16, 3, 1, self.conv_fn)(x)
    for stage, width in enumerate((16, 32, 64)):
      for block in range(3):
        x = PreActBlock(width, 2 if stage and not block else 1, self.conv_fn)(x, train)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    return nn.Dense(self.num_classes)(x.mean((1, 2)))


def make_step(model: nn.Module, compiler_options: dict[str, str]):
  def step(params, stats, x, y):
    def loss_fn(p):
      logits, new = model.apply({"params": p, "batch_stats": stats}, x, mutable=["batch_stats"])
      onehot = jax.nn.one_hot(y, logits.shape[-1])
      return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * onehot, -1)), new

    (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    return params, new["batch_stats"], loss

  return jax.jit(step, compiler_options=compiler_options or None)


# ResNet-20 conv shapes at 32x32 input: (H, Cin, Cout, kernel, stride, count per step).
RESNET20_CONVS = (
  (32, 3, 16, 3, 1, 1),
  (32, 16, 16, 3, 1, 6),
  (32, 16, 32, 3, 2, 1),
  (32, 16, 32, 1, 2, 1),
  (16, 32, 32, 3, 1, 5),
  (16, 32, 64, 3, 2, 1),
  (16, 32, 64, 1, 2, 1),
  (8, 64, 64, 3, 1, 5),
)


def per_op(batch: int, rounds: int, steps: int) -> None:
  """Times forward / input-grad / kernel-grad of each ResNet-20 conv under each library."""
  eigen = qconv.cpu_compiler_options()
  libraries = {
    "eigen": eigen,
    "ynn": {},
    "xnn": {
      **eigen,
      "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
    },
  }
  totals = {lib: [0.0, 0.0, 0.0] for lib in libraries}
  print(
    "shape                      | " + " | ".join(f"{lib}: fwd / dx / dw ms" for lib in libraries)
  )
  for h, cin, cout, k, s, count in RESNET20_CONVS:
    x = jax.random.normal(jax.random.key(0), (batch, h, h, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin, cout))
    g = jnp.ones_like(stock_conv(x, w, strides=(s, s)))
    ops = (
      lambda x, w, g: stock_conv(x, w, strides=(s, s)),
      lambda x, w, g: jax.vjp(lambda a: stock_conv(a, w, strides=(s, s)), x)[1](g)[0],
      lambda x, w, g: jax.vjp(lambda b: stock_conv(x, b, strides=(s, s)), w)[1](g)[0],
    )
    fns = {
      lib: [jax.jit(op, compiler_options=o or None) for op in ops] for lib, o in libraries.items()
    }
    timer = Timer()  # alternating rounds after warm-up, as the train-step benchmark
    for lib, fs in fns.items():
      for i, f in enumerate(fs):
        timer.add((lib, i), lambda f=f: jax.block_until_ready(f(x, w, g)))
    timer.run(rounds, steps, warmup=1)
    cells = []
    for lib in libraries:
      med = [timer.stats((lib, i))["median_ms"] for i in range(3)]
      totals[lib] = [a + count * m for a, m in zip(totals[lib], med)]
      cells.append(" / ".join(f"{m:6.2f}" for m in med))
    print(f"H{h:<2d} {cin:2d}->{cout:2d} k{k} s{s} x{count}     | " + " | ".join(cells), flush=True)
  print("\nper ResNet-20 step (shapes weighted by count):")
  for lib, t in totals.items():
    print(f"  {lib:6s} fwd {t[0]:6.1f}  dx {t[1]:6.1f}  dw {t[2]:6.1f}  total {sum(t):7.1f} ms")


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--per_op", action="store_true", help="time each conv shape per library")
  args = ap.parse_args()
  if args.per_op:
    per_op(args.batch, args.rounds, args.steps)
    return

  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (args.batch, 32, 32, 3))
  y = jax.random.randint(ky, (args.batch,), 0, 10)
  opts = qconv.cpu_compiler_options()
  print(
    f"jax {jax.__version__}, backend {jax.default_backend()}, "
    f"{jax.devices()[0].device_kind}, cpu options: {opts or 'none'}"
  )
  variants = {
    "stock+default": (stock_conv, {}),
    "stock+options": (stock_conv, opts),
    "qnet+options": (qconv.conv, opts),
  }
  timer = Timer()
  for name, (fn, o) in variants.items():
    model = ResNet20(conv_fn=fn)
    v = model.init(kp, x)
    step, box = make_step(model, o), [(v["params"], v["batch_stats"])]

    def run_step(step=step, box=box):
      box[0] = jax.block_until_ready(step(*box[0], x, y))[:2]

    t0 = time.perf_counter()
    for _ in range(args.warmup):
      run_step()
    print(f"{name:14s} compile+warm-up {time.perf_counter() - t0:.1f} s")
    timer.add(name, run_step)

  timer.run(args.rounds, args.steps, warmup=0)  # warmed up above, with compile time printed
  base = timer.stats("stock+default")["median_ms"]
  print("\nmedian over all rounds:")
  for name in variants:
    st = timer.stats(name)
    print(
      f"  {name:14s} {st['median_ms']:7.1f} ms/step  min {st['min_ms']:7.1f}  "
      f"speed-up x{base / st['median_ms']:.2f}"
    )


if __name__ == "__main__":
  main()
