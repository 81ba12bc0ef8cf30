"""A passage's vector does not depend on which passages share its batch beyond float rounding: the packed
(padding-free) forward computes each passage on its own tokens, so encoding it alone, in any subset or in
any order gives the same vector to within BOUND (1e-6 absolute; on the real model, in every precision
this CPU runs, the very same bits here), in the default precision of every CPU family. This is what makes a resumed run, another worker count or another runner
produce the same embeddings, and so the same index."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from densebeam.index_store.encoding import cpu
from densebeam.index_store.encoding.encoder import load_encoder
from conftest import SHARED_DATA, make_passages


def _texts_real(n):
    with open(SHARED_DATA / "dl19-subset" / "corpus.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line, _ in zip(f, range(n))]


BOUND = 1e-6  # absolute, per component (the matrix kernels may round one row differently by its batch)


def _check(enc, texts):
    base = enc.encode(texts)
    rng = random.Random(7)
    for _ in range(3):
        subset = rng.sample(range(len(texts)), rng.randint(2, len(texts)))  # another batch, other order
        np.testing.assert_allclose(enc.encode([texts[i] for i in subset]), base[subset], rtol=0, atol=BOUND)
    alone = np.stack([enc.encode([texts[i]])[0] for i in range(0, len(texts), 4)])
    np.testing.assert_allclose(alone, base[::4], rtol=0, atol=BOUND)


def _load(model, precision):
    """The encoder, or None where this CPU refuses the precision (bf16 without bf16 arithmetic: what
    the precision promises there is the refusal, before any work)."""
    if precision.startswith("bf16") and not cpu.native_bf16():
        with pytest.raises(ValueError, match=f"--precision {precision} needs bf16 arithmetic"):
            load_encoder(model, precision=precision, device="cpu")
        return None
    return load_encoder(model, precision=precision, device="cpu")


@pytest.mark.parametrize("precision", ["fp32", "int16", "bf16", "bf16-mixed"])
def test_tiny_model_vectors_are_batch_invariant(tiny_cos_model, precision):
    texts = [r["title"] + " " + r["text"] for r in make_passages(80, seed=12)]
    enc = _load(tiny_cos_model, precision)
    if enc is not None:
        _check(enc, texts)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "int16", "bf16", "bf16-mixed"])
def test_real_model_vectors_are_batch_invariant(precision):
    if not (SHARED_DATA / "dl19-subset").exists():
        pytest.skip("../shared/data/dl19-subset is not here")
    enc = _load("sentence-transformers/all-MiniLM-L6-v2", precision)
    if enc is not None:
        _check(enc, _texts_real(48))


_FAMILY_SCRIPT = """
import json, random, sys
import numpy as np
from densebeam.index_store.encoding import cpu
from densebeam.index_store.encoding import cpu
from densebeam.index_store.encoding.encoder import load_encoder
texts = [line.rstrip("\\n") for line in open(sys.argv[1], encoding="utf-8")]
enc = load_encoder("bundled", precision="auto", device="cpu")
base = enc.encode(texts)  # the first call decides auto
rng = random.Random(7)
worst = 0.0
for _ in range(3):
    subset = rng.sample(range(len(texts)), rng.randint(2, len(texts)))
    worst = max(worst, float(np.abs(enc.encode([texts[i] for i in subset]) - base[subset]).max()))
alone = np.stack([enc.encode([texts[i]])[0] for i in range(0, len(texts), 4)])
worst = max(worst, float(np.abs(alone - base[::4]).max()))
print(json.dumps({"family": cpu.family(), "precision": enc.precision, "worst": worst,
                  "candidates": enc.calibration.get("candidates", {})}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("family", ["avx512-bf16", "avx512", "avx2"])
def test_the_default_precision_is_batch_invariant_on_every_cpu_family(tmp_path, family):
    """Each CPU family's default (auto) precision, on the real model, in a process whose PyTorch,
    oneDNN, MKL and densebeam use no instructions beyond that family (simulated where this CPU has
    more): a passage's vector does not depend on its batch; without bf16 arithmetic auto measures int16
    against fp32."""
    import os
    import subprocess
    import sys

    if not cpu.can_limit_to(family):
        pytest.skip(f"this CPU ({cpu.family()}) cannot run as {family}")
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(t.replace("\n", " ") for t in _texts_real(48)) + "\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-c", _FAMILY_SCRIPT, str(src)], capture_output=True, text=True,
                         env={**os.environ, **cpu.limit_env(family)}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["family"] == family and got["worst"] <= BOUND
    if family == "avx512-bf16":
        assert set(got["candidates"]) == {"fp32", "bf16-mixed"} and got["precision"] in got["candidates"]
    else:
        assert set(got["candidates"]) == {"fp32", "int16"} and got["precision"] in got["candidates"]


_THREADS_SCRIPT = """
import sys, numpy as np
from densebeam.index_store.encoding import cpu
from densebeam.index_store.encoding.encoder import load_encoder
enc = load_encoder("bundled", precision="fp32", device="cpu")
texts = [line.rstrip("\\n") for line in open(sys.argv[1], encoding="utf-8")]
queries = np.stack([enc.encode([t])[0] for t in texts[:20]])  # one at a time, as a service encodes queries
np.save(sys.argv[2], np.concatenate([queries, enc.encode(texts)]))
"""


@pytest.mark.slow
def test_vectors_do_not_depend_on_the_thread_count(tmp_path):
    """A lone query encoded in a process with 1 torch thread has the same bits as in one with 2 (else a
    service and a library call of other thread counts could rank near-ties differently)."""
    import os
    import subprocess
    import sys

    with open(SHARED_DATA / "dl19-subset" / "queries.jsonl", encoding="utf-8") as f:
        queries = [json.loads(line)["text"] for line, _ in zip(f, range(20))]
    src = tmp_path / "texts.txt"
    src.write_text("\n".join(t.replace("\n", " ") for t in queries + _texts_real(60)) + "\n", encoding="utf-8")
    got = {}
    for threads in ("1", "2"):
        out = tmp_path / f"v{threads}.npy"
        subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(src), str(out)], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": threads})
        got[threads] = np.load(out)
    assert got["1"].shape == (100, 384)
    np.testing.assert_array_equal(got["1"][:20], got["2"][:20])  # lone queries: the same bits
    # passages: 2 lanes plan other batches than 1, so within the batch bound (not always the same bits)
    np.testing.assert_allclose(got["1"][20:], got["2"][20:], rtol=0, atol=BOUND)
