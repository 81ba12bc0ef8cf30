"""How many records a corpus holds, estimated at launch without reading it whole (for progress and ETA).

Parquet files say exactly (their metadata). For text files, the first ``sample_bytes`` of the
(decompressed) data give the mean record size; an uncompressed file then holds about ``size / mean``
records, and a gzip file about ``size * ratio / mean``, with the compression ratio measured on the same
sample. Costs a few MiB of reading per sampled file; files beyond ``max_files`` are assumed to look like
the sampled ones. No Beam import.
"""

from __future__ import annotations

import itertools
import logging
import zlib
from typing import Optional, Sequence

import fsspec

log = logging.getLogger(__name__)


def estimate_records(files: Sequence[tuple[str, int]], fmt_of, sample_bytes: int = 4 << 20,
                     max_files: int = 8) -> Optional[int]:
    """Estimated record count of ``files`` ((url, size) pairs); ``fmt_of(url) -> (format, compression)``.
    None when nothing could be sampled (the caller shows progress without a total)."""
    total, bytes_per_record, ratio = 0.0, [], []
    unsampled = 0
    for i, (path, size) in enumerate(files):
        try:
            fmt, compression = fmt_of(path)
            if fmt == "parquet":
                import pyarrow.parquet as pq

                with fsspec.open(path, "rb", compression=compression) as f:
                    total += pq.ParquetFile(f).metadata.num_rows
                continue
            if i >= max_files:
                unsampled += size
                continue
            mean, r = _sample_text(path, compression, sample_bytes)
        except Exception as err:  # noqa: BLE001 - any codec's error: unreadable here, the read pass names it
            log.debug("cannot sample %s for a record estimate: %s", path, err)
            unsampled += size
            continue
        if mean:
            bytes_per_record.append(mean)
            ratio.append(r)
            total += size * r / mean
    if unsampled and bytes_per_record:
        mean = sum(bytes_per_record) / len(bytes_per_record)
        total += unsampled * (sum(ratio) / len(ratio)) / mean
    return int(round(total)) if total else None


def _sample_text(path: str, compression: Optional[str], sample_bytes: int) -> tuple[float, float]:
    """(mean bytes per non-blank line, decompressed/compressed ratio) over the start of the file."""
    if compression == "gzip":
        data, consumed = _gunzip_prefix(path, sample_bytes)
    else:
        from densebeam.index_store.corpus_io import open_compressed

        with open_compressed(path, compression) as f:
            data, consumed = f.read(sample_bytes), None
    lines = [ln for ln in data.split(b"\n")[:-1 if len(data) >= sample_bytes else None] if ln.strip()]
    if not lines:
        return 0.0, 1.0
    mean = sum(len(ln) + 1 for ln in lines) / len(lines)
    if compression is None:
        return mean, 1.0
    return mean, (len(data) / consumed) if consumed else 3.0  # other codecs: assume 3x


def _gunzip_prefix(path: str, sample_bytes: int, chunk: int = 16 << 10) -> tuple[bytes, int]:
    """The first ``sample_bytes`` decompressed bytes and how many compressed bytes produced them."""
    d = zlib.decompressobj(wbits=31)
    out, consumed = bytearray(), 0
    with fsspec.open(path, "rb") as f:
        while len(out) < sample_bytes:
            raw = f.read(chunk)
            if not raw:
                break
            out += d.decompress(raw, sample_bytes - len(out))
            consumed += len(raw) - len(d.unconsumed_tail) - len(d.unused_data)
            if d.unconsumed_tail or d.eof:
                break
    return bytes(out[:sample_bytes]), consumed


def sample_texts(files: Sequence[tuple[str, int]], opts, n: int = 512, max_files: int = 8,
                 join_title: bool = True) -> list[str]:
    """Up to ``n`` passage texts from the start of the first ``max_files`` files (an equal share of
    each), as the encoder sees them: a deterministic sample for measuring ``--precision auto`` once at
    launch. Unreadable files are skipped (the read pass names them)."""
    from densebeam.index_store.types import Passage
    from densebeam.index_store import corpus_io

    chosen = list(files)[:max_files]
    out: list[str] = []
    for i, (path, size) in enumerate(chosen):
        want = (n - len(out)) // (len(chosen) - i)
        if want <= 0:
            continue
        try:
            piece = corpus_io.plan_pieces(path, size, opts, piece_bytes=max(size, 1))[0]
            records = corpus_io.read_piece(piece, opts)
            try:
                passages = (r for r in records if isinstance(r, Passage))
                out += [p.joined_text(join_title) for p in itertools.islice(passages, want)]
            finally:
                records.close()
        except (OSError, ValueError, EOFError, zlib.error, IndexError) as err:
            log.debug("cannot sample %s for the precision measurement: %s", path, err)
    return out
