"""Shared fixtures: tiny sentence-transformers models built locally (random weights, small vocabulary)."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import pytest

import parallel_runs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
parallel_runs.own_cache_dir()  # remembered precision choices etc. stay out of ~/.cache, one folder per worker
parallel_runs.make_turns_dir()

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REPO = Path(__file__).resolve().parents[1]

_WORDS = ("the of and to in is was for on that with as by at from his her it an are were be this which "
          "or have had not but they he she one all their has been its who more two can first also new "
          "after other into used time year city war river water music film game team state world data "
          "model search index query passage vector learning language").split()


def build_tiny_bi_encoder(path: Path, *, normalize: bool, similarity_fn: str | None = None,
                          seed: int = 0, hidden: int = 32, max_seq_length: int = 64,
                          unembedded_word: str | None = None, arch: str = "bert", pooling: str = "mean",
                          prompts: dict | None = None, default_prompt_name: str | None = None) -> Path:
    """A 2-layer encoder of family ``arch`` (``bert``, ``distilbert``: BERT's WordPiece vocabulary of ~150
    tokens; ``roberta``: a byte-level BPE vocabulary of 400 trained here), random weights, ``pooling``
    (mean or cls), optional Normalize; saved to ``path``.

    ``unembedded_word`` (BERT only) is added to the tokenizer's vocabulary but not to the model's
    embedding table (a tokenizer/model mismatch): any batch holding it makes the forward pass raise."""
    import torch
    from sentence_transformers import SentenceTransformer, models

    path.mkdir(parents=True, exist_ok=True)
    hf_dir = path / "hf"
    hf_dir.mkdir(exist_ok=True)
    tok = _tiny_tokenizer(hf_dir, arch, unembedded_word)
    torch.manual_seed(seed)
    _tiny_transformer(arch, len(tok.get_vocab()) - bool(unembedded_word), hidden).save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)
    word = models.Transformer(str(hf_dir), max_seq_length=max_seq_length)
    modules = [word, models.Pooling(word.get_word_embedding_dimension(), pooling_mode=pooling)]
    if normalize:
        modules.append(models.Normalize())
    kwargs = {"similarity_fn_name": similarity_fn} if similarity_fn else {}
    if prompts:
        kwargs.update(prompts=prompts, default_prompt_name=default_prompt_name)
    SentenceTransformer(modules=modules, device="cpu", **kwargs).save(str(path / "st"))
    return path / "st"


def _tiny_tokenizer(hf_dir: Path, arch: str, unembedded_word: str | None):
    if arch == "roberta":
        from tokenizers import ByteLevelBPETokenizer
        from transformers import RobertaTokenizerFast

        corpus = [" ".join(_WORDS)] * 3 + list(_WORDS) + [string.ascii_lowercase, string.digits, ".,;:!?'\"()-"]
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(corpus, vocab_size=400, min_frequency=1,
                                special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        vocab, merges = json.loads(bpe.to_str())["model"]["vocab"], json.loads(bpe.to_str())["model"]["merges"]
        tok = RobertaTokenizerFast(vocab=vocab, merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" "))
                                                       for m in merges])
        assert len(tok("river music")["input_ids"]) <= 5, "the tiny tokenizer lost its vocabulary"
        return tok
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase + string.digits)
    vocab += ["##" + c for c in string.ascii_lowercase + string.digits] + list(".,;:!?'\"()-") + list(_WORDS)
    vocab = list(dict.fromkeys(vocab)) + ([unembedded_word] if unembedded_word else [])
    (hf_dir / "vocab.txt").write_text("\n".join(dict.fromkeys(vocab)) + "\n", encoding="utf-8")
    tok = BertTokenizerFast(vocab=str(hf_dir / "vocab.txt"), do_lower_case=True)
    # transformers 5 ignores vocab_file=; a tokenizer without its vocabulary maps every word to [UNK]
    assert tok.tokenize("river music") == ["river", "music"], "the tiny tokenizer lost its vocabulary"
    return tok


def _tiny_transformer(arch: str, vocab_size: int, hidden: int):
    if arch == "distilbert":
        from transformers import DistilBertConfig, DistilBertModel

        return DistilBertModel(DistilBertConfig(vocab_size=vocab_size, dim=hidden, n_layers=2, n_heads=2,
                                                hidden_dim=2 * hidden, max_position_embeddings=128))
    if arch == "roberta":
        from transformers import RobertaConfig, RobertaModel

        return RobertaModel(RobertaConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2,
                                          num_attention_heads=2, intermediate_size=2 * hidden,
                                          max_position_embeddings=130, pad_token_id=1, type_vocab_size=1,
                                          layer_norm_eps=1e-5))
    from transformers import BertConfig, BertModel

    return BertModel(BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=128))


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


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: ``PYTEST_XDIST_AUTO_NUM_WORKERS`` if set, else a worker per usable core, at most 4 (each
    holds torch and its models; the tests are mostly single-threaded Python, their torch work uses every core)."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return int(os.environ["PYTEST_XDIST_AUTO_NUM_WORKERS"])
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


def pytest_collection_modifyitems(config, items):
    parallel_runs.order(items)


_TURNS: parallel_runs.Turns | None = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under xdist a ``timing`` test runs alone (set-up, call and tear-down); others share the machine."""
    global _TURNS
    if parallel_runs.worker() is None:
        yield
        return
    if _TURNS is None:
        _TURNS = parallel_runs.Turns(os.environ[parallel_runs.TURNS_ENV])
    timing = item.get_closest_marker("timing") is not None
    _TURNS.enter(timing)
    yield
    _TURNS.leave(keep_alone=timing and nextitem is not None and nextitem.get_closest_marker("timing") is not None)
