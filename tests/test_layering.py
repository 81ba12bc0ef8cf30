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


def test_index_store_imports_neither_beam_nor_pickle():
    files = sorted(INDEX_STORE.glob("*.py"))
    assert len(files) > 5
    for f in files:
        bad = _imports(f) & {"apache_beam", "pickle", "dill", "cloudpickle", "joblib", "transforms", "pipelines"}
        assert not bad, f"{f.name} imports {bad}"


def test_importing_the_query_side_loads_no_beam():
    code = ("import sys, index_store.bundle, index_store.encoder, index_store.ivf, index_store.docstore; "
            "print('apache_beam' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
