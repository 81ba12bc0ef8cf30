"""Cross-encoder re-ranking of first-stage hits, over sentence-transformers' ``CrossEncoder``. No Beam.

``rerank(queries, results, depth)`` scores the top ``depth`` hits of every query with the cross-encoder
and returns them re-sorted by its score (the same :class:`Hit` shape, ``score`` replaced). All (query,
passage) pairs of all queries go to one ``CrossEncoder.predict`` call, which sorts them by length and
batches them, so many short queries fill batches as well as one long one; precision follows
:mod:`index_store.encoder` (``auto``: bf16 autocast on CPUs with native bf16, fp16 on CUDA, else fp32).

Only the top ``depth`` hits come back: scores from two models do not mix in one ranking (trec_eval
sorts a run by score), so recall beyond ``depth`` is the first stage's recall at ``depth``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Optional, Sequence

import numpy as np

from densebeam.index_store.encoder import pick_device, pick_precision
from densebeam.index_store.query.hits import Hit, sort_hits

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64
DEFAULT_DEPTH = 100


class CrossEncoderReranker:
    """A loaded cross-encoder. ``model`` is a Hugging Face name (e.g. cross-encoder/ms-marco-MiniLM-L6-v2)
    or a local directory holding a sequence-classification model with one label and its tokenizer."""

    def __init__(self, model: str, *, batch_size: int = DEFAULT_BATCH_SIZE, device: str = "auto",
                 precision: str = "auto", max_length: Optional[int] = None, join_title: bool = True):
        from sentence_transformers import CrossEncoder

        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = pick_device(device)
        self.precision = pick_precision(precision, self.device)
        self.name, self.batch_size, self.join_title = model, int(batch_size), join_title
        try:
            self.model = CrossEncoder(model, device=self.device, max_length=max_length,
                                      local_files_only=os.path.isdir(model))
        except Exception as err:
            raise ValueError(f"cannot load cross-encoder {model!r}: {err}. Pass a local model directory or a "
                             "Hugging Face cross-encoder name this machine can download or has cached "
                             "(e.g. cross-encoder/ms-marco-MiniLM-L6-v2)") from err
        if self.model.num_labels != 1:
            raise ValueError(f"cross-encoder {model!r} has {self.model.num_labels} labels; re-ranking needs a "
                             "relevance model with one output (num_labels=1), e.g. cross-encoder/ms-marco-*")
        self.model.eval()
        self._lock = threading.Lock()  # one forward pass at a time: torch already uses every core
        log.info("loaded cross-encoder %s on %s, precision %s", model, self.device, self.precision)

    def _autocast(self):
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(device_type=self.device, dtype=dtype)

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """Cross-encoder scores (float32) of (query, passage) pairs, in input order."""
        if not pairs:
            return np.empty(0, dtype=np.float32)
        import torch

        with self._lock, torch.inference_mode(), self._autocast():
            scores = self.model.predict(list(pairs), batch_size=self.batch_size, show_progress_bar=False,
                                        convert_to_numpy=True)
        return np.asarray(scores, dtype=np.float32).reshape(len(pairs))

    def rerank(self, queries: Sequence[str], results: Sequence[Sequence[Hit]],
               depth: int = DEFAULT_DEPTH) -> list[list[Hit]]:
        """Re-score the top ``depth`` hits of each query; return them best first by the cross-encoder."""
        if len(queries) != len(results):
            raise ValueError(f"{len(queries)} queries but {len(results)} result lists")
        if depth < 1:
            raise ValueError(f"rerank depth must be positive, got {depth}")
        pairs, owners = [], []
        for qi, (query, hits) in enumerate(zip(queries, results)):
            for hit in hits[:depth]:
                pairs.append((query, hit.passage(self.join_title)))
                owners.append((qi, hit))
        scores = self.score_pairs(pairs)
        out: list[list[Hit]] = [[] for _ in queries]
        for (qi, hit), score in zip(owners, scores):
            out[qi].append(hit.rescored(score))
        return [sort_hits(hits) for hits in out]
