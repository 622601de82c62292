"""The package is layered: no module imports, even lazily, one that imports it back.

Read from the source (every ``import`` and ``from ... import``, inside functions and
``TYPE_CHECKING`` blocks too), at two scales: modules, and the package's "rooms" (each
sub-package as one, each top-level module as one). A circle among rooms is a lower layer
reaching up into a higher one, which is how the import circles of an earlier layout began.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mmret"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The mmret modules ``path`` imports (a package's name where no module is named)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mmret"):
            for alias in node.names:
                name = f"{node.module}.{alias.name}"
                found.add(name if name in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mmret"))
    return found


def room(module: str) -> str:
    """``mmret.index.store`` -> ``mmret.index``; ``mmret.engine`` stays itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    known = modules()
    by_module: dict[str, set[str]] = defaultdict(set)
    by_room: dict[str, set[str]] = defaultdict(set)
    for name, path in known.items():
        if name == "mmret":
            continue  # the package's face imports everything it exports
        for target in imports(path, known):
            if target == "mmret":
                continue
            by_module[name].add(target)
            if room(target) != room(name):
                by_room[room(name)].add(room(target))
    return by_module, by_room


def test_no_module_imports_one_that_imports_it_back() -> None:
    by_module, _ = graphs()
    assert circles(by_module) == []


def test_no_sub_package_reaches_up_into_one_above_it() -> None:
    _, by_room = graphs()
    assert circles(by_room) == []


def test_the_check_finds_a_circle() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
