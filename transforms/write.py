"""WriteEmbeddings: encoded passages + rejected records -> an embeddings dir, committed by its manifest.

Workers write to ``_temporary/<uuid>`` files; only the files of bundles that succeeded reach the single
finalize step, which renames them to ``part-NNNNN-of-MMMMM`` names, checks that the counts reconcile
(``read == encoded + rejected``) and writes ``_manifest.json`` last. A crashed or retried bundle leaves
at most an orphan temp file, which finalize deletes; it never shows up as a shard.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import json
import logging
import time
import uuid
from typing import Optional, Sequence

import apache_beam as beam
import fsspec
import numpy as np
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from densebeam.index_store.artifacts import embeddings as emb
from densebeam.index_store.types import ModelFacts, Rejected
from densebeam.transforms.cache import JOURNAL_DIR, file_identity, identity_metadata, text_hash
from densebeam.transforms.read import NAMESPACE

log = logging.getLogger(__name__)


# A run fails (and publishes nothing) when dead letters of a reason exceed this share of the records
# read; "*" is all reasons together. A night whose model raises on every batch, or whose input is the
# wrong format, must not end green.
FAILED_REPORT = "_FAILED.json"


class RejectedShareExceeded(RuntimeError):
    """Dead letters crossed a configured share; nothing was published (see ``_FAILED.json``)."""


def rejected_share_violations(read: int, reasons: dict, limits: dict) -> list[dict]:
    """The limits crossed: [{reason, rejected, read, share, limit}], reason ``*`` meaning all reasons."""
    out = []
    if read <= 0:
        return out
    for reason, limit in sorted(limits.items()):
        n = sum(reasons.values()) if reason == "*" else int(reasons.get(reason, 0))
        if n / read > limit:
            out.append({"reason": reason, "rejected": n, "read": read, "share": round(n / read, 6),
                        "limit": limit})
    return out


def describe_failure(report: dict, out_dir: str) -> str:
    """One paragraph for a person: what crossed which limit, where the dead letters are, what to do."""
    crossed = "; ".join(f"{'all reasons' if c['reason'] == '*' else c['reason']}: {c['rejected']} of "
                        f"{c['read']} read ({100 * c['share']:.2f}%) > {100 * c['limit']:g}%"
                        for c in report["crossed"])
    files = report["rejected_records"]
    return (f"too many rejected records, nothing was published ({crossed}). The rejected records, each "
            f"with its reason and source: {', '.join(files[:3])}{' ...' if len(files) > 3 else ''}; report: "
            f"{emb.join(out_dir, FAILED_REPORT)}. Fix the input or the model, or raise the limit with "
            f"--max-rejected-share REASON=SHARE.")


def _emit_from_finish(value):
    return WindowedValue(value, MIN_TIMESTAMP, [GlobalWindow()])


def piece_key(passage, file_order: dict) -> tuple[int, int]:
    """Where a passage's piece sits in the canonical order: (input file's rank, piece start)."""
    return file_order[passage.source_file], passage.piece_start


class InSourceOrder(beam.PTransform):
    """(passage, vector, precision, reused) rows -> the same rows, each piece's together and in source
    order. Needed where rows were shuffled (the reuse join); a shuffle of the rows themselves."""

    def __init__(self, files: Sequence[str]):
        super().__init__()
        self._order = {f: i for i, f in enumerate(files)}

    def expand(self, rows):
        order = self._order
        return (rows
                | "KeyByPiece" >> beam.Map(lambda r: (piece_key(r[0], order), r))
                | "GroupByPiece" >> beam.GroupByKey()
                | "SortByPosition" >> beam.FlatMap(lambda kv: sorted(kv[1], key=lambda r: r[0].source_pos)))


class _ShardWriterFn(beam.DoFn):
    """Streams (passage, vector, precision, reused) rows into temp Parquet files of at most
    ``rows_per_shard`` rows, one row group per ``row_group_rows``; memory is one row group.

    A temp file never holds rows of two pieces: rows arrive piece by piece in source order, so the temp
    files sorted by (piece key, first row's position) concatenate to the canonical order (input files in
    order, records in file order), whatever the runner, the worker count or the bundling."""

    def __init__(self, out_dir: str, facts: ModelFacts, keep_text: bool, rows_per_shard: int,
                 row_group_rows: int, identity: Optional[dict], join_title: bool, files: Sequence[str]):
        self._out, self._facts, self._keep_text = out_dir, facts, keep_text
        self._rows_per_shard, self._row_group_rows = rows_per_shard, row_group_rows
        self._identity, self._join_title = identity, join_title
        self._order = {f: i for i, f in enumerate(files)}
        self._write_msec = Metrics.counter(NAMESPACE, "write_msec")

    def start_bundle(self):
        self._writer = self._file = self._tmp = None
        self._rows = 0
        self._buf = collections.defaultdict(list)
        self._precisions, self._reused = set(), 0
        self._key, self._first_pos, self._last_pos = None, None, -1

    def process(self, row):
        passage, vector, precision, reused = row
        key = piece_key(passage, self._order)
        if key != self._key:
            if self._precisions:
                yield self._close()
            self._key = key
        elif passage.source_pos <= self._last_pos:
            raise RuntimeError(f"rows of piece {key} reached the writer out of source order "
                               f"({passage.source_pos} after {self._last_pos}); they must be put in order first")
        elif self._precisions and precision not in self._precisions:
            yield self._close()  # one compute precision per file: its identity says which
        self._last_pos = passage.source_pos
        if self._first_pos is None:
            self._first_pos = passage.source_pos
        b = self._buf
        b["id"].append(passage.id)
        b["vec"].append(vector)
        b["hash"].append(text_hash(passage.joined_text(self._join_title)))
        self._reused += int(reused)
        if self._keep_text:
            b["text"].append(passage.text)
            b["title"].append(passage.title)
        self._precisions.add(precision)
        if len(b["id"]) >= self._row_group_rows:
            self._flush()
        if self._rows >= self._rows_per_shard:
            yield self._close()

    def _flush(self):
        b = self._buf
        if not b["id"]:
            return
        start = time.perf_counter()
        (precision,) = self._precisions
        facts = dataclasses.replace(self._facts, precision=precision)
        table = emb.to_table(facts, b["id"], np.stack(b["vec"]),
                             b["text"] if self._keep_text else None, b["title"] if self._keep_text else None,
                             text_hashes=b["hash"], extra_metadata=identity_metadata(self._identity, precision))
        if self._writer is None:
            self._tmp = emb.join(self._out, emb.TEMP_DIR, f"{uuid.uuid4().hex}.parquet")
            self._file = fsspec.open(self._tmp, "wb").open()
            # a dictionary only for titles (passages of one document repeat theirs): ids, texts, hashes
            # and floats do not repeat, and dictionaries of the vectors make the files larger and their
            # writing slower
            self._writer = pq.ParquetWriter(self._file, table.schema, compression="zstd",
                                            use_dictionary=[f for f in ("title",) if f in table.schema.names])
        self._writer.write_table(table)
        self._rows += table.num_rows
        self._buf = collections.defaultdict(list)
        self._write_msec.inc(int(1000 * (time.perf_counter() - start)))

    def _close(self):
        self._flush()
        self._writer.close()
        self._file.close()
        info = {"tmp": self._tmp, "rows": self._rows, "order": (*self._key, self._first_pos), "precisions": sorted(self._precisions),
                "reused": self._reused}
        self._first_pos = None
        self._writer = self._file = self._tmp = None
        self._rows, self._precisions, self._reused = 0, set(), 0
        return info

    def finish_bundle(self):
        self._flush()
        if self._writer is not None:
            yield _emit_from_finish(self._close())


class _RejectedWriterFn(beam.DoFn):
    """Streams Rejected records into one temp JSONL file per bundle; emits its row and reason counts."""

    def __init__(self, out_dir: str):
        self._out = out_dir

    def start_bundle(self):
        self._file, self._tmp, self._rows = None, None, 0
        self._reasons = collections.Counter()

    def process(self, rec: Rejected):
        if self._file is None:
            self._tmp = emb.join(self._out, emb.TEMP_DIR, f"rejected-{uuid.uuid4().hex}.jsonl")
            self._file = fsspec.open(self._tmp, "w", encoding="utf-8").open()
        self._file.write(json.dumps(rec.to_dict(), ensure_ascii=False) + "\n")
        self._rows += 1
        self._reasons[rec.reason] += 1

    def finish_bundle(self):
        if self._file is not None:
            self._file.close()
            yield _emit_from_finish({"tmp": self._tmp, "rows": self._rows, "reasons": dict(self._reasons)})


class _FinalizeFn(beam.DoFn):
    """Runs once, after every writer: rename temp files, reconcile counts, write the manifest last."""

    def __init__(self, out_dir: str, facts: ModelFacts, manifest_extra: dict, max_rejected_share: dict):
        self._out, self._facts, self._extra = out_dir, facts, manifest_extra
        self._limits = dict(max_rejected_share)

    def process(self, _, shards, rejected, read_counts):
        fs, _ = fsspec.core.url_to_fs(self._out)
        read = int(sum(n for _, n in read_counts))
        by_file = collections.Counter()
        for path, n in read_counts:
            by_file[path] += n
        encoded = sum(s["rows"] for s in shards)
        n_rejected = sum(r["rows"] for r in rejected)
        if read != encoded + n_rejected:
            raise RuntimeError(f"counts do not reconcile: read {read} != encoded {encoded} + rejected "
                               f"{n_rejected}; the embeddings dir {self._out} is left uncommitted")
        all_reasons = collections.Counter()
        for r in rejected:
            all_reasons.update(r["reasons"])
        self._fail_if_too_many_rejected(fs, read, encoded, all_reasons, rejected)
        if fs.exists(emb.join(self._out, FAILED_REPORT)):
            fs.rm(emb.join(self._out, FAILED_REPORT))
        precisions = sorted({p for s in shards for p in s["precisions"]})
        facts = self._facts
        if len(precisions) == 1:
            facts = ModelFacts.from_dict({**facts.to_dict(), "precision": precisions[0]})
        elif precisions:
            facts = ModelFacts.from_dict({**facts.to_dict(), "precision": "+".join(precisions)})
        # Un-publish the previous run first: from here until the new manifest, no manifest points at a
        # mix of old and new shards.
        if fs.exists(emb.join(self._out, emb.MANIFEST)):
            fs.rm(emb.join(self._out, emb.MANIFEST))
        # The canonical order: shards by (file rank, piece start, first row); rows within are in order.
        shard_entries = self._publish(fs, sorted(shards, key=lambda s: tuple(s["order"])),
                                      emb.SHARD_PATTERN, "")
        rej_entries = self._publish(fs, sorted(rejected, key=lambda r: (r["tmp"])),
                                    emb.REJECTED_PATTERN, emb.REJECTED_DIR + "/")
        reasons = all_reasons
        manifest = {
            "format": emb.FORMAT, "format_version": emb.FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model_facts": facts.to_dict(),
            "counts": {"read": read, "encoded": encoded, "rejected": n_rejected,
                       "reused": sum(s.get("reused", 0) for s in shards),
                       "rejected_by_reason": dict(sorted(reasons.items()))},
            "shards": shard_entries,
            "rejected_files": rej_entries,
            **self._extra,
        }
        if isinstance(manifest.get("inputs"), list):  # records read from each input file
            manifest["inputs"] = [{**i, "records": by_file.get(i.get("path"), 0)} if isinstance(i, dict) else i
                                  for i in manifest["inputs"]]
        if "encode_identity" in manifest:  # the precision the vectors were really computed in
            manifest["encode_identity"] = file_identity(manifest["encode_identity"], facts.precision)
        self._remove_stale(fs, {e["path"] for e in shard_entries + rej_entries})
        tmp = emb.join(self._out, emb.TEMP_DIR, "manifest.json")
        with fsspec.open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
        fs.mv(tmp, emb.join(self._out, emb.MANIFEST))
        for done in (emb.TEMP_DIR, JOURNAL_DIR):
            if fs.exists(emb.join(self._out, done)):
                fs.rm(emb.join(self._out, done), recursive=True)
        log.info("wrote %d shard(s), %d vectors, %d rejected to %s", len(shard_entries), encoded,
                 n_rejected, self._out)
        yield manifest

    def _fail_if_too_many_rejected(self, fs, read, encoded, reasons, rejected) -> None:
        """Before anything is touched (a previous good output stays published): write ``_FAILED.json``
        with the counts and the limits crossed, keep the rejected records in the temp dir, and fail."""
        crossed = rejected_share_violations(read, reasons, self._limits)
        if not crossed:
            return
        report = {"read": read, "encoded": encoded, "rejected_by_reason": dict(sorted(reasons.items())),
                  "limits": self._limits, "crossed": crossed,
                  "rejected_records": sorted(r["tmp"] for r in rejected)}
        with fsspec.open(emb.join(self._out, FAILED_REPORT), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, sort_keys=True)
        raise RejectedShareExceeded(describe_failure(report, self._out))

    def _publish(self, fs, infos, pattern, prefix):
        entries = []
        for i, info in enumerate(infos):
            rel = prefix + pattern.format(index=i, count=len(infos))
            final = emb.join(self._out, rel)
            if fs.exists(info["tmp"]):
                fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
                fs.mv(info["tmp"], final)
            elif not fs.exists(final):  # a retried finalize has already moved it
                raise RuntimeError(f"temp file {info['tmp']} of a finished bundle is missing")
            entries.append({"path": rel, "rows": info["rows"]})
        return entries

    def _remove_stale(self, fs, keep):
        """Shards of an earlier run into the same dir that this run did not write."""
        root = fs._strip_protocol(self._out).rstrip("/")
        for pat in ("part-*.parquet", emb.REJECTED_DIR + "/part-*.jsonl"):
            for p in fs.glob(emb.join(root, pat)):
                if p[len(root) + 1:] not in keep:
                    fs.rm(p)


class WriteEmbeddings(beam.PTransform):
    """{encoded, rejected, read_counts} -> embeddings dir at ``out_dir``; returns the manifest (one dict)."""

    def __init__(self, out_dir: str, facts: ModelFacts, keep_text: bool = True,
                 rows_per_shard: int = 200_000, row_group_rows: int = 8192,
                 manifest_extra: Optional[dict] = None, identity: Optional[dict] = None,
                 join_title: bool = True, max_rejected_share: Optional[dict] = None,
                 files: Sequence[str] = ()):
        super().__init__()
        if rows_per_shard < 1 or row_group_rows < 1:
            raise ValueError("rows_per_shard and row_group_rows must be positive")
        self._out = out_dir.rstrip("/")
        self._facts, self._keep_text = facts, keep_text
        self._rows_per_shard, self._row_group_rows = rows_per_shard, min(row_group_rows, rows_per_shard)
        self._extra = manifest_extra or {}
        self._identity, self._join_title = identity, join_title
        self._limits = emb.DEFAULT_MAX_REJECTED_SHARE if max_rejected_share is None else dict(max_rejected_share)
        self._files = list(files)

    def expand(self, pcolls):
        p = pcolls["encoded"].pipeline
        # 1. Vectors to temp Parquet files, rejected records to temp JSONL files.
        shards = pcolls["encoded"] | "WriteShards" >> beam.ParDo(_ShardWriterFn(
            self._out, self._facts, self._keep_text, self._rows_per_shard, self._row_group_rows,
            self._identity, self._join_title, self._files))
        rejected = pcolls["rejected"] | "WriteRejected" >> beam.ParDo(_RejectedWriterFn(self._out))
        # 2. Once everything is written: rename, reconcile, manifest last.
        return (p
                | "FinalizeTrigger" >> beam.Create([None])
                | "Finalize" >> beam.ParDo(
                    _FinalizeFn(self._out, self._facts, self._extra, self._limits),
                    shards=beam.pvalue.AsList(shards), rejected=beam.pvalue.AsList(rejected),
                    read_counts=beam.pvalue.AsList(pcolls["read_counts"])))
