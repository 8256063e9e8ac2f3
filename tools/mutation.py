"""Mutation testing (mutmut 3) of the qnet modules a change touches, with test selection.

  python tools/mutation.py                      # modules changed since main (git diff main)
  python tools/mutation.py --base HEAD~3
  python tools/mutation.py --files qnet/deploy/packing.py --functions 'x_pack*'
  python tools/mutation.py --files qnet/train/joint.py --tests tests/test_step_rules.py

Too slow for CI (each mutant reruns the tests that reach its function, JAX start-up and
compiles included): a habit for the modules a change touches, before review. Needs the
`mutation` extra (`pip install -e .[mutation]`).

It works in a scratch copy of the tree (`--workdir`, default /tmp/qnet-mutation), never in
the checkout: mutmut writes a `mutants/` tree there, and its [tool.mutmut] settings are
generated per run (which files to mutate, which tests to run) into that copy's
pyproject.toml. Tests are selected by import: the test files that import a changed module,
plus changed test files, less the `slow` end-to-end ones; mutmut then runs, per mutant, only
those of them that reached the mutated function.

Report: killed / survived / no tests / timeout / suspicious counts, and each survivor's
name (`mutmut show NAME` in the workdir prints its diff). A survivor is a missing test or an
equivalent mutant: decide which, and write the test or say why in the change's notes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> list[str]:
  out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True)
  return [line for line in out.stdout.splitlines() if line]


def changed_files(base: str) -> list[str]:
  """qnet/ and tests/ Python files this branch changed since it left `base` (committed,
  staged or not) or added; not what `base` gained meanwhile."""
  fork_point = _git("merge-base", base, "HEAD")[0]
  files = _git("diff", "--name-only", fork_point, "--", "qnet", "tests")
  files += _git("ls-files", "--others", "--exclude-standard", "--", "qnet", "tests")
  return sorted({f for f in files if f.endswith(".py") and os.path.exists(os.path.join(ROOT, f))})


def module_name(path: str) -> str:
  return path[: -len(".py")].replace("/", ".").removesuffix(".__init__")


def tests_importing(modules: list[str]) -> list[str]:
  """Test files that import one of `modules` (`from a.b import c`, `from a.b.c import`,
  `import a.b.c`)."""
  found = []
  tests_dir = os.path.join(ROOT, "tests")
  for name in sorted(os.listdir(tests_dir)):
    if not (name.startswith("test_") and name.endswith(".py")):
      continue
    with open(os.path.join(tests_dir, name)) as f:
      text = f.read()
    for module in modules:
      package, _, leaf = module.rpartition(".")
      patterns = (
        rf"^from {re.escape(package)} import [^\n]*\b{re.escape(leaf)}\b",
        rf"^\s*from {re.escape(module)} import ",
        rf"^\s*import {re.escape(module)}\b",
      )
      if any(re.search(p, text, re.M) for p in patterns):
        found.append(f"tests/{name}")
        break
  return found


def copy_tree(workdir: str) -> None:
  """The checkout's files (tracked and untracked, not ignored) into a fresh `workdir`."""
  if os.path.exists(workdir):
    shutil.rmtree(workdir)
  for rel in _git("ls-files", "--cached", "--others", "--exclude-standard"):
    src = os.path.join(ROOT, rel)
    if os.path.isfile(src):
      dst = os.path.join(workdir, rel)
      os.makedirs(os.path.dirname(dst), exist_ok=True)
      shutil.copy2(src, dst)


def write_settings(
  workdir: str, files: list[str], tests: list[str], timeout_multiplier: float, debug: bool
) -> None:
  """mutmut's settings for this run, appended to the copy's pyproject.toml."""
  toml_list = lambda items: "[" + ", ".join(json.dumps(i) for i in items) + "]"
  settings = f"""

[tool.mutmut]
source_paths = ["qnet"]
# What the tests read besides qnet/ and tests/ (mutmut copies those two and setup.cfg).
also_copy = ["configs", "experiments", "docs", "README.md", "pytest.ini"]
only_mutate = {toml_list(files)}
pytest_add_cli_args_test_selection = {toml_list(tests)}
# -x: one failing test kills the mutant; slow end-to-end runs are left to the full suite.
pytest_add_cli_args = ["-x", "-m", "not slow", "-p", "no:cacheprovider"]
# JAX is not fork-safe once its backends run (its thread pools do not survive a fork):
# mutants fork from a server that has collected the tests (imports, no backend started).
process_isolation = "forkserver"
forkserver_warmup = "collect"
# CPU seconds: a mutant's run starts JAX and compiles its steps, which the per-test times
# of mutmut's stats do not count.
timeout_constant = 60.0
timeout_multiplier = {timeout_multiplier}
use_git_change_detection = false
debug = {str(debug).lower()}
"""
  with open(os.path.join(workdir, "pyproject.toml"), "a") as f:
    f.write(settings)


def summary(workdir: str) -> dict:
  """mutmut's counts (`mutmut export-cicd-stats`) and the survivors' names."""
  mutmut = os.path.join(os.path.dirname(sys.executable), "mutmut")
  subprocess.run([mutmut, "export-cicd-stats"], cwd=workdir, check=True, capture_output=True)
  with open(os.path.join(workdir, "mutants", "mutmut-cicd-stats.json")) as f:
    stats = json.load(f)
  out = subprocess.run([mutmut, "results"], cwd=workdir, capture_output=True, text=True)
  rows = [line.strip() for line in out.stdout.splitlines() if ":" in line]
  stats["not_killed"] = rows
  return stats


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--base", default="main", help="git ref to diff against (default main)")
  parser.add_argument("--files", nargs="*", help="qnet files to mutate (default: changed ones)")
  parser.add_argument("--tests", nargs="*", help="test files (default: those importing them)")
  parser.add_argument(
    "--functions",
    nargs="*",
    default=[],
    help="mutmut name globs to restrict to, e.g. 'x_topk_correct*' (module prefix added)",
  )
  parser.add_argument("--workdir", default="/tmp/qnet-mutation")
  parser.add_argument("--max-children", type=int, default=max(1, (os.cpu_count() or 2) // 2))
  parser.add_argument("--timeout-multiplier", type=float, default=2.0)
  parser.add_argument("--dry-run", action="store_true", help="print the selection and stop")
  parser.add_argument("--debug", action="store_true", help="mutmut's debug output (test logs)")
  args = parser.parse_args(argv)

  changed = changed_files(args.base) if args.files is None else []
  files = args.files if args.files is not None else [f for f in changed if f.startswith("qnet/")]
  files = [f for f in files if not f.endswith("__init__.py")]
  if not files:
    print(f"no qnet module changed since {args.base}: nothing to mutate")
    return 0
  modules = [module_name(f) for f in files]
  tests = args.tests
  if tests is None:
    tests = sorted(set(tests_importing(modules)) | {f for f in changed if f.startswith("tests/")})
  if not tests:
    print(f"no test imports {', '.join(modules)}: every mutant would survive; write tests first")
    return 1
  patterns = [f"{m}.{g}" for m in modules for g in args.functions]
  print(f"mutating {', '.join(files)}\n  tests: {' '.join(tests)}")
  if patterns:
    print(f"  mutants: {' '.join(patterns)}")
  if args.dry_run:
    return 0

  copy_tree(args.workdir)
  write_settings(args.workdir, files, tests, args.timeout_multiplier, args.debug)
  env = dict(os.environ)
  # One compilation cache with the test runs of the checkout: unmutated functions compile
  # from it (tests/conftest.py).
  env.setdefault("QNET_TEST_JAX_CACHE", os.path.join(ROOT, ".pytest_cache", "jax"))
  mutmut = os.path.join(os.path.dirname(sys.executable), "mutmut")
  run = [mutmut, "run", "--max-children", str(args.max_children), *patterns]
  code = subprocess.run(run, cwd=args.workdir, env=env).returncode
  stats = summary(args.workdir)
  print(json.dumps({k: v for k, v in stats.items() if k != "not_killed"}))
  for row in stats["not_killed"]:
    print(" ", row)
  print(f"(in {args.workdir}: `mutmut show NAME` prints a mutant's diff)")
  return code


if __name__ == "__main__":
  sys.exit(main())
