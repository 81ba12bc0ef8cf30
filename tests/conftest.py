"""Shared fixtures: tiny sentence-transformers models built locally (random weights, small vocabulary)."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "DENSEBEAM_CACHE_DIR" not in os.environ:  # remembered precision choices etc. stay out of ~/.cache
    import atexit
    import shutil
    import tempfile

    os.environ["DENSEBEAM_CACHE_DIR"] = tempfile.mkdtemp(prefix="densebeam-test-cache-")
    atexit.register(shutil.rmtree, os.environ["DENSEBEAM_CACHE_DIR"], True)

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]

_WORDS = ("the of and to in is was for on that with as by at from his her it an are were be this which "
          "or have had not but they he she one all their has been its who more two can first also new "
          "after other into used time year city war river water music film game team state world data "
          "model search index query passage vector learning language").split()


def build_tiny_bi_encoder(path: Path, *, normalize: bool, similarity_fn: str | None = None,
                          seed: int = 0, hidden: int = 32, max_seq_length: int = 64,
                          unembedded_word: str | None = None) -> Path:
    """A 2-layer BERT with a ~150-token vocabulary, mean pooling, optional Normalize; saved to ``path``.

    ``unembedded_word`` is added to the tokenizer's vocabulary but not to the model's embedding table (a
    tokenizer/model mismatch): any batch holding it makes the forward pass raise."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    hf_dir = path / "hf"
    hf_dir.mkdir(exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase + string.digits)
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits] + list(".,;:!?'\"()-") + list(_WORDS)
    vocab = list(dict.fromkeys(vocab)) + ([unembedded_word] if unembedded_word else [])
    (hf_dir / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab=str(hf_dir / "vocab.txt"), do_lower_case=True)
    # transformers 5 ignores vocab_file=; a tokenizer without its vocabulary maps every word to [UNK]
    assert tok.tokenize("river music") == ["river", "music"], "the tiny tokenizer lost its vocabulary"
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(tok.get_vocab()) - bool(unembedded_word), hidden_size=hidden, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128)
    BertModel(config).save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    word = models.Transformer(str(hf_dir), max_seq_length=max_seq_length)
    modules = [word, models.Pooling(word.get_word_embedding_dimension(), pooling_mode="mean")]
    if normalize:
        modules.append(models.Normalize())
    kwargs = {"similarity_fn_name": similarity_fn} if similarity_fn else {}
    SentenceTransformer(modules=modules, device="cpu", **kwargs).save(str(path / "st"))
    return path / "st"


@pytest.fixture(scope="session")
def tiny_cos_model(tmp_path_factory) -> str:
    return str(build_tiny_bi_encoder(tmp_path_factory.mktemp("tiny-cos"), normalize=True))


@pytest.fixture(scope="session")
def tiny_dot_model(tmp_path_factory) -> str:
    """No Normalize layer, says dot product: densebeam must infer ``dot`` and keep raw vectors."""
    return str(build_tiny_bi_encoder(tmp_path_factory.mktemp("tiny-dot"), normalize=False,
                                     similarity_fn="dot", seed=1))


@pytest.fixture(scope="session")
def tiny_plain_model(tmp_path_factory) -> str:
    """No Normalize layer and no stated similarity."""
    return str(build_tiny_bi_encoder(tmp_path_factory.mktemp("tiny-plain"), normalize=False, seed=2))


def make_passages(n: int, seed: int = 0, prefix: str = "d") -> list[dict]:
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.choices(_WORDS, k=rng.randint(3, 40))
        out.append({"_id": f"{prefix}{i:05d}", "title": rng.choice(["", "river", "music film"]),
                    "text": " ".join(words)})
    return out


def write_jsonl(path: Path, records, gz: bool = False) -> Path:
    import gzip

    data = "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path
