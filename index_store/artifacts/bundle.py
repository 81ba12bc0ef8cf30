"""The index bundle: a directory (local or any fsspec URL) whose ``manifest.json`` is the commit point.

Layout (relative names from :func:`layout_paths`)::

    manifest.json                          written last; lists every other file with size and sha256
    trained.faiss                          the empty trained index every shard was filled from
    shards/shard-00000-of-00004.faiss      layout "shards": one filled IVF index per shard
    index.faiss + index.ivfdata            layout "merged": one on-disk index, memory-mapped
    docstore/part-00000-of-00004.arrow     row id -> (id, text, title), see :mod:`index_store.artifacts.docstore`

Nothing is unpickled: the manifest is JSON, indexes are FAISS files, the docstore is Arrow. The manifest
(names, writing, strict reading) is :mod:`index_store.artifacts.bundle_manifest`; what makes a bundle's content
safe to open, beyond its hashes, is :mod:`index_store.artifacts.validate`. No Beam.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid
from typing import Iterator, Optional

import faiss
import fsspec

from densebeam.index_store import fsutil
from densebeam.index_store.artifacts import signing
from densebeam.index_store.artifacts import validate
# The manifest half lives in bundle_manifest; re-exported so callers need one import.
from densebeam.index_store.artifacts.bundle_manifest import (FORMAT, FORMAT_VERSION, LAYOUTS, MANIFEST,  # noqa: F401
                                                             BundleError, BundleLayout, CurvePoint, FileEntry,
                                                             Manifest, file_entry, is_inside, layout_paths,
                                                             parse_manifest, read_manifest_bytes, write_manifest)
from densebeam.index_store.artifacts.docstore import Docstore
from densebeam.index_store.artifacts.raw_vectors import RawVectors, open_local
from densebeam.index_store.artifacts.embeddings import join
from densebeam.index_store.ivf import ShardedSearcher, open_merged, read_index
from densebeam.index_store.ivf.refine import RefinedSearcher
from densebeam.index_store.types import ModelFacts

VERIFY_MODES = ("full", "sizes", "none")
log = logging.getLogger(__name__)


def read_manifest(root: str) -> dict:
    """Parse and sanity-check ``manifest.json`` (format, version, safe paths); files are not read.
    A versioned location reads its current version's manifest."""
    from densebeam.index_store.artifacts import versions

    root = versions.resolve(root)
    return parse_manifest(read_manifest_bytes(root), join(root, MANIFEST))


def _pin(local: str, rel: str, name: str) -> fsutil.PinnedFile:
    """Open listed file ``rel`` of the local bundle ``local``, after resolving links: a file whose real
    location is outside the bundle (a symlink pointing out) is refused, before and after opening."""
    real_root = os.path.realpath(local)
    path = os.path.join(local, *rel.split("/"))
    if not is_inside(os.path.realpath(path), real_root):
        raise BundleError(f"{name} is a link to {os.path.realpath(path)}, outside the bundle; only files "
                          "inside a bundle are opened. Copy the bundle with its files, not links")
    try:
        pinned = fsutil.PinnedFile(path, name)
    except FileNotFoundError as err:
        raise BundleError(f"{name} is listed in the manifest but missing; copy the whole bundle "
                          "directory again or rebuild it") from err
    except (OSError, ValueError) as err:
        raise BundleError(f"{name} cannot be opened ({err}); copy the bundle again or rebuild it") from err
    if not is_inside(pinned.real_path(), real_root):
        pinned.close()
        raise BundleError(f"{name} moved outside the bundle while it was opened; refusing it")
    return pinned


@contextlib.contextmanager
def _pinned_files(local: str, manifest: dict, root: str) -> Iterator[dict[str, fsutil.PinnedFile]]:
    """Every listed file of the local bundle ``local`` pinned by descriptor (named under ``root`` in
    errors), closed on exit: what is hashed, validated and opened is one file."""
    pinned: dict[str, fsutil.PinnedFile] = {}
    fsutil.ensure_open_files(len(manifest["files"]))
    try:
        for entry in manifest["files"]:
            pinned[entry["path"]] = _pin(local, entry["path"], join(root, entry["path"]))
        yield pinned
    finally:
        for p in pinned.values():
            p.close()


def _verify_pinned(pinned: dict[str, fsutil.PinnedFile], manifest: dict, mode: str) -> None:
    """Sizes of every file first (cheap), then, for ``full``, their sha256 read through the pins."""
    for entry in manifest["files"]:
        p = pinned[entry["path"]]
        if p.size != entry["size"]:
            raise BundleError(f"{p.name} has {p.size} bytes, the manifest says {entry['size']}: the file was "
                              "altered or truncated; copy the bundle again or rebuild it")
    if mode == "full":
        for entry in manifest["files"]:
            p = pinned[entry["path"]]
            try:
                digest = p.sha256()
            except ValueError as err:
                raise BundleError(str(err)) from err
            if digest != entry["sha256"]:
                raise BundleError(f"{p.name} does not match its sha256 in the manifest: the file was altered "
                                  "or corrupted; copy the bundle again or rebuild it")


def verify(root: str, manifest: dict, mode: str = "full") -> None:
    """Check every listed file exists with its size (``sizes``) and also its sha256 (``full``).

    ``full`` reads the whole bundle once (disk-bound); ``sizes`` only stats files. A local bundle's
    files are opened after resolving links (nothing outside the bundle); see :func:`open_bundle` for
    the structural validation that comes on top.
    """
    if mode not in ("full", "sizes"):
        raise ValueError(f"verify mode must be 'full' or 'sizes', got {mode!r}")
    parse_manifest(json.dumps(manifest).encode(), join(root, MANIFEST))
    if fsutil.is_local(root):
        with _pinned_files(fsutil.local_path(root), manifest, root) as pinned:
            _verify_pinned(pinned, manifest, mode)
        return
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
        if mode == "full" and fsutil.sha256_file(url)[1] != entry["sha256"]:
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
    manifest: dict  # the manifest's JSON object as read
    searcher: ShardedSearcher
    docstore: Docstore
    record: Manifest  # the same manifest, typed (what readers use)
    raw_vectors: Optional[RawVectors] = None  # a tiered bundle's float32 vectors (read per row, not mapped)

    @property
    def facts(self) -> ModelFacts:
        return self.record.model_facts

    @property
    def default_nprobe(self) -> int:
        return self.record.nprobe


OPEN_ATTEMPTS = 3  # a versioned location whose version is replaced mid-open is opened again


def open_bundle(root: str, verify: str = "full", cache_dir: Optional[str] = None,
                trust_key: Optional[bytes] = None) -> Bundle:
    """Open a bundle for search: verify it, validate its structure, map its indexes and docstore
    (remote: cached locally first).

    ``verify="full"`` hashes every file (a full read; safest), ``"sizes"`` only stats them, ``"none"``
    trusts the manifest's hashes. Whatever the mode, only files the manifest lists are opened (links
    resolved, nothing outside the bundle), each is pinned by descriptor so what is used is what was
    checked, and the structure is validated before FAISS or Arrow reads anything
    (:func:`index_store.artifacts.validate.check_bundle`: list tables, ids, counts, the docstore's Arrow data).
    A versioned location opens its CURRENT version; if that version is replaced and pruned while it is
    being opened, the new current one is opened instead. Index lists and docstore are memory-mapped,
    so RAM use is what searches touch. ``trust_key`` (:mod:`index_store.artifacts.signing`): the manifest must be
    signed with it, every file is hashed whatever ``verify`` says, and no unlisted file may be present.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    from densebeam.index_store.artifacts import versions  # a versioned location opens its CURRENT version

    for attempt in range(1, OPEN_ATTEMPTS + 1):
        location = versions.resolve(root)
        try:
            return _open_location(location, "full" if trust_key is not None else verify, cache_dir, trust_key)
        except (ValueError, OSError) as err:
            if location == root or attempt == OPEN_ATTEMPTS or versions.resolve(root) == location:
                raise
            log.warning("%s: its current version changed while %s was being opened (%s); opening the "
                        "new current version", root, location, err)
    raise AssertionError("unreachable")


def _open_location(location: str, verify: str, cache_dir: Optional[str], trust_key: Optional[bytes] = None) -> Bundle:
    raw = read_manifest_bytes(location)
    where = join(location, MANIFEST)
    if trust_key is not None:  # before anything of the manifest is believed
        signing.check(raw, _read_optional(join(location, signing.SIGNATURE)), trust_key, location)
    manifest = parse_manifest(raw, where)
    if trust_key is not None and fsutil.is_local(location):
        signing.check_no_extra_files(fsutil.local_path(location), [e["path"] for e in manifest["files"]], location)
    facts = ModelFacts.from_dict(manifest["model_facts"])
    validate.required_files(manifest, where)  # refuse before opening anything
    local = location if fsutil.is_local(location) else _cache_remote(location, raw, manifest, cache_dir)
    with _pinned_files(fsutil.local_path(local), manifest, location) as pinned:
        if verify != "none":
            _verify_pinned(pinned, manifest, verify)
        try:
            checked = validate.check_bundle(manifest, pinned, where)
        except BundleError:
            raise
        except ValueError as err:  # StructureError, FaissFormatError, a damaged docstore part
            raise BundleError(str(err)) from err
        searcher = _open_indexes(checked, pinned)
        record = Manifest.from_dict(manifest)
        raw = _open_raw_vectors(record, checked, pinned, where) if record.tiered else None
        if raw is not None:
            searcher = RefinedSearcher(searcher, raw.get, record.refine_by_k)
        for p in pinned.values():
            try:
                p.check_unchanged()
            except ValueError as err:
                raise BundleError(str(err)) from err
    if facts.dim != searcher.d:
        raise BundleError(f"{where} says dim {facts.dim} but its index has dim {searcher.d}; rebuild it")
    return Bundle(root=fsutil.local_path(local), manifest=manifest, searcher=searcher, docstore=checked.docstore,
                  record=record, raw_vectors=raw)


def _open_raw_vectors(record: Manifest, checked: validate.CheckedBundle, pinned: dict[str, fsutil.PinnedFile],
                      where: str) -> RawVectors:
    """The tiered bundle's full-precision vectors, one mapped ``.npy`` per docstore part (same rows)."""
    parts = checked.docstore.parts
    missing = [f for f in record.refine_files if f not in pinned]
    if missing or len(record.refine_files) != len(parts):
        raise BundleError(f"{where} re-scores from {list(record.refine_files)[:3]} but lists "
                          f"{'none of ' if missing else ''}{missing[:3] or len(parts)} of them with its "
                          f"{len(parts)} docstore part(s); the bundle is incomplete, rebuild it")
    arrays = [open_local(os.open(pinned[rel].use_path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)),
                         pinned[rel].name, part.rows, record.model_facts.dim)
              for rel, part in zip(record.refine_files, parts)]
    return RawVectors(arrays, [part.base for part in parts])


def publish_version(root: str, name: str, keep: int = 3, stale_after_s: float = 24 * 3600,
                    grace_s: Optional[float] = None) -> None:
    """Verify and validate version ``name`` of the versioned location ``root`` fully (it must open),
    switch ``CURRENT`` to it, then prune old versions (:func:`index_store.artifacts.versions.prune`)."""
    from densebeam.index_store.artifacts import versions

    if keep < 1:
        raise ValueError("keep must be at least 1")
    open_bundle(versions.version_path(root, name), verify="full")  # raises (naming the file) before any switch
    versions.switch(root, name)
    log.info("published version %s of %s", name, root)
    versions.prune(root, keep, stale_after_s, versions.DEFAULT_GRACE_S if grace_s is None else grace_s)


def _read_optional(url: str) -> Optional[bytes]:
    """The bytes of the file at ``url``, or None when there is none."""
    try:
        with fsspec.open(url, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _open_indexes(checked: validate.CheckedBundle, pinned: dict[str, fsutil.PinnedFile]) -> ShardedSearcher:
    """Hand the validated FAISS files to FAISS (through their pins), then check that FAISS sees what
    the validation saw."""
    indexes = []
    for rel, parsed in zip(checked.index_files, checked.indexes):
        try:
            if checked.layout == "merged":
                index = open_merged(pinned[rel].use_path, pinned[validate.MERGED_DATA].use_path)
            else:
                index = read_index(pinned[rel].use_path, mmap=True)
        except (RuntimeError, ValueError, OSError) as err:
            raise BundleError(f"{pinned[rel].name} could not be opened by FAISS ({err}); rebuild the bundle") from err
        ivf = faiss.extract_index_ivf(index)
        seen = (index.d, index.ntotal, ivf.nlist, ivf.code_size, ivf.invlists.compute_ntotal())
        if seen != (parsed.d, parsed.ntotal, parsed.nlist, parsed.code_size, parsed.ntotal):
            raise BundleError(f"FAISS reads {pinned[rel].name} as (d, ntotal, nlist, code size, listed) {seen}, "
                              "not as validated; refusing it (a FAISS version densebeam does not know?)")
        indexes.append(index)
    return ShardedSearcher(indexes)
