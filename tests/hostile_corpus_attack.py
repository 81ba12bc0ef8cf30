"""The hostile-corpus attack behind the figures in docs/reliability.md, sorted by outcome.

    .venv/bin/python tests/hostile_corpus_attack.py

Each case is a small corpus file read through ``corpus_io`` as the pipeline reads it (plan, then every
piece). Outcomes: ``exact`` (every record kept as the input says), ``rejected`` (a dead letter with a
reason where the input cannot be kept exactly), ``fail-naming-file`` (the read fails with a message naming
the file), ``expanded`` (a glob matched); and the failures: ``silent`` (a record other than the input
said, or a record kept that should not be), ``lost`` (a valid record rejected), ``crash`` (an error
naming no file), ``undetected`` (a file changed between the two passes and nobody noticed), ``no match``.
To measure an older reader, put a checkout of it first on the path as ``densebeam``
(``PYTHONPATH=DIR_HOLDING_densebeam``); the script uses only calls the reader has always had.
The assertions live in tests/test_hostile_corpus.py; this only counts.
"""

from __future__ import annotations

import bz2
import collections
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from densebeam.index_store.types import Passage
from densebeam.index_store import corpus_io
from densebeam.index_store.corpus_io import ReadOptions

BOM = b"\xef\xbb\xbf"
BAD_ID_CHARS = ["\u200b", "\ufeff", "\u202e", "\u202d", "\u2066", "\u2069", "\u200e", "\u061c", "\u200d",
                "\u00ad", "\u2060", "\u3164", "\u115f", "\ufe0f", "\u034f", "\U000e0041", "\U000e0001",
                "\x85", "\x7f", "\u00a0", "\u2028", "\u2029", "\u3000", "\ufffe", "\U0001ffff", "\ufdd0"]


def read_all(path) -> list:
    opts = ReadOptions()
    return [r for piece in corpus_io.plan_pieces(str(path), os.path.getsize(path), opts)
            for r in corpus_io.read_piece(piece, opts)]


class Attack:
    def __init__(self, root: Path):
        self.root = root
        self.results: list[tuple[str, str, bool]] = []  # (case, outcome, as wanted)

    def file(self, name: str, data: bytes) -> Path:
        path = self.root / name
        path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
        return path

    def expect(self, name: str, path: Path, want) -> None:
        """``want``: "fail", or one entry per record: (id, text) kept exactly, or "reject"."""
        try:
            got = read_all(path)
        except Exception as err:  # noqa: BLE001 - classifying, not handling
            self.results.append((name, "fail-naming-file" if str(path) in str(err) else "crash", want == "fail"))
            return
        if want == "fail":
            kept = any(isinstance(r, Passage) for r in got)
            self.results.append((name, "silent" if kept else "rejected", False))
            return
        outcome = "exact"
        for w, r in zip(want, got):
            if w == "reject":
                if isinstance(r, Passage):
                    outcome = "silent"
                elif outcome == "exact":
                    outcome = "rejected"
            elif not isinstance(r, Passage):
                outcome = "lost"
            elif (r.id, r.text) != w:
                outcome = "silent"
        if len(got) != len(want):
            outcome = "lost"
        self.results.append((name, outcome, outcome in ("exact", "rejected")))

    def changed_between_passes(self, name: str, change) -> None:
        path = self.file(f"changing-{name}.jsonl", b"".join(
            json.dumps({"_id": f"d{i}", "text": f"passage {i}"}).encode() + b"\n" for i in range(100)))
        opts = ReadOptions()
        pieces = corpus_io.plan_pieces(str(path), os.path.getsize(path), opts)
        first = [(r.id, r.source_pos) for p in pieces for r in corpus_io.read_piece(p, opts)]
        time.sleep(0.02)  # past the file-time clock's tick, as a real rewrite would be
        change(path)
        try:
            second = [(r.id, r.source_pos) for p in pieces for r in corpus_io.read_piece(p, opts)]
        except Exception as err:  # noqa: BLE001
            self.results.append((f"changed between passes: {name}",
                                 "fail-naming-file" if str(path) in str(err) else "crash", True))
            return
        outcome = "undetected" + ("" if first == second else ", passes read different records")
        self.results.append((f"changed between passes: {name}", outcome, False))

    def glob(self, pattern: str) -> None:
        d = self.root / "globs"
        d.mkdir(exist_ok=True)
        for n in "abc":
            (d / f"{n}.jsonl").write_bytes(b'{"_id": "x", "text": "y"}\n')
        try:
            corpus_io.expand_patterns([str(d / f"{pattern}.jsonl")])
            self.results.append((f"glob {pattern}", "expanded", True))
        except FileNotFoundError:
            self.results.append((f"glob {pattern}", "no match", False))


def run(root: Path) -> Attack:
    a = Attack(root)
    tsv = b"5635514\tfirst\n2\tsecond\n"
    jsonl = b'{"_id": "5635514", "text": "first"}\n{"_id": "2", "text": "second"}\n'
    both = [("5635514", "first"), ("2", "second")]
    for name, body in [("bom.tsv", tsv), ("bom.tsv.gz", tsv), ("bom.jsonl", jsonl), ("bom.jsonl.gz", jsonl)]:
        a.expect(f"BOM-prefixed {name}", a.file(name, BOM + body), both)
    a.expect("UTF-16 file", a.file("utf16.tsv", b"\xff\xfe" + "1\tx\n".encode("utf-16-le")), "fail")
    for i, line in enumerate([b'{"_id": "a", "_id": "b", "text": "t"}', b'{"_id": "a", "text": "x", "text": "y"}',
                              b'{"_id": "a", "\\u005fid": "b", "text": "t"}']):
        a.expect(f"duplicate key {i}", a.file(f"dupkey{i}.jsonl", line + b"\n"), ["reject"])
    for c in BAD_ID_CHARS:
        doc_id, tag = f"doc{c}1", f"id with U+{ord(c):04X}"
        a.expect(f"{tag} jsonl", a.file(f"id{ord(c)}.jsonl", json.dumps({"_id": doc_id, "text": "t"}).encode()
                                        + b"\n"), ["reject"])
        a.expect(f"{tag} tsv", a.file(f"id{ord(c)}.tsv", f"{doc_id}\tt\n".encode()), ["reject"])
        pq.write_table(pa.table({"_id": [doc_id], "text": ["t"]}), a.root / f"id{ord(c)}.parquet")
        a.expect(f"{tag} parquet", a.root / f"id{ord(c)}.parquet", ["reject"])
    a.expect("id with an unpaired surrogate", a.file("sur.jsonl", b'{"_id": "a\\ud800", "text": "t"}\n'),
             ["reject"])
    a.expect("integer id -0", a.file("m0.jsonl", b'{"_id": -0, "text": "t"}\n'), ["reject"])
    a.expect("TSV text ending in CR", a.file("cr.tsv", b"1\tt\r\r\n"), [("1", "t\r")])
    pq.write_table(pa.table({"_id": ["a", "b"],
                             "text": pa.array([b"ok", b"\xff"], pa.binary()).view(pa.string())}),
                   a.root / "nonutf8.parquet")
    a.expect("Parquet value not UTF-8", a.root / "nonutf8.parquet", [("a", "ok"), "reject"])
    data = b"".join(json.dumps({"_id": f"d{i}", "text": f"t {i}"}).encode() + b"\n" for i in range(3000))
    (a.root / "trunc.jsonl.gz").write_bytes(gzip.compress(data)[:3000])
    a.expect("truncated gzip", a.root / "trunc.jsonl.gz", "fail")
    (a.root / "plain.jsonl.gz").write_bytes(data[:300])
    a.expect("plain text named .gz", a.root / "plain.jsonl.gz", "fail")
    compressed = bz2.compress(b"".join(b"%d\tpassage %d\n" % (i, i) for i in range(3000)))
    (a.root / "trunc.tsv.bz2").write_bytes(compressed[: len(compressed) // 2])
    a.expect("truncated bz2", a.root / "trunc.tsv.bz2", "fail")
    (a.root / "np.parquet").write_bytes(b"not parquet" * 20)
    a.expect("not Parquet", a.root / "np.parquet", "fail")

    def in_place(p):
        d = p.read_bytes()
        p.write_bytes(d[:10] + bytes([d[10] ^ 1]) + d[11:])

    def by_rename(p):
        tmp = p.with_suffix(".tmp")
        tmp.write_bytes(b'{"_id": "new", "text": "x"}\n' + p.read_bytes())
        os.replace(tmp, p)

    def appended(p):
        with open(p, "ab") as f:
            f.write(b'{"_id": "z", "text": "z"}\n')

    for name, change in [("in place", in_place), ("by rename", by_rename), ("appended", appended),
                         ("deleted", os.remove)]:
        a.changed_between_passes(name, change)
    for pattern in ["?", "[ab]", "[!c]"]:
        a.glob(pattern)
    return a


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        a = run(Path(tmp))
    print(f"{len(a.results)} cases, {sum(ok for *_, ok in a.results)} as wanted")
    for outcome, n in collections.Counter(o for _, o, _ in a.results).most_common():
        print(f"  {outcome}: {n}")
    for name, outcome, ok in a.results:
        if not ok:
            print(f"  not as wanted: {name}: {outcome}")


if __name__ == "__main__":
    main()
