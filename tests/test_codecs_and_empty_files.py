"""Every compression the README lists reads, whole and in pieces (zstd included, single- and multi-frame),
and empty or blank input files give 0 records from that file with a line in the summary, never a crash."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os

import pytest

from densebeam.index_store.types import Passage
from densebeam.pipelines import cli, encode
from densebeam.index_store import corpus_io
from densebeam.index_store.corpus_io import ReadOptions
from conftest import make_passages


def _zstd(data: bytes, frames: int = 1) -> bytes:
    import zstandard

    step = -(-len(data) // frames)
    return b"".join(zstandard.ZstdCompressor(write_content_size=True).compress(data[i:i + step])
                    for i in range(0, len(data), step))


CODECS = {".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress, ".zst": _zstd,
          ".zst-multiframe": lambda d: _zstd(d, frames=4)}


def _corpus(n=300, seed=3) -> tuple[list[dict], bytes]:
    docs = make_passages(n, seed=seed)
    return docs, "".join(json.dumps(d) + "\n" for d in docs).encode("utf-8")


@pytest.mark.parametrize("ext", list(CODECS))
@pytest.mark.parametrize("piece_bytes", [None, 2048])
def test_every_listed_codec_reads_whole_and_in_pieces(tmp_path, ext, piece_bytes):
    docs, data = _corpus()
    path = tmp_path / f"c.jsonl{ext.split('-')[0]}"
    path.write_bytes(CODECS[ext](data))
    opts = ReadOptions()
    pieces = corpus_io.plan_pieces(str(path), os.path.getsize(path), opts, piece_bytes=piece_bytes)
    if piece_bytes and ext != ".zst-multiframe":  # a multi-frame file's first frame holds a quarter: still pieces
        assert len(pieces) > 1
    got = [r for p in pieces for r in corpus_io.read_piece(p, opts)]
    assert all(isinstance(r, Passage) for r in got)
    assert [r.id for r in got] == [d["_id"] for d in docs] and [r.text for r in got] == [d["text"] for d in docs]


def test_a_truncated_zstd_file_is_named(tmp_path):
    _, data = _corpus()
    path = tmp_path / "bad.jsonl.zst"
    path.write_bytes(_zstd(data)[:-40])
    with pytest.raises(corpus_io.CorpusError, match="bad.jsonl.zst.*zstd -t"):
        list(corpus_io.read_piece(corpus_io.plan_pieces(str(path), os.path.getsize(path), ReadOptions())[0],
                                  ReadOptions()))


def test_empty_and_blank_files_give_no_records_and_a_summary_line(tmp_path, tiny_cos_model, capsys):
    docs, data = _corpus(40)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(data)
    (tmp_path / "in" / "b.jsonl").write_bytes(b"")  # empty
    (tmp_path / "in" / "c.jsonl.gz").write_bytes(b"")  # empty, and so no gzip data at all
    (tmp_path / "in" / "d.jsonl").write_bytes(b"\n  \n\r\n")  # blank lines only
    out = tmp_path / "emb"
    assert cli.main(["encode", "--input", str(tmp_path / "in" / "*"), "--output", str(out), "--model",
                     tiny_cos_model, "--precision", "fp32", "--runner", "local"]) == 0
    summary = capsys.readouterr().out
    assert "read 40  vectors 40 (40 encoded now, 0 reused from earlier runs)  rejected 0" in summary
    for name, why in (("b.jsonl", "empty"), ("c.jsonl.gz", "empty"), ("d.jsonl", "blank lines only")):
        assert f"no records in {tmp_path / 'in' / name} ({why})" in summary
    manifest = json.loads((out / "_manifest.json").read_text())
    assert {os.path.basename(i["path"]): i["records"] for i in manifest["inputs"]} == {
        "a.jsonl": 40, "b.jsonl": 0, "c.jsonl.gz": 0, "d.jsonl": 0}
    # an empty file alone: a run with nothing to encode, not a crash
    m = encode.run(["--input", str(tmp_path / "in" / "b.jsonl"), "--output", str(tmp_path / "none"),
                    "--model", tiny_cos_model, "--precision", "fp32", "--runner", "local"])
    assert m["counts"] == {**m["counts"], "read": 0, "encoded": 0, "rejected": 0}
