"""The GPU side of index builds: which GPU trains the coarse k-means and assigns vectors to inverted lists,
and the PyTorch implementation of both. No Beam import.

Two ways to a GPU, in this order:

- ``torch``: PyTorch sees a CUDA device (``torch.cuda.is_available()``): exact flat k-means and list
  assignment as PyTorch matrix products (:func:`spherical_kmeans`, :class:`InnerProductAssigner`), with
  faiss (CPU or GPU build) for everything else. pip's faiss-gpu wheels are built for one CUDA major
  version (12) and need its runtime and cuBLAS beside them, while a machine that encodes on a GPU already
  has a CUDA build of PyTorch; and one implementation everywhere gives the same bytes on every such
  machine, with or without faiss-gpu. (Run on an H100: tests/test_gpu_index.py, docs/benchmarks.md.)
- ``faiss``: faiss built with GPU support (``faiss-gpu``) and a GPU it can see, where PyTorch has no
  CUDA: FAISS's own k-means and list assignment on all GPUs (``faiss.index_cpu_to_all_gpus``).

``DENSEBEAM_GPU=0`` keeps every build on the CPU; ``DENSEBEAM_GPU=torch-cpu`` runs the PyTorch path on the
CPU (how the tests check that code on machines without a GPU). PyTorch is imported only where an NVIDIA
device file exists (``/dev/nvidiactl``) or the variable asks for it: a CPU-only build does not pay for the
import.

Determinism: both PyTorch functions give the same result for the same input whatever size of pieces the
input arrives in and whether it fits in GPU memory (the vectors are cut into fixed blocks of
:data:`BLOCK_ROWS` rows; per-centroid sums are formed in float64 in a fixed order, without atomic adds).
A GPU's matrix products round differently from FAISS's CPU ones, so a GPU build matches a CPU build up
to ties in the assignment, as with faiss-gpu.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable, Iterable, Iterator, Optional

import faiss
import numpy as np

log = logging.getLogger(__name__)

BLOCK_ROWS = 8192  # vectors per matrix product (a fixed cut: results never depend on how input arrives)
SCORE_BYTES = 1 << 30  # at most this much float32 score table per product (fewer rows for large k)
RESIDENT_FRACTION = 0.5  # the sample lives on the GPU when it takes at most this share of free memory
SPLIT_EPS = 1.0 / 1024  # FAISS's symmetric perturbation when an empty cluster takes half of another


def _setting() -> str:
    return os.environ.get("DENSEBEAM_GPU", "auto").strip().lower() or "auto"


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


@functools.lru_cache(maxsize=None)
def _backend_for(setting: str) -> Optional[str]:
    if setting in ("0", "off", "false", "no", "cpu"):
        return None
    if setting == "torch-cpu":
        return "torch" if _torch() is not None else None
    if setting not in ("auto", "1", "on", "true", "yes"):
        raise ValueError(f"DENSEBEAM_GPU must be auto, 0 or torch-cpu, got {setting!r}")
    if os.path.exists("/dev/nvidiactl"):  # else no NVIDIA driver: do not import torch to find out
        torch = _torch()
        if torch is not None and torch.cuda.is_available():
            return "torch"
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        return "faiss"
    return None


def backend() -> Optional[str]:
    """``"faiss"``, ``"torch"`` or None (CPU only): see the module docstring."""
    return _backend_for(_setting())


def torch_device() -> str:
    """The device the PyTorch path runs on: ``cuda`` (the current CUDA device) or ``cpu`` (tests)."""
    return "cpu" if _setting() == "torch-cpu" else "cuda"


def describe() -> str:
    """Where GPU work runs, for logs and manifests: e.g. ``"cuda (torch, NVIDIA H100 80GB HBM3)"``."""
    which = backend()
    if which is None:
        return "cpu"
    if which == "faiss":
        return f"cuda (faiss, {faiss.get_num_gpus()} GPU(s))"
    if torch_device() == "cpu":
        return "cpu (torch)"
    torch = _torch()
    return f"cuda (torch, {torch.cuda.get_device_name()})"


def _blocks(chunks: Iterable[np.ndarray], rows: int) -> Iterator[np.ndarray]:
    """The rows of ``chunks`` re-cut into blocks of exactly ``rows`` (the last one shorter)."""
    pending: list[np.ndarray] = []
    have = 0
    for x in chunks:
        while len(x):
            take = min(rows - have, len(x))
            pending.append(x[:take])
            have += take
            x = x[take:]
            if have == rows:
                yield pending[0] if len(pending) == 1 else np.concatenate(pending)
                pending, have = [], 0
    if have:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)


class InnerProductAssigner:
    """Exact inner-product search of a fixed table of centroids on a PyTorch device, with FAISS's
    ``Index.assign`` / ``Index.search`` signatures for what an IVF add needs (float32 products;
    ties go to the lower centroid id)."""

    def __init__(self, centroids: np.ndarray, device: Optional[str] = None):
        centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.ntotal, self.d = centroids.shape
        self.device = device or torch_device()
        self._c = _to_device(centroids, self.device)
        self._rows = max(1, min(BLOCK_ROWS, SCORE_BYTES // (4 * max(1, self.ntotal))))

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        torch = _torch()
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise ValueError(f"vectors must have shape (n, {self.d}), got {x.shape}")
        if not 1 <= k <= self.ntotal:
            raise ValueError(f"k must be in 1..{self.ntotal}, got {k}")
        scores = np.empty((len(x), k), dtype=np.float32)
        ids = np.empty((len(x), k), dtype=np.int64)
        with torch.no_grad():
            for a in range(0, len(x), self._rows):
                s = _to_device(x[a:a + self._rows], self.device) @ self._c.T
                if k == 1:
                    v, i = s.max(dim=1, keepdim=True)  # the first maximal index on ties
                else:
                    v, i = torch.topk(s, k, dim=1)
                scores[a:a + len(s)] = v.cpu().numpy()
                ids[a:a + len(s)] = i.cpu().numpy()
        return scores, ids

    def assign(self, x: np.ndarray, k: int = 1) -> np.ndarray:
        return self.search(x, k)[1]


def _to_device(x: np.ndarray, device: str):
    """A float32 tensor on ``device`` holding ``x`` (copied; torch does not wrap read-only arrays)."""
    torch = _torch()
    x = np.ascontiguousarray(x, dtype=np.float32)
    return torch.from_numpy(x if x.flags.writeable else x.copy()).to(device)


def _unit_rows(t):
    norms = t.norm(dim=1, keepdim=True)
    return t / norms.clamp_min(1e-30)


def _split_empty(centroids: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> int:
    """FAISS's handling of empty clusters (``split_clusters``): each empty centroid takes a copy of a
    centroid drawn with probability proportional to (its vectors - 1), the two nudged apart by a small
    symmetric perturbation, the vectors assumed split evenly. Returns how many were split."""
    empty = np.flatnonzero(counts == 0)
    sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0).astype(np.float32)
    for ci in empty:
        weight = np.maximum(counts - 1, 0).astype(np.float64)
        if weight.sum() <= 0:
            break
        cj = int(rng.choice(len(counts), p=weight / weight.sum()))
        centroids[ci] = centroids[cj] * (1 + SPLIT_EPS * sign)
        centroids[cj] = centroids[cj] * (1 - SPLIT_EPS * sign)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
    return len(empty)


def gather_rows(chunks: Iterable[np.ndarray], rows: np.ndarray, d: int) -> np.ndarray:
    """Rows (sorted global row numbers) of the concatenated chunks, holding one chunk at a time (used on
    every build path, GPU or not)."""
    out = np.empty((len(rows), d), dtype=np.float32)
    start = 0
    for x in chunks:
        a, b = np.searchsorted(rows, [start, start + len(x)])
        out[a:b] = x[rows[a:b] - start]
        start += len(x)
    return out


def _fits(device: str, nbytes: int) -> bool:
    """Whether ``nbytes`` of vectors stay on ``device`` for the whole k-means (a CUDA device with
    :data:`RESIDENT_FRACTION` of its free memory to spare; on the CPU they are streamed)."""
    return device != "cpu" and nbytes <= RESIDENT_FRACTION * _torch().cuda.mem_get_info(device)[0]


def spherical_kmeans(chunks: Callable[[], Iterable[np.ndarray]], n: int, d: int, k: int, *, seed: int,
                     niter: int = 10, device: Optional[str] = None,
                     progress: Optional[Callable[[int, float], None]] = None) -> np.ndarray:
    """(k, d) unit centroids of spherical k-means over ``n`` d-dimensional vectors, on a PyTorch device:
    what FAISS's flat k-means computes for an inner-product IVF (exact float32 scores, ``niter`` Lloyd
    iterations, unit centroids, empty clusters split as FAISS does), without subsampling.

    ``chunks()`` yields the vectors in order, in pieces of any size, and may be called once per
    iteration: the vectors are copied to the device once when they take at most
    :data:`RESIDENT_FRACTION` of its free memory (``n * d * 4`` bytes), else streamed from ``chunks()``
    every iteration. The host holds one piece at a time. Initial centroids: ``k`` distinct vectors drawn
    with ``seed``, normalized. ``progress(iteration, objective)`` is called after each iteration."""
    torch = _torch()
    device = device or torch_device()
    if not 1 <= k <= n:
        raise ValueError(f"cannot cluster {n} vectors into {k} centroids")
    resident = None
    if _fits(device, n * d * 4):
        resident = torch.empty((n, d), dtype=torch.float32, device=device)
        at = 0
        for x in chunks():
            if at + len(x) > n:
                raise ValueError(f"the vectors hold more than {n} rows, expected {n}")
            resident[at:at + len(x)] = _to_device(x, device)
            at += len(x)
        if at != n:
            raise ValueError(f"the vectors hold {at} rows, expected {n}")
    init_order = np.random.default_rng([seed, 3]).choice(n, k, replace=False)
    if resident is not None:  # the initial centroids from the copy on the device: no second pass over the input
        init = resident[torch.from_numpy(init_order).to(device)].cpu().numpy()
    else:
        rows = np.sort(init_order)
        init = gather_rows(chunks(), rows, d)[np.searchsorted(rows, init_order)]

    def device_blocks():
        if resident is not None:
            for a in range(0, n, BLOCK_ROWS):
                yield resident[a:a + BLOCK_ROWS]
            return
        seen = 0
        for x in _blocks(chunks(), BLOCK_ROWS):
            seen += len(x)
            yield _to_device(x, device)
        if seen != n:
            raise ValueError(f"the vectors hold {seen} rows, expected {n}")

    rows_per_product = max(1, min(BLOCK_ROWS, SCORE_BYTES // (4 * k)))
    centroids = _unit_rows(_to_device(init, device))
    with torch.no_grad():
        for it in range(niter):
            sums = torch.zeros((k, d), dtype=torch.float64, device=device)
            counts = torch.zeros(k, dtype=torch.int64, device=device)
            objective = torch.zeros((), dtype=torch.float64, device=device)
            for block in device_blocks():
                for a in range(0, len(block), rows_per_product):
                    x = block[a:a + rows_per_product]
                    best, labels = (x @ centroids.T).max(dim=1)
                    objective += best.double().sum()
                    # per-centroid sums without atomic adds: sort by centroid, float64 prefix sums,
                    # differences at the run ends (each centroid once per piece: no write conflicts)
                    order = torch.argsort(labels, stable=True)
                    ids, runs = torch.unique_consecutive(labels[order], return_counts=True)
                    prefix = x[order].double().cumsum(dim=0)
                    ends = runs.cumsum(dim=0) - 1
                    part = prefix[ends]
                    part[1:] -= prefix[ends[:-1]]
                    sums[ids] += part
                    counts[ids] += runs
            host_sums, host_counts = sums.cpu().numpy(), counts.cpu().numpy()
            filled = host_counts > 0
            new = centroids.cpu().numpy()
            new[filled] = (host_sums[filled] / host_counts[filled, None]).astype(np.float32)
            _split_empty(new, host_counts, np.random.default_rng([seed, 4, it]))
            centroids = _unit_rows(torch.from_numpy(new).to(device))
            if progress is not None:
                progress(it, float(objective))
    out = centroids.cpu().numpy()
    del resident, centroids
    if device != "cpu":
        torch.cuda.empty_cache()  # give the sample's GPU memory back (an encoder may share the GPU)
    return np.ascontiguousarray(out, dtype=np.float32)
