"""The package's import graph has no cycle (function-level imports included)."""

import ast
import functools
from pathlib import Path

import pytest

import cyclelab

PACKAGE = Path(cyclelab.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that ``name`` imports anywhere in its file (not under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in known else base)
    return {m for m in found if m in known and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of nodes (first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


@functools.cache
def package_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (parsed once per process: parsing takes seconds)."""
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def test_the_package_import_graph_has_no_cycle():
    assert find_cycle(package_graph()) is None, f"import cycle: {' -> '.join(find_cycle(package_graph()))}"


def test_find_cycle_finds_a_cycle_and_none_where_there_is_none():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_function_level_and_relative_imports():
    graph = package_graph()
    assert "cyclelab.debugger.widget" in graph["cyclelab.debugger.session"]  # imported inside Debugger.widget()
    assert "cyclelab.loading.corpus" in graph["cyclelab.train.tasks.sonnets"]
    assert "cyclelab.kernels.build" in graph["cyclelab.kernels.products"]  # from . import build
    assert "cyclelab.debugger.session" not in graph["cyclelab.debugger.widget"]  # only under TYPE_CHECKING


LAYERS = ["kernels", "loading", "core", "train", "debugger", "lab", "checks", "workshop", "face"]
"""The package's layers, lowest first: a module may import its own layer and the layers before it. The face is
the top-level modules (``cyclelab``, ``cli``, ``doctor``, ``show``); every other module sits in the subpackage
named after its layer."""


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "face"


def test_every_module_sits_in_a_named_layer():
    assert {layer_of(m) for m in package_graph()} == set(LAYERS)
    faces = sorted(m for m in package_graph() if layer_of(m) == "face")
    assert faces == ["cyclelab", "cyclelab.cli", "cyclelab.doctor", "cyclelab.show"]


@pytest.mark.parametrize("module", sorted(modules()))
def test_each_module_imports_only_its_layer_and_those_below(module):
    rank = LAYERS.index(layer_of(module))
    above = sorted(m for m in package_graph()[module] if LAYERS.index(layer_of(m)) > rank)
    assert not above, f"{module} ({LAYERS[rank]}) imports from a higher layer: {above}"


def test_no_layer_lists_more_modules_than_a_screen_holds():
    for layer in LAYERS:
        flat = [m for m in package_graph() if layer_of(m) == layer and m.count(".") <= 2]
        assert len(flat) <= 30, f"{layer}: {len(flat)} modules"
