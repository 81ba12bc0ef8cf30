"""BuildIndex: embeddings shards -> a FAISS IVF index bundle, following a :class:`BuildPlan`.

Train once on a sample drawn across all shards, ship the *empty trained* index (bytes) to the workers
as a side input, add each shard's vectors in parallel (one worker holds one shard), measure recall
against exact search on held-out vectors of the data itself, then merge or keep the shards and write
``manifest.json`` last.
"""

from __future__ import annotations

import datetime
import logging
import time

import apache_beam as beam
import faiss
import fsspec
import numpy as np
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from densebeam.index_store import bundle as bundle_lib
from densebeam.index_store import ivf
from densebeam.index_store.build_plan import BuildPlan, ShardSpec
from densebeam.index_store.docstore import DocstoreWriter
from densebeam.index_store.embeddings import join
from densebeam.index_store.faults import pause_point
from densebeam.index_store.ivf_search import merge_topk
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
    """One pass over a shard: its seeded training rows, written to a temp ``.npy`` file whose path is
    emitted (tag ``train``; the sample never travels through the runner, so it exists once in memory,
    at training), and its held-out query rows (small; emitted as arrays)."""

    def __init__(self, plan: BuildPlan, root: str):
        self._plan, self._root = plan, root

    def process(self, shard: ShardSpec):
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
        yield shard.index, shard.base + query_rows.astype(np.int64), queries


def _concat_by_shard(parts):
    """Deterministic concatenation whatever order the runner delivered the parts in."""
    return sorted(parts, key=lambda p: p[0])


def _train(parts, plan: BuildPlan) -> bytes:
    parts = _concat_by_shard(parts)
    sample = np.empty((sum(p[2] for p in parts), plan.facts.dim), dtype=np.float32)
    at = 0
    for _, path, rows in parts:
        with fsspec.open(path, "rb") as f:
            sample[at:at + rows] = np.load(f)
        at += rows
    start = time.monotonic()
    trained = ivf.train_empty_index(sample, plan.factory, seed=plan.seed)
    log.info("trained %s on %d vectors in %.1f s", plan.factory, len(sample), time.monotonic() - start)
    pause_point("index")
    return trained


def _queries(parts):
    parts = _concat_by_shard(parts)
    return (np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]))


class _AddShardFn(beam.DoFn):
    """Fills a copy of the trained index with one shard (global ids base..base+rows-1), writes the shard
    index and its docstore part, and measures the exact top-k of the held-out queries on it (merged
    across shards later: same quantizer, so that equals searching one big index).

    For the recall curve, an IVF-Flat index needs no list scans: each exact neighbour's inverted list
    (known from adding) decides at which nprobe it is found (:func:`ivf.recall_curve_from_lists`). Other codecs (SQ8, PQ) score approximately, so their curve
    is measured by searching this shard at every candidate nprobe.
    """

    def __init__(self, plan: BuildPlan, root: str):
        self._plan, self._root = plan, root
        self._added = Metrics.counter(NAMESPACE, "vectors_indexed")

    def process(self, shard: ShardSpec, trained: bytes, queries):
        plan, (qids, qvecs) = self._plan, queries
        layout = bundle_lib.layout_paths(len(plan.shards))
        index = ivf.index_from_bytes(trained)
        by_lists = ivf.recall_follows_lists(index)
        assigner = ivf.coarse_assigner(index)
        k = plan.k
        exact_s = np.full((len(qids), 0), ivf.MISSING_SCORE, np.float32)
        exact_i = np.zeros((len(qids), 0), np.int64)
        exact_l = np.zeros((len(qids), 0), np.int64)
        writer = DocstoreWriter(join(self._root, layout.docstore[shard.index]), base_row=shard.base)
        try:
            for offset, ids, vecs, texts, titles in iter_shard_rows(shard):
                gids = np.arange(shard.base + offset, shard.base + offset + len(vecs), dtype=np.int64)
                lists = ivf.add_assigned(index, gids, vecs, assigner)
                writer.write(ids, texts, titles)
                self._added.inc(len(vecs))
                # Exact top-(k+1) of the held-out queries in this batch (BLAS, multi-threaded), minus
                # each query's own row: held out means it is not its own hit.
                s, local = faiss.knn(qvecs, vecs, min(k + 1, len(vecs)), metric=faiss.METRIC_INNER_PRODUCT)
                g = gids[local]
                own = g == qids[:, None]
                exact_s, exact_i, exact_l = merge_topk(
                    np.hstack([exact_s, np.where(own, ivf.MISSING_SCORE, s)]),
                    np.hstack([exact_i, np.where(own, -1, g)]), k,
                    payload=np.hstack([exact_l, np.where(own, -1, lists[local])]))
            docstore = writer.close()
        except BaseException:
            writer.abort()
            raise
        ivf.write_index(index, join(self._root, layout.shards[shard.index]))
        approx = {}
        if not by_lists:
            for nprobe in plan.nprobe_candidates():
                s, i = ivf.ShardedSearcher([index]).search(qvecs, k + 1, nprobe)
                s = np.where(i == qids[:, None], ivf.MISSING_SCORE, s)
                i = np.where(i == qids[:, None], -1, i)
                approx[nprobe] = merge_topk(s, i, k)
        yield {"shard": shard.index, "rows": int(index.ntotal), "docstore": docstore,
               "exact": (exact_s, exact_i, exact_l), "approx": approx}


def _recall_curve(plan: BuildPlan, trained: bytes, qvecs: np.ndarray, results: list) -> list[dict]:
    """recall@k per candidate nprobe against the exact top-k merged across shards."""
    k, nprobes = plan.k, plan.nprobe_candidates()
    scores, ids, lists = (np.hstack(x) for x in zip(*[r["exact"] for r in results]))
    _, exact, lists = merge_topk(scores, ids, k, payload=lists)
    index = ivf.index_from_bytes(trained)
    if ivf.recall_follows_lists(index):  # IVF-Flat: from list membership, no search
        recalls = ivf.recall_curve_from_lists(index, qvecs, exact, lists, nprobes)
    else:
        recalls = [ivf.recall_at_k(merge_topk(*(np.hstack(x) for x in zip(
            *[r["approx"][p] for r in results])), k)[1], exact, k) for p in nprobes]
    return [{"nprobe": p, "recall": round(r, 4)} for p, r in zip(nprobes, recalls)]


class _PublishFn(beam.DoFn):
    """Once all shards are in: recall curve and default nprobe, merge or keep shards, manifest last."""

    def __init__(self, plan: BuildPlan, root: str, extra: dict):
        self._plan, self._root, self._extra = plan, root, extra

    def process(self, _, trained: bytes, queries, results):
        plan, root = self._plan, self._root
        results = sorted(results, key=lambda r: r["shard"])
        if [r["shard"] for r in results] != list(range(len(plan.shards))):
            raise RuntimeError(f"expected {len(plan.shards)} shard results, got {[r['shard'] for r in results]}")
        n = sum(r["rows"] for r in results)
        if n != plan.n_vectors:
            raise RuntimeError(f"indexed {n} vectors but the embeddings hold {plan.n_vectors}")
        k = plan.k
        curve = _recall_curve(plan, trained, queries[1], results)
        chosen = next((c for c in curve if c["recall"] >= plan.target_recall), curve[-1])
        layout = bundle_lib.layout_paths(len(plan.shards))
        fs, _ = fsspec.core.url_to_fs(root)
        with fs.open(join(root, layout.trained), "wb") as f:
            f.write(trained)
        fs.rm(join(root, TEMP_DIR), recursive=True)
        files = [layout.trained] + layout.docstore
        if plan.layout == "merged":
            ivf.merge_on_disk(trained, [join(root, s) for s in layout.shards],
                              join(root, layout.merged_index), join(root, layout.merged_ivfdata))
            fs.rm(join(root, "shards"), recursive=True)
            files += [layout.merged_index, layout.merged_ivfdata]
        else:
            files += layout.shards
        fields = {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model_facts": plan.facts.to_dict(), "metric": "inner_product", "layout": plan.layout,
            "factory": plan.factory, "nlist": plan.nlist, "codec": plan.codec,
            "nprobe": chosen["nprobe"], "recall_at_k": chosen["recall"], "k": k,
            "target_recall": plan.target_recall, "recall_curve": curve,
            "recall_measured_on": f"{plan.n_queries} held-out vectors of the data (own hit excluded)",
            "counts": {"vectors": n, "shards": len(plan.shards), "training_vectors": plan.train_size},
            "shards": [{"rows": r["rows"], "base": plan.shards[r["shard"]].base,
                        "source": plan.shards[r["shard"]].path} for r in results],
            **self._extra,
        }
        pause_point("publish")
        manifest = bundle_lib.write_manifest(root, fields, files)
        log.info("published %s: %d vectors, %s, nprobe %d (recall@%d %.3f)", root, n, plan.factory,
                 chosen["nprobe"], k, chosen["recall"])
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
        sampled = shards | "Sample" >> beam.ParDo(_SampleShardFn(plan, self._root)).with_outputs("train", main="queries")
        # 2. Train once, in one place; the empty trained index travels as bytes.
        trained = (sampled.train | "GatherSample" >> beam.combiners.ToList()
                   | "Train" >> beam.Map(_train, plan))
        queries = sampled.queries | "GatherQueries" >> beam.combiners.ToList() | "Queries" >> beam.Map(_queries)
        # 3. Add per shard, in parallel; each worker holds one shard.
        added = shards | "AddShards" >> beam.ParDo(
            _AddShardFn(plan, self._root), trained=beam.pvalue.AsSingleton(trained),
            queries=beam.pvalue.AsSingleton(queries))
        # 4. Measure, merge or keep, manifest last.
        return (pbegin | "PublishTrigger" >> beam.Create([None])
                | "Publish" >> beam.ParDo(_PublishFn(plan, self._root, self._extra),
                                          trained=beam.pvalue.AsSingleton(trained),
                                          queries=beam.pvalue.AsSingleton(queries),
                                          results=beam.pvalue.AsList(added)))
