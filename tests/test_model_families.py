"""The seeds' model families on the packed, padding-free forward: BERT (MiniLM), DistilBERT
(msmarco-distilbert-dot-v5) and RoBERTa (distilroberta-base-msmarco-v2, XLM-R) give the vectors
``SentenceTransformer.encode`` gives, in fp32 to 1e-5, loaded by sentence-transformers or read from the
model directory's files, with mean and CLS pooling."""

from __future__ import annotations

import random

import numpy as np
import pytest

from densebeam.index_store.encoding import encoder as encoder_mod
from densebeam.index_store.encoding.encoder import load_encoder
from densebeam.index_store.encoding.model_files import read_bert_directory
from conftest import _WORDS, build_tiny_bi_encoder

ARCHS = ("bert", "distilbert", "roberta")


def _texts(n, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choices(_WORDS, k=rng.randint(1, 70))) + rng.choice(["", ".", " 42!"]) for _ in range(n)]


@pytest.fixture(scope="module", params=[(a, p) for a in ARCHS for p in ("mean", "cls")],
                ids=lambda ap: f"{ap[0]}-{ap[1]}")
def family_model(request, tmp_path_factory):
    arch, pooling = request.param
    path = build_tiny_bi_encoder(tmp_path_factory.mktemp(f"tiny-{arch}-{pooling}"), normalize=pooling == "mean",
                                 arch=arch, pooling=pooling, hidden=64, seed=len(arch))
    return arch, str(path)


def test_packed_vectors_equal_sentence_transformers(family_model):
    from sentence_transformers import SentenceTransformer

    arch, path = family_model
    files, why = read_bert_directory(path)
    assert files is not None, why  # read from its files: sentence-transformers is not needed to encode
    encoder_mod._LOADED.clear()
    enc = load_encoder(path, precision="fp32", device="cpu")
    assert enc.packed and enc.files is not None
    st = SentenceTransformer(path, device="cpu")
    texts = _texts(90, seed=3)
    ref = st.encode(texts, convert_to_numpy=True, batch_size=16)
    got = enc.encode(texts)
    if enc.similarity == "cos":
        ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    # the same model loaded by sentence-transformers (not from its files) runs packed too
    enc_st = encoder_mod.Encoder(st, path, enc.similarity, "cpu", "fp32")
    assert enc_st.packed, enc_st.packed_unsupported
    np.testing.assert_allclose(enc_st.encode(texts), got, rtol=0, atol=1e-6)
    # one passage alone: the same bits as in its batch
    np.testing.assert_array_equal(enc.encode([texts[5]])[0], got[5])
