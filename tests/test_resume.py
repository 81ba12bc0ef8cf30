"""Incremental encoding and kill-and-restart: real runs, killed with SIGKILL at real points, restarted
with the same command, give the same result as an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from apache_beam.metrics.metric import MetricsFilter

from densebeam.index_store.artifacts import bundle as bundle_lib
from densebeam.index_store.encoding import cpu
from densebeam.index_store.artifacts import embeddings as emb
from densebeam.pipelines import encode
from conftest import make_passages, write_jsonl

LOCAL = ["--runner", "local"]


def vectors(out) -> dict:
    d = emb.open_embeddings(str(out))
    return {i: v for ids, vecs in d.iter_batches() for i, v in zip(ids, vecs)}


def counter(result, name) -> int:
    return sum(c.committed for c in result.metrics().query(MetricsFilter().with_name(name))["counters"])


def test_incremental_run_reencodes_only_new_or_changed(tmp_path, tiny_cos_model):
    recs = make_passages(120, seed=31)
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    out = tmp_path / "emb"
    base = ["--input", str(src), "--output", str(out), "--model", tiny_cos_model, "--precision", "fp32", *LOCAL]
    encode.run(base)
    before = vectors(out)
    # Next night: 10 changed, 10 deleted, 10 new.
    changed = [{**r, "text": r["text"] + " river water"} for r in recs[:10]]
    new = make_passages(10, seed=32, prefix="n")
    write_jsonl(src, changed + recs[10:110] + new)
    manifest, result = encode.run_pipeline(base + ["--overwrite"])
    assert manifest["counts"]["reused"] == 100 and manifest["counts"]["encoded"] == 120
    assert counter(result, "passages_encoded") == 20 and counter(result, "passages_reused") == 100
    after = vectors(out)
    assert set(after) == {r["_id"] for r in changed + recs[10:110] + new}  # deleted ids left
    for r in recs[10:110]:
        np.testing.assert_array_equal(after[r["_id"]], before[r["_id"]])
    # A fresh, cache-free run gives the same vectors.
    fresh = tmp_path / "fresh"
    encode.run(base[:3] + [str(fresh)] + base[4:])
    for doc_id, v in vectors(fresh).items():
        np.testing.assert_allclose(after[doc_id], v, atol=1e-5)
    assert not (out / "_cache").exists() and not (out / "_temporary").exists()


def test_other_model_or_precision_never_reuses(tmp_path, tiny_cos_model, tiny_plain_model):
    src = write_jsonl(tmp_path / "c.jsonl", make_passages(40, seed=3))
    out = tmp_path / "emb"
    base = ["--input", str(src), "--output", str(out), *LOCAL, "--overwrite"]
    # a second precision where this CPU runs one (bf16 needs bf16 arithmetic; elsewhere only fp32 runs)
    low = "bf16" if cpu.native_bf16() else "fp32"
    encode.run(base + ["--model", tiny_cos_model, "--precision", "fp32"])
    if low != "fp32":
        m, result = encode.run_pipeline(base + ["--model", tiny_cos_model, "--precision", low])
        assert m["counts"]["reused"] == 0 and counter(result, "cache_files_skipped") >= 1
    m, _ = encode.run_pipeline(base + ["--model", tiny_plain_model, "--similarity", "cos", "--precision", low])
    assert m["counts"]["reused"] == 0
    m, _ = encode.run_pipeline(base + ["--model", tiny_plain_model, "--similarity", "cos", "--precision", low])
    assert m["counts"]["reused"] == 40
    m, _ = encode.run_pipeline(base + ["--model", tiny_plain_model, "--similarity", "cos", "--precision", low,
                                       "--no-reuse"])
    assert m["counts"]["reused"] == 0


def _build_cmd(src, out, model):
    return [sys.executable, "-m", "densebeam.pipelines.cli", "build", "--input", str(src), "--output", str(out),
            "--model", model, "--precision", "fp32", "--journal-rows", "100", "--rows-per-shard", "250",
            "--nlist", "8", *LOCAL]


def _run_killed_at(point, cmd, out, ref_seconds, attempts=5):
    """Start ``cmd`` and SIGKILL its whole process group (as an OOM killer or a preemption would) at a
    moment seen from outside, with no hook in the product: ``journal`` = as soon as the first journal
    file exists (mid-encoding), ``index`` = as soon as the index build's work dir exists, or a float =
    that share of the uninterrupted run's wall time."""
    emb_dir = out.parent / (out.name + ".embeddings")
    reached = {
        "journal": lambda: any((emb_dir / "_cache").glob("journal-*.parquet")),
        "index": lambda: (out / "_build").exists(),
    }.get(point)
    # a SIGKILLed process cannot remove its temporary folders (Beam's beam-pipeline-temp*): they go under
    # the test's own folder, not the machine's /tmp
    scratch = out.parent / "process-tmp"
    scratch.mkdir(exist_ok=True)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "TMPDIR": str(scratch)})
    while True:
        if proc.poll() is not None:
            err = proc.stderr.read().decode()[-2000:]
            if proc.returncode == 0 and not reached and attempts > 1:
                # Ran faster than the reference (a busy machine slowed that one): aim at this run's time.
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(emb_dir, ignore_errors=True)
                return _run_killed_at(point, cmd, out, time.monotonic() - start, attempts - 1)
            raise AssertionError(f"run ended before {point} (exit {proc.returncode}): {err}")
        if (reached() if reached else time.monotonic() - start >= point * ref_seconds):
            break
        if time.monotonic() - start > 240:
            os.killpg(proc.pid, signal.SIGKILL)
            raise AssertionError(f"run did not reach {point} in time")
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    late = proc.returncode == 0 or (not reached and (out / "manifest.json").exists())
    if late and attempts > 1:
        # It ended, or published, before the kill landed (this run was faster than the one it aimed by,
        # as happens on a machine whose load changes): aim at 60% of the moment it had got that far by.
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(emb_dir, ignore_errors=True)
        elapsed = time.monotonic() - start
        return _run_killed_at(point, cmd, out, 0.6 * elapsed / point if not reached else ref_seconds,
                              attempts - 1)
    assert proc.returncode == -signal.SIGKILL


def _bundle_content(root):
    b = bundle_lib.open_bundle(str(root))
    rows = b.docstore.get(list(range(b.searcher.ntotal)))
    return b.manifest, [r["id"] for r in rows]  # document id by FAISS row id


@pytest.fixture(scope="module")
def reference_build(tmp_path_factory, tiny_cos_model):
    """One uninterrupted run, the reference for every killed-and-restarted run."""
    tmp = tmp_path_factory.mktemp("ref")
    recs = make_passages(600, seed=41) + [{"_id": "bad", "text": ""}, make_passages(1, seed=41)[0]]
    src = write_jsonl(tmp / "c.jsonl", recs)
    start = time.monotonic()
    subprocess.run(_build_cmd(src, tmp / "ref", tiny_cos_model), check=True, capture_output=True)
    return src, tmp / "ref", time.monotonic() - start


@pytest.mark.slow
@pytest.mark.parametrize("point", ["journal", "index", 0.25, 0.5, 0.75])
def test_killed_build_restarts_to_the_same_result(tmp_path, tiny_cos_model, point, reference_build):
    src, ref_out, ref_seconds = reference_build
    out = tmp_path / "idx"
    _run_killed_at(point, _build_cmd(src, out, tiny_cos_model), out, ref_seconds)
    with pytest.raises(Exception):
        bundle_lib.open_bundle(str(out))  # nothing half-built is visible
    done = subprocess.run(_build_cmd(src, out, tiny_cos_model), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    want_manifest, want_ids = _bundle_content(ref_out)
    got_manifest, got_ids = _bundle_content(out)
    assert len(set(got_ids)) == 600  # every valid passage exactly once
    assert got_ids == want_ids  # under the same FAISS row id as in the uninterrupted build
    assert got_manifest["counts"]["vectors"] == want_manifest["counts"]["vectors"] == 600
    e = emb.open_embeddings(str(out) + ".embeddings").manifest["counts"]
    assert (e["read"], e["encoded"], e["rejected"]) == (602, 600, 2)
    if point == "journal":
        assert e["reused"] >= 100  # the journal of the killed run was reused
    ref_vecs, got_vecs = vectors(str(ref_out) + ".embeddings"), vectors(str(out) + ".embeddings")
    for doc_id, v in ref_vecs.items():
        np.testing.assert_allclose(got_vecs[doc_id], v, atol=1e-5)
