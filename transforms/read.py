"""ReadCorpus: corpus shards -> valid passages (unique ids) + rejected records + read counts."""

from __future__ import annotations

import logging
from typing import Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from index_store.types import Passage, Rejected
from transforms import corpus_io
from transforms.corpus_io import Piece, ReadOptions

log = logging.getLogger(__name__)

NAMESPACE = "densebeam"
REJECTED = "rejected"
READ_COUNTS = "read_counts"


class _PlanPiecesFn(beam.DoFn):
    """(file URL, size) -> the pieces it is read in."""

    def __init__(self, opts: ReadOptions):
        self._opts = opts
        self._pieces = Metrics.counter(NAMESPACE, "pieces_planned")

    def process(self, file_and_size):
        path, size = file_and_size
        for piece in corpus_io.plan_pieces(path, size, self._opts):
            self._pieces.inc()
            yield piece


class _ReadPieceFn(beam.DoFn):
    """Reads one piece, streaming: valid passages on the main output, bad records tagged ``rejected``,
    and one ``(piece, records read)`` count per piece tagged ``read_counts``."""

    def __init__(self, opts: ReadOptions):
        self._opts = opts
        self._read = Metrics.counter(NAMESPACE, "passages_read")
        self._rejected = Metrics.counter(NAMESPACE, "passages_rejected")
        self._bytes = Metrics.counter(NAMESPACE, "input_bytes_read")

    def process(self, piece: Piece):
        n = 0
        try:
            for rec in corpus_io.read_piece(piece, self._opts):
                n += 1
                self._read.inc()
                if isinstance(rec, Rejected):
                    self._rejected.inc()
                    Metrics.counter(NAMESPACE, f"rejected_{rec.reason}").inc()
                    yield beam.pvalue.TaggedOutput(REJECTED, rec)
                else:
                    yield rec
        except (OSError, EOFError, ValueError) as err:  # unreadable file: a clear error, not a silent skip
            raise RuntimeError(f"cannot read {piece.describe()} after {n} records: {err}") from err
        if piece.format != "parquet":
            self._bytes.inc(piece.end - piece.start)
        yield beam.pvalue.TaggedOutput(READ_COUNTS, n)


class _FirstOfEachIdFn(beam.DoFn):
    """(id, [passages]) -> the first passage by (file, position); the others are rejected duplicates.
    Deterministic whatever order the runner delivers them in."""

    def __init__(self):
        self._dups = Metrics.counter(NAMESPACE, "rejected_duplicate_id")
        self._rejected = Metrics.counter(NAMESPACE, "passages_rejected")

    def process(self, keyed):
        _, passages = keyed
        passages = sorted(passages, key=Passage.sort_key)
        first = passages[0]
        yield first
        for dup in passages[1:]:
            self._dups.inc()
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput(REJECTED, Rejected(
                reason="duplicate_id",
                detail=f"id {dup.id!r} already seen at {first.source_file} offset {first.source_pos}",
                source_file=dup.source_file, source_pos=dup.source_pos, line=None, id=dup.id,
                raw=dup.text[:512]))


class ReadCorpus(beam.PTransform):
    """Reads corpus shards in parallel pieces, validates every record and drops duplicate ids.

    Returns a dict of PCollections: ``passages`` (Passage, unique ids, redistributed across workers by
    the id shuffle), ``rejected`` (Rejected with reason and source) and ``read_counts`` (one int per
    piece: records read, valid or not). ``sum(read_counts) == len(passages) + len(rejected)``.
    """

    def __init__(self, files: Sequence[tuple[str, int]], opts: ReadOptions, dedup: bool = True):
        super().__init__()
        if not files:
            raise ValueError("ReadCorpus needs at least one input file")
        self._files = list(files)
        self._opts = opts
        self._dedup = dedup

    def expand(self, pbegin):
        # 1. Plan: every file -> pieces (byte ranges / row groups), then spread the pieces over workers.
        pieces = (pbegin
                  | "Files" >> beam.Create(self._files)
                  | "PlanPieces" >> beam.ParDo(_PlanPiecesFn(self._opts))
                  | "SpreadPieces" >> beam.Reshuffle())
        # 2. Parse and validate each piece, streaming.
        parsed = pieces | "ParseValidate" >> beam.ParDo(_ReadPieceFn(self._opts)).with_outputs(
            REJECTED, READ_COUNTS, main="passages")
        passages, rejected = parsed.passages, [parsed[REJECTED]]
        # 3. Duplicate ids: keep the first by (file, position). The shuffle by id is also the fusion
        #    break that spreads passages over the encoding workers.
        if self._dedup:
            deduped = (passages
                       | "KeyById" >> beam.Map(lambda p: (p.id, p))
                       | "GroupById" >> beam.GroupByKey()
                       | "FirstOfEachId" >> beam.ParDo(_FirstOfEachIdFn()).with_outputs(
                           REJECTED, main="passages"))
            passages = deduped.passages
            rejected.append(deduped[REJECTED])
        else:
            passages = passages | "Redistribute" >> beam.Reshuffle()
        return {
            "passages": passages,
            "rejected": tuple(rejected) | "AllRejected" >> beam.Flatten(),
            "read_counts": parsed[READ_COUNTS],
        }
