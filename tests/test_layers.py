"""The shape of the package: layered imports, no cycles, short modules and functions.

Every import counts, including those inside functions; only ``if TYPE_CHECKING:`` blocks are left out (they never
run). A module may import its own layer or a lower one; the layers, lowest first, are :data:`LAYERS`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ia3cli"

#: Lowest first. A module's layer is its subpackage, or its own name for the top-level modules.
LAYERS = [
    ("errors", "env", "outputs", "__init__"),
    ("config",),
    ("models",),
    ("tuners",),
    ("data",),
    ("scoring",),
    ("report",),
    ("training",),
    ("inference",),
    ("serving",),
    ("compare",),
    ("cli", "__main__"),
]
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    key = parts[1] if len(parts) > 1 else "__init__"
    for rank, names in enumerate(LAYERS):
        if key in names:
            return rank
    raise AssertionError(f"{module}: no layer in tests/test_layers.py LAYERS; add its subpackage there")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, modules: set[str]) -> set[str]:
    """The ia3cli modules a file imports (``from pkg import mod`` counts as ``pkg.mod`` when that is a module)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("ia3cli"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ia3cli"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name in modules}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: _imports(ast.parse(path.read_text()), modules) - {name} for name, path in files.items()}


def _parents(module: str) -> set[str]:
    """``ia3cli.a.b`` imports ``ia3cli.a`` and ``ia3cli`` implicitly: those edges are not the module's doing."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_every_import_points_down_the_layer_table() -> None:
    upward = [
        f"{module} -> {target}"
        for module, targets in sorted(_graph().items())
        for target in sorted(targets - _parents(module))
        if _layer(target) > _layer(module)
    ]
    assert upward == [], "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                walk(target, stack + [target])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert cycles == [], "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_modules_and_functions_are_short() -> None:
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        where = path.relative_to(PACKAGE.parent)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long.append(f"{where}: {len(text.splitlines())} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{where}:{node.lineno} {node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    assert long == [], "\n".join(long)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from ia3cli.models import loading\n", {"ia3cli.models.loading"}),
        ("def f():\n    from ia3cli.models.loading import load_base\n", {"ia3cli.models.loading"}),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ia3cli.models import loading\n", set()),
        ("import ia3cli.models.loading\n", {"ia3cli.models.loading"}),
    ],
)
def test_the_import_walk_sees_what_runs(source: str, expected: set[str]) -> None:
    modules = {"ia3cli.models", "ia3cli.models.loading"}
    assert _imports(ast.parse(source), modules) == expected
