"""The service under load: a real ``densebeam serve`` process on localhost, many concurrent clients for a
fixed time, mixed valid and invalid requests, a slow client, and a version switch in the middle; every
answer equals the library's for that query asked alone (ids and scores, exactly), at the default
precision."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest

from densebeam.index_store.artifacts import versions
from densebeam.index_store.query.search import Searcher
from densebeam.pipelines import build_index
from conftest import REPO, make_passages, write_jsonl

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
        s = Searcher.open(versions.version_path(root, name))  # the default precision, as the service
        expected[name] = {(q, k): [(h.doc_id, h.score) for h in s.search([q], k)[0]]
                          for q in QUERIES for k in (1, 5, 10)}

    def check(query, k, hits):
        got = [(h["doc_id"], h["score"]) for h in hits]
        if any(got == expected[n][(query, k)] for n in (v1, v2)):
            return None
        return f"{query!r} k={k}: {got} is neither version's answer"

    port = serve_load.free_port()
    server = serve_load.start_server(root, port, ("--watch-seconds", "0.3"))
    try:
        res = serve_load.run_load(port, QUERIES, check, seconds=5, clients=16, max_requests=20_000,
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
    assert health["reloads"] == 1 and health["version"] == v2
    assert [(h["doc_id"], h["score"]) for h in final["results"][0]["hits"]] == expected[v2][(QUERIES[0], 10)]


@pytest.fixture(scope="module")
def real_bundle(tmp_path_factory):
    """The sample corpus (200 passages) built with the bundled all-MiniLM-L6-v2 at the default precision."""
    out = str(tmp_path_factory.mktemp("load-real") / "bundle")
    build_index.run_build(["--input", str(REPO / "data" / "sample" / "corpus.jsonl"), "--output", out,
                           "--runner", "local"])
    return out


@pytest.mark.slow
def test_real_model_answers_do_not_depend_on_the_load(real_bundle):
    """At the default precision, under 32 concurrent clients, every answer equals the library's for the
    query asked alone, ids and scores exactly (a query's vector must not depend on the batch it shares)."""
    queries = [json.loads(line)["text"] for line in open(REPO / "data" / "sample" / "queries.jsonl", encoding="utf-8")]
    check = serve_load.library_checker(real_bundle, queries, "auto")
    port = serve_load.free_port()
    server = serve_load.start_server(real_bundle, port)
    try:
        res = serve_load.run_load(port, queries, check, seconds=4, clients=32, max_requests=20_000)
    finally:
        serve_load.stop_server(server)
    print({k: v for k, v in res.items() if k != "wrong"})
    assert res["server_errors"] == 0 and res["n_wrong"] == 0, res["wrong"][:5]
    assert res["answers_checked"] >= 100 and not res["client_errors"], res
