"""--memory-budget chooses the codec by measuring the candidates that fit, on a sample of the vectors."""

import json

import faiss
import pytest

from densebeam.index_store.artifacts import bundle as bundle_lib
from densebeam.index_store.artifacts.bundle_manifest import BundleError
from densebeam.index_store.artifacts.embeddings import open_embeddings
from densebeam.index_store.ivf import codec_choice as cc
from densebeam.index_store.ivf.files import ID_BYTES
from densebeam.index_store.ivf.plan import plan_build
from densebeam.pipelines import build_index, cli
from test_build_index import FACTS, LOCAL, clustered, write_embeddings_dir


@pytest.mark.parametrize("budget,want", [
    (2 * 10**9, ["Flat", "SQ8", "PQ96x8", "RaBitQ"]),
    (5 * 10**8, ["SQ8", "PQ96x8", "RaBitQ"]),
    (10**8, ["PQ64x8", "RaBitQ"]),  # 100 bytes a vector: PQ96 (104 with its id) no longer fits
    (5 * 10**7, ["PQ32x8"]),  # 50 bytes: RaBitQ's 56-byte codes do not
    (10**6, []),
])
def test_fitting_codecs_fit_the_budget(budget, want):
    n, dim = 10**6, 384
    got = cc.fitting_codecs(n, dim, budget)
    assert got == want
    for codec in got:
        assert n * (cc.code_bytes(codec, dim) + ID_BYTES) <= budget
        faiss.index_factory(dim, f"IVF16,{codec}", faiss.METRIC_INNER_PRODUCT)


def _record(codec, bytes_per_vector, recall, factors, tiered=True):
    return {"codec": codec, "bytes_per_vector": bytes_per_vector, "tiered": tiered, "recall": recall,
            "factors": factors}


def test_choice_prefers_reaching_the_target_then_fewer_reads_then_fewer_bytes():
    a = _record("A", 200, {10: {1: 0.90, 2: 0.97}}, {10: 2})
    b = _record("B", 60, {10: {8: 0.96}}, {10: 8})
    c = _record("C", 40, {10: {16: 0.93}}, {10: 16})  # misses the target
    assert cc.choose([c, b, a], 0.95) == "A"  # both reach it; A re-scores 20 vectors a query, B 80
    assert cc.choose([c, b], 0.95) == "B"
    assert cc.choose([c, _record("D", 50, {10: {16: 0.91}}, {10: 16})], 0.95) == "C"  # closer to the target
    same = _record("E", 30, {10: {2: 0.99}}, {10: 2})
    assert cc.choose([a, same], 0.95) == "E"  # same reads: fewer resident bytes
    assert cc.choose([a, _record("Flat", 1544, {10: {1: 1.0}}, {10: 1}, tiered=False)], 0.95) == "Flat"
    with pytest.raises(ValueError):
        cc.choose([], 0.95)


def test_budget_codec_is_measured_recorded_and_deterministic(tmp_path, capsys):
    """32,768 bytes for 1,460 vectors (the smallest budget whose training sample, 256 vectors, trains PQ):
    PQ8x8 and RaBitQ fit, SQ8 does not. Both are trained and measured on the sample, the build uses the
    one the record marks, tiered, and the choice is the candidate ranked first by (shortfall, vectors
    re-scored, bytes) of its own numbers; planning again chooses the same from the same numbers."""
    vecs = clustered(1460, seed=5)
    emb_dir = write_embeddings_dir(tmp_path / "emb", vecs, FACTS, shard_rows=800)
    budget = 32768
    m = build_index.run(["--embeddings", emb_dir, "--output", str(tmp_path / "b"), "--memory-budget", str(budget),
                         *LOCAL])
    assert m["counts"]["training_vectors"] == 256
    choice = m["codec_choice"]
    assert [c["codec"] for c in choice["candidates"]] == ["PQ8x8", "RaBitQ"]
    assert choice["budget_bytes"] == budget and choice["queries"] == 146 and choice["sample"] == 1314
    chosen = [c for c in choice["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and chosen[0]["codec"] == m["codec"]
    # tiered: the budget holds the codes; the float32 vectors are on disk, re-scoring the top k x r
    assert m["refine"]["factors_by_k"] and all(f in {e["path"] for e in m["files"]} for f in m["refine"]["files"])

    def key(c):
        shortfall = sum(max(0.0, m["target_recall"] - c["recall"][k][str(r)]) for k, r in c["factors"].items())
        return round(shortfall, 4), sum(int(k) * r for k, r in c["factors"].items()), c["bytes_per_vector"]

    assert key(chosen[0]) == min(key(c) for c in choice["candidates"])
    for c in choice["candidates"]:  # the factor per k: the smallest reaching the target, else the largest
        for k, r in c["factors"].items():
            reach = [int(f) for f, v in c["recall"][k].items() if v >= m["target_recall"]]
            assert r == (min(reach) if reach else max(int(f) for f in c["recall"][k]))
    again = plan_build([open_embeddings(emb_dir)], memory_budget_bytes=budget)
    assert again.codec == m["codec"] and again.codec_choice == choice
    assert cli.main(["inspect", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert f"codec {m['codec']} chosen under --memory-budget {budget} bytes, measured on 1314 sampled" in out
    assert "* " + m["codec"] in out
    searcher = bundle_lib.open_bundle(str(tmp_path / "b")).searcher
    assert searcher.ntotal == 1460
    assert (searcher.search(vecs[:5], 1, 8)[1][:, 0] == [0, 1, 2, 3, 4]).all()  # exact re-scoring finds itself
    # a damaged record is refused at open, naming it, not left for inspect to trip on
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    manifest["codec_choice"]["candidates"][0]["factors"]["10"] = "two"
    (tmp_path / "b" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="codec_choice"):
        bundle_lib.open_bundle(str(tmp_path / "b"))


def test_flat_fits_without_measuring_and_no_codec_fits_is_refused(tmp_path):
    vecs = clustered(1000, seed=12)
    emb_dir = write_embeddings_dir(tmp_path / "emb", vecs, FACTS, shard_rows=1000)
    plan = plan_build([open_embeddings(emb_dir)], memory_budget_bytes=1000 * (4 * 32 + 8))
    assert plan.codec == "Flat" and plan.codec_choice is None
    with pytest.raises(ValueError, match=r"1000 vectors do not fit in 8000 bytes with any codec"):
        plan_build([open_embeddings(emb_dir)], memory_budget_bytes=8000)


def test_calibration_query_vectors_measure_the_choice(tmp_path):
    """With ``--calibration-queries`` vectors (.npy), the candidates are measured on those queries, all of
    the sample indexed; a file of the wrong width is refused naming it."""
    import numpy as np

    vecs = clustered(1460, seed=5)
    emb_dir = write_embeddings_dir(tmp_path / "emb", vecs, FACTS, shard_rows=800)
    queries = tmp_path / "q.npy"
    np.save(queries, clustered(60, seed=99))
    plan = plan_build([open_embeddings(emb_dir)], memory_budget_bytes=32768, calibration_queries=str(queries))
    choice = plan.codec_choice
    assert choice["queries_from"] == str(queries) and choice["queries"] == 60 and choice["sample"] == 1460
    assert plan.codec == next(c["codec"] for c in choice["candidates"] if c["chosen"])
    np.save(queries, np.zeros((5, 7), np.float32))
    with pytest.raises(ValueError, match=r"q.npy holds a float32 array of shape \(5, 7\)"):
        plan_build([open_embeddings(emb_dir)], memory_budget_bytes=32768, calibration_queries=str(queries))
