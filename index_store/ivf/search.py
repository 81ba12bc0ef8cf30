"""Searching IVF shards, exact ground truth and nprobe calibration. No Beam import.

Shards built from one trained index share their coarse quantizer, so probing the same ``nprobe`` lists
in every shard and merging the per-shard top-k by score gives exactly the answer one big index would.
Scores are inner products (higher is better); ties go to the smaller id; empty slots have id -1 and
score ``MISSING_SCORE`` (what FAISS itself reports).
"""

from __future__ import annotations

import logging
from typing import Iterable, Optional, Sequence

import faiss
import numpy as np

log = logging.getLogger(__name__)

MISSING_SCORE = float(np.finfo(np.float32).min)  # what FAISS reports for an empty inner-product slot


def merge_topk(scores: np.ndarray, ids: np.ndarray, k: int, payload: Optional[np.ndarray] = None):
    """Top-k per row of (q, n) candidates: score descending, smaller id first on ties, -1 last.

    Returns (scores, ids), or (scores, ids, payload) when a (q, n) ``payload`` rides along with the
    candidates (e.g. each candidate's inverted list); padded slots get payload -1.
    """
    missing = ids < 0
    key = np.where(missing, np.inf, -scores.astype(np.float64))
    order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, ids), key), axis=-1)[:, :k]
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_scores = np.take_along_axis(scores, order, axis=1).astype(np.float32)
    top_scores[top_ids < 0] = MISSING_SCORE
    top_payload = None if payload is None else np.take_along_axis(payload, order, axis=1)
    if top_ids.shape[1] < k:  # fewer candidates than k: pad with empty slots
        pad = ((0, 0), (0, k - top_ids.shape[1]))
        top_ids = np.pad(top_ids, pad, constant_values=-1)
        top_scores = np.pad(top_scores, pad, constant_values=MISSING_SCORE)
        if top_payload is not None:
            top_payload = np.pad(top_payload, pad, constant_values=-1)
    if top_payload is None:
        return top_scores, top_ids.astype(np.int64)
    return top_scores, top_ids.astype(np.int64), top_payload


def quantizer_params(quantizer: faiss.Index, nprobe: int):
    """Search parameters for a coarse quantizer asked for ``nprobe`` lists, or None when its defaults do.

    An HNSW graph returns at most about its ``efSearch`` results (FAISS does not raise ef to k): asked
    for 8,192 of 65,536 lists with efSearch 64 it returned ~588, so every nprobe past a few hundred
    probed the same lists (recall@10 flat at 0.991, recall@1000 at 0.913, from nprobe 1024 to 8192 at
    8.8M vectors). ef is raised to ``nprobe`` for that search; keep the returned object alive through it.
    """
    hnsw = getattr(faiss.downcast_index(quantizer), "hnsw", None)
    if hnsw is None or nprobe <= hnsw.efSearch:
        return None
    params = faiss.SearchParametersHNSW()
    params.efSearch = int(nprobe)
    return params


EXHAUSTIVE_CHUNK = 32  # queries per coarse pass when every list is probed: 32 x nlist scores at a time


def coarse_search(quantizer: faiss.Index, queries: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """(coarse scores, lists), each (q, nprobe): the lists ``nprobe`` asks for. Every list (nprobe >=
    nlist) is one matrix product against the centroids, in list order, whatever the quantizer: an HNSW
    graph asked for all its nodes walks every one with a beam as wide as the graph, far slower than the product."""
    nlist = quantizer.ntotal
    if nprobe < nlist:
        inner = quantizer_params(quantizer, nprobe)
        return quantizer.search(queries, nprobe, params=inner)
    centroids = quantizer.reconstruct_n(0, nlist)
    lists = np.broadcast_to(np.arange(nlist, dtype=np.int64), (len(queries), nlist))
    return np.ascontiguousarray(queries @ centroids.T, dtype=np.float32), np.ascontiguousarray(lists)


def ivf_params(ivf: faiss.IndexIVF, nprobe: int):
    """(SearchParametersIVF for ``nprobe``, the quantizer parameters it points to: keep both alive)."""
    inner = quantizer_params(ivf.quantizer, nprobe)
    params = faiss.SearchParametersIVF(nprobe=nprobe)
    if inner is not None:
        params.quantizer_params = inner
    return params, inner


class ShardedSearcher:
    """Search several shard indexes (or one merged index) as if they were one.

    Shards filled from one trained index share its coarse quantizer: the quantizer is then searched once
    per query and every shard scans the same ``nprobe`` lists (``search_preassigned``), instead of each
    shard repeating the quantizer search (at nlist 4096 that search costs more than scanning 8 lists).
    Cost per query: one quantizer search plus the sum over shards of scanning ``nprobe`` lists; memory is
    whatever the indexes hold (mmapped shards and merged indexes leave it to the OS page cache). nprobe
    is passed per call (``SearchParametersIVF``), so one searcher can serve concurrent threads.
    """

    SAMPLED_CENTROIDS = 64  # centroids compared to decide that shards share one quantizer

    def __init__(self, indexes: Sequence[faiss.Index]):
        if not indexes:
            raise ValueError("ShardedSearcher needs at least one index")
        dims = {index.d for index in indexes}
        if len(dims) != 1:
            raise ValueError(f"shard indexes disagree on dimension: {sorted(dims)}; rebuild from one "
                             "trained index")
        self.indexes = list(indexes)
        self.d = dims.pop()
        ivfs = [faiss.try_extract_index_ivf(index) for index in self.indexes]
        self.nlist = max((ivf.nlist for ivf in ivfs if ivf is not None), default=1)
        self._shared = self._shared_quantizer(self.indexes)

    @classmethod
    def _shared_quantizer(cls, indexes) -> Optional[faiss.Index]:
        """The quantizer all shards share, when there are several bare IndexIVF shards with the same
        nlist whose quantizers agree on a sample of centroids (shards of one build always do); else None."""
        indexes = [faiss.downcast_index(i) for i in indexes]
        if len(indexes) < 2 or not all(isinstance(i, faiss.IndexIVF) for i in indexes):
            return None
        first = indexes[0].quantizer
        nlist = indexes[0].nlist
        if any(i.nlist != nlist or i.quantizer.ntotal != first.ntotal for i in indexes):
            return None
        rows = np.unique(np.linspace(0, nlist - 1, min(nlist, cls.SAMPLED_CENTROIDS)).astype(np.int64))
        try:
            want = np.stack([first.reconstruct(int(r)) for r in rows])
            same = all(np.array_equal(want, np.stack([i.quantizer.reconstruct(int(r)) for r in rows]))
                       for i in indexes[1:])
        except RuntimeError:  # a quantizer that cannot reconstruct: search each shard on its own
            return None
        return first if same else None

    @property
    def ntotal(self) -> int:
        return int(sum(index.ntotal for index in self.indexes))

    def _search_one(self, index: faiss.Index, queries: np.ndarray, k: int, nprobe: int):
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is None:
            return index.search(queries, k)
        nprobe = max(1, min(int(nprobe), ivf.nlist))
        if nprobe == ivf.nlist and isinstance(faiss.downcast_index(index), faiss.IndexIVF):
            return self._search_preassigned(queries, k, nprobe, ivf.quantizer, [index])[0]
        if isinstance(index, faiss.IndexIVF):
            params, _inner = ivf_params(ivf, nprobe)
            return index.search(queries, k, params=params)
        ivf.nprobe = nprobe  # wrapped IVF (e.g. IndexPreTransform): not thread-safe
        return index.search(queries, k)

    def _search_preassigned(self, queries: np.ndarray, k: int, nprobe: int, quantizer=None, indexes=None):
        """Per index (scores, ids): the quantizer (default: the shared one) searched once for all indexes,
        every list in chunks of EXHAUSTIVE_CHUNK queries (:func:`coarse_search`)."""
        quantizer = self._shared if quantizer is None else quantizer
        indexes = self.indexes if indexes is None else indexes
        nprobe = max(1, min(int(nprobe), quantizer.ntotal))
        params = faiss.SearchParametersIVF(nprobe=nprobe)
        n = len(queries)
        out = [(np.empty((n, k), dtype=np.float32), np.empty((n, k), dtype=np.int64)) for _ in indexes]
        step = EXHAUSTIVE_CHUNK if nprobe >= quantizer.ntotal else max(n, 1)
        for a in range(0, n, step):
            q = np.ascontiguousarray(queries[a:a + step])
            coarse_scores, lists = coarse_search(quantizer, q, nprobe)
            for index, (scores, ids) in zip(indexes, out):
                s, i = scores[a:a + step], ids[a:a + step]
                faiss.downcast_index(index).search_preassigned_c(
                    len(q), faiss.swig_ptr(q), k, faiss.swig_ptr(lists), faiss.swig_ptr(coarse_scores),
                    faiss.swig_ptr(s), faiss.swig_ptr(i), False, params)
        return out

    def search(self, queries: np.ndarray, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores (q, k) float32, ids (q, k) int64) over all shards, best first."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.d:
            raise ValueError(f"queries must have shape (q, {self.d}), got {queries.shape}; were they "
                             "encoded with the bundle's model?")
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        if self._shared is not None:
            results = self._search_preassigned(queries, k, nprobe)
        else:
            results = [self._search_one(index, queries, k, nprobe) for index in self.indexes]
        scores = np.concatenate([r[0] for r in results], axis=1)
        ids = np.concatenate([r[1] for r in results], axis=1)
        return merge_topk(scores, ids, k)


def stacked_view(trained: faiss.Index, shards: Sequence[faiss.Index]) -> faiss.Index:
    """One IVF index whose list j is list j of every shard, end to end (FAISS's ``HStackInvertedLists``
    over the shards' own lists: nothing copied), for shards filled from ``trained``. Searching it visits
    each probed list once instead of once per shard (for PQ that is one lookup table per list and query).
    The view points into the shards' lists: keep the shards alive while it is used."""
    ivf = faiss.extract_index_ivf(trained)
    lists = faiss.InvertedListsPtrVector()
    for shard in shards:
        lists.push_back(faiss.extract_index_ivf(shard).invlists)
    stacked = faiss.HStackInvertedLists(len(shards), lists.data())
    stacked.this.disown()  # the index owns the stack from here on
    ivf.replace_invlists(stacked, True)
    ivf.ntotal = trained.ntotal = int(sum(shard.ntotal for shard in shards))
    return trained


def search_filled(searcher: ShardedSearcher, queries: np.ndarray, k: int,
                  nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """:meth:`ShardedSearcher.search` that returns ``min(k, ntotal)`` hits for every query.

    An IVF search returns only what its ``nprobe`` lists hold: small lists, or a large k, leave rows
    short. Those rows (only those) are searched again with twice the lists, until they are full or every
    list was probed (exhaustive: then every stored vector was a candidate). Fewer than k hits therefore
    means the index holds fewer than k vectors. Cost: one extra search of the short rows per doubling.
    """
    if nprobe < 1:
        raise ValueError(f"nprobe must be positive, got {nprobe}")
    scores, ids = searcher.search(queries, k, nprobe)
    want = min(k, searcher.ntotal)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    short = np.flatnonzero((ids >= 0).sum(axis=1) < want)
    while len(short) and nprobe < searcher.nlist:
        nprobe = min(2 * nprobe, searcher.nlist)
        log.debug("%d queries got fewer than %d hits; searching them again with nprobe %d", len(short), want,
                  nprobe)
        scores[short], ids[short] = searcher.search(queries[short], k, nprobe)
        short = short[(ids[short] >= 0).sum(axis=1) < want]
    return scores, ids


def exact_search(vector_batches: Iterable[tuple[np.ndarray, np.ndarray]], queries: np.ndarray,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k over streamed (ids, vectors) batches: ground truth.

    Memory: one batch plus a (q, batch) score matrix and the running (q, k) top-k, so the corpus never
    has to fit in RAM; time is one matrix product per batch (smaller batches: less memory, more
    Python overhead).
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2:
        raise ValueError(f"queries must be 2-d, got {queries.shape}")
    best_scores = np.full((queries.shape[0], k), MISSING_SCORE, dtype=np.float32)
    best_ids = np.full((queries.shape[0], k), -1, dtype=np.int64)
    for ids, vectors in vector_batches:
        vectors = np.asarray(vectors, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        if vectors.ndim != 2 or vectors.shape[1] != queries.shape[1] or len(ids) != len(vectors):
            raise ValueError(f"batch of {len(ids)} ids and vectors {vectors.shape} does not match queries "
                             f"of dim {queries.shape[1]}")
        if len(ids) == 0:
            continue
        sims = queries @ vectors.T
        cand = np.broadcast_to(ids, sims.shape)
        if sims.shape[1] > k:  # keep k candidates per row
            part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            kth = np.take_along_axis(sims, part, axis=1).min(axis=1)
            # Rows with more ties at the k-th score than places left: argpartition kept an arbitrary
            # few of them, so those rows keep every candidate and merge_topk applies the tie rule.
            tied = (sims >= kth[:, None]).sum(axis=1) > k
            if tied.any():
                best_scores[tied], best_ids[tied] = merge_topk(
                    np.concatenate([best_scores[tied], sims[tied]], axis=1),
                    np.concatenate([best_ids[tied], cand[tied]], axis=1), k)
            sims = np.take_along_axis(sims, part, axis=1)
            cand = ids[part]
            sims[tied], cand[tied] = MISSING_SCORE, -1  # already merged above
        best_scores, best_ids = merge_topk(np.concatenate([best_scores, sims], axis=1),
                                           np.concatenate([best_ids, cand], axis=1), k)
    return best_scores, best_ids


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / |exact top-k| (ignoring -1 slots)."""
    recalls = []
    for got, want in zip(approx_ids[:, :k], exact_ids[:, :k]):
        want_set = {int(i) for i in want if i >= 0}
        if want_set:
            recalls.append(len(want_set.intersection(int(i) for i in got if i >= 0)) / len(want_set))
    return float(np.mean(recalls)) if recalls else 1.0


def choose_nprobe(searcher: ShardedSearcher, queries: np.ndarray, exact_ids: np.ndarray, k: int = 10,
                  target: float = 0.95, candidates: Optional[Sequence[int]] = None,
                  full_curve: bool = False) -> tuple[int, list[dict]]:
    """Smallest nprobe whose recall@k against ``exact_ids`` reaches ``target``, and the measured curve.

    Candidates default to powers of two up to nlist, and nlist (exhaustive) is always tried last, so a
    target nothing reaches returns nlist. Stops at the first hit unless ``full_curve`` (cost: one search
    per candidate).
    """
    if not 0 < target <= 1:
        raise ValueError(f"target recall must be in (0, 1], got {target}")
    nlist = searcher.nlist
    if candidates is None:
        candidates = [1 << i for i in range(nlist.bit_length()) if 1 << i <= nlist]
    tries = sorted({int(c) for c in candidates if 1 <= c <= nlist} | {nlist})
    chosen: Optional[int] = None
    curve: list[dict] = []
    for nprobe in tries:
        _, ids = searcher.search(queries, k, nprobe)
        recall = recall_at_k(ids, exact_ids, k)
        curve.append({"nprobe": nprobe, "recall": round(recall, 6)})
        log.info("nprobe %d: recall@%d %.4f", nprobe, k, recall)
        if chosen is None and recall >= target:
            chosen = nprobe
            if not full_curve:
                break
    if chosen is None:
        log.warning("no nprobe reached recall@%d %.2f (best %.4f); using exhaustive nprobe=%d", k, target,
                    curve[-1]["recall"], nlist)
        chosen = nlist
    return chosen, curve


# ---------------------------------------------------------------- recall without searching (IVF-Flat)

def recall_follows_lists(index: faiss.Index) -> bool:
    """True for an IVF index whose codes are the raw vectors (``IVFn,Flat``, any coarse quantizer): its
    recall at any nprobe then follows from list membership alone (:func:`recall_curve_from_lists`)."""
    return isinstance(faiss.downcast_index(index), faiss.IndexIVFFlat)


def _in_probed(exact_lists: np.ndarray, valid: np.ndarray, probed: np.ndarray) -> np.ndarray:
    """(q, k) bool: which valid exact neighbours sit in one of their query's probed lists (one sorted
    search over all queries at once: each row's list numbers are shifted into a disjoint key range)."""
    span = int(max(probed.max(initial=0), exact_lists.max(initial=0))) + 2
    shift = np.arange(len(probed), dtype=np.int64)[:, None] * span
    keys = np.sort(probed + 1 + shift, axis=1).ravel()  # +1: a -1 (nothing probed) never matches
    want = np.where(valid, exact_lists + 1, -1) + shift
    pos = np.minimum(np.searchsorted(keys, want.ravel()), len(keys) - 1).reshape(want.shape)
    return valid & (keys[pos] == want)


def recall_curves_from_lists(index: faiss.Index, queries: np.ndarray, exact_ids: np.ndarray,
                             exact_lists: np.ndarray, nprobes: Sequence[int], ks: Sequence[int],
                             max_entries: int = 1 << 24) -> dict[int, list[float]]:
    """Recall@k of an IVF-Flat ``index`` at each nprobe, for every k in ``ks``, without searching its lists.

    With exact scores (Flat codes), a true top-k neighbour is returned at nprobe p exactly when its
    inverted list is among the p lists the query probes (it outscores every other candidate, since it
    outscores every vector). So recall@k(p) is the share of each query's exact top-k neighbours (the
    first k columns of ``exact_ids``, best first) whose list (``exact_lists``, known from adding) the
    coarse quantizer picks among its top p for that query, averaged over queries as :func:`recall_at_k`
    averages (slots with id -1 ignored). Cost: one coarse quantizer search per nprobe, shared by all k,
    instead of one scan of p lists per query; memory: ``max_entries`` probed-list entries at a time.
    Score ties at the k-th place are the only case where this and a search may differ.
    """
    ivf = faiss.extract_index_ivf(index)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    bad = [k for k in ks if not 1 <= k <= exact_ids.shape[1]]
    if bad:
        raise ValueError(f"ks {bad} need exact top-k tables at least that wide; got {exact_ids.shape[1]} columns")
    valid = exact_ids >= 0
    n_valid = {k: valid[:, :k].sum(axis=1) for k in ks}
    keep = {k: n_valid[k] > 0 for k in ks}
    curves: dict[int, list[float]] = {k: [] for k in ks}
    for p in nprobes:
        p = max(1, min(int(p), ivf.nlist))
        if p == ivf.nlist:  # every list probed: every neighbour found
            found = valid
        else:
            found = np.zeros_like(valid)
            step = max(1, max_entries // p)
            for a in range(0, len(queries), step):
                probed = ivf.quantizer.search(queries[a:a + step], p, params=quantizer_params(ivf.quantizer, p))[1]
                found[a:a + step] = _in_probed(exact_lists[a:a + step], valid[a:a + step], probed)
        hits = np.cumsum(found, axis=1)  # hits[:, k - 1]: neighbours found among the top k
        for k in ks:
            ok = keep[k]
            curves[k].append(float(np.mean(hits[ok, k - 1] / n_valid[k][ok])) if ok.any() else 1.0)
    return curves


def recall_curve_from_lists(index: faiss.Index, queries: np.ndarray, exact_ids: np.ndarray,
                            exact_lists: np.ndarray, nprobes: Sequence[int],
                            max_entries: int = 1 << 24) -> list[float]:
    """Recall@k at each nprobe for k = the width of ``exact_ids`` (see :func:`recall_curves_from_lists`)."""
    k = exact_ids.shape[1]
    return recall_curves_from_lists(index, queries, exact_ids, exact_lists, nprobes, [k], max_entries)[k]
