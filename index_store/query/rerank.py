"""Cross-encoder re-ranking of first-stage hits. No Beam.

``rerank(queries, results, depth)`` scores the top ``depth`` hits of every query with the cross-encoder
and returns them re-sorted by its score (the same :class:`Hit` shape, ``score`` replaced). All (query,
passage) pairs of all queries are scored in one call: BERT-family cross-encoders (BERT, MiniLM, TinyBERT,
DistilBERT, RoBERTa, XLM-R) on the packed, padding-free forward of the bi-encoder
(:mod:`index_store.encoding.packed_cross`: no padding, native kernels, CPU lanes), any other through
sentence-transformers' ``CrossEncoder.predict``. Precision ``auto``: ``bf16-mixed`` on CPUs with bf16
arithmetic (bf16 products, a float32 residual stream), fp16 on CUDA, ``int16`` on other x86-64 CPUs with
AVX2 or AVX-512 (integer products, a float32 residual stream: the native int16 kernels) where the model
runs packed, else fp32.

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

from densebeam.index_store.encoding import cpu
from densebeam.index_store.encoding.encoder import check_precision, pick_device
from densebeam.index_store.query.hits import Hit, sort_hits

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 64
DEFAULT_DEPTH = 100


def rerank_precision(precision: str, device: str) -> str:
    """The precision a cross-encoder runs in: ``auto`` is fp16 on CUDA, bf16-mixed on CPUs with bf16
    arithmetic, int16 on other x86-64 CPUs with AVX2 or AVX-512, else fp32; others as given (checked as
    the bi-encoder checks them). int16 needs the packed forward and the native kernels: where either is
    missing, :class:`CrossEncoderReranker` runs ``auto`` in fp32 and refuses an explicit ``int16``."""
    check_precision(precision, device)
    if precision != "auto":
        return precision
    if device == "cuda":
        return "fp16"
    if cpu.native_bf16():
        return "bf16-mixed"
    return "int16" if cpu.int16_without_bf16() else "fp32"


class CrossEncoderReranker:
    """A loaded cross-encoder. ``model`` is a Hugging Face name (e.g. cross-encoder/ms-marco-MiniLM-L6-v2)
    or a local directory holding a sequence-classification model with one label and its tokenizer.
    ``packed``: None when it runs on the packed forward, else why not (then ``CrossEncoder.predict``
    runs it)."""

    def __init__(self, model: str, *, batch_size: int = DEFAULT_BATCH_SIZE, device: str = "auto",
                 precision: str = "auto", max_length: Optional[int] = None, join_title: bool = True):
        from sentence_transformers import CrossEncoder

        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.device = pick_device(device)
        self.precision = rerank_precision(precision, self.device)
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
        self._lock = threading.Lock()  # CrossEncoder.predict: one call at a time, torch already uses every core
        self._scorer, self.packed = self._packed_scorer(asked=precision)
        log.info("loaded cross-encoder %s on %s, precision %s, %s", model, self.device, self.precision,
                 "packed forward" if self._scorer is not None else f"CrossEncoder.predict ({self.packed})")

    def _packed_scorer(self, asked: str):
        """(the packed scorer, None), or (None, why it cannot run packed). int16 that cannot run here is
        fp32 when ``auto`` chose it (logged), a ValueError when asked for."""
        from densebeam.index_store.encoding.packed_cross import (PackedCrossEncoder, PackedCrossScorer, PairTokenizer,
                                                        packed_cross_support)

        hf = getattr(self.model, "model", None)
        why = packed_cross_support(hf) if hf is not None else "no transformers model"
        tok = getattr(self.model, "tokenizer", None)
        if why is None and not getattr(tok, "is_fast", False):
            why = "a slow tokenizer"
        if why is None and getattr(self.model, "default_prompt_name", None):
            why = "a default prompt"
        if why is not None:
            if self.precision == "int16":
                if asked == "int16":
                    raise ValueError(f"--precision int16 needs the packed forward, which cross-encoder {self.name!r} "
                                     f"cannot run ({why}); use auto or fp32")
                self.precision = "fp32"
            return None, why
        try:
            engine = PackedCrossEncoder.from_model(hf, self.precision, self.device)
        except ValueError as err:
            if self.precision != "int16" or asked == "int16":
                raise
            log.info("cross-encoder %s: %s; running fp32", self.name, err)
            self.precision = "fp32"
            engine = PackedCrossEncoder.from_model(hf, self.precision, self.device)
        return PackedCrossScorer(engine, PairTokenizer(tok, self.model.max_seq_length), self.model.activation_fn), None

    def _autocast(self):
        import torch

        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16  # bf16 / bf16-mixed: autocast
        return torch.autocast(device_type=self.device, dtype=dtype)

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """Cross-encoder scores (float32) of (query, passage) pairs, in input order."""
        if not pairs:
            return np.empty(0, dtype=np.float32)
        if self._scorer is not None:
            return self._scorer(list(pairs))
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
