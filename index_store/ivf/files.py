"""FAISS indexes as bytes and files: serialization, shard files, the streaming on-disk merge of shards
into one ``OnDiskInvertedLists`` index, and opening it memory-mapped. No Beam import."""

from __future__ import annotations

import errno
import os
from typing import Sequence

import faiss
import numpy as np

from densebeam.index_store import fsutil

ID_BYTES = 8  # every IVF entry stores its int64 id next to its code


def index_to_bytes(index: faiss.Index) -> bytes:
    return faiss.serialize_index(index).tobytes()


def index_from_bytes(b: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(b, dtype=np.uint8))


def write_index(index: faiss.Index, url: str) -> None:
    """Write ``index`` to a local path or fsspec URL (temp name + rename; remote via a local temp)."""
    with fsutil.atomic_local_output(url) as tmp:
        faiss.write_index(index, tmp)


def read_index(url: str, mmap: bool = False) -> faiss.Index:
    """Read an index file; remote URLs are copied to the local cache first.

    ``mmap=True`` maps the inverted lists instead of reading them (RAM stays with the OS page cache,
    first searches are slower); the file must then stay in place while the index is used.
    """
    path = fsutil.fetch_to_cache(url, "faiss")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{url} does not exist; check the path or rebuild the index")
    flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0
    try:
        return faiss.read_index(path, flags)
    except RuntimeError as err:
        raise ValueError(f"{url} is not a readable FAISS index ({err}); rebuild it") from err


def _shard_lists(url: str, ivf: faiss.IndexIVF, centroids: np.ndarray):
    """(local path, list sizes, list byte offsets in the file) of one shard file, checked against the
    trained index. FAISS opens an ArrayInvertedLists file memory-mapped as OnDiskInvertedLists whose
    offsets point into the file; only the offsets are used, the lists are then read with plain reads."""
    path = fsutil.fetch_to_cache(url, "faiss")  # remote shards: fetched once, then read twice locally
    shard = read_index(path, mmap=True)
    sivf = faiss.extract_index_ivf(shard)
    if (sivf.nlist != ivf.nlist or sivf.code_size != ivf.code_size
            or not np.array_equal(sivf.quantizer.reconstruct_n(0, sivf.nlist), centroids)):
        raise ValueError(f"{url} was not filled from this trained index (different lists or codec); "
                         "rebuild the shards from one trained.faiss")
    il = faiss.downcast_InvertedLists(sivf.invlists)
    if not isinstance(il, faiss.OnDiskInvertedLists):
        raise TypeError(f"faiss {faiss.__version__} opened {url} with {type(il).__name__} lists; "
                        "merge_on_disk needs the memory-mapped OnDiskInvertedLists view (keep the shards "
                        "layout with --layout shards)")
    sizes = np.array([il.list_size(j) for j in range(ivf.nlist)], dtype=np.int64)
    offsets = np.array([il.lists.at(j).offset for j in range(ivf.nlist)], dtype=np.int64)
    return path, sizes, offsets


def merge_on_disk(trained: bytes, shard_paths: Sequence[str], out_index: str, out_ivfdata: str,
                  slab_bytes: int = 64 << 20, kernel_copy: bool = True) -> int:
    """Merge the shards' inverted lists into one on-disk index; return the vector count.

    The merged data file has FAISS's ``OnDiskInvertedLists`` layout (per list: its codes, then its
    int64 ids, lists in order; byte-identical to FAISS's ``merge_from_multiple``). Each shard's part of
    each list is copied to its place with ``os.copy_file_range`` (the kernel copies between the files;
    ``kernel_copy=False`` or a filesystem without it: plain reads in slabs of ``slab_bytes`` and
    positional writes). Nothing is memory-mapped, so the process's resident memory stays at one slab
    whatever the corpus size (FAISS's own merge maps the shards and the output, and every touched page
    counts as resident). Disk needs the shards plus the merged data. The index file records only the
    *base name* of ``out_ivfdata``; open it with :func:`open_merged`, which points the lists at the
    real file wherever the pair has been moved.
    """
    if not shard_paths:
        raise ValueError("merge_on_disk needs at least one shard file")
    index = index_from_bytes(trained)
    ivf = faiss.extract_index_ivf(index)
    if index.ntotal != 0:
        raise ValueError("merge_on_disk needs the empty trained index, got a filled one")
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    shards = [_shard_lists(url, ivf, centroids) for url in shard_paths]
    code_size, nlist = ivf.code_size, ivf.nlist
    per_shard = np.array([s[1] for s in shards], dtype=np.int64)  # (shards, nlist) list sizes
    sizes = per_shard.sum(axis=0)
    before = np.cumsum(per_shard, axis=0) - per_shard  # entries of earlier shards in each list
    starts = np.concatenate([[0], np.cumsum(sizes * (code_size + ID_BYTES))]).astype(np.int64)
    totsize = int(starts[-1])
    # Local targets: the data file is built beside its final name and renamed (no copy of a big file).
    with fsutil.atomic_local_output(out_ivfdata) as data_tmp:
        fd = os.open(data_tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, totsize)
            for s, (path, shard_sizes, offsets) in enumerate(shards):
                # Where shard s's part of list j goes: after the earlier shards' codes, then ids.
                codes_at = starts[:-1] + before[s] * code_size
                ids_at = starts[:-1] + sizes * code_size + before[s] * ID_BYTES
                src = os.open(path, os.O_RDONLY)
                try:
                    if not (kernel_copy and _copy_lists(src, fd, path, shard_sizes, offsets, code_size,
                                                        codes_at, ids_at)):
                        for j, codes, ids in _read_lists(src, path, shard_sizes, offsets, code_size,
                                                         slab_bytes):
                            _pwrite_all(fd, codes, int(codes_at[j]))
                            _pwrite_all(fd, ids, int(ids_at[j]))
                finally:
                    os.close(src)
        finally:
            os.close(fd)
        del shards
        invlists = faiss.OnDiskInvertedLists(nlist, code_size, data_tmp)
        table = np.ascontiguousarray(sizes, dtype=np.uint64)  # named: must outlive the raw pointer
        invlists.set_all_lists_sizes(faiss.swig_ptr(table))
        invlists.totsize = totsize
        ntotal = int(sizes.sum())
        index.ntotal = ivf.ntotal = ntotal
        ivf.replace_invlists(invlists, True)
        invlists.this.disown()
        # Stored in the index file: a bare name, so the pair survives being moved or copied.
        invlists.filename = os.path.basename(fsutil.split_url(out_ivfdata)[1])
        with fsutil.atomic_local_output(out_index) as tmp:
            faiss.write_index(index, tmp)
        del index, ivf, invlists
    return ntotal


_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


def _copy_lists(src: int, dst: int, path: str, sizes: np.ndarray, offsets: np.ndarray, code_size: int,
                codes_at: np.ndarray, ids_at: np.ndarray) -> bool:
    """Copy a shard's non-empty lists into place with ``os.copy_file_range``; False when the platform or
    filesystem cannot (the caller then copies through user space: every range is rewritten, so a
    partial attempt does no harm)."""
    if not hasattr(os, "copy_file_range"):
        return False
    try:
        for j in np.flatnonzero(sizes):
            n, at = int(sizes[j]), int(offsets[j])
            _copy_range(src, dst, n * code_size, at, int(codes_at[j]), path)
            _copy_range(src, dst, n * ID_BYTES, at + n * code_size, int(ids_at[j]), path)
    except OSError as err:
        if err.errno in _NO_KERNEL_COPY:
            return False
        raise
    return True


def _copy_range(src: int, dst: int, count: int, src_at: int, dst_at: int, path: str) -> None:
    while count > 0:
        done = os.copy_file_range(src, dst, count, src_at, dst_at)
        if done == 0:
            raise ValueError(f"{path} is truncated (ends before byte {src_at + count}); rebuild the shards")
        count, src_at, dst_at = count - done, src_at + done, dst_at + done


def _read_lists(fd: int, path: str, sizes: np.ndarray, offsets: np.ndarray, code_size: int,
                slab: int = 64 << 20):
    """(list number, codes, ids) of a shard file's non-empty lists, as memoryviews into slabs of about
    ``slab`` bytes read with one positional read each (the lists lie one after the other in the file)."""
    entry = code_size + ID_BYTES
    todo = np.flatnonzero(sizes)
    if np.any(np.diff(offsets[todo]) < 0):
        raise ValueError(f"{path}: inverted lists are not stored in list order; cannot stream-merge it")
    i = 0
    while i < len(todo):
        first, end = i, i + 1  # grow the slab over consecutive lists up to its size
        while end < len(todo) and offsets[todo[end]] + sizes[todo[end]] * entry - offsets[todo[first]] <= slab:
            end += 1
        lo = int(offsets[todo[first]])
        hi = int(offsets[todo[end - 1]] + sizes[todo[end - 1]] * entry)
        data = memoryview(os.pread(fd, hi - lo, lo))
        if len(data) != hi - lo:
            raise ValueError(f"{path} is truncated (lists {todo[first]}..{todo[end - 1]}); rebuild the shards")
        for j in todo[first:end]:
            at, n = int(offsets[j]) - lo, int(sizes[j])
            yield int(j), data[at:at + n * code_size], data[at + n * code_size:at + n * entry]
        i = end


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def open_merged(index_path: str, ivfdata_path: str) -> faiss.Index:
    """Open a merged index with its inverted lists memory-mapped read-only from ``ivfdata_path``.

    The ``.ivfdata`` name stored in the index file is ignored (it is whatever it was at build time);
    the lists are re-pointed at ``ivfdata_path``, so a moved or copied bundle opens. Both must be local.
    """
    index_local, data_local = fsutil.local_path(index_path), fsutil.local_path(ivfdata_path)
    for p in (index_local, data_local):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} does not exist; a merged index needs both index.faiss and "
                                    "index.ivfdata from the same build")
    index = faiss.read_index(index_local, faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
    invlists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    if not isinstance(invlists, faiss.OnDiskInvertedLists):
        raise ValueError(f"{index_path} is not a merged on-disk index; open it with read_index")
    if os.path.getsize(data_local) < invlists.totsize:
        raise ValueError(f"{ivfdata_path} holds {os.path.getsize(data_local)} bytes but {index_path} needs "
                         f"{invlists.totsize}; the data file is truncated or from another build")
    invlists.filename = os.path.abspath(data_local)
    invlists.do_mmap()
    return index
