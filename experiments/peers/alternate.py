"""qnet against the PyTorch peer, ResNet-20 W4A4 train step on CPU, back to back.

  python experiments/peers/alternate.py --torch_python /work/venv-torch/bin/python \
    --qnet_python /work/venv311/bin/python --qnet_python /work/venv313/bin/python

Each alternation runs `torch_resnet20.py` and then qnet's `benchmark.py` (ResNet-20, W4A4 only,
or plain FP with `--bits 32`) once under every `--qnet_python` (default: this Python), each as
its own process, so PyTorch and every qnet stack (e.g. jax 0.10.2 on Python 3.11 and jax 0.12
on Python 3.13) see the same machine state; `--alternations` times in turn. Each process
reports the median ms of its timed steps (after warm-up; qnet's compile is not timed). qnet
runs from this checkout (PYTHONPATH) whatever the Python. Prints each alternation and the
ratio of medians, and writes experiments/results/peer_resnet20_cpu.json with the versions of
every stack (python, jax, jaxlib; torch), the page faults per step of every process and the
load average before and after. `--torch_keep_freed_memory` also times PyTorch, each
alternation, started with glibc malloc set as qnet sets it on CPU (`qnet.platform.host_memory`), so
the ratio can be read against PyTorch with the same allocator settings as well.
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
sys.path.insert(0, ROOT)
from qnet.platform.host_memory import GLIBC_ENV  # noqa: E402  (stdlib-only module)


def _torch(python: str, bits: int, steps: int, warmup: int, path: str, env=None) -> dict:
  cmd = [python, os.path.join(HERE, "torch_resnet20.py"), "--bits", str(bits)]
  cmd += ["--steps", str(steps), "--warmup", str(warmup), "--json", path]
  subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=env)
  with open(path) as f:
    return json.load(f)


def _qnet(python: str, bits: int, steps: int, warmup: int, path: str) -> dict:
  variant = "w4a4" if bits == 4 else "fp_plain"
  cmd = [python, os.path.join(ROOT, "experiments", "benchmark.py"), "--models", "resnet20"]
  cmd += ["--variants", variant, "--rounds", "1", "--steps", str(steps), "--warmup", str(warmup)]
  cmd += ["--skip_pipeline", "--skip_compile_count", "--out", path]
  pythonpath = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
  env = {**os.environ, "PYTHONPATH": pythonpath}
  subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=env)
  with open(path) as f:
    r = json.load(f)
  return {
    "median_ms": r["models"]["resnet20"][variant]["median_ms"],
    "page_faults": r["models"]["resnet20"][variant].get("median_page_faults"),
    "stack": {
      "python": r.get("python"),
      "jax": r["jax"],
      "jaxlib": r.get("jaxlib"),
      "keep_freed_memory": r.get("keep_freed_memory"),
    },
  }


def _label(stack: dict, exe: str, taken: dict[str, str]) -> str:
  """"qnet pyX jaxY", with the executable added if another Python has the same stack."""
  label = f"qnet py{stack['python']} jax{stack['jax']}"
  return f"{label} ({exe})" if label in taken.values() else label


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--torch_python", default="/tmp/torchvenv/bin/python")
  p.add_argument(
    "--qnet_python",
    action="append",
    default=None,
    help="a Python with qnet's dependencies; repeat to alternate stacks (default: this one)",
  )
  p.add_argument(
    "--torch_keep_freed_memory",
    action="store_true",
    help="also time PyTorch, each alternation, with glibc malloc set as qnet sets it on CPU "
    "(qnet.platform.host_memory.GLIBC_ENV)",
  )
  p.add_argument("--alternations", type=int, default=3)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--bits", type=int, default=4, choices=(4, 32))
  p.add_argument(
    "--out", default=os.path.join(ROOT, "experiments", "results", "peer_resnet20_cpu.json")
  )
  args = p.parse_args()
  pythons = args.qnet_python or [sys.executable]
  named = [("--torch_python", args.torch_python)] + [("--qnet_python", q) for q in pythons]
  for name, exe in named:
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
      print(f"{name}: {exe} is not an executable file", file=sys.stderr)
      sys.exit(2)
  if args.alternations < 1 or args.steps < 1:
    print("--alternations and --steps must be >= 1", file=sys.stderr)
    sys.exit(2)

  load_start = [round(x, 2) for x in os.getloadavg()]
  print(f"load average {load_start}", flush=True)
  rows, stacks, torch_info, labels = [], {}, {}, {}
  with tempfile.TemporaryDirectory() as tmp:
    for i in range(args.alternations):
      t = _torch(args.torch_python, args.bits, args.steps, args.warmup, os.path.join(tmp, "t.json"))
      torch_info = {"torch": t["torch"], "threads": t["threads"], "executable": args.torch_python}
      row = {"torch_ms": t["median_ms"], "torch_page_faults": t.get("median_page_faults")}
      if args.torch_keep_freed_memory:
        env = {**os.environ, **GLIBC_ENV}
        k = _torch(
          args.torch_python, args.bits, args.steps, args.warmup, os.path.join(tmp, "t.json"), env
        )
        row["torch_kept_ms"] = k["median_ms"]
        row["torch_kept_page_faults"] = k.get("median_page_faults")
      row["qnet_ms"], row["qnet_page_faults"] = {}, {}
      for exe in pythons:
        q = _qnet(exe, args.bits, args.steps, args.warmup, os.path.join(tmp, "q.json"))
        label = labels.setdefault(exe, _label(q["stack"], exe, labels))
        stacks[label] = {**q["stack"], "executable": exe}
        row["qnet_ms"][label], row["qnet_page_faults"][label] = q["median_ms"], q["page_faults"]
      row["ratio"] = {k: v / row["torch_ms"] for k, v in row["qnet_ms"].items()}
      rows.append(row)
      cells = ", ".join(
        f"{k} {v:.1f} ms ({row['ratio'][k]:.3f})" for k, v in row["qnet_ms"].items()
      )
      kept = f", torch kept {row['torch_kept_ms']:.1f} ms" if "torch_kept_ms" in row else ""
      print(f"alternation {i + 1}: torch {row['torch_ms']:.1f} ms{kept}, {cells}", flush=True)
  t_med = float(np.median([r["torch_ms"] for r in rows]))
  q_med = {k: float(np.median([r["qnet_ms"][k] for r in rows])) for k in stacks}
  kept_med = (
    float(np.median([r["torch_kept_ms"] for r in rows])) if args.torch_keep_freed_memory else None
  )
  load_end = [round(x, 2) for x in os.getloadavg()]
  print(f"median over alternations (load average now {load_end}): torch {t_med:.1f} ms")
  if kept_med is not None:
    print(f"  torch with qnet's glibc malloc settings: {kept_med:.1f} ms")
  for k, v in q_med.items():
    vs_kept = f", over torch with the same malloc {v / kept_med:.3f}" if kept_med else ""
    print(f"  {k}: {v:.1f} ms, qnet/torch {v / t_med:.3f}{vs_kept}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(
      {
        "bits": args.bits,
        "batch": 128,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch": torch_info,
        "stacks": stacks,
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "alternations": rows,
        "torch_median_ms": t_med,
        "qnet_median_ms": q_med,
        "ratio_qnet_over_torch": {k: v / t_med for k, v in q_med.items()},
        "torch_kept_median_ms": kept_med,
        "torch_kept_env": GLIBC_ENV if kept_med is not None else None,
        "ratio_qnet_over_torch_kept": (
          {k: v / kept_med for k, v in q_med.items()} if kept_med is not None else None
        ),
      },
      f,
      indent=1,
    )


if __name__ == "__main__":
  main()
