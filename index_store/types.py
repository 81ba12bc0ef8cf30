"""Small records passed between stages. No Beam import: search services use these too."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

SIMILARITIES = ("cos", "dot")
DTYPES = ("float32", "float16")


@dataclasses.dataclass(frozen=True)
class Passage:
    """One valid corpus record, with where it came from (for deterministic duplicate resolution)."""

    id: str
    text: str
    title: str
    source_file: str
    source_pos: int  # byte offset (text formats) or row number (Parquet) of the record in source_file
    piece_start: int = 0  # where the piece it was read in starts: (file, piece_start) names the piece
    line: Optional[int] = None  # 1-based line number where known (a text piece that starts the file)

    def joined_text(self, join_title: bool, sep: str = " ") -> str:
        """BEIR style: title and text joined when asked and the title is not empty."""
        if join_title and self.title:
            return f"{self.title}{sep}{self.text}" if self.text else self.title
        return self.text

    def sort_key(self) -> tuple[str, int]:
        return (self.source_file, self.source_pos)


@dataclasses.dataclass(frozen=True)
class Rejected:
    """A record that cannot be encoded: the reason code, a human message and its source."""

    reason: str  # machine-readable code, e.g. "malformed_json", "duplicate_id"
    detail: str  # human-readable message
    source_file: str
    source_pos: int  # byte offset (text formats) or row number (Parquet); -1 when unknown
    line: Optional[int]  # 1-based line number when the reader knows it, else None
    id: Optional[str] = None
    raw: Optional[str] = None  # the start of the raw record, for debugging (truncated)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What every artifact carries about the model that made its vectors; stages refuse mismatches."""

    model: str  # Hugging Face name or local path, as given
    revision: Optional[str]
    dim: int
    similarity: str  # "cos" (unit vectors, inner product) or "dot" (raw vectors, inner product)
    dtype: str  # storage dtype of the vectors: "float32" or "float16"
    max_seq_length: Optional[int] = None
    precision: Optional[str] = None  # compute precision used to encode: fp32, bf16, fp16
    # the prompts prepended to passages and to queries ("" none; None: an artifact older than prompts)
    document_prompt: Optional[str] = None
    query_prompt: Optional[str] = None

    def __post_init__(self):
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.dim <= 0:
            raise ValueError(f"dim must be positive, got {self.dim}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelFacts":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def identity(self) -> dict[str, Any]:
        """The facts that must agree for two sets of vectors to be searchable together."""
        return {"model": self.model, "revision": self.revision, "dim": self.dim,
                "similarity": self.similarity, "dtype": self.dtype,
                "document_prompt": self.document_prompt or "", "query_prompt": self.query_prompt or ""}

    def check_compatible(self, other: "ModelFacts", what: str = "inputs") -> None:
        """Raise ValueError naming both sides when the facts that matter disagree."""
        a, b = self.identity(), other.identity()
        diff = {k: (a[k], b[k]) for k in a if a[k] != b[k]}
        if diff:
            parts = ", ".join(f"{k}: {x!r} vs {y!r}" for k, (x, y) in sorted(diff.items()))
            raise ValueError(f"model facts of {what} disagree ({parts}); re-encode with one model "
                             f"and settings, or index them separately")
