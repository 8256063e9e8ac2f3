"""CPU train-step speed of ResNet-20 (CIFAR, batch 128) with each of qnet's CPU conv fixes on/off.

  stock+default         : lax.conv_general_dilated, plain jax.jit (XLA's defaults)
  stock+options         : lax.conv_general_dilated, jit with qnet.platform.conv.CPU_CONV_OPTIONS
  qnet+default          : qnet.platform.conv's custom-VJP conv (cond barrier in backward), XLA's defaults
  qnet+options          : both fixes
  qnet+subpixel+default : the barrier and the sub-pixel strided input gradient, XLA's defaults
  qnet+subpixel+options : the same with the options
  qnet+subpixel+onednn  : the barrier and sub-pixel gradients with qnet.platform.conv.ONEDNN_OPTIONS
  stock+onednn          : lax.conv_general_dilated with the oneDNN set
  qnet+subpixel+onednn+options : both sets (oneDNN then takes every convolution)

Each variant is fixed here, whatever `qnet.platform.conv.conv` picks on the running jaxlib, so the same
set-ups compare on every stack (`--variants` picks some; the first is the speed-up base).
Variants are timed in alternating rounds (the machine is noisy), after warm-up; each round's
median is kept, so a difference can be checked round by round, and the process CPU time per
step is kept beside the wall time. Prints the load average before and after; writes a JSON.
Usage (repo root): PYTHONPATH=. python experiments/conv_speed.py [--rounds 3] [--steps 10]

`--per_op` instead times each ResNet-20 convolution shape alone (forward, input gradient,
kernel gradient) under these set-ups, in alternating rounds:
  eigen          : the CPU conv options (XLA's Eigen convolutions, YNNPACK for dots and reductions)
  ynn            : XLA defaults (YNNPACK convolutions)
  xnn            : the CPU conv options plus XNNPACK convolutions
  subpixel+eigen : qnet.platform.conv's sub-pixel strided input gradient, CPU conv options
  subpixel+ynn   : the same under XLA defaults
  subpixel+onednn: the same with qnet.platform.conv.ONEDNN_OPTIONS (oneDNN takes what YNNPACK leaves)
  subpixel+onednn+eigen : both sets (oneDNN takes every convolution)
and prints ms per op, the per-step total (each shape weighted by its count in ResNet-20),
each gradient's time over the forward's (all three do the same useful multiply-adds) and the
CPU time per op. `--setups` and `--stride` pick some set-ups and shapes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from benchmark import Timer
from qnet.platform import conv as qconv


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


def make_step(model: nn.Module, compiler_options: dict[str, str | bool]):
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


def _subpixel_conv(x, kernel, *, strides=(1, 1), padding="SAME", precision=None):
  return qconv.custom_conv(
    x, kernel, strides=strides, padding=padding, precision=precision, barrier=False, subpixel=True
  )


def op_setups() -> dict:
  """--per_op set-up name -> (conv function, compiler options)."""
  eigen = dict(qconv.CPU_CONV_OPTIONS)
  xnn = {
    **eigen,
    "xla_cpu_experimental_xnn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",
  }
  return {
    "eigen": (stock_conv, eigen),
    "ynn": (stock_conv, {}),
    "xnn": (stock_conv, xnn),
    "subpixel+eigen": (_subpixel_conv, eigen),
    "subpixel+ynn": (_subpixel_conv, {}),
    "subpixel+onednn": (_subpixel_conv, dict(qconv.ONEDNN_OPTIONS)),
    "subpixel+onednn+eigen": (_subpixel_conv, {**eigen, **qconv.ONEDNN_OPTIONS}),
  }


def per_op(
  batch: int, rounds: int, steps: int, only: list[str] | None = None, stride: int = 0
) -> dict:
  """Times forward / input-grad / kernel-grad of each ResNet-20 conv under each set-up."""
  setups = op_setups()
  if only:
    setups = {name: setups[name] for name in only}
  totals = {name: [0.0, 0.0, 0.0] for name in setups}
  shapes = []
  print(
    "shape                | set-up         |  fwd ms |   dx ms |   dw ms | dx/fwd | dw/fwd "
    "| CPU ms: fwd / dx / dw"
  )
  for h, cin, cout, k, s, count in RESNET20_CONVS:
    if stride and s != stride:
      continue
    x = jax.random.normal(jax.random.key(0), (batch, h, h, cin))
    w = jax.random.normal(jax.random.key(1), (k, k, cin, cout))
    g = jnp.ones_like(stock_conv(x, w, strides=(s, s)))
    timer = Timer()  # alternating rounds after warm-up, as the train-step benchmark
    for name, (fn, o) in setups.items():
      ops = (
        lambda x, w, g, fn=fn: fn(x, w, strides=(s, s)),
        lambda x, w, g, fn=fn: jax.vjp(lambda a: fn(a, w, strides=(s, s)), x)[1](g)[0],
        lambda x, w, g, fn=fn: jax.vjp(lambda b: fn(x, b, strides=(s, s)), w)[1](g)[0],
      )
      for i, op in enumerate(ops):
        f = jax.jit(op, compiler_options=o or None)
        timer.add((name, i), lambda f=f: jax.block_until_ready(f(x, w, g)))
    timer.run(rounds, steps, warmup=1)
    row = {"h": h, "cin": cin, "cout": cout, "k": k, "stride": s, "count": count}
    for name in setups:
      row[name] = {op: timer.stats((name, i)) for i, op in enumerate(("fwd", "dx", "dw"))}
      med = [row[name][op]["median_ms"] for op in ("fwd", "dx", "dw")]
      totals[name] = [a + count * m for a, m in zip(totals[name], med)]
      print(
        f"H{h:<2d} {cin:2d}->{cout:2d} k{k} s{s} x{count} | {name:14s} | "
        + " | ".join(f"{m:7.2f}" for m in med)
        + f" | {med[1] / med[0]:6.1f} | {med[2] / med[0]:6.1f} | "
        + " / ".join(f"{row[name][op]['median_cpu_ms']:6.1f}" for op in ("fwd", "dx", "dw")),
        flush=True,
      )
    for name in setups:
      if name.startswith("subpixel+") and (base := name[len("subpixel+") :]) in setups:
        wins = faster_in(row[base]["dx"], row[name]["dx"])
        print(f"  dx: {name} faster than {base} in {wins} rounds")
    shapes.append(row)
  print("\nper ResNet-20 step (shapes weighted by count):")
  for name, t in totals.items():
    print(f"  {name:14s} fwd {t[0]:6.1f}  dx {t[1]:6.1f}  dw {t[2]:6.1f}  total {sum(t):7.1f} ms")
  return {
    "setups": {name: o for name, (_, o) in setups.items()},
    "shapes": shapes,
    "per_step_ms": {name: dict(zip(("fwd", "dx", "dw"), t)) for name, t in totals.items()},
  }


def faster_in(base: dict, other: dict) -> str:
  """"k/n": in how many of the n alternating rounds `other`'s median beat `base`'s."""
  pairs = list(zip(base["round_medians_ms"], other["round_medians_ms"]))
  return f"{sum(b < a for a, b in pairs)}/{len(pairs)}"


def _stack() -> dict:
  """Versions of the running stack, for result files."""
  import platform

  import jaxlib

  return {
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
  }


def _loadavg() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def _write(out: str, result: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {out}")


def step_variants() -> dict:
  """Train-step variant name -> (conv function, compiler options)."""
  opts, onednn = dict(qconv.CPU_CONV_OPTIONS), dict(qconv.ONEDNN_OPTIONS)
  sub = functools.partial(qconv.custom_conv, subpixel=True)
  return {
    "stock+default": (stock_conv, {}),
    "stock+options": (stock_conv, opts),
    "qnet+default": (qconv.custom_conv, {}),
    "qnet+options": (qconv.custom_conv, opts),
    "qnet+subpixel+default": (sub, {}),
    "qnet+subpixel+options": (sub, opts),
    "qnet+subpixel+onednn": (sub, onednn),
    "stock+onednn": (stock_conv, onednn),
    "qnet+subpixel+onednn+options": (sub, {**opts, **onednn}),
  }


def train_step(args) -> dict:
  """Alternating-round timing of the ResNet-20 train step under the four set-ups."""
  kx, ky, kp = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (args.batch, 32, 32, 3))
  y = jax.random.randint(ky, (args.batch,), 0, 10)
  variants = step_variants()
  if args.variants:
    variants = {name: variants[name] for name in args.variants.split(",")}
  timer, compile_s = Timer(), {}
  for name, (fn, o) in variants.items():
    model = ResNet20(conv_fn=fn)
    v = model.init(kp, x)
    step, box = make_step(model, o), [(v["params"], v["batch_stats"])]

    def run_step(step=step, box=box):
      box[0] = jax.block_until_ready(step(*box[0], x, y))[:2]

    t0 = time.perf_counter()
    for _ in range(args.warmup):
      run_step()
    compile_s[name] = time.perf_counter() - t0
    print(f"{name:14s} compile+warm-up {compile_s[name]:.1f} s", flush=True)
    timer.add(name, run_step)

  timer.run(args.rounds, args.steps, warmup=0)  # warmed up above, with compile time printed
  first = next(iter(variants))
  base = timer.stats(first)["median_ms"]
  print(f"\nmedian over all rounds (round medians in brackets), load average {_loadavg()}:")
  result = {}
  for name in variants:
    st = timer.stats(name)
    result[name] = {**st, "compile_and_warmup_s": compile_s[name]}
    rounds = " ".join(f"{m:.0f}" for m in st["round_medians_ms"])
    print(
      f"  {name:14s} {st['median_ms']:7.1f} ms/step  [{rounds}]  min {st['min_ms']:7.1f}  "
      f"cpu {st['median_cpu_ms']:7.1f} ms  speed-up x{base / st['median_ms']:.2f}  "
      f"faster than {first} in {faster_in(timer.stats(first), st)} rounds"
    )
  return {"variants": result, "options": dict(qconv.CPU_CONV_OPTIONS)}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--batch", type=int, default=128)
  ap.add_argument("--per_op", action="store_true", help="time each conv shape per library")
  ap.add_argument("--setups", default="", help="--per_op: comma list of set-ups (default all)")
  ap.add_argument(
    "--variants",
    default="stock+default,stock+options,qnet+default,qnet+options",
    help="train step: comma list of variants, the first is the speed-up base",
  )
  ap.add_argument("--stride", type=int, default=0, help="--per_op: only shapes of this stride")
  ap.add_argument("--out", default=None, help="JSON path (default: experiments/results/...)")
  args = ap.parse_args()
  only = [x for x in args.setups.split(",") if x]
  known = tuple(op_setups())
  if any(x not in known for x in only):
    print(f"--setups: each of {', '.join(known)}", file=sys.stderr)
    sys.exit(2)
  if any(x not in step_variants() for x in args.variants.split(",")):
    print(f"--variants: each of {', '.join(step_variants())}", file=sys.stderr)
    sys.exit(2)
  stack = _stack()
  load = _loadavg()
  print(f"{stack}, load average {load}", flush=True)
  kind = "conv_ops" if args.per_op else "conv_speed"
  if args.per_op:
    result = per_op(args.batch, args.rounds, args.steps, only, args.stride)
  else:
    result = train_step(args)
  result = {
    "stack": stack,
    "batch": args.batch,
    "rounds": args.rounds,
    "steps": args.steps,
    "loadavg_start": load,
    "loadavg_end": _loadavg(),
    **result,
  }
  out = args.out or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "results", f"{kind}_cpu_jax{jax.__version__}.json"
  )
  _write(out, result)


if __name__ == "__main__":
  main()
