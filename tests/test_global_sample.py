"""The index build's training and held-out query samples are drawn over global row ids: exact sizes,
disjoint, sorted, seeded, uniform, and the same rows whatever the split of the rows into shards."""

from __future__ import annotations

import numpy as np
import pytest

from densebeam.index_store.ivf.sample import BLOCK_ROWS, GlobalSample

N = 3 * BLOCK_ROWS + 1234  # four blocks, the last one partial


def test_exact_disjoint_sorted_and_seeded():
    s = GlobalSample(N, 30000, 700, seed=5)
    train, queries = s.rows(0, N)
    assert (len(train), len(queries)) == (30000, 700)
    assert np.all(np.diff(train) > 0) and np.all(np.diff(queries) > 0)
    assert not np.intersect1d(train, queries).size and train.min() >= 0 and train.max() < N
    again = GlobalSample(N, 30000, 700, seed=5).rows(0, N)
    np.testing.assert_array_equal(again[0], train)
    np.testing.assert_array_equal(again[1], queries)
    assert not np.array_equal(GlobalSample(N, 30000, 700, seed=6).rows(0, N)[0], train)


@pytest.mark.parametrize("cuts", [[], [100], [BLOCK_ROWS], [1, 2, 5000, BLOCK_ROWS + 7, 40000, N - 1],
                                  list(range(997, N, 997))])
def test_any_split_into_ranges_gives_the_same_rows(cuts):
    s = GlobalSample(N, 30000, 700, seed=5)
    whole = s.rows(0, N)
    bounds = [0, *cuts, N]
    parts = [s.rows(a, b) for a, b in zip(bounds, bounds[1:])]
    for i in (0, 1):
        np.testing.assert_array_equal(np.concatenate([p[i] for p in parts]), whole[i])
    for a, b, (t, q) in zip(bounds, bounds[1:], parts):  # the plan's per-shard counts agree
        below_a, below_b = s.count_below(a), s.count_below(b)
        assert (below_b[0] - below_a[0], below_b[1] - below_a[1]) == (len(t), len(q))


def test_edges():
    assert [len(x) for x in GlobalSample(N, N, 0, seed=1).rows(0, N)] == [N, 0]  # every row trains
    assert [len(x) for x in GlobalSample(10, 0, 0, seed=1).rows(0, 10)] == [0, 0]
    assert [len(x) for x in GlobalSample(1, 1, 0, seed=1).rows(0, 1)] == [1, 0]
    with pytest.raises(ValueError, match="do not fit"):
        GlobalSample(10, 8, 3, seed=1)


def test_uniform_over_rows():
    """Over 300 seeds every row is picked about as often (train: 0.5 of rows, queries: 0.02), whatever its
    block: the per-block counts and the picks within a block are both unbiased."""
    n, picks_t, picks_q = 2 * BLOCK_ROWS + 5000, 0, 0
    groups = np.arange(n) * 16 // n  # 16 stripes of rows, straddling blocks
    for seed in range(300):
        t, q = GlobalSample(n, n // 2, n // 50, seed=seed).rows(0, n)
        picks_t = picks_t + np.bincount(groups[t], minlength=16)
        picks_q = picks_q + np.bincount(groups[q], minlength=16)
    size = np.bincount(groups, minlength=16) * 300
    np.testing.assert_allclose(picks_t / size, 0.5, atol=0.005)
    np.testing.assert_allclose(picks_q / size, 0.02, atol=0.002)
