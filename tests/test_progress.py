"""Progress a person can follow: the corpus size is estimated at launch from a sample (Parquet: exact),
each worker logs passages done, rate, the run's share and an ETA, and the summary says where the time
went."""

from __future__ import annotations

import gzip
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from densebeam.pipelines import cli
from densebeam.index_store.corpus_io import detect_format
from densebeam.transforms.encode import _Progress
from densebeam.transforms.estimate import estimate_records
from conftest import make_passages, write_jsonl


def _fmt(path):
    return detect_format(path)


@pytest.mark.parametrize("n", [50, 3000])
def test_estimate_is_close_for_jsonl_gzip_tsv_and_exact_for_parquet(tmp_path, n):
    recs = make_passages(n, seed=n)
    plain = write_jsonl(tmp_path / "a.jsonl", recs)
    gz = write_jsonl(tmp_path / "b.jsonl.gz", recs, gz=True)
    tsv = tmp_path / "c.tsv"
    tsv.write_text("".join(f"{r['_id']}\t{r['text']}\n" for r in recs))
    pqf = tmp_path / "d.parquet"
    pq.write_table(pa.table({"_id": [r["_id"] for r in recs], "text": [r["text"] for r in recs]}), pqf)
    for path in (plain, gz, tsv):
        est = estimate_records([(str(path), path.stat().st_size)], _fmt, sample_bytes=64 << 10)
        assert abs(est - n) <= 0.15 * n, (path.name, est, n)
    assert estimate_records([(str(pqf), pqf.stat().st_size)], _fmt) == n
    # Files beyond the sampled ones count as looking like them.
    files = [(str(plain), plain.stat().st_size)] * 5
    est = estimate_records(files, _fmt, max_files=2)
    assert abs(est - 5 * n) <= 0.15 * 5 * n


def test_progress_line_has_share_and_eta():
    p = _Progress(every_s=1e9, expected=1000, workers=2)
    p.start -= 10.0
    p.add(100)  # 100 in this worker in 10 s: 10/s per worker, ~200 of 1000 done run-wide
    line = p.line(p.start + 10.0)
    assert "encoded 100 passages in this worker, 10.0 passages/s" in line
    assert "run ~20% of ~1000 passages (2 worker(s)), ETA 0m40s" in line
    assert "ETA" not in _Progress(every_s=1e9).line(p.start + 1)


def test_a_run_logs_progress_and_the_summary_says_where_time_went(tmp_path, tiny_cos_model, caplog, capsys):
    src = write_jsonl(tmp_path / "c.jsonl.gz", make_passages(400, seed=2), gz=True)
    with caplog.at_level(logging.INFO):
        rc = cli.main(["encode", "--input", str(src), "--output", str(tmp_path / "o"), "--model", tiny_cos_model,
                       "--runner", "local", "--batch-size", "64", "--progress-seconds", "0"])
    assert rc == 0
    lines = [r.getMessage() for r in caplog.records if "passages in this worker" in r.getMessage()]
    assert lines and "ETA" in lines[-1] and "of ~" in lines[-1]
    out = capsys.readouterr().out
    assert "time over 1 worker(s)" in out and "encode" in out and "write" in out
    m = json.loads((tmp_path / "o" / "_manifest.json").read_text())
    assert m["counts"]["encoded"] == 400
    assert gzip.open(src).read()  # the input is untouched


def test_the_launchers_progress_line_reads_the_counters():
    from densebeam.runners.progress import progress_line

    line = progress_line({"passages_encoded": 12_000, "passages_reused": 0, "passages_read": 12_512}, 30.0, 88_000)
    assert line == "12,000 passages done of ~88,000 (13.6%), 400 encoded/s, read 12,512"
    assert progress_line({}, 5.0, None) == "running (the runner reports no counters yet)"
    assert progress_line({"vectors_indexed": 500}, 5.0, None) == "indexed 500 vectors"
