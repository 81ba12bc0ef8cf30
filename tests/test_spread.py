"""Every worker busy whatever the input layout: files are cut into balanced pieces (gzip/bz2 by ranges of
the decompressed stream), so with N workers each encodes about total/N passages; the pieces together
read every record exactly once."""

from __future__ import annotations

import bz2
import collections
import gzip
import json

import pytest

from densebeam.index_store.artifacts import embeddings as emb
from densebeam.pipelines import encode
from densebeam.index_store import corpus_io
from densebeam.index_store.corpus_io import TO_END, ReadOptions
from densebeam.transforms.encode import WORKER_LOG_ENV
from conftest import make_passages, write_jsonl


def _records(pieces, opts):
    out = []
    for piece in pieces:
        out += [(r.id, r.source_pos) for r in corpus_io.read_piece(piece, opts)]
    return out


@pytest.mark.parametrize("codec", [None, "gzip", "bz2"])
@pytest.mark.parametrize("piece_bytes", [1000, 4096, 50_000])
def test_balanced_pieces_read_every_record_once(tmp_path, codec, piece_bytes):
    recs = make_passages(700, seed=5)
    data = b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in recs).encode()  # a BOM to start with
    name = {None: "c.jsonl", "gzip": "c.jsonl.gz", "bz2": "c.jsonl.bz2"}[codec]
    path = tmp_path / name
    path.write_bytes({None: data, "gzip": gzip.compress(data), "bz2": bz2.compress(data)}[codec])
    opts = ReadOptions()
    whole = _records(corpus_io.plan_pieces(str(path), path.stat().st_size, opts), opts)
    assert [i for i, _ in whole] == [r["_id"] for r in recs]
    pieces = corpus_io.plan_pieces(str(path), path.stat().st_size, opts, piece_bytes)
    expected_n = max(1, round(path.stat().st_size / piece_bytes))
    assert len(pieces) == expected_n
    assert _records(pieces, opts) == whole  # same records, same positions, same order, none twice
    if codec and len(pieces) > 1:
        assert pieces[-1].end == TO_END and all(p.compression == codec for p in pieces)
        assert "decompressed bytes" in pieces[1].describe()


def test_balanced_piece_size():
    files = [("a", 800_000_000), ("b", 200_000_000)]
    assert corpus_io.balanced_piece_bytes(files, 1, 64 << 20) == 64 << 20
    assert corpus_io.balanced_piece_bytes(files, 16, 64 << 20) == -(-1_000_000_000 // 128)
    assert corpus_io.balanced_piece_bytes([("a", 1000)], 4, 64 << 20) == corpus_io.MIN_PIECE_BYTES


def _layout(tmp_path, kind):
    d = tmp_path / kind
    d.mkdir()
    if kind == "one-gzip":
        write_jsonl(d / "corpus.jsonl.gz", make_passages(1600, seed=1), gz=True)
    elif kind == "one-small-file":
        write_jsonl(d / "corpus.jsonl", make_passages(1600, seed=2))
    elif kind == "many-tiny-files":
        for i in range(160):
            write_jsonl(d / f"part-{i:04d}.jsonl", make_passages(10, seed=100 + i, prefix=f"f{i}-"))
    else:  # a mix: one large gzip file and tiny plain files
        write_jsonl(d / "big.jsonl.gz", make_passages(1200, seed=3), gz=True)
        for i in range(40):
            write_jsonl(d / f"tiny-{i:03d}.jsonl", make_passages(10, seed=200 + i, prefix=f"t{i}-"))
    return d


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["one-gzip", "one-small-file", "many-tiny-files", "mix"])
def test_two_workers_share_the_work_evenly(tmp_path, tiny_cos_model, monkeypatch, kind):
    src = _layout(tmp_path, kind)
    logs = tmp_path / "worker-logs"
    logs.mkdir()
    monkeypatch.setenv(WORKER_LOG_ENV, str(logs))
    manifest, _ = encode.run_pipeline(["--input", str(src / "*"), "--output", str(tmp_path / "emb"),
                                       "--model", tiny_cos_model, "--precision", "fp32", "--runner", "local",
                                       "--workers", "2", "--batch-size", "32"])
    total = manifest["counts"]["encoded"]
    assert total == 1600 and manifest["counts"]["read"] == 1600
    per_worker = collections.Counter()
    for f in logs.iterdir():
        per_worker[f.name] = sum(int(line) for line in f.read_text().split())
    assert sum(per_worker.values()) == total
    assert len(per_worker) == 2, per_worker
    for name, n in per_worker.items():
        assert abs(n - total / 2) <= 0.15 * total / 2, (kind, dict(per_worker))
    ids = {i for batch_ids, _ in emb.open_embeddings(str(tmp_path / "emb")).iter_batches() for i in batch_ids}
    assert len(ids) == 1600


@pytest.mark.slow
def test_an_input_error_in_a_worker_process_is_one_line(tmp_path, tiny_cos_model, capsys):
    from densebeam.pipelines import cli

    good = write_jsonl(tmp_path / "in" / "good.jsonl", make_passages(50))
    bad = tmp_path / "in" / "bad.jsonl.gz"
    bad.write_bytes(gzip.compress(b'{"_id": "a", "text": "x"}\n' * 2000)[:-40])  # truncated
    rc = cli.main(["encode", "--input", str(good), "--input", str(bad), "--output", str(tmp_path / "o"),
                   "--model", tiny_cos_model, "--runner", "local", "--workers", "2"])
    assert rc == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"densebeam encode: error: cannot read {bad}"), last
