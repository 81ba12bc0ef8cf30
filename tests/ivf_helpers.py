"""IVF helpers for the tests: a trained index filled in one process, the reference the Beam build's
shard-by-shard adding is compared with."""

from __future__ import annotations

from typing import Iterable

import faiss
import numpy as np

from densebeam.index_store.ivf import index_from_bytes


def add_to_empty(trained: bytes, ids: np.ndarray, vectors: np.ndarray) -> faiss.Index:
    """A filled copy of the trained index holding ``vectors`` under ``ids`` (one batch in memory)."""
    return add_batches(trained, [(ids, vectors)])


def add_batches(trained: bytes, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> faiss.Index:
    """Stream (int64 ids, float32 vectors) batches into a copy of the trained index.

    Memory: the filled index (codes + ids) plus one batch; batch size trades Python overhead for memory.
    """
    index = index_from_bytes(trained)
    if not index.is_trained or index.ntotal != 0:
        raise ValueError("the trained index must be trained and empty; pass the bytes of "
                         "train_empty_index, not a filled shard")
    for ids, vectors in batches:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != index.d:
            raise ValueError(f"vectors must have shape (n, {index.d}), got {vectors.shape}")
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if ids.shape != (vectors.shape[0],):
            raise ValueError(f"got {ids.shape[0] if ids.ndim else ids} ids for {vectors.shape[0]} vectors")
        index.add_with_ids(vectors, ids)
    return index
