"""Docstore parts: row id -> (id, text, title) across parts, partial last batches and empty slots."""

from __future__ import annotations

import os

import fsspec
import numpy as np
import pyarrow as pa
import pytest

from densebeam.index_store.artifacts.docstore import Docstore, DocstoreWriter

PART_ROWS = [2500, 1024, 1]  # 2500 = 2 full batches of 1024 + a partial one; 1024 exactly one batch


def doc(row: int) -> dict:
    return {"id": f"doc-{row}", "text": f"text of {row} " + "é" * (row % 7), "title": f"T{row % 13}"}


def write_parts(root, batch_rows=1024, url_of=lambda root, i: str(root / f"part-{i:05d}-of-00003.arrow")):
    parts, base = [], 0
    rng = np.random.default_rng(0)
    for i, rows in enumerate(PART_ROWS):
        writer = DocstoreWriter(url_of(root, i), base_row=base, batch_rows=batch_rows)
        done = 0
        while done < rows:  # uneven write calls, unrelated to the batch size
            n = min(int(rng.integers(1, 700)), rows - done)
            docs = [doc(r) for r in range(base + done, base + done + n)]
            writer.write([d["id"] for d in docs], [d["text"] for d in docs], [d["title"] for d in docs])
            done += n
        info = writer.close()
        assert info == {"path": url_of(root, i), "rows": rows, "base": base}
        parts.append((info["path"], info["base"], info["rows"]))
        base += rows
    return parts


def test_round_trip_random_rows_across_parts(tmp_path):
    parts = write_parts(tmp_path)
    store = Docstore.open(parts)
    total = sum(PART_ROWS)
    assert len(store) == total
    rng = np.random.default_rng(1)
    rows = list(rng.integers(0, total, 300)) + [0, 2047, 2048, 2499, 2500, 3523, 3524, total - 1, -1]
    got = store.get(np.array(rows, dtype=np.int64))
    for row, hit in zip(rows, got):
        assert hit == (None if row < 0 else doc(int(row)))
    # the batches really have a fixed size, so lookups are arithmetic
    reader = pa.ipc.open_file(pa.memory_map(parts[0][0]))
    assert [reader.get_batch(i).num_rows for i in range(reader.num_record_batches)] == [1024, 1024, 452]


def test_open_paths_reads_bases_from_files(tmp_path):
    parts = write_parts(tmp_path)
    store = Docstore.open_paths([p for p, _, _ in reversed(parts)])
    assert len(store) == sum(PART_ROWS)
    assert store.get([3524, 5, 2600]) == [doc(3524), doc(5), doc(2600)]


def test_text_absent_gives_empty_strings(tmp_path):
    with DocstoreWriter(str(tmp_path / "p.arrow"), base_row=10, batch_rows=4) as writer:
        writer.write(["a", "b", "c", "d", "e"])
        writer.write(["f"], ["only text"], None)
    store = Docstore.open([(str(tmp_path / "p.arrow"), 10, 6)])
    assert store.get([10, 15]) == [{"id": "a", "text": "", "title": ""},
                                   {"id": "f", "text": "only text", "title": ""}]
    with pytest.raises(IndexError, match="row id 9"):
        store.get([9])
    with pytest.raises(IndexError, match="row id 16"):
        store.get([16])


def test_part_appears_only_on_close_and_abort_cleans(tmp_path):
    path = tmp_path / "p.arrow"
    writer = DocstoreWriter(str(path), base_row=0, batch_rows=2)
    writer.write(["a", "b", "c"], ["x", "y", "z"], ["", "", ""])
    assert not path.exists()
    writer.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="3 ids, 2 texts"):
        DocstoreWriter(str(path), base_row=0).write(["a", "b", "c"], ["x", "y"], None)


def test_manifest_row_count_mismatch_is_refused(tmp_path):
    parts = write_parts(tmp_path)
    path, base, rows = parts[1]
    with pytest.raises(ValueError, match="part-00001-of-00003.arrow"):
        Docstore.open([(path, base, rows + 1)])
    with pytest.raises(ValueError, match="overlap"):
        Docstore.open([parts[0], parts[1], parts[0]])


def test_fsspec_parts_are_cached_and_mapped(tmp_path, monkeypatch):
    monkeypatch.setenv("DENSEBEAM_CACHE_DIR", str(tmp_path / "cache"))
    parts = write_parts("memory://densebeam-docstore-test",
                        url_of=lambda root, i: f"{root}/part-{i:05d}-of-00003.arrow")
    assert fsspec.filesystem("memory").exists("/densebeam-docstore-test/part-00002-of-00003.arrow")
    store = Docstore.open(parts)
    assert store.get([3524, 1, -1]) == [doc(3524), doc(1), None]
    assert any(f.endswith(".arrow") for _, _, files in os.walk(tmp_path / "cache") for f in files)
