"""The package's import graph, read with ``ast`` (nothing is imported): no import circles, and no
arrow from ``adaptertools.kernels`` up to the layers that use it.

Every ``import`` / ``from ... import`` statement of every module counts, wherever it stands: at
module level, inside a function (lazy imports), in a ``try:`` or any other block, EXCEPT under
``if TYPE_CHECKING:`` (such imports never run; they are the usual way to keep type hints without
a circle). ``importlib.import_module`` calls (``adaptertools/__init__``'s lazy ``__getattr__``)
are not seen.
Relative imports are resolved against the module's package. ``from pkg import name`` is an edge to
``pkg.name`` when that is a module of the package, else to ``pkg`` itself (its ``__init__``).
Importing ``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``; those implicit edges are not
counted (a package's ``__init__`` that imports its children would otherwise make every child that
imports a sibling a circle), only the module named.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "adaptertools"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

# kernels are the bottom layer: they must not import any of these
ABOVE_KERNELS = (f"{PACKAGE}.merging", f"{PACKAGE}.api", f"{PACKAGE}.validation",
                 f"{PACKAGE}.formats")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the package (packages by __init__)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """Package modules ``module`` imports -> line of the first such import."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if target != module and target in modules:
            found.setdefault(target, line)

    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                skipped.update(id(n) for n in ast.walk(child))
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                name = alias.name
                # "import a.b.c" binds a, but runs a.b.c: the module named is the edge
                while name and name not in modules and "." in name:
                    name = name.rsplit(".", 1)[0]
                if name.split(".")[0] == PACKAGE:
                    add(name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                source = _resolve_relative(module, is_package, node.level, node.module)
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in modules:
                    add(sub, node.lineno)
                else:
                    add(source, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    modules = module_files()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (or a self-loop), each as
    one concrete circle through it (Tarjan, then a shortest path back to the start)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:   # iterative enough for a package this size
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                strongconnect(w)
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
            if len(component) > 1 or v in graph.get(v, {}):
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)

    cycles = []
    for component in sorted(components):
        members = set(component)
        start = component[0]
        # breadth-first from start's successors back to start, inside the component
        paths = {w: [start, w] for w in sorted(graph[start]) if w in members}
        queue = list(paths)
        cycle = None
        while queue and cycle is None:
            node = queue.pop(0)
            if node == start:
                cycle = paths[node]
                break
            for w in sorted(graph[node]):
                if w in members and w not in paths:
                    paths[w] = paths[node] + [w]
                    queue.append(w)
                    if w == start:
                        cycle = paths[w]
                        break
        if start in graph[start]:
            cycle = [start, start]
        cycles.append({"modules": component, "cycle": cycle})
    return cycles


def describe_cycles(cycles, graph=None) -> str:
    """One line per circle; with ``graph``, also every import edge inside its modules (the
    arrows one of which must go for the circle to break), with its line number."""
    lines = []
    for c in cycles:
        lines.append(f"{len(c['modules'])} modules in a circle: " + " -> ".join(c["cycle"] or []))
        if len(c["modules"]) > len(c["cycle"] or []) - 1:
            lines.append("    (all of: " + ", ".join(c["modules"]) + ")")
        if graph is not None:
            members = set(c["modules"])
            for m in c["modules"]:
                for t, line in sorted(graph[m].items()):
                    if t in members:
                        lines.append(f"      {m}:{line} -> {t}")
    return "\n".join(lines)


def kernel_violations(graph) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        if not (module == f"{PACKAGE}.kernels" or module.startswith(f"{PACKAGE}.kernels.")):
            continue
        for target, line in sorted(targets.items()):
            if any(target == up or target.startswith(up + ".") for up in ABOVE_KERNELS):
                bad.append(f"{module} (line {line}) imports {target}")
    return bad


# ----------------------------------------------------------------------------- the checker itself

def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_checker_sees_lazy_relative_and_from_imports(tmp_path):
    """The checker, on a made-up package: a lazy relative import closing a circle is found."""
    _write(tmp_path, {
        f"{PACKAGE}/__init__.py": "",
        f"{PACKAGE}/a.py": "from . import b\n",
        f"{PACKAGE}/b.py": "def f():\n    from .sub.c import x\n",
        f"{PACKAGE}/sub/__init__.py": "",
        f"{PACKAGE}/sub/c.py": f"import {PACKAGE}.a\nfrom ..d import y\n",
        f"{PACKAGE}/d.py": "import os\nfrom typing import TYPE_CHECKING\n"
                           "if TYPE_CHECKING:\n    from . import a\n",
    })
    modules = module_files(tmp_path / PACKAGE)
    graph = {m: imports_of(m, p, modules) for m, p in modules.items()}
    assert set(graph[f"{PACKAGE}.a"]) == {f"{PACKAGE}.b"}
    assert set(graph[f"{PACKAGE}.b"]) == {f"{PACKAGE}.sub.c"}
    assert set(graph[f"{PACKAGE}.sub.c"]) == {f"{PACKAGE}.a", f"{PACKAGE}.d"}
    cycles = find_cycles(graph)
    assert len(cycles) == 1
    assert cycles[0]["cycle"] == [f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.sub.c", f"{PACKAGE}.a"]
    graph[f"{PACKAGE}.sub.c"].pop(f"{PACKAGE}.a")
    assert find_cycles(graph) == []


# ----------------------------------------------------------------------------- the package

GRAPH = None


def _graph():
    global GRAPH
    if GRAPH is None:
        GRAPH = import_graph()
    return GRAPH




def test_no_import_circles():
    cycles = find_cycles(_graph())
    assert not cycles, "import circles (module-level and lazy imports alike):\n" + \
        describe_cycles(cycles, _graph())


def test_kernels_import_nothing_above_them():
    bad = kernel_violations(_graph())
    assert not bad, "kernels must not import merging, api, validation or formats:\n" + "\n".join(bad)


def test_graph_covers_the_package():
    graph = _graph()
    assert f"{PACKAGE}.api" in graph and f"{PACKAGE}.kernels.reference" in graph
    assert any(graph.values())
