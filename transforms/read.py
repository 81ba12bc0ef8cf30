"""ReadCorpus: corpus shards -> valid passages (unique ids) + rejected records + read counts."""

from __future__ import annotations

import logging
from typing import Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from densebeam.index_store.types import Passage, Rejected
from densebeam.index_store import corpus_io
from densebeam.index_store.corpus_io import CorpusError, Piece, ReadOptions

log = logging.getLogger(__name__)

NAMESPACE = "densebeam"
REJECTED = "rejected"
READ_COUNTS = "read_counts"


def _read_records(piece: Piece, opts: ReadOptions):
    """``corpus_io.read_piece`` for either pass. Its input errors (:class:`CorpusError`, a ValueError the
    CLI prints as one line) already name the file and position and say what to do; anything else is
    re-raised naming the piece, so a failure in any pass says which file it was reading."""
    try:
        yield from corpus_io.read_piece(piece, opts)
    except CorpusError:
        raise
    except Exception as err:
        raise RuntimeError(f"reading {piece.describe()} failed: {type(err).__name__}: {err}") from err


class _PlanPiecesFn(beam.DoFn):
    """(file URL, size) -> the pieces it is read in, each stamped with the file's size and checksum
    (checked again whenever a pass reads the piece)."""

    def __init__(self, opts: ReadOptions, piece_bytes: int):
        self._opts, self._piece_bytes = opts, piece_bytes
        self._pieces = Metrics.counter(NAMESPACE, "pieces_planned")

    def process(self, file_and_size):
        path, size = file_and_size
        for piece in corpus_io.plan_pieces(path, size, self._opts, self._piece_bytes):
            self._pieces.inc()
            yield piece


class _ReadPieceFn(beam.DoFn):
    """Reads one piece, streaming: valid passages on the main output, bad records tagged ``rejected``,
    and one ``(file, records read)`` count per piece tagged ``read_counts``. With the ``duplicates``
    side input ((file, position) -> the kept record's source), later occurrences of an id become
    ``duplicate_id`` dead letters on the way."""

    def __init__(self, opts: ReadOptions):
        self._opts = opts
        self._read = Metrics.counter(NAMESPACE, "passages_read")
        self._rejected = Metrics.counter(NAMESPACE, "passages_rejected")
        self._dups = Metrics.counter(NAMESPACE, "rejected_duplicate_id")
        self._bytes = Metrics.counter(NAMESPACE, "input_bytes_read")

    def process(self, piece: Piece, duplicates=None):
        n = 0
        for rec in _read_records(piece, self._opts):
            n += 1
            self._read.inc()
            if isinstance(rec, Passage) and duplicates and (rec.source_file, rec.source_pos) in duplicates:
                first_file, first_pos = duplicates[(rec.source_file, rec.source_pos)]
                self._dups.inc()
                rec = Rejected(reason="duplicate_id",
                               detail=f"id {rec.id!r} already seen at {first_file} offset {first_pos}",
                               source_file=rec.source_file, source_pos=rec.source_pos, line=rec.line,
                               id=rec.id, raw=rec.text[:512])
            elif isinstance(rec, Rejected):
                Metrics.counter(NAMESPACE, f"rejected_{rec.reason}").inc()
            if isinstance(rec, Rejected):
                self._rejected.inc()
                yield beam.pvalue.TaggedOutput(REJECTED, rec)
            else:
                yield rec
        if piece.format != "parquet" and piece.compression is None:
            self._bytes.inc(piece.end - piece.start)
        elif piece.format != "parquet" and piece.start == 0:  # a compressed file's bytes, counted once
            self._bytes.inc(piece.file_size)
        yield beam.pvalue.TaggedOutput(READ_COUNTS, (piece.path, n))


class _IdsOfPieceFn(beam.DoFn):
    """First pass for duplicate detection: (id, (file, position)) of every valid record of a piece.
    Only these small keys are shuffled, never the passages."""

    def __init__(self, opts: ReadOptions):
        self._opts = opts

    def process(self, piece: Piece):
        for rec in _read_records(piece, self._opts):
            if isinstance(rec, Passage):
                yield rec.id, rec.sort_key()


def _later_occurrences(keyed):
    """(id, [sources]) -> ((file, position) of each later occurrence, source of the kept first one).
    Deterministic: the first by (file, position) is kept, whatever order the runner delivers."""
    _, sources = keyed
    sources = sorted(sources)
    for later in sources[1:]:
        yield tuple(later), tuple(sources[0])


class ReadCorpus(beam.PTransform):
    """Reads corpus shards in parallel pieces, validates every record and rejects duplicate ids.

    Returns a dict of PCollections: ``passages`` (Passage, unique ids), ``rejected`` (Rejected with
    reason and source) and ``read_counts`` (one ``(file, records read)`` per piece, valid or not);
    the counts' sum is ``len(passages) + len(rejected)``.

    Memory stays bounded: the pieces (byte ranges) are what is shuffled to spread work over workers,
    and passages stream from the reader straight into encoding in the same fused stage. With
    ``workers`` > 1 every file is cut into pieces of about ``total bytes / (workers * 8)`` (at most
    ``split_bytes``; compressed files by ranges of their decompressed stream), so every worker gets
    about the same share whatever the layout: one gzip file, one small file, many tiny files. Duplicate ids
    are found in a first pass that shuffles only (id, file, position) keys; the later occurrences (a
    small side input) are rejected while the second pass streams. The price is parsing every piece
    twice, which is cheap next to encoding.
    """

    def __init__(self, files: Sequence[tuple[str, int]], opts: ReadOptions, dedup: bool = True,
                 workers: int = 1):
        super().__init__()
        if not files:
            raise ValueError("ReadCorpus needs at least one input file")
        self._files = list(files)
        self._opts = opts
        self._dedup = dedup
        self._piece_bytes = corpus_io.balanced_piece_bytes(self._files, workers, opts.split_bytes)

    def expand(self, pbegin):
        # 1. Plan: every file -> pieces (byte ranges / row groups), then spread the pieces over workers.
        #    The files are planned where they were created (no reshuffle: planning reads only metadata,
        #    as the launcher's own listing did), so SpreadPieces is the pipeline's first redistribution.
        #    That matters on Flink: its batch optimizer drops a rebalance downstream of another rebalance
        #    (Create's own) as already met, and every piece then stays with the worker that planned its
        #    file. A single planner also makes Flink's round-robin rebalance exact: piece counts per
        #    worker differ by at most one.
        pieces = (pbegin
                  | "Files" >> beam.Create(self._files, reshuffle=False)
                  | "PlanPieces" >> beam.ParDo(_PlanPiecesFn(self._opts, self._piece_bytes))
                  | "SpreadPieces" >> beam.Reshuffle())
        # 2. Duplicate ids: shuffle only (id, source) keys; the later occurrences become a side input.
        side = {}
        if self._dedup:
            duplicates = (pieces
                          | "ReadIds" >> beam.ParDo(_IdsOfPieceFn(self._opts))
                          | "GroupById" >> beam.GroupByKey()
                          | "LaterOccurrences" >> beam.FlatMap(_later_occurrences))
            side["duplicates"] = beam.pvalue.AsDict(duplicates)
        # 3. Parse and validate each piece, streaming, rejecting the later occurrences on the way.
        parsed = pieces | "ParseValidate" >> beam.ParDo(_ReadPieceFn(self._opts), **side).with_outputs(
            REJECTED, READ_COUNTS, main="passages")
        return {"passages": parsed.passages, "rejected": parsed[REJECTED], "read_counts": parsed[READ_COUNTS]}
