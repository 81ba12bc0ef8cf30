"""Models whose sentence-transformers config defines prompts (e5's ``query: ``/``passage: ``, bge's query
instruction): passages get the document prompt and queries the query prompt, as ``encode_document`` /
``encode_query`` give them, on the packed and the padded path; the prompts are recorded in the model
facts, every stage checks them, and ``--document-prompt`` / ``--query-prompt`` override them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from densebeam.index_store.encoding import encoder as encoder_mod
from densebeam.index_store.encoding.encoder import load_encoder, role_prompts
from densebeam.index_store.query.search import Searcher
from densebeam.pipelines import build_index
from conftest import build_tiny_bi_encoder, make_passages, write_jsonl

PROMPTS = {"query": "query: ", "document": "passage: "}


@pytest.fixture(scope="module")
def e5_like(tmp_path_factory):
    return str(build_tiny_bi_encoder(tmp_path_factory.mktemp("tiny-prompts"), normalize=True, hidden=64, seed=9,
                                     prompts=PROMPTS))


def _texts():
    return [p["title"] + " " + p["text"] for p in make_passages(60, seed=21)]


def test_role_prompts_follow_sentence_transformers():
    assert role_prompts({"query": "q: ", "passage": "p: "}) == {"document": "p: ", "query": "q: "}
    assert role_prompts({"corpus": "c: ", "document": "d: "}) == {"document": "d: ", "query": ""}
    # a default prompt applies where a role has none of its own
    assert role_prompts({"query": "q: ", "all": "a: "}, "all") == {"document": "a: ", "query": "q: "}
    assert role_prompts({}) == {"document": "", "query": ""}


@pytest.mark.parametrize("path", ["packed", "padded"])
def test_vectors_equal_encode_document_and_encode_query(e5_like, path):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(e5_like, device="cpu")
    texts = _texts()
    encoder_mod._LOADED.clear()
    enc = load_encoder(e5_like, precision="fp32", device="cpu")
    assert enc.prompts == {"document": "passage: ", "query": "query: "}
    if path == "padded":  # sentence-transformers' own forward pass on the same prompted texts
        enc = encoder_mod.Encoder(st, e5_like, "cos", "cpu", "fp32")
        enc.packed_unsupported = "forced for the test"
    np.testing.assert_allclose(enc.encode(texts), st.encode_document(texts), rtol=0, atol=1e-5)
    np.testing.assert_allclose(enc.encode(texts[:10], role="query"), st.encode_query(texts[:10]), rtol=0, atol=1e-5)
    assert np.abs(enc.encode(texts[:10], role=None) - enc.encode(texts[:10])).max() > 1e-3  # the prompt matters
    facts = enc.facts()
    assert (facts.document_prompt, facts.query_prompt) == ("passage: ", "query: ")


def test_the_build_records_the_prompts_and_search_uses_the_query_prompt(e5_like, tmp_path):
    from sentence_transformers import SentenceTransformer

    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(120, seed=22))
    out = tmp_path / "bundle"
    build_index.run_build(["--input", str(corpus), "--output", str(out), "--model", e5_like, "--runner", "local",
                           "--precision", "fp32", "--nlist", "4"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model_facts"]["document_prompt"] == "passage: "
    assert manifest["model_facts"]["query_prompt"] == "query: "
    searcher = Searcher.open(str(out), precision="fp32", device="cpu")
    st = SentenceTransformer(e5_like, device="cpu")
    np.testing.assert_allclose(searcher.encode_queries(["river music"])[0], st.encode_query(["river music"])[0],
                               rtol=0, atol=1e-5)
    # overridden at build time: recorded, and the query side follows the record
    out2 = tmp_path / "bundle2"
    build_index.run_build(["--input", str(corpus), "--output", str(out2), "--model", e5_like, "--runner", "local",
                           "--precision", "fp32", "--nlist", "4", "--query-prompt", "", "--document-prompt",
                           "doc: "])
    facts2 = json.loads((out2 / "manifest.json").read_text())["model_facts"]
    assert (facts2["document_prompt"], facts2["query_prompt"]) == ("doc: ", "")
    s2 = Searcher.open(str(out2), precision="fp32", device="cpu")
    np.testing.assert_allclose(s2.encode_queries(["river music"])[0], st.encode(["river music"])[0], rtol=0, atol=1e-5)


def test_embeddings_of_other_prompts_are_never_mixed_or_reused(e5_like, tmp_path):
    from densebeam.pipelines import encode

    corpus = write_jsonl(tmp_path / "c.jsonl", make_passages(50, seed=23))
    base = ["--input", str(corpus), "--model", e5_like, "--runner", "local", "--precision", "fp32"]
    encode.run(base + ["--output", str(tmp_path / "a")])
    m, _ = encode.run_pipeline(base + ["--output", str(tmp_path / "a"), "--overwrite", "--document-prompt", "x: "])
    assert m["counts"]["reused"] == 0  # another prompt: nothing reused from the first run
    encode.run(base + ["--output", str(tmp_path / "b")])
    with pytest.raises(ValueError, match="document_prompt"):
        build_index.run(["--embeddings", str(tmp_path / "a"), "--embeddings", str(tmp_path / "b"),
                         "--output", str(tmp_path / "ix"), "--runner", "local", "--nlist", "2"])
