"""Corpus shards: matching, planning into parallel pieces, and parsing records with validation.

Pure functions over fsspec files (no Beam import), so the rules are unit-testable on their own and the
Beam DoFns in :mod:`transforms.read` stay thin.

A *piece* is the unit of parallel reading: a byte range of an uncompressed text file (a piece owns the
lines whose first byte lies in ``[start, end)``, as Hadoop's line reader does), the whole of a
compressed file (gzip cannot be split), or a range of row groups of a Parquet file.

Records are never changed on the way: an id and a text are what the file says, byte for byte (no Unicode
normalization, no trimming). The one exception is a UTF-8 byte-order mark at the start of a file, which is
an encoding signature, not part of the first record. What cannot be kept exactly is rejected with a
reason (see :func:`id_problem` for the id policy).

Every file is stamped (size plus fsspec's checksum of its metadata: modification time and inode locally,
ETag or generation in object stores) when it is planned, and the stamp is checked before and after each
piece is read, by every pass: a file that changes during a run fails the run, naming the file.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
import unicodedata
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
_CHECK_TOOL = {"gzip": "gzip -t", "bz2": "bzip2 -t", "zstd": "zstd -t", "lzma": "xz -t"}
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  # also the start of the UTF-32 ones
_GLOB_MAGIC = re.compile(r"[*?\[]")


class CorpusError(ValueError):
    """An input file cannot be read as planned (unreadable, not the format its name says, or changed
    during the run). The message names the file and the position, and says what to do."""


class InputChangedError(CorpusError):
    """An input file changed (size, modification time or checksum) after the run planned it."""


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
class FileStamp:
    """What a file looked like when it was planned; any difference later means it changed."""

    size: int
    checksum: str  # fsspec's checksum of the file's metadata (mtime and inode locally, ETag/generation remote)


@dataclasses.dataclass(frozen=True)
class Piece:
    path: str  # fsspec URL, protocol included (memory://, gs://, file paths plain)
    format: str
    compression: Optional[str]
    start: int  # byte offset (text) or first row group (parquet)
    end: int  # byte offset or row-group end, exclusive
    file_size: int
    stamp: Optional[FileStamp] = None  # taken when planned; checked whenever the piece is read

    def describe(self) -> str:
        unit = "row groups" if self.format == "parquet" else "bytes"
        if self.compression is not None and self.format != "parquet":
            unit = "decompressed bytes"
        end = "end" if self.end == TO_END else self.end
        return f"{self.path} [{unit} {self.start}:{end}]"


# The end of a compressed text piece that reads to the end of the file (its decompressed size is known
# only approximately when planning).
TO_END = 2 ** 63 - 1
PIECES_PER_WORKER = 8  # balance: every worker gets about this many equal pieces
MIN_PIECE_BYTES = 4 << 10
# Codecs whose decompressed streams seek forward (by decompressing and discarding): such files are split
# into ranges of the decompressed stream; each piece decompresses from the start of the file up to its
# own range, so N pieces cost about N/2 full decompressions in all (cheap next to encoding).
_SEEKABLE_CODECS = ("gzip", "bz2", "lzma", "zstd")


def open_compressed(path: str, compression: Optional[str]):
    """A binary file object of ``path``'s data, decompressed: fsspec's codecs, except zstd, whose fsspec
    reader cannot read lines and ends silently at a truncated frame: there :class:`_ZstdRaw` under a
    buffered reader (every frame of a multi-frame file, a truncated frame an error, forward seeks)."""
    if compression != "zstd":
        return fsspec.open(path, "rb", compression=compression).open()
    import io

    return io.BufferedReader(_ZstdRaw(fsspec.open(path, "rb").open()))


class _ZstdRaw(io.RawIOBase):
    """A zstd file's decompressed bytes as a raw stream: frame after frame (multi-frame files from
    ``pzstd`` or appends), an error when the file ends inside a frame, seeks forward by decompressing."""

    CHUNK = 1 << 18

    def __init__(self, raw):
        import zstandard

        self._raw, self._zstd = raw, zstandard
        self._obj = zstandard.ZstdDecompressor().decompressobj()
        self._in_frame = False  # bytes of the current frame were fed and it has not ended
        self._pending = b""
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def _fill(self) -> bool:
        """Decompress until some output is pending; False at the end of the data."""
        while not self._pending:
            data = self._obj.unused_data if self._obj.eof else b""
            if self._obj.eof:  # the frame ended: the next one starts with what it did not use
                self._obj = self._zstd.ZstdDecompressor().decompressobj()
                self._in_frame = False
            if not data:
                data = self._raw.read(self.CHUNK)
                if not data:
                    if self._in_frame:
                        raise EOFError("the zstd data ends inside a frame (the file is truncated)")
                    return False
            self._in_frame = True
            self._pending = self._obj.decompress(data)
        return True

    def readinto(self, b) -> int:
        if not self._fill():
            return 0
        n = min(len(b), len(self._pending))
        b[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        self._pos += n
        return n

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset + (self._pos if whence == 1 else 0)
        if whence not in (0, 1) or target < self._pos:
            raise OSError("a zstd stream seeks forward only")
        while self._pos < target:
            if not self._fill():
                break
            n = min(target - self._pos, len(self._pending))
            self._pending = self._pending[n:]
            self._pos += n
        return self._pos

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def balanced_piece_bytes(files: Sequence[tuple[str, int]], workers: int, split_bytes: int) -> int:
    """The piece size that gives every one of ``workers`` workers about ``PIECES_PER_WORKER`` equal
    pieces of the whole input (on-disk bytes), at most ``split_bytes``; one worker: ``split_bytes``."""
    if workers <= 1:
        return split_bytes
    total = sum(size for _, size in files)
    return int(max(MIN_PIECE_BYTES, min(split_bytes, -(-total // (workers * PIECES_PER_WORKER)))))


def decompressed_size_estimate(path: str, size: int, compression: str) -> int:
    """gzip: the ISIZE trailer (exact below 4 GiB, single member; wrapped sizes are unwrapped to at
    least the compressed size); zstd: the first frame's content size where its header records it (the
    zstd tool writes it), scaled by the file's size over that frame's; other codecs: three times the
    compressed size."""
    if compression == "zstd":
        return _zstd_size_estimate(path, size)
    if compression != "gzip" or size < 18:
        return 3 * size
    with fsspec.open(path, "rb") as f:
        f.seek(size - 4)
        isize = int.from_bytes(f.read(4), "little")
    while isize < size:
        isize += 1 << 32
    return isize


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
    """Every file matched by the glob patterns, as (URL, size), sorted; an unmatched pattern is an error.

    Full glob syntax (``*``, ``**``, ``?``, ``[abc]``, ``[!abc]``), as fsspec's ``glob``; a pattern that
    names an existing file is that file, even when its name holds ``[`` or ``?``."""
    found: dict[str, int] = {}
    for pattern in patterns:
        fs, path = fsspec.core.url_to_fs(pattern)
        if fs.isfile(path):
            matched = [path]
        elif _GLOB_MAGIC.search(path):
            matched = [p for p in sorted(fs.glob(path)) if fs.isfile(p)]
        else:
            matched = []
        if not matched:
            raise FileNotFoundError(f"input pattern {pattern!r} matches no file")
        for p in matched:
            url = p if is_local_fs(fs) else fs.unstrip_protocol(p)
            found[url] = int(fs.size(p))
    return sorted(found.items())


def is_local_fs(fs) -> bool:
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    return "file" in protocols or "local" in protocols


def stamp_file(path: str) -> FileStamp:
    """The file's size and fsspec checksum, read fresh (object-store listings are cached)."""
    fs, p = fsspec.core.url_to_fs(path)
    fs.invalidate_cache(p)
    return FileStamp(size=int(fs.info(p)["size"]), checksum=str(fs.checksum(p)))


def check_unchanged(piece: Piece, when: str) -> None:
    """Raise :class:`InputChangedError` naming the file when it no longer matches its planning stamp."""
    if piece.stamp is None:
        return
    try:
        now = stamp_file(piece.path)
    except FileNotFoundError as err:
        raise InputChangedError(_changed_message(piece, "it was deleted or moved", when)) from err
    if now != piece.stamp:
        what = (f"its size went from {piece.stamp.size} to {now.size} bytes" if now.size != piece.stamp.size
                else "it was rewritten (same size, new modification time or checksum)")
        raise InputChangedError(_changed_message(piece, what, when))


def _changed_message(piece: Piece, what: str, when: str) -> str:
    return (f"input {piece.path} changed during the run: {what}, found {when} {piece.describe()}. The passes "
            "over it would see different records, so the run stops and nothing is published. Run again once "
            "the file is complete (write corpus files under a temporary name and rename them into place).")


def plan_pieces(path: str, size: int, opts: ReadOptions, piece_bytes: Optional[int] = None) -> list[Piece]:
    """Split one file into about ``size / piece_bytes`` (default ``opts.split_bytes``) equal pieces:
    byte ranges of uncompressed text, ranges of the decompressed stream of gzip/bz2/xz text (the last
    one reads to the end), row-group ranges for Parquet. Every piece carries the file's stamp; ``size``
    (from matching) must still be the file's size."""
    target = max(1, piece_bytes or opts.split_bytes)
    fmt, compression = detect_format(path, opts.format)
    try:
        stamp = stamp_file(path)
    except FileNotFoundError as err:
        raise InputChangedError(f"input {path} was deleted or moved after its pattern was matched") from err
    if stamp.size != size:
        raise InputChangedError(f"input {path} changed after its pattern was matched: {size} bytes then, "
                                f"{stamp.size} now. Run again once the file is complete.")
    if size == 0:  # an empty file: no records (the summary names it), whatever its format or codec
        return [Piece(path, fmt, compression, 0, 0, size, stamp)]
    if fmt == "parquet":
        num_row_groups, group_bytes = _parquet_row_groups(path, compression)
        pieces, first, acc = [], 0, 0
        for rg in range(num_row_groups):
            acc += group_bytes[rg]
            if acc >= target:
                pieces.append(Piece(path, fmt, compression, first, rg + 1, size, stamp))
                first, acc = rg + 1, 0
        if first < num_row_groups or not pieces:
            pieces.append(Piece(path, fmt, compression, first, num_row_groups, size, stamp))
        return pieces
    n = max(1, round(size / target))
    if compression is not None:
        if n == 1 or compression not in _SEEKABLE_CODECS:
            return [Piece(path, fmt, compression, 0, TO_END, size, stamp)]
        step = -(-decompressed_size_estimate(path, size, compression) // n)
        return [Piece(path, fmt, compression, i * step, (i + 1) * step if i < n - 1 else TO_END, size, stamp)
                for i in range(n)]
    step = -(-size // n)
    return [Piece(path, fmt, None, s, min(s + step, size), size, stamp) for s in range(0, size, step)]


def _zstd_size_estimate(path: str, size: int) -> int:
    import zstandard

    try:
        with fsspec.open(path, "rb") as f:
            head = f.read(18)
        content = zstandard.frame_content_size(head)
    except Exception:  # noqa: BLE001 - no header to read: the generic estimate
        return 3 * size
    return content if content > 0 else 3 * size


def _parquet_row_groups(path: str, compression: Optional[str]) -> tuple[int, list[int]]:
    import pyarrow.parquet as pq

    try:
        with fsspec.open(path, "rb", compression=compression) as f:
            meta = pq.ParquetFile(f).metadata
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError without the file's name
        raise CorpusError(f"cannot read {path} as Parquet (its footer, at the end of the file): {err}. "
                          "Replace the file, leave it out of --input, or pass --format if it is not "
                          "Parquet.") from err
    return meta.num_row_groups, [meta.row_group(rg).total_byte_size for rg in range(meta.num_row_groups)]


# ---------------------------------------------------------------------------------------------------
# Reading a piece: yields Passage or Rejected, streaming (one record in memory at a time).

Record = Union[Passage, Rejected]


def read_piece(piece: Piece, opts: ReadOptions) -> Iterator[Record]:
    """Every record the piece owns, in file order. Raises :class:`CorpusError` (naming the file and the
    position) when the file cannot be read, and :class:`InputChangedError` when it no longer matches the
    stamp it was planned with, checked before the first record and after the last."""
    check_unchanged(piece, "before reading")
    if piece.file_size == 0:
        return
    if piece.format == "parquet":
        yield from _read_parquet_piece(piece, opts)
    else:
        yield from _read_text_piece(piece, opts)
    check_unchanged(piece, "after reading")


def _iter_lines(piece: Piece) -> Iterator[tuple[int, Optional[int], bytes]]:
    """(byte offset, 1-based line number or None, raw line) for the lines this piece owns. A UTF-8 BOM at
    the start of the file is not part of the first line (its offset is then 3)."""
    pos, line_no = piece.start, (1 if piece.start == 0 else None)
    try:
        with open_compressed(piece.path, piece.compression) as f:
            if piece.start > 0:
                f.seek(piece.start - 1)
                if f.read(1) != b"\n":  # mid-line: that line belongs to the previous piece
                    pos += len(f.readline())
            while pos < piece.end:
                line = f.readline()
                if not line:
                    break
                if pos == 0:
                    if line.startswith(_UTF16_BOMS):
                        raise CorpusError(
                            f"{piece.path} starts with a UTF-16/UTF-32 byte-order mark; densebeam reads UTF-8 "
                            "text only. Convert it (iconv -f UTF-16 -t UTF-8) or leave it out of --input.")
                    if line.startswith(_UTF8_BOM):  # an encoding signature, not part of the record
                        line, pos = line[len(_UTF8_BOM):], len(_UTF8_BOM)
                yield pos, line_no, line
                pos += len(line)
                if line_no is not None:
                    line_no += 1
    except CorpusError:
        raise
    except Exception as err:  # OSError, EOFError, zlib/lzma/zstd errors: none of them names the file
        raise CorpusError(_unreadable(piece, pos, line_no, err)) from err


def read_head(path: str, compression: Optional[str], size: int, limit: int) -> bytes:
    """The first ``limit`` decompressed bytes of a text file. A file that cannot be read raises the
    :class:`CorpusError` the read pass would raise (the file, the line and the check command)."""
    head = bytearray()
    try:
        with open_compressed(path, compression) as f:
            while len(head) < limit:  # small reads: a failing read loses what it had decompressed
                chunk = f.read(min(1 << 10, limit - len(head)))
                if not chunk:
                    break
                head += chunk
    except Exception as err:  # noqa: BLE001 - named as the read pass names it: the line it stopped in
        piece = Piece(path, "jsonl", compression, 0, TO_END, size)
        raise CorpusError(_unreadable(piece, head.rfind(b"\n") + 1, head.count(b"\n") + 1, err)) from err
    return bytes(head)


def _unreadable(piece: Piece, pos: int, line_no: Optional[int], err: Exception) -> str:
    if piece.compression is None:
        where = f"at byte offset {pos}" + (f" (line {line_no})" if line_no is not None else "")
        advice = "Check that the file is readable, then run again, or leave it out of --input."
    else:
        where = (f"at line {line_no} (byte {pos} of the decompressed data)" if line_no is not None
                 else f"at byte {pos} of the decompressed data")
        advice = (f"The file is truncated or is not {piece.compression} data (check it with "
                  f"`{_CHECK_TOOL.get(piece.compression, 'the decompressor')} FILE`): replace it or leave "
                  "it out of --input.")
    return f"cannot read {piece.path} {where}: {type(err).__name__}: {err}. {advice}"


def _reject(reason, detail, piece, pos, line_no, raw=None, id=None) -> Rejected:
    if isinstance(raw, bytes):
        raw = raw[: _RAW_CHARS * 4].decode("utf-8", errors="replace")
    if raw is not None:
        raw = _printable_utf8(raw[:_RAW_CHARS])
    return Rejected(reason=reason, detail=detail, source_file=piece.path, source_pos=pos,
                    line=line_no, id=None if id is None else _printable_utf8(id), raw=raw)


def _printable_utf8(s: str) -> str:
    """``s`` with unpaired surrogates escaped (``\\ud800``), so the dead-letter file can be written."""
    return s if not _has_surrogates(s) else s.encode("utf-8", "backslashreplace").decode("utf-8")


def _line_body(raw: bytes) -> bytes:
    """The line without its terminator: one ``\\n`` and one ``\\r`` before it, nothing else."""
    body = raw[:-1] if raw.endswith(b"\n") else raw
    return body[:-1] if body.endswith(b"\r") else body


def _read_text_piece(piece: Piece, opts: ReadOptions) -> Iterator[Record]:
    parse = _parse_json_record if piece.format == "jsonl" else _parse_tsv_record
    for pos, line_no, raw in _iter_lines(piece):
        body = _line_body(raw)
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


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list) -> dict:
    """object_pairs_hook: a JSON object naming a key twice is refused (json.loads keeps the last value)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


class _MinusZero:
    """The JSON integer ``-0``: as an id it would read back as "0", another id than the input's."""

    def __repr__(self) -> str:
        return "-0"


_MINUS_ZERO = _MinusZero()


def _json_int(literal: str):
    return _MINUS_ZERO if literal == "-0" else int(literal)


def _kind(value) -> str:
    """A JSON value's kind, for messages."""
    return "the integer -0" if value is _MINUS_ZERO else type(value).__name__


def _parse_json_record(line: str, opts: ReadOptions):
    try:
        obj = json.loads(line, object_pairs_hook=_unique_keys, parse_int=_json_int)
    except _DuplicateKey as err:
        return ("__error__", "duplicate_key",
                f"a JSON object names the key {_printable_utf8(str(err))!r} more than once")
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


# The id policy. Ids are kept and compared byte for byte: no Unicode normalization, no case folding, no
# trimming. So an id may not hold characters that are invisible or change how the text around them is
# displayed (two ids that look alike would differ): Unicode categories Cc (controls), Cf (format: zero
# width space and joiners, BOM, soft hyphen, bidirectional marks, embeddings, overrides and isolates, tag
# characters), Cs (unpaired surrogates), Zs/Zl/Zp (every space, NBSP included, and the line and paragraph
# separators); the other Default_Ignorable_Code_Point characters (Hangul fillers, variation selectors,
# combining grapheme joiner, ...); and noncharacters (U+FDD0..U+FDEF, U+xxFFFE/U+xxFFFF).
_ID_CATEGORIES = {"Cc": "control character", "Cf": "invisible format character", "Cs": "unpaired surrogate",
                  "Zs": "space", "Zl": "line separator", "Zp": "paragraph separator"}
_IGNORABLE_RANGES = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F),
                     (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0),
                     (0xFFF0, 0xFFF8), (0xE0000, 0xE0FFF))


def id_problem(doc_id: str) -> Optional[str]:
    """Why ``doc_id`` is not a valid id (the first offending character, named), or None if it is."""
    if doc_id.isascii():  # the common case, checked in C: printable ASCII other than space
        if doc_id.isprintable() and " " not in doc_id:
            return None
        return _describe_char(doc_id, next(i for i, c in enumerate(doc_id) if not "!" <= c <= "~"),
                              "control character")
    for i, c in enumerate(doc_id):
        cp = ord(c)
        kind = _ID_CATEGORIES.get(unicodedata.category(c))
        if kind is None and (c.isspace() or any(lo <= cp <= hi for lo, hi in _IGNORABLE_RANGES)):
            kind = "invisible character"
        if kind is None and (0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE):
            kind = "noncharacter"
        if kind is not None:
            return _describe_char(doc_id, i, kind)
    return None


def _describe_char(doc_id: str, i: int, kind: str) -> str:
    c = doc_id[i]
    if c == " ":
        kind = "space"
    name = unicodedata.name(c, "") if not _has_surrogates(c) else ""
    return (f"id holds {kind} U+{ord(c):04X}{' ' + name if name else ''} at character {i}: ids are kept byte "
            "for byte, so they may not hold whitespace, control, bidirectional or invisible characters")


def _validate(fields, opts: ReadOptions, piece: Piece, pos: int, line_no: Optional[int], raw) -> Record:
    """Apply the record rules to (id, text, title); returns a Passage or a Rejected with the reason."""
    doc_id, text, title = fields
    for name, value in (("id", doc_id), ("text", text), ("title", title)):
        if isinstance(value, _Undecodable):
            return _reject("undecodable_bytes", f"the {name} value is not UTF-8: {value.error}", piece, pos,
                           line_no, raw)
    if doc_id is _MINUS_ZERO:
        return _reject("invalid_id", 'id is the JSON integer -0, which would read back as the id "0"; write it '
                       'as the string "-0"', piece, pos, line_no, raw)
    if isinstance(doc_id, bool) or (doc_id is not None and not isinstance(doc_id, (str, int))):
        return _reject("invalid_id", f"id must be a string or integer, got {_kind(doc_id)}",
                       piece, pos, line_no, raw)
    if doc_id is None or (isinstance(doc_id, str) and not doc_id.strip()):
        return _reject("missing_id", "id is missing or empty", piece, pos, line_no, raw)
    doc_id = str(doc_id)
    if len(doc_id.encode("utf-8", errors="surrogatepass")) > opts.max_id_bytes:
        return _reject("id_too_long", f"id is longer than {opts.max_id_bytes} bytes", piece, pos, line_no, raw)
    problem = id_problem(doc_id)
    if problem is not None:
        return _reject("invalid_id", problem, piece, pos, line_no, raw, id=doc_id)
    if text is None:
        return _reject("missing_text", "text is missing", piece, pos, line_no, raw, id=doc_id)
    if not isinstance(text, str):
        return _reject("invalid_text", f"text must be a string, got {_kind(text)}", piece, pos,
                       line_no, raw, id=doc_id)
    title_counts = opts.join_title and isinstance(title, str) and bool(title.strip())
    if not text.strip() and not title_counts:
        detail = "text is empty" + (" and so is the title" if opts.join_title else " (titles are not joined)")
        return _reject("empty_text", detail, piece, pos, line_no, raw, id=doc_id)
    if len(text.encode("utf-8", errors="surrogatepass")) > opts.max_text_bytes:
        return _reject("text_too_long", f"text is longer than {opts.max_text_bytes} bytes", piece, pos,
                       line_no, raw, id=doc_id)
    if title is not None and not isinstance(title, str):
        return _reject("invalid_title", f"title must be a string, got {_kind(title)}", piece, pos,
                       line_no, raw, id=doc_id)
    if _has_surrogates(text) or (title and _has_surrogates(title)):
        return _reject("undecodable_bytes", "text holds unpaired UTF-16 surrogates", piece, pos, line_no,
                       raw, id=doc_id)
    return Passage(id=doc_id, text=text, title=title or "", source_file=piece.path, source_pos=pos,
                   piece_start=piece.start, line=line_no)


def _has_surrogates(s: str) -> bool:
    try:
        s.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


# Parquet ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Undecodable:
    """A Parquet string value whose bytes are not UTF-8 (Arrow does not check on read)."""

    error: str


def _column_values(table, name: str) -> list:
    """A column's values; string columns are decoded here, value by value, so one value that is not
    UTF-8 becomes an ``undecodable_bytes`` dead letter instead of failing the whole row group."""
    import pyarrow as pa

    col = table.column(name)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        out = []
        for b in col.cast(pa.large_binary()).to_pylist():
            try:
                out.append(None if b is None else b.decode("utf-8"))
            except UnicodeDecodeError as err:
                out.append(_Undecodable(str(err)))
        return out
    return col.to_pylist()


def _read_parquet_piece(piece: Piece, opts: ReadOptions) -> Iterator[Record]:
    for row, doc_id, text, title in _parquet_rows(piece, opts):
        raw = json.dumps({"id": repr(doc_id)[:80], "text": repr(text)[:_RAW_CHARS]})
        yield _validate((doc_id, text, title), opts, piece, row, None, raw)


def _parquet_rows(piece: Piece, opts: ReadOptions) -> Iterator[tuple]:
    """(row number, id, text, title) of the piece's rows, one row group in memory at a time."""
    import pyarrow.parquet as pq

    row, rg = 0, piece.start
    try:
        with fsspec.open(piece.path, "rb", compression=piece.compression) as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            wanted = [opts.id_field, opts.text_field]
            missing = [c for c in wanted if c not in names]
            if missing:
                raise CorpusError(f"{piece.path}: Parquet file has no column(s) {missing}; it has "
                                  f"{sorted(names)}. Set --id-field/--text-field to the right column names.")
            has_title = bool(opts.title_field) and opts.title_field in names
            columns = wanted + ([opts.title_field] if has_title else [])
            row = sum(pf.metadata.row_group(g).num_rows for g in range(piece.start))
            for rg in range(piece.start, piece.end):
                table = pf.read_row_group(rg, columns=columns)
                ids = _column_values(table, opts.id_field)
                texts = _column_values(table, opts.text_field)
                titles = _column_values(table, opts.title_field) if has_title else [None] * len(ids)
                for doc_id, text, title in zip(ids, texts, titles):
                    yield row, doc_id, text, title
                    row += 1
    except CorpusError:
        raise
    except Exception as err:  # pyarrow's errors do not name the file
        raise CorpusError(f"cannot read {piece.path} at row group {rg} (row {row}): {type(err).__name__}: "
                          f"{err}. Replace the file or leave it out of --input.") from err


_QRELS_HINT = (" (it looks like relevance judgments: is it the qrels file? give it to --qrels and the queries "
               "to --queries)")


def _judgment_like(line: str) -> bool:
    """A BEIR qrels line (``qid<TAB>docid<TAB>grade``) or a TREC one (``qid 0 docid grade``)."""
    cells = line.split("\t") if "\t" in line else line.split()
    grade = cells[-1].strip().lstrip("-").isdigit()
    return grade and (len(cells) == 3 and "\t" in line or len(cells) == 4 and cells[1] in ("0", "Q0"))


def read_queries(path: str) -> dict[str, str]:
    """``{qid: text}`` in file order from BEIR JSONL or ``qid<TAB>text`` TSV (chosen by the first line)."""
    out: dict[str, str] = {}
    with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
        jsonl = None
        for n, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if jsonl is None:
                jsonl = line.lstrip().startswith("{")
                if not jsonl and [c.strip().lower() for c in line.split("\t")[:2]] == ["query-id", "corpus-id"]:
                    raise ValueError(f"{path} line {n}: a qrels header, not a query" + _QRELS_HINT)
            try:
                if jsonl:
                    rec = json.loads(line)
                    qid, text = str(rec.get("_id", rec.get("id"))), rec["text"]
                    if qid == "None":
                        raise KeyError("_id")
                else:
                    qid, text = line.split("\t", 1)
            except (ValueError, KeyError) as err:
                hint = _QRELS_HINT if _judgment_like(line) else ""
                raise ValueError(f"{path} line {n}: not a BEIR query ({{\"_id\", \"text\"}}) or a "
                                 f"qid<TAB>text line ({err!r}){hint}") from err
            if qid in out:
                raise ValueError(f"{path} line {n}: query id {qid!r} appears twice"
                                 + (_QRELS_HINT if _judgment_like(line) else ""))
            out[qid] = text
    return out
