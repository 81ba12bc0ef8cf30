"""Structural check of the FAISS files densebeam writes, before FAISS reads them. No Beam import.

FAISS's reader trusts its input: a flipped bit in a list size or offset makes a search read outside the
mapped file (SIGSEGV/SIGBUS), a flipped vector length makes it allocate terabytes. This module parses
the subset of FAISS's binary format that densebeam writes (``faiss/impl/index_read.cpp``): IVF indexes
``IwFl`` (Flat), ``IwSq``/``IwSQ`` (SQ8), ``IwPQ`` (PQ<m>x8) and ``Iwrq`` (1-bit RaBitQ) over a flat (``IxFI``/``IxF2``) or
HNSW-flat (``IHNf``) coarse quantizer, with array (``ilar``, lists inside the file) or on-disk
(``ilod``, lists in a separate ``.ivfdata`` file) inverted lists. Every length is checked against the
bytes that hold it, every list against the file that holds it, and the parse must end exactly at the
end of the file; anything else is refused with a ``ValueError`` naming the file. What FAISS then reads
is a file whose structure is known to be sound.

Cost: the headers, the coarse quantizer (``nlist * d`` floats) and the list table (``nlist`` entries)
are read; list contents are never read here (:func:`list_ids` reads the ids, 8 bytes per vector).
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Iterator

import numpy as np

HEADER_DUMMY = 1 << 20  # FAISS writes this twice in every index header
METRIC_INNER_PRODUCT, METRIC_L2 = 0, 1
MAX_DIM = 1 << 16
MAX_NLIST = 1 << 30
MAX_HNSW_EF = 1 << 16
ID_BYTES = 8
QT_8BIT = 0  # ScalarQuantizer::QT_8bit, what "SQ8" builds
_FLAT_QUANTIZERS = {b"IxFI": METRIC_INNER_PRODUCT, b"IxF2": METRIC_L2}


class FaissFormatError(ValueError):
    """A FAISS file whose structure is not what densebeam writes (corrupt, forged or foreign)."""


@dataclasses.dataclass(frozen=True)
class InvertedLists:
    """Where each inverted list lies: ``offsets[j]`` is the byte offset of list j in the data file (this
    file for ``array`` lists, the ``.ivfdata`` file for ``ondisk`` ones), holding ``capacities[j]``
    codes then ``capacities[j]`` int64 ids, of which the first ``sizes[j]`` are used."""

    kind: str  # "array" or "ondisk"
    sizes: np.ndarray
    capacities: np.ndarray
    offsets: np.ndarray
    data_bytes: int  # "array": where the lists end in this file; "ondisk": the data file's size


@dataclasses.dataclass(frozen=True)
class IvfFile:
    """The parsed structure of one IVF index file (no list contents)."""

    name: str
    kind: str  # fourcc of the IVF index, e.g. "IwFl"
    d: int
    ntotal: int
    nlist: int
    code_size: int
    codec: str  # "Flat", "SQ8", "PQ<m>x8" or "RaBitQ"
    hnsw_quantizer: bool
    quantizer: bytes  # the serialized coarse quantizer: shards of one build hold the same bytes
    codec_params: bytes  # the SQ/PQ trained parameters (empty for Flat)
    lists: InvertedLists


class _Reader:
    """Bounds-checked little-endian reads over a bytes-like object."""

    def __init__(self, buf, name: str):
        self.buf, self.name, self.pos = buf, name, 0

    def fail(self, what: str) -> FaissFormatError:
        return FaissFormatError(f"{self.name} is not a valid densebeam FAISS index: {what} (at byte "
                                f"{self.pos}); the file is corrupt or was not written by densebeam, "
                                "rebuild the bundle")

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"needs {n} more bytes but the file has {len(self.buf) - self.pos} left")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str):
        at = self.take(struct.calcsize("<" + fmt))
        return struct.unpack_from("<" + fmt, self.buf, at)

    def one(self, fmt: str):
        return self.unpack(fmt)[0]

    def fourcc(self) -> bytes:
        return bytes(self.buf[self.take(4):self.pos])

    def vector(self, dtype: str, count: int | None = None, unit: int = 1) -> np.ndarray:
        """A FAISS vector: a uint64 element count (times ``unit``), then the elements."""
        n = self.one("Q")
        item = np.dtype(dtype).itemsize
        if n > (len(self.buf) - self.pos) // (item * unit):
            raise self.fail(f"a vector of {n} elements does not fit in the file")
        n *= unit
        if count is not None and n != count:
            raise self.fail(f"a vector holds {n} elements where {count} are expected")
        return np.frombuffer(self.buf, dtype=np.dtype(dtype).newbyteorder("<"), count=n, offset=self.take(n * item))


def _index_header(r: _Reader, what: str) -> tuple[int, int, int]:
    """(d, ntotal, metric) of FAISS's common index header, checked."""
    d, ntotal, dummy1, dummy2, trained, metric = r.unpack("iqqqBi")
    if not 1 <= d <= MAX_DIM:
        raise r.fail(f"{what} has dimension {d}")
    if ntotal < 0 or dummy1 != HEADER_DUMMY or dummy2 != HEADER_DUMMY or trained != 1:
        raise r.fail(f"{what} has a damaged header (ntotal {ntotal}, trained {trained})")
    if metric not in (METRIC_INNER_PRODUCT, METRIC_L2):
        raise r.fail(f"{what} has metric {metric}")
    return d, ntotal, metric


def _flat(r: _Reader, d: int, ntotal: int, what: str) -> None:
    h = r.fourcc()
    if h not in _FLAT_QUANTIZERS:
        raise r.fail(f"{what} is {h!r}, expected a flat index")
    fd, fn, metric = _index_header(r, what)
    if (fd, fn, metric) != (d, ntotal, _FLAT_QUANTIZERS[h]):
        raise r.fail(f"{what} holds {fn} vectors of dim {fd} (metric {metric}), expected {ntotal} of dim {d}")
    if not np.isfinite(r.vector("f4", count=ntotal * d)).all():
        raise r.fail(f"{what} holds NaN or infinite values")


def _hnsw_flat(r: _Reader, d: int, ntotal: int) -> None:
    """An IndexHNSWFlat coarse quantizer: the graph checked the way FAISS's own validate_HNSW does."""
    hd, hn, _ = _index_header(r, "the HNSW coarse quantizer")
    if (hd, hn) != (d, ntotal):
        raise r.fail(f"the HNSW coarse quantizer holds {hn} vectors of dim {hd}, expected {ntotal} of dim {d}")
    probas = r.vector("f8")
    cum = r.vector("i4").astype(np.int64)
    levels = r.vector("i4", count=ntotal).astype(np.int64)
    offsets = r.vector("u8", count=ntotal + 1)
    neighbors = r.vector("i4")
    entry, max_level, ef_construction, ef_search, _ = r.unpack("iiiii")
    if len(probas) > 64 or len(cum) < 2 or len(cum) > 65 or cum[0] != 0 or np.any(np.diff(cum) < 0):
        raise r.fail("the HNSW level table is damaged")
    if ntotal == 0 or np.any(levels < 1) or np.any(levels >= len(cum)):
        raise r.fail("an HNSW node has an impossible level")
    if offsets[0] != 0 or not np.array_equal(np.diff(offsets.astype(np.int64)), cum[levels]) \
            or offsets[-1] != len(neighbors):
        raise r.fail("the HNSW neighbour offsets are damaged")
    if np.any(neighbors < -1) or np.any(neighbors >= ntotal):
        raise r.fail("an HNSW neighbour id is out of range")
    if not 0 <= entry < ntotal or max_level != levels[entry] - 1 or max_level != levels.max() - 1:
        raise r.fail(f"the HNSW entry point {entry} (level {max_level}) is damaged")
    if not (1 <= ef_construction <= MAX_HNSW_EF and 1 <= ef_search <= MAX_HNSW_EF):
        raise r.fail(f"the HNSW search parameters ({ef_construction}, {ef_search}) are out of range")
    _flat(r, d, ntotal, "the HNSW storage")


def _quantizer(r: _Reader, d: int, nlist: int) -> bool:
    """Parse the coarse quantizer; True when it is an HNSW graph."""
    at = r.pos
    h = r.fourcc()
    if h == b"IHNf":
        _hnsw_flat(r, d, nlist)
        return True
    r.pos = at
    _flat(r, d, nlist, "the coarse quantizer")
    return False


def _codec(r: _Reader, kind: bytes, d: int) -> tuple[str, int]:
    """(codec name, code size) after the IVF header; reads the SQ/PQ parameters."""
    if kind == b"IwFl":
        return "Flat", 4 * d
    if kind in (b"IwSq", b"IwSQ"):
        qtype, _rangestat, _arg, sq_d, sq_code = r.unpack("iifQQ")
        trained = r.vector("f4")
        code_size = r.one("Q")
        residual = 1 if kind == b"IwSQ" else r.one("B")
        if (qtype, sq_d, sq_code, code_size, len(trained)) != (QT_8BIT, d, d, d, 2 * d) or residual > 1:
            raise r.fail(f"the SQ8 parameters are damaged (type {qtype}, dim {sq_d}, code size {code_size})")
        if not np.isfinite(trained).all():
            raise r.fail("the SQ8 ranges hold NaN or infinite values")
        return "SQ8", d
    if kind == b"IwPQ":
        residual, code_size, pq_d, m, nbits = r.unpack("BQQQQ")
        if residual > 1 or pq_d != d or nbits != 8 or m < 1 or d % m or code_size != m:
            raise r.fail(f"the PQ parameters are damaged (M {m}, nbits {nbits}, code size {code_size})")
        if not np.isfinite(r.vector("f4", count=d * 256)).all():
            raise r.fail("the PQ centroids hold NaN or infinite values")
        return f"PQ{m}x8", m
    if kind == b"Iwrq":  # 1-bit RaBitQ: d sign bits plus two float factors per vector
        rq_d, rq_code_size, metric, code_size, residual, qb = r.unpack("QQiQBB")
        want = (d + 7) // 8 + 8
        if (rq_d, rq_code_size, code_size) != (d, want, want) or metric != METRIC_INNER_PRODUCT \
                or residual > 1 or qb > 8:
            raise r.fail(f"the RaBitQ parameters are damaged (dim {rq_d}, code size {code_size}, qb {qb})")
        return "RaBitQ", code_size
    raise r.fail(f"unsupported index type {kind!r} (densebeam writes IwFl, IwSq, IwPQ and Iwrq)")


def _array_lists(r: _Reader, nlist: int, code_size: int) -> InvertedLists:
    list_type = r.fourcc()
    if list_type == b"full":
        sizes = r.vector("u8", count=nlist)
    elif list_type == b"sprs":
        pairs = r.vector("u8")
        if len(pairs) % 2:
            raise r.fail("the sparse list table has an odd length")
        which = pairs[0::2]
        if np.any(which >= nlist) or np.any(which[1:] <= which[:-1]):
            raise r.fail("the sparse list table names lists out of order or out of range")
        sizes = np.zeros(nlist, dtype=np.uint64)
        sizes[which.astype(np.int64)] = pairs[1::2]
    else:
        raise r.fail(f"unknown list table type {list_type!r}")
    entry, room = code_size + ID_BYTES, len(r.buf) - r.pos
    if np.any(sizes > room // entry) or float(np.sum(sizes, dtype=np.float64)) > room // entry:
        raise r.fail("the inverted lists are larger than the file")
    sizes = sizes.astype(np.int64)
    ends = r.pos + np.cumsum(sizes * entry)
    offsets = np.concatenate([[r.pos], ends[:-1]]).astype(np.int64)
    r.take(int(ends[-1]) - r.pos)
    return InvertedLists("array", sizes, sizes, offsets, r.pos)


def _ondisk_lists(r: _Reader, nlist: int, code_size: int) -> InvertedLists:
    if r.unpack("QQ") != (nlist, code_size):
        raise r.fail("the on-disk list table disagrees with the index on nlist or code size")
    table = r.vector("u8", count=3 * nlist, unit=3).reshape(nlist, 3)
    r.vector("u8", unit=2)  # free slots: used by writers only
    if len(r.vector("u1")) > 4096:
        raise r.fail("the data file name is too long")
    totsize = r.one("Q")
    sizes, caps, offsets = (table[:, i] for i in range(3))
    entry = code_size + ID_BYTES
    if totsize >= 1 << 62 or np.any(sizes > caps) or np.any(caps > totsize // entry) or np.any(offsets > totsize):
        raise r.fail("an inverted list's size or capacity is damaged")
    caps, offsets = caps.astype(np.int64), offsets.astype(np.int64)
    ends = offsets + caps * entry
    if np.any(ends > totsize):
        raise r.fail(f"an inverted list ends after the data file's {totsize} bytes")
    used = np.flatnonzero(caps)
    order = used[np.argsort(offsets[used], kind="stable")]
    if np.any(ends[order[:-1]] > offsets[order[1:]]):
        raise r.fail("two inverted lists overlap in the data file")
    return InvertedLists("ondisk", sizes.astype(np.int64), caps, offsets, int(totsize))


def parse_ivf(buf, name: str) -> IvfFile:
    """Parse and check one IVF index file held in ``buf`` (bytes or a memory map); ``name`` is what
    errors call it. Raises :class:`FaissFormatError` for anything but a sound densebeam IVF file."""
    r = _Reader(buf, name)
    kind = r.fourcc()
    if kind not in (b"IwFl", b"IwSq", b"IwSQ", b"IwPQ", b"Iwrq"):
        raise r.fail(f"unsupported index type {kind!r} (densebeam writes IwFl, IwSq, IwPQ and Iwrq)")
    d, ntotal, metric = _index_header(r, "the IVF index")
    nlist, nprobe = r.unpack("QQ")
    if metric != METRIC_INNER_PRODUCT or not 1 <= nlist <= MAX_NLIST or not 1 <= nprobe <= nlist:
        raise r.fail(f"the IVF header is damaged (metric {metric}, nlist {nlist}, nprobe {nprobe})")
    q_start = r.pos
    hnsw = _quantizer(r, d, nlist)
    quantizer = bytes(buf[q_start:r.pos])
    if r.one("B") != 0 or len(r.vector("i8")) != 0:
        raise r.fail("the IVF direct map is not empty (densebeam never writes one)")
    c_start = r.pos
    codec, code_size = _codec(r, kind, d)
    codec_params = bytes(buf[c_start:r.pos])
    lists_kind = r.fourcc()
    if lists_kind == b"ilar":
        if r.unpack("QQ") != (nlist, code_size):
            raise r.fail("the list table disagrees with the index on nlist or code size")
        lists = _array_lists(r, nlist, code_size)
    elif lists_kind == b"ilod":
        lists = _ondisk_lists(r, nlist, code_size)
    else:
        raise r.fail(f"unknown inverted lists {lists_kind!r}")
    if int(lists.sizes.sum()) != ntotal:
        raise r.fail(f"the header says {ntotal} vectors but the lists hold {int(lists.sizes.sum())}")
    if r.pos != len(buf):
        raise r.fail(f"{len(buf) - r.pos} unexpected bytes after the index")
    return IvfFile(name=name, kind=kind.decode("ascii"), d=d, ntotal=ntotal, nlist=nlist,
                   code_size=code_size, codec=codec, hnsw_quantizer=hnsw, quantizer=quantizer,
                   codec_params=codec_params, lists=lists)


def list_ids(ivf: IvfFile, data) -> Iterator[np.ndarray]:
    """The int64 ids of each non-empty inverted list of ``ivf``, read from ``data`` (the bytes of the
    file that holds the lists: the index file itself for array lists, the ``.ivfdata`` file for
    on-disk ones). Reads 8 bytes per vector, nothing of the codes."""
    if len(data) < ivf.lists.data_bytes:
        raise FaissFormatError(f"the lists of {ivf.name} need {ivf.lists.data_bytes} bytes of data but "
                               f"there are {len(data)}; the data file is truncated or from another build")
    lists = ivf.lists
    for j in np.flatnonzero(lists.sizes):
        at = int(lists.offsets[j] + lists.capacities[j] * ivf.code_size)
        yield np.frombuffer(data, dtype="<i8", count=int(lists.sizes[j]), offset=at)
