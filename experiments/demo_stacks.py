"""The default demo on several Python/JAX stacks, back to back: accuracy, wall and CPU time.

  python experiments/demo_stacks.py --python /work/venv313/bin/python \
    --python /work/venv311/bin/python

Runs `python -m qnet.main --config=configs/fashion_mnist_w4a4.py` (the embedded default,
Fashion-MNIST offline) once per `--python`, one after the other (`--repeats` times in turn),
each in a fresh workdir, from this checkout. Records each run's final test accuracy (its metrics.jsonl), wall time,
CPU time (user + sys of the child), the stack (python, jax, jaxlib) and the load average,
in experiments/results/demo_stacks_cpu.json. `--config_args` passes overrides
(e.g. `--config.num_epochs=1` for a quick check).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
from qnet.train import metrics_io  # noqa: E402  (reads metrics.jsonl; no JAX needed)

_STACK = (
  "import json, platform, jax, jaxlib; print(json.dumps({'python': platform.python_version(), "
  "'jax': jax.__version__, 'jaxlib': jaxlib.__version__}))"
)


def _stack(python: str, env: dict) -> dict:
  out = subprocess.run([python, "-c", _STACK], env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def run_demo(python: str, workdir: str, config: str, config_args: list[str]) -> dict:
  """One `qnet.main` run: final test accuracy, wall and child CPU seconds, the stack."""
  pythonpath = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
  env = {**os.environ, "PYTHONPATH": pythonpath}
  stack = _stack(python, env)
  cmd = [python, "-m", "qnet.main", f"--config={config}", f"--workdir={workdir}", *config_args]
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  load = [round(x, 2) for x in os.getloadavg()]
  t = time.perf_counter()
  subprocess.run(cmd, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
  wall = time.perf_counter() - t
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  rows = metrics_io.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  evals = [r for r in rows if "eval_accuracy" in r]
  return {
    **stack,
    "executable": python,
    "QNET_CPU_MALLOC": os.environ.get("QNET_CPU_MALLOC"),  # unset: qnet.platform.host_memory is on
    "test_accuracy": evals[-1]["eval_accuracy"],
    "wall_s": wall,
    "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
    "loadavg_start": load,
    "loadavg_end": [round(x, 2) for x in os.getloadavg()],
  }


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument(
    "--python", action="append", required=True, help="a Python with qnet's dependencies; repeat"
  )
  p.add_argument("--repeats", type=int, default=1, help="alternations of the --python list")
  p.add_argument("--config", default="configs/fashion_mnist_w4a4.py")
  p.add_argument("--config_args", nargs="*", default=[], help="e.g. --config.num_epochs=1")
  p.add_argument("--out", default=os.path.join(HERE, "results", "demo_stacks_cpu.json"))
  args = p.parse_args()
  for exe in args.python:
    if not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
      print(f"--python: {exe} is not an executable file", file=sys.stderr)
      sys.exit(2)
  runs = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, exe in enumerate(args.python * args.repeats):
      r = run_demo(exe, os.path.join(tmp, str(i)), args.config, args.config_args)
      runs.append(r)
      print(
        f"python {r['python']} jax {r['jax']}: test accuracy {r['test_accuracy']:.4f}, "
        f"wall {r['wall_s']:.1f} s, CPU {r['cpu_s']:.1f} s (load {r['loadavg_start']})",
        flush=True,
      )
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"config": args.config, "config_args": args.config_args, "runs": runs}, f, indent=1)
    f.write("\n")


if __name__ == "__main__":
  main()
