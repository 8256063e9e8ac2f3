"""The package tree shows the architecture, and imports only run downward in it.

quant, data and platform at the bottom, then models, then train, then deploy, then the entry
points (`qnet.main`, `qnet.export`, `qnet.evaluate`); no import cycle between modules.
"""

import ast
import pathlib

import pytest

QNET = pathlib.Path(__file__).parents[1] / "qnet"
ENTRY_POINTS = {"main", "export", "evaluate"}
# Each package and what it may import (besides itself).
ALLOWED = {
  "platform": set(),
  "quant": set(),
  "data": set(),
  "models": {"quant", "platform"},
  "train": {"quant", "data", "platform", "models"},
  "deploy": {"quant", "data", "platform", "models", "train"},
}


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in QNET.rglob("*.py"):
    parts = path.relative_to(QNET.parent).with_suffix("").parts
    out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  return out


def _qnet_imports(path: pathlib.Path, top_level_only: bool = False) -> set[str]:
  tree = ast.parse(path.read_text())
  nodes = tree.body if top_level_only else ast.walk(tree)
  found = set()
  for node in nodes:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qnet"):
      for alias in node.names:  # `from qnet.quant import precision` imports a module
        found.add(f"{node.module}.{alias.name}")
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.startswith("qnet"))
  return found


def _resolve(name: str, modules: dict[str, pathlib.Path]) -> str:
  while name not in modules:  # `qnet.quant.precision.HEAD` -> `qnet.quant.precision`
    name = name.rsplit(".", 1)[0]
  return name


def _package(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else "qnet"


def test_top_level_holds_only_the_entry_points():
  top = {p.stem for p in QNET.glob("*.py")} - {"__init__"}
  assert top == ENTRY_POINTS
  assert {p.name for p in QNET.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(ALLOWED)


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_package_says_what_lives_there(package):
  doc = ast.get_docstring(ast.parse((QNET / package / "__init__.py").read_text()))
  assert doc and 1 <= len(doc.splitlines()) <= 4


def test_imports_only_run_downward():
  modules = _modules()
  upward = []
  for module, path in modules.items():
    package = _package(module)
    if package == "qnet":
      continue  # the entry points may import anything
    for target in _qnet_imports(path):
      resolved = _resolve(target, modules)
      if resolved == "qnet":
        continue  # the root `__init__` (`__version__`) sits below everything
      other = _package(resolved)
      if other != package and other not in ALLOWED[package]:
        upward.append(f"{module} imports {target}")
  assert upward == []


def test_module_import_graph_has_no_cycle():
  modules = _modules()
  graph = {
    m: {_resolve(t, modules) for t in _qnet_imports(p, top_level_only=True)} - {m}
    for m, p in modules.items()
  }
  # A package's __init__ is imported by its modules' imports; ignore those edges.
  graph = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
  done, stack = set(), []

  def visit(m):
    if m in stack:
      raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m) :] + [m]))
    if m in done:
      return
    stack.append(m)
    for t in sorted(graph[m]):
      visit(t)
    stack.pop()
    done.add(m)

  for m in sorted(graph):
    visit(m)
