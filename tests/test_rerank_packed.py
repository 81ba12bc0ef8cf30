"""Cross-encoders on the packed forward (index_store/encoding/packed_cross.py): BERT, DistilBERT and RoBERTa
cross-encoders give ``CrossEncoder.predict``'s fp32 scores to 1e-4 (its tokenization, truncation and
activation), a pair's score does not depend on its batch, huge passages are cut without changing a
score, and models the packed forward cannot run fall back to ``CrossEncoder.predict``."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from densebeam.index_store.encoding import cpu
from densebeam.index_store.query.rerank import CrossEncoderReranker
from conftest import _WORDS
from query_fixtures import build_tiny_cross_encoder


def _pairs(n, seed, long_every=7):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = " ".join(rng.choices(_WORDS, k=rng.randint(1, 12)))
        words = rng.randint(150, 260) if i % long_every == 0 else rng.randint(1, 60)  # some over 128 tokens
        out.append((q, " ".join(rng.choices(_WORDS, k=words)) + rng.choice(["", ".", " 7!"])))
    return out


@pytest.fixture(scope="module", params=["bert", "distilbert", "roberta"])
def cross(request, tmp_path_factory):
    return request.param, build_tiny_cross_encoder(tmp_path_factory.mktemp(f"ce-{request.param}"), seed=5,
                                                   hidden=64, arch=request.param)


def test_packed_scores_equal_cross_encoder_predict(cross):
    arch, path = cross
    rr = CrossEncoderReranker(path, precision="fp32", device="cpu")
    assert rr.packed is None and rr._scorer is not None
    pairs = _pairs(120, seed=1)
    want = rr.model.predict(pairs, batch_size=16, show_progress_bar=False, convert_to_numpy=True)
    got = rr.score_pairs(pairs)
    assert got.dtype == np.float32 and got.shape == (120,)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.std(got) > 0.01  # the scores spread: the comparison means something
    # a pair alone gets the very bits it gets in its batch
    for i in (0, 3, 77):
        assert rr.score_pairs([pairs[i]])[0] == got[i]


def test_a_huge_passage_is_cut_without_changing_its_score(tmp_path):
    path = build_tiny_cross_encoder(tmp_path / "ce", seed=6, hidden=64)
    rr = CrossEncoderReranker(path, precision="fp32", device="cpu")
    limit = rr._scorer.tokenizer.limit
    rng = random.Random(4)
    huge = " ".join(rng.choices(_WORDS, k=limit // 3))  # ~4x the cut
    assert len(huge) > limit
    no_space = "x" * (limit + 50)  # no whitespace after the kept tokens: the whole passage is tokenized
    pairs = [("river music", huge), ("film", huge[:limit + 3]), ("water", no_space)]
    want = rr.model.predict(pairs, show_progress_bar=False, convert_to_numpy=True)
    np.testing.assert_allclose(rr.score_pairs(pairs), want, rtol=0, atol=1e-4)


def test_precision_follows_the_cpu(tmp_path, monkeypatch):
    path = build_tiny_cross_encoder(tmp_path / "ce", seed=7, hidden=64)
    assert CrossEncoderReranker(path, device="cpu").precision == ("bf16-mixed" if cpu.native_bf16() else "fp32")
    monkeypatch.setenv("DENSEBEAM_MAX_CPU_ISA", "avx2")  # a CPU without bf16 arithmetic
    assert CrossEncoderReranker(path, device="cpu").precision == "fp32"
    for precision in ("bf16", "bf16-mixed"):
        with pytest.raises(ValueError, match="needs bf16 arithmetic"):
            CrossEncoderReranker(path, precision=precision, device="cpu")


def test_models_the_packed_forward_cannot_run_use_cross_encoder_predict(tmp_path):
    build_tiny_cross_encoder(tmp_path / "ce", seed=8, hidden=64)
    cfg_path = tmp_path / "ce" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["position_embedding_type"] = "relative_key"  # relative positions: not the packed layout
    cfg_path.write_text(json.dumps(cfg))
    rr = CrossEncoderReranker(str(tmp_path / "ce"), precision="fp32", device="cpu")
    assert rr._scorer is None and "relative position" in rr.packed
    pairs = _pairs(20, seed=2)
    np.testing.assert_array_equal(rr.score_pairs(pairs), rr.model.predict(pairs, batch_size=64, show_progress_bar=False,
                                                                          convert_to_numpy=True))
