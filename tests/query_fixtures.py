"""Builders shared by the query-side tests: a tiny cross-encoder, a tiny bundle, toy queries/qrels."""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path

from conftest import _WORDS, make_passages, write_jsonl


def build_tiny_cross_encoder(path: Path, seed: int = 3, hidden: int = 32, arch: str = "bert") -> str:
    """A 2-layer ``*ForSequenceClassification`` (num_labels=1) of family ``arch`` (bert, distilbert,
    roberta) with the tiny vocabulary of the bi-encoder builders, saved with its tokenizer
    (model_max_length 128 = its position table) in a plain Hugging Face directory."""
    import torch
    import transformers

    from conftest import _tiny_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    tok = _tiny_tokenizer(path, arch, None)
    tok.model_max_length = 128
    torch.manual_seed(seed)
    common = dict(num_labels=1, initializer_range=0.5)  # wide init: scores spread, reranks reorder
    if arch == "distilbert":
        config = transformers.DistilBertConfig(vocab_size=len(tok.get_vocab()), dim=hidden, n_layers=2, n_heads=2,
                                               hidden_dim=2 * hidden, max_position_embeddings=128, **common)
        model = transformers.DistilBertForSequenceClassification(config)
    elif arch == "roberta":
        config = transformers.RobertaConfig(vocab_size=len(tok.get_vocab()), hidden_size=hidden, num_hidden_layers=2,
                                            num_attention_heads=2, intermediate_size=2 * hidden, pad_token_id=1,
                                            max_position_embeddings=130, type_vocab_size=1, **common)
        model = transformers.RobertaForSequenceClassification(config)
    else:
        config = transformers.BertConfig(vocab_size=len(tok.get_vocab()), hidden_size=hidden, num_hidden_layers=2,
                                         num_attention_heads=2, intermediate_size=2 * hidden,
                                         max_position_embeddings=128, **common)
        model = transformers.BertForSequenceClassification(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


_BUILT: dict[tuple, str] = {}  # one build per (model, n_docs, seed, extra) in a test session


def build_tiny_bundle(tmp: Path, model: str, n_docs: int = 240, seed: int = 5, *extra: str) -> str:
    """Corpus of ``n_docs`` synthetic passages -> densebeam build (local runner) -> bundle path. Built once
    per arguments in a session (modules that ask for the same bundle share it: treat it as read-only,
    copy it to change it)."""
    from densebeam.pipelines.build_index import run_build

    key = (model, n_docs, seed, extra)
    if key in _BUILT and Path(_BUILT[key], "manifest.json").exists():
        return _BUILT[key]
    corpus = write_jsonl(tmp / "corpus.jsonl", make_passages(n_docs, seed=seed))
    out = tmp / "bundle"
    run_build(["--input", str(corpus), "--output", str(out), "--model", model, "--runner", "local",
               "--precision", "fp32", "--overwrite", *extra])
    _BUILT[key] = str(out)
    return str(out)


def tiny_searcher_with_reranker(tmp: Path, model: str, n_docs: int, seed: int):
    """A fp32 CPU :class:`Searcher` over a tiny bundle of ``n_docs`` passages, with a tiny cross-encoder."""
    from densebeam.index_store.query.search import Searcher

    bundle = build_tiny_bundle(tmp, model, n_docs, seed)
    return Searcher.open(bundle, precision="fp32", device="cpu", rerank_model=build_tiny_cross_encoder(tmp / "ce"))


def toy_queries(n: int, seed: int = 11) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(_WORDS, k=rng.randint(2, 6))) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerThread:
    """uvicorn serving ``app`` on 127.0.0.1:<free port> in a daemon thread; ``stop()`` shuts it down."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
