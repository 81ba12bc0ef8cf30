"""Cross-encoders on the packed forward (index_store/encoding/packed_cross.py): BERT, DistilBERT and RoBERTa
cross-encoders give ``CrossEncoder.predict``'s fp32 scores to 1e-4 (its tokenization, truncation and
activation), a pair's score does not depend on its batch, huge passages are cut without changing a
score, int16 keeps fp32's scores to its rounding, and models the packed forward cannot run fall back to
``CrossEncoder.predict``."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from densebeam.index_store.encoding import cpu
from densebeam.index_store.query.rerank import CrossEncoderReranker
from conftest import _WORDS
from kernel_checks import int16_kernels_here
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
    # a pair alone gets the very bits it gets in its batch (the head and the activation included: a
    # batch's last few scores go through PyTorch's scalar tail code), and so does the batch reversed
    assert np.array_equal([rr.score_pairs([p])[0] for p in pairs], got)
    assert np.array_equal(rr.score_pairs(pairs[::-1])[::-1], got)


def test_the_default_precision_scores_a_pair_alike_in_any_batch(cross):
    """auto (bf16-mixed, int16 or fp32 by CPU): a pair alone, in its batch and in the batch reversed."""
    _, path = cross
    rr = CrossEncoderReranker(path, device="cpu")
    pairs = _pairs(60, seed=4)
    got = rr.score_pairs(pairs)
    assert np.array_equal([rr.score_pairs([p])[0] for p in pairs], got), rr.precision
    assert np.array_equal(rr.score_pairs(pairs[::-1])[::-1], got), rr.precision


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
    """auto: bf16-mixed with bf16 arithmetic; int16 on AVX2 and AVX-512 without it (native kernels), fp32
    where those cannot be built; bf16 is refused where the CPU would emulate it."""
    path = build_tiny_cross_encoder(tmp_path / "ce", seed=7, hidden=64)
    if cpu.native_bf16():
        assert CrossEncoderReranker(path, device="cpu").precision == "bf16-mixed"
    for cap in ("avx512", "avx2"):
        if cpu.family() == "avx2" and cap == "avx512":
            continue
        monkeypatch.setenv("DENSEBEAM_MAX_CPU_ISA", cap)  # a CPU without bf16 arithmetic
        assert cpu.family() == cap
        assert CrossEncoderReranker(path, device="cpu").precision == ("int16" if int16_kernels_here() else "fp32")
        for precision in ("bf16", "bf16-mixed"):
            with pytest.raises(ValueError, match="needs bf16 arithmetic"):
                CrossEncoderReranker(path, precision=precision, device="cpu")
    monkeypatch.setenv("DENSEBEAM_NATIVE", "0")  # no native kernels: auto is fp32, int16 is refused by name
    assert CrossEncoderReranker(path, device="cpu").precision == "fp32"
    with pytest.raises(ValueError, match="int16 products unavailable"):
        CrossEncoderReranker(path, precision="int16", device="cpu")


@pytest.mark.parametrize("cap", ["native", "avx2"])
def test_int16_scores_follow_fp32_and_do_not_depend_on_the_batch(cross, cap, monkeypatch):
    """int16 (integer matrix products, the rest float32) keeps fp32's scores to its rounding and their
    order, and gives a pair alone the bits it gets in any batch. The tiny random models amplify rounding
    far more than a trained one (test_rerank_quality checks the trained cross-encoder at 0.01 logits)."""
    if cap != "native":
        monkeypatch.setenv("DENSEBEAM_MAX_CPU_ISA", cap)
    if not int16_kernels_here():
        pytest.skip(f"no native int16 kernels on this CPU (family {cpu.family()})")
    _, path = cross
    fp32 = CrossEncoderReranker(path, precision="fp32", device="cpu")
    int16 = CrossEncoderReranker(path, precision="int16", device="cpu")
    assert int16.precision == "int16" and int16.packed is None
    pairs = _pairs(120, seed=3)
    want, got = fp32.score_pairs(pairs), int16.score_pairs(pairs)
    diff = np.abs(got - want)
    assert got.dtype == np.float32 and np.std(want) > 0.1
    assert 0 < np.mean(diff) < 0.005 and np.max(diff) < 0.08, (np.mean(diff), np.max(diff))  # sigmoid scores
    ranks = [np.argsort(np.argsort(v)) for v in (want, got)]
    assert np.corrcoef(*ranks)[0, 1] > 0.998
    assert np.array_equal([int16.score_pairs([p])[0] for p in pairs], got)
    assert np.array_equal(int16.score_pairs(pairs[::-1])[::-1], got)


def test_models_the_packed_forward_cannot_run_use_cross_encoder_predict(tmp_path):
    build_tiny_cross_encoder(tmp_path / "ce", seed=8, hidden=64)
    cfg_path = tmp_path / "ce" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["position_embedding_type"] = "relative_key"  # relative positions: not the packed layout
    cfg_path.write_text(json.dumps(cfg))
    rr = CrossEncoderReranker(str(tmp_path / "ce"), precision="fp32", device="cpu")
    assert rr._scorer is None and "relative position" in rr.packed
    if cpu.family() in ("avx2", "avx512"):  # auto would be int16 here: it needs the packed forward
        assert CrossEncoderReranker(str(tmp_path / "ce"), device="cpu").precision == "fp32"
    if cpu.family() in ("avx2", "avx512", "avx512-bf16"):
        with pytest.raises(ValueError, match="int16 needs the packed forward.*relative position"):
            CrossEncoderReranker(str(tmp_path / "ce"), precision="int16", device="cpu")
    pairs = _pairs(20, seed=2)
    np.testing.assert_array_equal(rr.score_pairs(pairs), rr.model.predict(pairs, batch_size=64, show_progress_bar=False,
                                                                          convert_to_numpy=True))
