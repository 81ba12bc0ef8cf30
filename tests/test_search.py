"""The query library on a real bundle built by the pipeline with tiny local models (no mocks)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from densebeam.index_store.encoding import cpu
from densebeam.index_store.artifacts import embeddings as emb
from densebeam.index_store.query.bm25 import BM25Index
from densebeam.index_store.query.hits import Hit
from densebeam.index_store.query.rerank import CrossEncoderReranker
from densebeam.index_store.query.search import Searcher
from densebeam.pipelines import cli
from conftest import build_tiny_bi_encoder
from kernel_checks import int16_kernels_here
from query_fixtures import build_tiny_bundle, build_tiny_cross_encoder, toy_queries

QUERIES = toy_queries(12)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, tiny_cos_model):
    return build_tiny_bundle(tmp_path_factory.mktemp("search-bundle"), tiny_cos_model, 240)


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    return build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny-ce"))


@pytest.fixture(scope="module")
def searcher(bundle, cross_encoder):
    return Searcher.open(bundle, precision="fp32", device="cpu", rerank_model=cross_encoder)


@pytest.fixture(scope="module")
def stored(bundle):
    """doc id -> vector from the embeddings dir the bundle was built from (an independent source)."""
    d = emb.open_embeddings(bundle + ".embeddings")
    return {i: v for ids, vecs in d.iter_batches() for i, v in zip(ids, vecs)}


def _ids(results):
    return [[h.doc_id for h in hits] for hits in results]


def test_query_vectors_match_the_index_model(searcher, tiny_cos_model):
    from sentence_transformers import SentenceTransformer

    vecs = searcher.encode_queries(QUERIES)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    ref = SentenceTransformer(tiny_cos_model, device="cpu").encode(QUERIES, normalize_embeddings=True)
    np.testing.assert_allclose(vecs, ref, atol=1e-5)


def test_exact_search_is_brute_force_over_the_embeddings(searcher, stored):
    results = searcher.search_exact(QUERIES, k=10)
    ids = list(stored)
    matrix = np.stack([stored[i] for i in ids])
    sims = searcher.encode_queries(QUERIES) @ matrix.T
    for q, hits in enumerate(results):
        want = np.argsort(-sims[q], kind="stable")[:10]
        np.testing.assert_allclose([h.score for h in hits], sims[q][want], atol=1e-5)
        cut = sims[q][want[-1]] + 1e-5  # ties at the cut may resolve either way
        assert {h.doc_id for h in hits if h.score > cut} == {ids[j] for j in want if sims[q][j] > cut}
        assert all(h.text for h in hits)


def test_ivf_search_hits_carry_text_and_equal_exact_when_probing_every_list(searcher, stored):
    exact = searcher.search_exact(QUERIES, k=10)
    full = searcher.search(QUERIES, k=10, nprobe=searcher.nlist)
    for a, b in zip(full, exact):  # same scores; same ids above the cut (ties at the cut may differ)
        np.testing.assert_allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
        cut = b[-1].score + 1e-5
        assert {h.doc_id for h in a if h.score > cut} == {h.doc_id for h in b if h.score > cut}
    default = searcher.search(QUERIES, k=10)
    assert len(default) == len(QUERIES) and all(len(h) == 10 for h in default)
    hit = default[0][0]
    assert isinstance(hit, Hit) and hit.doc_id in stored and hit.row >= 0
    doc = searcher.bundle.docstore.get([hit.row])[0]
    assert (doc["id"], doc["text"], doc["title"]) == (hit.doc_id, hit.text, hit.title)
    one = searcher.search(QUERIES[:1], k=5, nprobe=1)  # fewer lists: still well formed, best first
    assert [h.score for h in one[0]] == sorted((h.score for h in one[0]), reverse=True)


def test_stored_vectors_by_row_equal_the_embeddings(searcher, stored):
    rows = np.arange(searcher.bundle.searcher.ntotal)
    docs = searcher.bundle.docstore.get(rows.tolist())
    got = searcher.vectors.get(rows[::-1])[::-1]
    np.testing.assert_allclose(got, np.stack([stored[d["id"]] for d in docs]), atol=1e-6)


def test_model_override_must_agree_on_dim_and_similarity(bundle, tiny_cos_model, tiny_dot_model, tmp_path):
    with pytest.raises(ValueError, match="similarity|dim"):
        Searcher.open(bundle, model=tiny_dot_model, precision="fp32")
    small = str(build_tiny_bi_encoder(tmp_path / "small", normalize=True, hidden=16))
    with pytest.raises(ValueError, match="16-dim"):
        Searcher.open(bundle, model=small, precision="fp32")
    same = Searcher.open(bundle, model=tiny_cos_model, precision="fp32", verify="none")
    assert same.encoder.dim == 32


def test_bm25_matches_bm25s_over_the_same_texts(searcher, bundle):
    import bm25s

    bm = searcher.bm25
    docs = searcher.bundle.docstore.get(list(range(len(bm))))
    corpus = [f"{d['title']} {d['text']}" if d["title"] else d["text"] for d in docs]
    ref = bm25s.BM25(k1=0.9, b=0.4)
    ref.index(bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False)
    ref_ids, ref_scores = ref.retrieve(bm25s.tokenize(QUERIES, stopwords="en", show_progress=False), k=10,
                                       show_progress=False)
    got = searcher.search_bm25(QUERIES, 10)
    for q, hits in enumerate(got):
        keep = ref_scores[q] > 0
        np.testing.assert_allclose([h.score for h in hits], ref_scores[q][keep], rtol=1e-5)
        assert {h.row for h in hits} == {int(r) for r in ref_ids[q][keep]} or len(set(ref_scores[q])) < 10
    assert searcher.search_bm25(["zzzz qqqq"], 5) == [[]]  # no shared term: no hits
    assert isinstance(bm, BM25Index) and bm.params["k1"] == 0.9


def test_bm25_then_bi_encoder_rerank_rescores_by_stored_vectors(searcher, stored):
    bm = searcher.search_bm25(QUERIES, 50)
    out = searcher.retrieve(QUERIES, k=10, first_stage="bm25", bi_encoder_depth=50)
    qv = searcher.encode_queries(QUERIES)
    for q, hits in enumerate(out):
        pool = {h.doc_id for h in bm[q]}
        want = sorted(pool, key=lambda d: -float(stored[d] @ qv[q]))[:10]
        assert {h.doc_id for h in hits} <= pool
        np.testing.assert_allclose([h.score for h in hits], [float(stored[d] @ qv[q]) for d in want], atol=1e-5)


def test_cross_encoder_rerank_orders_by_the_cross_encoders_own_scores(searcher, cross_encoder):
    from sentence_transformers import CrossEncoder

    first = searcher.search(QUERIES, k=20)
    reranked = searcher.rerank(QUERIES, first, depth=15)
    plain = CrossEncoder(cross_encoder, device="cpu")
    moved = 0
    for q, (before, after) in enumerate(zip(first, reranked)):
        assert len(after) == 15 and {h.doc_id for h in after} == {h.doc_id for h in before[:15]}
        ref = plain.predict([(QUERIES[q], h.passage()) for h in after])
        np.testing.assert_allclose([h.score for h in after], ref, atol=1e-5)
        assert [h.score for h in after] == sorted((h.score for h in after), reverse=True)
        moved += [h.doc_id for h in after] != [h.doc_id for h in before[:15]]
    assert moved >= len(QUERIES) // 2, "the cross-encoder should reorder most lists"
    # the whole pipeline: dense top 15 -> cross-encoder -> top 5
    top = searcher.retrieve(QUERIES, k=5, rerank=True, rerank_depth=15)
    again = searcher.rerank(QUERIES, searcher.search(QUERIES, k=15), depth=15)
    assert _ids(top) == [[h.doc_id for h in r[:5]] for r in again]


def test_reranker_precision_and_errors(cross_encoder, searcher):
    pairs = [(q, "river water music film") for q in QUERIES]
    if cpu.native_bf16():
        bf16 = CrossEncoderReranker(cross_encoder, precision="bf16", device="cpu")
        np.testing.assert_allclose(bf16.score_pairs(pairs), searcher.reranker.score_pairs(pairs), atol=0.05)
    else:  # emulated bf16 would be slower than fp32 and less faithful: refused, naming the way out
        with pytest.raises(ValueError, match="needs bf16 arithmetic.*fp32"):
            CrossEncoderReranker(cross_encoder, precision="bf16", device="cpu")
    auto = "bf16-mixed" if cpu.native_bf16() else "int16" if int16_kernels_here() else "fp32"
    assert CrossEncoderReranker(cross_encoder, device="cpu").precision == auto
    with pytest.raises(ValueError, match="fp16 is not supported on CPU"):
        CrossEncoderReranker(cross_encoder, precision="fp16", device="cpu")
    with pytest.raises(ValueError, match="cannot load cross-encoder"):
        CrossEncoderReranker(str(Path(cross_encoder) / "missing"), device="cpu")
    no_ce = Searcher(searcher.bundle, searcher.encoder)
    with pytest.raises(ValueError, match="rerank_model"):
        no_ce.retrieve(QUERIES[:1], rerank=True)
    with pytest.raises(TypeError, match="list of strings"):
        searcher.search("one string", k=3)


def test_search_cli_json(bundle, cross_encoder, capsys):
    rc = cli.main(["search", "--index", bundle, "--query", QUERIES[0], "--query", QUERIES[1], "--k", "4",
                   "--precision", "fp32", "--rerank-model", cross_encoder, "--rerank-depth", "8", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["query"] for o in out] == QUERIES[:2]
    assert all(len(o["hits"]) == 4 and set(o["hits"][0]) == {"doc_id", "score", "text", "title", "row"}
               for o in out)
    rc = cli.main(["search", "--index", bundle, "--query", QUERIES[0], "--first-stage", "bm25"])
    assert rc == 0 and "query:" in capsys.readouterr().out
