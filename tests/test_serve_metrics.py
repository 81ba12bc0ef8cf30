"""What an operator sees: /metrics scraped after a known mix of requests under concurrency (counts by route
and status, stage histograms, queue, batches, the version), hits trimmed to the fields asked for, and an
OpenAPI schema with the package's version, real answer schemas and no page that loads a CDN. A real uvicorn
server on 127.0.0.1, real tiny models, httpx."""

from __future__ import annotations

import concurrent.futures
import re

import httpx
import pytest

from densebeam import __version__
from densebeam.index_store.query.serve import Limits, create_app
from query_fixtures import ServerThread, tiny_searcher_with_reranker, toy_queries

QUERIES = toy_queries(40, seed=31)
SAMPLE = re.compile(r'^([a-z_][a-z0-9_]*)(\{(?:[a-z_][a-z0-9_]*="(?:[^"\\]|\\.)*",?)*\})? (-?[0-9.e+-]+|\+Inf)$')


@pytest.fixture(scope="module")
def searcher(tmp_path_factory, tiny_cos_model):
    return tiny_searcher_with_reranker(tmp_path_factory.mktemp("metrics"), tiny_cos_model, 200, 17)


@pytest.fixture()
def server(searcher):
    srv = ServerThread(create_app(searcher, Limits(batch_window_ms=3.0, max_body_bytes=64 << 10))).start()
    yield srv
    srv.stop()


def scrape(client) -> dict:
    """{(name, frozenset(labels)): value} of every sample, after checking every line's syntax."""
    answer = client.get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples, typed = {}, set()
    for line in answer.text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("# HELP "):
            continue
        m = SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        labels = frozenset(re.findall(r'([a-z_][a-z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        samples[(m.group(1), labels)] = float(m.group(3).replace("+Inf", "inf"))
        base = re.sub(r"_(bucket|sum|count)$", "", m.group(1))
        assert m.group(1) in typed or base in typed, f"{m.group(1)} has no # TYPE line"
    return samples


def value(samples, name, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_what_happened_under_load(server, searcher):
    valid = [{"query": q, "k": 5} for q in QUERIES[:24]] + [{"queries": QUERIES[24:28], "k": 3}]
    reranked = [{"query": q, "k": 3, "rerank": True, "rerank_depth": 10} for q in QUERIES[28:34]]
    invalid = [{"query": ""}, {"query": "x", "k": 0}, {"queries": []}, {"query": "x", "nope": 1}]
    with httpx.Client(base_url=server.url, timeout=60) as client:
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            codes = list(pool.map(lambda body: client.post("/search", json=body).status_code,
                                  valid + reranked + invalid))
        assert codes == [200] * (len(valid) + len(reranked)) + [422] * len(invalid)
        too_big = client.post("/search", content=b'{"query": "' + b"a" * (80 << 10) + b'"}',
                              headers={"content-type": "application/json"})
        assert too_big.status_code == 413
        assert client.get("/no/such/path").status_code == 404
        health = client.get("/health").json()
        m = scrape(client)

    ok = len(valid) + len(reranked)
    assert value(m, "densebeam_requests_total", route="/search", method="POST", status="200") == ok
    assert value(m, "densebeam_requests_total", route="/search", method="POST", status="422") == len(invalid)
    assert value(m, "densebeam_requests_total", route="/search", method="POST", status="413") == 1
    assert value(m, "densebeam_requests_total", route="other", method="GET", status="404") == 1
    assert value(m, "densebeam_requests_total", route="/health", method="GET", status="200") == 1
    assert value(m, "densebeam_request_seconds_count", route="/search") == ok + len(invalid) + 1
    assert not any(dict(labels).get("route") == "/no/such/path" for _, labels in m)  # no label per URL

    batches = value(m, "densebeam_batches_total")
    assert batches == health["batches"] and 1 <= batches <= ok
    assert value(m, "densebeam_batched_queries_total") == health["batched_queries"] == 24 + 4 + len(reranked)
    # One encode per batch; every search group reads the docstore once; re-ranked requests ran the
    # cross-encoder at least once; no BM25 was asked for.
    assert value(m, "densebeam_stage_seconds_count", stage="encode") == batches
    searches = value(m, "densebeam_stage_seconds_count", stage="search")
    assert searches >= batches and value(m, "densebeam_stage_seconds_count", stage="docstore") == searches
    assert value(m, "densebeam_stage_seconds_count", stage="rerank") >= 1
    assert value(m, "densebeam_stage_seconds_count", stage="bm25") == 0
    assert value(m, "densebeam_stage_seconds_sum", stage="encode") > 0
    for stage in ("encode", "search", "docstore", "rerank"):  # cumulative buckets, +Inf equals the count
        buckets = sorted((float(dict(labels)["le"].replace("+Inf", "inf")), v) for (name, labels), v in m.items()
                         if name == "densebeam_stage_seconds_bucket" and dict(labels)["stage"] == stage)
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and counts[-1] == value(m, "densebeam_stage_seconds_count", stage=stage)

    assert value(m, "densebeam_queue_queries") == 0
    assert value(m, "densebeam_reloads_total") == 0
    assert value(m, "densebeam_refused_total", reason="body_too_large") == 1
    assert value(m, "densebeam_vectors") == 200
    info = [labels for name, labels in m if name == "densebeam_bundle_info"]
    assert len(info) == 1 and dict(info[0])["manifest_sha256"] == health["manifest_sha256"]


def test_fields_keep_large_answers_small(server, searcher):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        full = client.post("/search", json={"query": QUERIES[0], "k": 200})
        slim = client.post("/search", json={"query": QUERIES[0], "k": 200, "fields": ["doc_id", "score"]})
        rows = client.post("/search", json={"query": QUERIES[0], "k": 5, "fields": ["row", "row", "doc_id"]})
        bad = client.post("/search", json={"query": QUERIES[0], "fields": ["doc_id", "password"]})
        empty = client.post("/search", json={"query": QUERIES[0], "fields": []})
    assert full.status_code == slim.status_code == rows.status_code == 200
    full_hits, slim_hits = full.json()["results"][0]["hits"], slim.json()["results"][0]["hits"]
    assert len(slim_hits) == 200 and all(set(h) == {"doc_id", "score"} for h in slim_hits)
    assert slim_hits == [{"doc_id": h["doc_id"], "score": h["score"]} for h in full_hits]
    assert len(slim.content) * 3 < len(full.content)
    assert [list(h) for h in rows.json()["results"][0]["hits"]] == [["row", "doc_id"]] * 5
    assert bad.status_code == 422 and "password" not in bad.text  # refused, and the input is not echoed
    assert empty.status_code == 422


def test_openapi_names_the_version_and_the_answers_and_no_cdn_page(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        spec = client.get("/openapi.json").json()
        pages = [client.get(p).status_code for p in ("/docs", "/redoc", "/docs/oauth2-redirect")]
    assert spec["info"]["version"] == __version__
    assert pages == [404, 404, 404]
    schemas = spec["components"]["schemas"]

    def ref(path, method):
        return spec["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]

    assert ref("/search", "post").endswith("/SearchAnswer") and ref("/health", "get").endswith("/HealthAnswer")
    assert ref("/info", "get").endswith("/InfoAnswer")
    assert {"results", "k", "nprobe", "reranked", "took_ms"} <= set(schemas["SearchAnswer"]["properties"])
    assert {"doc_id", "score", "text", "title", "row"} == set(schemas["Hit"]["properties"])
    assert {"422", "503"} <= set(spec["paths"]["/search"]["post"]["responses"])
    assert "/metrics" in spec["paths"] and "fields" in schemas["SearchRequest"]["properties"]
