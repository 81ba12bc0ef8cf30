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
    results = [None] * 4

    def work(i):
        results[i] = run(kernel, qkv, groups, 12, 32)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(r, whole) for r in results)
