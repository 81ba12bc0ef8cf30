"""Structural validation of an index bundle beyond its hashes: what makes a bundle safe to open. No Beam.

A sha256 proves a file is the one the manifest names, not that it is sound: a corruption that happened
before hashing, or a forged bundle, hashes fine and can still crash FAISS (a list offset pointing
outside the mapped file) or Arrow (string offsets outside their buffer). Before anything is handed to
FAISS, this module checks, from the pinned files (:class:`~index_store.fsutil.PinnedFile`):

- the files the layout needs are listed, named as :func:`index_store.artifacts.bundle_manifest.layout_paths` names
  them;
- every FAISS file parses as a sound densebeam IVF index (:mod:`index_store.artifacts.faiss_format`): lengths,
  list sizes, offsets and capacities inside their files, no overlapping lists, an HNSW graph in range;
- the indexes agree with ``trained.faiss`` (same quantizer and codec bytes), with each other and with
  the manifest (dimension, nlist, codec, vector and shard counts);
- every docstore part is a fully validated Arrow file (:func:`index_store.artifacts.docstore.check_part`) and the
  parts cover rows ``[0, n)`` exactly;
- the index ids are exactly the docstore rows, each once (a shard's ids inside its own part's rows).

Cost: headers, coarse quantizers and list tables (O(nlist)), 8 bytes per vector for the ids plus a
one-byte-per-vector bitmap, and one full pass over the docstore parts (Arrow's full validation).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Mapping, Optional

import numpy as np

from densebeam.index_store.artifacts.bundle_manifest import MERGED_DATA, MERGED_INDEX, SHARD_PATTERN, TRAINED, BundleError
from densebeam.index_store.artifacts.docstore import PART_PATTERN, Docstore
from densebeam.index_store.artifacts.faiss_format import IvfFile, list_ids, parse_ivf
from densebeam.index_store.fsutil import PinnedFile

_FACTORY = re.compile(r"IVF(\d+)(_HNSW\d+)?,(\w+)")


class StructureError(BundleError):
    """A bundle whose files hash fine but whose structure is unsound or inconsistent."""


@dataclasses.dataclass
class CheckedBundle:
    """What validation found: the parsed indexes (in shard order) and the opened docstore."""

    layout: str
    trained: IvfFile
    index_files: list[str]  # relative paths: index.faiss, or the shards in order
    indexes: list[IvfFile]
    docstore: Docstore

    @property
    def ntotal(self) -> int:
        return sum(ix.ntotal for ix in self.indexes)


def required_files(manifest: dict, where: str) -> list[str]:
    """The files ``manifest``'s layout needs, all of which must be listed: ``trained.faiss``, the
    docstore parts ``part-i-of-n`` for every i < n, and ``index.faiss`` + ``index.ivfdata`` (merged)
    or ``shards/shard-i-of-n.faiss`` (shards)."""
    listed = {e["path"] for e in manifest["files"]}
    parts = sorted(p for p in listed if p.startswith("docstore/"))
    n = len(parts)
    docstore = ["docstore/" + PART_PATTERN.format(index=i, count=n) for i in range(n)]
    if n == 0 or parts != docstore:
        raise StructureError(f"{where} lists docstore parts {parts[:4]}, expected {docstore[:4] or 'at least one'} "
                             "(docstore/part-00000-of-0000N.arrow ...); the bundle is incomplete, rebuild it")
    layout = manifest.get("layout")
    if layout == "merged":
        needed = [TRAINED, MERGED_INDEX, MERGED_DATA]
    elif layout == "shards":
        needed = [TRAINED] + [SHARD_PATTERN.format(index=i, count=n) for i in range(n)]
    else:
        raise StructureError(f"{where} has layout {layout!r}, expected 'merged' or 'shards'; rebuild it")
    missing = [p for p in needed if p not in listed]
    if missing:
        raise StructureError(f"{where} does not list {missing[:3]}, which its {layout!r} layout with {n} "
                             "docstore part(s) needs; nothing outside the manifest is opened. Rebuild it")
    return needed + docstore


def _same_build(index: IvfFile, trained: IvfFile) -> None:
    fields = ("kind", "d", "nlist", "code_size", "codec", "quantizer", "codec_params")
    diff = [f for f in fields if getattr(index, f) != getattr(trained, f)]
    if diff:
        raise StructureError(f"{index.name} was not filled from {trained.name} (they differ in "
                             f"{', '.join(diff)}); one of them is corrupt, rebuild the bundle")


def _check_manifest_facts(manifest: dict, trained: IvfFile, where: str) -> None:
    """The manifest's dimension, nlist, codec and factory string against the trained index."""
    facts = manifest.get("model_facts") or {}
    claims = {"dim": (facts.get("dim"), trained.d), "nlist": (manifest.get("nlist", trained.nlist), trained.nlist),
              "codec": (manifest.get("codec", trained.codec), trained.codec)}
    factory = manifest.get("factory")
    if factory is not None:
        m = _FACTORY.fullmatch(factory) if isinstance(factory, str) else None
        claims["factory"] = ((int(m[1]), bool(m[2]), m[3]) if m else factory,
                             (trained.nlist, trained.hnsw_quantizer, trained.codec))
    wrong = {k: v for k, (v, actual) in claims.items() if v != actual or type(v) is bool}
    if wrong:
        said = ", ".join(f"{k} {v!r} (the index has {claims[k][1]!r})" for k, v in wrong.items())
        raise StructureError(f"{where} says {said}; {trained.name} disagrees: one of them is corrupt, "
                             "rebuild the bundle")


def _check_counts(manifest: dict, checked: CheckedBundle, where: str) -> None:
    rows = len(checked.docstore)
    if checked.ntotal != rows:
        names = ", ".join(ix.name for ix in checked.indexes)
        raise StructureError(f"{names} hold {checked.ntotal} vectors but the docstore has {rows} rows; "
                             "the bundle is inconsistent, rebuild it")
    counts = manifest.get("counts")
    if counts is not None and (not isinstance(counts, dict) or counts.get("vectors", rows) != rows
                               or type(counts.get("vectors", rows)) is not int):
        raise StructureError(f"{where} says counts {counts!r} but the bundle holds {rows} vectors; rebuild it")
    shards: Optional[list] = manifest.get("shards")
    parts = checked.docstore.parts
    if shards is not None:
        said = [(s.get("base"), s.get("rows")) if isinstance(s, dict) else s for s in shards] \
            if isinstance(shards, list) else shards
        found = [(p.base, p.rows) for p in parts]
        if said != found:
            raise StructureError(f"{where} says shards at (base, rows) {str(said)[:200]} but the docstore "
                                 f"parts hold {str(found)[:200]}; rebuild the bundle")
    if checked.layout == "shards":
        for ix, part in zip(checked.indexes, parts):
            if ix.ntotal != part.rows:
                raise StructureError(f"{ix.name} holds {ix.ntotal} vectors but its docstore part "
                                     f"{part.path} has {part.rows} rows; rebuild the bundle")


def _check_ids(checked: CheckedBundle, data: list, data_names: list[str]) -> None:
    """Every index id is a docstore row, and every row is found exactly once (a shard's ids lie in its
    own part's rows). Memory: one byte per vector plus one list's ids at a time."""
    total = len(checked.docstore)
    seen = np.zeros(total, dtype=bool)
    marked = 0
    for k, (ix, buf, name) in enumerate(zip(checked.indexes, data, data_names)):
        lo, hi = 0, total
        if checked.layout == "shards":
            part = checked.docstore.parts[k]
            lo, hi = part.base, part.base + part.rows
        for ids in list_ids(ix, buf):
            if ids.min() < lo or ids.max() >= hi:
                raise StructureError(f"{name} holds ids outside rows [{lo}, {hi}) of the docstore (e.g. "
                                     f"{int(ids[(ids < lo) | (ids >= hi)][0])}); the index is corrupt, rebuild "
                                     "the bundle")
            seen[ids] = True
            marked += len(ids)
    found = int(np.count_nonzero(seen))
    if found != marked or found != total:
        raise StructureError(f"{', '.join(data_names)} hold {marked} ids for {found} distinct docstore rows "
                             f"of {total}: some rows are duplicated or missing; the index is corrupt, "
                             "rebuild the bundle")


def check_bundle(manifest: dict, pinned: Mapping[str, PinnedFile], where: str) -> CheckedBundle:
    """Validate the structure of a bundle whose listed files are ``pinned`` (by relative path) and return
    what was found, with its docstore open. Raises a ValueError naming the file at fault."""
    needed = required_files(manifest, where)
    layout = manifest["layout"]
    maps = {rel: pinned[rel].map() for rel in needed if not rel.startswith("docstore/")}
    names = {rel: pinned[rel].name for rel in needed}
    trained = parse_ivf(maps[TRAINED], names[TRAINED])
    if trained.ntotal != 0:
        raise StructureError(f"{trained.name} holds {trained.ntotal} vectors; the trained index must be "
                             "empty. Rebuild the bundle")
    _check_manifest_facts(manifest, trained, where)
    index_names = [MERGED_INDEX] if layout == "merged" else [r for r in needed if r.startswith("shards/")]
    indexes = [parse_ivf(maps[rel], names[rel]) for rel in index_names]
    for ix in indexes:
        _same_build(ix, trained)
        if ix.lists.kind != ("ondisk" if layout == "merged" else "array"):
            raise StructureError(f"{ix.name} holds {ix.lists.kind} inverted lists, which a {layout!r} "
                                 "bundle never has; rebuild the bundle")
    if layout == "merged":
        data, data_names = [maps[MERGED_DATA]], [f"{names[MERGED_INDEX]} with {names[MERGED_DATA]}"]
        if len(data[0]) != indexes[0].lists.data_bytes:
            raise StructureError(f"{names[MERGED_DATA]} has {len(data[0])} bytes but {names[MERGED_INDEX]} "
                                 f"says {indexes[0].lists.data_bytes}; the pair is corrupt or from two "
                                 "builds, rebuild the bundle")
    else:
        data, data_names = [maps[r] for r in index_names], [names[r] for r in index_names]
    parts = [(names[r], pinned[r].use_path) for r in needed if r.startswith("docstore/")]
    checked = CheckedBundle(layout=layout, trained=trained, index_files=index_names, indexes=indexes,
                            docstore=Docstore.open_checked(parts))
    _check_counts(manifest, checked, where)
    _check_ids(checked, data, data_names)
    return checked
