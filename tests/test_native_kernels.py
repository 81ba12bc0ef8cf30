"""The native kernels of the packed bf16 forward (index_store/encoding/native.py, kernels_avx512.c): attention and
residual add + layer norm against float64 references and the PyTorch operations they replace, bitwise
deterministic and independent of the batch, safe on bad arguments; and, for both libraries, the build
cache and the PyTorch fallback wherever they cannot be built. Runs the real kernels, built by the
machine's C compiler; the bf16 ones are skipped (with the reason) on a CPU without AVX-512 BF16
(tests/test_native_fp32.py covers the float32 library on every CPU family)."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import torch

from densebeam.index_store.encoding import native
from densebeam.index_store.encoding.encoder import load_encoder
from densebeam.index_store.encoding.packed_bert import PackedBert, _length_groups
from conftest import _WORDS, build_tiny_bi_encoder
from kernel_checks import assert_same_bits_whatever_batch_and_thread


@pytest.fixture(scope="module")
def kernel():
    k = native.kernels()
    if k is None:
        pytest.skip(f"native attention unavailable here: {native.why_not()}")
    return k


@pytest.fixture(scope="module")
def kernel32():
    k = native.kernels("fp32")
    if k is None:
        pytest.skip(f"native float32 kernels unavailable here: {native.why_not('fp32')}")
    return k


def _layer(lengths, heads, hd, seed=0, scale=0.6):
    """A random packed layer: qkv rows of passages ordered by length, and its attention groups."""
    lengths = np.asarray(sorted(lengths, reverse=True), dtype=np.int64)
    gen = torch.Generator().manual_seed(seed)
    qkv = (torch.randn(int(lengths.sum()), 3 * heads * hd, generator=gen) * scale).to(torch.bfloat16)
    return qkv, _length_groups(lengths)


def _torch_attention(qkv, groups, heads, hd):
    """PyTorch's path (PackedBert._attend_groups): bf16 score products, float32 softmax, bf16 weights."""
    ctx = torch.zeros(qkv.shape[0], heads * hd, dtype=torch.bfloat16)
    for row, n, length in groups:
        q, k, v = qkv[row:row + n * length].view(n, length, 3, heads, hd).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)).float(), dim=-1).to(torch.bfloat16)
        ctx[row:row + n * length] = torch.matmul(probs, v).transpose(1, 2).reshape(n * length, heads * hd)
    return ctx


def _run(kernel, qkv, groups, heads, hd):
    ctx = torch.full((qkv.shape[0], heads * hd), float("nan"), dtype=torch.bfloat16)
    kernel.attend(qkv, ctx, groups, heads, hd)
    return ctx


@pytest.mark.parametrize("heads,hd", [(1, 32), (3, 32), (12, 32), (2, 64)])
def test_kernel_matches_float64_and_is_closer_than_pytorch(kernel, heads, hd):
    # lengths around every 16-key block edge, odd and even, one token, a long passage; several per length
    lengths = [1, 2, 5, 15, 16, 16, 17, 31, 32, 33, 47, 64, 65, 81, 81, 81, 100, 127, 200]
    qkv, groups = _layer(lengths, heads, hd, seed=heads + hd, scale=1.5)
    ref = native.reference_attention(qkv.float().numpy(), groups, heads, hd)
    got = _run(kernel, qkv, groups, heads, hd).float().numpy()
    assert np.isfinite(got).all()  # every row written
    err = np.abs(got - ref)
    # the output is rounded to bf16 (8 significant bits), and so are the weights of the values: within
    # one rounding step of the exact value plus one of the largest value
    vmax = float(qkv[:, 2 * heads * hd:].float().abs().max())
    assert np.all(err <= (np.abs(ref) + vmax) * 2.0 ** -8), float(err.max())
    torch_err = np.abs(_torch_attention(qkv, groups, heads, hd).float().numpy() - ref)
    assert err.max() <= torch_err.max()  # scores kept in float32: at least as close as PyTorch's bf16 scores
    assert err.mean() < torch_err.mean()


def test_large_scores_stay_finite_and_exact(kernel):
    """Scores far from zero (a peaked softmax, exp of very negative numbers) and a tie."""
    qkv, groups = _layer([40, 40, 7], 2, 32, seed=3, scale=6.0)
    ref = native.reference_attention(qkv.float().numpy(), groups, 2, 32)
    got = _run(kernel, qkv, groups, 2, 32).float().numpy()
    vmax = float(qkv[:, 128:].float().abs().max())
    assert np.all(np.abs(got - ref) <= (np.abs(ref) + vmax) * 2.0 ** -8)
    tie = torch.zeros(4, 3 * 32, dtype=torch.bfloat16)  # one head; every score equal: the mean of the values
    tie[:, 64:] = torch.arange(4, dtype=torch.bfloat16)[:, None]
    out = _run(kernel, tie, [(0, 1, 4)], 1, 32)
    assert torch.equal(out, torch.full((4, 32), 1.5, dtype=torch.bfloat16))


def test_a_passage_gets_the_same_bits_whatever_its_batch_and_thread(kernel):
    assert_same_bits_whatever_batch_and_thread(kernel, _layer, _run)


def test_bad_arguments_raise_instead_of_reading_out_of_bounds(kernel):
    qkv, groups = _layer([10, 10], 2, 32)
    ctx = torch.zeros(20, 64, dtype=torch.bfloat16)
    with pytest.raises(TypeError):
        kernel.attend(qkv.float(), ctx, groups, 2, 32)
    with pytest.raises(ValueError, match="groups reach row"):
        kernel.attend(qkv[:15].contiguous(), ctx, groups, 2, 32)
    with pytest.raises(ValueError):
        kernel.attend(qkv, torch.zeros(20, 96, dtype=torch.bfloat16), groups, 2, 32)
    with pytest.raises(ValueError, match="contiguous"):
        kernel.attend(torch.zeros(192, 20, dtype=torch.bfloat16).T, ctx, groups, 2, 32)
    with pytest.raises(RuntimeError, match="code -2"):  # a head size the kernel does not handle
        kernel.attend(torch.zeros(20, 3 * 4 * 16, dtype=torch.bfloat16), ctx, groups, 4, 16)


@pytest.mark.parametrize("cols", [16, 384, 768])
def test_add_layernorm_matches_float64_and_is_closer_than_pytorch(kernel, cols):
    gen = torch.Generator().manual_seed(cols)
    a = (torch.randn(300, cols, generator=gen) * 3).to(torch.bfloat16)
    h = (torch.randn(300, cols, generator=gen) * 0.5 + 2).to(torch.bfloat16)  # an offset: the mean matters
    a[7] = 0
    h[7] = 1  # a constant row: variance 0, eps alone keeps it finite
    gamma, beta = torch.rand(cols, generator=gen) + 0.5, torch.randn(cols, generator=gen)
    got = kernel.add_layernorm(a, h, gamma, beta, 1e-12)
    assert got.dtype == torch.bfloat16 and got.shape == a.shape
    ref = native.reference_add_layernorm(a.float().numpy(), h.float().numpy(), gamma.numpy(), beta.numpy(), 1e-12)
    err = np.abs(got.float().numpy() - ref)
    assert np.all(err <= np.abs(ref) * 2.0 ** -8 + 1e-6), float(err.max())  # one bf16 rounding of the exact value
    # PyTorch's bf16 path: the sum rounded to bf16, bf16 weights
    torch_out = torch.nn.functional.layer_norm(a + h, (cols,), gamma.to(torch.bfloat16), beta.to(torch.bfloat16), 1e-12)
    assert err.mean() < np.abs(torch_out.float().numpy() - ref).mean()
    assert torch.equal(got, kernel.add_layernorm(a, h, gamma, beta, 1e-12))  # the same bits again
    with pytest.raises(RuntimeError, match="code -2"):
        kernel.add_layernorm(a[:, :8].contiguous(), h[:, :8].contiguous(), gamma[:8], beta[:8], 1e-12)
    with pytest.raises(TypeError):
        kernel.add_layernorm(a, h, gamma.double(), beta, 1e-12)
    with pytest.raises(ValueError):
        kernel.add_layernorm(a, h[:10].contiguous(), gamma, beta, 1e-12)


@pytest.mark.parametrize("cols", [16, 384, 768])
def test_add_layernorm_mixed_is_pytorchs_float32_path_in_one_pass(kernel, cols):
    """bf16-mixed's residual connection: h <- LayerNorm(float(a) + h) in place, hb <- h rounded to bf16,
    equal to PyTorch's float32 path but for the order of the statistics' sums."""
    gen = torch.Generator().manual_seed(cols + 1)
    a = (torch.randn(300, cols, generator=gen) * 3).to(torch.bfloat16)
    h = torch.randn(300, cols, generator=gen) * 0.5 + 2  # float32, an offset: the mean matters
    a[7] = 0
    h[7] = 1  # a constant row: variance 0, eps alone keeps it finite
    gamma, beta = torch.rand(cols, generator=gen) + 0.5, torch.randn(cols, generator=gen)
    expected = torch.nn.functional.layer_norm(a.float() + h, (cols,), gamma, beta, 1e-12)  # PackedBert's PyTorch path
    ref = native.reference_add_layernorm(a.float().numpy(), h.numpy(), gamma.numpy(), beta.numpy(), 1e-12)
    h2 = h.clone()
    hb = kernel.add_layernorm_mixed(a, h2, gamma, beta, 1e-12)
    assert hb.dtype == torch.bfloat16 and hb.shape == a.shape
    assert torch.equal(hb, h2.to(torch.bfloat16))  # the bf16 copy is the float32 result rounded to nearest even
    err = np.abs(h2.numpy() - ref)
    assert np.all(err <= np.abs(ref) * 1e-5 + 1e-5), float(err.max())
    assert float((h2 - expected).abs().max()) < 1e-4  # PyTorch's float32 arithmetic, other summation order
    assert torch.isfinite(h2[7]).all() and torch.allclose(h2[7], beta, atol=1e-6)
    out = torch.empty_like(a)  # an output buffer given: written, returned, the same bits again
    h3 = h.clone()
    assert kernel.add_layernorm_mixed(a, h3, gamma, beta, 1e-12, out) is out
    assert torch.equal(h3, h2) and torch.equal(out, hb)
    with pytest.raises(RuntimeError, match="code -2"):
        kernel.add_layernorm_mixed(a[:, :8].contiguous(), h[:, :8].contiguous(), gamma[:8], beta[:8], 1e-12)
    with pytest.raises(TypeError):
        kernel.add_layernorm_mixed(a, h.to(torch.bfloat16), gamma, beta, 1e-12)  # h must be float32
    with pytest.raises(ValueError):
        kernel.add_layernorm_mixed(a, h[:10].contiguous(), gamma, beta, 1e-12)
    with pytest.raises(ValueError):
        kernel.add_layernorm_mixed(a, h.clone(), gamma, beta, 1e-12, out[:10])


def _texts(n, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choices(_WORDS, k=rng.randint(1, 60))) for _ in range(n)]


@pytest.fixture(scope="module")
def hd32_model(tmp_path_factory):
    """A tiny BERT whose head size (64 / 2 heads = 32) the kernel runs."""
    return str(build_tiny_bi_encoder(tmp_path_factory.mktemp("tiny-hd32"), normalize=True, hidden=64, seed=4))


@pytest.mark.parametrize("mode", ["bf16", "bf16-mixed"])
def test_packed_forward_runs_native_by_default_and_agrees_with_pytorch(kernel, hd32_model, mode):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(hd32_model, device="cpu")
    texts = _texts(120, seed=2)
    ids = [st.tokenizer(t, truncation=True, max_length=64)["input_ids"] for t in texts]
    order = np.argsort([-len(x) for x in ids], kind="stable")
    lengths = np.array([len(ids[i]) for i in order])
    flat = np.array([t for i in order for t in ids[i]], dtype=np.int64)
    auto = PackedBert.from_sentence_transformer(st, mode)
    # by default the residual connections are fused in bf16-mixed (PyTorch's float32 arithmetic), not in
    # bf16 (the kernel would keep a sum in float32 that PyTorch's bf16 path rounds)
    assert auto.attention == "native" and auto.kernels == "native"
    assert auto.fused_layernorm == (mode == "bf16-mixed")
    fused = PackedBert.from_sentence_transformer(st, mode, fused_layernorm=True)
    unfused = PackedBert.from_sentence_transformer(st, mode, fused_layernorm=False)
    assert fused.fused_layernorm and not unfused.fused_layernorm
    grouped = PackedBert.from_sentence_transformer(st, mode, attention="groups", fused_layernorm=False)
    fp32 = PackedBert.from_sentence_transformer(st, "fp32")
    with torch.inference_mode():
        a, g, f, u, p = (m(flat, lengths).numpy() for m in (auto, grouped, fp32, fused, unfused))
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    cos_native = np.sum(unit(p) * unit(f), axis=1)
    cos_torch = np.sum(unit(g) * unit(f), axis=1)
    assert cos_native.min() > 0.999
    assert cos_native.mean() >= cos_torch.mean() - 1e-5  # no less faithful to fp32 than PyTorch's attention
    cos_fused = np.sum(unit(u) * unit(f), axis=1)
    assert cos_fused.min() > 0.999 and cos_fused.mean() >= cos_native.mean() - 1e-5
    if mode == "bf16-mixed":  # the fused residual connections are PyTorch's float32 path to rounding
        assert np.sum(unit(a) * unit(p), axis=1).min() > 0.99999


def test_encoder_records_the_attention_it_measured(kernel, hd32_model):
    enc = load_encoder(hd32_model, precision="auto", device="cpu")
    enc.encode(_texts(80, seed=3))
    record = enc.calibration
    assert record["kernels"]["fp32"] == "native"  # the float32 kernels (this CPU runs the bf16 ones, so these)
    assert record["kernels"]["bf16-mixed"] == "native"
    # bf16-mixed's residual connections run natively too: bf16 is not measured (candidate_precisions)
    assert set(record["candidates"]) == {"fp32", "bf16-mixed"} == {"fp32", *enc.candidates()}
    assert enc.calibration_rules()["kernels"] == native.NAME


@pytest.fixture
def fresh_native(monkeypatch, tmp_path):
    """The kernels decided again in this test: a fresh cache is another setting (native._slot)."""
    monkeypatch.setenv("DENSEBEAM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "native"


def test_disabled_by_environment_falls_back_to_pytorch(fresh_native, monkeypatch, hd32_model):
    monkeypatch.setenv("DENSEBEAM_NATIVE", "0")
    for kind in ("bf16", "fp32"):
        assert native.kernels(kind) is None and native.planned(kind) == "torch"
        assert "DENSEBEAM_NATIVE=0" in native.why_not(kind)
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(hd32_model, device="cpu")
    assert PackedBert.from_sentence_transformer(st, "fp32").attention == "groups"
    with pytest.raises(ValueError, match="native attention unavailable"):
        PackedBert.from_sentence_transformer(st, "fp32", attention="native")
    enc = load_encoder(hd32_model, precision="fp32", device="cpu", token_budget=4000)  # not a cached encoder
    assert enc.native_kernels("fp32") == "torch" and enc._make_runner("fp32").bert.attention == "groups"
    assert enc.encode(_texts(5)).shape == (5, 64)


def test_a_compiler_that_fails_falls_back_with_its_reason(fresh_native, monkeypatch, tmp_path):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'cc: fatal error: no space left on device' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    assert native.kernels("fp32") is None
    assert "could not build" in native.why_not("fp32") and "no space left" in native.why_not("fp32")
    assert not list(fresh_native.glob("*.so"))  # nothing half-built left to load


_LOAD_SCRIPT = """
import json, sys
from densebeam.index_store.encoding import native
k = native.kernels(sys.argv[1])
print(json.dumps(k.path if k is not None else None))
"""


def test_the_build_is_cached_and_reused_by_the_next_process(fresh_native, kernel32):
    import os
    import subprocess
    import sys

    first = native.kernels("fp32")
    assert first is not None and first.path.startswith(str(fresh_native))
    built = list(fresh_native.glob("kernels_fp32-*.so"))
    assert len(built) == 1 and not list(fresh_native.glob(".kernels*"))
    stamp = built[0].stat().st_mtime_ns
    out = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, "fp32"], capture_output=True, text=True, check=True,
                         env=dict(os.environ))
    assert json.loads(out.stdout.strip().splitlines()[-1]) == first.path  # loaded, not rebuilt
    assert built[0].stat().st_mtime_ns == stamp and len(list(fresh_native.glob("*.so"))) == 1


def test_prepare_builds_in_the_background_and_the_kernel_waits_for_it(fresh_native, kernel):
    native.prepare("bf16", "fp32")
    native.prepare("bf16", "fp32")  # a second call starts nothing more
    got = native.kernels()  # waits for the build thread
    assert got is not None and len(list(fresh_native.glob("kernels_avx512-*.so"))) == 1
    assert native.kernels("fp32") is not None and len(list(fresh_native.glob("kernels_fp32-*.so"))) == 1
    qkv, groups = _layer([20, 9], 2, 32, seed=9)
    assert torch.equal(_run(got, qkv, groups, 2, 32), _run(kernel, qkv, groups, 2, 32))


def test_a_caller_that_can_do_without_the_kernels_never_waits_for_a_compiler(fresh_native, kernel32):
    assert native.kernels("fp32", build=False) is None  # not built in this cache: nothing compiled, nothing decided
    assert not list(fresh_native.glob("*.so")) and native.why_not("fp32") is None
    built = native.kernels("fp32")  # a caller that needs them builds them
    assert built is not None and native.kernels("fp32", build=False) is built


@pytest.mark.timing
def test_planned_answers_while_a_build_runs_and_follows_its_outcome(fresh_native, monkeypatch, tmp_path, kernel32):
    assert native.planned("fp32") == kernel32.name  # this machine can: no build has run in this setting yet
    slow = tmp_path / "slow-cc"  # a compiler that takes its time, then fails
    slow.write_text("#!/bin/sh\ncase \"$*\" in *--version*) echo slow-cc 1.0; exit 0;; esac\nsleep 2\nexit 1\n")
    slow.chmod(0o755)
    monkeypatch.setenv("CC", str(slow))
    native.prepare("fp32")
    start = time.monotonic()
    assert native.planned("fp32") == kernel32.name and time.monotonic() - start < 1  # not blocked by the build
    assert native.kernels("fp32") is None  # waits for the build, which fails
    assert native.planned("fp32") == "torch"  # the outcome, once known
    monkeypatch.setenv("DENSEBEAM_NATIVE", "off")
    assert native.planned("fp32") == "torch"
