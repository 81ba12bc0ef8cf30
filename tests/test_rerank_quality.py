"""Retrieve & re-rank with the trained MS MARCO cross-encoder (../shared/models/ms-marco-MiniLM-L-12-v2)
on dl19-subset: re-ranking the dense and the BM25 top 30 raises nDCG@10 by at least 0.03 over each first
stage, the library, the CLI (``densebeam eval --rerank-model``) and the HTTP service give the same
answers, and int16 (the default on x86-64 CPUs without bf16 arithmetic) re-ranks as fp32 does."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from densebeam.index_store.encoding import cpu

from densebeam.index_store.query import evaluate as ev
from densebeam.index_store.query.rerank import CrossEncoderReranker
from densebeam.index_store.query.search import Searcher
from densebeam.index_store.query.serve import create_app
from densebeam.pipelines import cli
from densebeam.pipelines.build_index import run_build
from conftest import SHARED_DATA
from kernel_checks import int16_kernels_here
from query_fixtures import ServerThread

pytestmark = pytest.mark.slow
COLLECTION = SHARED_DATA / "dl19-subset"
CROSS_ENCODER = SHARED_DATA.parent / "models" / "ms-marco-MiniLM-L-12-v2"
DEPTH = 30  # the top 30 carries most of a re-rank's nDCG@10 gain and keeps the suite quick on any CPU


@pytest.fixture(scope="module")
def dl19(tmp_path_factory):
    if not COLLECTION.exists() or not CROSS_ENCODER.exists():
        pytest.skip("../shared/data/dl19-subset or ../shared/models/ms-marco-MiniLM-L-12-v2 is not here")
    out = tmp_path_factory.mktemp("dl19") / "bundle"
    run_build(["--input", str(COLLECTION / "corpus.jsonl"), "--output", str(out), "--runner", "local",
               "--model", "sentence-transformers/all-MiniLM-L6-v2", "--overwrite"])
    queries = ev.read_queries(str(COLLECTION / "queries.jsonl"))
    qrels = ev.read_qrels(str(COLLECTION / "qrels.tsv"))
    queries = {q: t for q, t in queries.items() if q in qrels}
    return str(out), Searcher.open(str(out), rerank_model=str(CROSS_ENCODER)), queries, qrels


def _ndcg(qrels, queries, results):
    return ev.evaluate(qrels, ev.run_from_hits(list(queries), results), list(queries)).metrics["ndcg@10"]


@pytest.fixture(scope="module")
def ranked(dl19):
    """stage -> (its top DEPTH, the top 10 after re-ranking that depth), each computed once for the module."""
    _, searcher, queries, _ = dl19
    texts, cache = list(queries.values()), {}

    def get(stage):
        if stage not in cache:
            cache[stage] = (searcher.retrieve(texts, DEPTH, first_stage=stage),
                            searcher.retrieve(texts, 10, first_stage=stage, rerank=True, rerank_depth=DEPTH))
        return cache[stage]
    return get


@pytest.mark.parametrize("stage", ["dense", "bm25"])
def test_the_cross_encoder_raises_ndcg_over_the_first_stage(dl19, ranked, stage):
    _, searcher, queries, qrels = dl19
    assert searcher.reranker.packed is None  # the packed forward, not CrossEncoder.predict
    first, reranked = (_ndcg(qrels, queries, results) for results in ranked(stage))
    assert reranked >= first + 0.03, (stage, first, reranked)


def test_library_cli_and_service_agree(dl19, ranked, tmp_path, capsys):
    """The same queries' re-ranked top 10 (ids and scores) from the library, ``densebeam eval
    --rerank-model`` (its TREC run) and the service; eight queries suffice for the two front ends."""
    path, searcher, queries, qrels = dl19
    library = dict(zip(queries, ranked("dense")[1]))
    some = dict(list(queries.items())[:8])
    qfile, run_file = tmp_path / "queries.jsonl", tmp_path / "run.trec"
    qfile.write_text("".join(json.dumps({"_id": q, "text": t}) + "\n" for q, t in some.items()))
    assert cli.main(["eval", "--index", path, "--queries", str(qfile), "--qrels", str(COLLECTION / "qrels.tsv"),
                     "--rerank-model", str(CROSS_ENCODER), "--rerank-depth", str(DEPTH), "--k", "10",
                     "--run-out", str(run_file), "--json"]) == 0
    from_cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert from_cli["ndcg@10"] == pytest.approx(_ndcg(qrels, some, [library[q] for q in some]), abs=1e-6)
    lines = [line.split() for line in run_file.read_text().splitlines()]
    for q in some:
        assert [(d, np.float32(s)) for qid, _, d, _, s, _ in lines if qid == q] == \
            [(h.doc_id, np.float32(h.score)) for h in library[q]], q  # .9g round-trips float32
    server = ServerThread(create_app(searcher, default_rerank_depth=DEPTH)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for q, text in some.items():
                got = client.post("/search", json={"query": text, "k": 10, "rerank": True}).json()
                answer = got["results"][0]["hits"] if "results" in got else got["hits"]
                assert [(h["doc_id"], h["score"]) for h in answer] == [(h.doc_id, h.score) for h in library[q]]
    finally:
        server.stop()


def test_int16_re_ranks_as_fp32_does(dl19):
    """The trained cross-encoder in int16 against fp32 on eight queries' dense top 30: every score within
    0.02 (logits spread over about 17; the whole collection: ``bench/query_bench.py --rerank-fidelity``)
    and each top 10 in fp32's order, but for neighbours fp32 scores within 0.02 of each other."""
    if not int16_kernels_here():
        pytest.skip(f"no native int16 kernels on this CPU (family {cpu.family()})")
    _, searcher, queries, _ = dl19
    texts = list(queries.values())[:8]
    first = searcher.retrieve(texts, DEPTH, first_stage="dense")
    int16, fp32 = (CrossEncoderReranker(str(CROSS_ENCODER), precision=p, device="cpu") for p in ("int16", "fp32"))
    got, want = int16.rerank(texts, first, DEPTH), fp32.rerank(texts, first, DEPTH)
    for a, b in zip(got, want):
        scores = {h.doc_id: h.score for h in b}
        assert max(abs(h.score - scores[h.doc_id]) for h in a) < 0.02
        for x, y in zip(a[:10], a[1:10]):  # int16's order, judged by fp32's scores
            assert scores[x.doc_id] >= scores[y.doc_id] - 0.02, (x, y)
