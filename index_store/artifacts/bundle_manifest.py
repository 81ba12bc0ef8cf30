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
from types import MappingProxyType
from typing import Mapping, Optional

import fsspec

from densebeam.index_store import fsutil
from densebeam.index_store.artifacts.docstore import PART_PATTERN
from densebeam.index_store.artifacts.embeddings import join
from densebeam.index_store.types import ModelFacts
from densebeam.index_store.ivf.params import LAYOUTS

MANIFEST = "manifest.json"
FORMAT = "densebeam.index"
FORMAT_VERSION = 1
TRAINED, MERGED_INDEX, MERGED_DATA = "trained.faiss", "index.faiss", "index.ivfdata"
SHARD_PATTERN = "shards/shard-{index:05d}-of-{count:05d}.faiss"
REFINE_PATTERN = "vectors/part-{index:05d}-of-{count:05d}.npy"  # full-precision vectors of a tiered bundle
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


@dataclasses.dataclass(frozen=True)
class CurvePoint:
    """One point of a recall curve: searching ``nprobe`` lists found ``recall`` of the true neighbours."""

    nprobe: int
    recall: float


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """A file the manifest lists, relative to the bundle, with the size and sha256 it must have."""

    path: str
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class Manifest:
    """The typed view of a manifest that passed :func:`parse_manifest`: every field a reader uses, with
    its type. ``raw`` keeps the whole JSON object (build inputs, timings, the precision record) for the
    fields no reader depends on."""

    format_version: int
    layout: str
    factory: str
    nlist: int
    nprobe: int
    k: int
    vectors: int
    shards: int
    model_facts: ModelFacts
    files: tuple[FileEntry, ...]
    nprobe_by_k: Mapping[int, CurvePoint]
    recall_curve: tuple[CurvePoint, ...]
    recall_curves: Mapping[int, tuple[CurvePoint, ...]]
    recall_at_k: float
    target_recall: Optional[float]
    recall_measured_on: Optional[str]
    codec: Optional[str]
    raw: Mapping
    refine_by_k: Mapping[int, int] = dataclasses.field(default_factory=lambda: MappingProxyType({}))  # measured refine factor per k; empty: not tiered
    refine_files: tuple[str, ...] = ()  # the full-precision vectors files, one per shard

    @property
    def tiered(self) -> bool:
        """Whether searches re-score compact codes exactly from the bundle's vectors files."""
        return bool(self.refine_files)

    @classmethod
    def from_dict(cls, m: Mapping) -> "Manifest":
        """Build the record from a manifest dict that passed the schema checks (:func:`parse_manifest`
        runs both)."""

        def points(curve) -> tuple[CurvePoint, ...]:
            return tuple(CurvePoint(int(p["nprobe"]), float(p["recall"])) for p in curve)

        return cls(
            format_version=int(m["format_version"]), layout=m["layout"], factory=m["factory"],
            nlist=int(m["nlist"]), nprobe=int(m["nprobe"]), k=int(m.get("k", 10)),
            vectors=int(m["counts"]["vectors"]), shards=int(m["counts"]["shards"]),
            model_facts=ModelFacts.from_dict(m["model_facts"]),
            files=tuple(FileEntry(e["path"], int(e["size"]), e["sha256"]) for e in m["files"]),
            nprobe_by_k=MappingProxyType({int(k): CurvePoint(int(v["nprobe"]), float(v["recall"]))
                                          for k, v in (m.get("nprobe_by_k") or {}).items()}),
            recall_curve=points(m.get("recall_curve") or []),
            recall_curves=MappingProxyType({int(k): points(v) for k, v in (m.get("recall_curves") or {}).items()}),
            recall_at_k=float(m.get("recall_at_k", 0.0)),
            target_recall=None if m.get("target_recall") is None else float(m["target_recall"]),
            recall_measured_on=m.get("recall_measured_on"), codec=m.get("codec"),
            raw=MappingProxyType(dict(m)),
            refine_by_k=MappingProxyType({int(k): int(v) for k, v in (m.get("refine") or {}).get("factors_by_k",
                                                                                                  {}).items()}),
            refine_files=tuple((m.get("refine") or {}).get("files", ())))


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
    raw = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode("utf-8")
    with fsutil.atomic_local_output(join(root, MANIFEST)) as tmp:
        with open(tmp, "wb") as f:
            f.write(raw)
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


def _is_str_or_none(v) -> bool:
    return v is None or isinstance(v, str)


def _point_ok(p, nlist) -> bool:
    """One point of a recall curve: ``{"nprobe": 1..nlist, "recall": 0..1}``."""
    return (isinstance(p, dict) and _is_int(p.get("nprobe")) and 1 <= p["nprobe"] <= nlist
            and _is_number(p.get("recall")) and 0.0 <= p["recall"] <= 1.0)


def _k_key(key) -> bool:
    return isinstance(key, str) and key.isdigit() and int(key) >= 1


def _codec_choice_ok(choice) -> bool:
    """How --memory-budget chose the codec (index_store.ivf.codec_choice), as inspect prints it."""
    if choice is None:
        return True
    if not (isinstance(choice, dict) and all(_is_int(choice.get(f)) for f in ("budget_bytes", "sample", "queries"))
            and isinstance(choice.get("candidates"), list)):
        return False
    for c in choice["candidates"]:
        if not (isinstance(c, dict) and isinstance(c.get("codec"), str) and _is_int(c.get("bytes_per_vector"))
                and isinstance(c.get("factors"), dict) and isinstance(c.get("recall"), dict)):
            return False
        for k, r in c["factors"].items():
            got = c["recall"].get(k)
            if not (_k_key(k) and _is_int(r) and isinstance(got, dict) and _is_number(got.get(str(r)))):
                return False
    return True


def _checks(manifest: dict) -> dict:
    """Every field a reader uses (search, ``densebeam inspect``, serve, the plot), with its type, range
    and the rules between fields: name -> ok."""
    facts = manifest.get("model_facts")
    counts = manifest.get("counts")
    nlist = manifest.get("nlist") if _is_int(manifest.get("nlist")) else 0
    curve = manifest.get("recall_curve", [])
    curves = manifest.get("recall_curves", {})
    by_k = manifest.get("nprobe_by_k", {})
    refine = manifest.get("refine", {})
    shards = counts.get("shards") if isinstance(counts, dict) else None
    return {
        "layout": manifest.get("layout") in LAYOUTS,
        "model_facts": isinstance(facts, dict) and isinstance(facts.get("model"), str)
        and _is_int(facts.get("dim")) and facts["dim"] >= 1 and _is_str_or_none(facts.get("revision"))
        and facts.get("similarity") in ("cos", "dot") and facts.get("dtype") in ("float32", "float16")
        and (facts.get("max_seq_length") is None or (_is_int(facts["max_seq_length"]) and facts["max_seq_length"] >= 1))
        and all(_is_str_or_none(facts.get(f)) for f in ("precision", "document_prompt", "query_prompt")),
        "factory": isinstance(manifest.get("factory"), str) and bool(manifest.get("factory")),
        "nlist": _is_int(manifest.get("nlist")) and manifest["nlist"] >= 1,
        "nprobe": _is_int(manifest.get("nprobe")) and 1 <= manifest["nprobe"] <= max(nlist, 1),
        "recall_at_k": _is_number(manifest.get("recall_at_k", 0.0)) and 0.0 <= manifest.get("recall_at_k", 0.0) <= 1.0,
        "target_recall": manifest.get("target_recall") is None
        or (_is_number(manifest["target_recall"]) and 0.0 < manifest["target_recall"] <= 1.0),
        "counts": isinstance(counts, dict) and _is_int(counts.get("vectors")) and counts["vectors"] >= 0
        and _is_int(counts.get("shards")) and counts["shards"] >= 1,
        "recall_curve": isinstance(curve, list) and all(_point_ok(c, nlist) for c in curve),
        "recall_curves": isinstance(curves, dict) and all(_k_key(k) and isinstance(v, list) for k, v in curves.items()),
        "nprobe_by_k": isinstance(by_k, dict) and all(_k_key(k) for k in by_k),
        **{f"recall_curve[{i}]": _point_ok(c, nlist) for i, c in enumerate(curve if isinstance(curve, list) else [])},
        **{f"recall_curves[{k}][{i}]": _point_ok(c, nlist) for k, v in (curves.items() if isinstance(curves, dict)
                                                                      else []) if isinstance(v, list)
           for i, c in enumerate(v)},
        **{f"nprobe_by_k[{k}]": _point_ok(v, nlist) for k, v in (by_k.items() if isinstance(by_k, dict) else [])},
        "k": _is_int(manifest.get("k", 10)) and manifest.get("k", 10) >= 1,
        "recall_measured_on": _is_str_or_none(manifest.get("recall_measured_on")),
        "codec": _is_str_or_none(manifest.get("codec")),
        "codec_choice": _codec_choice_ok(manifest.get("codec_choice")),
        "refine": isinstance(refine, dict) and (not refine or (
            isinstance(refine.get("factors_by_k"), dict) and bool(refine["factors_by_k"])
            and all(_k_key(k) and _is_int(v) and v >= 1 for k, v in refine["factors_by_k"].items())
            and _is_int(shards) and refine.get("files") == [REFINE_PATTERN.format(index=i, count=shards)
                                                             for i in range(shards)])),
    }


def _value(manifest: dict, name: str):
    """The value a check name points at: ``field``, ``field[key]`` or ``field[key][index]``."""
    head, _, rest = name.partition("[")
    value = manifest.get(head)
    for part in rest.rstrip("]").split("][") if rest else []:
        try:
            value = value[int(part)] if isinstance(value, list) else value[part]
        except (KeyError, IndexError, TypeError, ValueError):
            return None
    return value


def _check_fields(manifest: dict, where: str) -> None:
    """The schema of a format-1 manifest (:func:`_checks`): a damaged or edited field is refused here,
    naming it, like any other corruption, rather than failing later in a reader (a search, /health)."""
    bad = [k for k, ok in _checks(manifest).items() if not ok]
    if bad:
        shown = ", ".join(f"{k}={str(_value(manifest, k))[:120]}" for k in bad[:5])
        raise BundleError(f"{where} has missing or malformed field(s) {', '.join(bad[:5])}"
                          f"{f' and {len(bad) - 5} more' if len(bad) > 5 else ''} ({shown}); the manifest is "
                          "damaged or was edited: rebuild the bundle")
    try:
        ModelFacts.from_dict(manifest["model_facts"])
    except (TypeError, ValueError) as err:
        raise BundleError(f"{where} has damaged model_facts ({err}); rebuild the bundle") from err
    try:  # every field the record types passed the checks above: building it cannot fail on a valid manifest
        Manifest.from_dict(manifest)
    except (KeyError, TypeError, ValueError) as err:
        raise BundleError(f"{where} has a malformed field ({err!r}); the manifest is damaged or was edited: "
                          "rebuild the bundle") from err


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
