"""Checks shared by the native kernel tests of every precision (tests/test_native_kernels.py: bf16,
tests/test_native_fp32.py: float32). Each file passes its own ``layer`` (random packed q/k/v and length
groups) and ``run`` (one attention call of the kernel)."""

from __future__ import annotations

import threading

import torch


def assert_same_bits_whatever_batch_and_thread(kernel, layer, run) -> None:
    """A passage's attention output is bit for bit the same in any batch, alone, twice, and from 4
    threads calling the kernel at once."""
    qkv, groups = layer([81] * 6 + [50] * 3 + [9], 12, 32, seed=5)
    whole = run(kernel, qkv, groups, 12, 32)
    assert torch.equal(whole, run(kernel, qkv, groups, 12, 32))
    row = 0  # each passage alone (a batch of one) gives exactly its rows of the batched call
    for _, n, length in groups:
        for _ in range(n):
            alone = run(kernel, qkv[row:row + length].contiguous(), [(0, 1, length)], 12, 32)
            assert torch.equal(alone, whole[row:row + length])
            row += length
    assert_same_from_threads(lambda: run(kernel, qkv, groups, 12, 32), whole)


def assert_same_from_threads(call, expected, threads: int = 4) -> None:
    """``call()`` from ``threads`` threads at once returns ``expected``'s very bits in each."""
    results = [None] * threads

    def work(i):
        results[i] = call()

    running = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join()
    assert all(torch.equal(r, expected) for r in results)


def packed_batch(st, seed: int, n: int = 120):
    """``n`` random passages of the tests' words tokenized by ``st``, longest first, as the packed forward
    takes them: (texts in that order, lengths, the concatenated token ids)."""
    import random

    import numpy as np

    from conftest import _WORDS

    rng = random.Random(seed)
    texts = [" ".join(rng.choices(_WORDS, k=rng.randint(1, 60))) for _ in range(n)]
    ids = [st.tokenizer(t, truncation=True, max_length=64)["input_ids"] for t in texts]
    order = np.argsort([-len(x) for x in ids], kind="stable")
    lengths = np.array([len(ids[i]) for i in order])
    flat = np.array([t for i in order for t in ids[i]], dtype=np.int64)
    return [texts[i] for i in order], lengths, flat


def int16_kernels_here() -> bool:
    """True when the native int16 kernels build and run on this CPU, under the caps in force (never on a
    CPU without AVX2 or AVX-512, nor with ``DENSEBEAM_NATIVE=0`` or no compiler)."""
    from densebeam.index_store.encoding import native

    return native.kernels("int16") is not None
