"""Hostile corpora: records are never changed silently (BOMs, duplicate JSON keys, invisible or
bidirectional characters in ids), inputs that change during a run are detected, every input error names
the file and the position, and input globs have the full syntax. Real files, real gzip, real Beam."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import re
import time
import unicodedata

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from densebeam.index_store.types import Rejected
from densebeam.index_store import corpus_io
from densebeam.index_store.corpus_io import CorpusError, InputChangedError, ReadOptions, read_head
from conftest import make_passages, write_jsonl
from rewriting_fs import RewritingFileSystem, rewrite_before_open

BOM = b"\xef\xbb\xbf"


def plan(path, opts=ReadOptions()):
    return corpus_io.plan_pieces(str(path), os.path.getsize(path), opts)


def read_all(path, opts=ReadOptions()):
    return [rec for piece in plan(path, opts) for rec in corpus_io.read_piece(piece, opts)]


def reasons(recs):
    return [r.reason if isinstance(r, Rejected) else "ok" for r in recs]


def write(path, data: bytes):
    """Write the file, gzip- or bz2-compressed as its name says."""
    if str(path).endswith(".gz"):
        data = gzip.compress(data)
    elif str(path).endswith(".bz2"):
        data = bz2.compress(data)
    path.write_bytes(data)
    return path


# --- 1. Records are never changed silently ----------------------------------------------------------

TSV_BODY = b"5635514\tfirst passage\n2\tsecond passage\n"
JSONL_BODY = b'{"_id": "5635514", "text": "first passage"}\n{"_id": "2", "text": "second passage"}\n'


@pytest.mark.parametrize("name", ["c.tsv", "c.tsv.gz", "c.jsonl", "c.jsonl.gz", "c.jsonl.bz2"])
def test_a_utf8_bom_is_not_part_of_the_first_record(tmp_path, name):
    path = write(tmp_path / name, BOM + (TSV_BODY if ".tsv" in name else JSONL_BODY))
    got = read_all(path)
    assert reasons(got) == ["ok", "ok"]
    assert [p.id for p in got] == ["5635514", "2"] and got[0].text == "first passage"
    assert got[0].source_pos == len(BOM)  # the offset of the record's first byte, after the BOM


def test_bom_stripped_in_the_first_piece_of_a_split_file_only(tmp_path):
    recs = make_passages(300, seed=4)
    body = "".join(f"{r['_id']}\t{r['text']}\n" for r in recs).encode()
    path = write(tmp_path / "c.tsv", BOM + body)
    opts = ReadOptions(split_bytes=1024)
    assert len(plan(path, opts)) > 3
    got = read_all(path, opts)
    assert [p.id for p in got] == [r["_id"] for r in recs]
    raw = path.read_bytes()
    assert all(raw[p.source_pos:].split(b"\t", 1)[0].decode() == p.id for p in got)


def test_a_bom_alone_on_the_first_line_is_a_blank_line(tmp_path):
    path = write(tmp_path / "c.jsonl", BOM + b"\n" + JSONL_BODY)
    assert [p.id for p in read_all(path)] == ["5635514", "2"]


def test_a_bom_inside_a_file_is_rejected_with_a_reason_not_kept(tmp_path):
    """Files concatenated with their BOMs: the BOM is not stripped there, the record is a dead letter."""
    tsv = write(tmp_path / "c.tsv", TSV_BODY + BOM + b"7\tthird passage\n")
    got = read_all(tsv)
    assert reasons(got) == ["ok", "ok", "invalid_id"] and "U+FEFF" in got[2].detail
    jsonl = write(tmp_path / "c.jsonl", JSONL_BODY + BOM + b'{"_id": "7", "text": "t"}\n')
    assert reasons(read_all(jsonl)) == ["ok", "ok", "malformed_json"]


@pytest.mark.parametrize("bom", [b"\xff\xfe", b"\xfe\xff"])
def test_a_utf16_file_fails_naming_the_file(tmp_path, bom):
    path = write(tmp_path / "c.tsv", bom + "1\tutf-16 text\n".encode("utf-16-le"))
    with pytest.raises(CorpusError, match=r"c\.tsv starts with a UTF-16.*iconv"):
        read_all(path)


@pytest.mark.parametrize("line,key", [
    (b'{"_id": "a", "_id": "b", "text": "t"}', "_id"),
    (b'{"_id": "a", "text": "first", "text": "second"}', "text"),
    (b'{"_id": "a", "\\u005fid": "b", "text": "t"}', "_id"),  # the same key once decoded
    (b'{"_id": "a", "text": "t", "meta": {"k": 1, "k": 2}}', "k"),
])
def test_duplicate_json_keys_are_a_dead_letter(tmp_path, line, key):
    path = write(tmp_path / "c.jsonl", line + b"\n" + JSONL_BODY)
    got = read_all(path)
    assert reasons(got) == ["duplicate_key", "ok", "ok"]
    assert repr(key) in got[0].detail and got[0].line == 1 and got[0].raw


# Invisible, directional, non-character and control characters an id must not contain (a naive reader keeps
# most of them, and a lone surrogate crashes it).
BAD_ID_CHARS = ["\u200b", "\ufeff", "\u202e", "\u202d", "\u2066", "\u2069", "\u200e", "\u061c", "\u200d",
                "\u00ad", "\u2060", "\u3164", "\u115f", "\ufe0f", "\u034f", "\U000e0041", "\U000e0001",
                "\x85", "\x7f", "\u00a0", "\u2028", "\u2029", "\u3000", "\ufffe", "\U0001ffff", "\ufdd0"]


@pytest.mark.parametrize("char", BAD_ID_CHARS, ids=lambda c: f"U+{ord(c):04X}")
@pytest.mark.parametrize("fmt", ["jsonl", "tsv", "parquet"])
def test_ids_with_invisible_or_bidi_characters_are_rejected(tmp_path, fmt, char):
    doc_id = f"doc{char}1"
    path = tmp_path / f"c.{fmt}"
    if fmt == "jsonl":
        write(path, json.dumps({"_id": doc_id, "text": "t"}).encode() + b"\n")
    elif fmt == "tsv":
        write(path, f"{doc_id}\tt\n".encode())
    else:
        pq.write_table(pa.table({"_id": [doc_id], "text": ["t"]}), path)
    [rec] = read_all(path)
    assert isinstance(rec, Rejected) and rec.reason == "invalid_id", rec
    assert f"U+{ord(char):04X}" in rec.detail and "at character 3" in rec.detail


def test_an_id_with_an_unpaired_surrogate_is_rejected_not_a_crash(tmp_path):
    path = write(tmp_path / "c.jsonl", b'{"_id": "a\\ud800", "text": "t"}\n' + JSONL_BODY)
    got = read_all(path)
    assert reasons(got) == ["invalid_id", "ok", "ok"] and "U+D800" in got[0].detail
    got[0].id.encode("utf-8")  # the dead letter can be written as UTF-8


def test_ids_are_byte_exact_without_normalization(tmp_path):
    composed, decomposed = "caf\u00e9", "cafe\u0301"  # the same word, NFC and NFD
    ids = [composed, decomposed, "CAFE", "cafe", "\u65e5\u672c\u8a9e", "\U0001f642", "a/b:c#1", "\u05d0\u05d1"]
    assert unicodedata.normalize("NFC", decomposed) == composed
    path = write(tmp_path / "c.jsonl", b"".join(json.dumps({"_id": i, "text": "t"}).encode() + b"\n"
                                                  for i in ids))
    assert [p.id for p in read_all(path)] == ids


def test_integer_ids_keep_their_digits(tmp_path):
    path = write(tmp_path / "c.jsonl", b'{"_id": 42, "text": "t"}\n{"_id": 123456789012345678901234567890, '
                                       b'"text": "t"}\n{"_id": -0, "text": "t"}\n{"_id": 0, "text": "t"}\n')
    got = read_all(path)
    assert reasons(got) == ["ok", "ok", "invalid_id", "ok"]
    assert [got[0].id, got[1].id, got[3].id] == ["42", "123456789012345678901234567890", "0"]


def test_text_keeps_everything_but_the_line_terminator(tmp_path):
    path = write(tmp_path / "c.tsv", b"1\ttrailing cr\r\r\n2\t\xe2\x80\x8bzero width in text is data\n")
    got = read_all(path)
    assert [p.text for p in got] == ["trailing cr\r", "\u200bzero width in text is data"]


def test_parquet_value_that_is_not_utf8_is_a_dead_letter_not_a_crash(tmp_path):
    texts = pa.array([b"fine", b"caf\xe9 latin-1", b"also fine"], pa.binary()).view(pa.string())
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"_id": ["a", "b", "c"], "text": texts}), path)
    got = read_all(path)
    assert reasons(got) == ["ok", "undecodable_bytes", "ok"] and got[1].source_pos == 1
    assert "text value is not UTF-8" in got[1].detail


# --- 2. Inputs that change during a run are detected -----------------------------------------------


def rewrite_same_size(path):
    """Another writer replaces the content in place, same size (after a tick of the file-time clock)."""
    time.sleep(0.05)
    data = path.read_bytes()
    with open(path, "r+b") as f:
        f.write(data.replace(b"d000", b"X000"))


def rewrite_by_rename(path):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(path.read_bytes().replace(b"d000", b"Y000"))
    os.replace(tmp, path)


def append(path):
    with open(path, "ab") as f:
        f.write(b'{"_id": "late", "text": "appended during the run"}\n')


@pytest.mark.parametrize("change", [rewrite_same_size, rewrite_by_rename, append, os.remove])
@pytest.mark.parametrize("name", ["c.jsonl", "c.jsonl.gz"])
def test_a_file_changed_between_the_two_passes_fails_naming_it(tmp_path, change, name):
    path = write_jsonl(tmp_path / name, make_passages(40), gz=name.endswith(".gz"))
    pieces = plan(path)
    first_pass = [r.id for p in pieces for r in corpus_io.read_piece(p, ReadOptions())]
    assert len(first_pass) == 40
    change(path)
    with pytest.raises(InputChangedError, match=rf"input {path} changed during the run.*nothing is published"):
        list(corpus_io.read_piece(pieces[0], ReadOptions()))


def test_a_file_changed_while_a_piece_is_read_fails_at_its_end(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", make_passages(200))
    [piece] = plan(path)
    records = corpus_io.read_piece(piece, ReadOptions())
    next(records)
    rewrite_by_rename(path)
    with pytest.raises(InputChangedError, match="found after reading"):
        list(records)


def test_every_piece_of_a_split_file_checks_the_stamp(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", make_passages(300))
    opts = ReadOptions(split_bytes=2048)
    pieces = plan(path, opts)
    assert len(pieces) > 3
    list(corpus_io.read_piece(pieces[0], opts))
    rewrite_same_size(path)
    with pytest.raises(InputChangedError, match=re.escape(pieces[1].describe())):
        list(corpus_io.read_piece(pieces[1], opts))


def test_size_at_matching_must_be_the_size_at_planning(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", make_passages(5))
    [(url, size)] = corpus_io.expand_patterns([str(path)])
    append(path)
    with pytest.raises(InputChangedError, match="changed after its pattern was matched"):
        corpus_io.plan_pieces(url, size, ReadOptions())


def test_parquet_and_memory_fs_changes_are_detected(tmp_path):
    pq_path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"_id": ["a", "b"], "text": ["x", "y"]}), pq_path)
    pieces = plan(pq_path)
    pq.write_table(pa.table({"_id": ["a", "c"], "text": ["x", "y"]}), str(pq_path) + ".tmp")
    os.replace(str(pq_path) + ".tmp", pq_path)
    with pytest.raises(InputChangedError, match="c.parquet"):
        list(corpus_io.read_piece(pieces[0], ReadOptions()))

    fs = fsspec.filesystem("memory")
    fs.pipe("/changing/c.jsonl", JSONL_BODY)
    [(url, size)] = corpus_io.expand_patterns(["memory://changing/c.jsonl"])
    [piece] = corpus_io.plan_pieces(url, size, ReadOptions())
    fs.pipe("/changing/c.jsonl", JSONL_BODY.replace(b"5635514", b"5635515"))  # same size
    with pytest.raises(InputChangedError, match="memory:///changing/c.jsonl"):
        list(corpus_io.read_piece(piece, ReadOptions()))


def test_an_unchanged_file_reads_the_same_in_both_passes(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", make_passages(50))
    pieces = plan(path, ReadOptions(split_bytes=1024))
    passes = [[r.id for p in pieces for r in corpus_io.read_piece(p, ReadOptions(split_bytes=1024))]
              for _ in range(2)]
    assert passes[0] == passes[1] and len(passes[0]) == 50


# --- 3. Every input error names the file and position ----------------------------------------------


def truncated_gzip(path):
    data = b"".join(json.dumps(r).encode() + b"\n" for r in make_passages(2000))
    path.write_bytes(gzip.compress(data)[:4000])


def plain_text_named_gz(path):
    path.write_bytes(JSONL_BODY)


def corrupt_gzip_body(path):
    data = bytearray(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in make_passages(500))))
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


def empty_gzip_header(path):
    path.write_bytes(b"\x1f\x8b")


@pytest.mark.parametrize("make", [truncated_gzip, plain_text_named_gz, corrupt_gzip_body, empty_gzip_header])
def test_unreadable_gzip_names_the_file_and_line(tmp_path, make):
    path = tmp_path / "shard-7.jsonl.gz"
    make(path)
    with pytest.raises(CorpusError, match=rf"cannot read {path} at line \d+ \(byte \d+ of the decompressed data\)"
                                          r".*gzip -t"):
        read_all(path)


def test_the_first_look_at_a_truncated_gzip_names_where_it_ends(tmp_path):
    """The launch-time sniff (``read_head``, before any worker starts) names the line near the truncation,
    not the file's start."""
    path = tmp_path / "c.jsonl.gz"
    data = b"".join(json.dumps(r).encode() + b"\n" for r in make_passages(2000))
    path.write_bytes(gzip.compress(data)[:6000])
    readable = 0
    with pytest.raises(EOFError), gzip.open(path, "rb") as f:
        for _ in f:
            readable += 1
    assert readable > 20
    with pytest.raises(CorpusError, match=r"at line (\d+)") as err:
        read_head(str(path), "gzip", path.stat().st_size, 1 << 16)
    line = int(re.search(r"at line (\d+)", str(err.value)).group(1))
    assert readable - 10 <= line <= readable + 1, (line, readable)


def test_truncated_bz2_names_the_file(tmp_path):
    path = tmp_path / "c.tsv.bz2"
    path.write_bytes(bz2.compress(b"".join(b"%d\tpassage %d\n" % (i, i) for i in range(3000)))[:2000])
    with pytest.raises(CorpusError, match=rf"cannot read {path} at line .*bzip2 -t"):
        read_all(path)


def test_a_file_that_is_not_parquet_names_the_file(tmp_path):
    path = tmp_path / "c.parquet"
    path.write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(CorpusError, match=rf"cannot read {path} as Parquet"):
        plan(path)


# --- 4. Full glob syntax ---------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,want", [
    ("shard-?.jsonl", ["shard-1", "shard-2", "shard-a"]),
    ("shard-[12].jsonl", ["shard-1", "shard-2"]),
    ("shard-[!1].jsonl", ["shard-2", "shard-a"]),
    ("shard-[0-9].jsonl", ["shard-1", "shard-2"]),
    ("**/deep-*.jsonl", ["sub/deep-1"]),
    ("odd[1].jsonl", ["odd[1]"]),  # an existing file's own name, brackets and all
])
@pytest.mark.parametrize("where", ["local", "memory"])
def test_glob_patterns_with_every_wildcard(tmp_path, pattern, want, where):
    names = ["shard-1", "shard-2", "shard-a", "shard-10", "odd[1]", "sub/deep-1"]
    if where == "local":
        root = str(tmp_path)
        for n in names:
            write(tmp_path / f"{n}.jsonl", JSONL_BODY) if "/" not in n else (
                (tmp_path / "sub").mkdir(exist_ok=True), write(tmp_path / f"{n}.jsonl", JSONL_BODY))
    else:
        root = f"memory://glob-{tmp_path.name}"
        fs = fsspec.filesystem("memory")
        for n in names:
            fs.pipe(f"/glob-{tmp_path.name}/{n}.jsonl", JSONL_BODY)
    got = corpus_io.expand_patterns([f"{root}/{pattern}"])
    assert [url.rsplit(root.split("://")[-1] + "/", 1)[-1] for url, _ in got] == [f"{w}.jsonl" for w in want]
    assert all(size == len(JSONL_BODY) for _, size in got)


def test_a_glob_matching_nothing_is_still_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no file"):
        corpus_io.expand_patterns([str(tmp_path / "shard-[xy].jsonl")])


# --- The whole pipeline (real Beam runner, tiny model) ---------------------------------------------


def run_encode(model, inputs, out, *extra):
    from densebeam.pipelines import encode

    args = ["--model", model, "--output", str(out), "--runner", "local", *extra]
    for i in inputs:
        args += ["--input", str(i)]
    return encode.run_pipeline(args)


def published(out) -> list:
    """What a reader could see of an embeddings dir: manifest and shards outside the temp area."""
    if not out.exists():
        return []
    return sorted(p.name for p in out.iterdir() if p.name == "_manifest.json" or p.name.startswith("part-"))


def test_pipeline_keeps_records_exact_and_rejects_what_it_cannot_keep(tmp_path, tiny_cos_model):
    src = tmp_path / "in"
    src.mkdir()
    write(src / "a.tsv", BOM + TSV_BODY)
    write(src / "b.jsonl.gz", BOM + b'{"_id": "j1", "text": "river music"}\n'
                                    b'{"_id": "j2", "_id": "j3", "text": "duplicate key"}\n'
                                    b'{"_id": "rtl\\u202eexe.txt", "text": "bidi override"}\n'
                                    b'{"_id": "zw\\u200bsp", "text": "zero width space"}\n')
    pq.write_table(pa.table({"_id": ["p1", "\ufeffp2"], "text": ["water", "bom in a value"]}), src / "c.parquet")
    manifest, _ = run_encode(tiny_cos_model, [src / "[ab].*", src / "c.parq?et"], tmp_path / "emb",
                             "--max-rejected-share", "*=1")  # half the records are bad on purpose
    c = manifest["counts"]
    assert c["read"] == 8 == c["encoded"] + c["rejected"]
    assert c["rejected_by_reason"] == {"duplicate_key": 1, "invalid_id": 3}
    ids = set()
    for shard in manifest["shards"]:
        ids |= set(pq.read_table(tmp_path / "emb" / shard["path"]).column("id").to_pylist())
    assert ids == {"5635514", "2", "j1", "p1"}


@pytest.mark.parametrize("make", [truncated_gzip, plain_text_named_gz])
def test_unreadable_gzip_fails_naming_the_file_in_either_pass(tmp_path, tiny_cos_model, capsys, make):
    from densebeam.pipelines import cli

    good = write_jsonl(tmp_path / "good.jsonl", make_passages(20))
    bad = tmp_path / "bad.jsonl.gz"
    make(bad)
    for extra in ([], ["--no-dedup"]):
        with pytest.raises(CorpusError, match=rf"cannot read {bad} at line \d+ .*gzip -t"):
            run_encode(tiny_cos_model, [good, bad], tmp_path / "emb", *extra)
        assert published(tmp_path / "emb") == []
    rc = cli.main(["encode", "--input", str(good), "--input", str(bad), "--output", str(tmp_path / "emb"),
                   "--model", tiny_cos_model, "--runner", "local"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith(f"densebeam encode: error: cannot read {bad} at line")


def test_a_file_rewritten_between_the_passes_fails_the_run(tmp_path, tiny_cos_model):
    """Rewritten after the duplicate-id pass, before the parse pass (left undetected, the same id could come
    out twice with counts that reconcile): the run fails naming the file and publishes nothing.
    The file is opened once at launch (size estimate), once by the duplicate-id pass and once by the parse
    pass: it is rewritten just before the third open (tests/rewriting_fs.py, a real local filesystem)."""
    src = write_jsonl(tmp_path / "c.jsonl", make_passages(60, seed=2))
    moved = [{"_id": "new", "text": "inserted first"}] + make_passages(60, seed=2)  # same ids, new offsets
    url = rewrite_before_open(str(src), 3, "".join(json.dumps(r) + "\n" for r in moved).encode())
    with pytest.raises(InputChangedError, match=r"input rewritefs://.*c\.jsonl changed during the run"):
        run_encode(tiny_cos_model, [url], tmp_path / "emb")
    assert RewritingFileSystem.plan[str(src)]["opens"] >= 3
    assert published(tmp_path / "emb") == []


def test_messages_name_what_is_wrong(tmp_path, tiny_cos_model):
    """An id written as the JSON integer -0 is refused as such (not as a float), and a duplicate id's dead
    letter carries its line number."""
    from densebeam.pipelines import encode

    src = tmp_path / "c.jsonl"
    src.write_text('{"_id": -0, "text": "minus zero"}\n{"_id": "a", "text": "first"}\n{"_id": "a", "text": "again"}\n')
    out = tmp_path / "emb"
    encode.run(["--input", str(src), "--output", str(out), "--model", tiny_cos_model, "--precision", "fp32",
                "--runner", "local", "--max-rejected-share", "*=1"])
    rejected = [json.loads(line) for f in sorted((out / "rejected").glob("*.jsonl"))
                for line in f.read_text().splitlines()]
    by_reason = {r["reason"]: r for r in rejected}
    assert "JSON integer -0" in by_reason["invalid_id"]["detail"] and "float" not in by_reason["invalid_id"]["detail"]
    assert by_reason["invalid_id"]["line"] == 1
    assert by_reason["duplicate_id"]["line"] == 3 and by_reason["duplicate_id"]["id"] == "a"
