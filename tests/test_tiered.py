"""Tiered bundles: compact codes (SQ8, PQ) searched first, the top k x r re-scored exactly from float32
vectors kept on disk; the refine factor per k is measured at build time and recorded like nprobe."""

from __future__ import annotations

import json

import numpy as np
import pytest

from densebeam.index_store.artifacts import bundle as bundle_lib
from densebeam.index_store.artifacts import embeddings as emb
from densebeam.index_store.artifacts import raw_vectors
from densebeam.index_store.ivf.plan import plan_build
from densebeam.index_store.ivf.refine import RefinedSearcher, choose_refine, refine_for_k
from densebeam.index_store.ivf.search import recall_at_k, search_filled
from densebeam.pipelines import build_index, cli
from test_build_index import FACTS, LOCAL, clustered, write_embeddings_dir

N, NLIST, QUERIES = 6000, 64, 300


@pytest.fixture(scope="module")
def tiered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiered")
    vecs = clustered(N, seed=3)
    emb_dir = write_embeddings_dir(tmp / "emb", vecs, FACTS, shard_rows=1700)  # 4 uneven shards
    out = {}
    for name, extra in {"pq": ["--codec", "PQ8x8"], "sq8-shards": ["--codec", "SQ8", "--layout", "shards"],
                        "rabitq": ["--codec", "RaBitQ"]}.items():
        out[name] = build_index.run(["--embeddings", emb_dir, "--output", str(tmp / name), "--nlist", str(NLIST),
                                     "--recall-queries", str(QUERIES), "--k", "10,100", *extra, *LOCAL])
    return tmp, vecs, emb_dir, out


def held_out(emb_dir, vecs, k):
    """The build's held-out query rows and their exact top-k (own row excluded)."""
    plan = plan_build([emb.open_embeddings(emb_dir)], nlist=NLIST, n_queries=QUERIES, codec="PQ8x8")
    qids = np.concatenate([s.base + plan.sample_rows(s)[1] for s in plan.shards])
    sims = vecs[qids] @ vecs.T
    sims[np.arange(len(qids)), qids] = -np.inf
    return qids, np.argsort(-sims, axis=1, kind="stable")[:, :k]


def test_manifest_curves_are_what_a_refined_search_of_the_bundle_finds(tiered):
    """Every recorded (k, r, nprobe) recall equals searching the opened bundle: the compact top k*r (own
    row dropped) re-scored from its vectors files, against brute force."""
    tmp, vecs, emb_dir, out = tiered
    m = out["pq"]
    searcher = bundle_lib.open_bundle(str(tmp / "pq")).searcher
    assert isinstance(searcher, RefinedSearcher)
    for k in (10, 100):
        qids, exact = held_out(emb_dir, vecs, k)
        for r, curve in m["refine"]["curves"][str(k)].items():
            r = int(r)
            for point in curve[::3]:
                _, cand = searcher.inner.search(vecs[qids], k * r + 1, point["nprobe"])
                cand = np.array([[i for i in row if i != q][:k * r] for row, q in zip(cand, qids)])
                scores = np.where(cand >= 0, np.einsum("qcd,qd->qc", vecs[np.maximum(cand, 0)], vecs[qids]), -np.inf)
                top = np.take_along_axis(cand, np.argsort(-scores, axis=1, kind="stable")[:, :k], axis=1)
                assert recall_at_k(top, exact, k) == pytest.approx(point["recall"], abs=1e-3), (k, r, point)


def test_refinement_recovers_what_compact_scores_lose(tiered):
    """PQ8x8's own top 10 holds under 80% of the true top 10 even exhaustively (r = 1: the compact top k,
    only re-ordered); re-scoring k x r candidates reaches the target at the factor the build chose."""
    tmp, _, _, out = tiered
    refined = out["pq"]
    assert refined["refine"]["curves"]["10"]["1"][-1]["recall"] < 0.8
    r = refined["refine"]["factors_by_k"]["10"]
    assert r > 1 and refined["nprobe_by_k"]["10"]["recall"] >= 0.95
    assert refined["recall_curves"]["10"] == refined["refine"]["curves"]["10"][str(r)]
    files = {f["path"] for f in refined["files"]}
    assert set(refined["refine"]["files"]) <= files and len(refined["refine"]["files"]) == 4


@pytest.mark.parametrize("name", ["pq", "sq8-shards", "rabitq"])
def test_refined_hits_carry_exact_scores_and_meet_the_target_on_fresh_queries(tiered, name):
    tmp, vecs, _, out = tiered
    bundle = bundle_lib.open_bundle(str(tmp / name))
    assert bundle.record.tiered and bundle.record.refine_by_k == {int(k): v for k, v in
                                                                 out[name]["refine"]["factors_by_k"].items()}
    queries = clustered(200, seed=77)
    nprobe = out[name]["nprobe_by_k"]["10"]["nprobe"]
    scores, ids = search_filled(bundle.searcher, queries, 10, nprobe)
    assert (ids >= 0).all()
    np.testing.assert_allclose(scores, np.einsum("qkd,qd->qk", vecs[ids], queries), atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-7).all()
    exact = np.argsort(-(queries @ vecs.T), axis=1, kind="stable")[:, :10]
    assert recall_at_k(ids, exact, 10) >= 0.93  # target 0.95 measured on held-out vectors


def test_exact_search_of_a_tiered_bundle_reads_its_float32_vectors(tiered):
    """Brute force over a tiered bundle is exact (the vectors files), not the codes' approximation."""
    from densebeam.index_store.query.search import Searcher

    tmp, vecs, _, _ = tiered
    searcher = Searcher(bundle_lib.open_bundle(str(tmp / "rabitq")), lambda: None)
    queries = clustered(20, seed=78)
    from densebeam.index_store.ivf.search import exact_search

    scores, rows = exact_search(searcher.vectors.iter_batches(1000), queries, 10)
    want = np.argsort(-(queries @ vecs.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(rows, want)
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ vecs.T, want, axis=1), atol=1e-5)


def test_vectors_files_are_plain_npy_in_row_order(tiered):
    tmp, vecs, _, out = tiered
    parts = [np.load(tmp / "pq" / p, mmap_mode="r") for p in out["pq"]["refine"]["files"]]
    np.testing.assert_array_equal(np.concatenate(parts), vecs)


def test_a_damaged_vectors_file_is_refused_at_open_naming_it(tiered, tmp_path):
    import shutil

    tmp, *_ = tiered
    bad = tmp_path / "bad"
    shutil.copytree(tmp / "pq", bad)
    part = bad / raw_vectors.paths(4)[2]
    part.write_bytes(part.read_bytes()[:-4])  # one float short
    with pytest.raises(bundle_lib.BundleError, match=r"part-00002-of-00004.npy has \d+ bytes, expected"):
        bundle_lib.open_bundle(str(bad), verify="none")  # past the hashes: the structure check catches it
    with pytest.raises(bundle_lib.BundleError, match="part-00002-of-00004.npy"):
        bundle_lib.open_bundle(str(bad))
    manifest = json.loads((tmp / "pq" / "manifest.json").read_text())
    manifest["refine"]["files"] = manifest["refine"]["files"][:3]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(bundle_lib.BundleError, match="refine"):
        bundle_lib.open_bundle(str(bad), verify="none")


def test_inspect_shows_resident_and_on_disk_bytes(tiered, capsys):
    tmp, *_ = tiered
    assert cli.main(["inspect", str(tmp / "pq")]) == 0
    out = capsys.readouterr().out
    assert "re-scored exactly" in out and "on disk" in out and "resident" in out


def test_choose_refine_reads_the_fewest_bytes_among_points_reaching_the_target():
    curves = {1: [{"nprobe": 4, "recall": 0.5}, {"nprobe": 64, "recall": 0.8}],
              4: [{"nprobe": 4, "recall": 0.9}, {"nprobe": 16, "recall": 0.96}],
              16: [{"nprobe": 2, "recall": 0.97}, {"nprobe": 4, "recall": 0.99}]}
    # lists cheap, vectors dear: r=4 at nprobe 16 (16*10 + 10*4*1000) beats r=16 at 2 (20 + 160000)
    assert choose_refine(curves, 0.95, 10, 1000, 10) == (4, {"nprobe": 16, "recall": 0.96})
    # lists dear: r=16 at nprobe 2
    assert choose_refine(curves, 0.95, 100_000, 10, 10) == (16, {"nprobe": 2, "recall": 0.97})
    # nothing reaches 0.999: the cheapest point within 0.01 of the best recall (0.99)
    assert choose_refine(curves, 0.999, 10, 10, 10) == (16, {"nprobe": 4, "recall": 0.99})
    assert choose_refine({1: [{"nprobe": 8, "recall": 0.795}, {"nprobe": 2048, "recall": 0.802}]}, 0.95, 100, 10,
                         1000) == (1, {"nprobe": 8, "recall": 0.795})
    assert refine_for_k({10: 8, 100: 2}, 5) == 8 and refine_for_k({10: 8, 100: 2}, 50) == 2
    assert refine_for_k({10: 8, 100: 2}, 500) == 2 and refine_for_k({}, 10) == 1


def test_inspect_plot_draws_the_refine_curves(tiered, tmp_path):
    """A tiered bundle's picture adds recall@k against nprobe for every refine factor, the chosen one
    marked at the nprobe the manifest records."""
    import re

    tmp, _, _, out = tiered
    path = tmp_path / "pq.svg"
    assert cli.main(["inspect", str(tmp / "pq"), "--plot", str(path)]) == 0
    text = path.read_text()
    m = out["pq"]
    assert sorted(int(r) for r in re.findall(r'<polyline data-r="(\d+)"', text)) == \
        sorted(int(r) for r in m["refine"]["curves"]["10"])
    chosen = re.findall(r'<circle class="chosen" data-r="(\d+)" data-nprobe="(\d+)"', text)
    assert chosen == [(str(m["refine"]["factors_by_k"]["10"]), str(m["nprobe_by_k"]["10"]["nprobe"]))]
