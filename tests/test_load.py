"""The service under load: a real ``densebeam serve`` process on localhost, many concurrent clients for a
fixed time, mixed valid and invalid requests, a slow client, and a version switch in the middle."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from densebeam.index_store import versions
from densebeam.index_store.query.search import Searcher
from densebeam.pipelines import build_index
from conftest import make_passages, write_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import serve_load  # noqa: E402

QUERIES = ["river water", "music film game", "search index query", "the city of the state", "team world war"]


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory, tiny_cos_model):
    tmp = tmp_path_factory.mktemp("load")
    root = str(tmp / "idx")
    names = []
    for seed, prefix in ((1, "a"), (2, "b")):
        src = write_jsonl(tmp / f"c{seed}.jsonl", make_passages(300, seed=seed, prefix=prefix))
        build_index.run_build(["--input", str(src), "--output", root, "--model", tiny_cos_model,
                               "--precision", "fp32", "--versioned", "--nlist", "8", "--runner", "local"])
        names.append(versions.current(root))
    versions.switch(root, names[0])  # serve the first; the test switches to the second under load
    return root, names


@pytest.mark.slow
def test_service_under_load_with_a_version_switch(two_versions):
    root, (v1, v2) = two_versions
    expected = {}
    for name in (v1, v2):
        s = Searcher.open(versions.version_path(root, name), precision="fp32")
        expected[name] = {q: [h.doc_id for h in hits] for q, hits in zip(QUERIES, s.search(QUERIES, 10))}

    def check(query, k, hits):
        got = [h["doc_id"] for h in hits]
        if any(got == expected[n][query][:k] for n in (v1, v2)):
            return None
        return f"{query!r} k={k}: {got} is neither version's answer"

    port = serve_load.free_port()
    server = serve_load.start_server(root, port, ("--precision", "fp32", "--watch-seconds", "0.3"))
    try:
        res = serve_load.run_load(port, QUERIES, check, seconds=8, clients=16, max_requests=20_000,
                                  during=lambda: versions.switch(root, v2))
        health = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).json()
        final = httpx.post(f"http://127.0.0.1:{port}/search", json={"query": QUERIES[0], "k": 10}).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(res)
    assert res["server_errors"] == 0 and res["n_wrong"] == 0, res
    assert not res["client_errors"], res
    assert res["requests"] > 100 and 200 in res["status"] and 422 in res["status"]
    assert res["slow_client_bytes"] > 10  # the slow client trickled all along and blocked nobody
    assert res["p99_ms"] < 5000
    assert health["reloads"] == 1 and health["bundle"].endswith(v2)
    assert [h["doc_id"] for h in final["results"][0]["hits"]] == expected[v2][QUERIES[0]]
