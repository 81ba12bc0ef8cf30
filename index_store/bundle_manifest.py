"""The bundle manifest: names, the format, writing it (the commit point) and reading it strictly.

``manifest.json`` is JSON: ``format``/``format_version``, the model facts, the FAISS factory string, nlist,
nprobe and the recall it was measured to give, counts, the build inputs, and ``files``: every other
file with its size and sha256. A reader refuses a manifest that is not exactly what a format-1 writer
produces: an unknown or malformed ``format_version`` (a JSON ``true`` included), paths that could escape
the bundle, malformed sizes or digests, missing or mistyped fields that readers use. No Beam.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import fsspec

from densebeam.index_store import fsutil
from densebeam.index_store.docstore import PART_PATTERN
from densebeam.index_store.embeddings import join
from densebeam.index_store.types import ModelFacts

MANIFEST = "manifest.json"
FORMAT = "densebeam.index"
FORMAT_VERSION = 1
LAYOUTS = ("merged", "shards")
TRAINED, MERGED_INDEX, MERGED_DATA = "trained.faiss", "index.faiss", "index.ivfdata"
SHARD_PATTERN = "shards/shard-{index:05d}-of-{count:05d}.faiss"
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
        manifest=MANIFEST, trained=TRAINED,
        shards=[SHARD_PATTERN.format(index=i, count=n_shards) for i in range(n_shards)],
        docstore=["docstore/" + PART_PATTERN.format(index=i, count=n_shards) for i in range(n_shards)],
        merged_index=MERGED_INDEX, merged_ivfdata=MERGED_DATA)


def check_relpath(path: object, where: str) -> str:
    """Refuse names that could escape the bundle: absolute, drive/scheme, backslash, '.', '..'."""
    if (not isinstance(path, str) or not path or path.startswith("/") or "\\" in path or ":" in path
            or any(part in ("", ".", "..") for part in path.split("/"))):
        raise BundleError(f"{where} lists the unsafe path {path!r}; bundle paths must be relative names "
                          "inside the bundle. Refusing to open it: rebuild it or check where it came from")
    return path


def file_entry(root: str, relpath: str) -> dict:
    """``{path, size, sha256}`` of one bundle file (streamed: memory one 1 MiB chunk)."""
    check_relpath(relpath, "file_entry")
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


_SHA256 = re.compile(r"[0-9a-f]{64}")


def parse_manifest(raw: bytes, where: str) -> dict:
    try:
        manifest = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise BundleError(f"{where} is not valid JSON ({err}); the bundle is damaged, rebuild it") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{where} is not a densebeam index manifest (format != {FORMAT!r})")
    version = manifest.get("format_version")
    if type(version) is not int or version < 1:  # type(): a JSON true is a Python int too
        raise BundleError(f"{where} has a malformed format_version {version!r} (densebeam writes the integer "
                          f"{FORMAT_VERSION}); the manifest is damaged or forged, rebuild the bundle")
    if version > FORMAT_VERSION:
        raise BundleError(f"{where} has format_version {version!r}; this densebeam reads version "
                          f"{FORMAT_VERSION}. Upgrade densebeam (pip install -U densebeam) to open it")
    files = manifest.get("files")
    if not isinstance(files, list) or not all(isinstance(e, dict) for e in files):
        raise BundleError(f"{where} has no valid 'files' list; the bundle is damaged, rebuild it")
    seen = set()
    for entry in files:
        path = check_relpath(entry.get("path"), where)
        if path in seen or path == MANIFEST:
            raise BundleError(f"{where} lists {path!r} twice or lists itself; rebuild the bundle")
        size, digest = entry.get("size"), entry.get("sha256")
        if type(size) is not int or size < 0 or not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise BundleError(f"{where} lists {path!r} with a malformed size {size!r} or sha256 {digest!r}; "
                              "the manifest is damaged, rebuild the bundle")
        seen.add(path)
    _check_fields(manifest, where)
    return manifest


def _is_int(v) -> bool:
    return type(v) is int  # not bool: a JSON true is a Python int too


def _is_number(v) -> bool:
    return type(v) in (int, float)


def _check_fields(manifest: dict, where: str) -> None:
    """The fields every format-1 manifest has and readers use (search, ``densebeam inspect``, serve),
    with their types: a damaged manifest is refused here rather than failing later in a reader."""
    facts = manifest.get("model_facts")
    counts = manifest.get("counts")
    curve = manifest.get("recall_curve", [])
    checks = {
        "layout": manifest.get("layout") in LAYOUTS,
        "model_facts": isinstance(facts, dict) and isinstance(facts.get("model"), str)
        and _is_int(facts.get("dim")) and (facts.get("revision") is None or isinstance(facts.get("revision"), str)),
        "factory": isinstance(manifest.get("factory"), str),
        "nlist": _is_int(manifest.get("nlist")) and manifest["nlist"] >= 1,
        "nprobe": _is_int(manifest.get("nprobe")) and manifest["nprobe"] >= 1,
        "recall_at_k": _is_number(manifest.get("recall_at_k", 0.0)),
        "counts": isinstance(counts, dict) and _is_int(counts.get("vectors")) and _is_int(counts.get("shards")),
        "recall_curve": isinstance(curve, list) and all(
            isinstance(c, dict) and _is_int(c.get("nprobe")) and _is_number(c.get("recall")) for c in curve),
        "k": _is_int(manifest.get("k", 10)),
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        shown = {k: manifest.get(k) for k in bad}
        raise BundleError(f"{where} has missing or malformed fields {str(shown)[:300]}; the manifest is damaged, "
                          "rebuild the bundle")
    try:
        facts = ModelFacts.from_dict(facts)
    except (TypeError, ValueError) as err:
        raise BundleError(f"{where} has damaged model_facts ({err}); rebuild the bundle") from err
    if not (facts.max_seq_length is None or _is_int(facts.max_seq_length)):
        raise BundleError(f"{where} has damaged model_facts {facts}; rebuild the bundle")


def read_manifest_bytes(root: str) -> bytes:
    path = join(root, MANIFEST)
    if fsutil.is_local(root):
        local = fsutil.local_path(root)
        real = os.path.realpath(os.path.join(local, MANIFEST))
        if os.path.exists(real) and not is_inside(real, os.path.realpath(local)):
            raise BundleError(f"{path} is a link to {real}, outside the bundle; refusing to read it")
    try:
        with fsspec.open(path, "rb") as f:
            return f.read()
    except FileNotFoundError as err:
        raise BundleError(f"{path} does not exist: not an index bundle, or the build that writes it "
                          "last did not finish; run densebeam index again") from err


def is_inside(real: str, real_root: str) -> bool:
    """Whether the resolved path ``real`` lies in the resolved folder ``real_root``."""
    return os.path.commonpath([real, real_root]) == real_root
