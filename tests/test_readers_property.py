"""Property-based tests for every reader: arbitrary bytes, broken UTF-8, huge lines, NUL bytes, wrong
column counts, nested JSON where a string belongs, any Unicode in ids (invisible, bidirectional, unpaired
surrogates). Readers never crash; every record is a Passage or a Rejected with a reason; nothing is lost
(records out == non-blank lines in); a Passage's id, text and title are exactly what the input said."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from densebeam.index_store.types import Passage, Rejected
from densebeam.index_store import corpus_io
from densebeam.index_store.corpus_io import CorpusError, ReadOptions

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
OPTS = ReadOptions(max_text_bytes=5000, split_bytes=1024)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(
    st.text(max_size=5), c, max_size=3), max_leaves=6)
# Ids and texts with the characters that once slipped through or crashed: BOM, zero-width and bidi
# controls, NBSP, line separators, unpaired surrogates, combining marks, Hangul filler.
tricky = st.sampled_from(["\ufeff", "\u200b", "\u202e", "\u2066", "\u00ad", "\u00a0", "\u2028", "\ud800",
                          "\udfff", "\x85", "\x00", "\u0301", "\u3164", "\ufe0f", " ", "\t"])
any_text = st.text(tricky | st.characters(exclude_categories=()), max_size=12)
records = st.fixed_dictionaries({}, optional={"_id": json_values | any_text, "text": json_values | any_text,
                                              "title": json_values})
noise_lines = st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" ").replace(b"\r", b" "))
huge_lines = st.integers(6000, 20000).map(lambda n: b'{"_id": "h", "text": "' + b"x" * n + b'"}')
BOM = b"\xef\xbb\xbf"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _read(path) -> list:
    size = path.stat().st_size
    out = []
    for piece in corpus_io.plan_pieces(str(path), size, OPTS):
        out.extend(corpus_io.read_piece(piece, OPTS))
    return out


def _write_and_read(path, lines: list, bom: bool):
    """Write the lines (after a UTF-8 BOM if asked) and read them back. Returns (records, indexes of the
    lines the reader sees as records), or None when the file starts with a UTF-16 BOM, which is refused
    as a whole, naming the file. A UTF-8 BOM starting the file is not part of its first line."""
    path.write_bytes((BOM if bom else b"") + b"\n".join(lines) + b"\n")
    seen = list(lines)
    if not bom and seen and seen[0].startswith(UTF16_BOMS):
        with pytest.raises(CorpusError, match=re.escape(str(path))):
            _read(path)
        return None
    if not bom and seen and seen[0].startswith(BOM):
        seen[0] = seen[0][len(BOM):]
    got = _read(path)
    kept = [i for i, line in enumerate(seen) if line.strip()]
    assert len(got) == len(kept)  # nothing lost, nothing invented
    for rec in got:
        assert isinstance(rec, (Passage, Rejected))
        if isinstance(rec, Rejected):
            assert rec.reason and rec.detail and rec.source_pos >= 0
            json.dumps(rec.to_dict(), ensure_ascii=False).encode("utf-8")  # the dead letter can be written
        else:
            assert rec.id and rec.text.strip() and corpus_io.id_problem(rec.id) is None
    return got, kept, seen


@SETTINGS
@given(st.lists(records | noise_lines | huge_lines, max_size=40), st.booleans())
def test_jsonl_reader_never_crashes_and_loses_nothing(tmp_path_factory, items, bom):
    lines = [json.dumps(i).encode() if isinstance(i, dict) else i for i in items]
    read = _write_and_read(tmp_path_factory.mktemp("p") / "c.jsonl", lines, bom)
    if read is None:
        return
    got, kept, _ = read
    for i, rec in zip(kept, got):
        if isinstance(items[i], dict):  # valid JSON, one object: never malformed, never changed
            assert getattr(rec, "reason", None) != "malformed_json", rec
            if isinstance(rec, Passage):
                assert rec.id == str(items[i]["_id"]) and rec.text == items[i]["text"]
                assert rec.title == (items[i].get("title") or "")


tsv_cells = (st.text(max_size=20) | st.text(tricky, max_size=3)).map(
    lambda s: s.replace("\n", " ").replace("\r", " ").replace("\t", " "))


@SETTINGS
@given(st.lists(st.lists(tsv_cells, max_size=4).map(lambda cs: "\t".join(cs).encode("utf-8", "surrogatepass"))
                | noise_lines,
                max_size=40), st.booleans())
def test_tsv_reader_never_crashes_and_loses_nothing(tmp_path_factory, lines, bom):
    read = _write_and_read(tmp_path_factory.mktemp("p") / "c.tsv", lines, bom)
    if read is None:
        return
    got, kept, seen = read
    for i, rec in zip(kept, got):
        try:
            cols = seen[i].decode("utf-8").split("\t")
        except UnicodeDecodeError:
            continue
        if len(cols) != 2:
            assert isinstance(rec, Rejected) and rec.reason == "wrong_column_count"
        elif isinstance(rec, Passage):
            assert [rec.id, rec.text] == cols  # byte for byte: nothing trimmed or normalized


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
                    tiny_cos_model, "--max-text-bytes", "10000", "--runner", "local",
                    "--max-rejected-share", "*=1"])  # mostly garbage on purpose
    c = m["counts"]
    non_blank = sum(1 for line in lines if line.strip()) + 4
    assert c["read"] == non_blank == c["encoded"] + c["rejected"]
    rejected = [json.loads(line) for f in m["rejected_files"]
                for line in open(tmp_path / "o" / f["path"], encoding="utf-8")]
    assert len(rejected) == c["rejected"] and all(r["reason"] and r["source_file"] for r in rejected)
    assert c["encoded"] >= 31  # the 30 good JSONL records (g3 kept once) and t1
