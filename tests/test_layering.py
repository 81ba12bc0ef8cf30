"""index_store is what search services import: it must never import Beam, and never unpickle."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

INDEX_STORE = Path(__file__).resolve().parents[1] / "index_store"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def _densebeam_imports(path: Path) -> set[str]:
    """The densebeam subpackages a file imports (``densebeam.transforms.x`` -> ``transforms``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        names.update(m.split(".")[1] for m in mods if m.startswith("densebeam.") and "." in m)
    return names


def test_index_store_imports_neither_beam_nor_pickle():
    files = sorted(INDEX_STORE.rglob("*.py"))
    assert len(files) > 15 and any(f.parent.name == "query" for f in files)
    for f in files:
        bad = _imports(f) & {"apache_beam", "pickle", "dill", "cloudpickle", "joblib"}
        bad |= _densebeam_imports(f) & {"transforms", "pipelines", "runners"}
        assert not bad, f"{f.relative_to(INDEX_STORE)} imports {bad}"


def test_code_imports_the_installed_names_only():
    """Every import of the project's own modules goes through ``densebeam.``: the bare folder names are
    not installed (other PyPI distributions own ``pipelines``, ``transforms`` and ``runners``)."""
    repo = INDEX_STORE.parent
    for folder in ("pipelines", "transforms", "index_store", "runners", "tests", "bench"):
        for f in (repo / folder).rglob("*.py"):
            bare = _imports(f) & {"pipelines", "transforms", "index_store", "runners"}
            assert not bare, f"{f.relative_to(repo)} imports {bare} without densebeam."


def test_importing_the_query_side_loads_no_beam():
    code = ("import sys, densebeam.index_store.bundle, densebeam.index_store.encoder, densebeam.index_store.ivf, "
            "densebeam.index_store.docstore, densebeam.index_store.query.search, densebeam.index_store.query.serve, "
            "densebeam.pipelines.query_cli, densebeam.pipelines.cli; print('apache_beam' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
