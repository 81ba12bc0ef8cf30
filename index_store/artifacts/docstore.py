"""Docstore: FAISS int64 row id -> (document id, text, title) with O(1) random access. No Beam import.

Each part is an uncompressed Arrow IPC *file* covering the contiguous rows ``[base, base + rows)``
(one part per index shard), written in record batches of exactly ``batch_rows`` rows except the last,
so a row's batch and offset are arithmetic. Readers memory-map the parts: opening costs the footers
only, a lookup touches the pages of one string per column, and the corpus never has to fit in RAM
(the OS page cache holds what is hot). Uncompressed costs disk (about the text size) but needs no
decompression per lookup.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import os
from typing import Iterable, Optional, Sequence

import pyarrow as pa

from densebeam.index_store import fsutil

log = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 8192
BASE_KEY = b"densebeam.docstore.base_row"
BATCH_KEY = b"densebeam.docstore.batch_rows"
FORMAT_KEY = b"densebeam.format"
FORMAT = b"densebeam.docstore/1"
PART_PATTERN = "part-{index:05d}-of-{count:05d}.arrow"


def schema(base_row: int, batch_rows: int) -> pa.Schema:
    fields = [pa.field("id", pa.string(), nullable=False), pa.field("text", pa.string()),
              pa.field("title", pa.string())]
    return pa.schema(fields, metadata={FORMAT_KEY: FORMAT, BASE_KEY: str(base_row).encode(),
                                       BATCH_KEY: str(batch_rows).encode()})


class DocstoreWriter:
    """Stream rows into one part; memory is one pending batch of ``batch_rows`` rows.

    Rows get consecutive row ids from ``base_row`` in write order, which must match the order their
    vectors were added to the shard. The part appears at ``url`` only on :meth:`close`.
    """

    def __init__(self, url: str, base_row: int, batch_rows: int = DEFAULT_BATCH_ROWS):
        if base_row < 0 or batch_rows < 1:
            raise ValueError(f"base_row must be >= 0 and batch_rows >= 1, got {base_row}, {batch_rows}")
        self.url, self.base_row, self.batch_rows = url, base_row, batch_rows
        self.rows = 0
        self._schema = schema(base_row, batch_rows)
        self._pending: tuple[list, list, list] = ([], [], [])
        self._output = fsutil.atomic_local_output(url)
        self._tmp = self._output.__enter__()
        self._sink = pa.OSFile(self._tmp, "wb")
        self._writer = pa.ipc.new_file(self._sink, self._schema)  # IPC file, no compression
        self._closed = False

    def write(self, ids: Sequence[str], texts: Optional[Sequence[str]] = None,
              titles: Optional[Sequence[str]] = None) -> None:
        """Append rows; ``texts``/``titles`` may be None (stored as empty strings)."""
        if self._closed:
            raise ValueError(f"docstore part {self.url} is already closed")
        n = len(ids)
        texts = [""] * n if texts is None else list(texts)
        titles = [""] * n if titles is None else list(titles)
        if len(texts) != n or len(titles) != n:
            raise ValueError(f"got {n} ids, {len(texts)} texts and {len(titles)} titles for {self.url}")
        self._pending[0].extend(str(i) for i in ids)
        self._pending[1].extend(t or "" for t in texts)
        self._pending[2].extend(t or "" for t in titles)
        while len(self._pending[0]) >= self.batch_rows:
            self._flush(self.batch_rows)

    def _flush(self, n: int) -> None:
        cols = [pa.array(col[:n], pa.string()) for col in self._pending]
        self._writer.write_batch(pa.RecordBatch.from_arrays(cols, schema=self._schema))
        for col in self._pending:
            del col[:n]
        self.rows += n

    def close(self) -> dict:
        """Write the last (partial) batch, publish the file; return ``{path, rows, base}``."""
        if self._closed:
            raise ValueError(f"docstore part {self.url} is already closed")
        try:
            if self._pending[0]:
                self._flush(len(self._pending[0]))
            self._writer.close()
            self._sink.close()
        except BaseException as err:
            self.abort(err)
            raise
        self._closed = True
        self._output.__exit__(None, None, None)
        return {"path": self.url, "rows": self.rows, "base": self.base_row}

    def abort(self, err: Optional[BaseException] = None) -> None:
        """Drop the unpublished temporary file (call on failure instead of close)."""
        if self._closed:
            return
        self._closed = True
        self._sink.close()
        self._output.__exit__(type(err) if err else RuntimeError, err or RuntimeError("aborted"), None)

    def __enter__(self) -> "DocstoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            if not self._closed:
                self.close()
        else:
            self.abort(exc)


@dataclasses.dataclass(frozen=True)
class PartInfo:
    """What a part says about itself, once checked: rows ``[base, base + rows)`` in batches of
    ``batch_rows`` (the last one shorter)."""

    base: int
    rows: int
    batch_rows: int


def _meta_int(meta: dict, key: bytes, name: str) -> int:
    raw = meta.get(key, b"")
    if not raw.isdigit() or len(raw) > 18:
        raise ValueError(f"{name} has a damaged {key.decode()} ({raw[:40]!r}); rebuild the index bundle")
    return int(raw)


def check_part(reader: pa.ipc.RecordBatchFileReader, name: str, full: bool = True) -> PartInfo:
    """Check a part's schema and metadata and that its batches have the sizes lookups assume; with
    ``full``, also validate every batch's Arrow data (offsets inside their buffers, UTF-8, null counts)
    and that no id is null. ``full`` reads every byte of the part once (linear in its size); without
    it only the IPC footer and batch headers are read. Raises ValueError naming the part."""
    try:
        return _check_part(reader, name, full)
    except (pa.ArrowException, OSError, UnicodeDecodeError) as err:  # Arrow's own errors, metadata bytes
        raise ValueError(f"{name} is a damaged docstore part ({type(err).__name__}: {err}); rebuild the "
                         "index bundle") from err


def _check_part(reader: pa.ipc.RecordBatchFileReader, name: str, full: bool) -> PartInfo:
    meta = reader.schema.metadata or {}
    if meta.get(FORMAT_KEY) != FORMAT:
        raise ValueError(f"{name} is not a densebeam docstore part; rebuild the index bundle")
    info = PartInfo(base=_meta_int(meta, BASE_KEY, name), rows=0, batch_rows=_meta_int(meta, BATCH_KEY, name))
    if info.batch_rows < 1 or not reader.schema.equals(schema(info.base, info.batch_rows), check_metadata=True):
        raise ValueError(f"{name} has an unexpected schema ({reader.schema.names}, batch_rows "
                         f"{info.batch_rows}); rebuild the index bundle")
    rows, nb = 0, reader.num_record_batches
    for i in range(nb):
        batch = reader.get_batch(i)
        if full:
            batch.validate(full=True)
        expected = info.batch_rows if i < nb - 1 else batch.num_rows
        if batch.num_rows != expected or not 1 <= batch.num_rows <= info.batch_rows:
            raise ValueError(f"{name}: record batch {i} holds {batch.num_rows} rows where lookups need "
                             f"{info.batch_rows}; rebuild the index bundle")
        if full and batch.column(0).null_count:
            raise ValueError(f"{name}: record batch {i} has null document ids; rebuild the index bundle")
        rows += batch.num_rows
    return dataclasses.replace(info, rows=rows)


def _open_reader(local: str, name: str) -> pa.ipc.RecordBatchFileReader:
    try:
        return pa.ipc.open_file(pa.memory_map(local, "r"))
    except (pa.ArrowException, OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{name} is not a docstore part (Arrow IPC file): {err}; rebuild the index "
                         "bundle") from err


class _Part:
    def __init__(self, path: str, base: Optional[int] = None, rows: Optional[int] = None, *,
                 local: Optional[str] = None, full: bool = False):
        """Open part ``path`` (read from ``local`` when given, e.g. a pinned descriptor), check it
        (:func:`check_part`) and, when given, that it holds rows ``[base, base + rows)``."""
        local = local or fsutil.fetch_to_cache(path, "docstore")
        if not os.path.exists(local):
            raise FileNotFoundError(f"docstore part {path} does not exist; rebuild the index bundle")
        self.path = path
        self.reader = _open_reader(local, path)
        info = check_part(self.reader, path, full=full)
        if (base is not None and info.base != base) or (rows is not None and info.rows != rows):
            raise ValueError(f"{path} holds rows [{info.base}, +{info.rows}) but the manifest says "
                             f"[{base}, +{rows}); the bundle is inconsistent, rebuild it")
        self.base, self.rows, self.batch_rows = info.base, info.rows, info.batch_rows


class Docstore:
    """Memory-mapped lookup over several parts, found by bisecting their base rows."""

    def __init__(self, parts: list[_Part]):
        self.parts = sorted(parts, key=lambda p: p.base)
        self.bases = [p.base for p in self.parts]
        for a, b in zip(self.parts, self.parts[1:]):
            if a.base + a.rows > b.base:
                raise ValueError(f"docstore parts {a.path} and {b.path} overlap; rebuild the bundle")

    @classmethod
    def open(cls, paths_with_bases: Sequence[tuple[str, int, int]]) -> "Docstore":
        """Open parts given as ``(path or URL, base row, rows)``; remote parts are cached locally."""
        return cls([_Part(path, int(base), int(rows)) for path, base, rows in paths_with_bases])

    @classmethod
    def open_paths(cls, paths: Sequence[str]) -> "Docstore":
        """Open parts reading base and row count from the files themselves (no manifest needed)."""
        return cls([_Part(path) for path in paths])

    @classmethod
    def open_checked(cls, files: Sequence[tuple[str, str]]) -> "Docstore":
        """Open ``(name, local path)`` parts with every batch fully validated (see :func:`check_part`)
        and check that they cover rows ``[0, n)`` without gap or overlap: what a bundle opens."""
        store = cls([_Part(name, local=local, full=True) for name, local in files])
        end = 0
        for part in store.parts:
            if part.base != end:
                raise ValueError(f"docstore part {part.path} starts at row {part.base} but the parts "
                                 f"before it end at row {end}; the bundle is inconsistent, rebuild it")
            end += part.rows
        return store

    def __len__(self) -> int:
        return sum(p.rows for p in self.parts)

    def get(self, row_ids: Sequence[int]) -> list[Optional[dict]]:
        """``{id, text, title}`` per row id, None for -1 (an empty FAISS slot); O(1) per row."""
        out: list[Optional[dict]] = []
        batches: dict[tuple[int, int], pa.RecordBatch] = {}
        for row in row_ids:
            row = int(row)
            if row < 0:
                out.append(None)
                continue
            i = bisect.bisect_right(self.bases, row) - 1
            part = self.parts[i] if i >= 0 else None
            if part is None or row >= part.base + part.rows:
                raise IndexError(f"row id {row} is in no docstore part (rows {len(self)}); the index and "
                                 "docstore come from different builds")
            b, offset = divmod(row - part.base, part.batch_rows)
            batch = batches.get((i, b))
            if batch is None:
                batch = batches[(i, b)] = part.reader.get_batch(b)
            out.append({name: batch.column(j)[offset].as_py() or ""
                        for j, name in enumerate(("id", "text", "title"))})
        return out

    def contains_any(self, doc_ids: Iterable[str]) -> bool:
        """True when at least one of ``doc_ids`` is a document of this docstore: the id column is
        scanned batch by batch (memory-mapped, no texts read), stopping at the first match; a full scan
        of 8.8M ids reads about 100 MB."""
        import pyarrow.compute as pc

        wanted = pa.array(sorted({str(d) for d in doc_ids}), type=pa.string())
        if not len(wanted):
            return False
        for part in self.parts:
            for b in range(part.reader.num_record_batches):
                if pc.any(pc.is_in(part.reader.get_batch(b).column(0), value_set=wanted)).as_py():
                    return True
        return False
