"""Planning an index build from embeddings manifests alone (no vectors read): shards and their global
row ids, nlist, codec, training and held-out query sample sizes, and which rows each shard samples
(a global sample of row ids, :mod:`index_store.ivf.sample`: the same rows whatever the shard layout).

Pure functions, no Beam import; the Beam build (:mod:`transforms.index`) executes a plan.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Optional, Sequence, Union

import numpy as np

from densebeam.index_store import ivf
from densebeam.index_store.ivf.nprobe import DEFAULT_KS
from densebeam.index_store.ivf.sample import GlobalSample
from densebeam.index_store.types import ModelFacts
from densebeam.index_store.ivf.params import LAYOUTS, REFINE, REFINE_FACTORS

if TYPE_CHECKING:  # the embeddings dirs a plan reads (artifacts sit above ivf: only their shape is used here)
    from densebeam.index_store.artifacts.embeddings import EmbeddingsDir


EXHAUSTIVE_MAX_NLIST = 4096  # compact codecs over more lists are not measured at nprobe = nlist


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    index: int  # position in the bundle (shard-<index>-of-<n>)
    path: str  # embeddings Parquet shard
    base: int  # FAISS id of its first row: ids are base .. base + rows - 1, unique across the build
    rows: int
    n_train: int  # rows of this shard in the (global) training sample
    n_queries: int  # rows of this shard in the (global) held-out query sample for the nprobe measurement


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
    ks: tuple[int, ...]  # recall@k measured for each, ascending (see index_store.ivf.nprobe)
    target_recall: float
    layout: str
    seed: int
    kmeans: str = "flat"  # "flat" (FAISS's) or "two-level" (index_store.ivf.kmeans), see ivf.kmeans_method
    calibration_queries: Optional[str] = None  # file of real queries measured instead of held-out vectors
    max_calibration_queries: int = 1000  # a seeded sample of this many when the file holds more
    refine_factors: tuple[int, ...] = ()  # measured refine factors (index_store.ivf.refine); () = no refinement
    codec_choice: Optional[dict] = None  # how --memory-budget chose the codec (index_store.ivf.codec_choice)

    @property
    def candidates(self) -> int:
        """Candidates per query the recall measurement keeps per nprobe: the largest ``k * r`` measured
        (``k`` without refinement)."""
        from densebeam.index_store.ivf.refine import factors_for_k

        if not self.refine_factors:
            return self.ks[-1]
        return max(k * max(factors_for_k(k, self.refine_factors)) for k in self.ks)

    @property
    def k(self) -> int:
        """The primary k (the smallest): the manifest's legacy ``nprobe`` / ``recall_at_k`` are for it."""
        return self.ks[0]

    def nprobe_candidates(self) -> list[int]:
        """Powers of two up to nlist, then ``nlist`` (exhaustive). A ``Flat`` codec with an exact coarse
        quantizer gets the whole series: its curve comes from list membership at the cost of one
        quantizer search per nprobe. Other indexes have their curve measured by IVF scans, which grow
        with nprobe and are not BLAS-fast (the whole series cost more than the build itself), so they
        stop at ``max(16, nlist // 8)``; a target not reached by then falls back to exhaustive. A
        compact codec over more than ``EXHAUSTIVE_MAX_NLIST`` lists is not scanned exhaustively at all
        (FAISS prepares a lookup table per list and query: at 65,536 lists that alone outweighs the
        build): its curve ends at the cap, and a target not reached takes the best point measured."""
        full = self.codec == "Flat" and "_HNSW" not in self.factory
        cap = self.nlist if full else min(self.nlist, max(16, self.nlist // 8))
        c, out = 1, []
        while c <= cap and c < self.nlist:
            out.append(c)
            c *= 2
        if self.codec != "Flat" and self.nlist > EXHAUSTIVE_MAX_NLIST:
            return out
        return out + [self.nlist]

    @functools.cached_property
    def sample(self) -> GlobalSample:
        """The training and held-out query rows of the whole build, drawn over global row ids (computed
        once per plan object, i.e. once per worker)."""
        return GlobalSample(self.n_vectors, self.train_size, self.n_queries, self.seed)

    def sample_rows(self, shard: ShardSpec) -> tuple[np.ndarray, np.ndarray]:
        """(training rows, query rows) of one shard: local row numbers, sorted; the global sample's rows
        that fall in the shard, so any split of the same rows into shards samples the same rows. Cost:
        proportional to the shard (see :mod:`index_store.ivf.sample`)."""
        train, queries = self.sample.rows(shard.base, shard.base + shard.rows)
        if (len(train), len(queries)) != (shard.n_train, shard.n_queries):
            raise RuntimeError(f"shard {shard.index} ({shard.path}) samples {len(train)} training and "
                               f"{len(queries)} query rows but its plan says {shard.n_train} and "
                               f"{shard.n_queries}; plan the build again")
        return train - shard.base, queries - shard.base


def check_same_facts(dirs: Sequence["EmbeddingsDir"]) -> ModelFacts:
    """The inputs' model facts must agree; the error names both dirs and every difference."""
    first = dirs[0].facts
    for d in dirs[1:]:
        first.check_compatible(d.facts, what=f"{dirs[0].root} and {d.root}")
    return first


def recall_ks(k: Union[int, Sequence[int]], n_vectors: int) -> tuple[int, ...]:
    """The k to measure recall@k at: sorted, distinct, and at most ``n_vectors - 1`` (a held-out vector's
    own row is not its neighbour), so a corpus smaller than a k measures its largest possible k instead."""
    ks = [k] if isinstance(k, int) else list(k)
    if not ks or any(int(x) < 1 for x in ks):
        raise ValueError(f"recall k must be positive integers, got {k!r}")
    cap = max(1, n_vectors - 1)
    return tuple(sorted({min(int(x), cap) for x in ks}))


def plan_build(dirs: Sequence["EmbeddingsDir"], *, nlist: Optional[int] = None, codec: Optional[str] = None,
               memory_budget_bytes: Optional[int] = None, n_queries: int = 1000,
               k: Union[int, Sequence[int]] = DEFAULT_KS, target_recall: float = 0.95, layout: str = "merged",
               seed: int = 1234, calibration_queries: Optional[str] = None, kmeans: str = "auto",
               refine: str = "auto") -> BuildPlan:
    if not dirs:
        raise ValueError("at least one embeddings dir is needed")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not 0 < target_recall <= 1:
        raise ValueError(f"target recall must be in (0, 1], got {target_recall}")
    if refine not in REFINE:
        raise ValueError(f"refine must be one of {REFINE}, got {refine!r}")
    facts = check_same_facts(dirs)
    paths, rows = [], []
    for d in dirs:
        for entry, path in zip(d.record.shards, d.shard_paths):
            if entry.rows > 0:
                paths.append(path)
                rows.append(entry.rows)
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
    train = min(ivf.training_sample_size(nlist, n, facts.dim, memory_budget_bytes), n - n_queries) \
        if n > n_queries else n
    choice = None
    if codec is None and memory_budget_bytes is not None:
        from densebeam.index_store.ivf import codec_choice

        codec, choice = codec_choice.choose_codec(paths, rows, facts.dim, memory_budget_bytes,
                                                  train, recall_ks(k, n),
                                                  target_recall, REFINE_FACTORS if refine == "auto" else (), seed,
                                                  calibration_queries)
    codec = codec or "Flat"
    n_queries = min(n_queries, n - train)  # a corpus too small for both samples trains on every row
    need = ivf.codec_min_training_rows(codec)
    if train < need:
        if memory_budget_bytes is not None and train < min(n, need):
            raise ValueError(f"--memory-budget {memory_budget_bytes} bytes bounds the training sample to {train} "
                             f"vectors, fewer than the {need} the {codec} codec it calls for needs to train; raise "
                             f"the budget to at least {need * 4 * facts.dim} bytes, or pass --codec SQ8")
        raise ValueError(f"the {codec} codec needs at least {need} training vectors and this corpus has {train} to "
                         "train on; pass --codec SQ8 (or Flat), or a PQ with fewer bits (PQ<m>x4)")
    # The samples are drawn over global row ids; each shard counts the sampled rows it holds.
    sample = GlobalSample(n, train, n_queries, seed)
    bounds = np.concatenate([[0], np.cumsum(rows)]).astype(int)
    below = [sample.count_below(int(x)) for x in bounds]
    shards = tuple(ShardSpec(i, p, int(bounds[i]), r, n_train=below[i + 1][0] - below[i][0],
                             n_queries=below[i + 1][1] - below[i][1]) for i, (p, r) in enumerate(zip(paths, rows)))
    return BuildPlan(facts=facts, shards=shards, n_vectors=n, nlist=nlist, codec=codec,
                     factory=ivf.factory_string(nlist, codec), train_size=train,
                     n_queries=n_queries, ks=recall_ks(k, n), target_recall=target_recall, layout=layout,
                     seed=seed, kmeans=ivf.kmeans_method(kmeans, nlist), calibration_queries=calibration_queries,
                     max_calibration_queries=asked_queries,
                     refine_factors=REFINE_FACTORS if refine == "auto" and ivf.codec_trains(codec) else (),
                     codec_choice=choice)
