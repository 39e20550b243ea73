"""The package's import graph has no cycles and no import from a lower layer to a higher one
(``tools/import_graph.py`` declares the layers), and the checker itself catches both."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "import_graph.py"


@pytest.fixture(scope="module")
def import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_package_has_no_cycles_and_no_upward_imports(import_graph):
    graph = import_graph.ImportGraph.scan()
    problems = import_graph.check(graph)
    assert not problems, import_graph.render(graph, problems)


def _write(root: Path, files: dict[str, str]) -> Path:
    package = root / "vqmoe_megatron"
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return package


def test_checker_flags_a_cycle_an_upward_import_and_an_undeclared_unit(import_graph, tmp_path):
    package = _write(
        tmp_path,
        {
            "__init__.py": "",
            "compat/__init__.py": "",
            "compat/patch.py": "def f():\n    from vqmoe_megatron.model import build\n",
            "model.py": "from vqmoe_megatron.compat import patch\nbuild = 1\n",
            "moe/__init__.py": "",
            "moe/a.py": "from . import b\n",
            "moe/b.py": "from .a import x\n",
            "newthing.py": "import vqmoe_megatron.moe.a\n",
        },
    )
    graph = import_graph.ImportGraph.scan(package)
    problems = import_graph.check(graph)
    assert problems.module_cycles == [
        ["vqmoe_megatron.compat.patch", "vqmoe_megatron.model"],
        ["vqmoe_megatron.moe.a", "vqmoe_megatron.moe.b"],
    ]
    assert problems.unit_cycles == [["compat", "model"]]
    assert problems.upward == [
        "vqmoe_megatron.compat.patch:2 -> vqmoe_megatron.model (layer 0 imports layer 3)"
    ]
    assert problems.undeclared == ["newthing"]
    # the allow-list names imports of the real package, none of which exist here
    assert len(problems.stale_allowances) == len(import_graph.ALLOWED_UPWARD)


def test_checker_passes_a_clean_graph(import_graph, tmp_path, monkeypatch):
    package = _write(
        tmp_path,
        {
            "__init__.py": "",
            "compat/__init__.py": "",
            "model.py": "import torch\nfrom vqmoe_megatron.compat import shims  # not a module\n",
            "commands.py": "from vqmoe_megatron import model\n",
        },
    )
    monkeypatch.setattr(import_graph, "ALLOWED_UPWARD", {})
    graph = import_graph.ImportGraph.scan(package)
    assert graph.edges == {
        "vqmoe_megatron.model": {"vqmoe_megatron.compat": 2},
        "vqmoe_megatron.commands": {"vqmoe_megatron.model": 1},
    }
    assert not import_graph.check(graph)
