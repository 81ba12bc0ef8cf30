"""A query's answer does not depend on what it is batched with: library calls of any composition and the
service under concurrent load give the same hits and scores, bit for bit, as the query asked alone.

Where the matrix kernels round a row differently by its batch's size (some CPU families and row counts),
a text encoded in a batch gets a vector that differs in the last bits from the one it gets alone; the
query path never lets that show. tests/test_load.py checks the real model at the default precision under
32 concurrent clients."""

from __future__ import annotations

import random
import threading

import httpx
import numpy as np
import pytest

from densebeam.index_store.query.search import Searcher
from densebeam.index_store.query.serve import Limits, create_app
from query_fixtures import ServerThread, build_tiny_bundle, build_tiny_cross_encoder, toy_queries

QUERIES = toy_queries(40, seed=31)


@pytest.fixture(scope="module")
def searcher(tmp_path_factory, tiny_cos_model):
    tmp = tmp_path_factory.mktemp("invariance")
    bundle = build_tiny_bundle(tmp, tiny_cos_model, 300, 29)
    return Searcher.open(bundle, precision="fp32", device="cpu", rerank_model=build_tiny_cross_encoder(tmp / "ce"))


def _exact(hits) -> list[tuple]:
    return [(h.doc_id, h.score, h.row) for h in hits]


def test_query_vectors_do_not_depend_on_the_batch(searcher):
    alone = np.stack([searcher.encode_queries([q])[0] for q in QUERIES])
    rng = random.Random(0)
    for _ in range(8):
        idx = [rng.randrange(len(QUERIES)) for _ in range(rng.randint(2, 24))]  # any mix, repeats too
        got = searcher.encode_queries([QUERIES[i] for i in idx])
        assert np.array_equal(got, alone[idx])


def test_search_and_rerank_answers_do_not_depend_on_the_batch(searcher):
    together = searcher.search(QUERIES, k=7)
    assert [_exact(h) for h in together] == [_exact(searcher.search([q], k=7)[0]) for q in QUERIES]
    reranked = searcher.retrieve(QUERIES[:5], 5, rerank=True, rerank_depth=10)
    alone = [searcher.retrieve([q], 5, rerank=True, rerank_depth=10)[0] for q in QUERIES[:5]]
    assert [_exact(h) for h in reranked] == [_exact(h) for h in alone]


def test_service_answers_equal_the_library_bit_for_bit_under_concurrency(searcher):
    """16 concurrent clients, mixed k, multi-query requests and re-ranking: every hit and score equals a
    library call with that one query (exact float equality, not a tolerance)."""
    expected, lock = {}, threading.RLock()

    def want(query, k, rerank):
        key = (query, k, rerank)
        with lock:
            if key not in expected:
                hits = searcher.retrieve([query], k, rerank=rerank, rerank_depth=10)[0]
                expected[key] = [(h.doc_id, h.score, h.text, h.title, h.row) for h in hits]
            return expected[key]

    srv = ServerThread(create_app(searcher, Limits(batch_window_ms=5.0))).start()
    wrong, answered = [], []
    try:
        before = httpx.get(srv.url + "/health").json()

        def client(seed):
            rng = random.Random(seed)
            with httpx.Client(base_url=srv.url, timeout=120) as c:
                for _ in range(12):
                    queries = rng.sample(QUERIES, rng.choice([1, 1, 1, 2, 5]))
                    k, rerank = rng.randint(1, 10), rng.random() < 0.2
                    body = {"queries": queries, "k": k, "rerank": rerank}
                    if rerank:
                        body["rerank_depth"] = 10
                    r = c.post("/search", json=body)
                    for q, out in zip(queries, r.json()["results"]):
                        got = [(h["doc_id"], h["score"], h["text"], h["title"], h["row"]) for h in out["hits"]]
                        right = got == want(q, k, rerank)
                        with lock:
                            answered.append(q)
                            if not right:
                                wrong.append((q, k, rerank))

        threads = [threading.Thread(target=client, args=(s,)) for s in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        after = httpx.get(srv.url + "/health").json()
    finally:
        srv.stop()
    assert len(answered) > 16 * 12 and not wrong, wrong[:5]
    assert after["batches"] - before["batches"] < 16 * 12, "concurrent requests should share batches"
