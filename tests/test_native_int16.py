"""The int16 precision: the native int16 matrix products (index_store/encoding/native.py, kernels_int16.c) in
every build this CPU can run (AVX-512 with and without VNNI, AVX2; a cap makes this CPU the smaller
family), bit for bit the integer arithmetic they promise, the same bits for a row whatever its batch or
thread, safe on bad arguments; the packed forward that runs them faithful to ``SentenceTransformer.encode``;
and ``auto`` measuring int16 against fp32 on CPUs without bf16 arithmetic."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from densebeam.index_store.encoding import cpu
from densebeam.index_store.encoding import encoder as encoder_mod
from densebeam.index_store.encoding import native
from densebeam.index_store.encoding.packed_bert import PackedBert
from conftest import SHARED_DATA, _WORDS, build_tiny_bi_encoder
from kernel_checks import assert_same_from_threads, int16_kernels_here, packed_batch

# build -> (family, the cap that makes this CPU that build, the flag it needs)
_CAPS = {"avx512-vnni": ("avx512", "avx512_core_vnni", "avx512_vnni"), "avx512": ("avx512", "avx512_core", None),
         "avx2-vnni": ("avx2", "avx2_vnni", "avx_vnni"), "avx2": ("avx2", "avx2", None)}


@pytest.fixture(params=list(_CAPS))
def kernel(request, monkeypatch):
    """The int16 library built for one CPU family (a cap makes this CPU that family for densebeam)."""
    family, cap, flag = _CAPS[request.param]
    if not cpu.can_limit_to(family) or (flag and flag not in cpu.flags()):
        pytest.skip(f"this CPU cannot run as {request.param}")
    monkeypatch.setenv("DENSEBEAM_MAX_CPU_ISA", cap)
    k = native.kernels("int16")
    if k is None:
        pytest.skip(f"native int16 kernels unavailable here: {native.why_not('int16')}")
    assert k.name == f"int16-{request.param}"
    assert (k.rows, k.cols) == ((4, 16) if family == "avx2" else (8, 32))
    return k


def _reference(kernel, x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """What the kernel promises, computed here step by step in numpy: weights rounded per output channel
    and inputs per row to integers (float32 scale arithmetic, rounding half to even), products summed
    exactly in blocks of 128 inputs, each block's sum converted to float32 and added in order, then
    scaled by the row's and the channel's scale and the bias added (float32)."""
    f32 = np.float32
    top = np.abs(w).max(1)
    sw = np.where(top > 0, top / f32(kernel.weight_levels), f32(1)).astype(f32)
    wq = np.clip(np.rint(w / sw[:, None]), -kernel.weight_levels, kernel.weight_levels).astype(np.int64)
    mx = np.abs(x).max(1)
    inv = (f32(kernel.act_levels) / np.where(mx > 0, mx, f32(1))).astype(f32)
    xq = np.clip(np.rint(x * inv[:, None]), -kernel.act_levels, kernel.act_levels).astype(np.int64)
    xq[mx == 0] = 0
    sx = np.where(mx > 0, mx / f32(kernel.act_levels), f32(0)).astype(f32)
    acc = np.zeros((x.shape[0], w.shape[0]), f32)
    for k0 in range(0, x.shape[1], 128):
        block = xq[:, k0:k0 + 128] @ wq[:, k0:k0 + 128].T
        assert np.abs(block).max() < 2 ** 31  # the bound the block size guarantees
        acc = (acc + block.astype(f32)).astype(f32)
    return ((acc * sx[:, None]).astype(f32) * sw[None, :]).astype(f32) + b.astype(f32)


def _operands(kernel, rows_tiles, k, n_tiles, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows_tiles * kernel.rows, k, generator=gen)
    x[1, k // 2] = 60.0  # an outlier channel: the row's scale is set by it
    x[2] = 0.0  # a row of zeros
    w = torch.randn(n_tiles * kernel.cols, k, generator=gen) * 0.05
    w[0] = 0.0  # a channel of zeros
    return x, w, torch.randn(w.shape[0], generator=gen)


@pytest.mark.parametrize("k", [384, 301, 1536, 2])
def test_product_is_exactly_the_integer_arithmetic_it_promises(kernel, k):
    x, w, b = _operands(kernel, 3, k, 3, seed=k)
    packed = kernel.pack(w, b)
    got = kernel.linear(x, packed).numpy()
    np.testing.assert_array_equal(got, _reference(kernel, x.numpy(), w.numpy(), b.numpy()))
    # and near float64: the rounding of both operands is a few parts in 10^4 of a row's scale
    ref = x.double().numpy() @ w.double().numpy().T + b.double().numpy()
    assert np.abs(got - ref).max() < 2e-3 * np.abs(x.numpy()).max()
    np.testing.assert_array_equal(got[2], b.numpy())  # a zero row: the bias exactly


def test_gelu_in_the_product_matches_pytorch(kernel):
    x, w, b = _operands(kernel, 2, 384, 2, seed=9)
    w *= 20  # outputs over +-10: both tails of the error function
    packed = kernel.pack(w, b)
    plain = kernel.linear(x, packed)
    assert float(plain.abs().max()) > 8
    got = kernel.linear(x, packed, gelu=True)
    np.testing.assert_allclose(got.numpy(), torch.nn.functional.gelu(plain).numpy(), rtol=2e-6, atol=2e-6)


def test_a_row_gets_the_same_bits_whatever_its_batch_and_thread(kernel):
    x, w, b = _operands(kernel, 6, 768, 2, seed=4)
    packed = kernel.pack(w, b)
    whole = kernel.linear(x, packed)
    for start in range(0, x.shape[0], kernel.rows):  # each tile of rows alone
        part = kernel.linear(x[start:start + kernel.rows].contiguous(), packed)
        assert torch.equal(part, whole[start:start + kernel.rows])
    shuffled = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(1))
    assert torch.equal(kernel.linear(x[shuffled].contiguous(), packed), whole[shuffled])
    assert_same_from_threads(lambda: kernel.linear(x, packed), whole)


def test_bad_arguments_raise_instead_of_reading_out_of_bounds(kernel):
    x, w, b = _operands(kernel, 2, 64, 1, seed=2)
    packed = kernel.pack(w, b)
    with pytest.raises(TypeError):
        kernel.linear(x.double(), packed)
    with pytest.raises(ValueError, match="64 inputs"):
        kernel.linear(x[:, :32].contiguous(), packed)
    with pytest.raises(ValueError, match="multiple of"):
        kernel.linear(x[:kernel.rows + 1].contiguous(), packed)
    with pytest.raises(ValueError, match="contiguous"):
        kernel.linear(torch.zeros(64, x.shape[0]).T, packed)
    with pytest.raises(ValueError, match=f"multiple of {kernel.cols}"):
        kernel.pack(w[:kernel.cols - 1], b[:kernel.cols - 1])
    assert kernel.shape_problem([kernel.cols, 3 * kernel.cols]) is None
    assert kernel.shape_problem([kernel.cols + 8]) is not None


@pytest.fixture(scope="module")
def hd32_model(tmp_path_factory):
    return str(build_tiny_bi_encoder(tmp_path_factory.mktemp("tiny-hd32-int16"), normalize=True, hidden=64, seed=4))


def test_packed_int16_forward_is_faithful_and_batch_invariant(kernel, hd32_model):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(hd32_model, device="cpu")
    texts, lengths, flat = packed_batch(st, seed=3)
    model = PackedBert.from_sentence_transformer(st, "int16")
    assert model._int16.name == kernel.name and model.fused_layernorm and model.attention == "native"
    with torch.inference_mode():
        got = model(flat, lengths).numpy()
        one = model(flat[:lengths[0]], lengths[:1]).numpy()  # the longest passage alone
    np.testing.assert_array_equal(one[0], got[0])
    ref = st.encode(texts, convert_to_numpy=True, normalize_embeddings=False)
    unit = got / np.linalg.norm(got, axis=1, keepdims=True)
    assert float(np.min(np.sum(unit * ref, axis=1))) > 0.9999


def test_int16_is_refused_where_it_cannot_run(tiny_cos_model, monkeypatch):
    with pytest.raises(ValueError, match="int16 runs on x86-64 CPUs"):
        encoder_mod.check_precision("int16", "cuda")
    enc = encoder_mod.load_encoder(tiny_cos_model, precision="fp32", device="cpu", token_budget=1201)
    enc.packed_unsupported = "forced for the test"  # a model sentence-transformers runs padded
    with pytest.raises(ValueError, match="packed forward of BERT-family models only"):
        enc._make_runner("int16")
    monkeypatch.setenv("DENSEBEAM_NATIVE", "0")  # no native library: no int16
    with pytest.raises(ValueError, match="int16 products unavailable: DENSEBEAM_NATIVE=0"):
        encoder_mod.load_encoder(tiny_cos_model, precision="int16", device="cpu", token_budget=1202)


@pytest.mark.parametrize("cap", ["avx2", "avx512_core_vnni"])
def test_auto_without_bf16_arithmetic_measures_int16_against_fp32(tiny_cos_model, monkeypatch, cap):
    """A CPU without bf16 arithmetic (simulated): auto times int16 against fp32 on the sample and keeps the
    fastest faithful; without native kernels it is fp32, timing nothing."""
    if not cpu.can_limit_to("avx2" if cap == "avx2" else "avx512"):
        pytest.skip(f"this CPU cannot run under {cap}")
    monkeypatch.setenv("DENSEBEAM_MAX_CPU_ISA", cap)
    enc = encoder_mod.load_encoder(tiny_cos_model, precision="auto", device="cpu", token_budget=1203)
    assert enc.candidates() == ["int16"]
    rng = random.Random(5)
    texts = [" ".join(rng.choices(_WORDS, k=rng.randint(3, 40))) for _ in range(200)]
    got = enc.encode(texts)
    rec = enc.calibration
    assert rec["measured"] is True and list(rec["candidates"]) == ["fp32", "int16"]
    assert rec["kernels"]["int16"] == "native" and rec["candidates"]["int16"]["min_cosine"] > 0.9999
    c = rec["candidates"]
    margin = 1 + rec["tie_margin"]
    fastest = c["int16"]["faithful"] and c["int16"]["passages_per_s"] > c["fp32"]["passages_per_s"] * margin
    assert rec["chosen"] == ("int16" if fastest else "fp32") == enc.precision
    ref = encoder_mod.load_encoder(tiny_cos_model, precision="fp32", device="cpu", token_budget=1203).encode(texts)
    if enc.precision == "fp32":
        np.testing.assert_array_equal(got, ref)
    else:
        assert float(np.min(np.sum(got * ref, axis=1))) > 0.9999
    monkeypatch.setenv("DENSEBEAM_NATIVE", "0")
    plain = encoder_mod.load_encoder(tiny_cos_model, precision="auto", device="cpu", token_budget=1204)
    assert plain.candidates() == []
    plain.encode(texts[:40])
    assert plain.precision == "fp32" and plain.calibration["measured"] is False


def _collection(name):
    base = SHARED_DATA / name
    docs = [json.loads(line) for line in open(base / "corpus.jsonl", encoding="utf-8")]
    queries = {}
    for line in open(base / "queries.jsonl", encoding="utf-8"):
        q = json.loads(line)
        queries[q["_id"]] = q["text"]
    return docs, queries, base / "qrels.tsv"


@pytest.mark.slow
@pytest.mark.parametrize("collection", ["adi", "cisi"])
def test_int16_keeps_the_fidelity_bar_on_real_collections(collection):
    """The real model's int16 documents against fp32's (adi; every other cisi abstract), queries in fp32
    (as the query side encodes them): NDCG@10 within 0.005 and the judged queries' top-10 overlap at
    least 0.98."""
    from densebeam.index_store.query.evaluate import evaluate, read_qrels

    if not (SHARED_DATA / collection).exists():
        pytest.skip(f"../shared/data/{collection} is not here")
    if not int16_kernels_here():
        pytest.skip(f"native int16 kernels unavailable here: {native.why_not('int16')}")
    docs, queries, qrels_path = _collection(collection)
    docs = docs[::2] if len(docs) > 1000 else docs  # every other cisi abstract: the fp32 reference costs most
    qrels = read_qrels(str(qrels_path))
    qids = [q for q in queries if q in qrels]
    ids = [d["_id"] for d in docs]
    texts = [f"{d['title']} {d['text']}" if d.get("title") else d["text"] for d in docs]  # BEIR title + text
    # Passages cut at 128 tokens (half the model's 256): the products' rounding is per token, so neither the
    # cut nor the half corpus favours int16 (bench/encode_bench.py --fidelity: whole collections, full length).
    fp32 = encoder_mod.load_encoder("bundled", precision="fp32", device="cpu", max_seq_length=128)
    q = fp32.encode([queries[x] for x in qids], role="query")
    out = {}
    for precision in ("fp32", "int16"):
        enc = encoder_mod.load_encoder("bundled", precision=precision, device="cpu", max_seq_length=128)
        s = q @ enc.encode(texts).T
        top = np.argsort(-s, axis=1, kind="stable")[:, :10]
        run = {qq: {ids[j]: float(s[i, j]) for j in top[i]} for i, qq in enumerate(qids)}
        out[precision] = (top, evaluate(qrels, run, qids).metrics["ndcg@10"])
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(out["fp32"][0], out["int16"][0])])
    ndcg = (out["fp32"][1], out["int16"][1])
    print(f"\n{collection}: {len(docs)} documents, top-10 overlap {overlap:.4f}, NDCG@10 fp32 / int16 {ndcg}")
    assert overlap >= 0.98 and abs(ndcg[1] - ndcg[0]) <= 0.005, (overlap, ndcg)
