"""Property-based tests for every reader: arbitrary bytes, broken UTF-8, huge lines, NUL bytes, wrong
column counts, nested JSON where a string belongs. Readers never crash; every record is a Passage or a
Rejected with a reason; nothing is lost (records out == non-blank lines in)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from densebeam.index_store.types import Passage, Rejected
from densebeam.transforms import corpus_io
from densebeam.transforms.corpus_io import ReadOptions

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
OPTS = ReadOptions(max_text_bytes=5000, split_bytes=1024)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(
    st.text(max_size=5), c, max_size=3), max_leaves=6)
records = st.fixed_dictionaries({}, optional={"_id": json_values, "text": json_values, "title": json_values})
noise_lines = st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" "))
huge_lines = st.integers(6000, 20000).map(lambda n: b'{"_id": "h", "text": "' + b"x" * n + b'"}')


def _read(path) -> list:
    size = path.stat().st_size
    out = []
    for piece in corpus_io.plan_pieces(str(path), size, OPTS):
        out.extend(corpus_io.read_piece(piece, OPTS))
    return out


def _check(got, lines):
    expected = sum(1 for line in lines if line.strip())
    assert len(got) == expected
    for rec in got:
        assert isinstance(rec, (Passage, Rejected))
        if isinstance(rec, Rejected):
            assert rec.reason and rec.detail and rec.source_pos >= 0
        else:
            assert rec.id and rec.text.strip() and "\t" not in rec.id


@SETTINGS
@given(st.lists(records.map(lambda r: json.dumps(r).encode()) | noise_lines | huge_lines, max_size=40))
def test_jsonl_reader_never_crashes_and_loses_nothing(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("p") / "c.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    _check(_read(path), lines)


tsv_cells = st.text(max_size=20).map(lambda s: s.replace("\n", " ").replace("\r", " ").replace("\t", " "))


@SETTINGS
@given(st.lists(st.lists(tsv_cells, max_size=4).map(lambda cs: "\t".join(cs).encode()) | noise_lines,
                max_size=40))
def test_tsv_reader_never_crashes_and_loses_nothing(tmp_path_factory, lines):
    path = tmp_path_factory.mktemp("p") / "c.tsv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    got = _read(path)
    _check(got, lines)
    for line, rec in zip([line for line in lines if line.strip()], got):
        try:
            ncols = len(line.decode("utf-8").split("\t"))
        except UnicodeDecodeError:
            continue
        if ncols != 2:
            assert isinstance(rec, Rejected) and rec.reason == "wrong_column_count"


@SETTINGS
@given(st.lists(st.tuples(st.none() | st.text(max_size=10), st.none() | st.text(max_size=40)), max_size=50))
def test_parquet_reader_never_crashes_and_loses_nothing(tmp_path_factory, rows):
    path = tmp_path_factory.mktemp("p") / "c.parquet"
    table = pa.table({"_id": pa.array([r[0] for r in rows], pa.string()),
                      "text": pa.array([r[1] for r in rows], pa.string())})
    pq.write_table(table, path, row_group_size=7)
    got = _read(path)
    assert len(got) == len(rows)
    assert [r.source_pos for r in got] == list(range(len(rows)))


def test_nul_bytes_and_broken_utf8_in_one_file(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"_id": "a\\u0000b", "text": "t"}\n{"_id": "ok", "text": "a\x00b"}\n'
                     b'{"_id": "x", "text": "\xc3\x28"}\n\x00\x00\x00\n')
    got = _read(path)
    # A raw NUL inside a JSON string is invalid JSON (control characters must be escaped).
    assert [getattr(r, "reason", "ok") for r in got] == ["invalid_id", "malformed_json", "undecodable_bytes",
                                                          "malformed_json"]


def test_pipeline_on_a_garbage_corpus_never_crashes_and_reconciles(tmp_path, tiny_cos_model):
    """The whole encode pipeline over every kind of bad line at once, JSONL and TSV side by side."""
    import random

    from densebeam.pipelines import encode

    rng = random.Random(7)
    good = [json.dumps({"_id": f"g{i}", "text": f"river water music {i}"}).encode() for i in range(30)]
    bad = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80))).replace(b"\n", b"") for _ in range(30)]
    bad += [b'{"_id": "n1", "text": {"nested": ["json"]}}', b'{"_id": ["x"], "text": "t"}', b"\x00" * 50,
            b'{"_id": "h1", "text": "' + b"y" * 20000 + b'"}', b'{"_id": "g3", "text": "duplicate"}']
    lines = good + bad
    rng.shuffle(lines)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "in" / "b.tsv").write_bytes(b"t1\tok text\nt2\n\xff\xfe\tx\nt3\ta\tb\n")
    m = encode.run(["--input", str(tmp_path / "in" / "*"), "--output", str(tmp_path / "o"), "--model",
                    tiny_cos_model, "--max-text-bytes", "10000", "--runner", "local"])
    c = m["counts"]
    non_blank = sum(1 for line in lines if line.strip()) + 4
    assert c["read"] == non_blank == c["encoded"] + c["rejected"]
    rejected = [json.loads(line) for f in m["rejected_files"]
                for line in open(tmp_path / "o" / f["path"], encoding="utf-8")]
    assert len(rejected) == c["rejected"] and all(r["reason"] and r["source_file"] for r in rejected)
    assert c["encoded"] >= 31  # the 30 good JSONL records (g3 kept once) and t1
