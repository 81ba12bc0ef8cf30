"""Small filesystem helpers shared by the FAISS, docstore and bundle modules. No Beam import.

FAISS and Arrow memory maps need real local files, while densebeam artifacts live at any fsspec URL.
The helpers here keep the two worlds apart: writers produce a local file under a temporary name and then
either ``os.replace`` it into place (local) or upload it (remote object stores publish a whole object
at once, and the bundle's ``manifest.json`` is the commit point anyway); readers of remote files copy
them into a local cache directory first.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from typing import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

CHUNK_BYTES = 1 << 20  # streaming copies and hashes use 1 MiB of memory


def cache_root() -> str:
    """``$DENSEBEAM_CACHE_DIR`` or ``~/.cache/densebeam``: where remote artifacts are copied to be opened."""
    return os.environ.get("DENSEBEAM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                 "densebeam")


def split_url(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and the path inside it for a local path or URL."""
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def is_local(url: str) -> bool:
    """True for plain paths and ``file://`` URLs (files FAISS and ``pa.memory_map`` can open directly)."""
    fs, _ = split_url(url)
    return isinstance(fs, LocalFileSystem)


def canonical_url(url: str) -> str:
    """An absolute path for a local path (a relative one means nothing to a reader started elsewhere),
    the URL unchanged otherwise: what manifests record."""
    return local_path(url) if is_local(url) else url


def local_path(url: str) -> str:
    """The OS path of a local path or ``file://`` URL; ValueError for remote URLs."""
    fs, path = split_url(url)
    if not isinstance(fs, LocalFileSystem):
        raise ValueError(f"{url} is not a local path; copy it locally first (fetch_to_cache)")
    return path


def temp_name(path: str) -> str:
    """A sibling temporary name: same directory (so ``os.replace`` is atomic), never matches a shard glob."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.tmp-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def atomic_local_output(url: str) -> Iterator[str]:
    """Yield a local file name to write; on success publish it at ``url``, on error remove it.

    Local targets: the file is written beside the target and renamed into place (readers never see a
    half-written file). Remote targets: written in a local temp dir, then uploaded (needs local disk for
    one file).
    """
    if is_local(url):
        final = local_path(url)
        os.makedirs(os.path.dirname(final) or ".", exist_ok=True)
        tmp = temp_name(final)
        try:
            yield tmp
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    fs, path = split_url(url)
    with tempfile.TemporaryDirectory(prefix="densebeam-up-") as tmpdir:
        tmp = os.path.join(tmpdir, os.path.basename(path) or "file")
        yield tmp
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
        fs.put_file(tmp, path)


def copy_to_local(url: str, dest: str) -> None:
    """Stream ``url`` to the local file ``dest`` (temp name + rename; memory one chunk)."""
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    tmp = temp_name(dest)
    try:
        with fsspec.open(url, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out, CHUNK_BYTES)
        os.replace(tmp, dest)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{url} does not exist; check the path or rebuild the artifact") from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def fetch_to_cache(url: str, kind: str = "files") -> str:
    """A local path holding the content of ``url``: the path itself when local, else a cached copy.

    The cache key is the URL plus the remote size and modification stamp/ETag when the filesystem
    reports them, so a rewritten remote file is downloaded again. Costs one full download per change.
    """
    if is_local(url):
        return local_path(url)
    fs, path = split_url(url)
    try:
        info = fs.info(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{url} does not exist; check the URL") from err
    stamp = "|".join(str(info.get(k, "")) for k in ("size", "ETag", "etag", "mtime", "LastModified",
                                                     "updated", "created"))
    key = hashlib.sha256(f"{url}|{stamp}".encode()).hexdigest()[:32]
    dest = os.path.join(cache_root(), kind, key, os.path.basename(path.rstrip("/")) or "file")
    if not os.path.exists(dest):
        copy_to_local(url, dest)
    return dest


def sha256_file(url: str) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a local or remote file, streamed in 1 MiB chunks."""
    h = hashlib.sha256()
    size = 0
    with fsspec.open(url, "rb") as f:
        while True:
            chunk = f.read(CHUNK_BYTES)
            if not chunk:
                break
            size += len(chunk)
            h.update(chunk)
    return size, h.hexdigest()
