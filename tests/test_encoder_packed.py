"""The encoder's padding-free (packed) forward pass, its one-pass tokenization with a bounded character
cut, and ``auto`` precision by measurement; with the tests' tiny BERT models (real sentence-transformers
models with random weights), compared with ``SentenceTransformer.encode``."""

from __future__ import annotations

import random

import numpy as np
import pytest

from densebeam.index_store.encoding import cpu
from densebeam.index_store.encoding.encoder import (CALIBRATION_PASSAGES, CHARS_PER_TOKEN, Encoder, clip_text, load_encoder)
from densebeam.index_store.encoding.packed_bert import PackedBert, packed_support
from conftest import _WORDS, build_tiny_bi_encoder


def _texts(n, seed=0, lo=1, hi=90):
    rng = random.Random(seed)
    return [" ".join(rng.choices(_WORDS, k=rng.randint(lo, hi))) for _ in range(n)]


def _st(path):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu")


def _min_cos(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.min(np.sum(a * b, axis=1)))


@pytest.mark.parametrize("fixture", ["tiny_cos_model", "tiny_dot_model"])
def test_packed_fp32_equals_sentence_transformers(request, fixture):
    path = request.getfixturevalue(fixture)
    texts = _texts(150, seed=1) + ["", "river", "a " * 200]  # empty, one word, truncated
    ref = _st(path).encode(texts, convert_to_numpy=True)
    # a small budget: many batches, each with several lengths (several attention groups)
    enc = load_encoder(path, precision="fp32", device="cpu", token_budget=300)
    assert enc.packed and enc.precision == "fp32"
    got = enc.encode(texts)
    assert got.shape == ref.shape and got.dtype == np.float32
    if enc.similarity == "cos":
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    else:  # dot: raw vectors, as the model gives them
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(ref, axis=1), rtol=1e-4)
    assert _min_cos(got, ref) >= 0.99999


def test_batches_do_not_change_vectors_beyond_rounding(tiny_cos_model):
    texts = _texts(60, seed=2)
    enc = load_encoder(tiny_cos_model, precision="fp32", device="cpu")
    together = enc.encode(texts)
    alone = np.stack([enc.encode([t])[0] for t in texts])
    assert _min_cos(together, alone) >= 0.99999


def test_packed_batches_hold_at_most_the_budget_in_real_tokens(tiny_cos_model):
    enc = load_encoder(tiny_cos_model, precision="fp32", device="cpu", token_budget=100)
    lengths = np.array([5, 60, 30, 30, 7, 64, 1, 99, 101])
    batches = enc.plan_batches(lengths)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    for b in batches:  # longest first, under budget unless one passage alone is over it
        assert lengths[b].sum() <= 100 or len(b) == 1
    flat = np.concatenate(batches)
    assert list(lengths[flat]) == sorted(lengths, reverse=True)
    padded = enc.plan_batches(lengths, packed=False)
    assert all(len(b) * lengths[b].max() <= 100 or len(b) == 1 for b in padded)


def test_a_huge_passage_is_cut_before_tokenization_with_the_same_tokens(tiny_cos_model):
    enc = load_encoder(tiny_cos_model, precision="fp32", device="cpu")
    msl = enc.max_seq_length
    normal = " ".join(_texts(1, seed=3, lo=80, hi=80))
    huge = (normal + " ") * (2 ** 20 // len(normal))  # ~1 MiB
    assert len(huge) > 2 ** 20 - 2 * len(normal)
    assert len(clip_text(huge, msl)) == msl * CHARS_PER_TOKEN
    tok = enc.model.tokenizer
    full = tok([huge], truncation=True, max_length=msl)["input_ids"][0]
    ids, _ = enc.tokenize([huge])
    assert ids[0] == full and len(full) == msl
    # the vector is the one of its first max_seq_length tokens, as sentence-transformers gives it
    ref = _st(tiny_cos_model).encode([huge[:10_000]], convert_to_numpy=True)
    assert _min_cos(enc.encode([huge]), ref) >= 0.99999


def test_a_cut_that_could_change_tokens_is_tokenized_again(tiny_cos_model):
    """Text whose kept tokens span more characters than the cut (a whitespace flood): the cut is
    detected as unsafe and the text tokenized from a longer cut, giving the full text's tokens."""
    enc = load_encoder(tiny_cos_model, precision="fp32", device="cpu")
    msl = enc.max_seq_length
    flood = "river" + " " * (msl * CHARS_PER_TOKEN) + " ".join(["music"] * 300)
    tok = enc.model.tokenizer
    full = tok([flood], truncation=True, max_length=msl)["input_ids"][0]
    ids, _ = enc.tokenize([flood])
    assert ids[0] == full
    assert tok([clip_text(flood, msl)], truncation=True, max_length=msl)["input_ids"][0] != full


def _needs_bf16():
    if not cpu.native_bf16():
        pytest.skip(f"this CPU ({cpu.family()}) has no bf16 arithmetic: auto measures nothing here "
                    "(test_auto_without_bf16_arithmetic_is_fp32_unmeasured covers it)")


def test_auto_measures_the_precision_and_records_it(tiny_cos_model):
    _needs_bf16()
    enc = load_encoder(tiny_cos_model, precision="auto", device="cpu", token_budget=1000)
    assert enc.precision == "auto" and enc.calibration is None
    texts = _texts(200, seed=4)
    got = enc.encode(texts)  # the first call measures on a sample of its texts, then encodes
    rec = enc.calibration
    assert rec is not None and enc.precision == rec["chosen"] in rec["candidates"]
    assert rec["sample_passages"] == CALIBRATION_PASSAGES and set(rec["candidates"]) >= {"fp32", "bf16"}
    # head size 16: no native kernels for this model, so bf16-mixed runs PyTorch's residual connections and
    # bf16 (faster there) is measured too, after the preferred bf16-mixed
    assert list(rec["candidates"]) == ["fp32", "bf16-mixed", "bf16"] == ["fp32", *enc.candidates()]
    chosen = rec["candidates"][rec["chosen"]]
    assert chosen["faithful"] and chosen["min_cosine"] >= rec["min_cosine_required"]
    # the fastest faithful candidate, in order (fp32 first), a later one winning only by the tie margin
    best, cands = "fp32", rec["candidates"]
    for name, c in cands.items():
        if c["faithful"] and c["passages_per_s"] > cands[best]["passages_per_s"] * (1 + rec["tie_margin"]):
            best = name
    assert best == rec["chosen"]
    fp32 = load_encoder(tiny_cos_model, precision="fp32", device="cpu").encode(texts)
    assert _min_cos(got, fp32) >= 0.999
    assert enc.facts().precision == enc.precision


def test_explicit_precision_is_not_measured(tiny_cos_model):
    enc = load_encoder(tiny_cos_model, precision="fp32", device="cpu", token_budget=999)
    enc.encode(_texts(5))
    assert enc.calibration is None and enc.precision == "fp32"


def test_auto_without_bf16_arithmetic_or_native_kernels_is_fp32_unmeasured(tiny_cos_model, monkeypatch):
    """A CPU without bf16 arithmetic (simulated by a cap where this one has it) and without the native
    int16 products (turned off): nothing is timed, fp32 is chosen and gives fp32's very vectors. (With
    them, tests/test_native_int16.py: int16 is measured against fp32.)"""
    monkeypatch.setenv("DENSEBEAM_MAX_CPU_ISA", "avx2")
    monkeypatch.setenv("DENSEBEAM_NATIVE", "0")
    enc = load_encoder(tiny_cos_model, precision="auto", device="cpu", token_budget=1001)
    assert enc.candidates() == []
    texts = _texts(200, seed=4)
    got = enc.encode(texts)
    assert enc.precision == "fp32" and enc.calibration["measured"] is False and "candidates" not in enc.calibration
    np.testing.assert_array_equal(got, load_encoder(tiny_cos_model, precision="fp32", device="cpu",
                                                    token_budget=1001).encode(texts))
    lone = load_encoder(tiny_cos_model, precision="auto", device="cpu", token_budget=1002)
    lone.encode(["river music"])  # a lone query: the same rule
    assert lone.precision == "fp32"
    for precision in ("bf16", "bf16-mixed"):
        with pytest.raises(ValueError, match="needs bf16 arithmetic"):
            load_encoder(tiny_cos_model, precision=precision, device="cpu", token_budget=1003)


def test_calibration_texts_decide_at_load(tiny_dot_model):
    _needs_bf16()
    enc = load_encoder(tiny_dot_model, precision="auto", device="cpu", token_budget=777,
                       calibration_texts=_texts(40, seed=5))
    assert enc.calibration["sample_passages"] == 40 and enc.precision != "auto"


def test_models_that_cannot_run_packed_use_the_padded_forward(tmp_path):
    """A Dense layer after pooling: not [Transformer, Pooling, Normalize?], so sentence-transformers'
    own forward runs (on one tokenization, padded per batch)."""
    from sentence_transformers import SentenceTransformer, models

    base = _st(str(build_tiny_bi_encoder(tmp_path / "m", normalize=False, seed=7)))
    dense = models.Dense(base.get_sentence_embedding_dimension(), 16)
    model = SentenceTransformer(modules=[base[0], base[1], dense], device="cpu")
    model.save(str(tmp_path / "dense"))
    assert packed_support(model) is not None
    texts = _texts(40, seed=6)
    ref = _st(str(tmp_path / "dense")).encode(texts, convert_to_numpy=True)
    enc = load_encoder(str(tmp_path / "dense"), precision="fp32", device="cpu", token_budget=256)
    assert not enc.packed
    got = enc.encode(texts)
    assert got.shape == (40, 16) and _min_cos(got, ref) >= 0.99999


def test_a_token_the_model_cannot_embed_raises(tmp_path):
    path = build_tiny_bi_encoder(tmp_path / "bad", normalize=True, unembedded_word="zzzq")
    enc = load_encoder(str(path), precision="fp32", device="cpu")
    with pytest.raises(IndexError):
        enc.encode(["river zzzq music"])


def test_packed_bert_checks_its_input(tiny_cos_model):
    bert = PackedBert.from_sentence_transformer(_st(tiny_cos_model), "fp32")
    with pytest.raises(ValueError, match="token ids"):
        bert(np.array([2, 5, 3], dtype=np.int64), [2, 2])
    with pytest.raises(ValueError, match="mode"):
        PackedBert.from_sentence_transformer(_st(tiny_cos_model), "int4")


def test_encoder_keeps_its_public_surface(tiny_cos_model):
    enc = load_encoder(tiny_cos_model, precision="fp32", device="cpu")
    assert isinstance(enc, Encoder)
    assert (enc.name, enc.dim, enc.similarity, enc.precision) == (tiny_cos_model, 32, "cos", "fp32")
    facts = enc.facts()
    assert facts.dim == 32 and facts.precision == "fp32" and facts.max_seq_length == enc.max_seq_length
    assert enc.encode([]).shape == (0, 32)


@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_the_padded_attention_of_gpus_equals_the_grouped_one(tiny_cos_model, mode):
    """GPUs run attention as one masked call over a padded layout (few kernel launches); checked here on
    the CPU against the grouped, mask-free attention and against sentence-transformers."""
    import torch

    st = _st(tiny_cos_model)
    texts = _texts(50, seed=8)
    ids = st.tokenizer(texts, truncation=True, max_length=st.max_seq_length)["input_ids"]
    order = np.argsort([-len(x) for x in ids], kind="stable")
    lengths = np.array([len(ids[i]) for i in order])
    flat = np.array([t for i in order for t in ids[i]], dtype=np.int64)
    with torch.inference_mode():
        grouped = PackedBert.from_sentence_transformer(st, mode, attention="groups")(flat, lengths).numpy()
        padded = PackedBert.from_sentence_transformer(st, mode, attention="padded")(flat, lengths).numpy()
    assert _min_cos(grouped, padded) >= (0.99999 if mode == "fp32" else 0.999)
    ref = st.encode(texts, convert_to_numpy=True)[order]
    assert _min_cos(padded, ref) >= (0.99999 if mode == "fp32" else 0.999)


def test_auto_with_a_lone_query_takes_the_unmeasured_default(tiny_cos_model):
    from densebeam.index_store.encoding.encoder import pick_precision

    enc = load_encoder(tiny_cos_model, precision="auto", device="cpu", token_budget=555)
    enc.encode(["river music"])
    assert enc.calibration["measured"] is False
    # where pick_precision says bf16, the encoder takes its preferred bf16 candidate: bf16-mixed
    expected = pick_precision("auto", "cpu")
    assert enc.precision == ("bf16-mixed" if expected == "bf16" else expected) == (
        enc.candidates()[0] if expected == "bf16" else expected)


def test_a_bert_directory_is_read_without_importing_sentence_transformers(tiny_cos_model):
    """The common layout is read from its files (start-up seconds saved); sentence-transformers and
    transformers are not imported, and the vectors equal sentence-transformers' own."""
    import subprocess
    import sys

    code = ("import sys, json; from densebeam.index_store.encoding.encoder import load_encoder; "
            f"e = load_encoder({tiny_cos_model!r}, precision='fp32', device='cpu'); "
            "v = e.encode(['river music', 'the city of water']); "
            "print(json.dumps([e.files is not None, 'sentence_transformers' in sys.modules, "
            "'transformers' in sys.modules, v.tolist()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    from_files, st_imported, tf_imported, vecs = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    assert from_files and not st_imported and not tf_imported
    ref = _st(tiny_cos_model).encode(["river music", "the city of water"], convert_to_numpy=True)
    assert _min_cos(np.array(vecs, dtype=np.float32), ref) >= 0.99999


def test_the_files_tokenizer_gives_transformers_token_ids(tiny_cos_model):
    enc = load_encoder(tiny_cos_model, precision="fp32", device="cpu")
    assert enc.files is not None
    texts = _texts(100, seed=9, hi=120) + ["", "  River,  MUSIC!! ", "café naïve Über", "水 river 音楽",
                                          "a" * 300, "tab\tand\nnewline"]
    ids, _ = enc.tokenize(texts)
    ref = enc.model.tokenizer(texts, truncation=True, max_length=enc.max_seq_length)["input_ids"]
    assert ids == ref


@pytest.mark.parametrize("device, cores", [("cpu", None), ("cuda", 3)])
def test_large_calls_tokenize_split_over_threads_in_order(tiny_cos_model, monkeypatch, device, cores):
    """A call of >= 512 texts is tokenized in parts on threads (CPU: the lanes; GPU: every usable core,
    3 here so the parts are uneven), and the ids come back in the texts' order, equal to one call of the
    tokenizer. (Only the tokenization runs: the encoder's device is set, no forward pass is made.)"""
    from densebeam.index_store.encoding import encoder as encoder_module

    enc = load_encoder(tiny_cos_model, precision="fp32", device="cpu")
    texts = _texts(1000, seed=11, hi=60)
    enc.tokenize(texts[:10])  # loads the tokenizer
    want = [e.ids for e in enc._tokenizer.encode_batch(texts)]
    if cores is not None:
        monkeypatch.setattr(encoder_module, "_usable_cores", lambda: cores)
    monkeypatch.setattr(enc, "device", device)
    calls = []
    real = enc._tokenizer.encode_batch
    counting = type("Counting", (), {"encode_batch": lambda self, t: calls.append(len(t)) or real(t)})
    monkeypatch.setattr(enc, "_tokenizer", counting())
    assert [e.ids for e in enc._encode_batch(texts)] == want
    assert sum(calls) == 1000 and len(calls) == (cores or encoder_module.cpu_lanes())
