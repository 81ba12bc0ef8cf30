"""Choosing the codec under a memory budget by measuring the candidates on a sample of the vectors.

A ``--memory-budget`` bounds the bytes a replica keeps resident per vector (codes + ids). The codecs that
fit (:func:`fitting_codecs`: Flat, SQ8, the largest PQ, RaBitQ) are each trained on a seeded sample of
the embeddings, the sample added, and held-out vectors of the data searched exhaustively (every list:
what the codec loses, not what probing loses; the build measures nprobe after). For a tiered bundle the
compact top ``k * r`` is re-scored exactly for every refine factor r, as a search would.

The choice (:func:`choose`), per candidate over every measured k: first the recall short of the target
(0 when some factor reaches it), then the vectors a query re-scores from disk (``k * r`` at the smallest
factor reaching the target: Flat reads none), then the fewest resident bytes. Timings are not used: the
same vectors and options choose the same codec on any machine. No Beam import.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import faiss
import fsspec
import numpy as np
import pyarrow.parquet as pq

from densebeam.index_store.ivf.build import codec_min_training_rows, trained_from_centroids
from densebeam.index_store.ivf.files import ID_BYTES
from densebeam.index_store.ivf.refine import candidate_scores, factors_for_k, refined_recall

log = logging.getLogger(__name__)

SAMPLE_VECTORS = 50_000  # the candidates are trained on, and search, this many vectors of the data
SAMPLE_QUERIES = 500  # held-out vectors searched per candidate
RESCORE_QUERIES = 32  # queries re-scored at a time: 32 x candidates x dim floats in memory
KMEANS_NITER = 10
# Lists of the sample's index. Every list is scanned, and an inner-product PQ scan prepares a lookup table
# per list and query (PQ192: 192 KB), so few lists keep the measurement to seconds; the residuals they
# leave are coarser than a full build's, so the codecs measure no better here than they will do there.
SAMPLE_NLIST = 128
# PQ training runs one k-means of 256 centroids per sub-vector, so its cost grows with m, and sub-vectors
# of 1-3 dimensions train slowest per byte they hold.
PQ_MIN_SUBDIM = 4
CODEC_SAMPLE = 10_000  # vectors a candidate's codec trains on here: FAISS's 39 per PQ centroid


def code_bytes(codec: str, dim: int) -> int:
    """Bytes of one vector's code in an IVF list (FAISS's ``code_size``), without its id."""
    return int(faiss.extract_index_ivf(faiss.index_factory(dim, f"IVF1,{codec}", faiss.METRIC_INNER_PRODUCT))
               .code_size)


def fitting_codecs(n_vectors: int, dim: int, budget_bytes: int) -> list[str]:
    """The candidates, most precise first: Flat, SQ8, the ``PQ{m}x8`` with the largest m dividing dim into
    sub-vectors of at least ``PQ_MIN_SUBDIM`` dimensions, and RaBitQ, each kept when ``n_vectors * (code +
    id bytes)`` fits the budget. Empty when none fits."""
    pq_m = [m for m in range(1, dim // PQ_MIN_SUBDIM + 1)
            if dim % m == 0 and n_vectors * (m + ID_BYTES) <= budget_bytes]
    codecs = ["Flat", "SQ8"] + ([f"PQ{max(pq_m)}x8"] if pq_m else []) + ["RaBitQ"]
    return [c for c in codecs if n_vectors * (code_bytes(c, dim) + ID_BYTES) <= budget_bytes]


def read_sample(paths: Sequence[str], want: int, seed: int) -> np.ndarray:
    """``want`` float32 vectors of the embeddings shards, read from a seeded choice of whole Parquet row
    groups (at least twice ``want`` rows when the data has them, from as many shards as that takes),
    then a seeded subset of those rows. Reads a few row groups, not the corpus."""
    rng = np.random.default_rng([seed, 11])
    groups = []
    for path in paths:
        with fsspec.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            groups += [(path, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    order, picked, have = rng.permutation(len(groups)), [], 0
    for i in order:
        if have >= 2 * want:
            break
        picked.append(groups[i])
        have += groups[i][2]
    picked.sort()
    parts = []
    for path in dict.fromkeys(p for p, _, _ in picked):
        with fsspec.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            dim = pf.schema_arrow.field("embedding").type.list_size
            table = pf.read_row_groups([g for p, g, _ in picked if p == path], columns=["embedding"])
            values = table.column(0).combine_chunks().values.to_numpy(zero_copy_only=False)
            parts.append(np.asarray(values, dtype=np.float32).reshape(-1, dim))
    x = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    keep = np.sort(rng.choice(len(x), min(want, len(x)), replace=False))
    return np.ascontiguousarray(x[keep])


def _exact_topk(base: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    return index.search(queries, k)[1]


def measure(base: np.ndarray, queries: np.ndarray, codecs: Sequence[str], ks: Sequence[int], target: float,
            factors: Sequence[int], seed: int) -> list[dict]:
    """Per codec: ``{"codec", "bytes_per_vector", "recall": {k: {r: recall@k}}, "factors": {k: r}}``.

    ``base`` is indexed (coarse centroids trained once on it, shared by all codecs; each codec trained on
    ``CODEC_SAMPLE`` of its vectors), ``queries`` (not rows of ``base``) searched at nprobe = nlist and,
    where ``factors`` is not empty, their compact top ``k * r`` re-scored exactly. ``factors[k]``: the
    smallest r reaching ``target``, else the largest measured. Without factors (``--refine off``) r is 1
    and the compact scores rank."""
    n, dim = base.shape
    ks = [min(int(k), n) for k in ks]
    truth = _exact_topk(base, queries, max(ks))
    nlist = max(1, min(SAMPLE_NLIST, n // 39))
    km = faiss.Kmeans(dim, nlist, niter=KMEANS_NITER, seed=seed, spherical=False)
    km.train(base)
    train = base[np.sort(np.random.default_rng([seed, 13]).choice(n, min(n, CODEC_SAMPLE), replace=False))]
    out = []
    for codec in codecs:
        index = faiss.deserialize_index(np.frombuffer(trained_from_centroids(
            km.centroids, f"IVF{nlist},{codec}", train if codec != "Flat" else None), dtype=np.uint8))
        index.add(base)
        index.nprobe = nlist
        tiered = codec != "Flat" and bool(factors)
        by_k = {k: factors_for_k(k, factors) if tiered else [1] for k in ks}
        width = min(n, max(k * max(rs) for k, rs in by_k.items()))
        scores, cand = index.search(queries, width)
        if tiered:  # exact scores of every candidate; each (k, r) takes its prefix
            scores = candidate_scores(queries, cand, base.__getitem__, RESCORE_QUERIES)
        recall, chosen = {}, {}
        for k, rs in by_k.items():
            recall[k] = {}
            for r in rs:
                recall[k][r] = round(refined_recall(scores, cand, truth, k, r), 4)
            chosen[k] = next((r for r in rs if recall[k][r] >= target), rs[-1])
        out.append({"codec": codec, "bytes_per_vector": code_bytes(codec, dim) + ID_BYTES, "tiered": tiered,
                    "recall": recall, "factors": chosen})
        log.info("codec %s on %d sampled vectors: recall %s", codec, n,
                 ", ".join(f"@{k} {recall[k][r]:.4f} (r {r})" for k, r in chosen.items()))
    return out


def _key(record: dict, target: float) -> tuple:
    shortfall = sum(max(0.0, target - record["recall"][k][r]) for k, r in record["factors"].items())
    reads = sum(k * r for k, r in record["factors"].items()) if record["tiered"] else 0
    return round(shortfall, 4), reads, record["bytes_per_vector"]


def choose(records: Sequence[dict], target: float) -> str:
    """The measured candidate with the smallest (recall shortfall, vectors re-scored, resident bytes)."""
    if not records:
        raise ValueError("no codec measured to choose from")
    return min(records, key=lambda r: _key(r, target))["codec"]


def load_query_vectors(path: str, dim: int, want: int, seed: int) -> np.ndarray:
    """A seeded choice of at most ``want`` rows of a ``.npy`` (q, dim) array of query vectors."""
    with fsspec.open(path, "rb") as f:
        x = np.load(f, allow_pickle=False)
    if x.ndim != 2 or x.shape[1] != dim or len(x) == 0 or not np.all(np.isfinite(x)):
        raise ValueError(f"{path} holds a {x.dtype} array of shape {x.shape}; calibration query vectors must be "
                         f"finite (q, {dim}) with q >= 1")
    keep = np.sort(np.random.default_rng([seed, 14]).choice(len(x), min(want, len(x)), replace=False))
    return np.ascontiguousarray(x[keep], dtype=np.float32)


def choose_codec(paths: Sequence[str], rows: Sequence[int], dim: int, budget_bytes: int, train_rows: int,
                 ks: Sequence[int], target: float, factors: Sequence[int], seed: int,
                 calibration_queries: Optional[str] = None) -> tuple[str, Optional[dict]]:
    """(codec, manifest record) for a build of ``sum(rows)`` vectors under ``budget_bytes``.

    Flat, when it fits, is chosen without measuring (exact scores, nothing read from disk). Raises when
    no codec fits, or none that fits can train on ``train_rows`` vectors, naming what would. Queries: a
    ``.npy`` of calibration query vectors when given, else held-out vectors of the data. The record: the
    sample and queries measured and every candidate's recall per k and factor, the chosen one marked."""
    n = int(sum(rows))
    fit = fitting_codecs(n, dim, budget_bytes)
    if not fit:
        need = n * (code_bytes("RaBitQ", dim) + ID_BYTES)
        raise ValueError(f"{n} vectors do not fit in {budget_bytes} bytes with any codec (the smallest, RaBitQ, "
                         f"needs {need} bytes of codes and ids); raise --memory-budget, or build a merged "
                         "on-disk index without one")
    codecs = [c for c in fit if codec_min_training_rows(c) <= train_rows]
    if not codecs:
        need = codec_min_training_rows(fit[0])
        raise ValueError(f"--memory-budget {budget_bytes} bytes bounds the training sample to {train_rows} "
                         f"vectors, fewer than the {need} the {fit[0]} codec it calls for needs to train; raise "
                         f"the budget to at least {need * 4 * dim} bytes, or pass --codec SQ8")
    if codecs[0] == "Flat":
        return "Flat", None
    if calibration_queries is not None and calibration_queries.endswith(".npy"):
        queries = load_query_vectors(calibration_queries, dim, SAMPLE_QUERIES, seed)
        base = read_sample(paths, min(n, SAMPLE_VECTORS), seed)
        source = calibration_queries
    else:  # held-out vectors of the data (a queries text file would need the model: not loaded to plan)
        n_queries = max(1, min(SAMPLE_QUERIES, n // 10))
        x = read_sample(paths, min(n, SAMPLE_VECTORS + n_queries), seed)
        order = np.random.default_rng([seed, 12]).permutation(len(x))
        queries, base = x[np.sort(order[:n_queries])], x[np.sort(order[n_queries:])]
        source = "held-out vectors"
    measurable = [c for c in codecs if codec_min_training_rows(c) <= len(base)]
    if not measurable:
        return codecs[0], None
    records = measure(base, queries, measurable, ks, target, factors, seed)
    chosen = choose(records, target)
    for r in records:
        r["chosen"] = r["codec"] == chosen
        r["recall"] = {str(k): {str(f): v for f, v in by_r.items()} for k, by_r in r["recall"].items()}
        r["factors"] = {str(k): v for k, v in r["factors"].items()}
    log.info("codec under a budget of %d bytes: %s (measured on %d sampled vectors, %d held-out queries)",
             budget_bytes, chosen, len(base), len(queries))
    return chosen, {"budget_bytes": int(budget_bytes), "sample": int(len(base)), "queries": int(len(queries)),
                    "queries_from": source, "seed": int(seed), "candidates": records}
