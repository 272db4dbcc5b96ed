"""No arrow back up: the import graph of tapo_jax, read from the source with `ast` (imports at
module level and inside functions both count), has no cycle between rooms (a subpackage or a
top-level module) and none between modules."""

from __future__ import annotations

import ast
import pathlib

import tapo_jax

ROOT = pathlib.Path(tapo_jax.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
  """{dotted name: file} of every module of tapo_jax (a package by its __init__.py)."""
  mods = {}
  for path in ROOT.rglob("*.py"):
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    mods[".".join(parts)] = path
  return mods


def _imported(node, package: str, mods) -> list[str]:
  """The tapo_jax modules an import statement names (`from P import m`: P.m when m is a module,
  else P)."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  else:
    base = node.module or ""
    if node.level:
      up = package.split(".")[: len(package.split(".")) - node.level + 1]
      base = ".".join(up + ([base] if base else []))
    names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
  out = []
  for name in names:
    while name and name not in mods:  # `import tapo_jax.x.Name`-style: the longest module prefix
      name = name.rpartition(".")[0]
    if name.startswith("tapo_jax"):
      out.append(name)
  return out


def module_graph() -> dict[str, set[str]]:
  """{module: the tapo_jax modules it imports}."""
  mods = _modules()
  graph = {m: set() for m in mods}
  for name, path in mods.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        graph[name].update(m for m in _imported(node, package, mods) if m != name)
  return graph


def room(module: str) -> str | None:
  """tapo_jax.<room>[.…]; None for the tapo_jax package itself (its __init__ imports nothing)."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else None


def room_graph() -> dict[str, set[str]]:
  """{room: the other rooms it imports from}."""
  graph: dict[str, set[str]] = {}
  for a, targets in module_graph().items():
    if room(a) is None:
      continue
    graph.setdefault(room(a), set())
    graph[room(a)].update(room(b) for b in targets if room(b) not in (None, room(a)))
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle [a, b, …, a] of `graph`, None when it is acyclic (iterative depth-first search)."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  for start in sorted(graph):
    if start in state:
      continue
    path, stack = [start], [iter(sorted(graph[start]))]
    state[start] = 1
    while stack:
      nxt = next(stack[-1], None)
      if nxt is None:
        state[path.pop()] = 2
        stack.pop()
      elif state.get(nxt) == 1:
        return path[path.index(nxt) :] + [nxt]
      elif nxt not in state:
        state[nxt] = 1
        path.append(nxt)
        stack.append(iter(sorted(graph.get(nxt, ()))))
  return None


def _package_names(path: pathlib.Path, mods) -> set[str]:
  """The names a package's __init__ binds to something other than one of its submodules."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.ImportFrom):
      names.update(a.asname or a.name for a in node.names if f"{node.module}.{a.name}" not in mods)
    elif isinstance(node, ast.FunctionDef | ast.ClassDef):
      names.add(node.name)
    elif isinstance(node, ast.Assign):
      names.update(t.id for t in node.targets if isinstance(t, ast.Name))
  return names


def test_no_import_names_a_submodule_that_its_package_shadows():
  """`from tapo_jax.eval import evaluate` is eval/__init__'s evaluate() function, not the module
  eval/evaluate.py: inside the package, such a name is imported from the module that defines it."""
  mods = _modules()
  shadowed = {m: _package_names(p, mods) for m, p in mods.items() if p.name == "__init__.py"}
  bad = []
  for path in mods.values():
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.ImportFrom) and not node.level and node.module in shadowed:
        bad += [
          f"{path.name}:{node.lineno}: from {node.module} import {a.name}"
          for a in node.names
          if f"{node.module}.{a.name}" in mods and a.name in shadowed[node.module]
        ]
  assert not bad, "imports of a submodule its package's __init__ shadows:\n" + "\n".join(bad)


def test_find_cycle_finds_a_cycle_through_a_third():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_function_level_and_relative_imports():
  graph = module_graph()
  assert "tapo_jax.train.loop" in graph["tapo_jax.main"]  # imported inside _dispatch
  assert "tapo_jax.tapo.batch" in graph["tapo_jax.tapo"]
  assert {"train", "eval", "sampling", "models"} <= set(room_graph())


def test_rooms_import_each_other_without_a_cycle():
  cycle = find_cycle(room_graph())
  assert cycle is None, "rooms import each other in a cycle: " + " -> ".join(cycle)


def test_no_module_imports_one_that_imports_it():
  cycle = find_cycle(module_graph())
  assert cycle is None, "modules import each other in a cycle: " + " -> ".join(cycle)
