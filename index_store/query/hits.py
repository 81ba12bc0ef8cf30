"""The one result shape of the query side: :class:`Hit`, per-query lists of hits, and TREC run lines.

No Beam import. First stages (dense IVF, exact, BM25), re-rankers (bi-encoder, cross-encoder), the CLI
and the HTTP service all produce and consume ``list[list[Hit]]`` (one list per query, best first).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence, TextIO

import numpy as np

from densebeam.index_store.artifacts.docstore import Docstore


@dataclasses.dataclass(frozen=True)
class Hit:
    """One retrieved document: its id, the score that ranked it, its text and title, its FAISS row."""

    doc_id: str
    score: float
    text: str
    title: str
    row: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def rescored(self, score: float) -> "Hit":
        return dataclasses.replace(self, score=float(score))

    def passage(self, join_title: bool = True) -> str:
        """BEIR style: ``title + " " + text`` when asked and the title is not empty (what encode embeds)."""
        return f"{self.title} {self.text}" if join_title and self.title else self.text


def hits_from_rows(docstore: Docstore, scores: np.ndarray, rows: np.ndarray) -> list[list[Hit]]:
    """(q, k) scores and int64 rows (-1 = empty slot, dropped) -> per-query hit lists, best first.

    One docstore lookup for all rows of all queries (a few random pages per hit).
    """
    scores, rows = np.asarray(scores), np.asarray(rows)
    if scores.shape != rows.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and rows {rows.shape} must be the same (q, k) shape")
    docs = docstore.get(rows.reshape(-1).tolist())
    out, i = [], 0
    for q in range(rows.shape[0]):
        hits = []
        for j in range(rows.shape[1]):
            doc = docs[i]
            i += 1
            if doc is not None:
                hits.append(Hit(doc["id"], float(scores[q, j]), doc["text"], doc["title"], int(rows[q, j])))
        out.append(hits)
    return out


def sort_hits(hits: Iterable[Hit]) -> list[Hit]:
    """Best first; ties go to the smaller FAISS row (the order exact and IVF search use)."""
    return sorted(hits, key=lambda h: (-h.score, h.row))


FIRST_STAGES = ("dense", "exact", "bm25", "hybrid")  # what Searcher.retrieve starts from
RRF_K = 60  # reciprocal rank fusion's constant (Cormack et al. 2009)


def fuse_rrf(lists: Sequence[Sequence[Hit]], k: int, rrf_k: int = RRF_K) -> list[Hit]:
    """Reciprocal rank fusion (Cormack et al. 2009): each document scores sum(1 / (rrf_k + rank)) over
    the lists it appears in (ranks from 1); the top ``k`` by that score, best first, ties to the smaller
    FAISS row. The hits keep their text; ``score`` is the fused score."""
    if rrf_k < 0:
        raise ValueError(f"rrf_k must be >= 0, got {rrf_k}")
    fused: dict[int, float] = {}
    first: dict[int, Hit] = {}
    for hits in lists:
        for rank, hit in enumerate(hits, start=1):
            fused[hit.row] = fused.get(hit.row, 0.0) + 1.0 / (rrf_k + rank)
            first.setdefault(hit.row, hit)
    return sort_hits(first[row].rescored(score) for row, score in fused.items())[:k]


def write_trec_run(out: TextIO, qids: Sequence[str], results: Sequence[Sequence[Hit]], tag: str) -> int:
    """Write ``qid Q0 docid rank score tag`` lines (trec_eval's run format); return the line count."""
    if len(qids) != len(results):
        raise ValueError(f"{len(qids)} query ids for {len(results)} result lists")
    n = 0
    for qid, hits in zip(qids, results):
        for rank, hit in enumerate(hits, start=1):
            out.write(f"{qid} Q0 {hit.doc_id} {rank} {hit.score:.9g} {tag}\n")  # round-trips float32
            n += 1
    return n
