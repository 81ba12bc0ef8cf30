"""A real model that fails on some passages: the tiny bi-encoder of conftest whose tokenizer knows a
word ("nightshade") that its embedding table does not (a tokenizer/model mismatch, as a mis-assembled
checkpoint has). Any batch holding that word makes the forward pass raise (index out of range),
wherever it is batched; other passages encode normally. No custom code is loaded."""

from __future__ import annotations

from conftest import build_tiny_bi_encoder

POISON = " nightshade"  # appended to a passage's text


def build_poisoned_model(path) -> str:
    return str(build_tiny_bi_encoder(path, normalize=True, unembedded_word=POISON.strip()))
