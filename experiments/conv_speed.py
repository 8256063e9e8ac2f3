"""CPU train-step speed of ResNet-20 (CIFAR, batch 128) with three conv set-ups.

  stock+default : lax.conv_general_dilated, plain jax.jit
  stock+options : lax.conv_general_dilated, jit with qnet.conv.cpu_compiler_options()
  qnet+options  : qnet.conv.conv (cond barrier in backward), same options

Variants are timed in alternating rounds (the machine is noisy), after warm-up.
Usage (repo root): PYTHONPATH=. python experiments/conv_speed.py [--rounds 3] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

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


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--batch", type=int, default=128)
  args = ap.parse_args()

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
  state, steps = {}, {}
  for name, (fn, o) in variants.items():
    model = ResNet20(conv_fn=fn)
    v = model.init(kp, x)
    state[name] = (v["params"], v["batch_stats"])
    steps[name] = make_step(model, o)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
      state[name] = jax.block_until_ready(steps[name](*state[name], x, y))[:2]
    print(f"{name:14s} compile+warm-up {time.perf_counter() - t0:.1f} s")

  times: dict[str, list[float]] = {n: [] for n in variants}
  for r in range(args.rounds):
    for name in variants:
      per = []
      for _ in range(args.steps):
        t0 = time.perf_counter()
        *state[name], loss = jax.block_until_ready(steps[name](*state[name], x, y))
        per.append((time.perf_counter() - t0) * 1e3)
      times[name] += per
      print(
        f"round {r}: {name:14s} median {statistics.median(per):7.1f} ms/step "
        f"(loss {float(loss):.3f})"
      )
  base = statistics.median(times["stock+default"])
  print("\nmedian over all rounds:")
  for name, t in times.items():
    m = statistics.median(t)
    print(f"  {name:14s} {m:7.1f} ms/step  min {min(t):7.1f}  speed-up x{base / m:.2f}")


if __name__ == "__main__":
  main()
