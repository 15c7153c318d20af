"""No import cycle inside edgeforge/, imports inside functions included.

A cycle hidden by a function-level import still ties two modules together (one cannot be used,
tested or shipped without the other) and fails at import time the day someone hoists the import.
The graph is built from the source with ast (nothing is imported), so the test is fast and sees
every import, wherever it is written.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "edgeforge"


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(path: Path, name: str) -> str:
    return name if path.name == "__init__.py" else name.rpartition(".")[0]


def resolve(node: ast.ImportFrom, package: str) -> str:
    """The absolute module an ImportFrom names (relative levels resolved against `package`)."""
    if node.level == 0:
        return node.module or ""
    base = package.split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_modules(path: Path, modules: set[str], package_dir: Path = PACKAGE_DIR) -> set[str]:
    """Every edgeforge module the file imports, at any depth (functions, try blocks, TYPE_CHECKING
    excluded: those imports never run)."""
    name = module_name(path, package_dir)
    package = package_of(path, name)
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = resolve(node, package)
            # `from . import x` imports the submodule x when there is one, else a name of the package
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] == "edgeforge":
                found.update(_with_parent_packages(_owning_module(target, modules), name))
    found.discard(None)
    found.discard(name)
    return found


def _with_parent_packages(module: str | None, importer: str) -> list[str]:
    """Importing a.b.c runs a/__init__ and a/b/__init__ first: those are imported too, except the
    importer's own parent packages (already running when it runs)."""
    if module is None:
        return []
    parts = module.split(".")
    chain = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return [m for m in chain if not importer.startswith(m + ".")]


def _runtime_nodes(tree: ast.AST):
    """Walk the tree, leaving out `if TYPE_CHECKING:` bodies (annotations only; never executed)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _owning_module(dotted: str, modules: set[str]) -> str | None:
    while dotted and dotted not in modules:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE_DIR.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imported_modules(f, modules) for f in files}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each as one concrete cycle."""
    edges = graph
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(_one_cycle(sorted(component), edges))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return components


def _one_cycle(component: list[str], edges: dict[str, set[str]]) -> list[str]:
    """A shortest path from the component's first module back to itself, for the message."""
    members = set(component)
    start = component[0]
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component


def test_no_import_cycle_in_edgeforge():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_graph_sees_imports_inside_functions(tmp_path):
    """The detector itself: a cycle made only by a function-level import is found and named."""
    graph = {"edgeforge.a": {"edgeforge.b"}, "edgeforge.b": {"edgeforge.a"}, "edgeforge.c": set()}
    assert find_cycles(graph) == [["edgeforge.a", "edgeforge.b", "edgeforge.a"]]
    source = "def f():\n    from .b import thing\n"  # only inside a function
    (tmp_path / "edgeforge").mkdir()
    path = tmp_path / "edgeforge" / "a.py"
    path.write_text(source)
    found = imported_modules(path, {"edgeforge.a", "edgeforge.b"}, tmp_path / "edgeforge")
    assert found == {"edgeforge.b"}


@pytest.mark.parametrize("module", ["edgeforge.toolchains", "edgeforge.model.loader"])
def test_graph_knows_the_modules(module):
    assert module in import_graph()
