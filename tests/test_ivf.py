"""FAISS planning and operations on seeded clustered vectors, compared with brute force."""

from __future__ import annotations

import math
import os
import shutil

import faiss
import fsspec
import numpy as np
import pytest

from densebeam.index_store import ivf
from densebeam.index_store.ivf.search import merge_topk
from ivf_helpers import add_batches, add_to_empty

DIM, N, NLIST, K = 32, 6000, 64, 10


def clustered(n: int, dim: int = DIM, clusters: int = 40, spread: float = 0.35, seed: int = 0):
    """Unit vectors around ``clusters`` random centres (structure IVF can exploit, unlike pure noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def data():
    xb = clustered(N, seed=1)
    xq = clustered(200, seed=2)
    sample = xb[np.random.default_rng(3).choice(N, ivf.training_sample_size(NLIST, N, DIM, None),
                                                replace=False)]
    trained = ivf.train_empty_index(sample, ivf.factory_string(NLIST, "Flat"))
    ids = np.arange(N, dtype=np.int64)
    bounds = [0, 1700, 4100, N]  # three uneven shards with contiguous row ids
    shards = [add_batches(trained, ((ids[s:e][i:i + 500], xb[s:e][i:i + 500])
                                        for i in range(0, e - s, 500)))
              for s, e in zip(bounds, bounds[1:])]
    return xb, xq, ids, trained, shards


def test_sharded_search_equals_one_index(data):
    xb, xq, ids, trained, shards = data
    assert [s.ntotal for s in shards] == [1700, 2400, 1900]
    single = ivf.index_from_bytes(trained)
    single.add_with_ids(xb, ids)
    single.nprobe = 4
    want_scores, want_ids = single.search(xq, K)
    searcher = ivf.ShardedSearcher(shards)
    assert searcher.ntotal == N and searcher.nlist == NLIST
    got_scores, got_ids = searcher.search(xq, K, nprobe=4)
    np.testing.assert_array_equal(got_ids, want_ids)
    np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    assert got_scores.dtype == np.float32 and got_ids.dtype == np.int64
    # descending scores per query
    assert np.all(np.diff(got_scores, axis=1) <= 1e-7)


def test_shards_share_one_quantizer_search(data):
    """Shards of one trained index are searched with one quantizer search (search_preassigned): the same
    hits as searching each shard on its own; shards of different trainings are searched one by one."""
    xb, xq, ids, trained, shards = data
    searcher = ivf.ShardedSearcher(shards)
    assert searcher._shared is not None
    for nprobe in (1, 5, NLIST, 10 * NLIST):
        want = merge_topk(*(np.concatenate(x, axis=1) for x in zip(
            *[s.search(xq, K, params=faiss.SearchParametersIVF(nprobe=min(nprobe, NLIST))) for s in shards])), K)
        got = searcher.search(xq, K, nprobe)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_allclose(got[0], want[0], atol=1e-6)
    other = add_to_empty(ivf.train_empty_index(xb[:3000], ivf.factory_string(NLIST, "Flat"), seed=99),
                             ids[:100], xb[:100])
    mixed = ivf.ShardedSearcher([shards[0], other])
    assert mixed._shared is None
    want = merge_topk(*(np.concatenate(x, axis=1) for x in zip(
        shards[0].search(xq, K, params=faiss.SearchParametersIVF(nprobe=4)),
        other.search(xq, K, params=faiss.SearchParametersIVF(nprobe=4)))), K)
    np.testing.assert_array_equal(mixed.search(xq, K, 4)[1], want[1])


def test_add_to_empty_matches_add_batches(data):
    xb, xq, ids, trained, shards = data
    one = add_to_empty(trained, ids[:1700], xb[:1700])
    np.testing.assert_array_equal(one.search(xq, K)[1], shards[0].search(xq, K)[1])
    with pytest.raises(ValueError, match="trained and empty"):
        add_to_empty(ivf.index_to_bytes(one), ids[:3], xb[:3])
    with pytest.raises(ValueError, match="shape"):
        add_to_empty(trained, ids[:3], xb[:3, :8])


def test_merge_on_disk_equals_shards_and_survives_move(data, tmp_path):
    xb, xq, ids, trained, shards = data
    bundle = tmp_path / "bundle"
    paths = []
    for i, shard in enumerate(shards):
        paths.append(str(bundle / "shards" / f"shard-{i:05d}-of-00003.faiss"))
        ivf.write_index(shard, paths[-1])
    assert ivf.merge_on_disk(trained, paths, str(bundle / "index.faiss"), str(bundle / "index.ivfdata")) == N
    assert not [p for p in os.listdir(bundle) if ".tmp-" in p]
    # Byte for byte what FAISS's own (memory-mapped) merge writes, and the same list table.
    ref = faiss.OnDiskInvertedLists(NLIST, shards[0].code_size, str(tmp_path / "ref.ivfdata"))
    vec = faiss.InvertedListsPtrVector()
    for shard in shards:
        vec.push_back(shard.invlists)
    assert ref.merge_from_multiple(vec.data(), vec.size(), False) == N
    assert (bundle / "index.ivfdata").read_bytes() == (tmp_path / "ref.ivfdata").read_bytes()
    # Through user space (no copy_file_range): one list per read; a few lists per read; all at once.
    for slab in (1, 50_000, 64 << 20):
        again = tmp_path / f"slab-{slab}"
        ivf.merge_on_disk(trained, paths, str(again / "index.faiss"), str(again / "index.ivfdata"), slab,
                          kernel_copy=False)
        assert (again / "index.ivfdata").read_bytes() == (tmp_path / "ref.ivfdata").read_bytes()
    opened = ivf.open_merged(str(bundle / "index.faiss"), str(bundle / "index.ivfdata"))
    ours = faiss.downcast_InvertedLists(faiss.extract_index_ivf(opened).invlists)  # owned by ``opened``
    assert ours.totsize == ref.totsize
    assert [(ours.lists.at(j).offset, ours.lists.at(j).size, ours.lists.at(j).capacity) for j in range(NLIST)] \
        == [(ref.lists.at(j).offset, ref.lists.at(j).size, ref.lists.at(j).capacity) for j in range(NLIST)]
    del ours, opened, ref
    want = ivf.ShardedSearcher(shards).search(xq, K, nprobe=8)
    merged = ivf.open_merged(str(bundle / "index.faiss"), str(bundle / "index.ivfdata"))
    got = ivf.ShardedSearcher([merged]).search(xq, K, nprobe=8)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], atol=1e-5)
    del merged
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(str(bundle), str(moved))
    assert not bundle.exists()
    merged = ivf.open_merged(str(moved / "index.faiss"), str(moved / "index.ivfdata"))
    assert merged.ntotal == N
    got = ivf.ShardedSearcher([merged]).search(xq, K, nprobe=8)
    np.testing.assert_array_equal(got[1], want[1])
    # a truncated data file is refused instead of crashing on access (truncate a copy: truncating a file
    # that a live index still maps would make that mapping fault with SIGBUS)
    broken = tmp_path / "broken"
    shutil.copytree(moved, broken)
    with open(broken / "index.ivfdata", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match="truncated"):
        ivf.open_merged(str(broken / "index.faiss"), str(broken / "index.ivfdata"))


def test_merge_refuses_shard_from_other_training(data, tmp_path):
    xb, _, ids, trained, _ = data
    other = ivf.train_empty_index(xb[:3000], ivf.factory_string(NLIST, "Flat"), seed=99)
    path = str(tmp_path / "other.faiss")
    ivf.write_index(add_to_empty(other, ids[:100], xb[:100]), path)
    with pytest.raises(ValueError, match="other.faiss"):
        ivf.merge_on_disk(trained, [path], str(tmp_path / "i.faiss"), str(tmp_path / "i.ivfdata"))


def test_merge_refuses_truncated_shard_naming_it(data, tmp_path):
    _, _, _, trained, shards = data
    paths = [str(tmp_path / f"s{i}.faiss") for i in range(len(shards))]
    for shard, path in zip(shards, paths):
        ivf.write_index(shard, path)
    with open(paths[1], "r+b") as f:
        f.truncate(os.path.getsize(paths[1]) - 5000)
    for kernel_copy in (True, False):
        with pytest.raises(ValueError, match="s1.faiss"):
            ivf.merge_on_disk(trained, paths, str(tmp_path / "m.faiss"), str(tmp_path / "m.ivfdata"),
                              kernel_copy=kernel_copy)
        assert not (tmp_path / "m.ivfdata").exists() and not (tmp_path / "m.faiss").exists()
        assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # no half-written temp file left


def test_exact_search_streams_to_brute_force(data):
    xb, xq, ids, _, _ = data
    batches = ((ids[i:i + 777], xb[i:i + 777]) for i in range(0, N, 777))  # last batch is partial
    scores, got = ivf.exact_search(batches, xq, K)
    sims = xq @ xb.T
    want = np.argsort(-sims, axis=1, kind="stable")[:, :K]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(scores, np.take_along_axis(sims, want, axis=1), atol=1e-5)


def test_choose_nprobe_reaches_target(data):
    xb, xq, ids, _, shards = data
    _, exact = ivf.exact_search(((ids[i:i + 1000], xb[i:i + 1000]) for i in range(0, N, 1000)), xq, K)
    searcher = ivf.ShardedSearcher(shards)
    nprobe, curve = ivf.choose_nprobe(searcher, xq, exact, k=K, target=0.95, full_curve=True)
    assert 1 < nprobe < NLIST  # IVF helps on clustered data, and 1 list is not enough
    assert [c["nprobe"] for c in curve] == [1, 2, 4, 8, 16, 32, 64]
    by_nprobe = {c["nprobe"]: c["recall"] for c in curve}
    assert by_nprobe[nprobe] >= 0.95
    assert all(by_nprobe[p] < 0.95 for p in by_nprobe if p < nprobe)
    recalls = [c["recall"] for c in curve]
    assert all(b >= a - 0.01 for a, b in zip(recalls, recalls[1:]))  # monotone up to noise
    assert recalls[-1] == pytest.approx(1.0)  # exhaustive Flat search is exact
    _, approx = searcher.search(xq, K, nprobe)
    assert ivf.recall_at_k(approx, exact, K) >= 0.95
    # early stop records the curve up to the chosen nprobe only
    again, short = ivf.choose_nprobe(searcher, xq, exact, k=K, target=0.95)
    assert again == nprobe and short == [c for c in curve if c["nprobe"] <= nprobe]
    # an unreachable target falls back to exhaustive search
    unreachable = exact.copy()
    unreachable[:, 0] = 10**9  # no such row: recall tops out at 0.9
    chosen, tried = ivf.choose_nprobe(searcher, xq, unreachable, k=K, target=0.95)
    assert chosen == NLIST and tried[-1]["nprobe"] == NLIST and tried[-1]["recall"] < 0.95


def test_add_assigned_equals_add_with_ids_and_reports_lists(data):
    xb, xq, ids, trained, shards = data
    index = ivf.index_from_bytes(trained)
    lists = np.concatenate([ivf.add_assigned(index, ids[s:min(s + 700, 1700)], xb[s:min(s + 700, 1700)])
                            for s in range(0, 1700, 700)])  # last batch partial
    want = faiss.extract_index_ivf(shards[0])
    assert index.ntotal == 1700 and lists.shape == (1700,)
    np.testing.assert_array_equal(np.bincount(lists, minlength=NLIST),
                                  [want.invlists.list_size(j) for j in range(NLIST)])
    np.testing.assert_array_equal(lists, faiss.extract_index_ivf(index).quantizer.assign(xb[:1700], 1).ravel())
    for nprobe in (1, 8):
        a = ivf.ShardedSearcher([index]).search(xq, K, nprobe)
        b = ivf.ShardedSearcher([shards[0]]).search(xq, K, nprobe)
        np.testing.assert_array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="ids"):
        ivf.add_assigned(index, ids[:3], xb[:4])
    # Any codec: SQ8 codes and ids come out identical to add_with_ids.
    sq8 = ivf.train_empty_index(xb[:3000], ivf.factory_string(NLIST, "SQ8"))
    a, b = ivf.index_from_bytes(sq8), ivf.index_from_bytes(sq8)
    ivf.add_assigned(a, ids, xb, assigner=ivf.coarse_assigner(a))
    b.add_with_ids(xb, ids)
    for j in range(NLIST):
        n = a.invlists.list_size(j)
        assert n == b.invlists.list_size(j)
        for get, width in ((lambda il: il.get_codes(j), n * a.code_size), (lambda il: il.get_ids(j), n)):
            np.testing.assert_array_equal(faiss.rev_swig_ptr(get(a.invlists), width),
                                          faiss.rev_swig_ptr(get(b.invlists), width))


def test_recall_curve_from_lists_equals_searching(data):
    """The IVF-Flat recall curve computed from list membership equals the one measured by searching."""
    xb, xq, ids, trained, shards = data
    searcher = ivf.ShardedSearcher(shards)
    assert all(ivf.recall_follows_lists(s) for s in shards)
    _, exact = ivf.exact_search(((ids[i:i + 1000], xb[i:i + 1000]) for i in range(0, N, 1000)), xq, K)
    exact[:5, 7:] = -1  # a few queries with fewer than k neighbours
    exact[5, :] = -1  # and one with none
    lists = faiss.extract_index_ivf(shards[0]).quantizer.assign(xb, 1).ravel()[np.maximum(exact, 0)]
    nprobes = [1, 2, 4, 8, 16, 32, 64]
    _, searched = ivf.choose_nprobe(searcher, xq, exact, k=K, target=1.0, candidates=nprobes, full_curve=True)
    for max_entries in (1 << 24, 100, 1):  # all queries at once, a few, one at a time
        got = ivf.recall_curve_from_lists(shards[0], xq, exact, lists, nprobes, max_entries=max_entries)
        assert got == pytest.approx([c["recall"] for c in searched], abs=1e-6)
    assert 0 < got[0] < got[3] < got[-1] == 1.0
    sq8 = ivf.index_from_bytes(ivf.train_empty_index(xb[:3000], ivf.factory_string(NLIST, "SQ8")))
    assert not ivf.recall_follows_lists(sq8)  # approximate scores: the curve must be searched


def test_missing_slots_and_ties():
    xb = clustered(30, dim=8, seed=5)
    trained = ivf.train_empty_index(xb, "IVF1,Flat")
    a = add_to_empty(trained, np.array([7, 3], dtype=np.int64), np.stack([xb[0], xb[0]]))
    b = add_to_empty(trained, np.array([1], dtype=np.int64), xb[1:2])
    scores, ids = ivf.ShardedSearcher([a, b]).search(xb[:1], 5, nprobe=1)
    assert ids[0].tolist()[:2] == [3, 7]  # equal scores: smaller id first
    assert ids[0].tolist()[2:] == [1, -1, -1]
    assert np.all(scores[0, 3:] == ivf.MISSING_SCORE)


def test_exact_search_ties_at_the_cut_go_to_smaller_ids():
    """More candidates tie at the k-th score than places left: the smaller ids win, in every batch."""
    q = np.ones((2, 4), dtype=np.float32)
    vecs = np.zeros((40, 4), dtype=np.float32)
    vecs[[5, 30]] = 2.0  # two clear winners; the other 38 tie at score 0
    ids = np.arange(100, 140, dtype=np.int64)[::-1].copy()  # ids descending along the batch
    for batch in (40, 7, 1):
        scores, got = ivf.exact_search(((ids[i:i + batch], vecs[i:i + batch]) for i in range(0, 40, batch)),
                                       q, 5)
        want_ties = sorted(set(ids.tolist()) - {int(ids[5]), int(ids[30])})[:3]
        assert got[0].tolist() == sorted([int(ids[5]), int(ids[30])]) + want_ties, batch
        assert got[1].tolist() == got[0].tolist()
        np.testing.assert_allclose(scores[0], [8, 8, 0, 0, 0])


def test_train_is_deterministic_and_checks_sample():
    xb = clustered(2000, seed=4)
    one = ivf.train_empty_index(xb, "IVF16,Flat", seed=7)
    assert one == ivf.train_empty_index(xb, "IVF16,Flat", seed=7)
    index = ivf.index_from_bytes(one)
    assert index.is_trained and index.ntotal == 0 and index.metric_type == faiss.METRIC_INNER_PRODUCT
    with pytest.raises(ValueError, match="cannot train 16 lists"):
        ivf.train_empty_index(xb[:10], "IVF16,Flat")


def test_write_read_local_and_fsspec(data, tmp_path):
    _, xq, _, _, shards = data
    want = shards[1].search(xq[:5], K)[1]
    ivf.write_index(shards[1], "memory://densebeam-test/ivf/shard.faiss")
    assert fsspec.filesystem("memory").exists("/densebeam-test/ivf/shard.faiss")
    np.testing.assert_array_equal(ivf.read_index("memory://densebeam-test/ivf/shard.faiss").search(xq[:5], K)[1],
                                  want)
    local = str(tmp_path / "s.faiss")
    ivf.write_index(shards[1], local)
    np.testing.assert_array_equal(ivf.read_index(local, mmap=True).search(xq[:5], K)[1], want)
    with pytest.raises(FileNotFoundError, match="nope.faiss"):
        ivf.read_index(str(tmp_path / "nope.faiss"))


@pytest.mark.parametrize("n", [1, 38, 39, 100, 1000, 10_000, 100_000, 999_999, 1_000_000, 5_000_000,
                               50_000_000, 200_000_000])
def test_choose_nlist_bounds(n):
    nlist = ivf.choose_nlist(n)
    cap = max(1, n // 39)
    assert 1 <= nlist <= cap
    if nlist < cap and n <= 1_000_000:  # the guideline, unless capped by training points
        assert 4 * math.sqrt(n) <= nlist <= 16 * math.sqrt(n)
        assert nlist & (nlist - 1) == 0
    if n > 1_000_000:
        assert nlist == min(cap, 65536 if n < 10**7 else 262144 if n < 10**8 else 1048576)


@pytest.mark.parametrize("nlist,n,dim,budget", [(64, 6000, 32, None), (64, 100_000, 32, None),
                                                (1024, 10**7, 768, 100 * 2**20), (16, 500, 8, None),
                                                (256, 10**6, 128, 2**20)])
def test_training_sample_size_bounds(nlist, n, dim, budget):
    size = ivf.training_sample_size(nlist, n, dim, budget)
    assert nlist <= size <= n
    assert size <= 100 * nlist
    if budget is not None:
        assert size * 4 * dim <= budget
    else:
        assert size == min(100 * nlist, n)


def test_training_sample_size_refuses_tiny_budget():
    with pytest.raises(ValueError, match="memory budget"):
        ivf.training_sample_size(1024, 10**6, 768, 1000)



def test_pq_trains_without_polysemous_reordering():
    """FAISS's factory turns on polysemous training for IVF-PQ (most of its training time, used only by a
    polysemous search); the build's trained indexes have it off, and still search."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2000, 16)).astype(np.float32)
    index = ivf.index_from_bytes(ivf.train_empty_index(x, "IVF4,PQ4x4"))
    pq_index = faiss.downcast_index(faiss.extract_index_ivf(index))
    assert not pq_index.do_polysemous_training and pq_index.polysemous_ht == 0
    index.add(x)
    index.nprobe = 4
    scores, ids = index.search(x[:20], 5)
    assert (ids[:, 0] >= 0).all() and np.all(np.diff(scores, axis=1) <= 0)
