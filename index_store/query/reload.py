"""Bringing a bundle version into a running service: identify it, prove it in a child process, warm it.

    vid = identify(location)                 # which version the location holds now (reads 2 small files)
    prove(vid.path, verify="full")           # a child process opens it and searches every list
    bundle = open_bundle(vid.path, ...)      # only then does the service's own process open it
    warm(bundle, budget_bytes=2 << 30)       # page its inverted lists in before it serves

A bundle whose files match their hashes can still hold content that crashes FAISS (a corruption that
happened before hashing, a forged manifest). The service never learns that by crashing: :func:`prove`
runs :func:`exercise` (open, then one search that scans every inverted list, then docstore lookups of
the hits) in a child process and refuses the version if the child fails, dies on a signal or hangs.
:func:`identify` makes reloading an unchanged version free (same resolved path and manifest bytes: no
hashing, no child). No Beam.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Optional

import numpy as np

from densebeam.index_store.artifacts import versions
from densebeam.index_store.artifacts.bundle import MANIFEST, Bundle, BundleError, open_bundle
from densebeam.index_store.artifacts.embeddings import join

log = logging.getLogger(__name__)

DEFAULT_WARM_BYTES = 2 << 30
DEFAULT_PROOF_TIMEOUT_S = 600.0
_CHUNK = 4 << 20


class ReloadError(BundleError):
    """A version the service refuses to serve (it failed, crashed or hung in the child proof)."""


@dataclasses.dataclass(frozen=True)
class VersionId:
    """What a location holds at one moment: the resolved bundle path and its manifest's sha256."""

    path: str  # the bundle itself: a versioned location's current version, or the plain bundle
    name: Optional[str]  # the version name of a versioned location, else None
    manifest_sha256: str

    def public(self) -> dict:
        """What clients may see: no paths."""
        return {"version": self.name, "manifest_sha256": self.manifest_sha256[:16]}


def identify(location: str) -> VersionId:
    """The version ``location`` holds now: reads ``CURRENT`` (if versioned) and ``manifest.json``, no more."""
    import fsspec

    path = versions.resolve(location)
    try:
        with fsspec.open(join(path, MANIFEST), "rb") as f:
            raw = f.read()
    except FileNotFoundError as err:
        raise BundleError(f"{join(path, MANIFEST)} does not exist: no complete bundle at {location} "
                          "(a build in progress, or the wrong path)") from err
    name = path.rstrip("/").rsplit("/", 1)[-1] if path != location else None
    return VersionId(path, name, hashlib.sha256(raw).hexdigest())


def manifest_sha256(bundle: Bundle) -> str:
    """sha256 of an opened bundle's manifest file (compare with :attr:`VersionId.manifest_sha256`)."""
    with open(os.path.join(bundle.root, MANIFEST), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def exercise(bundle: Bundle, k: int = 10, seed: int = 0) -> dict:
    """Search the bundle once over every inverted list (nprobe = nlist) and look the hits up.

    Every list's ids and codes are read, so an offset or size that points outside a file is hit here.
    Cost: one scan of the whole index (a second or so per million 384-d Flat vectors).
    """
    start = time.perf_counter()
    searcher, n = bundle.searcher, bundle.searcher.ntotal
    probe = np.random.default_rng(seed).standard_normal((2, searcher.d)).astype(np.float32)
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    _, rows = searcher.search(probe, max(1, min(k, n)), searcher.nlist)
    hits = rows[rows >= 0]
    if hits.size and (hits.max() >= n):
        raise BundleError(f"{bundle.root}: a search returned row {int(hits.max())} but the index holds {n} "
                          "vectors; the index is corrupt, rebuild it")
    wanted = hits.tolist() + ([0, n - 1] if n else [])
    missing = [r for r, doc in zip(wanted, bundle.docstore.get(wanted)) if doc is None]
    if missing:
        raise BundleError(f"{bundle.root}: rows {missing[:5]} are not in the docstore; rebuild the bundle")
    return {"vectors": n, "lists": searcher.nlist, "hits": int(hits.size),
            "seconds": round(time.perf_counter() - start, 3)}


def prove(path: str, verify: str = "full", cache_dir: Optional[str] = None,
          timeout_s: float = DEFAULT_PROOF_TIMEOUT_S, trust_key_file: Optional[str] = None) -> dict:
    """Open ``path`` and :func:`exercise` it in a child process; raise :class:`ReloadError` unless it
    succeeds. The child verifies the files as ``verify`` says (``full``: hashes them), so a version that
    passes was hashed and searched as the same bytes. Costs a Python start, the verify and one scan."""
    cmd = [sys.executable, "-m", "densebeam.index_store.query.reload", path, "--verify", verify]
    if cache_dir:
        cmd += ["--cache-dir", cache_dir]
    if trust_key_file:
        cmd += ["--trust-key", trust_key_file]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as err:
        raise ReloadError(f"{path}: opening and searching it in a child process took over {timeout_s:g} s; "
                          "not serving it (a hanging bundle, or raise --reload-proof-timeout)") from err
    if proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
        raise ReloadError(f"{path}: a child process that opened and searched it died with {sig}; the bundle "
                          "is corrupt (its files may still match their hashes). Not serving it: rebuild it")
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        why = lines[-1][:1000] if lines else f"exit status {proc.returncode}"
        raise ReloadError(f"{path}: refused by the child process that opened it: {why}")
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError) as err:
        raise ReloadError(f"{path}: the child process that opened it gave no report") from err


def _warm_files(bundle: Bundle) -> list[tuple[str, bool]]:
    """(local path, holds inverted lists): the lists first (every search reads them), then the docstore
    (what hits read). ``index.faiss``/``trained.faiss`` are read whole at open anyway."""
    paths = sorted(e.path for e in bundle.record.files)
    lists = [p for p in paths if p.endswith(".ivfdata") or (p.startswith("shards/") and p.endswith(".faiss"))]
    docstore = [p for p in paths if p.startswith("docstore/")]
    return [(os.path.join(bundle.root, *p.split("/")), p in lists) for p in lists + docstore]


def warm(bundle: Bundle, budget_bytes: int = DEFAULT_WARM_BYTES) -> dict:
    """Page the bundle's inverted lists (then its docstore) into memory, at most ``budget_bytes``.

    The files are read front to back into the page cache (which the index's memory map shares); when all
    the inverted lists fit the budget, one search over every list (:func:`exercise`) then maps their
    pages into this process, so the first real queries take no page faults. Over the budget the rest is
    left to the OS, as without warming: the first queries to reach it read from disk.
    """
    if budget_bytes < 0:
        raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
    start = time.perf_counter()
    left, read, lists_whole = budget_bytes, 0, True
    buf = memoryview(bytearray(_CHUNK))
    for path, holds_lists in _warm_files(bundle):
        size, got = os.path.getsize(path), 0
        with open(path, "rb", buffering=0) as f:
            want = min(size, left)
            while got < want:
                n = f.readinto(buf[:min(_CHUNK, want - got)])
                if not n:
                    break
                got += n
        read, left = read + got, left - got
        lists_whole = lists_whole and (got == size or not holds_lists)
    scanned = exercise(bundle)["seconds"] if lists_whole and budget_bytes else None
    report = {"bytes_read": read, "budget_bytes": budget_bytes, "lists_whole": lists_whole,
              "scan_seconds": scanned, "seconds": round(time.perf_counter() - start, 3)}
    log.info("warmed %s: %s", bundle.root, report)
    return report


def main(argv=None) -> int:
    """The child side of :func:`prove`: open, exercise, print a JSON report (exit 1 with the reason)."""
    p = argparse.ArgumentParser(prog="python -m densebeam.index_store.query.reload",
                                description="open a bundle and search every list (the service's reload proof)")
    p.add_argument("bundle")
    p.add_argument("--verify", default="full", choices=("full", "sizes", "none"))
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--trust-key", default=None, help="open only a bundle signed with the key in this file")
    args = p.parse_args(argv)
    try:
        from densebeam.index_store.artifacts import signing

        report = exercise(open_bundle(args.bundle, verify=args.verify, cache_dir=args.cache_dir,
                                      trust_key=signing.read_key(args.trust_key)))
    except Exception as err:  # noqa: BLE001 - reported to the parent, which refuses the version
        print(f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
