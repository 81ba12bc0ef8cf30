"""The query side installs and runs without Apache Beam: every query command and the Python API work in
a process where ``import apache_beam`` fails (as it does after ``pip install densebeam`` without the
``pipelines`` extra)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from conftest import REPO
from query_fixtures import build_tiny_bundle, free_port, toy_queries

pytestmark = pytest.mark.timeout(600)

# Runs before anything else in the child: a meta-path finder that refuses apache_beam, so any import of
# it (direct or through a densebeam module) raises ImportError, exactly as on a Beam-free install.
NO_BEAM = """
import sys
class _NoBeam:
    def find_spec(self, name, path=None, target=None):
        if name == "apache_beam" or name.startswith("apache_beam."):
            raise ImportError("No module named 'apache_beam' (blocked: Beam-free install)")
        return None
sys.meta_path.insert(0, _NoBeam())
"""

CLI = NO_BEAM + """
from densebeam.pipelines.cli import main
rc = main(sys.argv[1:])
assert "apache_beam" not in sys.modules
if __import__("os").environ.get("EXPECT_NO_ST"):
    assert "sentence_transformers" not in sys.modules, "the bi-encoder was loaded"
sys.exit(rc)
"""


def run_cli(*argv: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", CLI, *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_cos_model):
    return build_tiny_bundle(tmp_path_factory.mktemp("nobeam"), tiny_cos_model, 120, 7)


def test_the_blocker_really_blocks_beam():
    r = subprocess.run([sys.executable, "-c", NO_BEAM + "import apache_beam"], capture_output=True, text=True)
    assert r.returncode != 0 and "blocked: Beam-free install" in r.stderr


def test_version_and_inspect_without_beam(bundle, tmp_path):
    import xml.etree.ElementTree as ET

    import densebeam
    from densebeam.index_store.artifacts.bundle import read_manifest

    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"densebeam {densebeam.__version__}"
    r = run_cli("inspect", bundle, "--verify", "--plot", str(tmp_path / "bundle.svg"))
    assert r.returncode == 0, r.stderr
    assert "120 vectors" in r.stdout and "verified" in r.stdout and "plot:" in r.stdout
    curves = ET.parse(tmp_path / "bundle.svg").getroot().iter("{http://www.w3.org/2000/svg}polyline")
    assert sorted(int(c.get("data-k")) for c in curves) == sorted(map(int, read_manifest(bundle)["recall_curves"]))


def test_search_and_eval_cli_without_beam(bundle, tmp_path):
    q = toy_queries(3, seed=4)
    r = run_cli("search", "--index", bundle, "--query", q[0], "--query", q[1], "--k", "5", "--json",
                "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [o["query"] for o in out] == q[:2] and all(len(o["hits"]) == 5 for o in out)
    # The same hits as the library in this (Beam-importing) process.
    from densebeam.index_store.query.search import Searcher

    lib = Searcher.open(bundle, precision="fp32", device="cpu").retrieve(q[:2], 5)
    assert [[h["doc_id"] for h in o["hits"]] for o in out] == [[h.doc_id for h in hits] for hits in lib]

    # BM25 first stage: no bi-encoder is loaded at all.
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(q)))
    doc_ids = [h.doc_id for h in lib[0]]
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\t{doc_ids[i]}\t1\n" for i in range(3)))
    r = run_cli("eval", "--index", bundle, "--queries", str(queries), "--qrels", str(qrels), "--first-stage",
                "bm25", "--k", "20", "--json", env_extra={"EXPECT_NO_ST": "1"})
    assert r.returncode == 0, r.stderr
    assert "DEBUG" not in r.stderr
    metrics = json.loads(r.stdout)
    assert 0.0 <= metrics["ndcg@10"] <= 1.0
    r = run_cli("search", "--index", bundle, "--query", q[0], "--first-stage", "bm25", "--json",
                env_extra={"EXPECT_NO_ST": "1"})
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)[0]["hits"]) == 10


def test_python_api_without_beam(bundle):
    code = NO_BEAM + f"""
from densebeam.index_store.query.search import Searcher
from densebeam.index_store.query.evaluate import evaluate, run_from_hits
s = Searcher.open({bundle!r}, precision="fp32", device="cpu")
hits = s.retrieve(["river music", "the city"], 3)
assert [len(h) for h in hits] == [3, 3], hits
exact = s.retrieve(["river music"], 3, first_stage="exact")
assert exact[0][0].doc_id == hits[0][0].doc_id
print("ok", "apache_beam" in sys.modules)
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["ok", "False"]


def test_serve_without_beam(bundle):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", CLI, "serve", "--index", bundle, "--port", str(port),
                             "--precision", "fp32"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the service did not start"
                time.sleep(0.2)
        assert health.status_code == 200 and health.json()["vectors"] == 120
        r = httpx.post(f"http://127.0.0.1:{port}/search", json={"queries": ["river music"], "k": 4}, timeout=60)
        assert r.status_code == 200
        assert len(r.json()["results"][0]["hits"]) == 4
    finally:
        proc.terminate()
        proc.wait(timeout=30)
