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
    code = ("import sys, densebeam.index_store.artifacts.bundle, densebeam.index_store.encoding.encoder, densebeam.index_store.ivf, "
            "densebeam.index_store.artifacts.docstore, densebeam.index_store.query.search, densebeam.index_store.query.serve, "
            "densebeam.pipelines.query_cli, densebeam.pipelines.cli; print('apache_beam' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# The stages of index_store, lowest first: a module imports from its own stage and lower ones only.
STAGES = ("base", "encoding", "ivf", "artifacts", "query")
BASE = {"types", "fsutil", "corpus_io"}


def _stage(module: str) -> str:
    """``densebeam.index_store.ivf.files`` -> ``ivf``; base modules (types, fsutil, corpus_io) -> ``base``."""
    parts = module.split(".")
    if parts[:2] != ["densebeam", "index_store"]:
        raise ValueError(module)
    return parts[2] if len(parts) > 2 and parts[2] in STAGES else "base"


def _runtime_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported densebeam module, at module level?) for every import outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") ==
            "TYPE_CHECKING" for n in ast.walk(node)}
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("densebeam."):
            base = node.module
            for a in node.names:  # "from densebeam.index_store import ivf": the module densebeam.index_store.ivf
                full = f"{base}.{a.name}"
                out.append((full if _is_module(full) else base, id(node) in top))
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names if a.name.startswith("densebeam.")]
    return out


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:])
    repo = INDEX_STORE.parent
    return (repo / rel.with_suffix(".py")).exists() or (repo / rel / "__init__.py").exists()


def _module_name(path: Path) -> str:
    rel = path.relative_to(INDEX_STORE.parent).with_suffix("")
    parts = list(rel.parts[:-1]) if rel.name == "__init__" else list(rel.parts)
    return "densebeam." + ".".join(parts)


def test_each_stage_imports_only_its_own_and_lower_stages():
    files = sorted(INDEX_STORE.rglob("*.py"))
    assert {f.parent.name for f in files} >= {"encoding", "ivf", "artifacts", "query"}
    for f in files:
        here = STAGES.index(_stage(_module_name(f)))
        for module, _ in _runtime_imports(f):
            if module.startswith("densebeam.index_store."):
                there = _stage(module)
                assert STAGES.index(there) <= here, f"{f.relative_to(INDEX_STORE)} ({STAGES[here]}) imports {module}"


def test_transforms_import_nothing_from_the_query_side():
    for f in sorted((INDEX_STORE.parent / "transforms").rglob("*.py")):
        bad = [m for m, _ in _runtime_imports(f) if m.startswith("densebeam.index_store.query")]
        assert not bad, f"transforms/{f.name} imports {bad}"


def test_no_import_circles():
    """No two modules of the project import each other, directly or through others, at module level."""
    repo = INDEX_STORE.parent
    graph = {}
    for folder in ("index_store", "pipelines", "transforms", "runners"):
        for f in sorted((repo / folder).rglob("*.py")):
            graph[_module_name(f)] = {m for m, top in _runtime_imports(f) if top}
    # a package's __init__ is what importing the package runs
    for node, deps in graph.items():
        graph[node] = {d for d in deps if d in graph and d != node and not node.startswith(d + ".")}
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_test_only_helpers_live_in_tests():
    from densebeam.index_store import ivf
    from densebeam.index_store.encoding import native
    from densebeam.runners import flink

    assert not hasattr(flink, "LocalFlinkCluster") and not hasattr(ivf, "add_batches")
    assert not hasattr(native, "reset")
