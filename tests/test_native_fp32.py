"""The float32 native kernels (index_store/encoding/native.py, kernels_fp32.c), in every build this CPU can run
(AVX-512, and AVX2 under an ISA cap where the CPU has more): attention and residual add + layer norm
against float64 references and PyTorch's float32 operations, the same bits for a passage whatever its
batch or thread, safe on bad arguments; and the packed fp32 forward that runs them equal to
``SentenceTransformer.encode``."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from densebeam.index_store.encoding import cpu
from densebeam.index_store.encoding import native
from densebeam.index_store.encoding.packed_bert import PackedBert, _length_groups
from conftest import build_tiny_bi_encoder
from kernel_checks import assert_same_bits_whatever_batch_and_thread, packed_batch

_CAPS = {"avx512": "avx512_core_vnni", "avx2": "avx2"}


@pytest.fixture(params=["avx512", "avx2"])
def kernel(request, monkeypatch):
    """The float32 library built for one CPU family (a cap makes this CPU that family for densebeam)."""
    if not cpu.can_limit_to(request.param):
        pytest.skip(f"this CPU is not a superset of {request.param}")
    monkeypatch.setenv("DENSEBEAM_MAX_CPU_ISA", _CAPS[request.param])
    k = native.kernels("fp32")
    if k is None:
        pytest.skip(f"native float32 kernels unavailable here: {native.why_not('fp32')}")
    assert k.name == f"fp32-{request.param}" and k.lanes == {"avx512": 16, "avx2": 8}[request.param]
    return k


def _layer(lengths, heads, hd, seed=0, scale=0.6):
    lengths = np.asarray(sorted(lengths, reverse=True), dtype=np.int64)
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(int(lengths.sum()), 3 * heads * hd, generator=gen) * scale, _length_groups(lengths)


def _torch_attention(qkv, groups, heads, hd):
    """PyTorch's float32 path (PackedBert._attend_groups)."""
    ctx = torch.zeros(qkv.shape[0], heads * hd)
    for row, n, length in groups:
        q, k, v = qkv[row:row + n * length].view(n, length, 3, heads, hd).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)), dim=-1)
        ctx[row:row + n * length] = torch.matmul(probs, v).transpose(1, 2).reshape(n * length, heads * hd)
    return ctx


def _run(kernel, qkv, groups, heads, hd):
    ctx = torch.full((qkv.shape[0], heads * hd), float("nan"))
    kernel.attend(qkv, ctx, groups, heads, hd)
    return ctx


@pytest.mark.parametrize("heads,hd", [(1, 32), (3, 32), (12, 32), (2, 64), (4, 16)])
def test_attention_matches_float64_and_pytorch(kernel, heads, hd):
    if hd % kernel.lanes:
        pytest.skip(f"head size {hd} is not a multiple of {kernel.lanes}")
    # lengths around every vector-width edge, odd and even, one token, a long passage; several per length
    lengths = [1, 2, 5, 7, 8, 9, 15, 16, 16, 17, 31, 32, 33, 47, 64, 65, 81, 81, 81, 100, 127, 200]
    qkv, groups = _layer(lengths, heads, hd, seed=heads + hd, scale=1.5)
    ref = native.reference_attention(qkv.numpy(), groups, heads, hd)
    got = _run(kernel, qkv, groups, heads, hd).numpy()
    assert np.isfinite(got).all()  # every row written
    _as_close_as_pytorch(got, ref, _torch_attention(qkv, groups, heads, hd).numpy())


def _as_close_as_pytorch(got, ref, torch_out):
    """float32 rounding of the scores dominates both errors: the kernel is as close to float64 as
    PyTorch's float32 path, whose error grows with the scores' size."""
    err, torch_err = np.abs(got - ref), np.abs(torch_out - ref)
    assert err.max() <= 1.1 * torch_err.max() + 1e-7, (err.max(), torch_err.max())
    assert err.mean() <= 1.1 * torch_err.mean() + 1e-9, (err.mean(), torch_err.mean())


def test_large_scores_stay_finite_and_exact(kernel):
    """Scores far from zero (a peaked softmax, exp of very negative numbers) and a tie."""
    qkv, groups = _layer([40, 40, 7], 2, 32, seed=3, scale=6.0)
    ref = native.reference_attention(qkv.numpy(), groups, 2, 32)
    got = _run(kernel, qkv, groups, 2, 32).numpy()
    assert np.isfinite(got).all()
    _as_close_as_pytorch(got, ref, _torch_attention(qkv, groups, 2, 32).numpy())
    tie = torch.zeros(4, 3 * 32)  # one head; every score equal: the mean of the values
    tie[:, 64:] = torch.arange(4, dtype=torch.float32)[:, None]
    assert torch.equal(_run(kernel, tie, [(0, 1, 4)], 1, 32), torch.full((4, 32), 1.5))


def test_a_passage_gets_the_same_bits_whatever_its_batch_and_thread(kernel):
    assert_same_bits_whatever_batch_and_thread(kernel, _layer, _run)


def test_bad_arguments_raise_instead_of_reading_out_of_bounds(kernel):
    qkv, groups = _layer([10, 10], 2, 32)
    ctx = torch.zeros(20, 64)
    with pytest.raises(TypeError):
        kernel.attend(qkv.to(torch.bfloat16), ctx, groups, 2, 32)
    with pytest.raises(ValueError, match="groups reach row"):
        kernel.attend(qkv[:15].contiguous(), ctx, groups, 2, 32)
    with pytest.raises(ValueError):
        kernel.attend(qkv, torch.zeros(20, 96), groups, 2, 32)
    with pytest.raises(ValueError, match="contiguous"):
        kernel.attend(torch.zeros(192, 20).T, ctx, groups, 2, 32)
    with pytest.raises(RuntimeError, match="code -2"):  # a head size the kernel does not handle
        kernel.attend(torch.zeros(20, 3 * 4 * 12), torch.zeros(20, 48), groups, 4, 12)
    assert kernel.shape_problem(48, 4) is not None and kernel.shape_problem(384, 12) is None


@pytest.mark.parametrize("cols", [16, 384, 768])
def test_add_layernorm_matches_float64_and_pytorch_in_place(kernel, cols):
    gen = torch.Generator().manual_seed(cols)
    a = torch.randn(300, cols, generator=gen) * 3
    h = torch.randn(300, cols, generator=gen) * 0.5 + 2  # an offset: the mean matters
    a[7], h[7] = 0, 1  # a constant row: variance 0, eps alone keeps it finite
    gamma, beta = torch.rand(cols, generator=gen) + 0.5, torch.randn(cols, generator=gen)
    ref = native.reference_add_layernorm(a.numpy(), h.numpy(), gamma.numpy(), beta.numpy(), 1e-12)
    expected = torch.nn.functional.layer_norm(a + h, (cols,), gamma, beta, 1e-12)
    h2 = h.clone()
    assert kernel.add_layernorm(a, h2, gamma, beta, 1e-12) is h2  # in place
    assert np.all(np.abs(h2.numpy() - ref) <= np.abs(ref) * 1e-5 + 1e-5)
    assert float((h2 - expected).abs().max()) < 1e-4  # PyTorch's float32 arithmetic, other summation order
    assert torch.allclose(h2[7], beta, atol=1e-6)
    h3 = h.clone()
    assert torch.equal(kernel.add_layernorm(a, h3, gamma, beta, 1e-12), h2)  # the same bits again
    with pytest.raises(RuntimeError, match="code -2"):
        kernel.add_layernorm(a[:, :4].contiguous(), h[:, :4].contiguous(), gamma[:4], beta[:4], 1e-12)
    with pytest.raises(TypeError):
        kernel.add_layernorm(a, h.clone(), gamma.double(), beta, 1e-12)
    with pytest.raises(ValueError):
        kernel.add_layernorm(a, h[:10].contiguous(), gamma, beta, 1e-12)


@pytest.fixture(scope="module")
def hd32_model(tmp_path_factory):
    return str(build_tiny_bi_encoder(tmp_path_factory.mktemp("tiny-hd32-fp32"), normalize=True, hidden=64, seed=4))


def test_packed_fp32_forward_runs_native_and_equals_sentence_transformers(kernel, hd32_model):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(hd32_model, device="cpu")
    texts, lengths, flat = packed_batch(st, seed=2)
    model = PackedBert.from_sentence_transformer(st, "fp32")
    assert model.attention == "native" and model.fused_layernorm and model._native.name == kernel.name
    with torch.inference_mode():
        got = model(flat, lengths).numpy()
    ref = st.encode(texts, convert_to_numpy=True, normalize_embeddings=False)
    unit = got / np.linalg.norm(got, axis=1, keepdims=True)
    np.testing.assert_allclose(unit, ref, rtol=0, atol=1e-5)
