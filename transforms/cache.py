"""ReuseEmbeddings: incremental and resumable encoding.

A vector is reused when a cache file holds one for the same passage text under the same *encode
identity* (model, revision — the hub commit, or a digest of a local model directory's files —,
similarity, max_seq_length, stored dtype, title joining) and the same compute precision: a different
model, weights or precision never reuses vectors. The precision in a cache file is the one its vectors
were really computed in (each file holds one); it must be one this run may compute in
(:func:`reusable_precisions`). Cache files are Parquet files with ``text_hash`` and ``embedding`` columns
and the identity in their schema metadata:

- the shards of the output's previous run (``part-*.parquet``),
- complete temp shards of a killed run (``_temporary/*.parquet``),
- the journal of a killed run (``_cache/journal-*.parquet``): rolling files the encoder closes every
  ``journal_rows`` vectors, so a run killed during encoding loses at most that much work,
- any other embeddings dir named with ``--reuse``.

Incomplete files (a run killed mid-write leaves no Parquet footer) are skipped and counted. The join is
a CoGroupByKey on the text hash, so no side holds the cache in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from typing import Optional, Sequence

import apache_beam as beam
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics

from densebeam.index_store.artifacts import embeddings as emb
from densebeam.index_store import fsutil
from densebeam.index_store.corpus_io import is_local_fs
from densebeam.transforms.read import NAMESPACE

log = logging.getLogger(__name__)
IDENTITY_KEY = b"densebeam.encode_identity"
JOURNAL_DIR = "_cache"


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()[:32]


def cache_files(dirs: Sequence[str]) -> list[str]:
    """Candidate cache files under each dir (existence only; identity is checked when read)."""
    found = []
    for d in dirs:
        fs, root = fsspec.core.url_to_fs(d)
        for pattern in ("part-*.parquet", f"{emb.TEMP_DIR}/*.parquet", f"{JOURNAL_DIR}/journal-*.parquet"):
            for p in sorted(fs.glob(emb.join(root, pattern))):
                found.append(p if is_local_fs(fs) else fs.unstrip_protocol(p))
    return found


def file_identity(identity: dict, precision: str) -> dict:
    """The identity a cache file records: the run's identity plus the precision of its vectors."""
    return {**{k: v for k, v in identity.items() if k != "precision"}, "precision": precision}


def reusable_precisions(requested: str, device: str) -> frozenset:
    """The compute precisions whose vectors a worker may reuse for ``--precision requested --device
    device``: a given precision (``auto`` resolved at launch on the local runner is given by then) is the
    one the bi-encoder computes in, so only its vectors are reused. ``auto`` left to the workers (other
    runners, each deciding on its own hardware, or a corpus too small to measure at launch) may choose fp32
    or a precision measured on this worker's kind of device
    (:func:`~densebeam.index_store.encoding.encoder.candidate_precisions`; int16 on x86-64 CPUs without
    bf16; each faithful to fp32 when chosen), so vectors of any of those are reused; the shards say which
    precision each holds."""
    from densebeam.index_store.encoding import cpu
    from densebeam.index_store.encoding.encoder import candidate_precisions, check_precision, pick_device

    device = pick_device(device)
    if requested != "auto":
        return frozenset([check_precision(requested, device)])
    return frozenset(["fp32", *candidate_precisions(device, int16=cpu.int16_without_bf16())])


class _ReadCacheFn(beam.DoFn):
    """A cache file -> (text_hash, (vector, precision)) for files written under the same identity and
    in a precision this worker may encode in now."""

    def __init__(self, identity: dict, precision: str, device: str):
        self._identity = {k: v for k, v in identity.items() if k != "precision"}
        self._requested, self._device = precision, device
        self._reusable = Metrics.counter(NAMESPACE, "cache_vectors_available")
        self._skipped = Metrics.counter(NAMESPACE, "cache_files_skipped")

    def setup(self):
        self._precisions = reusable_precisions(self._requested, self._device)

    def process(self, path: str):
        try:
            f = fsspec.open(path, "rb").open()
            pf = pq.ParquetFile(f)
        except Exception as err:  # noqa: BLE001 - an incomplete file from a killed run is expected
            log.info("cache: skipping %s (%s)", path, err)
            self._skipped.inc()
            return
        try:
            meta = pf.schema_arrow.metadata or {}
            written = json.loads(meta[IDENTITY_KEY]) if IDENTITY_KEY in meta else {}
            precision = written.pop("precision", None)
            if written != self._identity:
                log.info("cache: not reusing %s: written by another model, weights or settings", path)
                self._skipped.inc()
                return
            if precision not in self._precisions:
                log.info("cache: not reusing %s: its vectors were computed in %s, this run computes in %s",
                         path, precision, " or ".join(sorted(self._precisions)))
                self._skipped.inc()
                return
            dim = pf.schema_arrow.field("embedding").type.list_size
            for batch in pf.iter_batches(columns=["text_hash", "embedding"], batch_size=8192):
                vecs = np.asarray(batch.column(1).values.to_numpy(zero_copy_only=False), np.float32)
                for h, v in zip(batch.column(0).to_pylist(), vecs.reshape(-1, dim)):
                    self._reusable.inc()
                    yield h, (v, precision)
        finally:
            f.close()


class _JoinFn(beam.DoFn):
    """(hash, {passages, cached}) -> reused rows (tag ``reused``) or passages still to encode."""

    def __init__(self):
        self._reused = Metrics.counter(NAMESPACE, "passages_reused")

    def process(self, keyed):
        _, groups = keyed
        cached = list(groups["cached"])
        for p in groups["passages"]:
            if cached:
                self._reused.inc()
                vec, precision = cached[0]
                yield beam.pvalue.TaggedOutput("reused", (p, vec, precision, True))
            else:
                yield p


class ReuseEmbeddings(beam.PTransform):
    """passages -> {"reused": (passage, vector, precision), "to_encode": passages}.

    ``precision`` and ``device`` are what the run asked for; each joining worker resolves them."""

    def __init__(self, files: Sequence[str], identity: dict, join_title: bool, precision: str = "auto",
                 device: str = "auto"):
        super().__init__()
        self._files, self._identity, self._join_title = list(files), identity, join_title
        self._precision, self._device = precision, device

    def expand(self, passages):
        join_title = self._join_title
        keyed = passages | "KeyByTextHash" >> beam.Map(
            lambda p: (text_hash(p.joined_text(join_title)), p))
        cached = (passages.pipeline
                  | "CacheFiles" >> beam.Create(self._files)
                  | "SpreadCacheFiles" >> beam.Reshuffle()
                  | "ReadCache" >> beam.ParDo(_ReadCacheFn(self._identity, self._precision, self._device)))
        joined = ({"passages": keyed, "cached": cached} | "JoinCache" >> beam.CoGroupByKey()
                  | "ReuseOrEncode" >> beam.ParDo(_JoinFn()).with_outputs("reused", main="to_encode"))
        return {"reused": joined.reused, "to_encode": joined.to_encode}


class _JournalFn(beam.DoFn):
    """Passes encoded rows through and appends (text_hash, vector) to rolling journal files closed every
    ``rows`` rows, so a killed run can reuse what it had encoded. Written once more than strictly
    needed (the shards hold the same vectors) in exchange for resumability; retried bundles only add
    duplicate journal rows, which the join ignores."""

    def __init__(self, out_dir: str, facts_json: str, identity: dict, join_title: bool, rows: int):
        self._out, self._facts_json, self._identity = out_dir, facts_json, identity
        self._join_title, self._rows = join_title, rows

    def start_bundle(self):
        self._hashes, self._vecs, self._precision = [], [], None

    def process(self, row):
        passage, vector, precision = row[0], row[1], row[2]
        if precision != self._precision:
            self._flush()  # one precision per journal file
            self._precision = precision
        self._hashes.append(text_hash(passage.joined_text(self._join_title)))
        self._vecs.append(vector)
        if len(self._hashes) >= self._rows:
            self._flush()
        yield row

    def _flush(self):
        if not self._hashes:
            return
        vecs = np.stack(self._vecs).astype(np.float32)
        table = pa.table({"text_hash": pa.array(self._hashes, pa.string()),
                          "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)),
                                                                         vecs.shape[1])})
        facts = {**json.loads(self._facts_json), "precision": self._precision}
        table = table.replace_schema_metadata({
            emb.FACTS_KEY: json.dumps(facts, sort_keys=True).encode(),
            IDENTITY_KEY: json.dumps(file_identity(self._identity, self._precision)).encode()})
        path = emb.join(self._out, JOURNAL_DIR, f"journal-{uuid.uuid4().hex}.parquet")
        with fsutil.atomic_local_output(path) as tmp:  # never seen half-written (a kill mid-write)
            # hashes and floats: neither dictionaries nor compression shrink them, both cost time
            pq.write_table(table, tmp, compression="none", use_dictionary=False)
        self._hashes, self._vecs = [], []

    def finish_bundle(self):
        self._flush()


class JournalEncoded(beam.PTransform):
    """Encoded rows, passed through unchanged, also appended to the output's resumable journal."""

    def __init__(self, out_dir: str, facts_json: str, identity: dict, join_title: bool, rows: int):
        super().__init__()
        self._fn = _JournalFn(out_dir, facts_json, identity, join_title, rows)

    def expand(self, rows):
        return rows | "AppendToJournal" >> beam.ParDo(self._fn)


def identity_metadata(identity: Optional[dict], precision: str) -> dict:
    return {IDENTITY_KEY: json.dumps(file_identity(identity, precision)).encode()} if identity else {}
