"""Planning an index build from embeddings manifests alone (no vectors read): shards and their global
row ids, nlist, codec, training and held-out query sample sizes, and which rows each shard samples.

Pure functions, no Beam import; the Beam build (:mod:`transforms.index`) executes a plan.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np

from densebeam.index_store import ivf
from densebeam.index_store.nprobe import DEFAULT_KS
from densebeam.index_store.embeddings import EmbeddingsDir
from densebeam.index_store.types import ModelFacts

LAYOUTS = ("merged", "shards")


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    index: int  # position in the bundle (shard-<index>-of-<n>)
    path: str  # embeddings Parquet shard
    base: int  # FAISS id of its first row: ids are base .. base + rows - 1, unique across the build
    rows: int
    n_train: int  # rows of this shard in the training sample
    n_queries: int  # rows of this shard used as held-out queries for the nprobe measurement


@dataclasses.dataclass(frozen=True)
class BuildPlan:
    facts: ModelFacts
    shards: tuple[ShardSpec, ...]
    n_vectors: int
    nlist: int
    codec: str
    factory: str
    train_size: int
    n_queries: int
    ks: tuple[int, ...]  # recall@k measured for each, ascending (see index_store.nprobe)
    target_recall: float
    layout: str
    seed: int
    kmeans: str = "flat"  # "flat" (FAISS's) or "two-level" (index_store.kmeans), see ivf.kmeans_method
    calibration_queries: Optional[str] = None  # file of real queries measured instead of held-out vectors
    max_calibration_queries: int = 1000  # a seeded sample of this many when the file holds more

    @property
    def k(self) -> int:
        """The primary k (the smallest): the manifest's legacy ``nprobe`` / ``recall_at_k`` are for it."""
        return self.ks[0]

    def nprobe_candidates(self) -> list[int]:
        """Powers of two up to nlist, then ``nlist`` (exhaustive). A ``Flat`` codec with an exact coarse
        quantizer gets the whole series: its curve comes from list membership at the cost of one
        quantizer search per nprobe. Other indexes have their curve measured by IVF scans, which grow
        with nprobe and are not BLAS-fast (the whole series cost more than the build itself), so they
        stop at ``max(16, nlist // 8)``; a target not reached by then falls back to exhaustive."""
        full = self.codec == "Flat" and "_HNSW" not in self.factory
        cap = self.nlist if full else min(self.nlist, max(16, self.nlist // 8))
        c, out = 1, []
        while c <= cap and c < self.nlist:
            out.append(c)
            c *= 2
        return out + [self.nlist]

    def sample_rows(self, shard: ShardSpec) -> tuple[np.ndarray, np.ndarray]:
        """(training rows, query rows) of one shard: local row numbers, seeded, disjoint, sorted."""
        rng = np.random.default_rng([self.seed, shard.index])
        picked = rng.choice(shard.rows, shard.n_train + shard.n_queries, replace=False)
        return np.sort(picked[:shard.n_train]), np.sort(picked[shard.n_train:])


def check_same_facts(dirs: Sequence[EmbeddingsDir]) -> ModelFacts:
    """The inputs' model facts must agree; the error names both dirs and every difference."""
    first = dirs[0].facts
    for d in dirs[1:]:
        first.check_compatible(d.facts, what=f"{dirs[0].root} and {d.root}")
    return first


def _allocate(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` over shards proportionally to ``weights`` (largest remainder; sums exactly)."""
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    out = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - out), kind="stable")[: total - int(out.sum())]:
        out[i] += 1
    return [int(min(x, cap)) for x, cap in zip(out, weights)]


def recall_ks(k: Union[int, Sequence[int]], n_vectors: int) -> tuple[int, ...]:
    """The k to measure recall@k at: sorted, distinct, and at most ``n_vectors - 1`` (a held-out vector's
    own row is not its neighbour), so a corpus smaller than a k measures its largest possible k instead."""
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or any(int(x) < 1 for x in ks):
        raise ValueError(f"recall k must be positive integers, got {k!r}")
    cap = max(1, n_vectors - 1)
    return tuple(sorted({min(int(x), cap) for x in ks}))


def plan_build(dirs: Sequence[EmbeddingsDir], *, nlist: Optional[int] = None, codec: Optional[str] = None,
               memory_budget_bytes: Optional[int] = None, n_queries: int = 1000,
               k: Union[int, Sequence[int]] = DEFAULT_KS, target_recall: float = 0.95, layout: str = "merged",
               seed: int = 1234, calibration_queries: Optional[str] = None, kmeans: str = "auto") -> BuildPlan:
    if not dirs:
        raise ValueError("at least one embeddings dir is needed")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 0 < target_recall <= 1:
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    facts = check_same_facts(dirs)
    paths, rows = [], []
    for d in dirs:
        for entry, path in zip(d.manifest["shards"], d.shard_paths):
            if entry["rows"] > 0:
                paths.append(path)
                rows.append(int(entry["rows"]))
    n = sum(rows)
    if n == 0:
        raise ValueError(f"the embeddings dir(s) {[d.root for d in dirs]} hold no vectors; nothing to index")
    if n_queries < 1:
        raise ValueError(f"recall is measured on at least one query; got --recall-queries {n_queries}")
    asked_queries, n_queries = n_queries, max(1, min(n_queries, n // 10 or 1))
    # Queries are held out of the training sample, so nlist is sized on what is left to train on.
    nlist = int(nlist or ivf.choose_nlist(max(1, n - n_queries)))
    if nlist > n:
        raise ValueError(f"nlist {nlist} is larger than the {n} vectors to index; pass a smaller --nlist")
    codec = codec or ivf.choose_codec(n, facts.dim, memory_budget_bytes)
    train = min(ivf.training_sample_size(nlist, n, facts.dim, memory_budget_bytes), n - n_queries) \
        if n > n_queries else n
    trains, queries = _allocate(train, rows), _allocate(n_queries, rows)
    # A shard too small for both samples gives its queries back to the training sample's slack.
    queries = [min(q, r - t) for q, r, t in zip(queries, rows, trains)]
    bases = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(int)
    shards = tuple(ShardSpec(i, p, int(b), r, t, q)
                   for i, (p, b, r, t, q) in enumerate(zip(paths, bases, rows, trains, queries)))
    return BuildPlan(facts=facts, shards=shards, n_vectors=n, nlist=nlist, codec=codec,
                     factory=ivf.factory_string(nlist, codec), train_size=sum(trains),
                     n_queries=sum(queries), ks=recall_ks(k, n), target_recall=target_recall, layout=layout,
                     seed=seed, kmeans=ivf.kmeans_method(kmeans, nlist), calibration_queries=calibration_queries,
                     max_calibration_queries=asked_queries)
