"""How long the survivor of a 2-process run takes to stop when its peer is lost.

Two `python -m qnet.main` processes (2 CPU devices each, gloo collectives, tiny_cnn on
Fashion-MNIST) train; at a given step one of them is lost, and we time until the other
exits and record how (exit status, its `qnet:` line or JAX's fatal line).

Scenarios:
  kill-worker       SIGKILL process 1 (the chief survives)
  kill-worker-save  SIGKILL process 1 right after a checkpoint step (the chief may be saving)
  kill-chief        SIGKILL process 0 (it also hosts the coordination service)
  stop-worker       SIGSTOP process 1: a silent host (no TCP reset), only heartbeats tell

Usage (repo root): PYTHONPATH=. python experiments/lost_host.py [--heartbeat 20]
  [--scenarios kill-worker,stop-worker] [--data_dir DIR]
Writes experiments/results/lost_host.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCENARIOS = ("kill-worker", "kill-worker-save", "kill-chief", "stop-worker")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(work: str, args, logs: str) -> list[subprocess.Popen]:
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      QNET_DISTRIBUTED="1",
      JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
      QNET_NUM_PROCESSES="2",
      QNET_PROCESS_ID=str(i),
      QNET_HEARTBEAT_TIMEOUT_S=str(args.heartbeat),
    )
    cmd = [
      sys.executable,
      "-m",
      "qnet.main",
      "--config=configs/fashion_mnist_w4a4.py",
      f"--workdir={work}",
      "--config.model=tiny_cnn",
      "--config.batch_size=8",
      "--config.num_train_steps=100000",
      "--config.eval_every_steps=100000",
      f"--config.checkpoint_every_steps={args.checkpoint_every}",
      "--config.log_every_steps=1",
      f"--config.data_dir={args.data_dir}",
    ]
    err = open(os.path.join(logs, f"p{i}.err"), "w")
    procs.append(
      subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    )
  return procs


def _last_step(work: str) -> int:
  path = os.path.join(work, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  steps = []
  with open(path) as f:
    for line in f:
      try:
        steps.append(json.loads(line).get("step", 0))
      except ValueError:
        pass
  return max(steps, default=0)


def run(scenario: str, args) -> dict:
  tmp = tempfile.mkdtemp(prefix=f"lost_host_{scenario}_")
  work = os.path.join(tmp, "w")
  procs = _launch(work, args, tmp)
  victim, survivor = (0, 1) if scenario == "kill-chief" else (1, 0)
  at = args.checkpoint_every * 2 if scenario == "kill-worker-save" else args.at_step
  try:
    while _last_step(work) < at:
      if any(p.poll() is not None for p in procs):
        raise RuntimeError(f"a process exited early; see {tmp}")
      time.sleep(0.02)
    lost_at_step = _last_step(work)
    procs[victim].send_signal(signal.SIGSTOP if scenario == "stop-worker" else signal.SIGKILL)
    t0 = time.time()
    try:
      status = procs[survivor].wait(timeout=args.wait)
    except subprocess.TimeoutExpired:
      status = None
    seconds = time.time() - t0
  finally:
    for p in procs:
      p.kill()
      p.wait()
  with open(os.path.join(tmp, f"p{survivor}.err"), errors="replace") as f:
    lines = f.read().splitlines()
  said = [l for l in lines if l.startswith("qnet: ")] or [
    l[l.index("] ") + 2 :] for l in lines if "Terminating process" in l and "] " in l
  ]
  return {
    "scenario": scenario,
    "heartbeat_timeout_s": args.heartbeat,
    "lost_at_step": lost_at_step,
    "survivor_exit_status": status,
    "survivor_exit_seconds": round(seconds, 2),
    "survivor_says": (said[0][:160] if said else ""),
    "logs": tmp,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--heartbeat", type=int, default=20)
  parser.add_argument("--scenarios", default=",".join(SCENARIOS))
  parser.add_argument("--at_step", type=int, default=10)
  parser.add_argument("--checkpoint_every", type=int, default=5)
  parser.add_argument("--wait", type=float, default=600, help="give up on the survivor after")
  parser.add_argument("--data_dir", default="", help="TFDS data_dir ('' = TFDS's default)")
  parser.add_argument("--out", default=os.path.join(ROOT, "experiments/results/lost_host.json"))
  args = parser.parse_args()
  rows = []
  for scenario in args.scenarios.split(","):
    rows.append(run(scenario, args))
    print(json.dumps(rows[-1]), flush=True)
  with open(args.out, "w") as f:
    json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
