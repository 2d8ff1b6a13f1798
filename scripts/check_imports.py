#!/usr/bin/env python
"""Import graph of a Python package, and a check that its module-level imports have no cycle.

    python scripts/check_imports.py                 # the tunefast package of this checkout
    python scripts/check_imports.py path/to/pkg     # any package folder (its parent goes on the module path)
    python scripts/check_imports.py --list          # also print every edge

Read with ``ast`` only (nothing is imported or run). Two kinds of edges between the package's own modules:

- module-level: imports that run when the module is imported (top level, class bodies, module-level
  ``try`` / ``if``); a cycle among these is what the check fails on (exit status 1), printed as a path
  ``a -> b -> ... -> a``;
- function-level: imports inside a function or lambda, which run on the call; listed, never a failure
  (deferring an import into a function is the usual way out of a cycle).

Imports under ``if TYPE_CHECKING:`` never run and are left out. ``from pkg import name`` is an edge to
``pkg.name`` when that is a module of the package, else to ``pkg``. Importing ``a.b.c`` also runs
``a/__init__.py`` and ``a/b/__init__.py`` first; those implicit edges are left out, since with them
every module would depend on the top-level ``__init__`` (which imports everything) and every module
would sit on a cycle. Imports by name at run time (``importlib.import_module``) cannot be followed
from the source: their sites are printed so that a reader can check them by hand.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


@dataclass
class Graph:
    """``module_level`` / ``function_level``: module -> {imported module: first line number}."""

    modules: set[str] = field(default_factory=set)
    module_level: dict[str, dict[str, int]] = field(default_factory=dict)
    function_level: dict[str, dict[str, int]] = field(default_factory=dict)
    dynamic: list[tuple[str, int]] = field(default_factory=list)  # (module, line) of import_module calls


def module_names(package: Path) -> dict[str, Path]:
    """Dotted name -> file for every .py file under ``package`` (a folder with ``__init__.py``)."""
    if not (package / "__init__.py").is_file():
        raise SystemExit(f"{package} is not a package folder (no __init__.py)")
    out = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        if all(p.isidentifier() for p in parts):  # skips e.g. folders with dashes, never importable
            out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST) -> Iterator[tuple[ast.AST, bool]]:
    """(import node or import_module call, inside a function?) for every import that can run."""

    def visit(node: ast.AST, in_function: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:  # the else branch does run
                    yield from visit_one(sub, in_function)
                continue
            yield from visit_one(child, in_function)

    def visit_one(node: ast.AST, in_function: bool):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, in_function
        elif isinstance(node, ast.Call) and _is_import_module(node.func):
            yield node, in_function
        yield from visit(node, in_function or isinstance(node, _FUNCTIONS))

    yield from visit(tree, False)


def _is_import_module(func: ast.expr) -> bool:
    return (isinstance(func, ast.Attribute) and func.attr == "import_module") or (
        isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name ``from <node.module>`` refers to, inside ``module``."""
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def build(package: Path) -> Graph:
    """Parse every module of ``package`` and collect its imports of the package's own modules."""
    files = module_names(package)
    graph = Graph(modules=set(files))
    for name, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        for node, in_function in _imports(tree):
            if isinstance(node, ast.Call):
                graph.dynamic.append((name, node.lineno))
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                source = _resolve(name, is_package, node)
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.append(sub if sub in files else source)
            table = graph.function_level if in_function else graph.module_level
            for target in targets:
                # ``import a.b.c`` names a.b.c; keep the longest prefix that is a module of the package
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    table.setdefault(name, {}).setdefault(target, node.lineno)
    return graph


def cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a path whose last node imports its first) per strongly connected component of more
    than one module or of a module importing itself; Tarjan's algorithm, iteratively."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    nodes = sorted(set(edges) | {t for ts in edges.values() for t in ts})
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, {}))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, {})))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                if len(comp) > 1 or node in edges.get(node, {}):
                    components.append(sorted(comp))
    return [_cycle_in(comp, edges) for comp in components]


def _cycle_in(component: list[str], edges: dict[str, dict[str, int]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first inside the component)."""
    members, start = set(component), component[0]
    parent: dict[str, str | None] = {start: None}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for child in sorted(edges.get(node, {})):
            if child == start:
                path = [node]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return path[::-1]
            if child in members and child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError("a strongly connected component always has a cycle through each member")


def _fmt_cycle(cycle: list[str], edges: dict[str, dict[str, int]]) -> str:
    hops = [f"{a} (line {edges[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:] + cycle[:1])]
    return "\n    ".join(hops)


def main(argv: list[str] | None = None) -> int:
    default = Path(__file__).resolve().parent.parent / "tunefast"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", nargs="?", type=Path, default=default, help=f"package folder (default {default})")
    parser.add_argument("--list", action="store_true", help="print every edge, module-level and function-level")
    args = parser.parse_args(argv)
    graph = build(args.package.resolve())
    n_mod = sum(len(v) for v in graph.module_level.values())
    n_fun = sum(len(v) for v in graph.function_level.values())
    print(f"{args.package.name}: {len(graph.modules)} modules, {n_mod} module-level imports, "
          f"{n_fun} function-level imports between them")
    if args.list:
        for title, table in (("module-level", graph.module_level), ("function-level", graph.function_level)):
            print(f"{title} imports:")
            for src in sorted(table):
                for dst, line in sorted(table[src].items()):
                    print(f"  {src}:{line} -> {dst}")
    for module, line in graph.dynamic:
        print(f"note: {module}:{line} imports by name at run time (importlib); not followed, check by hand")
    found = cycles(graph.module_level)
    if found:
        print(f"FAIL: {len(found)} import cycle(s) among module-level imports:")
        for cycle in found:
            print("    " + _fmt_cycle(cycle, graph.module_level))
        return 1
    print("OK: no cycle among module-level imports")
    return 0


if __name__ == "__main__":
    sys.exit(main())
