"""The encode pipeline on a real local Beam runner (FnApiRunner) with tiny locally-built models."""

from __future__ import annotations

import gzip
import json

import apache_beam as beam
import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from densebeam.index_store.artifacts import embeddings as emb
from densebeam.index_store.encoding.encoder import load_encoder
from densebeam.pipelines import cli
from densebeam.pipelines import encode
from densebeam.index_store.corpus_io import ReadOptions, expand_patterns
from densebeam.transforms.read import ReadCorpus
from conftest import make_passages, write_jsonl

LOCAL = ["--runner", "local"]


def run_encode(model, inputs, out, *extra):
    args = ["--model", model, "--output", str(out), *LOCAL, *extra]
    for i in inputs:
        args += ["--input", str(i)]
    return encode.run_pipeline(args)


def load_rows(out) -> dict:
    d = emb.open_embeddings(str(out))
    rows = {}
    for path in d.shard_paths:
        t = pq.read_table(path)
        vecs = np.asarray(t.column("embedding").combine_chunks().values.to_numpy(zero_copy_only=False))
        vecs = vecs.reshape(t.num_rows, -1)
        for i, doc_id in enumerate(t.column("id").to_pylist()):
            assert doc_id not in rows, f"duplicate id {doc_id} across shards"
            rows[doc_id] = (vecs[i], t.column("text")[i].as_py(), t.column("title")[i].as_py())
    return rows


def counter(result, name) -> int:
    found = result.metrics().query(MetricsFilter().with_name(name))["counters"]
    return sum(c.committed for c in found)


def expected_vectors(model, records, similarity="auto"):
    enc = load_encoder(model, similarity=similarity, precision="fp32", device="cpu")
    texts = [f"{r['title']} {r['text']}" if r.get("title") else r["text"] for r in records]
    return dict(zip([r["_id"] for r in records], enc.encode(texts)))


def test_read_corpus_transform_with_test_pipeline(tmp_path):
    recs = make_passages(30) + [make_passages(1)[0]]  # last one duplicates d00000
    path = write_jsonl(tmp_path / "a.jsonl", recs)
    files = expand_patterns([str(path)])
    with BeamTestPipeline(runner="apache_beam.runners.portability.fn_api_runner.FnApiRunner") as p:
        out = p | ReadCorpus(files, ReadOptions())
        assert_that(out["passages"] | beam.Map(lambda x: x.id), equal_to([r["_id"] for r in recs[:30]]),
                    label="ids")
        assert_that(out["rejected"] | beam.Map(lambda r: (r.reason, r.id)),
                    equal_to([("duplicate_id", "d00000")]), label="rejected")
        assert_that(out["read_counts"] | beam.Map(lambda fc: fc[1]) | beam.CombineGlobally(sum), equal_to([31]),
                    label="counts")


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "tsv", "tsv.gz", "parquet"])
def test_every_format_encodes_like_the_model(tmp_path, tiny_cos_model, fmt):
    recs = make_passages(60, seed=7)
    src = tmp_path / f"corpus.{fmt}"
    if fmt.startswith("jsonl"):
        write_jsonl(src, recs, gz=fmt.endswith(".gz"))
    elif fmt.startswith("tsv"):
        data = "".join(f"{r['_id']}\t{r['text']}\n" for r in recs).encode()
        src.write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
        recs = [{**r, "title": ""} for r in recs]
    else:
        pq.write_table(pa.table({"_id": [r["_id"] for r in recs], "text": [r["text"] for r in recs],
                                 "title": [r["title"] for r in recs]}), src, row_group_size=16)
    manifest, result = run_encode(tiny_cos_model, [src], tmp_path / "emb", "--precision", "fp32")
    assert manifest["counts"] == {"read": 60, "encoded": 60, "rejected": 0, "reused": 0,
                                  "rejected_by_reason": {}}
    rows = load_rows(tmp_path / "emb")
    want = expected_vectors(tiny_cos_model, recs)
    assert set(rows) == set(want)
    for doc_id, (vec, text, title) in rows.items():
        np.testing.assert_allclose(vec, want[doc_id], atol=1e-5)
        assert abs(np.linalg.norm(vec) - 1) < 1e-5
    assert counter(result, "passages_encoded") == 60


def test_glob_over_shards_split_file_and_memory_fs(tmp_path, tiny_cos_model):
    fs = fsspec.filesystem("memory")
    recs = make_passages(300, seed=11)
    for i in range(3):  # three shards of 100
        with fs.open(f"/corpus-glob/part-{i}.jsonl", "wb") as f:
            f.write("".join(json.dumps(r) + "\n" for r in recs[i * 100:(i + 1) * 100]).encode())
    big = write_jsonl(tmp_path / "big.jsonl", make_passages(400, seed=12, prefix="b"))
    manifest, result = run_encode(tiny_cos_model, ["memory://corpus-glob/part-*.jsonl", big],
                                  "memory://emb-out", "--split-bytes", "4096", "--rows-per-shard", "128")
    assert manifest["counts"]["read"] == manifest["counts"]["encoded"] == 700
    assert counter(result, "pieces_planned") > 4  # the 400-passage file was read in several pieces
    d = emb.open_embeddings("memory://emb-out")
    assert len(d.shard_paths) >= 700 // 128
    assert [s["path"] for s in d.manifest["shards"]] == sorted(s["path"] for s in d.manifest["shards"])
    ids = [i for ids, _ in d.iter_batches(batch_rows=50) for i in ids]
    assert sorted(ids) == sorted([r["_id"] for r in recs] + [f"b{i:05d}" for i in range(400)])
    assert not fs.exists("/emb-out/_temporary")


def test_planted_bad_records_dead_letters_and_counters(tmp_path, tiny_cos_model):
    good = make_passages(40, seed=5)
    a = tmp_path / "in" / "a.jsonl"
    lines = [json.dumps(r).encode() for r in good[:20]]
    lines += [b'{"_id": "x1", "text": ', b'{"text": "no id"}', b'{"_id": "e1", "text": ""}',
              b'{"_id": "u1", "text": "\xff\xfe"}', json.dumps(good[0]).encode(),  # duplicate in a.jsonl
              b'{"_id": "big", "text": "' + b"z " * 600 + b'"}']
    a.parent.mkdir()
    a.write_bytes(b"\n".join(lines) + b"\n")
    b = tmp_path / "in" / "b.tsv"
    b.write_text("".join(f"{r['_id']}\t{r['text']}\n" for r in good[20:])
                 + "t1\tbad\tcolumns\n" + f"{good[1]['_id']}\tduplicate from the other file\n")
    manifest, result = run_encode(tiny_cos_model, [str(tmp_path / "in" / "*")], tmp_path / "emb",
                                  "--max-text-bytes", "1000")
    c = manifest["counts"]
    assert c["read"] == 48 and c["encoded"] == 40 and c["rejected"] == 8
    assert c["rejected_by_reason"] == {"duplicate_id": 2, "empty_text": 1, "malformed_json": 1,
                                       "missing_id": 1, "text_too_long": 1, "undecodable_bytes": 1,
                                       "wrong_column_count": 1}
    for name, n in [("passages_read", 48), ("passages_encoded", 40), ("passages_rejected", 8),
                    ("rejected_duplicate_id", 2), ("rejected_malformed_json", 1)]:
        assert counter(result, name) == n, name
    rejected = [json.loads(line) for f in manifest["rejected_files"]
                for line in open(tmp_path / "emb" / f["path"], encoding="utf-8")]
    assert len(rejected) == 8
    dups = sorted((r["id"], r["source_file"].rsplit("/", 1)[-1]) for r in rejected
                  if r["reason"] == "duplicate_id")
    # The first occurrence (a.jsonl before b.tsv, earlier offset first) is kept, deterministically.
    assert dups == [(good[0]["_id"], "a.jsonl"), (good[1]["_id"], "b.tsv")]
    kept = load_rows(tmp_path / "emb")
    assert kept[good[1]["_id"]][1] == good[1]["text"]
    malformed = next(r for r in rejected if r["reason"] == "malformed_json")
    assert malformed["line"] == 21 and malformed["source_file"].endswith("a.jsonl")
    assert a.read_bytes()[malformed["source_pos"]:].startswith(b'{"_id": "x1"')


def test_dot_model_keeps_raw_vectors_and_cos_flag_normalizes(tmp_path, tiny_dot_model, tiny_plain_model):
    recs = make_passages(25, seed=9)
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    manifest, _ = run_encode(tiny_dot_model, [src], tmp_path / "dot", "--precision", "fp32")
    assert manifest["model_facts"]["similarity"] == "dot"
    norms = [np.linalg.norm(v) for v, _, _ in load_rows(tmp_path / "dot").values()]
    assert max(abs(n - 1) for n in norms) > 0.01  # raw, not normalized
    want = expected_vectors(tiny_dot_model, recs)
    for doc_id, (vec, _, _) in load_rows(tmp_path / "dot").items():
        np.testing.assert_allclose(vec, want[doc_id], atol=1e-5)
    # A model without a Normalize layer, asked for cosine: unit vectors, recorded as cos.
    manifest, _ = run_encode(tiny_plain_model, [src], tmp_path / "cos", "--similarity", "cos",
                             "--dtype", "float16")
    assert manifest["model_facts"]["similarity"] == "cos" and manifest["model_facts"]["dtype"] == "float16"
    schema = pq.read_schema(tmp_path / "cos" / manifest["shards"][0]["path"])
    assert schema.field("embedding").type.value_type == pa.float16()
    assert emb.facts_from_schema(schema, "shard").similarity == "cos"
    for vec, _, _ in load_rows(tmp_path / "cos").values():
        assert abs(np.linalg.norm(vec.astype(np.float32)) - 1) < 2e-3


def test_overwrite_guard_and_stale_shards_removed(tmp_path, tiny_cos_model):
    src = write_jsonl(tmp_path / "c.jsonl", make_passages(50))
    run_encode(tiny_cos_model, [src], tmp_path / "emb", "--rows-per-shard", "10")
    assert len(list((tmp_path / "emb").glob("part-*.parquet"))) == 5
    with pytest.raises(FileExistsError, match="--overwrite"):
        run_encode(tiny_cos_model, [src], tmp_path / "emb")
    run_encode(tiny_cos_model, [src], tmp_path / "emb", "--overwrite")
    assert [p.name for p in (tmp_path / "emb").glob("part-*.parquet")] == ["part-00000-of-00001.parquet"]


def test_cli_summary_and_clear_errors(tmp_path, tiny_cos_model, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", make_passages(12) + [{"_id": "e", "text": ""}])
    rc = cli.main(["encode", "--input", str(src), "--output", str(tmp_path / "o"), "--model", tiny_cos_model,
                   *LOCAL])
    out = capsys.readouterr().out
    assert rc == 0
    assert "read 13  vectors 12 (12 encoded now, 0 reused from earlier runs)  rejected 1" in out and "rejected empty_text: 1" in out
    rc = cli.main(["encode", "--input", str(tmp_path / "nope*.jsonl"), "--output", str(tmp_path / "o2"),
                   "--model", tiny_cos_model])
    assert rc == 2 and "matches no file" in capsys.readouterr().err
    rc = cli.main(["encode", "--input", str(src), "--output", str(tmp_path / "o3"),
                   "--model", str(tmp_path / "no-such-model")])
    assert rc == 2 and "no such model folder" in capsys.readouterr().err  # before any model loads


def test_bad_vectors_are_dead_lettered_before_any_index(tmp_path):
    from apache_beam.ml.inference.base import PredictionResult

    from densebeam.index_store.types import Passage
    from densebeam.transforms.encode import _CheckVectorFn

    def result(i, vec):
        return PredictionResult(Passage(f"p{i}", "t", "", "f", i), np.asarray(vec, np.float32), "fp32")

    inputs = [result(0, [0.6, 0.8, 0.0]), result(1, [np.nan, 0, 1]), result(2, [np.inf, 0, 0]),
              result(3, [0, 0, 0]), result(4, [1.0, 0.0])]
    with BeamTestPipeline(runner="apache_beam.runners.portability.fn_api_runner.FnApiRunner") as p:
        out = (p | beam.Create(inputs)
               | beam.ParDo(_CheckVectorFn(similarity_is_cos=True, dim=3)).with_outputs("rejected", main="ok"))
        assert_that(out.ok | beam.Map(lambda r: r[0].id), equal_to(["p0"]), label="ok")
        assert_that(out.rejected | beam.Map(lambda r: (r.id, r.reason, r.detail.split(" ")[2])),
                    equal_to([("p1", "bad_embedding", "NaN"), ("p2", "bad_embedding", "NaN"),
                              ("p3", "bad_embedding", "all"), ("p4", "bad_embedding", "shape")]),
                    label="rejected")


def test_title_only_records_are_passages_when_titles_are_joined(tmp_path, tiny_cos_model):
    good = make_passages(3, seed=8)
    records = good + [{"_id": "title-only", "title": "river music", "text": ""},
                      {"_id": "blank-title", "title": "   ", "text": ""},
                      {"_id": "nothing", "title": "", "text": " "}]
    src = write_jsonl(tmp_path / "beir.jsonl", records)
    manifest, _ = run_encode(tiny_cos_model, [src], tmp_path / "joined", "--precision", "fp32")
    c = manifest["counts"]
    assert (c["read"], c["encoded"], c["rejected"]) == (6, 4, 2)
    assert c["read"] == c["encoded"] + c["rejected"]
    assert c["rejected_by_reason"] == {"empty_text": 2}
    rows = load_rows(tmp_path / "joined")
    vec, text, title = rows["title-only"]
    assert (text, title) == ("", "river music")  # stored as the input said
    enc = load_encoder(tiny_cos_model, precision="fp32", device="cpu")
    np.testing.assert_allclose(vec, enc.encode(["river music"])[0], atol=1e-5)  # the title alone, no padding

    manifest, _ = run_encode(tiny_cos_model, [src], tmp_path / "text-only", "--precision", "fp32",
                             "--no-join-title")
    c = manifest["counts"]
    assert (c["read"], c["encoded"], c["rejected"]) == (6, 3, 3)
    assert c["rejected_by_reason"] == {"empty_text": 3}
    assert "title-only" not in load_rows(tmp_path / "text-only")
