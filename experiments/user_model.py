"""The README's own Flax model (`my_cnn.Net`, quantized by rules) against the same network in
qnet's layers (issue 25's closing figures):

  python experiments/user_model.py                  # step times, alternating, then the run
  python experiments/user_model.py --skip_run       # step times only

1. Step time: the W4A4 train step (batch 128, Fashion-MNIST shapes) of `my_cnn:Net` and of
   `QnetNet` below, built by the training loop's own functions (`build.build_specs`,
   `build.compile_steps`), timed in alternating rounds in one process (`benchmark.Timer`).
   Before timing, both networks get the same parameters and must give the same W4A4 logits.
2. The README's run as written (`--config.model=my_cnn:Net --config.schedule.kind=progressive`,
   3 epochs on Fashion-MNIST), exported and evaluated: fake-quant vs integer test accuracy
   and the number of images whose top-1 differs, per path (`python -m qnet.evaluate --json`).

`my_cnn.py` is the README's block itself, written to experiments/runs/user_model/. Writes
experiments/results/user_model.json (with the CPU's flags).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT, os.path.join(ROOT, "tests")]
RUN_DIR = os.path.join(ROOT, "experiments", "runs", "user_model")
os.makedirs(RUN_DIR, exist_ok=True)
sys.path.insert(0, RUN_DIR)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import benchmark  # noqa: E402  (experiments/benchmark.py: Timer, the step closure)
from test_configs import readme_module  # noqa: E402  (the README's `# my_cnn.py` block)

from configs import fashion_mnist_w4a4  # noqa: E402
from qnet import models  # noqa: E402
from qnet.models import layers  # noqa: E402
from qnet.deploy.runtimes import cpu_flags  # noqa: E402
from qnet.quant import precision  # noqa: E402
from qnet.train import build, joint  # noqa: E402

with open(os.path.join(RUN_DIR, "my_cnn.py"), "w") as f:
  f.write(readme_module("my_cnn"))


class QnetNet(nn.Module):
  """`my_cnn.Net` in qnet's own layers, written the qnet way: a quantized conv's input
  quantizer is its ReLU, so a ReLU is applied only where a value is also used in float."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=True):
    bn = lambda i: nn.BatchNorm(use_running_average=not train, name=f"BatchNorm_{i}")
    x = nn.relu(bn(0)(layers.QuantConv(32, quantize_input=False, name="Conv_0")(x)))
    x = nn.max_pool(x, (2, 2), (2, 2))
    y = bn(1)(layers.QuantConv(32, name="Conv_1")(x))
    x = nn.relu(bn(2)(layers.QuantConv(32, name="Conv_2")(y)) + x)
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(bn(3)(layers.QuantConv(64, name="Conv_3")(x)))
    return nn.Dense(self.num_classes, name="Dense_0")(x.mean((1, 2)))


USER, TWIN = "my_cnn:Net", "user_model:QnetNet"
SHAPE = (28, 28, 1)


def _precision(model, x):
  """W4A4 with the first conv at 32 bits, as the user model's default rules have it (the
  twin's layout also holds `Conv_0`, and its last entry is `Conv_3`, not the dense)."""
  layout = precision.layout_of(model, x)
  bits = jnp.asarray([32.0 if p == ("Conv_0",) else 4.0 for p in layout.paths])
  return layout.tree(bits, bits)


def check_same_function() -> float:
  """Both networks on the user model's initial parameters at W4A4: max |logit difference|."""
  x = jax.random.normal(jax.random.key(1), (8, *SHAPE))
  user, twin = models.create_model(USER, 10), models.create_model(TWIN, 10)
  v = user.init(jax.random.key(0), x[:1], train=False)
  logits = []
  for m in (user, twin):
    variables = {"params": v["params"], "batch_stats": v["batch_stats"], "precision": _precision(m, x[:1])}
    logits.append(np.asarray(m.apply(variables, x, train=False)))
  diff = float(np.abs(logits[0] - logits[1]).max())
  if diff > 1e-4 * float(np.abs(logits[0]).max()):
    raise SystemExit(f"the twin is not the same network: max |logit diff| {diff}")
  return diff


def time_steps(rounds: int, steps: int) -> dict:
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  benchmark.SHAPES[USER] = benchmark.SHAPES[TWIN] = benchmark.SHAPES["fmnist_cnn"]
  timer = benchmark.Timer()
  for name in (USER, TWIN):
    c = fashion_mnist_w4a4.get_config()
    c.model, c.batch_size = name, benchmark.BATCH
    state, p_train, _ = benchmark._steps(c, 1000, mesh)
    batch = benchmark._batch(name, mesh)
    timer.add(name, benchmark._train_closure(state, p_train, batch))
  timer.run(rounds, steps, warmup=5)
  out = {name: timer.stats(name) for name in (USER, TWIN)}
  per_round = np.array(out[USER]["round_medians_ms"]) / np.array(out[TWIN]["round_medians_ms"])
  out["ratio_user_over_twin"] = float(out[USER]["median_ms"] / out[TWIN]["median_ms"])
  out["ratio_per_round"] = per_round.tolist()
  return out


def _run(cmd: list[str], log: str) -> None:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([RUN_DIR, ROOT, os.environ.get("PYTHONPATH", "")]))
  with open(log, "a") as f:
    code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
  if code:
    raise SystemExit(f"{' '.join(cmd)} failed ({code}); see {log}")


def readme_run() -> dict:
  """The README's command, its export and evaluation (each step resumes / is skipped if done)."""
  work, out, js = (os.path.join(RUN_DIR, d) for d in ("run", "export", "evaluate.json"))
  log = os.path.join(RUN_DIR, "log.txt")
  py = sys.executable
  _run([py, "-m", "qnet.main", "--config=configs/fashion_mnist_w4a4.py", f"--config.model={USER}",
        "--config.schedule.kind=progressive", f"--workdir={work}"], log)
  if not os.path.exists(os.path.join(out, "manifest.json")):
    _run([py, "-m", "qnet.export", f"--workdir={work}", f"--out={out}"], log)
  if not os.path.exists(js):
    _run([py, "-m", "qnet.evaluate", f"--export={out}", f"--json={js}"], log)
  with open(js) as f:
    return json.load(f)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=8)
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--skip_run", action="store_true")
  args = ap.parse_args()
  result = {
    "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(), "cpu_flags": cpu_flags(),
                "load_avg_start": os.getloadavg()},
    "jax": jax.__version__,
    "same_function_max_logit_diff": check_same_function(),
    "step_times": time_steps(args.rounds, args.steps),
  }
  result["machine"]["load_avg_after_timing"] = os.getloadavg()
  if not args.skip_run:
    result["readme_run"] = readme_run()
  path = os.path.join(ROOT, "experiments", "results", "user_model.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  st = result["step_times"]
  print(f"W4A4 train step, batch {benchmark.BATCH}: {USER} {st[USER]['median_ms']:.2f} ms, "
        f"{TWIN} {st[TWIN]['median_ms']:.2f} ms, ratio {st['ratio_user_over_twin']:.3f} "
        f"(per round {min(st['ratio_per_round']):.3f}..{max(st['ratio_per_round']):.3f})")
  if "readme_run" in result:
    print(json.dumps(result["readme_run"], indent=1)[:2000])
  print("wrote", path)


if __name__ == "__main__":
  main()
