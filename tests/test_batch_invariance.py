"""A passage's vector does not depend on which passages share its batch beyond float rounding: the packed
(padding-free) forward computes each passage on its own tokens, so encoding it alone, in any subset or in
any order gives the same vector to within BOUND (1e-6 absolute; on the real model, fp32 and bf16 alike,
the very same bits here). This is what makes a resumed run, another worker count or another runner
produce the same embeddings, and so the same index."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from densebeam.index_store.encoder import load_encoder
from conftest import SHARED_DATA, make_passages


def _texts_real(n):
    with open(SHARED_DATA / "dl19-subset" / "corpus.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(n))]


BOUND = 1e-6  # absolute, per component (the matrix kernels may round one row differently by its batch)


def _check(enc, texts):
    base = enc.encode(texts)
    rng = random.Random(7)
    for _ in range(3):
        subset = rng.sample(range(len(texts)), rng.randint(2, len(texts)))  # another batch, other order
        np.testing.assert_allclose(enc.encode([texts[i] for i in subset]), base[subset], rtol=0, atol=BOUND)
    alone = np.stack([enc.encode([texts[i]])[0] for i in range(0, len(texts), 4)])
    np.testing.assert_allclose(alone, base[::4], rtol=0, atol=BOUND)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_tiny_model_vectors_are_batch_invariant(tiny_cos_model, precision):
    texts = [r["title"] + " " + r["text"] for r in make_passages(80, seed=12)]
    _check(load_encoder(tiny_cos_model, precision=precision, device="cpu"), texts)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_real_model_vectors_are_batch_invariant(precision):
    if not (SHARED_DATA / "dl19-subset").exists():
        pytest.skip("../shared/data/dl19-subset is not here")
    _check(load_encoder("sentence-transformers/all-MiniLM-L6-v2", precision=precision, device="cpu"),
           _texts_real(48))
