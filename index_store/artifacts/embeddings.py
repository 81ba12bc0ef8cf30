"""The embeddings-dir contract: Parquet shards of (id, embedding[, text, title]) + rejected/ + _manifest.json.

No Beam import. The writer side (:mod:`transforms.write`) and every reader (index build, tests, users)
share the schema and manifest helpers here.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterator, Optional, Sequence

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
class EmbeddingsDir:
    """An opened embeddings dir (manifest read; shards not loaded)."""

    root: str
    manifest: dict

    @property
    def facts(self) -> ModelFacts:
        return ModelFacts.from_dict(self.manifest["model_facts"])

    @property
    def counts(self) -> dict:
        return self.manifest["counts"]

    @property
    def shard_paths(self) -> list[str]:
        return [join(self.root, s["path"]) for s in self.manifest["shards"]]

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
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a densebeam embeddings manifest")
    if int(manifest.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {manifest['format_version']}, newer than this "
                         f"densebeam understands ({FORMAT_VERSION}); upgrade densebeam")
    return EmbeddingsDir(root=root.rstrip("/"), manifest=manifest)
