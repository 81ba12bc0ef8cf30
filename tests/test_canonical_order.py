"""Deterministic output: whatever the worker count, the piece plan, the bundling or a reuse join that
shuffled the rows, the embeddings dir's shards, concatenated in manifest order, hold the records in the
canonical order (input files in sorted order, records in file order), so the index numbers every
document the same way."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from densebeam.index_store.artifacts import embeddings as emb
from densebeam.pipelines import encode
from conftest import make_passages, write_jsonl


def canonical(out) -> tuple[list[str], np.ndarray]:
    d = emb.open_embeddings(str(out))
    ids, vecs = [], []
    for entry in d.manifest["shards"]:
        t = pq.read_table(emb.join(str(out), entry["path"]))
        ids += t.column("id").to_pylist()
        vecs.append(np.asarray(t.column("embedding").combine_chunks().values.to_numpy(zero_copy_only=False))
                    .reshape(t.num_rows, -1))
    return ids, np.concatenate(vecs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("canon")
    a = make_passages(500, seed=1, prefix="a")
    b = make_passages(300, seed=2, prefix="b")
    b[10]["_id"] = a[20]["_id"]  # a duplicate id across files: the first by (file, position) is kept
    write_jsonl(tmp / "in" / "b.jsonl.gz", b, gz=True)
    write_jsonl(tmp / "in" / "a.jsonl", a)
    expected = [r["_id"] for r in a] + [r["_id"] for i, r in enumerate(b) if i != 10]
    return tmp, expected


def _encode(tmp, out, *extra):
    return encode.run_pipeline(["--input", str(tmp / "in" / "*"), "--output", str(out), "--model", MODEL[0],
                                "--precision", "fp32", "--runner", "local", "--batch-size", "48",
                                "--rows-per-shard", "170", *extra])[0]


MODEL = []


@pytest.mark.slow
def test_same_canonical_order_for_one_or_two_workers_and_after_reuse(corpus, tiny_cos_model, tmp_path):
    MODEL[:] = [tiny_cos_model]
    tmp, expected = corpus
    m1 = _encode(tmp, tmp_path / "w1")
    ids1, v1 = canonical(tmp_path / "w1")
    assert ids1 == expected  # files in sorted order (a.jsonl, then b.jsonl.gz), records in file order
    m2 = _encode(tmp, tmp_path / "w2", "--workers", "2")
    ids2, v2 = canonical(tmp_path / "w2")
    assert ids2 == expected
    np.testing.assert_allclose(v2, v1, atol=1e-5)  # fp32: batch composition moves the last bits only
    assert m1["counts"] == m2["counts"]
    # An incremental run (every vector reused through the join, which shuffles rows) keeps the order.
    m3 = _encode(tmp, tmp_path / "w1", "--overwrite", "--workers", "2")
    assert m3["counts"]["reused"] == len(expected)
    ids3, v3 = canonical(tmp_path / "w1")
    assert ids3 == expected
    np.testing.assert_array_equal(v3, v1)  # reused vectors are the very same bytes
