"""BuildIndex: embeddings shards -> a FAISS IVF index bundle, following a :class:`BuildPlan`.

Train once on a sample drawn across all shards, ship the *empty trained* index (bytes) to the workers
as a side input, add each shard's vectors in parallel (one worker holds one shard), measure recall
against exact search on held-out vectors of the data itself, then merge or keep the shards and write
``manifest.json`` last.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from typing import Iterator

import apache_beam as beam
import faiss
import fsspec
import numpy as np
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from densebeam.index_store.artifacts import bundle as bundle_lib
from densebeam.index_store.artifacts import raw_vectors
from densebeam.index_store import ivf
from densebeam.index_store.ivf import gpu
from densebeam.index_store.ivf import kmeans
from densebeam.index_store.ivf.plan import BuildPlan, ShardSpec
from densebeam.index_store.artifacts.docstore import DocstoreWriter
from densebeam.index_store.artifacts.embeddings import join
from densebeam.index_store.fsutil import canonical_url, sha256_file
from densebeam.index_store.ivf.search import merge_topk
from densebeam.index_store.ivf.nprobe import nprobe_by_k
from densebeam.index_store.ivf.refine import candidate_scores, choose_refine, factors_for_k, refined_recall
from densebeam.transforms.read import NAMESPACE

log = logging.getLogger(__name__)
BATCH_ROWS = 16384


def iter_shard_rows(shard: ShardSpec, batch_rows: int = BATCH_ROWS, vectors_only: bool = False):
    """(local row offset, ids, float32 vectors, texts or None, titles or None) batches of one shard;
    ``vectors_only`` reads just the embedding column (ids None)."""
    with fsspec.open(shard.path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        cols = ["embedding"] if vectors_only else (
            ["id", "embedding"] + [c for c in ("text", "title") if c in names])
        at = cols.index("embedding")
        dim = pf.schema_arrow.field("embedding").type.list_size
        offset = 0
        for batch in pf.iter_batches(batch_size=batch_rows, columns=cols):
            vecs = np.asarray(batch.column(at).values.to_numpy(zero_copy_only=False), dtype=np.float32)
            vecs = vecs.reshape(-1, dim)
            if not np.all(np.isfinite(vecs)):
                raise ValueError(f"{shard.path} rows {offset}..{offset + len(vecs)} hold NaN/Inf vectors; "
                                 "re-encode (densebeam encode rejects them)")
            col = {name: batch.column(i).to_pylist() for i, name in enumerate(cols) if i != at}
            yield offset, col.get("id"), vecs, col.get("text"), col.get("title")
            offset += len(vecs)
        if offset != shard.rows:
            raise ValueError(f"{shard.path} holds {offset} rows but its manifest says {shard.rows}; "
                             "the embeddings dir changed after it was written")


TEMP_DIR = "_build"


class _SampleShardFn(beam.DoFn):
    """One pass over a shard: its rows of the build's seeded training sample (drawn over global row
    ids, so the same rows whatever the shard layout: ``BuildPlan.sample_rows``), written to a temp
    ``.npy`` file whose path is emitted (tag ``train``; the sample never travels through the runner, so
    it exists once in memory, at training), and its held-out query rows (small; emitted as arrays)."""

    def __init__(self, plan: BuildPlan, root: str):
        self._plan, self._root = plan, root

    def process(self, shard: ShardSpec):
        start = time.monotonic()
        train_rows, query_rows = self._plan.sample_rows(shard)
        dim = self._plan.facts.dim
        queries = np.empty((len(query_rows), dim), dtype=np.float32)
        path = join(self._root, TEMP_DIR, f"train-{shard.index:05d}.npy")
        # The training rows stream straight into the .npy file: the shard's share is never held whole.
        with fsspec.open(path, "wb") as f:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                      "shape": (len(train_rows), dim)}
            np.lib.format.write_array_header_1_0(f, header)
            for offset, _, vecs, _, _ in iter_shard_rows(shard, vectors_only=True):
                t0, t1 = np.searchsorted(train_rows, [offset, offset + len(vecs)])  # rows are sorted
                f.write(np.ascontiguousarray(vecs[train_rows[t0:t1] - offset]).data)
                q0, q1 = np.searchsorted(query_rows, [offset, offset + len(vecs)])
                queries[q0:q1] = vecs[query_rows[q0:q1] - offset]
        yield beam.pvalue.TaggedOutput("train", (shard.index, path, len(train_rows)))
        yield beam.pvalue.TaggedOutput("timing", ("sample", time.monotonic() - start))
        yield shard.index, shard.base + query_rows.astype(np.int64), queries


def _concat_by_shard(parts):
    """Deterministic concatenation whatever order the runner delivered the parts in: shard order, which
    is global row order (shards are numbered in row order and each part's rows are sorted)."""
    return sorted(parts, key=lambda p: p[0])


def _load(path: str) -> np.ndarray:
    with fsspec.open(path, "rb") as f:
        return np.load(f)


def _sample_files(parts) -> Iterator[np.ndarray]:
    """The training sample, one shard's share at a time, in shard order."""
    for _, path, _ in _concat_by_shard(parts):
        yield _load(path)


def _gather_rows(parts, rows: np.ndarray, dim: int) -> np.ndarray:
    """Rows (sorted, numbered across the whole sample) of the sample, reading one share at a time."""
    return gpu.gather_rows(_sample_files(parts), rows, dim)


class _TrainFn(beam.DoFn):
    """Flat k-means on the whole sample: with PyTorch on a GPU (:mod:`index_store.ivf.gpu`), streamed from the
    sample files (the host holds one shard's share; the GPU the sample when it fits); else FAISS's, in
    memory (on CPUs: small nlist, seconds; faiss-gpu: all GPUs)."""

    def __init__(self, plan: BuildPlan):
        self._plan = plan

    def process(self, parts):
        plan, start = self._plan, time.monotonic()
        n = sum(p[2] for p in parts)
        if gpu.backend() == "torch":
            yield ivf.train_flat_torch(lambda: _sample_files(parts), n, plan.facts.dim, plan.factory, seed=plan.seed)
        else:
            sample = np.concatenate(list(_sample_files(parts)))
            yield ivf.train_empty_index(sample, plan.factory, seed=plan.seed, method="flat")
        log.info("trained %s on %d vectors on %s in %.1f s", plan.factory, n, gpu.describe(),
                 time.monotonic() - start)
        yield beam.pvalue.TaggedOutput("timing", ("kmeans", time.monotonic() - start))
        yield beam.pvalue.TaggedOutput("timing", (DEVICE_PREFIX + "kmeans", gpu.describe()))


# ---------------------------------------------------------------- two-level k-means over workers
# The steps of index_store.ivf.kmeans.two_level_kmeans, with the sample in files: the coarse step writes each
# group of coarse clusters' vectors to a file, fine k-means runs per group on any worker, the refine step
# streams the group files again. Same centroids as the in-memory function, whatever the worker count.

DEVICE_PREFIX = "device:"  # ("device:<stage>", where it ran) ride along the timings to the manifest
TRAIN_GROUPS = 16  # elements of the fine step (coarse clusters c * TRAIN_GROUPS // k1 go together)


class _CoarseFn(beam.DoFn):
    """Step 1 in one place: coarse k-means on a seeded subsample read from the sample files, then every
    sample vector assigned to a coarse cluster and appended to its group's file (memory: the subsample
    and one shard's share of the sample). Emits one element per group (file, rows, labels) and, tagged
    ``coarse``, the coarse centroids with each cluster's share of the nlist fine centroids."""

    def __init__(self, plan: BuildPlan, root: str):
        self._plan, self._root = plan, root

    def process(self, parts):
        plan, start = self._plan, time.monotonic()
        params = kmeans.two_level_params(plan.nlist, plan.seed)
        n = sum(p[2] for p in parts)
        coarse = kmeans.train_coarse(_gather_rows(parts, kmeans.coarse_rows(n, params), plan.facts.dim), params)
        groups = min(TRAIN_GROUPS, params.coarse)
        labels: list[list[np.ndarray]] = [[] for _ in range(groups)]
        paths = [join(self._root, TEMP_DIR, f"coarse-{g:05d}.f32") for g in range(groups)]
        files = [fsspec.open(path, "wb").open() for path in paths]
        try:
            for x in _sample_files(parts):
                lab = kmeans.assign(x, coarse)
                group = lab * groups // params.coarse
                for g in np.unique(group):
                    files[g].write(np.ascontiguousarray(x[group == g]).data)
                    labels[g].append(lab[group == g].astype(np.int32))
        finally:
            for f in files:
                f.close()
        all_labels = np.concatenate([np.concatenate(lab) for lab in labels if lab])
        share = kmeans.allocate(np.bincount(all_labels, minlength=params.coarse), plan.nlist)
        log.info("coarse k-means: %d clusters of %d sample vectors in %.1f s", params.coarse, n,
                 time.monotonic() - start)
        yield beam.pvalue.TaggedOutput("coarse", (coarse, share))
        yield beam.pvalue.TaggedOutput("timing", ("kmeans_coarse", time.monotonic() - start))
        for g in range(groups):
            lab = np.concatenate(labels[g]) if labels[g] else np.zeros(0, np.int32)
            yield {"group": g, "path": paths[g], "labels": lab, "share": share}


class _FineFn(beam.DoFn):
    """Step 2 for one group of coarse clusters: its vectors from its file, each cluster's fine k-means
    on its own thread (all cores of this worker)."""

    def __init__(self, plan: BuildPlan):
        self._plan = plan

    def process(self, group: dict):
        plan, start = self._plan, time.monotonic()
        params = kmeans.two_level_params(plan.nlist, plan.seed)
        share = group["share"]
        yield kmeans.train_fine_clusters(((c, x, int(share[c])) for c, x in _clusters([group], plan.facts.dim)),
                                         params)
        yield beam.pvalue.TaggedOutput("timing", ("kmeans_fine", time.monotonic() - start))


def _read_group(group: dict, dim: int) -> np.ndarray:
    with fsspec.open(group["path"], "rb") as f:
        return np.frombuffer(f.read(), dtype=np.float32).reshape(-1, dim)


def _clusters(groups: list, dim: int) -> Iterator[tuple[int, np.ndarray]]:
    """(coarse cluster, its sample vectors in sample order), in cluster order, one group file at a time."""
    for group in groups:
        x, labels = _read_group(group, dim), group["labels"]
        for c in np.unique(labels):
            yield int(c), x[labels == c]


class _RefineFn(beam.DoFn):
    """Step 3 in one place, streaming the group files (one in memory at a time); then the empty trained
    index (an SQ8/PQ codec trained on a seeded subsample read from the sample files; a Flat one reads
    nothing)."""

    def __init__(self, plan: BuildPlan):
        self._plan = plan

    def process(self, fine_parts, parts, coarse, groups):
        plan, start = self._plan, time.monotonic()
        params = kmeans.two_level_params(plan.nlist, plan.seed)
        coarse_centroids, share = coarse
        fine = {c: cents for part in fine_parts for c, cents in part.items()}
        groups = sorted(groups, key=lambda g: g["group"])
        centroids = kmeans.finish(fine, share, coarse_centroids, lambda: _clusters(groups, plan.facts.dim), params)
        n = sum(p[2] for p in parts)
        codec = (_gather_rows(parts, ivf.codec_rows(n, plan.seed), plan.facts.dim)
                 if ivf.codec_trains(plan.factory) else None)  # a Flat codec needs no pass over the sample
        yield ivf.trained_from_centroids(centroids, plan.factory, codec)
        log.info("fine centroids refined and %s built in %.1f s", plan.factory, time.monotonic() - start)
        yield beam.pvalue.TaggedOutput("timing", ("kmeans_refine", time.monotonic() - start))


def _held_out_queries(parts) -> dict:
    """The calibration queries record: held-out vectors of the data, with their own row ids (a held-out
    vector is not its own neighbour)."""
    parts = _concat_by_shard(parts)
    ids = np.concatenate([p[1] for p in parts])
    return {"ids": ids, "vectors": np.concatenate([p[2] for p in parts]),
            "calibration": {"source": "held-out vectors", "queries": len(ids)}}


class _CalibrationQueriesFn(beam.DoFn):
    """Real queries to measure recall with (``--calibration-queries``): a ``.npy`` float32 (q, dim) array
    of query vectors, or a queries file (BEIR JSONL or ``qid<TAB>text``) encoded here with the bundle's
    model the way the query side encodes (model loaded in ``setup``; each query alone). More than
    ``plan.max_calibration_queries`` queries: a seeded sample of that many. Their ids are -1: no query is
    a row of the index."""

    def __init__(self, plan: BuildPlan):
        self._plan = plan
        self._encoder = None

    def setup(self):
        if not self._plan.calibration_queries.endswith(".npy"):
            from densebeam.index_store.encoding.encoder import load_encoder, pick_device, query_precision

            # Device and precision by the query side's rule (query.search.load_query_encoder), so these
            # vectors are the ones searches will use.
            facts, device = self._plan.facts, pick_device("auto")
            self._encoder = load_encoder(facts.model, similarity=facts.similarity, device=device,
                                         precision=query_precision("auto", device),
                                         max_seq_length=facts.max_seq_length,
                                         document_prompt=facts.document_prompt or "",
                                         query_prompt=facts.query_prompt or "")

    def process(self, path: str):
        plan = self._plan
        if self._encoder is None:
            with fsspec.open(path, "rb") as f:
                vectors = np.load(f, allow_pickle=False)
            if vectors.ndim != 2 or vectors.shape[1] != plan.facts.dim or not np.all(np.isfinite(vectors)):
                raise ValueError(f"{path} holds a {vectors.dtype} array of shape {vectors.shape}; calibration "
                                 f"query vectors must be finite (q, {plan.facts.dim}) encoded with "
                                 f"{plan.facts.model}")
            total = len(vectors)
        else:
            from densebeam.index_store.corpus_io import read_queries

            texts = list(read_queries(path).values())
            total, vectors = len(texts), None
        if total == 0:
            raise ValueError(f"{path} holds no queries; pass a file with at least one, or drop "
                             "--calibration-queries to measure with held-out vectors")
        keep = np.arange(total)
        if total > plan.max_calibration_queries:
            keep = np.sort(np.random.default_rng([plan.seed, 7]).choice(total, plan.max_calibration_queries,
                                                                        replace=False))
        if vectors is None:  # one query per forward pass, as the query side encodes (batch-invariant vectors)
            vectors = np.stack([self._encoder.encode([texts[i]], role="query")[0] for i in keep])
        vectors = np.ascontiguousarray(vectors[keep] if len(vectors) == total else vectors, dtype=np.float32)
        yield {"ids": np.full(len(vectors), -1, dtype=np.int64), "vectors": vectors,
               "calibration": {"source": "queries file", "path": canonical_url(path),
                               "sha256": sha256_file(path)[1], "queries": len(vectors), "in_file": total}}


def _add_exact(heap: faiss.ResultHeap, qids: np.ndarray, qvecs: np.ndarray, gids: np.ndarray,
               vecs: np.ndarray) -> None:
    """Fold one batch into the running exact top-k of the queries: one matrix product (BLAS), then
    FAISS's heap (C++; after the first batch nearly every candidate is rejected at the heap's top). A
    query's own row (held-out vectors) is left out: held out means it is not its own hit."""
    sims = qvecs @ vecs.T
    mine = np.flatnonzero((qids >= gids[0]) & (qids <= gids[-1]))
    sims[mine, qids[mine] - gids[0]] = ivf.MISSING_SCORE
    heap.add_result_subset(np.arange(len(qids)), sims, gids)


class _AddShardFn(beam.DoFn):
    """Fills a copy of the trained index with one shard (global ids base..base+rows-1), writes the shard
    index and its docstore part, and measures the exact top-k of the calibration queries on it for the
    largest measured k (its prefixes are the smaller k's), merged across shards by :class:`_MergeTopK`
    (same quantizer, so that equals searching one big index).

    For the recall curve, an IVF-Flat index needs no list scans: each exact neighbour's inverted list
    (known from adding) decides at which nprobe it is found (:func:`ivf.recall_curves_from_lists`). Other
    codecs score approximately: their curves are searched once all shards are in (:func:`_approx_topk`).
    A refined build also writes the shard's float32 vectors (``vectors/part-i-of-n.npy``) for re-scoring.
    """

    def __init__(self, plan: BuildPlan, root: str):
        self._plan, self._root = plan, root
        self._added = Metrics.counter(NAMESPACE, "vectors_indexed")

    def process(self, shard: ShardSpec, trained: bytes, queries: dict):
        plan, qids, qvecs = self._plan, queries["ids"], queries["vectors"]
        seconds = {"add": 0.0, "exact_topk": 0.0}
        layout = bundle_lib.layout_paths(len(plan.shards))
        index = ivf.index_from_bytes(trained)
        assigner = ivf.coarse_assigner(index)
        k = plan.ks[-1]
        heap = faiss.ResultHeap(len(qids), k, keep_max=True)
        lists = np.empty(shard.rows, dtype=np.int32)  # each row's inverted list (4 bytes a row)
        writer = DocstoreWriter(join(self._root, layout.docstore[shard.index]), base_row=shard.base)
        raw = None
        if plan.refine_factors:
            raw = raw_vectors.NpyWriter(join(self._root, raw_vectors.paths(len(plan.shards))[shard.index]),
                                        shard.rows, plan.facts.dim)
        try:
            for offset, ids, vecs, texts, titles in iter_shard_rows(shard):
                t0 = time.monotonic()
                gids = np.arange(shard.base + offset, shard.base + offset + len(vecs), dtype=np.int64)
                lists[offset:offset + len(vecs)] = ivf.add_assigned(index, gids, vecs, assigner)
                writer.write(ids, texts, titles)
                if raw is not None:
                    raw.write(vecs)
                self._added.inc(len(vecs))
                t1 = time.monotonic()
                _add_exact(heap, qids, qvecs, gids, vecs)
                seconds["add"] += t1 - t0
                seconds["exact_topk"] += time.monotonic() - t1
            docstore = writer.close()
            if raw is not None:
                raw.close()
        except BaseException:
            writer.abort()
            if raw is not None:
                raw.abort()
            raise
        t0 = time.monotonic()
        ivf.write_index(index, join(self._root, layout.shards[shard.index]))
        seconds["write_shard"] = time.monotonic() - t0
        t0 = time.monotonic()
        heap.finalize()
        found = heap.I >= 0
        exact = (heap.D, heap.I, np.where(found, lists[np.where(found, heap.I - shard.base, 0)], -1))
        seconds["exact_topk"] += time.monotonic() - t0
        yield beam.pvalue.TaggedOutput("topk", {"exact": exact})
        for stage, secs in seconds.items():
            yield beam.pvalue.TaggedOutput("timing", (stage, secs))
        yield beam.pvalue.TaggedOutput("timing", (DEVICE_PREFIX + "add",
                                                  gpu.describe() if ivf.assigns_on_gpu(index) else "cpu"))
        yield {"shard": shard.index, "rows": int(index.ntotal), "docstore": docstore}


class _MergeTopK(beam.CombineFn):
    """The shards' exact top-k tables merged into the whole index's: memory is two tables at a time
    whatever the shard count (ties: smaller id first, so the result does not depend on the order shards
    arrive in)."""

    def __init__(self, k: int):
        self._k = k

    def create_accumulator(self):
        return None

    def add_input(self, acc, topk):
        return self._merge(acc, topk)

    def merge_accumulators(self, accs):
        out = None
        for acc in accs:
            out = self._merge(out, acc)
        return out

    def extract_output(self, acc):
        return acc

    def _merge(self, a, b):
        if a is None or b is None:
            return b if a is None else a
        k = self._k
        scores, ids, lists = (np.hstack(x) for x in zip(a["exact"], b["exact"]))
        return {"exact": merge_topk(scores, ids, k, payload=lists)}


def _approx_topk(plan: BuildPlan, root: str, trained: bytes, queries: dict) -> dict[int, np.ndarray]:
    """{nprobe: (q, plan.candidates) ids}: the compact index's top candidates of every query at every
    candidate nprobe (own row dropped), searched over all shard files at once as one index
    (:func:`ivf.stacked_view`, the shards memory-mapped): the quantizer is searched once per nprobe and
    each probed list visited once, whatever the shard count."""
    layout = bundle_lib.layout_paths(len(plan.shards))
    shards = [ivf.read_index(join(root, s), mmap=True) for s in layout.shards]
    searcher = ivf.ShardedSearcher([ivf.stacked_view(ivf.index_from_bytes(trained), shards)])  # shards: alive
    qids, qvecs, width = queries["ids"], queries["vectors"], plan.candidates
    out = {}
    for nprobe in plan.nprobe_candidates():
        s, i = searcher.search(qvecs, width + 1, nprobe)
        own = i == qids[:, None]
        out[nprobe] = merge_topk(np.where(own, ivf.MISSING_SCORE, s), np.where(own, -1, i), width)[1]
        log.info("compact top %d of %d queries at nprobe %d", width, len(qids), nprobe)
    return out


def _recall_curves(plan: BuildPlan, index: faiss.Index, qvecs: np.ndarray, topk: dict,
                   approx: dict) -> dict[int, list[dict]]:
    """{k: [{"nprobe", "recall"}]}: recall@k per candidate nprobe against the exact top-k of the queries,
    for every measured k (``approx``: :func:`_approx_topk`, for codecs other than Flat)."""
    nprobes = plan.nprobe_candidates()
    _, exact, lists = topk["exact"]
    if ivf.recall_follows_lists(index):  # IVF-Flat: from list membership, no search
        recalls = ivf.recall_curves_from_lists(index, qvecs, exact, lists, nprobes, plan.ks)
    else:
        recalls = {k: [ivf.recall_at_k(approx[p][:, :k], exact, k) for p in nprobes] for k in plan.ks}
    return {k: [{"nprobe": p, "recall": round(r, 4)} for p, r in zip(nprobes, recalls[k])] for k in plan.ks}


RESCORE_QUERIES = 64  # queries re-scored at a time: 64 x candidates vectors in memory


def _refine_curves(plan: BuildPlan, root: str, qvecs: np.ndarray, topk: dict,
                   approx: dict) -> dict[int, dict[int, list[dict]]]:
    """{k: {r: [{"nprobe", "recall"}]}}: recall@k after re-scoring the compact top ``k * r`` exactly, per
    refine factor r and candidate nprobe, against the exact top-k (what a refined search returns: the
    candidates are the merged compact top lists, re-scored from the vectors files this build wrote).
    Each nprobe's candidates are scored once; every (k, r) takes its prefix. Cost: one vector read per
    (query, candidate, nprobe)."""
    _, exact, _ = topk["exact"]
    arrays = [raw_vectors.open_array(join(root, p), s.rows, plan.facts.dim)
              for p, s in zip(raw_vectors.paths(len(plan.shards)), plan.shards)]
    vectors = raw_vectors.RawVectors(arrays, [s.base for s in plan.shards])
    out: dict[int, dict[int, list[dict]]] = {k: {r: [] for r in factors_for_k(k, plan.refine_factors)}
                                             for k in plan.ks}
    for p in plan.nprobe_candidates():
        cand = approx[p]
        scores = candidate_scores(qvecs, cand, vectors.get, RESCORE_QUERIES)
        for k, by_r in out.items():
            for r, curve in by_r.items():
                curve.append({"nprobe": p, "recall": round(refined_recall(scores, cand, exact, k, r), 4)})
    return out


def _timings_record(timings) -> dict:
    """``{stage: {"seconds", "parts", "max_part"}}``: worker-seconds summed over a stage's parts (shards,
    groups). Stages: sample, kmeans (flat) or kmeans_coarse/_fine/_refine, add, exact_topk, write_shard,
    approx_topk (codecs other than Flat), recall_curves, merge. Hashing the files for the manifest comes
    after and is not in it."""
    out: dict[str, dict] = {}
    for stage, secs in timings:
        if stage.startswith(DEVICE_PREFIX):
            continue
        rec = out.setdefault(stage, {"seconds": 0.0, "parts": 0, "max_part": 0.0})
        rec["seconds"] += secs
        rec["parts"] += 1
        rec["max_part"] = max(rec["max_part"], secs)
    return {stage: {k: round(v, 3) if isinstance(v, float) else v for k, v in rec.items()}
            for stage, rec in out.items()}


def _training_record(plan: BuildPlan) -> dict:
    out = {"kmeans": plan.kmeans, "sample": plan.train_size, "seed": plan.seed}
    if plan.kmeans == "two-level":
        params = kmeans.two_level_params(plan.nlist, plan.seed)
        out.update({k: v for k, v in dataclasses.asdict(params).items() if k not in ("nlist", "seed")})
    return out


def _measured_on(calibration: dict) -> str:
    if calibration["source"] == "held-out vectors":
        return f"{calibration['queries']} held-out vectors of the data (own hit excluded)"
    return f"{calibration['queries']} queries from {calibration['path']}"


def _refine_record(plan: BuildPlan, index: faiss.Index, curves: dict) -> dict:
    """The manifest's ``refine`` record: the factor chosen per k (:func:`index_store.ivf.refine.choose_refine`:
    the fewest bytes read per query among the points reaching the target recall), every measured curve,
    and the vectors files."""
    list_bytes = plan.n_vectors / plan.nlist * (faiss.extract_index_ivf(index).code_size + 8)
    factors, chosen = {}, {}
    for k in plan.ks:
        r, point = choose_refine(curves[k], plan.target_recall, list_bytes, 4 * plan.facts.dim, k)
        factors[str(k)], chosen[str(k)] = r, point
    return {"factors_by_k": factors, "chosen": chosen, "files": raw_vectors.paths(len(plan.shards)),
            "curves": {str(k): {str(r): c for r, c in by_r.items()} for k, by_r in curves.items()},
            "vector_bytes": 4 * plan.facts.dim}


class _PublishFn(beam.DoFn):
    """Once all shards are in: recall curves and the nprobe per k, merge or keep shards, manifest last."""

    def __init__(self, plan: BuildPlan, root: str, extra: dict):
        self._plan, self._root, self._extra = plan, root, extra

    def process(self, _, trained: bytes, queries: dict, results: list, topk: dict, timings: list):
        plan, root = self._plan, self._root
        results = sorted(results, key=lambda r: r["shard"])
        if [r["shard"] for r in results] != list(range(len(plan.shards))):
            raise RuntimeError(f"expected {len(plan.shards)} shard results, got {[r['shard'] for r in results]}")
        n = sum(r["rows"] for r in results)
        if n != plan.n_vectors:
            raise RuntimeError(f"indexed {n} vectors but the embeddings hold {plan.n_vectors}")
        t0 = time.monotonic()
        index = ivf.index_from_bytes(trained)  # the empty trained index: its codec decides how recall is measured
        approx = {} if ivf.recall_follows_lists(index) else _approx_topk(plan, root, trained, queries)
        timings = list(timings) + [("approx_topk", time.monotonic() - t0)] if approx else list(timings)
        t0 = time.monotonic()
        refine = None
        if plan.refine_factors:
            refine = _refine_record(plan, index, _refine_curves(plan, root, queries["vectors"], topk, approx))
            curves = {k: refine["curves"][str(k)][str(refine["factors_by_k"][str(k)])] for k in plan.ks}
            chosen = {k: dict(refine["chosen"][str(k)]) for k in plan.ks}
        else:
            curves = _recall_curves(plan, index, queries["vectors"], topk, approx)
            chosen = nprobe_by_k(curves, plan.target_recall)
        timings = timings + [("recall_curves", time.monotonic() - t0)]
        devices: dict[str, set] = {"kmeans": set(), "add": set()}
        for stage, where in timings:
            if stage.startswith(DEVICE_PREFIX):
                devices.setdefault(stage[len(DEVICE_PREFIX):], set()).add(where)
        k = plan.k
        layout = bundle_lib.layout_paths(len(plan.shards))
        fs, _ = fsspec.core.url_to_fs(root)
        with fs.open(join(root, layout.trained), "wb") as f:
            f.write(trained)
        fs.rm(join(root, TEMP_DIR), recursive=True)
        files = [layout.trained] + layout.docstore + (raw_vectors.paths(len(plan.shards)) if refine else [])
        if plan.layout == "merged":
            t0 = time.monotonic()
            ivf.merge_on_disk(trained, [join(root, s) for s in layout.shards],
                              join(root, layout.merged_index), join(root, layout.merged_ivfdata))
            fs.rm(join(root, "shards"), recursive=True)
            files += [layout.merged_index, layout.merged_ivfdata]
            timings.append(("merge", time.monotonic() - t0))
        else:
            files += layout.shards
        fields = {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model_facts": plan.facts.to_dict(), "metric": "inner_product", "layout": plan.layout,
            "factory": plan.factory, "nlist": plan.nlist, "codec": plan.codec,
            # The primary (smallest) k's nprobe, curve and recall, under the names readers of bundles
            # from before per-k curves know; nprobe_by_k / recall_curves hold every measured k.
            "nprobe": chosen[k]["nprobe"], "recall_at_k": chosen[k]["recall"], "k": k,
            "target_recall": plan.target_recall, "recall_curve": curves[k],
            "recall_ks": list(plan.ks), "nprobe_by_k": {str(x): chosen[x] for x in plan.ks},
            "recall_curves": {str(x): curves[x] for x in plan.ks},
            "calibration": queries["calibration"],
            "recall_measured_on": _measured_on(queries["calibration"]),
            "counts": {"vectors": n, "shards": len(plan.shards), "training_vectors": plan.train_size},
            "training": _training_record(plan),
            # where the flat k-means (two-level runs on CPUs) and the list assignment of adding ran
            "devices": {stage: " + ".join(sorted(where)) or "cpu" for stage, where in devices.items()},
            "timings": _timings_record(timings),
            "shards": [{"rows": r["rows"], "base": plan.shards[r["shard"]].base,
                        "source": plan.shards[r["shard"]].path} for r in results],
            **({"refine": {key: v for key, v in refine.items() if key != "chosen"}} if refine else {}),
            **({"codec_choice": plan.codec_choice} if plan.codec_choice else {}),
            **self._extra,
        }
        manifest = bundle_lib.write_manifest(root, fields, files)
        log.info("published %s: %d vectors, %s, nprobe by k %s", root, n, plan.factory,
                 {x: c["nprobe"] for x, c in chosen.items()})
        yield manifest


class BuildIndex(beam.PTransform):
    """PBegin -> one-element PCollection: the published bundle manifest at ``root``."""

    def __init__(self, plan: BuildPlan, root: str, manifest_extra: dict | None = None):
        super().__init__()
        self._plan, self._root, self._extra = plan, root.rstrip("/"), manifest_extra or {}

    def expand(self, pbegin):
        plan = self._plan
        shards = (pbegin | "Shards" >> beam.Create(list(plan.shards))
                  | "SpreadShards" >> beam.Reshuffle())
        # 1. One pass over each shard for its seeded share of the training and held-out query samples.
        sampled = shards | "Sample" >> beam.ParDo(_SampleShardFn(plan, self._root)).with_outputs(
            "train", "timing", main="queries")
        timings = [sampled.timing]
        # 2. Train once; the empty trained index travels as bytes. Large nlist: two-level k-means, its
        #    fine step spread over workers by groups of coarse clusters.
        sample = sampled.train | "GatherSample" >> beam.combiners.ToList()
        if plan.kmeans == "flat":
            train = sample | "Train" >> beam.ParDo(_TrainFn(plan)).with_outputs("timing", main="index")
            trained, timings = train.index, timings + [train.timing]
        else:
            groups = sample | "CoarseKMeans" >> beam.ParDo(_CoarseFn(plan, self._root)).with_outputs(
                "coarse", "timing", main="groups")
            fine = (groups.groups | "SpreadGroups" >> beam.Reshuffle()
                    | "FineKMeans" >> beam.ParDo(_FineFn(plan)).with_outputs("timing", main="centroids"))
            refined = (fine.centroids | "GatherFine" >> beam.combiners.ToList()
                       | "RefineKMeans" >> beam.ParDo(_RefineFn(plan), parts=beam.pvalue.AsSingleton(sample),
                                                      coarse=beam.pvalue.AsSingleton(groups.coarse),
                                                      groups=beam.pvalue.AsList(groups.groups))
                       .with_outputs("timing", main="index"))
            trained = refined.index
            timings += [groups.timing, fine.timing, refined.timing]
        # Recall is measured with the held-out vectors, or with real queries when the plan names a file.
        if plan.calibration_queries is None:
            queries = (sampled.queries | "GatherQueries" >> beam.combiners.ToList()
                       | "Queries" >> beam.Map(_held_out_queries))
        else:
            queries = (pbegin | "CalibrationFile" >> beam.Create([plan.calibration_queries])
                       | "CalibrationQueries" >> beam.ParDo(_CalibrationQueriesFn(plan)))
        # 3. Add per shard, in parallel; each worker holds one shard and the queries' top-k on it.
        added = shards | "AddShards" >> beam.ParDo(
            _AddShardFn(plan, self._root), trained=beam.pvalue.AsSingleton(trained),
            queries=beam.pvalue.AsSingleton(queries)).with_outputs("topk", "timing", main="shards")
        timings = (timings + [added.timing]) | "Timings" >> beam.Flatten() | "GatherTimings" >> beam.combiners.ToList()
        topk = added.topk | "MergeTopK" >> beam.CombineGlobally(_MergeTopK(plan.ks[-1]))
        # 4. Measure, merge or keep, manifest last.
        return (pbegin | "PublishTrigger" >> beam.Create([None])
                | "Publish" >> beam.ParDo(_PublishFn(plan, self._root, self._extra),
                                          trained=beam.pvalue.AsSingleton(trained),
                                          queries=beam.pvalue.AsSingleton(queries),
                                          results=beam.pvalue.AsList(added.shards),
                                          topk=beam.pvalue.AsSingleton(topk),
                                          timings=beam.pvalue.AsSingleton(timings)))
