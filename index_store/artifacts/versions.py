"""Versioned bundle locations: ``ROOT/versions/<name>/`` bundles and a ``ROOT/CURRENT`` pointer.

A build writes a new version directory; only after that version opens with full checksum verification
and structural validation is ``CURRENT`` switched, atomically (a temp file renamed over it), to name it,
and the version it replaced is marked ``RETIRED`` (a file whose time is the switch). Readers resolve the
pointer once per open, so a search service keeps serving the version it holds and can reload to the new
one between requests. Old versions are pruned down to ``keep``, but a version is deleted only once it
has been retired for ``grace_s`` (10 minutes by default): a reader that resolved ``CURRENT`` just before
a switch has that long to finish opening its version (an open that still loses it opens the new current
version instead, see :func:`index_store.artifacts.bundle.open_bundle`). The current version and versions still
being written by a newer run (no manifest, younger than ``stale_after_s``) are never deleted.
"""

from __future__ import annotations

import datetime
import logging
import secrets
import time
from typing import Optional

import fsspec

from densebeam.index_store.artifacts.embeddings import join

log = logging.getLogger(__name__)
POINTER = "CURRENT"
VERSIONS_DIR = "versions"
MANIFEST = "manifest.json"
RETIRED = "RETIRED"  # in a version directory: written when CURRENT moved away from it
DEFAULT_GRACE_S = 600.0


def _fs(root: str):
    return fsspec.core.url_to_fs(root)


def new_version_name() -> str:
    """Sortable by time to the microsecond: ``20261122T005501123456Z-3fa2c1`` (whole seconds were not
    enough: builds finishing within one second sorted by their random suffix, and pruning kept the
    wrong one)."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return f"{now}-{secrets.token_hex(3)}"


def version_path(root: str, name: str) -> str:
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"bad version name {name!r} in {join(root, POINTER)}")
    return join(root, VERSIONS_DIR, name)


def current(root: str) -> Optional[str]:
    """The name ``CURRENT`` points to, or None for a plain (unversioned) location."""
    fs, path = _fs(root)
    pointer = join(path, POINTER)
    if not fs.exists(pointer):
        return None
    with fs.open(pointer, "r", encoding="utf-8") as f:
        return f.read().strip()


def resolve(root: str) -> str:
    """A plain bundle resolves to itself; a versioned location to its current version."""
    fs, path = _fs(root)
    if fs.exists(join(path, MANIFEST)):
        return root
    name = current(root)
    return version_path(root, name) if name else root


def list_versions(root: str) -> list[dict]:
    fs, path = _fs(root)
    base = join(path, VERSIONS_DIR)
    if not fs.exists(base):
        return []
    cur = current(root)
    out = []
    for p in sorted(fs.ls(base, detail=False)):
        name = p.rstrip("/").rsplit("/", 1)[-1]
        out.append({"name": name, "complete": fs.exists(join(p, MANIFEST)), "current": name == cur,
                    "path": version_path(root, name)})
    return out


def switch(root: str, name: str) -> None:
    """Point ``CURRENT`` at ``name`` atomically (write a temp file, rename it over the pointer), then mark
    the version it named before as retired now (the start of its grace period)."""
    fs, path = _fs(root)
    before = current(root)
    tmp = join(path, f".{POINTER}.tmp-{secrets.token_hex(4)}")
    with fs.open(tmp, "w", encoding="utf-8") as f:
        f.write(name + "\n")
    fs.mv(tmp, join(path, POINTER))
    if before and before != name and fs.exists(join(path, VERSIONS_DIR, before)):
        with fs.open(join(path, VERSIONS_DIR, before, RETIRED), "w", encoding="utf-8") as f:
            f.write(datetime.datetime.now(datetime.timezone.utc).isoformat() + "\n")


def retired_at(root: str, version: dict) -> float:
    """When ``version`` stopped being current: its ``RETIRED`` marker's time; for a version retired
    without one (an older densebeam, or a crash right after the switch), the last switch of ``CURRENT``,
    which is no earlier. Infinity for the current version."""
    if version["current"]:
        return float("inf")
    fs, path = _fs(root)
    for where in (join(_fs(version["path"])[1], RETIRED), join(path, POINTER)):
        try:
            return _mtime(fs, where)
        except (OSError, KeyError, TypeError, ValueError):
            continue
    return time.time()


def prune(root: str, keep: int, stale_after_s: float, grace_s: float = DEFAULT_GRACE_S) -> list[str]:
    """Delete complete versions beyond the ``keep`` newest once they have been retired for ``grace_s``
    (younger ones wait for a later prune), and incomplete ones older than ``stale_after_s`` (left by a
    killed run). Returns the names deleted."""
    fs, _ = _fs(root)
    versions = list_versions(root)
    complete = [v for v in versions if v["complete"]]
    now = time.time()
    doomed = [v for v in complete[:-keep] if not v["current"] and now - retired_at(root, v) >= grace_s]
    for v in versions:
        if not v["complete"] and not v["current"]:
            try:
                age = now - _mtime(fs, _fs(v["path"])[1])
            except (OSError, KeyError, TypeError):
                age = float("inf")
            if age > stale_after_s:  # left by a killed run; a younger one may still be in progress
                doomed.append(v)
    for v in doomed:
        fs.rm(_fs(v["path"])[1], recursive=True)
    return [v["name"] for v in doomed]


def _mtime(fs, path: str) -> float:
    info = fs.info(path)
    t = info.get("mtime") or info.get("created") or info.get("LastModified")
    return t.timestamp() if hasattr(t, "timestamp") else float(t)
