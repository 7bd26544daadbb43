"""No pickle anywhere in the package: no pickle (or pickle-based) module, no ``allow_pickle=True``,
and ``torch.load`` only with ``weights_only=True``. Checked on the syntax tree, so docstrings that
say "never pickle" do not count, and aliases such as ``from torch import load`` do."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "cyclelab"
PICKLERS = ("pickle", "cpickle", "dill", "cloudpickle", "joblib", "shelve", "marshal")


def _true(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def pickle_uses(source: str) -> list[str]:
    """Every pickle use in ``source``, as 'line N: what'."""
    found, loads = [], {"torch.load"}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                full = f"{node.module}.{alias.name}" if isinstance(node, ast.ImportFrom) else alias.name
                if any(p in full.lower() for p in PICKLERS):
                    found.append(f"line {node.lineno}: imports {full}")
                if full == "torch.load":
                    loads.add(alias.asname or "load")
        elif isinstance(node, (ast.Name, ast.Attribute)):
            name = node.id if isinstance(node, ast.Name) else node.attr
            if "pickle" in name.lower():
                found.append(f"line {node.lineno}: uses {name}")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            keywords = {k.arg: k.value for k in node.keywords}
            if ast.unparse(node.func) in loads and not _true(keywords.get("weights_only")):
                found.append(f"line {node.lineno}: {ast.unparse(node.func)}(...) without weights_only=True")
            if _true(keywords.get("allow_pickle")):
                found.append(f"line {node.lineno}: allow_pickle=True")
    return found


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_no_pickle_in_the_package(path):
    assert pickle_uses(path.read_text()) == []


@pytest.mark.parametrize(
    "source",
    [
        "import pickle",
        "import cPickle as p",
        "from joblib import dump",
        "import torch\nstate = torch.load(path)",
        "import torch\nstate = torch.load(path, weights_only=False)",
        "from torch import load\nstate = load(path)",
        "from torch import load as read\nstate = read(path, map_location='cpu')",
        "import numpy as np\nx = np.load(path, allow_pickle=True)",
        "import pandas as pd\nframe = pd.read_pickle(path)",
    ],
)
def test_the_checker_catches_each_kind_of_pickle(source):
    assert pickle_uses(source)


def test_the_checker_accepts_safe_loading_and_words_in_docstrings():
    safe = '"""Saved as JSON, never pickle."""\nimport torch\nstate = torch.load(p, weights_only=True)\n'
    assert pickle_uses(safe) == []
