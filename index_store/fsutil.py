"""Small filesystem helpers shared by the FAISS, docstore and bundle modules. No Beam import.

FAISS and Arrow memory maps need real local files, while densebeam artifacts live at any fsspec URL.
The helpers here keep the two worlds apart: writers produce a local file under a temporary name and then
either ``os.replace`` it into place (local) or upload it (remote object stores publish a whole object
at once, and the bundle's ``manifest.json`` is the commit point anyway); readers of remote files copy
them into a local cache directory first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import mmap
import os
import shutil
import stat
import tempfile
import uuid
from typing import Iterator, Optional

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


@dataclasses.dataclass(frozen=True)
class FileIdentity:
    """What tells one file version from another without reading it: device, inode, size, mtime."""

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> "FileIdentity":
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


_PROC_FD = "/proc/self/fd"
_SPARE_DESCRIPTORS = 256


def ensure_open_files(n: int) -> None:
    """Make room for ``n`` more open descriptors: raise the soft limit (``ulimit -n``) up to the hard
    limit when it is too low, or raise OSError saying what to do. A bundle with many shards holds one
    descriptor per file while it is opened."""
    try:
        import resource
    except ImportError:  # not a Unix: nothing to adjust
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(_PROC_FD)) if os.path.isdir(_PROC_FD) else 0
    need = in_use + n + _SPARE_DESCRIPTORS
    if soft == resource.RLIM_INFINITY or need <= soft:
        return
    if hard != resource.RLIM_INFINITY and need > hard:
        raise OSError(f"opening {n} files needs about {need} open descriptors but the hard limit is {hard}; "
                      "raise it (ulimit -Hn) or merge the bundle (--layout merged)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


class PinnedFile:
    """A local regular file held open by descriptor, so that what is hashed, parsed and then opened by
    FAISS or Arrow is one and the same file.

    :attr:`use_path` names the open descriptor (``/proc/self/fd/N`` on Linux: opening it opens the very
    file that was pinned, whatever happens to its name meanwhile; elsewhere the path itself, and
    :meth:`check_unchanged` then also compares the path's identity). Close it once the file is mapped.
    """

    def __init__(self, path: str, name: Optional[str] = None):
        self.path, self.name = path, name or path
        # O_NONBLOCK: opening a FIFO planted in place of a file must not hang.
        self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        st = os.fstat(self.fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(self.fd)
            raise ValueError(f"{self.name} is not a regular file; refusing to open it")
        self.identity = FileIdentity.of(st)
        proc = os.path.join(_PROC_FD, str(self.fd))
        self.via_descriptor = os.path.exists(proc)
        self.use_path = proc if self.via_descriptor else path

    @property
    def size(self) -> int:
        return self.identity.size

    def real_path(self) -> str:
        """Where the open file really lies (the kernel's answer on Linux; ``realpath`` elsewhere)."""
        return os.readlink(self.use_path) if self.via_descriptor else os.path.realpath(self.path)

    def sha256(self) -> str:
        """sha256 of the file's content read through the descriptor (1 MiB of memory); the file must
        not change while it is read."""
        h = hashlib.sha256()
        with open(os.dup(self.fd), "rb", buffering=0, closefd=True) as f:
            f.seek(0)
            while True:
                chunk = f.read(CHUNK_BYTES)
                if not chunk:
                    break
                h.update(chunk)
        self.check_unchanged()
        return h.hexdigest()

    def map(self) -> "mmap.mmap | bytes":
        """A read-only memory map of the whole file (``b""`` when it is empty)."""
        if self.size == 0:
            return b""
        return mmap.mmap(self.fd, self.size, access=mmap.ACCESS_READ)

    def check_unchanged(self) -> None:
        """Raise ValueError when the file changed since it was pinned (written in place, or, when it is
        not used through its descriptor, replaced under its name)."""
        now = FileIdentity.of(os.fstat(self.fd))
        if now == self.identity and not self.via_descriptor:
            try:
                now = FileIdentity.of(os.stat(self.path))
            except FileNotFoundError:
                now = None
        if now != self.identity:
            raise ValueError(f"{self.name} changed while it was being opened; open it again once the "
                             "writer has finished")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "PinnedFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
