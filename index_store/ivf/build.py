"""FAISS IVF planning and operations: pure functions over numpy and faiss. No Beam import.

The build follows the distributed recipe: plan (``choose_nlist``; the codec under a memory budget is
measured, :mod:`index_store.ivf.codec_choice`), train once on a sample (``train_empty_index``), ship
the *empty trained* index as bytes, add vectors per shard, write one file per shard, and either keep
the shards (``ShardedSearcher``) or merge their inverted lists on disk (``merge_on_disk`` +
``open_merged``, memory-mapped; in ``ivf.files``).
Every index uses the inner-product metric: ``cos`` vectors are unit-norm, ``dot`` vectors are raw.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Optional

import faiss
import numpy as np

from densebeam.index_store.ivf import gpu, kmeans

from densebeam.index_store.ivf.files import index_to_bytes
from densebeam.index_store.ivf.params import KMEANS

log = logging.getLogger(__name__)

MIN_POINTS_PER_CENTROID = 39  # FAISS warns when k-means gets fewer training points per centroid
SAMPLE_POINTS_PER_CENTROID = 100


# ---------------------------------------------------------------- planning (pure, no I/O)

def choose_nlist(n_vectors: int) -> int:
    """Number of IVF lists: the power of two just above 4*sqrt(N) up to 1M vectors (the cheap end of FAISS's
    4*sqrt(N)..16*sqrt(N) guideline: k-means cost grows with nlist, and the measured nprobe recovers
    recall), 65536 up to 10M, 262144 up to 100M, 1048576 above (those with an HNSW coarse quantizer, see
    :func:`factory_string`); never more than N // 39 (FAISS's minimum training points per centroid)."""
    if n_vectors < 1:
        raise ValueError(f"cannot index {n_vectors} vectors; the embeddings dir is empty")
    if n_vectors <= 1_000_000:
        nlist = 2 ** math.ceil(math.log2(4 * math.sqrt(n_vectors)))
    elif n_vectors < 10_000_000:
        nlist = 65536
    elif n_vectors < 100_000_000:
        nlist = 262144
    else:
        nlist = 1048576
    return max(1, min(nlist, n_vectors // MIN_POINTS_PER_CENTROID))


def training_sample_size(nlist: int, n_vectors: int, dim: int, memory_budget_bytes: Optional[int]) -> int:
    """Rows to sample for k-means: 100 per list, capped by the corpus and by ``budget // (4 * dim)``.

    More points give better centroids (FAISS itself subsamples to 256 per list); training time grows
    linearly with the sample. Below 39 points per list a warning is logged; below ``nlist`` it fails.
    """
    if nlist < 1 or n_vectors < 1 or dim < 1:
        raise ValueError(f"nlist, n_vectors and dim must be positive, got {nlist}, {n_vectors}, {dim}")
    size = min(max(SAMPLE_POINTS_PER_CENTROID * nlist, MIN_POINTS_PER_CENTROID * nlist), n_vectors)
    if memory_budget_bytes is not None:
        size = min(size, memory_budget_bytes // (4 * dim))
    if size < nlist:
        raise ValueError(f"a training sample of {size} vectors cannot train {nlist} lists; raise the "
                         f"memory budget to at least {nlist * 4 * dim} bytes or choose a smaller nlist")
    if size < MIN_POINTS_PER_CENTROID * nlist:
        log.warning("training on %d vectors for %d lists (< %d per list): centroids will be poor; raise "
                    "the memory budget or lower nlist", size, nlist, MIN_POINTS_PER_CENTROID)
    return size


def factory_string(nlist: int, codec: str) -> str:
    """The ``faiss.index_factory`` description, e.g. ``IVF256,Flat``."""
    if nlist < 1:
        raise ValueError(f"nlist must be positive, got {nlist}")
    quantizer = "_HNSW32" if nlist >= 65536 else ""  # graph-assigned lists at that scale
    return f"IVF{nlist}{quantizer},{codec}"


# ---------------------------------------------------------------- training and adding

def _as_vectors(x: np.ndarray, what: str, dim: Optional[int] = None) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"{what} must have shape (n, {dim or 'dim'}), got {x.shape}")
    return x


FLAT_KMEANS_NITER = 10  # FAISS's IVF training default (Level1Quantizer's ClusteringParameters)


CODEC_TRAIN_ROWS = 65536  # SQ8/PQ codec training: FAISS's PQ uses at most 256 points x 256 centroids


def kmeans_method(method: str, nlist: int) -> str:
    """``auto``: flat k-means where a GPU runs it (:mod:`index_store.ivf.gpu`: exact, and minutes for MS
    MARCO's 65,536 lists); on CPUs two-level k-means (:mod:`index_store.ivf.kmeans`) from 1024 lists up and
    FAISS's flat k-means below (seconds either way)."""
    if method not in KMEANS:
        raise ValueError(f"k-means method must be one of {KMEANS}, got {method!r}")
    if method == "auto":
        if gpu.backend() is not None:
            return "flat"
        return "two-level" if kmeans.use_two_level(nlist) else "flat"
    return method


def codec_rows(n: int, seed: int) -> np.ndarray:
    """Sorted rows of an n-vector training sample that train an SQ8/PQ codec (a seeded choice)."""
    want = min(n, CODEC_TRAIN_ROWS)
    return np.sort(np.random.default_rng([seed, 2]).choice(n, want, replace=False))


# The HNSW coarse quantizer of nlist >= 65536 builds. FAISS's defaults (efConstruction 40, efSearch 16)
# assigned 7.75% of 8.8M vectors to a list other than their nearest centroid's, many far from it (1.25%
# beyond the 512 nearest), so no nprobe short of nlist found them: recall@10 stopped at 0.888 from
# nprobe 512 to 8192. With 200 / 64: 99.88% assigned to their nearest list (4,000 vectors measured
# against exact search of the 65,536 centroids), at about twice the assignment cost.
HNSW_EF_CONSTRUCTION = 200
HNSW_EF_SEARCH = 64


def codec_trains(factory: str) -> bool:
    """Whether ``factory``'s codec learns from data (SQ8, PQ): a ``Flat`` codec stores vectors as they are."""
    return factory.rsplit(",", 1)[-1].strip() != "Flat"


def codec_min_training_rows(codec: str) -> int:
    """Training vectors a codec needs: ``PQ{m}x{b}`` learns 2**b centroids per sub-vector from at least
    as many points (FAISS refuses fewer); SQ8 and Flat train on anything."""
    m = re.fullmatch(r"PQ(\d+)(?:x(\d+))?", codec.strip())
    return 2 ** int(m.group(2) or 8) if m else 1


def new_index(dim: int, factory: str) -> faiss.Index:
    """``faiss.index_factory`` with the inner-product metric, without polysemous training: FAISS's factory
    turns it on for IVF-PQ, where it re-orders each sub-quantizer's centroids so that Hamming distances
    between codes follow vector distances. Only a polysemous search (``polysemous_ht``, never set here)
    uses that; the scores are the same either way, and it was most of PQ's training time
    (docs/benchmarks.md)."""
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    if hasattr(ivf, "do_polysemous_training"):
        ivf.do_polysemous_training = False
    return index


def trained_from_centroids(centroids: np.ndarray, factory: str, codec_sample: Optional[np.ndarray]) -> bytes:
    """The serialized empty index of ``factory`` with these coarse centroids (the quantizer is set, not
    trained; an HNSW quantizer builds its graph over them), its codec (SQ8, PQ) trained on
    ``codec_sample`` (see :func:`codec_rows`); None for a codec that does not train (:func:`codec_trains`:
    the same bytes as training it, without reading a sample)."""
    centroids = _as_vectors(centroids, "centroids")
    index = new_index(centroids.shape[1], factory)
    ivf = faiss.extract_index_ivf(index)
    if len(centroids) != ivf.nlist:
        raise ValueError(f"{len(centroids)} centroids for {factory}; expected {ivf.nlist}")
    ivf.quantizer.reset()
    hnsw = getattr(faiss.downcast_index(ivf.quantizer), "hnsw", None)
    if hnsw is not None:
        hnsw.efConstruction = HNSW_EF_CONSTRUCTION
    ivf.quantizer.add(centroids)
    if hnsw is not None:
        hnsw.efSearch = HNSW_EF_SEARCH  # stored in the file: adding assigns with it; searches use max(it, nprobe)
    ivf.quantizer.is_trained = True
    if codec_sample is None:
        if codec_trains(factory) or not isinstance(faiss.downcast_index(index), faiss.IndexIVFFlat):
            raise ValueError(f"{factory} trains its codec: pass a codec sample")
        index.is_trained = True  # what IndexIVFFlat.train does once its quantizer is trained
    else:  # quantizer kept: codec only
        index.train(_as_vectors(codec_sample, "codec sample", centroids.shape[1]))
    return index_to_bytes(index)


def train_empty_index(sample: np.ndarray, factory: str, seed: int = 1234, method: str = "auto") -> bytes:
    """Train ``factory`` (inner product) on ``sample`` and return the serialized *empty* index.

    k-means is seeded, so the same sample and factory give the same bytes. ``method`` (see
    :func:`kmeans_method`): two-level k-means for large nlist (the Beam build runs the same steps over
    files and workers and writes the same bytes), else FAISS's own, which runs on all GPUs when faiss
    has GPU support and a GPU is present, else on CPU threads. Memory: the sample plus the index's
    centroid table.
    """
    sample = _as_vectors(sample, "training sample")
    index = new_index(sample.shape[1], factory)
    ivf = faiss.extract_index_ivf(index)
    if sample.shape[0] < ivf.nlist:
        raise ValueError(f"{sample.shape[0]} training vectors cannot train {ivf.nlist} lists; sample more "
                         "vectors or lower nlist")
    if kmeans_method(method, ivf.nlist) == "two-level":
        centroids = kmeans.two_level_kmeans(sample, kmeans.two_level_params(ivf.nlist, seed))
        return trained_from_centroids(centroids, factory,
                                      sample[codec_rows(len(sample), seed)] if codec_trains(factory) else None)
    if gpu.backend() == "torch":
        return train_flat_torch(lambda: (sample,), len(sample), sample.shape[1], factory, seed)
    ivf.cp.seed = seed
    gpu_clustering = None  # keep a Python reference: the IVF index does not own its clustering index
    if gpu.backend() == "faiss":
        log.info("training %s on %s", factory, gpu.describe())
        gpu_clustering = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(sample.shape[1]))
        ivf.clustering_index = gpu_clustering
    index.train(sample)
    if gpu_clustering is not None:
        ivf.clustering_index = None  # never serialize a pointer to a GPU index
    return index_to_bytes(index)


def train_flat_torch(chunks, n: int, dim: int, factory: str, seed: int = 1234) -> bytes:
    """The serialized empty index of ``factory`` with its coarse centroids from PyTorch's flat spherical
    k-means (:func:`gpu.spherical_kmeans`) over the ``n`` ``dim``-dimensional vectors that ``chunks()``
    yields (re-iterable, pieces of any size; the host holds one piece at a time). Logs each iteration."""
    nlist = faiss.extract_index_ivf(faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)).nlist
    if n < nlist:
        raise ValueError(f"{n} training vectors cannot train {nlist} lists; sample more vectors or lower nlist")
    where = gpu.describe()
    log.info("training %s: flat k-means of %d vectors on %s", factory, n, where)

    def progress(it: int, objective: float) -> None:
        log.info("k-means on %s: iteration %d/%d, mean best inner product %.5f", where, it + 1,
                 FLAT_KMEANS_NITER, objective / n)

    centroids = gpu.spherical_kmeans(chunks, n, dim, nlist, seed=seed, niter=FLAT_KMEANS_NITER, progress=progress)
    codec = gpu.gather_rows(chunks(), codec_rows(n, seed), dim) if codec_trains(factory) else None
    return trained_from_centroids(centroids, factory, codec)


def coarse_assigner(index: faiss.Index) -> faiss.Index:
    """What assigns vectors to inverted lists when adding (the costly part of an IVF add: one search of
    the nlist centroids per vector): for a flat coarse quantizer on a GPU (:mod:`index_store.ivf.gpu`), a
    copy on all GPUs (faiss-gpu) or PyTorch products against its centroids; else the index's own
    quantizer (CPU threads). Same lists either way, up to float ties. (An HNSW quantizer stays on the
    CPU: its graph decides the lists, and a search probes by the same graph.)"""
    quantizer = faiss.extract_index_ivf(index).quantizer
    if assigns_on_gpu(index):
        log.info("assigning vectors to lists on %s", gpu.describe())
        if gpu.backend() == "faiss":
            return faiss.index_cpu_to_all_gpus(quantizer)
        return gpu.InnerProductAssigner(quantizer.reconstruct_n(0, quantizer.ntotal))
    return quantizer


def assigns_on_gpu(index: faiss.Index) -> bool:
    """Whether :func:`coarse_assigner` puts this index's list assignment on a GPU."""
    return gpu.backend() is not None and isinstance(
        faiss.downcast_index(faiss.extract_index_ivf(index).quantizer), faiss.IndexFlat)


def add_assigned(index: faiss.Index, ids: np.ndarray, vectors: np.ndarray,
                 assigner: Optional[faiss.Index] = None) -> np.ndarray:
    """``index.add_with_ids`` for a bare IndexIVF that also returns each vector's inverted list (what
    add_with_ids computes internally and discards): the coarse assignment by ``assigner`` (default: the
    index's quantizer; see :func:`coarse_assigner`), then ``add_core`` encodes and appends."""
    ivf = faiss.downcast_index(index)
    if not isinstance(ivf, faiss.IndexIVF):
        raise TypeError(f"add_assigned needs a bare IndexIVF, got {type(ivf).__name__}")
    vectors = _as_vectors(vectors, "vectors", ivf.d)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if ids.shape != (vectors.shape[0],):
        raise ValueError(f"got {ids.shape[0] if ids.ndim else ids} ids for {vectors.shape[0]} vectors")
    assigner = ivf.quantizer if assigner is None else assigner
    lists = np.ascontiguousarray(assigner.assign(vectors, 1).ravel(), dtype=np.int64)
    ivf.add_core(len(vectors), faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
    return lists
