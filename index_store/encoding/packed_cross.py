"""Cross-encoders on the packed, padding-free forward of the bi-encoder. No Beam import.

A cross-encoder scores a (query, passage) pair: ``[CLS] query [SEP] passage [SEP]`` through a BERT-family
encoder (segment ids 0 for the query, 1 for the passage), the first token's final state through a small
head (dense + tanh, then one output). Here the pairs of a call are tokenized once, ordered by length and
run as :class:`index_store.encoding.packed_bert.PackedBert` batches: no padding, the native kernels where the CPU
has them, lanes on CPU cores (:func:`index_store.encoding.encoder.run_lanes`), and the last layer computes the
first token of each pair only. Scores equal sentence-transformers' ``CrossEncoder.predict`` (its
tokenization, its activation) to float rounding.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

import numpy as np

from densebeam.index_store.encoding import bert_family
from densebeam.index_store.encoding.encoder import (CHARS_PER_TOKEN, DEFAULT_TOKEN_BUDGET, RECUT_FACTOR, cpu_lanes, plan_batches,
                                           run_lanes)
from densebeam.index_store.encoding.packed_bert import PackedBert

log = logging.getLogger(__name__)


def packed_cross_support(model) -> Optional[str]:
    """Why a transformers ``*ForSequenceClassification`` model cannot run packed (None: it can): a
    BERT-family encoder (:mod:`index_store.encoding.bert_family`) with one output and a head this module knows."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return "no config"
    config = cfg.to_dict()
    why = bert_family.unsupported(config)
    if why:
        return why
    if int(getattr(cfg, "num_labels", 1)) != 1:
        return f"{cfg.num_labels} outputs"
    if bert_family.classification_head(config["model_type"], dict(model.state_dict())) is None:
        return "no classification head of a known layout"
    return None


class PackedCrossEncoder:
    """The weights of one cross-encoder laid out for packed inference in one compute mode (``fp32``,
    ``int16``, ``bf16-mixed``, ``bf16``, ``fp16``). ``__call__(ids, lengths, types)``: the token ids of pairs ordered
    by length, concatenated, their lengths and token types; returns their (n,) float32 logits."""

    def __init__(self, config: dict, weights: dict, mode: str, device: str = "cpu", attention: str = "auto"):
        import torch

        lay = bert_family.layout(config)
        head = bert_family.classification_head(lay.model_type, weights)
        if head is None:
            raise ValueError("the model has no classification head of a known layout")
        self.bert = PackedBert(lay.config, bert_family.bert_weights(lay.model_type, weights), "cls", mode, device,
                               attention, position_offset=lay.position_offset)
        dense_w, dense_b, self.act, out_w, out_b = (t.detach().to(device, torch.float32) if hasattr(t, "detach") else t
                                                    for t in head)
        self.dense, self.out = (dense_w, dense_b), (out_w, out_b)
        if out_w.shape[0] != 1:
            raise ValueError(f"the head has {out_w.shape[0]} outputs; re-ranking needs one")
        self.mode, self.device = mode, device

    @classmethod
    def from_model(cls, model, mode: str, device: str = "cpu", attention: str = "auto") -> "PackedCrossEncoder":
        """From a loaded transformers ``*ForSequenceClassification`` model (``CrossEncoder.model``)."""
        why = packed_cross_support(model)
        if why:
            raise ValueError(f"cross-encoder cannot run packed: {why}")
        return cls(model.config.to_dict(), dict(model.state_dict()), mode, device, attention)

    def __call__(self, ids: np.ndarray, lengths: Sequence[int], types: np.ndarray):
        h = self.bert(ids, lengths, types if self.bert.types is not None else None)
        return _per_row(self._head, h)

    def _head(self, x):
        import torch

        x = torch.nn.functional.linear(x, *self.dense)
        x = torch.tanh(x) if self.act == "tanh" else torch.relu(x)
        return torch.nn.functional.linear(x, *self.out)[:, 0]


def _per_row(fn, x):
    """``fn`` applied to each row of ``x`` alone (a fresh one-row copy), the results concatenated. A pair's
    score must not depend on its batch, but a matrix product may switch kernels with the row count, and
    PyTorch's elementwise functions (tanh, sigmoid) compute whole vectors with SIMD code and a tail that
    is no vector's worth in scalar code, whose last bits differ: one row at a time, every pair takes the
    same path. The head and the activation are small; the loop costs little beside the encoder."""
    import torch

    return torch.cat([fn(x[i:i + 1].clone()) for i in range(x.shape[0])])


class PairTokenizer:
    """A fast Hugging Face tokenizer applied to (query, passage) pairs as ``CrossEncoder.predict`` applies
    it (``truncation=True``, i.e. longest first, at ``max_length``), without padding. A passage longer
    than ``max_length * CHARS_PER_TOKEN * RECUT_FACTOR`` characters is cut first (a 1 MiB passage costs
    what a long normal one does) when the cut provably keeps the tokens the whole passage would give:
    the cut alone holds at least ``max_length`` tokens and whitespace follows the last of them (so every
    pair keeps what it keeps from the whole text); else the whole passage is tokenized."""

    def __init__(self, tokenizer, max_length: int):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("the packed cross-encoder needs a fast tokenizer")
        self.tok, self.max_length = tokenizer, int(max_length)
        self.limit = self.max_length * CHARS_PER_TOKEN * RECUT_FACTOR

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> tuple[list[list[int]], list[list[int]]]:
        passages = [p if len(p) <= self.limit or not self._cut_keeps_tokens(p) else p[:self.limit] for _, p in pairs]
        enc = self.tok([q for q, _ in pairs], passages, truncation=True, max_length=self.max_length,
                       return_token_type_ids=True, return_attention_mask=False)
        types = enc.get("token_type_ids") or [[0] * len(x) for x in enc["input_ids"]]
        return enc["input_ids"], types

    def _cut_keeps_tokens(self, passage: str) -> bool:
        cut = passage[:self.limit]
        enc = self.tok(cut, add_special_tokens=False, truncation=True, max_length=self.max_length,
                       return_offsets_mapping=True, return_attention_mask=False)
        offsets = enc["offset_mapping"]
        if len(offsets) < self.max_length:
            return False
        end = max(e for _, e in offsets)
        return any(c.isspace() for c in cut[end:])


class PackedCrossScorer:
    """Scores pairs with a :class:`PackedCrossEncoder`: tokenized once, batched by length under a token
    budget, run in lanes; ``activation`` (the cross-encoder's, e.g. identity for MS MARCO logits) applied
    to the logits."""

    def __init__(self, model: PackedCrossEncoder, tokenizer: PairTokenizer, activation: Optional[Callable] = None,
                 token_budget: int = DEFAULT_TOKEN_BUDGET, max_batch: int = 1 << 16):
        self.model, self.tokenizer, self.activation = model, tokenizer, activation
        self.token_budget, self.max_batch = int(token_budget), int(max_batch)

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        out = np.empty(len(pairs), dtype=np.float32)
        if not len(pairs):
            return out
        ids, types = self.tokenizer(pairs)
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        device = self.model.device
        batches = plan_batches(lengths, self.token_budget, self.max_batch, True,
                               parts=cpu_lanes() if device == "cpu" else 1)

        def run(idx):
            flat = np.fromiter((t for j in idx for t in ids[j]), dtype=np.int64, count=int(lengths[idx].sum()))
            seg = np.fromiter((t for j in idx for t in types[j]), dtype=np.int64, count=len(flat))
            logits = self.model(flat, lengths[idx], seg)
            if self.activation is not None:
                logits = _per_row(self.activation, logits)
            out[idx] = logits.float().cpu().numpy()

        run_lanes(batches, run, device)
        if not np.isfinite(out).all():
            raise FloatingPointError("the cross-encoder gave a non-finite score")
        return out
