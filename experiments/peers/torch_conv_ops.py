"""PyTorch's time for each ResNet-20 convolution shape alone, beside qnet's `conv_speed.py --per_op`.

Reads the shapes (and qnet's per-op medians) from a `conv_speed.py --per_op` JSON, times
PyTorch's forward, input gradient and kernel gradient of each shape on the same batch
(`aten::convolution_backward` with one output mask each, which is what autograd calls), in
alternating rounds after a warm-up, and prints both side by side with the per-step totals
(each shape weighted by its count in ResNet-20). `--profile_step` also profiles one
`torch_resnet20.py` train step and splits its CPU time into convolutions and the rest, so the
gap to qnet's whole step can be placed in the convolutions or outside them.

  /tmp/torchvenv/bin/python experiments/peers/torch_conv_ops.py \
    --qnet_json experiments/results/conv_ops_idle_cpu_jax0.12.0.1.json --setup subpixel+ynn \
    --profile_step --json experiments/results/conv_ops_torch_idle_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

OPS = ("fwd", "dx", "dw")
# What autograd runs for a conv whose input and kernel both need gradients: one call for both.
BOTH = "dx+dw"


def shape_ops(row: dict, batch: int) -> tuple:
  """The three timed closures of one conv shape (NCHW, as torch_resnet20.py)."""
  h, cin, cout, k, s = row["h"], row["cin"], row["cout"], row["k"], row["stride"]
  pad = k // 2
  x = torch.randn(batch, cin, h, h)
  w = torch.randn(cout, cin, k, k)
  y = F.conv2d(x, w, stride=s, padding=pad)
  g = torch.ones_like(y)

  def backward(mask):
    return torch.ops.aten.convolution_backward(
      g, x, w, None, [s, s], [pad, pad], [1, 1], False, [0, 0], 1, mask
    )

  return (
    lambda: F.conv2d(x, w, stride=s, padding=pad),
    lambda: backward([True, False, False]),
    lambda: backward([False, True, False]),
    lambda: backward([True, True, False]),
  )


def time_shapes(rows: list[dict], batch: int, rounds: int, steps: int) -> list[dict]:
  """Median ms of each (shape, op): every op warmed up, then `rounds` alternating rounds."""
  closures = [shape_ops(r, batch) for r in rows]
  for ops in closures:
    for op in ops:
      op()
  names = (*OPS, BOTH)
  samples = [[[] for _ in names] for _ in rows]
  for _ in range(rounds):
    for i, ops in enumerate(closures):
      for j, op in enumerate(ops):
        for _ in range(steps):
          t0 = time.perf_counter()
          op()
          samples[i][j].append((time.perf_counter() - t0) * 1e3)
  return [{op: statistics.median(samples[i][j]) for j, op in enumerate(names)} for i in range(len(rows))]


def profile_step(batch: int, bits: int, steps: int) -> dict:
  """Self CPU ms per step of one ResNet-20 train step: convolutions vs everything else."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from torch_resnet20 import make_train_step

  step = make_train_step(bits, batch)
  for _ in range(3):
    step()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    t0 = time.perf_counter()
    for _ in range(steps):
      step()
    wall = (time.perf_counter() - t0) * 1e3 / steps
  by_op = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}
  conv = sum(ms for name, ms in by_op.items() if "conv" in name)
  top = sorted(by_op.items(), key=lambda kv: -kv[1])[:12]
  return {
    "wall_ms_per_step_profiled": wall,
    "self_cpu_ms_conv": conv,
    "self_cpu_ms_rest": sum(by_op.values()) - conv,
    "top_ops_self_cpu_ms": dict(top),
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--qnet_json", required=True, help="a conv_speed.py --per_op result")
  p.add_argument("--setup", default="", help="qnet set-up to compare (default: its first)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
  p.add_argument("--profile_step", action="store_true", help="also split a train step's CPU time")
  p.add_argument("--bits", type=int, default=4, help="--profile_step: W/A bits")
  p.add_argument("--json", default=None)
  args = p.parse_args()
  if args.threads is not None:
    torch.set_num_threads(args.threads)
  with open(args.qnet_json) as f:
    qnet = json.load(f)
  setup = args.setup or next(iter(qnet["setups"]))
  if setup not in qnet["setups"]:
    p.error(f"--setup must be one of {sorted(qnet['setups'])}, got {setup!r}")
  rows, batch = qnet["shapes"], qnet["batch"]
  torch_ms = time_shapes(rows, batch, args.rounds, args.steps)
  print(f"torch {torch.__version__} threads={torch.get_num_threads()}; qnet set-up {setup}")
  print(
    "shape                  | torch fwd / dx / dw ms    | qnet fwd / dx / dw ms     | qnet/torch"
    f"         | torch {BOTH} | qnet dx + dw"
  )
  totals = {"torch": dict.fromkeys(OPS, 0.0), "qnet": dict.fromkeys(OPS, 0.0)}
  torch_both = 0.0
  out_rows = []
  for row, t in zip(rows, torch_ms):
    q = {op: row[setup][op]["median_ms"] for op in OPS}
    for op in OPS:
      totals["torch"][op] += row["count"] * t[op]
      totals["qnet"][op] += row["count"] * q[op]
    torch_both += row["count"] * t[BOTH]
    name = f"H{row['h']:<2d} {row['cin']:2d}->{row['cout']:2d} k{row['k']} s{row['stride']} x{row['count']}"
    print(
      f"{name:22s} | " + " / ".join(f"{t[op]:6.2f}" for op in OPS) + "  | "
      + " / ".join(f"{q[op]:6.2f}" for op in OPS) + "  | "
      + " / ".join(f"{q[op] / t[op]:4.2f}" for op in OPS)
      + f" | {t[BOTH]:11.2f} | {q['dx'] + q['dw']:6.2f}"
    )
    out_rows.append({k: row[k] for k in ("h", "cin", "cout", "k", "stride", "count")} | {
      "torch_ms": t, "qnet_ms": q
    })
  print("\nper ResNet-20 step (shapes weighted by count), ms:")
  for who, t in totals.items():
    print(f"  {who:5s} " + "  ".join(f"{op} {t[op]:6.1f}" for op in OPS) + f"  total {sum(t.values()):6.1f}")
  print(
    f"  torch fwd + {BOTH} in one call (as autograd): {totals['torch']['fwd'] + torch_both:6.1f}"
  )
  result = {
    "torch": torch.__version__,
    "threads": torch.get_num_threads(),
    "qnet_json": args.qnet_json,
    "qnet_setup": setup,
    "qnet_stack": qnet.get("stack"),
    "rounds": args.rounds,
    "steps": args.steps,
    "loadavg_start": os.getloadavg(),
    "shapes": out_rows,
    "per_step_ms": totals,
    "torch_fwd_plus_one_call_backward_ms": totals["torch"]["fwd"] + torch_both,
  }
  if args.profile_step:
    result["step_profile"] = profile_step(batch, args.bits, steps=5)
    sp = result["step_profile"]
    print(
      f"\ntorch W{args.bits}A{args.bits} train step (profiled, {sp['wall_ms_per_step_profiled']:.1f} ms wall): "
      f"self CPU conv {sp['self_cpu_ms_conv']:.1f} ms, rest {sp['self_cpu_ms_rest']:.1f} ms"
    )
    for name, ms in sp["top_ops_self_cpu_ms"].items():
      print(f"  {name:40s} {ms:7.1f}")
  result["loadavg_end"] = os.getloadavg()
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
