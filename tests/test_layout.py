"""The library's layout: no import cycle (function-local imports included), small modules,
and every module on the design map."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = os.path.join(ROOT, "cfgdiff")
MAX_LINES = 400
LONG_MODULE_REASON = "Over 400 lines on purpose:"


def _modules() -> dict[str, str]:
  """Dotted module name -> path, for every module of the library."""
  found = {}
  for folder, _, names in os.walk(LIBRARY):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        found[dotted.removesuffix(".__init__")] = path
  return found


def import_graph(modules: dict[str, str]) -> dict[str, set[str]]:
  """Module -> the library modules it imports anywhere in its body (top-level or not)."""
  graph = {}
  for name, path in modules.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    targets = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        for alias in node.names:  # `from cfgdiff import x` imports cfgdiff.x when it exists
          submodule = f"{node.module}.{alias.name}"
          targets.add(submodule if submodule in modules else node.module)
      elif isinstance(node, ast.Import):
        targets.update(alias.name for alias in node.names)
    graph[name] = {t for t in targets if t in modules and t != name and t != "cfgdiff"}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as a path [a, b, ..., a], or None."""
  state: dict[str, str] = {}  # "open" while on the current path, "done" after

  def visit(node: str, path: list[str]) -> list[str] | None:
    state[node] = "open"
    for target in sorted(graph[node]):
      if state.get(target) == "open":
        return path[path.index(target):] + [target]
      if target not in state:
        cycle = visit(target, path + [target])
        if cycle:
          return cycle
    state[node] = "done"
    return None

  for start in sorted(graph):
    if start not in state:
      cycle = visit(start, [start])
      if cycle:
        return cycle
  return None


def test_find_cycle_finds_a_cycle_and_only_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set(), "d": {"d"}}) == ["d", "d"]


def test_the_library_has_no_import_cycle():
  modules = _modules()
  graph = import_graph(modules)
  assert graph["cfgdiff.train"] >= {"cfgdiff.kernel_choice", "cfgdiff.sources"}  # sees imports
  assert "cfgdiff.evaluation.inception" in graph["cfgdiff.evaluation.references"]  # local ones
  assert find_cycle(graph) is None


def test_long_modules_state_why_at_their_top():
  for name, path in _modules().items():
    with open(path) as f:
      text = f.read()
    if text.count("\n") > MAX_LINES:
      docstring = ast.get_docstring(ast.parse(text)) or ""
      assert LONG_MODULE_REASON in docstring, (
          f"{name} has {text.count(chr(10))} lines: split it, or say why at its top")


def test_every_module_is_on_the_design_map():
  with open(os.path.join(ROOT, "docs", "design.md")) as f:
    design = f.read()
  for path in _modules().values():
    relative, base = os.path.relpath(path, ROOT), os.path.basename(path)
    if base == "__init__.py":
      continue
    named = (f"`{relative}`", f"`{base}`", f"`{base[:-3]}`")  # as a row, or in a package's row
    assert any(name in design for name in named), f"{relative} is not in docs/design.md"
