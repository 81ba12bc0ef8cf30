"""The nprobe for every k: per-k curves from list membership equal searching, the pure choice of nprobe
from a manifest, and searches that never come back with fewer than k hits."""

from __future__ import annotations

import numpy as np
import pytest

from densebeam.index_store import ivf
from densebeam.index_store.ivf.nprobe import nprobe_by_k, nprobe_for_k, smallest_reaching
from ivf_helpers import add_to_empty

DIM, N, NLIST = 32, 6000, 64


def clustered(n: int, seed: int, clusters: int = 40, dim: int = DIM) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def index():
    xb = clustered(N, seed=1)
    trained = ivf.train_empty_index(xb[:4000], ivf.factory_string(NLIST, "Flat"))
    filled = add_to_empty(trained, np.arange(N, dtype=np.int64), xb)
    return xb, filled


def test_curves_for_several_k_equal_searching(index):
    """recall@k from list membership, for k = 10, 100, 1000 at once, equals what IVF searches measure."""
    xb, filled = index
    xq = clustered(150, seed=2)
    searcher = ivf.ShardedSearcher([filled])
    _, exact = ivf.exact_search([(np.arange(N), xb)], xq, 1000)
    lists = filled.quantizer.assign(xb, 1).ravel()[exact]
    nprobes = [1, 2, 4, 8, 16, 32, 64]
    curves = ivf.recall_curves_from_lists(filled, xq, exact, lists, nprobes, [10, 100, 1000], max_entries=500)
    for k in (10, 100, 1000):
        searched = [ivf.recall_at_k(searcher.search(xq, k, p)[1], exact, k) for p in nprobes]
        assert curves[k] == pytest.approx(searched, abs=1e-6), k
        assert curves[k][-1] == 1.0
    # The same nprobe finds a smaller share of a larger k: why one nprobe cannot serve every k.
    assert curves[1000][2] < curves[100][2] < curves[10][2]
    with pytest.raises(ValueError, match="1001"):
        ivf.recall_curves_from_lists(filled, xq, exact, lists, nprobes, [1001])


def test_search_filled_returns_k_hits(index):
    xb, filled = index
    xq = clustered(50, seed=3)
    searcher = ivf.ShardedSearcher([filled])
    _, plain = searcher.search(xq, 500, 1)
    short = (plain >= 0).sum(axis=1) < 500
    assert short.all()  # one list holds ~94 vectors: a k of 500 at nprobe 1 is short for every query
    scores, ids = ivf.search_filled(searcher, xq, 500, 1)
    assert ((ids >= 0).sum(axis=1) == 500).all()
    # A row that needed p lists is exactly the search at p: the best hits of the lists it probed.
    for q in range(5):
        p = 1
        while (searcher.search(xq[q:q + 1], 500, p)[1] >= 0).sum() < 500:
            p *= 2
        np.testing.assert_array_equal(ids[q], searcher.search(xq[q:q + 1], 500, p)[1][0])
    # Rows already full are left as the first search gave them.
    s10, i10 = searcher.search(xq, 10, 8)
    f10 = ivf.search_filled(searcher, xq, 10, 8)
    np.testing.assert_array_equal(f10[1], i10)
    np.testing.assert_array_equal(f10[0], s10)
    # More than the index holds: every vector, then empty slots (the index holds fewer than k).
    _, all_ids = ivf.search_filled(searcher, xq[:3], N + 5, 2)
    assert ((all_ids >= 0).sum(axis=1) == N).all() and (all_ids[:, N:] == -1).all()


def _curve(*pairs):
    return [{"nprobe": p, "recall": r} for p, r in pairs]


def test_nprobe_by_k_is_smallest_reaching_and_monotone():
    curves = {10: _curve((1, 0.8), (2, 0.96), (4, 0.99), (64, 1.0)),
              100: _curve((1, 0.6), (2, 0.97), (4, 0.98), (64, 1.0)),  # noise: reaches 0.95 earlier
              1000: _curve((1, 0.3), (2, 0.7), (4, 0.9), (64, 1.0))}
    chosen = nprobe_by_k(curves, 0.95)
    assert chosen == {10: {"nprobe": 2, "recall": 0.96}, 100: {"nprobe": 2, "recall": 0.97},
                      1000: {"nprobe": 64, "recall": 1.0}}
    assert nprobe_by_k({10: curves[10], 100: _curve((1, 0.99), (2, 0.99), (64, 1.0))}, 0.95)[100]["nprobe"] == 2
    assert smallest_reaching(curves[1000], 0.999) == {"nprobe": 64, "recall": 1.0}  # exhaustive fallback
    with pytest.raises(ValueError, match="empty"):
        smallest_reaching([], 0.9)


def test_nprobe_for_k_from_a_manifest():
    m = {"nlist": 4096, "nprobe": 8, "k": 10,
         "nprobe_by_k": {"10": {"nprobe": 8, "recall": 0.96}, "100": {"nprobe": 32, "recall": 0.95},
                         "1000": {"nprobe": 128, "recall": 0.95}}}
    assert [nprobe_for_k(m, k) for k in (1, 10, 11, 100, 101, 1000)] == [8, 8, 32, 32, 128, 128]
    assert nprobe_for_k(m, 2000) == 256 and nprobe_for_k(m, 3000) == 512  # proportional, power of two
    assert nprobe_for_k(m, 10**6) == 4096  # never above nlist
    # A bundle from before per-k curves: its one nprobe was measured at k = 10.
    old = {"nlist": 64, "nprobe": 4, "k": 10}
    assert nprobe_for_k(old, 10) == 4 and nprobe_for_k(old, 5) == 4
    assert nprobe_for_k(old, 100) == 64  # 4 * 100 / 10 = 40 -> 64
    assert nprobe_for_k(old, 30) == 16
    with pytest.raises(ValueError, match="positive"):
        nprobe_for_k(m, 0)


def test_nprobe_for_k_reads_the_typed_record_as_the_json():
    """A bundle's typed record (what the query side passes) gives the nprobe its JSON gives."""
    from densebeam.index_store.artifacts.bundle_manifest import Manifest

    base = {"format_version": 1, "layout": "merged", "factory": "IVF4096,Flat", "counts": {"vectors": 9, "shards": 1},
            "model_facts": {"model": "m", "revision": None, "dim": 4, "similarity": "cos", "dtype": "float32"},
            "files": [{"path": "trained.faiss", "size": 1, "sha256": "0" * 64}]}
    per_k = {"nlist": 4096, "nprobe": 8, "k": 10,
             "nprobe_by_k": {"10": {"nprobe": 8, "recall": 0.96}, "100": {"nprobe": 32, "recall": 0.95}}}
    old = {"nlist": 64, "nprobe": 4, "k": 10}
    for m in (per_k, old):
        record = Manifest.from_dict({**base, **m})
        assert [nprobe_for_k(record, k) for k in (1, 10, 11, 100, 101, 3000, 10**6)] == \
            [nprobe_for_k(m, k) for k in (1, 10, 11, 100, 101, 3000, 10**6)]
