"""The vectors an index bundle holds, read back from its IVF inverted lists. No Beam import.

Exact search and bi-encoder re-ranking need the stored vectors themselves. They are decoded from the
inverted lists of the bundle's own indexes (``sa_decode``: exact for ``Flat``, the index's own
approximation for ``SQ8``/``PQ``), so they are precisely the vectors IVF search scores, and they are
always there, also for a bundle copied without its embeddings dir. The lists are memory-mapped: reading
them costs page cache, not process memory.

- :meth:`IvfVectors.iter_batches` streams (rows, vectors) list by list, ``batch_rows`` at a time: memory
  is one batch (``batch_rows * dim * 4`` bytes); time is one pass over every code per call.
- :meth:`IvfVectors.get` fetches the vectors of given rows. The first call builds a row -> (index, list,
  offset) table by reading every list's ids once: 8 + 4 + 4 bytes per vector (16 MB per million), kept.
"""

from __future__ import annotations

import threading
from typing import Iterator, Sequence

import faiss
import numpy as np

DEFAULT_BATCH_ROWS = 65536


def _list_arrays(ivf: faiss.IndexIVF, list_no: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, codes (n, code_size)) of one inverted list: zero-copy views of the mapped list."""
    n = ivf.invlists.list_size(list_no)
    if n == 0:
        return np.empty(0, np.int64), np.empty((0, ivf.code_size), np.uint8)
    ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(list_no), n)
    codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(list_no), n * ivf.code_size)
    return ids, codes.reshape(n, ivf.code_size)


def _decode(index: faiss.Index, ivf: faiss.IndexIVF, list_no: int, codes: np.ndarray) -> np.ndarray:
    """Vectors of ``codes`` from list ``list_no``: ``sa_decode`` wants each code behind its list number."""
    prefix_len = ivf.coarse_code_size()
    prefix = np.frombuffer(int(list_no).to_bytes(8, "little")[:prefix_len], dtype=np.uint8)
    sa_codes = np.empty((len(codes), prefix_len + ivf.code_size), dtype=np.uint8)
    sa_codes[:, :prefix_len] = prefix
    sa_codes[:, prefix_len:] = codes
    return np.asarray(index.sa_decode(sa_codes), dtype=np.float32)


class IvfVectors:
    """Read-only access to the vectors stored in one or more IVF indexes (the shards of one bundle)."""

    def __init__(self, indexes: Sequence[faiss.Index]):
        self.indexes = list(indexes)
        self.ivfs = [faiss.extract_index_ivf(index) for index in self.indexes]
        if any(ivf is None for ivf in self.ivfs):
            raise ValueError("IvfVectors needs IVF indexes; this bundle holds a non-IVF index")
        self.d = int(self.indexes[0].d)
        self.ntotal = int(sum(index.ntotal for index in self.indexes))
        self._where = None
        self._lock = threading.Lock()

    def iter_batches(self, batch_rows: int = DEFAULT_BATCH_ROWS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream (int64 rows, float32 vectors) over every list of every index, ~``batch_rows`` at a time."""
        if batch_rows < 1:
            raise ValueError(f"batch_rows must be positive, got {batch_rows}")
        ids_acc, vec_acc, n_acc = [], [], 0
        for index, ivf in zip(self.indexes, self.ivfs):
            for list_no in range(ivf.nlist):
                ids, codes = _list_arrays(ivf, list_no)
                for start in range(0, len(ids), batch_rows):
                    part = slice(start, start + batch_rows)
                    ids_acc.append(np.array(ids[part], dtype=np.int64))
                    vec_acc.append(_decode(index, ivf, list_no, codes[part]))
                    n_acc += len(ids_acc[-1])
                    if n_acc >= batch_rows:
                        yield np.concatenate(ids_acc), np.concatenate(vec_acc)
                        ids_acc, vec_acc, n_acc = [], [], 0
        if n_acc:
            yield np.concatenate(ids_acc), np.concatenate(vec_acc)

    def _locations(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with self._lock:
            if self._where is None:
                which = np.full(self.ntotal, -1, dtype=np.int16)
                lists = np.full(self.ntotal, -1, dtype=np.int32)
                offsets = np.full(self.ntotal, -1, dtype=np.int32)
                for i, ivf in enumerate(self.ivfs):
                    for list_no in range(ivf.nlist):
                        ids, _ = _list_arrays(ivf, list_no)
                        if len(ids) and (ids.min() < 0 or ids.max() >= self.ntotal):
                            raise ValueError(f"list {list_no} of index {i} holds row ids outside "
                                             f"[0, {self.ntotal}); the bundle is inconsistent, rebuild it")
                        which[ids], lists[ids] = i, list_no
                        offsets[ids] = np.arange(len(ids), dtype=np.int32)
                self._where = (which, lists, offsets)
            return self._where

    def get(self, rows: Sequence[int]) -> np.ndarray:
        """float32 (len(rows), d) vectors of the given FAISS rows (first call builds the row table)."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        out = np.empty((len(rows), self.d), dtype=np.float32)
        if not len(rows):
            return out
        if rows.min() < 0 or rows.max() >= self.ntotal:
            raise IndexError(f"row ids must be in [0, {self.ntotal}), got {rows.min()}..{rows.max()}")
        which, lists, offsets = self._locations()
        keys = which[rows].astype(np.int64) << 32 | lists[rows].astype(np.int64)
        for key in np.unique(keys):
            sel = np.nonzero(keys == key)[0]
            i, list_no = int(key >> 32), int(key & 0xFFFFFFFF)
            _, codes = _list_arrays(self.ivfs[i], list_no)
            out[sel] = _decode(self.indexes[i], self.ivfs[i], list_no, codes[offsets[rows[sel]]])
        return out
