"""Corpus shards: matching, planning into parallel pieces, and parsing records with validation.

Pure functions over fsspec files (no Beam import), so the rules are unit-testable on their own and the
Beam DoFns in :mod:`transforms.read` stay thin.

A *piece* is the unit of parallel reading: a byte range of an uncompressed text file (a piece owns the
lines whose first byte lies in ``[start, end)``, as Hadoop's line reader does), the whole of a
compressed file (gzip cannot be split), or a range of row groups of a Parquet file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Iterator, Optional, Sequence, Union

import fsspec

from densebeam.index_store.types import Passage, Rejected

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "tsv", "parquet")
DEFAULT_SPLIT_BYTES = 64 << 20  # 64 MiB pieces, as Beam's text source
_RAW_CHARS = 512  # how much of a bad record the dead-letter output keeps
_COMPRESSIONS = {".gz": "gzip", ".gzip": "gzip", ".bz2": "bz2", ".zst": "zstd", ".xz": "lzma"}
_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".tsv": "tsv", ".txt": "tsv",
               ".parquet": "parquet", ".pq": "parquet"}


@dataclasses.dataclass(frozen=True)
class ReadOptions:
    """How records are parsed and validated; one object shipped to every reader."""

    format: str = "auto"  # auto | jsonl | tsv | parquet
    id_field: str = "_id"
    text_field: str = "text"
    title_field: Optional[str] = "title"
    tsv_columns: tuple[str, ...] = ("id", "text")  # MS MARCO collection.tsv; ("id", "title", "text") also
    max_id_bytes: int = 256
    max_text_bytes: int = 1 << 20
    split_bytes: int = DEFAULT_SPLIT_BYTES
    # Titles are encoded with the text (BEIR style): a record with a title and an empty text still has
    # something to encode. Without joining, an empty text is ``empty_text``.
    join_title: bool = True

    def __post_init__(self):
        if self.format not in FORMATS + ("auto",):
            raise ValueError(f"format must be auto or one of {FORMATS}, got {self.format!r}")
        cols = tuple(self.tsv_columns)
        if "id" not in cols or "text" not in cols or not set(cols) <= {"id", "title", "text"}:
            raise ValueError(f"tsv columns must name id and text (and optionally title), got {cols}")
        if self.split_bytes < 1024:
            raise ValueError("split_bytes must be at least 1024")


@dataclasses.dataclass(frozen=True)
class Piece:
    path: str  # fsspec URL, protocol included (memory://, gs://, file paths plain)
    format: str
    compression: Optional[str]
    start: int  # byte offset (text) or first row group (parquet)
    end: int  # byte offset or row-group end, exclusive
    file_size: int

    def describe(self) -> str:
        unit = "row groups" if self.format == "parquet" else "bytes"
        return f"{self.path} [{unit} {self.start}:{self.end}]"


def detect_format(path: str, override: str = "auto") -> tuple[str, Optional[str]]:
    """(format, compression) from the file name, e.g. ``a.jsonl.gz`` -> (jsonl, gzip)."""
    name = path.rsplit("/", 1)[-1].lower()
    compression = None
    for ext, comp in _COMPRESSIONS.items():
        if name.endswith(ext):
            compression, name = comp, name[: -len(ext)]
            break
    if override != "auto":
        return override, compression
    for ext, fmt in _EXTENSIONS.items():
        if name.endswith(ext):
            return fmt, compression
    raise ValueError(f"cannot tell the format of {path!r} from its extension; pass --format jsonl|tsv|parquet")


def expand_patterns(patterns: Sequence[str]) -> list[tuple[str, int]]:
    """Every file matched by the glob patterns, as (URL, size), sorted; an unmatched pattern is an error."""
    found: dict[str, int] = {}
    for pattern in patterns:
        fs, _, paths = fsspec.get_fs_token_paths(pattern)  # expands globs
        matched = [p for p in paths if fs.isfile(p)]
        if not matched:
            raise FileNotFoundError(f"input pattern {pattern!r} matches no file")
        for p in matched:
            url = p if is_local_fs(fs) else fs.unstrip_protocol(p)
            found[url] = int(fs.size(p))
    return sorted(found.items())


def is_local_fs(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def plan_pieces(path: str, size: int, opts: ReadOptions) -> list[Piece]:
    """Split one file into pieces: byte ranges of ``opts.split_bytes`` for uncompressed text, one piece
    for compressed text, row-group ranges of about ``split_bytes`` for Parquet."""
    fmt, compression = detect_format(path, opts.format)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fsspec.open(path, "rb", compression=compression) as f:
            meta = pq.ParquetFile(f).metadata
        pieces, first, acc = [], 0, 0
        for rg in range(meta.num_row_groups):
            acc += meta.row_group(rg).total_byte_size
            if acc >= opts.split_bytes:
                pieces.append(Piece(path, fmt, compression, first, rg + 1, size))
                first, acc = rg + 1, 0
        if first < meta.num_row_groups or not pieces:
            pieces.append(Piece(path, fmt, compression, first, meta.num_row_groups, size))
        return pieces
    if compression is not None or size <= opts.split_bytes:
        return [Piece(path, fmt, compression, 0, size, size)]
    return [Piece(path, fmt, None, s, min(s + opts.split_bytes, size), size)
            for s in range(0, size, opts.split_bytes)]


# ---------------------------------------------------------------------------------------------------
# Reading a piece: yields Passage or Rejected, streaming (one record in memory at a time).

Record = Union[Passage, Rejected]


def read_piece(piece: Piece, opts: ReadOptions) -> Iterator[Record]:
    if piece.format == "parquet":
        yield from _read_parquet_piece(piece, opts)
    else:
        yield from _read_text_piece(piece, opts)


def _iter_lines(piece: Piece) -> Iterator[tuple[int, Optional[int], bytes]]:
    """(byte offset, 1-based line number or None, raw line) for the lines this piece owns."""
    with fsspec.open(piece.path, "rb", compression=piece.compression) as f:
        pos = piece.start
        if piece.start > 0:
            f.seek(piece.start - 1)
            if f.read(1) != b"\n":  # mid-line: that line belongs to the previous piece
                skipped = f.readline()
                pos = piece.start + len(skipped)
        line_no = 1 if piece.start == 0 else None
        bounded = piece.compression is None
        while not bounded or pos < piece.end:
            line = f.readline()
            if not line:
                break
            yield pos, line_no, line
            pos += len(line)
            if line_no is not None:
                line_no += 1


def _reject(reason, detail, piece, pos, line_no, raw=None, id=None) -> Rejected:
    if isinstance(raw, bytes):
        raw = raw[: _RAW_CHARS * 4].decode("utf-8", errors="replace")
    if raw is not None:
        raw = raw[:_RAW_CHARS]
    return Rejected(reason=reason, detail=detail, source_file=piece.path, source_pos=pos,
                    line=line_no, id=id, raw=raw)


def _read_text_piece(piece: Piece, opts: ReadOptions) -> Iterator[Record]:
    parse = _parse_json_record if piece.format == "jsonl" else _parse_tsv_record
    for pos, line_no, raw in _iter_lines(piece):
        body = raw.rstrip(b"\r\n")
        if not body.strip():
            continue  # blank lines are not records
        try:
            line = body.decode("utf-8")
        except UnicodeDecodeError as err:
            yield _reject("undecodable_bytes", f"not UTF-8: {err}", piece, pos, line_no, raw)
            continue
        fields = parse(line, opts)
        if isinstance(fields, tuple) and fields and fields[0] == "__error__":
            yield _reject(fields[1], fields[2], piece, pos, line_no, line)
            continue
        yield _validate(fields, opts, piece, pos, line_no, line)


def _parse_json_record(line: str, opts: ReadOptions):
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as err:
        return ("__error__", "malformed_json", f"invalid JSON: {err}")
    if not isinstance(obj, dict):
        return ("__error__", "malformed_json", f"expected a JSON object, got {type(obj).__name__}")
    title = obj.get(opts.title_field) if opts.title_field else None
    return obj.get(opts.id_field), obj.get(opts.text_field), title


def _parse_tsv_record(line: str, opts: ReadOptions):
    cols = line.split("\t")
    if len(cols) != len(opts.tsv_columns):
        return ("__error__", "wrong_column_count",
                f"expected {len(opts.tsv_columns)} tab-separated columns ({', '.join(opts.tsv_columns)}), "
                f"got {len(cols)}")
    row = dict(zip(opts.tsv_columns, cols))
    return row["id"], row["text"], row.get("title")


def _validate(fields, opts: ReadOptions, piece: Piece, pos: int, line_no: Optional[int], raw) -> Record:
    """Apply the record rules to (id, text, title); returns a Passage or a Rejected with the reason."""
    doc_id, text, title = fields
    if isinstance(doc_id, bool) or (doc_id is not None and not isinstance(doc_id, (str, int))):
        return _reject("invalid_id", f"id must be a string or integer, got {type(doc_id).__name__}",
                       piece, pos, line_no, raw)
    if doc_id is None or (isinstance(doc_id, str) and not doc_id.strip()):
        return _reject("missing_id", "id is missing or empty", piece, pos, line_no, raw)
    doc_id = str(doc_id)
    if len(doc_id.encode("utf-8")) > opts.max_id_bytes:
        return _reject("id_too_long", f"id is longer than {opts.max_id_bytes} bytes", piece, pos, line_no, raw)
    if doc_id != doc_id.strip() or any(c.isspace() or ord(c) < 32 or c == "\x7f" for c in doc_id):
        return _reject("invalid_id", "id contains whitespace or control characters", piece, pos, line_no,
                       raw, id=doc_id)
    if text is None:
        return _reject("missing_text", "text is missing", piece, pos, line_no, raw, id=doc_id)
    if not isinstance(text, str):
        return _reject("invalid_text", f"text must be a string, got {type(text).__name__}", piece, pos,
                       line_no, raw, id=doc_id)
    title_counts = opts.join_title and isinstance(title, str) and bool(title.strip())
    if not text.strip() and not title_counts:
        detail = "text is empty" + (" and so is the title" if opts.join_title else " (titles are not joined)")
        return _reject("empty_text", detail, piece, pos, line_no, raw, id=doc_id)
    if len(text.encode("utf-8", errors="surrogatepass")) > opts.max_text_bytes:
        return _reject("text_too_long", f"text is longer than {opts.max_text_bytes} bytes", piece, pos,
                       line_no, raw, id=doc_id)
    if title is not None and not isinstance(title, str):
        return _reject("invalid_title", f"title must be a string, got {type(title).__name__}", piece, pos,
                       line_no, raw, id=doc_id)
    if _has_surrogates(text) or (title and _has_surrogates(title)):
        return _reject("undecodable_bytes", "text holds unpaired UTF-16 surrogates", piece, pos, line_no,
                       raw, id=doc_id)
    return Passage(id=doc_id, text=text, title=title or "", source_file=piece.path, source_pos=pos)


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _read_parquet_piece(piece: Piece, opts: ReadOptions) -> Iterator[Record]:
    import pyarrow.parquet as pq

    with fsspec.open(piece.path, "rb", compression=piece.compression) as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        wanted = [opts.id_field, opts.text_field]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise ValueError(f"{piece.path}: Parquet file has no column(s) {missing}; it has {sorted(names)}. "
                             "Set --id-field/--text-field to the right column names.")
        has_title = bool(opts.title_field) and opts.title_field in names
        columns = wanted + ([opts.title_field] if has_title else [])
        row = sum(pf.metadata.row_group(rg).num_rows for rg in range(piece.start))
        for rg in range(piece.start, piece.end):
            table = pf.read_row_group(rg, columns=columns)
            ids = table.column(opts.id_field).to_pylist()
            texts = table.column(opts.text_field).to_pylist()
            titles = table.column(opts.title_field).to_pylist() if has_title else [None] * len(ids)
            for doc_id, text, title in zip(ids, texts, titles):
                raw = json.dumps({"id": repr(doc_id)[:80], "text": repr(text)[:_RAW_CHARS]})
                yield _validate((doc_id, text, title), opts, piece, row, None, raw)
                row += 1
