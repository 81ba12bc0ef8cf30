"""The full-precision vectors of a tiered bundle: one ``.npy`` file per shard (float32, C order, shape
(rows, dim)), rows in FAISS id order from the shard's base. No Beam import.

Plain ``.npy`` so that anyone can read them (``np.load(path, mmap_mode="r")``). densebeam reads the rows
a re-scoring needs with positional reads (``pread``), not through a memory map: a map's page faults
bring in the neighbouring pages too (the kernel's fault-around, 16 pages a fault), which made a
replica's resident memory grow by about 40 KB per row read; a read leaves the file in the page cache,
shared and reclaimable, and the process's resident memory where it was.
"""

from __future__ import annotations

import io
import os
import weakref
from typing import Sequence

import fsspec
import numpy as np

from densebeam.index_store.artifacts.bundle_manifest import REFINE_PATTERN as PATTERN, BundleError
_MAX_HEADER = 4096


def paths(n_shards: int) -> list[str]:
    return [PATTERN.format(index=i, count=n_shards) for i in range(n_shards)]


class NpyWriter:
    """Streams ``rows`` float32 vectors of ``dim`` into one ``.npy`` file at ``url`` (any fsspec URL):
    header first, then the rows as they come; :meth:`close` refuses a count other than ``rows``."""

    def __init__(self, url: str, rows: int, dim: int):
        self.url, self.rows, self.dim, self.written = url, int(rows), int(dim), 0
        self._f = fsspec.open(url, "wb").open()
        np.lib.format.write_array_header_1_0(self._f, {"descr": "<f4", "fortran_order": False,
                                                       "shape": (self.rows, self.dim)})

    def write(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"{self.url}: vectors must have shape (n, {self.dim}), got {vectors.shape}")
        if self.written + len(vectors) > self.rows:
            raise ValueError(f"{self.url}: more than the {self.rows} rows its header announces")
        self._f.write(vectors.tobytes())
        self.written += len(vectors)

    def close(self) -> None:
        self._f.close()
        if self.written != self.rows:
            raise ValueError(f"{self.url}: wrote {self.written} rows, its header announces {self.rows}")

    def abort(self) -> None:
        self._f.close()


def _header(head: bytes, name: str, rows: int, dim: int) -> int:
    """Where the data starts in a ``.npy`` whose first bytes are ``head``; BundleError unless it holds
    float32 C-order (rows, dim)."""
    b = io.BytesIO(head)
    try:
        version = np.lib.format.read_magic(b)
        if version != (1, 0):
            raise ValueError(f"npy format version {version}, densebeam writes 1.0")
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(b, max_header_size=_MAX_HEADER)
    except Exception as err:  # noqa: BLE001 - untrusted header text: numpy's parser raises many kinds
        raise BundleError(f"{name} is not a valid .npy vectors file ({err}); the bundle is damaged, "
                          "rebuild it") from err
    if dtype != np.dtype("<f4") or fortran or shape != (rows, dim):
        raise BundleError(f"{name} holds {dtype} {'Fortran' if fortran else 'C'}-order {shape}, expected float32 "
                          f"C-order ({rows}, {dim}); the bundle is damaged, rebuild it")
    return b.tell()


def _check_size(size: int, offset: int, name: str, rows: int, dim: int) -> None:
    if size != offset + rows * dim * 4:
        raise BundleError(f"{name} has {size} bytes, expected {offset + rows * dim * 4} for ({rows}, {dim}) "
                          "float32; the file is truncated or padded, rebuild the bundle")


class _FileRows:
    """Rows of a local ``.npy`` read with ``pread`` (nothing mapped into the process): the (rows, dim)
    array interface :class:`RawVectors` needs. Owns its descriptor (closed when it is collected)."""

    def __init__(self, fd: int, offset: int, rows: int, dim: int):
        self._fd, self._offset, self.shape = fd, offset, (rows, dim)
        self.nbytes = rows * dim * 4
        weakref.finalize(self, os.close, fd)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        width = self.shape[1] * 4
        if isinstance(rows, slice):  # a range: one read
            start, stop, _ = rows.indices(self.shape[0])
            out = np.empty((max(0, stop - start), self.shape[1]), dtype=np.float32)
            _read_into(self._fd, out, self._offset + start * width)
            return out
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        for i in np.argsort(rows, kind="stable"):
            _read_into(self._fd, out[i:i + 1], self._offset + int(rows[i]) * width)
        return out


def _read_into(fd: int, out: np.ndarray, offset: int) -> None:
    view = memoryview(out).cast("B")
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise OSError(f"short read at byte {offset} of a vectors file: the file changed under the reader")
        view, offset = view[n:], offset + n


def open_local(fd: int, name: str, rows: int, dim: int) -> _FileRows:
    """The (rows, dim) vectors of the local ``.npy`` open on ``fd`` (taken over: closed with the result),
    read with ``pread``; BundleError when the file is not exactly that array."""
    try:
        offset = _header(os.pread(fd, _MAX_HEADER, 0), name, rows, dim)
        _check_size(os.fstat(fd).st_size, offset, name, rows, dim)
    except BaseException:
        os.close(fd)
        raise
    return _FileRows(fd, offset, rows, dim)


class _RemoteRows:
    """Rows of a remote ``.npy`` read on demand (one ranged read per row): the (rows, dim) array
    interface :class:`RawVectors` needs, without copying the file."""

    def __init__(self, f, offset: int, rows: int, dim: int):
        self._f, self._offset, self.shape = f, offset, (rows, dim)
        self.nbytes = rows * dim * 4

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.shape[1]), dtype=np.float32)
        width = self.shape[1] * 4
        for i in np.argsort(rows, kind="stable"):
            self._f.seek(self._offset + int(rows[i]) * width)
            out[i] = np.frombuffer(self._f.read(width), dtype="<f4")
        return out


def open_array(url: str, rows: int, dim: int):
    """The (rows, dim) vectors of the ``.npy`` at ``url``, read row by row (``pread`` when local, ranged
    reads when remote); BundleError when the file is not exactly that array."""
    fs, path = fsspec.core.url_to_fs(url)
    if getattr(fs, "protocol", None) in ("file", ("file", "local")):
        return open_local(os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)), url, rows, dim)
    f = fs.open(path, "rb")
    offset = _header(f.read(_MAX_HEADER), url, rows, dim)
    _check_size(fs.size(path), offset, url, rows, dim)
    return _RemoteRows(f, offset, rows, dim)


class RawVectors:
    """Row lookup over the per-shard arrays: ``get(rows)`` for FAISS ids (shard ``i`` holds ids
    ``bases[i] .. bases[i] + len(arrays[i]) - 1``)."""

    def __init__(self, arrays: Sequence[np.ndarray], bases: Sequence[int]):
        self.arrays = list(arrays)
        self.bases = np.asarray(bases, dtype=np.int64)
        self.ends = self.bases + np.array([len(a) for a in self.arrays], dtype=np.int64)
        self.d = int(self.arrays[0].shape[1])
        self.ntotal = int(self.ends[-1]) if len(self.arrays) else 0

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays))

    def iter_batches(self, batch_rows: int = 65536):
        """(int64 rows, float32 vectors) over every row in order, ``batch_rows`` at a time (the interface
        exact search streams; see :class:`index_store.query.vectors.IvfVectors`)."""
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be positive, got {batch_rows}")
        for base, array in zip(self.bases, self.arrays):
            for a in range(0, len(array), batch_rows):
                part = np.asarray(array[a:a + batch_rows], dtype=np.float32)
                yield np.arange(base + a, base + a + len(part), dtype=np.int64), part

    def get(self, rows: np.ndarray) -> np.ndarray:
        """float32 (len(rows), d) vectors of the FAISS ids ``rows`` (copied out of the maps)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= self.ntotal):
            raise IndexError(f"row ids must be in [0, {self.ntotal}), got {rows.min()}..{rows.max()}")
        out = np.empty((len(rows), self.d), dtype=np.float32)
        shard = np.searchsorted(self.ends, rows, side="right")
        for i in np.unique(shard):
            sel = shard == i
            out[sel] = self.arrays[i][rows[sel] - self.bases[i]]
        return out
