"""The HTTP service: a real uvicorn server on 127.0.0.1 (free port, thread), real tiny models, httpx."""

from __future__ import annotations

import random
import threading

import httpx
import pytest

from densebeam.index_store.query.search import Searcher
from densebeam.index_store.query.serve import Limits, create_app, strip_paths
from query_fixtures import ServerThread, tiny_searcher_with_reranker, toy_queries

QUERIES = toy_queries(24, seed=21)


@pytest.fixture(scope="module")
def searcher(tmp_path_factory, tiny_cos_model):
    return tiny_searcher_with_reranker(tmp_path_factory.mktemp("serve"), tiny_cos_model, 200, 17)


@pytest.fixture(scope="module")
def server(searcher):
    srv = ServerThread(create_app(searcher, Limits(batch_window_ms=3.0))).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def _as_pairs(hits):
    return [(h["doc_id"], h["score"]) for h in hits]


def _tie_groups(pairs, tol=1e-4):
    """[(score, {doc ids})] of runs of equal scores: the synthetic corpus has duplicate passages, whose
    scores tie exactly in one batch and differ by float noise across batch compositions."""
    groups = []
    for doc_id, score in pairs:
        if groups and abs(groups[-1][0] - score) <= tol:
            groups[-1][1].add(doc_id)
        else:
            groups.append((score, {doc_id}))
    return groups


def _assert_same(http_hits, lib_hits):
    """Same scores in the same order, same documents up to ties (and ties at the cut)."""
    assert [h["score"] for h in http_hits] == pytest.approx([h.score for h in lib_hits], abs=1e-4)
    got = _tie_groups([(h["doc_id"], h["score"]) for h in http_hits])
    want = _tie_groups([(h.doc_id, h.score) for h in lib_hits])
    assert [g[1] for g in got[:-1]] == [g[1] for g in want[:-1]]
    by_id = {h.doc_id: h for h in lib_hits}
    for h in http_hits:
        doc = by_id.get(h["doc_id"])
        assert doc is None or (h["text"], h["title"], h["row"]) == (doc.text, doc.title, doc.row)


def test_health_and_info(client, searcher, tmp_path_factory):
    health = client.get("/health")
    assert health.json()["status"] == "ok" and health.json()["vectors"] == 200
    assert len(health.json()["manifest_sha256"]) == 16 and "bundle" not in health.json()
    info = client.get("/info")
    body = info.json()
    assert body["manifest"] == strip_paths(searcher.bundle.manifest) and body["default_nprobe"] == searcher.default_nprobe
    assert body["manifest"]["files"] == searcher.bundle.manifest["files"]  # bundle-relative names stay
    assert body["rerank_model"] == "ce" and body["limits"]["max_k"] == 1000
    # No local path in a public answer: not the bundle's, the models', nor the corpus's.
    base = str(tmp_path_factory.getbasetemp())
    for answer in (health, info):
        assert base not in answer.text and "/tmp" not in answer.text, answer.text[:2000]


def test_results_equal_the_library(client, searcher):
    r = client.post("/search", json={"queries": QUERIES[:6], "k": 7, "rerank": False})
    assert r.status_code == 200
    body = r.json()
    lib = searcher.search(QUERIES[:6], k=7)
    assert [o["query"] for o in body["results"]] == QUERIES[:6] and body["reranked"] is False
    for got, want in zip(body["results"], lib):
        _assert_same(got["hits"], want)
    one = client.post("/search", json={"query": QUERIES[0], "k": 3, "nprobe": 1, "rerank": False}).json()
    _assert_same(one["results"][0]["hits"], searcher.search(QUERIES[:1], k=3, nprobe=1)[0])
    assert one["nprobe"] == 1
    rr = client.post("/search", json={"query": QUERIES[1], "k": 5, "rerank_depth": 12}).json()  # default: rerank
    assert rr["reranked"] is True
    _assert_same(rr["results"][0]["hits"], searcher.retrieve(QUERIES[1:2], 5, rerank=True, rerank_depth=12)[0])


BAD = [
    ("empty query", {"query": ""}),
    ("blank query", {"query": "   "}),
    ("oversized query", {"query": "river " * 500}),
    ("too many queries", {"queries": ["river"] * 65}),
    ("empty list", {"queries": []}),
    ("blank in list", {"queries": ["river", " "]}),
    ("both query and queries", {"query": "a", "queries": ["b"]}),
    ("neither", {"k": 3}),
    ("k zero", {"query": "river", "k": 0}),
    ("k too large", {"query": "river", "k": 1001}),
    ("k as string", {"query": "river", "k": "5"}),
    ("k as float", {"query": "river", "k": 2.5}),
    ("query not a string", {"query": 5}),
    ("queries not a list", {"queries": "river"}),
    ("queries hold a number", {"queries": ["river", 3]}),
    ("nprobe zero", {"query": "river", "nprobe": 0}),
    ("nprobe above nlist", {"query": "river", "nprobe": 10_000}),
    ("rerank not a bool", {"query": "river", "rerank": "yes"}),
    ("rerank depth zero", {"query": "river", "rerank_depth": 0}),
    ("unknown field", {"query": "river", "top_k": 3}),
    ("body is a list", ["river"]),
    ("body is null", None),
]


@pytest.mark.parametrize("name,body", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_4xx_with_a_message(client, name, body):
    r = client.post("/search", json=body)
    assert 400 <= r.status_code < 500, (name, r.status_code, r.text)
    assert r.json()["detail"]


def test_bad_json_and_wrong_method(client):
    r = client.post("/search", content=b'{"query": "river", ', headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and r.json()["detail"]
    r = client.post("/search", content=b"query=river", headers={"content-type": "text/plain"})
    assert 400 <= r.status_code < 500
    assert client.get("/search").status_code == 405
    huge = client.post("/search", json={"queries": ["river " * 300] * 1000})
    assert huge.status_code == 413 and "larger than" in huge.json()["detail"]


def test_rerank_without_a_cross_encoder_is_a_400(searcher):
    plain = Searcher(searcher.bundle, searcher.encoder)
    srv = ServerThread(create_app(plain)).start()
    try:
        r = httpx.post(srv.url + "/search", json={"query": "river", "rerank": True}, timeout=30)
        assert r.status_code == 400 and "--rerank-model" in r.json()["detail"]
        ok = httpx.post(srv.url + "/search", json={"query": "river"}, timeout=30).json()
        assert ok["reranked"] is False and ok["results"][0]["hits"]
    finally:
        srv.stop()


def test_many_concurrent_clients_all_correct(client, server, searcher):
    want_dense = searcher.search(QUERIES, k=10)
    want_rerank = searcher.retrieve(QUERIES, 10, rerank=True, rerank_depth=10)
    before = client.get("/health").json()
    errors, statuses, lock = [], [], threading.Lock()

    def worker(seed):
        rng = random.Random(seed)
        with httpx.Client(base_url=server.url, timeout=120) as c:
            for _ in range(10):
                qi, k, rerank = rng.randrange(len(QUERIES)), rng.randint(1, 10), rng.random() < 0.2
                body = {"query": QUERIES[qi], "k": k, "rerank": rerank}
                if rerank:
                    body["rerank_depth"] = 10
                r = c.post("/search", json=body)
                with lock:
                    statuses.append(r.status_code)
                try:
                    want = (want_rerank if rerank else want_dense)[qi][:k]
                    _assert_same(r.json()["results"][0]["hits"], want)
                except AssertionError as err:
                    with lock:
                        errors.append((QUERIES[qi], k, rerank, err))

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(statuses) == 160 and set(statuses) == {200}, statuses
    assert not errors, errors[:3]
    after = client.get("/health").json()
    batches = after["batches"] - before["batches"]
    assert after["batched_queries"] - before["batched_queries"] == 160
    assert batches < 160, "concurrent requests should share batches"


def test_service_defaults_for_nprobe_and_rerank_depth(searcher, client):
    """``serve --nprobe N --rerank-depth D`` are the defaults of requests that give none (they were once
    accepted and ignored), and an answer reports the nprobe its search started from."""
    from densebeam.index_store.ivf.nprobe import nprobe_for_k

    plain = client.post("/search", json={"query": QUERIES[2], "k": 7, "rerank": False}).json()
    assert plain["nprobe"] == nprobe_for_k(searcher.bundle.manifest, 7)
    srv = ServerThread(create_app(searcher, Limits(batch_window_ms=3.0), default_nprobe=1,
                                  default_rerank_depth=12)).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            got = c.post("/search", json={"query": QUERIES[2], "k": 7, "rerank": False}).json()
            asked = c.post("/search", json={"query": QUERIES[2], "k": 7, "nprobe": 2, "rerank": False}).json()
            rr = c.post("/search", json={"query": QUERIES[3], "k": 5}).json()
    finally:
        srv.stop()
    assert got["nprobe"] == 1 and asked["nprobe"] == 2
    _assert_same(got["results"][0]["hits"], searcher.search(QUERIES[2:3], k=7, nprobe=1)[0])
    _assert_same(asked["results"][0]["hits"], searcher.search(QUERIES[2:3], k=7, nprobe=2)[0])
    assert rr["reranked"] is True and rr["nprobe"] == 1
    _assert_same(rr["results"][0]["hits"], searcher.retrieve(QUERIES[3:4], 5, nprobe=1, rerank=True,
                                                             rerank_depth=12)[0])
