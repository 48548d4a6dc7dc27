"""The package's import graph: no cycles, and imports at module level (a reader sees a module's dependencies
in its first lines; a function-local import hides a cycle until some code path runs it)."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mmr_jax"

# Heavy or optional dependencies a module may import where it uses them, so importing the module stays cheap
# and works without them (TensorFlow-land, ScaNN, plotting, Beam, TensorBoard).
OPTIONAL = ("tensorflow", "tensorflow_text", "scann", "matplotlib", "apache_beam", "flax.metrics.tensorboard",
            "jax.experimental.jax2tf", "bm25s")


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    out[name] = path
  return out


def _imported(node: ast.AST, current: str, modules) -> list[str]:
  """Returns the module names an Import / ImportFrom node names (submodules resolved where they exist)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  base = node.module or ""
  if node.level:
    pkg = current.split(".")
    pkg = pkg[:len(pkg) - node.level + (1 if modules[current].name == "__init__.py" else 0)]
    base = ".".join(pkg + ([base] if base else []))
  names = []
  for a in node.names:
    full = f"{base}.{a.name}"
    names.append(full if full in modules or not base.startswith("mmr_jax") else base)
  return names


def _graph():
  modules = _modules()
  edges, local = {}, []
  for name, path in modules.items():
    tree = ast.parse(path.read_text(), str(path))
    deps = set()
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
      if not isinstance(node, (ast.Import, ast.ImportFrom)):
        continue
      targets = _imported(node, name, modules)
      at_top = id(node) in top or any(id(node) in set(map(id, ast.walk(t))) for t in tree.body
                                      if isinstance(t, (ast.If, ast.Try)))
      if at_top:
        deps.update(t for t in targets if t.startswith("mmr_jax") and t in modules and t != name)
      elif not all(t.startswith(OPTIONAL) for t in targets):
        local.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {', '.join(targets)}")
    edges[name] = deps
  return edges, local


def test_no_function_local_imports_except_optional_dependencies():
  _, local = _graph()
  assert not local, "function-local imports (move them to the top of the module):\n" + "\n".join(local)


def test_no_import_cycles():
  edges, _ = _graph()
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in edges.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        cycles.append(sorted(comp))

  for v in edges:
    if v not in index:
      visit(v)
  assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("lib,driver", [("mmr_jax.evaluate", "mmr_jax.train"), ("mmr_jax.evals.retrieval", "mmr_jax.train"),
                                        ("mmr_jax.models.two_tower", "mmr_jax.data.pipeline")])
def test_library_modules_do_not_import_their_drivers(lib, driver):
  edges, _ = _graph()
  seen, todo = set(), [lib]
  while todo:
    m = todo.pop()
    for d in edges.get(m, ()):
      if d not in seen:
        seen.add(d)
        todo.append(d)
  assert driver not in seen, f"{lib} imports {driver} (directly or through {sorted(seen)})"
