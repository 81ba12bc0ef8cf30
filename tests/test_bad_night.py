"""A bad night fails: a batch that raises is split so one bad passage does not take its batch down (the
dead letter names the passage that fails alone); when dead letters of a reason exceed their share of
what was read, the run fails with a clear error and publishes nothing. Reuse never lies: a local model
directory is identified by its files' digest, so changing one weight re-encodes everything."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from densebeam.index_store.artifacts import embeddings as emb
from densebeam.index_store.encoding.model_id import model_dir_digest
from densebeam.pipelines import cli, encode
from densebeam.transforms.encode import EncodeFailure, encode_or_split
from conftest import build_tiny_bi_encoder, make_passages, write_jsonl
from poison_module import POISON, build_poisoned_model

LOCAL = ["--runner", "local", "--precision", "fp32"]


def test_encode_or_split_isolates_the_passages_that_fail_alone():
    calls = []

    def encode(texts):
        calls.append(len(texts))
        if any("bad" in t for t in texts):
            raise MemoryError("out of memory")
        return [float(len(t)) for t in texts]

    texts = [f"t{i}" for i in range(16)]
    texts[5], texts[11] = "bad one", "bad two"
    out = encode_or_split(encode, texts)
    assert [o for i, o in enumerate(out) if i not in (5, 11)] == [float(len(t)) for i, t in enumerate(texts)
                                                                 if i not in (5, 11)]
    assert all(isinstance(out[i], EncodeFailure) and "MemoryError: out of memory" in out[i].error
               for i in (5, 11))
    assert calls[0] == 16 and len(calls) <= 2 * 2 * 4 + 1  # bisection, not one call per passage
    assert encode_or_split(encode, ["fine"]) == [4.0]


@pytest.fixture(scope="module")
def poisoned_model(tmp_path_factory):
    return build_poisoned_model(tmp_path_factory.mktemp("poison"))


@pytest.mark.parametrize("workers", ["1", "2"])  # 2: Beam workers as threads sharing one model
def test_one_bad_passage_does_not_take_its_batch_down(tmp_path, poisoned_model, workers):
    recs = make_passages(300, seed=3)
    recs[17]["text"] += POISON  # the model raises on any batch holding this passage
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    manifest, _ = encode.run_pipeline(["--input", str(src), "--output", str(tmp_path / "emb"),
                                       "--model", poisoned_model, *LOCAL, "--workers", workers,
                                       "--batch-size", "64"])
    c = manifest["counts"]
    assert (c["read"], c["encoded"], c["rejected"]) == (300, 299, 1)  # 1/300 < 1%: the run succeeds
    (rej_file,) = (tmp_path / "emb" / "rejected").glob("*.jsonl")
    (rec,) = [json.loads(line) for line in rej_file.read_text().splitlines()]
    assert rec["reason"] == "encode_failed" and rec["id"] == recs[17]["_id"]
    assert "alone" in rec["detail"] and "IndexError" in rec["detail"]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_too_many_failures_fail_the_run_and_publish_nothing(tmp_path, poisoned_model, capsys, workers):
    recs = make_passages(200, seed=4)
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    out = tmp_path / "emb"
    base = ["encode", "--input", str(src), "--output", str(out), "--model", poisoned_model, *LOCAL,
            "--workers", workers]
    assert cli.main(base) == 0  # last night's good output
    good = emb.open_embeddings(str(out)).manifest
    for r in recs[:5]:
        r["text"] += POISON  # 5 of 200 = 2.5% > the 1% default for encode_failed
    write_jsonl(src, recs)
    assert cli.main(base + ["--overwrite", "--no-reuse"]) == 1
    err = capsys.readouterr().err
    assert "failed: too many rejected records, nothing was published" in err
    assert "encode_failed: 5 of 200 read (2.50%) > 1%" in err and "--max-rejected-share" in err
    # Last night's output is still the published one, untouched; the report says what crossed.
    assert emb.open_embeddings(str(out)).manifest == good
    report = json.loads((out / "_FAILED.json").read_text())
    assert report["crossed"] == [{"reason": "encode_failed", "rejected": 5, "read": 200, "share": 0.025,
                                  "limit": 0.01}]
    assert report["rejected_by_reason"] == {"encode_failed": 5}
    # A higher limit lets the same night through; the failure report goes away.
    assert cli.main(base + ["--overwrite", "--max-rejected-share", "encode_failed=0.05"]) == 0
    m = emb.open_embeddings(str(out)).manifest
    assert (m["counts"]["encoded"], m["counts"]["rejected"]) == (195, 5)
    assert not (out / "_FAILED.json").exists()


def test_invalid_input_share_fails_the_run(tmp_path, poisoned_model, capsys):
    src = tmp_path / "c.jsonl"
    src.write_text("".join('{"_id": "a%d", "text": ""}\n' % i for i in range(6))
                   + "".join(json.dumps(r) + "\n" for r in make_passages(4, seed=2)))
    rc = cli.main(["encode", "--input", str(src), "--output", str(tmp_path / "o"), "--model", poisoned_model,
                   *LOCAL])
    assert rc == 1
    assert "all reasons: 6 of 10 read (60.00%) > 50%" in capsys.readouterr().err
    assert not (tmp_path / "o" / emb.MANIFEST).exists()
    assert cli.main(["encode", "--input", str(src), "--output", str(tmp_path / "o2"), "--model", poisoned_model,
                     "--max-rejected-share", "x"]) == 2
    assert "--max-rejected-share takes REASON=SHARE" in capsys.readouterr().err


def test_changing_one_weight_of_a_local_model_reencodes_everything(tmp_path):
    model = build_tiny_bi_encoder(tmp_path / "m", normalize=True)
    src = write_jsonl(tmp_path / "c.jsonl", make_passages(60, seed=9))
    out = tmp_path / "emb"
    base = ["--input", str(src), "--output", str(out), "--model", str(model), *LOCAL, "--overwrite"]
    first, _ = encode.run_pipeline(base)
    assert first["model_facts"]["revision"] == model_dir_digest(str(model))
    again, _ = encode.run_pipeline(base)
    assert again["counts"]["reused"] == 60  # same weights: everything reused
    weights = next(model.rglob("model.safetensors"))
    tensors = load_file(str(weights))
    name = next(n for n in tensors if n.endswith("word_embeddings.weight"))
    tensors[name][5, 0] += 0.5  # one weight
    save_file(tensors, str(weights), metadata={"format": "pt"})
    changed, _ = encode.run_pipeline(base)
    assert changed["counts"]["reused"] == 0 and changed["counts"]["encoded"] == 60
    assert changed["model_facts"]["revision"] != first["model_facts"]["revision"]
    vecs = {i: v for ids, vs in emb.open_embeddings(str(out)).iter_batches() for i, v in zip(ids, vs)}
    assert len(vecs) == 60 and all(np.isfinite(v).all() for v in vecs.values())
