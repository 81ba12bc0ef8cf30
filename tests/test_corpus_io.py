"""Readers: formats, compression, splitting into pieces, and the validation rules (no Beam)."""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from densebeam.index_store.types import Passage, Rejected
from densebeam.index_store import corpus_io
from densebeam.index_store.corpus_io import ReadOptions
from conftest import make_passages, write_jsonl


def read_all(path, opts=ReadOptions()):
    size = __import__("os").path.getsize(path)
    out = []
    for piece in corpus_io.plan_pieces(str(path), size, opts):
        out.extend(corpus_io.read_piece(piece, opts))
    return out


@pytest.mark.parametrize("name,expected", [
    ("a.jsonl", ("jsonl", None)), ("a.jsonl.gz", ("jsonl", "gzip")), ("dir/collection.tsv", ("tsv", None)),
    ("x.TSV.GZ", ("tsv", "gzip")), ("p.parquet", ("parquet", None)), ("gs://b/c.ndjson", ("jsonl", None)),
])
def test_detect_format(name, expected):
    assert corpus_io.detect_format(name) == expected


def test_detect_format_unknown_extension_names_the_flag():
    with pytest.raises(ValueError, match="--format"):
        corpus_io.detect_format("corpus.dat")
    assert corpus_io.detect_format("corpus.dat", "tsv") == ("tsv", None)


@pytest.mark.parametrize("split", [1024, 1500, 4099, 1 << 20])
def test_split_pieces_read_every_line_exactly_once(tmp_path, split):
    recs = make_passages(400, seed=3)
    path = write_jsonl(tmp_path / "c.jsonl", recs)
    opts = ReadOptions(split_bytes=split)
    pieces = corpus_io.plan_pieces(str(path), path.stat().st_size, opts)
    if split < path.stat().st_size:
        assert len(pieces) > 1
    got = read_all(path, opts)
    assert [p.id for p in got] == [r["_id"] for r in recs]
    assert all(isinstance(p, Passage) for p in got)
    # Offsets point at the record in the file.
    raw = path.read_bytes()
    for p in got[:50]:
        assert json.loads(raw[p.source_pos:].split(b"\n", 1)[0])["_id"] == p.id


def test_gzip_line_numbers_and_decompressed_offsets(tmp_path):
    recs = [{"_id": "", "text": "first"}] + make_passages(50) + [{"_id": "", "text": "x"}]
    path = write_jsonl(tmp_path / "c.jsonl.gz", recs, gz=True)
    data = gzip.decompress(path.read_bytes())
    [whole] = corpus_io.plan_pieces(str(path), path.stat().st_size, ReadOptions())  # small: one piece
    got = list(corpus_io.read_piece(whole, ReadOptions()))
    assert len(got) == 52 and [got[0].line, got[-1].line] == [1, 52]
    assert got[0].reason == got[-1].reason == "missing_id"
    # Cut into ranges of the decompressed stream: the same records at the same offsets of the
    # decompressed data; line numbers only where the piece starts the file.
    pieces = corpus_io.plan_pieces(str(path), path.stat().st_size, ReadOptions(split_bytes=1024))
    assert len(pieces) > 1 and all(p.compression == "gzip" for p in pieces)
    split = [r for p in pieces for r in corpus_io.read_piece(p, ReadOptions())]
    assert [(r.id, r.source_pos) for r in split] == [(r.id, r.source_pos) for r in got]
    assert all(json.loads(data[r.source_pos:].split(b"\n", 1)[0])["_id"] == r.id for r in split[1:-1])
    assert [split[0].line, split[-1].line] == [1, None]


BAD_JSONL_LINES = [
    (b'{"_id": "ok1", "text": "fine text"}', None),
    (b'{"_id": "bad1", "text": "unterminated', "malformed_json"),
    (b'["a", "list"]', "malformed_json"),
    (b'{"text": "no id here"}', "missing_id"),
    (b'{"_id": "  ", "text": "blank id"}', "missing_id"),
    (b'{"_id": {"nested": 1}, "text": "t"}', "invalid_id"),
    (b'{"_id": true, "text": "t"}', "invalid_id"),
    (b'{"_id": "has space", "text": "t"}', "invalid_id"),
    (b'{"_id": "nt1"}', "missing_text"),
    (b'{"_id": "et1", "text": "   "}', "empty_text"),
    (b'{"_id": "it1", "text": {"nested": "json"}}', "invalid_text"),
    (b'{"_id": "tt1", "text": "t", "title": ["x"]}', "invalid_title"),
    (b'{"_id": "ub1", "text": "caf\xe9 latin-1"}', "undecodable_bytes"),
    (b'{"_id": "sg1", "text": "lone \\ud800 surrogate"}', "undecodable_bytes"),
    (b'{"_id": "' + b"L" * 300 + b'", "text": "t"}', "id_too_long"),
    (b'{"_id": "big1", "text": "' + b"w" * 3000 + b'"}', "text_too_long"),
    (b'{"_id": 42, "text": "integer ids are fine"}', None),
    (b'{"_id": "nul1", "text": "nul \\u0000 inside is kept"}', None),
]


def test_jsonl_validation_reasons_and_sources(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_JSONL_LINES) + b"\n\n   \n")
    got = read_all(path, ReadOptions(max_text_bytes=2000))
    assert len(got) == len(BAD_JSONL_LINES)  # blank lines are not records
    for i, ((line, reason), rec) in enumerate(zip(BAD_JSONL_LINES, got)):
        if reason is None:
            assert isinstance(rec, Passage), (line, rec)
        else:
            assert isinstance(rec, Rejected) and rec.reason == reason, (line, rec)
            assert rec.line == i + 1 and rec.source_file == str(path) and rec.raw
    assert got[16].id == "42"


def test_tsv_msmarco_and_wrong_column_count(tmp_path):
    path = tmp_path / "collection.tsv"
    path.write_bytes(b"0\tThe presence of communication\n1\ttoo\tmany\n2\n3\tfine passage\r\n")
    got = read_all(path)
    assert [type(r).__name__ for r in got] == ["Passage", "Rejected", "Rejected", "Passage"]
    assert got[1].reason == got[2].reason == "wrong_column_count"
    assert got[3].text == "fine passage"
    titled = read_all(path, ReadOptions(tsv_columns=("id", "title", "text")))
    assert titled[1].title == "too" and titled[1].text == "many"


def test_parquet_row_groups_split_and_validate(tmp_path):
    ids = [f"p{i}" for i in range(1000)] + [None, "p-empty"]
    texts = [f"text {i}" for i in range(1000)] + ["orphan", ""]
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"docid": ids, "body": texts}), path, row_group_size=100)
    opts = ReadOptions(id_field="docid", text_field="body", split_bytes=1024)
    pieces = corpus_io.plan_pieces(str(path), path.stat().st_size, opts)
    assert len(pieces) > 1
    got = read_all(path, opts)
    assert [r.id for r in got[:1000]] == ids[:1000]
    assert got[1000].reason == "missing_id" and got[1000].source_pos == 1000
    assert got[1001].reason == "empty_text"
    with pytest.raises(ValueError, match="--id-field"):
        read_all(path, ReadOptions(split_bytes=1024))


def test_expand_patterns_globs_memory_fs_and_missing():
    import fsspec

    fs = fsspec.filesystem("memory")
    for i in range(3):
        with fs.open(f"/globtest/shard-{i}.jsonl", "wb") as f:
            f.write(b'{"_id": "a", "text": "b"}\n')
    files = corpus_io.expand_patterns(["memory://globtest/shard-*.jsonl"])
    assert [f for f, _ in files] == [f"memory:///globtest/shard-{i}.jsonl" for i in range(3)]
    with pytest.raises(FileNotFoundError, match="matches no file"):
        corpus_io.expand_patterns(["memory://globtest/nothing-*.jsonl"])


def test_gzip_bytes_are_read_as_text(tmp_path):
    path = tmp_path / "c.tsv.gz"
    path.write_bytes(gzip.compress(b"7\tseven\n8\teight\n"))
    assert [p.id for p in read_all(path)] == ["7", "8"]
