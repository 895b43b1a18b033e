"""The layout's import rules (docs/architecture.md), read from the source: which package may import which, and
no import cycle between lrk's modules (imports inside functions included: a lazy import that closes a cycle is
still a cycle)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lrk"

#: package -> the lrk packages it may import (besides itself); lrk.errors and lrk.checks are allowed for all
ALLOWED = {
    "linalg": set(),
    "measure": set(),
    "layers": {"linalg", "measure"},
    "models": {"layers", "measure", "config"},
    "decomp": {"layers", "linalg", "models", "measure", "config"},
    "lit": {"measure"},
    "data": {"config"},
    "search": {"config"},
    "reporting": {"results", "summary"},
}
ANYONE = {"errors", "checks", "progress"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def lrk_imports(path: Path) -> set[str]:
    """Every lrk module ``path`` imports, at any depth of the file (``from lrk.x import y`` gives lrk.x, and
    lrk.x.y when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "lrk"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lrk":
            found.add(node.module)
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                if (ROOT.parent / sub.replace(".", "/")).with_suffix(".py").exists() or (
                    ROOT.parent / sub.replace(".", "/") / "__init__.py"
                ).exists():
                    found.add(sub)
    return found


GRAPH = {module_name(p): lrk_imports(p) for p in ROOT.rglob("*.py")}


def package_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_point_one_way(package: str) -> None:
    allowed = ALLOWED[package] | ANYONE | {package}
    wrong = sorted(
        f"{module} imports {target}"
        for module, targets in GRAPH.items()
        if package_of(module) == package
        for target in targets
        if package_of(target) not in allowed and target != "lrk"
    )
    assert not wrong, f"lrk.{package} may import only {sorted(allowed)}:\n" + "\n".join(wrong)


def test_no_import_cycle() -> None:
    """Depth-first search for a back edge among module -> imported-module edges (a package's __init__ importing
    its own submodules is an edge like any other; a submodule importing its package's __init__ is not counted
    when the package is its parent, since Python loads that __init__ first anyway)."""

    def edges(module: str) -> list[str]:
        return [
            t for t in GRAPH.get(module, ()) if t in GRAPH and t != module and not module.startswith(t + ".")
        ]

    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in edges(module):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_known_edges() -> None:
    """The parser finds real imports (a check of the checker): decomp's base imports the target selector, the
    SDRM layer imports the solvers, and measure imports no lrk module."""
    assert "lrk.decomp.targets" in GRAPH["lrk.decomp.base"]
    assert "lrk.linalg.svd_solvers" in GRAPH["lrk.layers.attention.sdrm"]
    assert not any(
        package_of(t) not in ANYONE | {"measure"}
        for m, ts in GRAPH.items()
        if package_of(m) == "measure"
        for t in ts
    )
