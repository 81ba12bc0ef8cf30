"""The index bundle: a directory (local or any fsspec URL) whose ``manifest.json`` is the commit point.

Layout (relative names from :func:`layout_paths`)::

    manifest.json                          written last; lists every other file with size and sha256
    trained.faiss                          the empty trained index every shard was filled from
    shards/shard-00000-of-00004.faiss      layout "shards": one filled IVF index per shard
    index.faiss + index.ivfdata            layout "merged": one on-disk index, memory-mapped
    docstore/part-00000-of-00004.arrow     row id -> (id, text, title), see :mod:`index_store.docstore`

Nothing is unpickled: the manifest is JSON, indexes are FAISS files, the docstore is Arrow. No Beam.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from typing import Optional

import fsspec

from densebeam.index_store import fsutil
from densebeam.index_store.docstore import PART_PATTERN, Docstore
from densebeam.index_store.embeddings import join
from densebeam.index_store.ivf import ShardedSearcher, open_merged, read_index
from densebeam.index_store.types import ModelFacts

MANIFEST = "manifest.json"
FORMAT = "densebeam.index"
FORMAT_VERSION = 1
LAYOUTS = ("merged", "shards")
VERIFY_MODES = ("full", "sizes", "none")
_RESERVED = ("format", "format_version", "files")


class BundleError(ValueError):
    """A bundle that is incomplete, altered, unsafe or from a newer densebeam."""


@dataclasses.dataclass(frozen=True)
class BundleLayout:
    """Relative file names of a bundle with ``n_shards`` shards (the pipeline writes these)."""

    manifest: str
    trained: str
    shards: list[str]
    docstore: list[str]
    merged_index: str
    merged_ivfdata: str


def layout_paths(n_shards: int) -> BundleLayout:
    if n_shards < 1:
        raise ValueError(f"a bundle needs at least one shard, got {n_shards}")
    return BundleLayout(
        manifest=MANIFEST, trained="trained.faiss",
        shards=[f"shards/shard-{i:05d}-of-{n_shards:05d}.faiss" for i in range(n_shards)],
        docstore=["docstore/" + PART_PATTERN.format(index=i, count=n_shards) for i in range(n_shards)],
        merged_index="index.faiss", merged_ivfdata="index.ivfdata")


def _check_relpath(path: object, where: str) -> str:
    """Refuse names that could escape the bundle: absolute, drive/scheme, backslash, '.', '..'."""
    if (not isinstance(path, str) or not path or path.startswith("/") or "\\" in path or ":" in path
            or any(part in ("", ".", "..") for part in path.split("/"))):
        raise BundleError(f"{where} lists the unsafe path {path!r}; bundle paths must be relative names "
                          "inside the bundle. Refusing to open it: rebuild it or check where it came from")
    return path


def file_entry(root: str, relpath: str) -> dict:
    """``{path, size, sha256}`` of one bundle file (streamed: memory one 1 MiB chunk)."""
    _check_relpath(relpath, "file_entry")
    size, digest = fsutil.sha256_file(join(root, relpath))
    return {"path": relpath, "size": size, "sha256": digest}


def write_manifest(root: str, fields: dict, files: list[str]) -> dict:
    """Hash ``files`` and publish ``manifest.json`` (temp name + rename): the bundle's commit point.

    Call it after every listed file is written. Hashing reads every file once.
    """
    clash = [k for k in _RESERVED if k in fields]
    if clash:
        raise ValueError(f"manifest fields {clash} are set by write_manifest; drop them from fields")
    if MANIFEST in files or len(set(files)) != len(files):
        raise ValueError(f"files must be distinct and must not include {MANIFEST}: {files}")
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **fields,
                "files": [file_entry(root, f) for f in files]}
    with fsutil.atomic_local_output(join(root, MANIFEST)) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2, sort_keys=True)
            f.write("\n")
    return manifest


def _parse_manifest(raw: bytes, where: str) -> dict:
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{where} is not valid JSON ({err}); the bundle is damaged, rebuild it") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{where} is not a densebeam index manifest (format != {FORMAT!r})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise BundleError(f"{where} has format_version {version!r}; this densebeam reads version "
                          f"{FORMAT_VERSION}. Upgrade densebeam (pip install -U densebeam) to open it")
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(e, dict) for e in files):
        raise BundleError(f"{where} has no valid 'files' list; the bundle is damaged, rebuild it")
    seen = set()
    for entry in files:
        path = _check_relpath(entry.get("path"), where)
        if path in seen or path == MANIFEST:
            raise BundleError(f"{where} lists {path!r} twice or lists itself; rebuild the bundle")
        seen.add(path)
    return manifest


def _read_manifest_bytes(root: str) -> bytes:
    path = join(root, MANIFEST)
    try:
        with fsspec.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as err:
        raise BundleError(f"{path} does not exist: not an index bundle, or the build that writes it "
                          "last did not finish; run densebeam index again") from err


def read_manifest(root: str) -> dict:
    """Parse and sanity-check ``manifest.json`` (format, version, safe paths); files are not read.
    A versioned location reads its current version's manifest."""
    from densebeam.index_store import versions

    root = versions.resolve(root)
    return _parse_manifest(_read_manifest_bytes(root), join(root, MANIFEST))


def verify(root: str, manifest: dict, mode: str = "full") -> None:
    """Check every listed file exists with its size (``sizes``) and also its sha256 (``full``).

    ``full`` reads the whole bundle once (disk-bound); ``sizes`` only stats files.
    """
    if mode not in ("full", "sizes"):
        raise ValueError(f"verify mode must be 'full' or 'sizes', got {mode!r}")
    _parse_manifest(json.dumps(manifest).encode(), join(root, MANIFEST))
    for entry in manifest["files"]:
        url = join(root, entry["path"])
        fs, path = fsutil.split_url(url)
        if not fs.exists(path):
            raise BundleError(f"{url} is listed in the manifest but missing; copy the whole bundle "
                              "directory again or rebuild it")
        size = fs.size(path)
        if size != entry["size"]:
            raise BundleError(f"{url} has {size} bytes, the manifest says {entry['size']}: the file was "
                              "altered or truncated; copy the bundle again or rebuild it")
        if mode == "full":
            _, digest = fsutil.sha256_file(url)
            if digest != entry["sha256"]:
                raise BundleError(f"{url} does not match its sha256 in the manifest: the file was altered "
                                  "or corrupted; copy the bundle again or rebuild it")


_verify_files = verify  # open_bundle's ``verify`` argument shadows the function


def _cache_remote(root: str, raw: bytes, manifest: dict, cache_dir: Optional[str]) -> str:
    """Copy a remote bundle to ``<cache>/bundles/<sha256 of manifest>`` once; return the local dir."""
    base = cache_dir or os.path.join(fsutil.cache_root(), "bundles")
    local = os.path.join(base, hashlib.sha256(raw).hexdigest())
    if os.path.exists(os.path.join(local, MANIFEST)):
        return local
    tmp = os.path.join(base, f".tmp-{uuid.uuid4().hex[:12]}")
    try:
        for entry in manifest["files"]:
            fsutil.copy_to_local(join(root, entry["path"]), os.path.join(tmp, *entry["path"].split("/")))
        with open(os.path.join(tmp, MANIFEST), "wb") as f:  # the copy's commit point, written last
            f.write(raw)
        try:
            os.replace(tmp, local)
        except OSError:  # another process cached it first (or a stale partial copy is in the way)
            if not os.path.exists(os.path.join(local, MANIFEST)):
                shutil.rmtree(local, ignore_errors=True)
                os.replace(tmp, local)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return local


@dataclasses.dataclass
class Bundle:
    """An opened bundle: searcher over the FAISS files, docstore, and the manifest's facts."""

    root: str  # local directory actually opened (the cache copy for remote bundles)
    manifest: dict
    searcher: ShardedSearcher
    docstore: Docstore

    @property
    def facts(self) -> ModelFacts:
        return ModelFacts.from_dict(self.manifest["model_facts"])

    @property
    def default_nprobe(self) -> int:
        return int(self.manifest.get("nprobe") or 1)


def open_bundle(root: str, verify: str = "full", cache_dir: Optional[str] = None) -> Bundle:
    """Open a bundle for search: verify it, map its indexes and docstore (remote: cached locally first).

    ``verify="full"`` hashes every file (a full read; safest), ``"sizes"`` only stats them, ``"none"``
    trusts the manifest. Index lists and docstore are memory-mapped, so RAM use is what searches touch.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    from densebeam.index_store import versions  # a versioned location opens its CURRENT version

    root = versions.resolve(root)
    raw = _read_manifest_bytes(root)
    manifest = _parse_manifest(raw, join(root, MANIFEST))
    local = root if fsutil.is_local(root) else _cache_remote(root, raw, manifest, cache_dir)
    local = fsutil.local_path(local)
    if verify != "none":
        _verify_files(local, manifest, verify)
    where = join(root, MANIFEST)
    for key in ("layout", "model_facts"):
        if key not in manifest:
            raise BundleError(f"{where} has no {key!r}; the bundle is incomplete, rebuild it")
    files = [e["path"] for e in manifest["files"]]
    if manifest["layout"] == "merged":
        searcher = ShardedSearcher([open_merged(os.path.join(local, "index.faiss"),
                                                os.path.join(local, "index.ivfdata"))])
    elif manifest["layout"] == "shards":
        shards = sorted(f for f in files if f.startswith("shards/") and f.endswith(".faiss"))
        if not shards:
            raise BundleError(f"{where} has layout 'shards' but lists no shards/*.faiss; rebuild it")
        searcher = ShardedSearcher([read_index(os.path.join(local, f), mmap=True) for f in shards])
    else:
        raise BundleError(f"{where} has layout {manifest['layout']!r}, expected one of {LAYOUTS}")
    parts = sorted(f for f in files if f.startswith("docstore/") and f.endswith(".arrow"))
    docstore = Docstore.open_paths([os.path.join(local, f) for f in parts])
    facts = ModelFacts.from_dict(manifest["model_facts"])
    if facts.dim != searcher.d:
        raise BundleError(f"{where} says dim {facts.dim} but its index has dim {searcher.d}; rebuild it")
    if len(docstore) != searcher.ntotal:
        raise BundleError(f"{where}: the docstore has {len(docstore)} rows but the index holds "
                          f"{searcher.ntotal} vectors; rebuild the bundle")
    return Bundle(root=local, manifest=manifest, searcher=searcher, docstore=docstore)
