"""The embeddings-dir contract: Parquet shards of (id, embedding[, text, title]) + rejected/ + _manifest.json.

No Beam import. The writer side (:mod:`transforms.write`) and every reader (index build, tests, users)
share the schema and manifest helpers here.
"""

from __future__ import annotations

import dataclasses
import json
from types import MappingProxyType
from typing import Iterator, Mapping, Optional, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from densebeam.index_store.types import ModelFacts

MANIFEST = "_manifest.json"
# a run fails, publishing nothing, when dead letters of a reason pass this share of the records read
DEFAULT_MAX_REJECTED_SHARE = {"encode_failed": 0.01, "bad_embedding": 0.01, "*": 0.5}
FORMAT = "densebeam.embeddings"
FORMAT_VERSION = 1
FACTS_KEY = b"densebeam.model_facts"
SHARD_PATTERN = "part-{index:05d}-of-{count:05d}.parquet"
REJECTED_DIR = "rejected"
REJECTED_PATTERN = "part-{index:05d}-of-{count:05d}.jsonl"
TEMP_DIR = "_temporary"


def arrow_schema(facts: ModelFacts, with_text: bool = True, with_hash: bool = False,
                 extra_metadata: Optional[dict] = None) -> pa.Schema:
    value_type = pa.float16() if facts.dtype == "float16" else pa.float32()
    fields = [pa.field("id", pa.string(), nullable=False),
              pa.field("embedding", pa.list_(pa.field("item", value_type, nullable=False), facts.dim),
                       nullable=False)]
    if with_text:
        fields += [pa.field("text", pa.string()), pa.field("title", pa.string())]
    if with_hash:  # sha256 of the encoded text: the key of the embedding cache (incremental runs)
        fields.append(pa.field("text_hash", pa.string()))
    return pa.schema(fields, metadata={FACTS_KEY: facts.to_json().encode(), **(extra_metadata or {})})


def to_table(facts: ModelFacts, ids: Sequence[str], vectors: np.ndarray,
             texts: Optional[Sequence[str]] = None, titles: Optional[Sequence[str]] = None,
             text_hashes: Optional[Sequence[str]] = None, extra_metadata: Optional[dict] = None) -> pa.Table:
    """Columns for one row group; ``vectors`` is (n, dim) and is cast to the facts' dtype."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float16 if facts.dtype == "float16" else np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != facts.dim:
        raise ValueError(f"vectors must have shape (n, {facts.dim}), got {vectors.shape}")
    flat = pa.array(vectors.reshape(-1), type=pa.float16() if facts.dtype == "float16" else pa.float32())
    emb = pa.FixedSizeListArray.from_arrays(flat, facts.dim)
    schema = arrow_schema(facts, with_text=texts is not None, with_hash=text_hashes is not None,
                          extra_metadata=extra_metadata)
    cols = [pa.array(list(ids), pa.string()), emb]
    if texts is not None:
        cols += [pa.array(list(texts), pa.string()),
                 pa.array(list(titles) if titles is not None else [""] * len(ids), pa.string())]
    if text_hashes is not None:
        cols.append(pa.array(list(text_hashes), pa.string()))
    return pa.Table.from_arrays(cols, schema=schema)


def facts_from_schema(schema: pa.Schema, where: str) -> ModelFacts:
    meta = schema.metadata or {}
    if FACTS_KEY not in meta:
        raise ValueError(f"{where}: Parquet schema has no densebeam model facts; was it written by "
                         "densebeam encode?")
    return ModelFacts.from_dict(json.loads(meta[FACTS_KEY]))


@dataclasses.dataclass(frozen=True)
class ShardEntry:
    """One Parquet shard of an embeddings dir: its name relative to the dir and its row count."""

    path: str
    rows: int


@dataclasses.dataclass(frozen=True)
class EmbeddingsManifest:
    """The typed view of ``_manifest.json``: what readers use, checked at open (:func:`parse_manifest`);
    ``raw`` keeps the whole JSON object (precision record, timings, dead-letter files)."""

    format_version: int
    facts: ModelFacts
    shards: tuple[ShardEntry, ...]
    counts: Mapping[str, int]
    raw: Mapping

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)


def parse_manifest(manifest: object, where: str) -> EmbeddingsManifest:
    """The record of a manifest JSON object, or ValueError naming the first missing or malformed field."""
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{where} is not a densebeam embeddings manifest")
    version = manifest.get("format_version", 0)
    if type(version) is not int or version < 1:
        raise ValueError(f"{where} has a malformed format_version {version!r}; the manifest is damaged, "
                         "run densebeam encode again")
    if version > FORMAT_VERSION:
        raise ValueError(f"{where} has format version {version}, newer than this densebeam understands "
                         f"({FORMAT_VERSION}); upgrade densebeam")

    def bad(field: str, value) -> ValueError:
        return ValueError(f"{where} has a missing or malformed {field} ({str(value)[:120]}); the manifest is "
                          "damaged or was edited: run densebeam encode again")

    try:
        facts = ModelFacts.from_dict(manifest["model_facts"])
    except (KeyError, TypeError, ValueError) as err:
        raise bad("model_facts", manifest.get("model_facts")) from err
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise bad("shards", shards)
    entries = []
    for i, entry in enumerate(shards):
        ok = isinstance(entry, dict) and isinstance(entry.get("path"), str) and entry["path"] \
            and not entry["path"].startswith("/") and ".." not in entry["path"].split("/") \
            and type(entry.get("rows")) is int and entry["rows"] >= 0
        if not ok:
            raise bad(f"shards[{i}]", entry)
        entries.append(ShardEntry(entry["path"], entry["rows"]))
    counts = manifest.get("counts")
    if not isinstance(counts, dict) or not all(type(counts.get(k)) is int and counts[k] >= 0
                                               for k in ("read", "encoded", "rejected")):
        raise bad("counts", counts)
    return EmbeddingsManifest(format_version=version, facts=facts, shards=tuple(entries),
                              counts=MappingProxyType(dict(counts)), raw=MappingProxyType(manifest))


@dataclasses.dataclass(frozen=True)
class EmbeddingsDir:
    """An opened embeddings dir (manifest read and checked; shards not loaded)."""

    root: str
    manifest: dict  # the JSON object as read
    record: EmbeddingsManifest  # the same manifest, typed (what readers use)

    @property
    def facts(self) -> ModelFacts:
        return self.record.facts

    @property
    def counts(self) -> dict:
        return dict(self.record.counts)

    @property
    def shard_paths(self) -> list[str]:
        return [join(self.root, s.path) for s in self.record.shards]

    @property
    def num_vectors(self) -> int:
        return int(self.counts["encoded"])

    def iter_batches(self, batch_rows: int = 65536, columns: Sequence[str] = ("id", "embedding"),
                     shards: Optional[Sequence[str]] = None) -> Iterator[tuple[list, np.ndarray]]:
        """Stream (ids, float32 vectors) in batches of at most ``batch_rows``; memory is one batch."""
        for path in shards if shards is not None else self.shard_paths:
            yield from iter_shard(path, batch_rows, columns)


def iter_shard(path: str, batch_rows: int = 65536, columns: Sequence[str] = ("id", "embedding")):
    with fsspec.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        dim = pf.schema_arrow.field("embedding").type.list_size
        for batch in pf.iter_batches(batch_size=batch_rows, columns=list(columns)):
            ids = batch.column(0).to_pylist()
            values = batch.column(1).values.to_numpy(zero_copy_only=False)
            yield ids, np.asarray(values, dtype=np.float32).reshape(-1, dim)


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/")] + [p.strip("/") for p in parts])


def open_embeddings(root: str) -> EmbeddingsDir:
    """Read ``_manifest.json``; an embeddings dir without one is incomplete (its run did not finish)."""
    path = join(root, MANIFEST)
    try:
        with fsspec.open(path, "r", encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{root} has no {MANIFEST}: not an embeddings dir, or the encode run that "
                                "writes it did not finish; run densebeam encode again") from err
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the manifest is damaged, run densebeam encode "
                         "again") from err
    return EmbeddingsDir(root=root.rstrip("/"), manifest=manifest, record=parse_manifest(manifest, path))
