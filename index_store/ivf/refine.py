"""Tiered search: a compact first pass (SQ8, PQ codes) re-scored exactly from full-precision vectors.

A compressed IVF index scores approximately, so its top k misses true neighbours that its top ``k * r``
still holds. :class:`RefinedSearcher` asks the compact index for ``k * r`` candidates, fetches their
float32 vectors (files on disk: only the rows a query touches are read) and returns the
top k by exact inner product, as FAISS's ``IndexRefineFlat`` does with vectors held in RAM. The refine
factor ``r`` per k is measured at build time (:func:`choose_refine`), like nprobe. No Beam import.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from densebeam.index_store.ivf.params import REFINE_FACTORS
from densebeam.index_store.ivf.search import MISSING_SCORE, merge_topk, recall_at_k
SHORTFALL_SLACK = 0.01  # a target no point reaches: the cheapest point this close to the best recall
MAX_CANDIDATES = 2048  # per query: a k only measures the factors with k * r <= max(k, this)


def factors_for_k(k: int, factors: Sequence[int] = REFINE_FACTORS) -> list[int]:
    """The refine factors measured for ``k``: those giving at most ``max(k, MAX_CANDIDATES)`` candidates."""
    return [r for r in factors if r == 1 or k * r <= max(k, MAX_CANDIDATES)]


def rescore(queries: np.ndarray, cand_ids: np.ndarray, fetch: Callable[[np.ndarray], np.ndarray],
            k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each query among its candidates: (scores (q, k) float32, ids (q, k) int64).

    ``cand_ids`` (q, c) holds row ids (-1: empty slot); ``fetch(rows)`` returns their float32 vectors.
    Each distinct row is fetched once per call, in row order (sequential where rows are close).
    """
    valid = cand_ids >= 0
    rows = np.unique(cand_ids[valid])
    scores = np.full(cand_ids.shape, MISSING_SCORE, dtype=np.float32)
    if len(rows):
        vectors = fetch(rows)
        where = np.searchsorted(rows, np.where(valid, cand_ids, rows[0]))
        for i in range(len(queries)):
            ok = valid[i]
            scores[i, ok] = vectors[where[i, ok]] @ queries[i]
    return merge_topk(scores, np.where(valid, cand_ids, -1), k)


def candidate_scores(queries: np.ndarray, cand_ids: np.ndarray, fetch: Callable[[np.ndarray], np.ndarray],
                     block: int = 64) -> np.ndarray:
    """(q, c) float32 exact inner products of each query with each of its candidates (``cand_ids``, -1:
    empty, scored ``MISSING_SCORE``); ``fetch(rows)`` returns the rows' float32 vectors, asked for
    ``block`` queries' candidates at a time (memory: block x c vectors)."""
    scores = np.full(cand_ids.shape, MISSING_SCORE, dtype=np.float32)
    for a in range(0, len(cand_ids), block):
        ids = cand_ids[a:a + block]
        ok = ids >= 0
        rows, cols = np.nonzero(ok)
        scores[a:a + block][rows, cols] = np.einsum("ij,ij->i", fetch(ids[ok]), queries[a + rows])
    return scores


def refined_recall(scores: np.ndarray, cand_ids: np.ndarray, exact_ids: np.ndarray, k: int, r: int) -> float:
    """recall@k of a refined search that re-scores the first ``k * r`` candidates (scored by
    :func:`candidate_scores`) against the exact top-k ids."""
    _, ids = merge_topk(scores[:, :k * r], cand_ids[:, :k * r], k)
    return recall_at_k(ids, exact_ids, k)


def refine_for_k(by_k: Mapping[int, int], k: int) -> int:
    """The refine factor for a search of ``k`` hits: the one measured for the smallest measured k' >= k,
    else the largest k's (1 when nothing was measured: no refinement)."""
    if not by_k:
        return 1
    above = [m for m in sorted(by_k) if m >= k]
    return int(by_k[above[0]] if above else by_k[max(by_k)])


def choose_refine(curves: Mapping[int, Sequence[Mapping]], target: float, list_bytes: float,
                  vector_bytes: int, k: int) -> tuple[int, dict]:
    """(refine factor, {"nprobe", "recall"}) for one k from its curves per factor ({r: [{"nprobe",
    "recall"}, ...]}, sorted by nprobe).

    Among the (factor, nprobe) points reaching ``target``, the one reading the fewest bytes per query:
    ``nprobe * list_bytes`` of compact codes plus ``k * r * vector_bytes`` of full vectors. When none
    reaches it, the cheapest point within ``SHORTFALL_SLACK`` of the best recall measured (the best is
    usually an exhaustive scan, which costs far more than the last few thousandths are worth).
    """
    points = [(point["nprobe"] * list_bytes + k * r * vector_bytes, int(r), point)
              for r, curve in curves.items() for point in curve]
    if not points:
        raise ValueError("no refine curve to choose from")
    floor = target if any(p["recall"] >= target for _, _, p in points) else \
        max(p["recall"] for _, _, p in points) - SHORTFALL_SLACK
    cost, r, point = min((c, r, p) for c, r, p in points if p["recall"] >= floor)
    return r, {"nprobe": int(point["nprobe"]), "recall": float(point["recall"])}


class RefinedSearcher:
    """A :class:`~index_store.ivf.search.ShardedSearcher` whose results are re-scored exactly.

    ``fetch(rows)`` returns the float32 vectors of FAISS rows; ``factors_by_k`` is the measured refine
    factor per k (:func:`refine_for_k`). ``search`` keeps the sharded searcher's signature, so every
    caller (``search_filled``, the service's batcher) gets refined results; scores are exact inner
    products. Cost per query: the compact search for ``k * r`` hits plus ``k * r`` vector reads.
    """

    def __init__(self, inner, fetch: Callable[[np.ndarray], np.ndarray], factors_by_k: Mapping[int, int]):
        self.inner, self.fetch = inner, fetch
        self.factors_by_k = dict(factors_by_k)
        self.indexes, self.d, self.nlist = inner.indexes, inner.d, inner.nlist

    @property
    def ntotal(self) -> int:
        return self.inner.ntotal

    def factor(self, k: int) -> int:
        return refine_for_k(self.factors_by_k, k)

    def search(self, queries: np.ndarray, k: int, nprobe: int,
               refine: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) like :meth:`ShardedSearcher.search`, scores exact; ``refine`` overrides the
        measured factor (1: the compact top k, re-ordered by exact scores)."""
        r = self.factor(k) if refine is None else int(refine)
        if r < 1:
            raise ValueError(f"refine factor must be at least 1, got {r}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        _, cand = self.inner.search(queries, k * r, nprobe)
        return rescore(queries, cand, self.fetch, k)
