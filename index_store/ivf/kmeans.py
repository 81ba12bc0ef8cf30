"""Two-level spherical k-means for IVF coarse quantizers (inner product). No Beam import.

FAISS trains an IVF quantizer with one flat k-means: each iteration compares every training vector with
every centroid (n x nlist x d flops). Two levels cut that:

1. **coarse**: k1 ~ sqrt(nlist) clusters on a subsample (:func:`train_coarse`), then every training
   vector is assigned to one (:func:`assign`);
2. **fine**: each coarse cluster's vectors are clustered into its share of the nlist centroids, shares
   proportional to its size (:func:`allocate`, :func:`train_fine`): n x nlist/k1 x d per iteration, and
   the clusters are independent, so they run on threads (:func:`train_fine_clusters`) or Beam workers;
3. **refine**: a few Lloyd iterations over all nlist centroids in which the vectors of a coarse cluster
   are compared only with the centroids under the m coarse clusters nearest it (:func:`refine`): n x
   m*nlist/k1 x d per iteration. They repair the seams that step 2 leaves between coarse clusters (without them the
   k-means objective and the recall at a given nprobe are measurably lower than flat k-means').

Like FAISS for an inner-product IVF, the k-means is *spherical*: centroids are unit-norm, vectors are
assigned by inner product. With unit-norm centroids that is also the L2 assignment (``|x - c|^2 = |x|^2
+ 1 - 2 x.c``), for ``cos`` (unit) and ``dot`` (raw) vectors alike. Every step is seeded and its result
does not depend on how many threads or workers run it (each fine cluster is trained by one thread, on
its vectors in sample order), so the same sample and seed give the same centroids everywhere.

(FAISS's own ``contrib.clustering.two_level_clustering`` does steps 1-2 for the L2 metric, one cluster
after another with all threads each; small k-means calls on many threads spend most of their time
synchronising, and it has no step 3. Measured in docs/benchmarks.md.)
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from typing import Callable, Iterable, Optional, Sequence

import faiss
import numpy as np

from densebeam.index_store.ivf import gpu as accel
from densebeam.index_store.ivf.params import TWO_LEVEL_MIN_NLIST



@dataclasses.dataclass(frozen=True)
class TwoLevelParams:
    """How to train ``nlist`` centroids in two levels (see the module docstring)."""

    nlist: int
    coarse: int  # k1, the coarse clusters
    seed: int = 1234
    coarse_niter: int = 20
    coarse_points_per_centroid: int = 256  # the coarse k-means' subsample (:func:`coarse_rows`)
    fine_niter: int = 10  # FAISS's IVF default
    refine_niter: int = 6
    refine_neighbours: int = 8  # m: coarse clusters whose fine centroids a cluster's vectors are compared with

    def __post_init__(self):
        if not 1 <= self.coarse <= self.nlist:
            raise ValueError(f"need 1 <= coarse <= nlist, got coarse {self.coarse}, nlist {self.nlist}")


def two_level_params(nlist: int, seed: int = 1234) -> TwoLevelParams:
    """k1 = the power of two nearest sqrt(nlist) (64 for 4096 lists, 128 for 16384, 256 for 65536)."""
    if nlist < 1:
        raise ValueError(f"nlist must be positive, got {nlist}")
    coarse = min(nlist, 2 ** round(math.log2(math.sqrt(nlist)))) if nlist > 1 else 1
    return TwoLevelParams(nlist=nlist, coarse=coarse, seed=seed)


def use_two_level(nlist: int) -> bool:
    return nlist >= TWO_LEVEL_MIN_NLIST


def parallel_map(fn: Callable, items: Iterable, threads: Optional[int] = None) -> list:
    """``[fn(item) for item in items]`` on ``threads`` Python threads (default: the CPU count), each
    running FAISS on one OpenMP thread. Many small FAISS calls on all cores each spend most of their time
    in OpenMP barriers (on a loaded machine: 5-10x slower, measured); one thread per call and calls in
    parallel keep every core busy. Results in item order, so reductions over them are deterministic."""
    def one(item):
        faiss.omp_set_num_threads(1)  # this thread's OpenMP setting only
        return fn(item)

    items = list(items)
    if not items:
        return []
    with concurrent.futures.ThreadPoolExecutor(min(len(items), threads or os.cpu_count() or 1)) as pool:
        return list(pool.map(one, items))


def _unit(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1)).astype(np.float32)


def clustering_index(d: int) -> faiss.Index:
    """Where k-means assigns vectors: flat inner product, on all GPUs when faiss has GPU support and a
    GPU is present."""
    index = faiss.IndexFlatIP(d)
    if accel.backend() == "faiss":
        return faiss.index_cpu_to_all_gpus(index)
    return index


def spherical_kmeans(x: np.ndarray, k: int, *, seed: int, niter: int, max_points_per_centroid: int = 1 << 30,
                     init: Optional[np.ndarray] = None, gpu: bool = False) -> np.ndarray:
    """(k, d) unit centroids of FAISS's spherical k-means with inner-product assignment (what an
    inner-product IVF trains with). No subsampling unless ``max_points_per_centroid`` asks for it; k ==
    len(x) returns the (normalized) vectors themselves. ``gpu``: assign on all GPUs when there are any."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"cannot cluster {n} vectors into {k} centroids")
    if k == n:
        return _unit(x)
    cp = faiss.ClusteringParameters()
    cp.spherical, cp.niter, cp.seed = True, niter, seed
    cp.max_points_per_centroid, cp.min_points_per_centroid = max_points_per_centroid, 1
    clus = faiss.Clustering(d, k, cp)
    if init is not None:
        faiss.copy_array_to_vector(np.ascontiguousarray(init, dtype=np.float32).ravel(), clus.centroids)
    clus.train(x, clustering_index(d) if gpu else faiss.IndexFlatIP(d))
    return faiss.vector_to_array(clus.centroids).reshape(k, d)


def assign(x: np.ndarray, centroids: np.ndarray, threads: Optional[int] = None,
           chunk: int = 16384) -> np.ndarray:
    """int64 index of each vector's best centroid by inner product, ``chunk`` vectors per thread task."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)

    def one(a):
        return faiss.knn(x[a:a + chunk], centroids, 1, metric=faiss.METRIC_INNER_PRODUCT)[1].ravel()

    if len(x) <= chunk:
        return one(0)
    return np.concatenate(parallel_map(one, range(0, len(x), chunk), threads))


def coarse_rows(n: int, params: TwoLevelParams) -> np.ndarray:
    """Sorted rows of an n-vector sample that train the coarse k-means: a seeded choice of at most
    ``coarse_points_per_centroid`` per coarse centroid (read from files without loading the sample)."""
    want = min(n, params.coarse * params.coarse_points_per_centroid)
    return np.sort(np.random.default_rng([params.seed, 1]).choice(n, want, replace=False))


def train_coarse(x: np.ndarray, params: TwoLevelParams) -> np.ndarray:
    """Step 1: (k1, d) coarse centroids of ``x`` (the :func:`coarse_rows` of the sample). A fraction of
    a second on one OpenMP thread (or on the GPUs); its seams are what step 3 repairs."""
    faiss.omp_set_num_threads(1)
    try:
        return spherical_kmeans(x, params.coarse, seed=params.seed, niter=params.coarse_niter, gpu=True)
    finally:
        faiss.omp_set_num_threads(os.cpu_count() or 1)


def allocate(counts: Sequence[int], nlist: int) -> np.ndarray:
    """Fine centroids per coarse cluster: proportional to its vectors (largest remainder), at least one
    for a non-empty cluster, never more than its vectors, summing to ``nlist``."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() < nlist:
        raise ValueError(f"{counts.sum()} training vectors cannot train {nlist} lists")
    exact = nlist * counts / counts.sum()
    out = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - out), kind="stable")[: nlist - int(out.sum())]:
        out[i] += 1
    out = np.minimum(np.maximum(out, (counts > 0).astype(np.int64)), counts)
    while out.sum() != nlist:  # repair: take from the most centroids per vector, give to the fewest
        ratio = out / np.maximum(counts, 1)
        if out.sum() > nlist:
            out[int(np.argmax(np.where(out > 1, ratio, -1)))] -= 1
        else:
            out[int(np.argmin(np.where(out < counts, ratio, np.inf)))] += 1
    return out


def train_fine(points: np.ndarray, k: int, seed: int, niter: int) -> np.ndarray:
    """Step 2 for one coarse cluster: its ``k`` fine centroids (callers run clusters in parallel, one
    OpenMP thread each: see :func:`parallel_map`)."""
    return spherical_kmeans(points, k, seed=seed, niter=niter)


def train_fine_clusters(clusters: Iterable[tuple[int, np.ndarray, int]], params: TwoLevelParams,
                        threads: Optional[int] = None) -> dict[int, np.ndarray]:
    """Step 2 for several coarse clusters ``(cluster, its vectors, its share)``, in parallel:
    ``{cluster: (share, d) centroids}``. Cluster c is seeded with ``seed + 1 + c``."""
    work = [(c, pts, k) for c, pts, k in clusters if k > 0]
    done = parallel_map(lambda w: train_fine(w[1], w[2], params.seed + 1 + w[0], params.fine_niter), work, threads)
    return {c: cents for (c, _, _), cents in zip(work, done)}


def neighbours(coarse: np.ndarray, m: int) -> np.ndarray:
    """(k1, m): the m coarse centroids nearest each coarse centroid (itself first)."""
    return faiss.knn(coarse, coarse, min(m, len(coarse)), metric=faiss.METRIC_INNER_PRODUCT)[1]


def refine(clusters: Callable[[], Iterable[tuple[int, np.ndarray]]], centroids: np.ndarray, parent: np.ndarray,
           coarse: np.ndarray, params: TwoLevelParams, threads: Optional[int] = None) -> np.ndarray:
    """Step 3: ``refine_niter`` Lloyd iterations over all centroids, where the vectors of coarse cluster c
    are compared only with the fine centroids whose ``parent`` is among the ``refine_neighbours`` coarse
    centroids nearest c's: one matrix product per coarse cluster (a per-vector choice of candidates
    measured slower than comparing with all centroids: many small products). ``clusters()`` yields
    (coarse cluster, its vectors) in cluster order once per iteration, from memory or from files;
    clusters are assigned in parallel and their sums added in cluster order. Memory: the clusters in
    flight plus a float64 (nlist, d) table of sums. A centroid left without vectors keeps its place."""
    centroids = np.array(centroids, dtype=np.float32)
    candidates = [np.flatnonzero(np.isin(parent, row)) for row in neighbours(coarse, params.refine_neighbours)]
    width = 4 * (threads or os.cpu_count() or 1)
    for _ in range(params.refine_niter):
        sums = np.zeros(centroids.shape, dtype=np.float64)
        counts = np.zeros(len(centroids), dtype=np.int64)
        current = centroids

        def partial(item):
            c, x = item
            cand = candidates[c]
            best = cand[faiss.knn(x, current[cand], 1, metric=faiss.METRIC_INNER_PRODUCT)[1].ravel()]
            order = np.argsort(best, kind="stable")
            ids, starts = np.unique(best[order], return_index=True)
            return ids, np.add.reduceat(x[order], starts, axis=0, dtype=np.float64), \
                np.diff(np.append(starts, len(order)))

        for batch in _batched((item for item in clusters() if len(item[1])), width):
            for ids, part, n in parallel_map(partial, batch, threads):
                sums[ids] += part
                counts[ids] += n
        filled = counts > 0
        centroids[filled] = _unit(sums[filled])
    return centroids


def _batched(items: Iterable, n: int):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def two_level_kmeans(x: np.ndarray, params: TwoLevelParams, threads: Optional[int] = None) -> np.ndarray:
    """(nlist, d) centroids of the whole two-level k-means on an in-memory sample; the Beam build runs the
    same steps over files and workers and gets the same centroids."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if len(x) < params.nlist:
        raise ValueError(f"{len(x)} training vectors cannot train {params.nlist} lists")
    coarse = train_coarse(x[coarse_rows(len(x), params)], params)
    labels = assign(x, coarse, threads)
    share = allocate(np.bincount(labels, minlength=params.coarse), params.nlist)
    members = [np.flatnonzero(labels == c) for c in range(params.coarse)]
    fine = train_fine_clusters(((c, x[rows], int(share[c])) for c, rows in enumerate(members)), params, threads)
    return finish(fine, share, coarse, lambda: ((c, x[rows]) for c, rows in enumerate(members)), params,
                  threads)


def finish(fine: dict[int, np.ndarray], share: np.ndarray, coarse: np.ndarray,
           clusters: Callable[[], Iterable[tuple[int, np.ndarray]]], params: TwoLevelParams,
           threads: Optional[int] = None) -> np.ndarray:
    """The fine centroids in coarse-cluster order, refined (step 3)."""
    order = [c for c in range(params.coarse) if share[c] > 0]
    centroids = np.concatenate([fine[c] for c in order])
    parent = np.repeat(order, share[order])
    if len(centroids) != params.nlist:
        raise ValueError(f"the fine k-means gave {len(centroids)} centroids, expected {params.nlist}")
    return refine(clusters, centroids, parent, coarse, params, threads)
