"""densebeam build on a real Flink session cluster (one JobManager, two TaskManagers, separate JVMs),
Beam's Flink job server fetched with Maven, Python SDK workers from an EXTERNAL worker pool (separate
processes). The bundle must hold what the local runner builds from the same input, the encoding must
be spread evenly over both workers (each within 15% of half), and nothing may outlive the test."""

from __future__ import annotations

import collections
import json
import logging
import time
import urllib.request

import numpy as np
import psutil
import pytest

from densebeam.index_store.artifacts import bundle as bundle_lib
from densebeam.pipelines import build_index
from densebeam.runners import flink
from densebeam.runners import sdk_boot
from densebeam.runners.presets import pipeline_options
from densebeam.transforms.encode import WORKER_LOG_ENV
from conftest import make_passages, write_jsonl
from flink_cluster import LocalFlinkCluster
from test_encode_pipeline import load_rows

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

N_BIG, N_SMALL = 700, 150


def _our_processes(markers: tuple[str, ...]) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if any(m in cmd for m in markers):
            found.append(proc)
    return found


def _rest(cluster: LocalFlinkCluster, path: str) -> dict:
    with urllib.request.urlopen(f"http://{cluster.rest_address}{path}", timeout=10) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_cos_model):
    tmp = tmp_path_factory.mktemp("flink")
    jar = flink.fetch_job_server()  # Maven, cached in ~/.cache/densebeam/jars
    log_jar = flink.fetch_log_binding(jar.lib)
    big = write_jsonl(tmp / "corpus" / "big.jsonl", make_passages(N_BIG, seed=3, prefix="b"))
    small = write_jsonl(tmp / "corpus" / "small.jsonl", make_passages(N_SMALL, seed=4, prefix="s"))
    common = ["--input", str(big), "--input", str(small), "--model", tiny_cos_model, "--precision", "fp32",
              "--batch-size", "32", "--nlist", "16", "--recall-queries", "100",
              "--rows-per-shard", "300"]
    local = build_index.run_build(common + ["--output", str(tmp / "local"), "--runner", "local"])

    markers = (str(tmp), str(jar.launcher), "worker_pool_main", "SdkHarness", "densebeam.runners.sdk_boot")
    before = {p.pid for p in _our_processes(markers)}
    wlog = tmp / "worker-log"
    wlog.mkdir()
    # PROCESS environment: each TaskManager starts its own SDK worker processes (children of its JVM)
    # with this boot command; nothing Docker, nothing shared between TaskManagers.
    boot = sdk_boot.write_boot_command(tmp / "sdk-boot.sh", {
        **{k: v for k, v in flink.worker_env(1).items() if k in ("PATH", "PYTHONPATH", "OMP_NUM_THREADS")},
        WORKER_LOG_ENV: str(wlog)})
    progress = _Collect()
    progress_log = logging.getLogger("densebeam.runners.progress")
    progress_log.addHandler(progress)
    level = progress_log.level
    progress_log.setLevel(logging.INFO)  # what the CLI's logging set-up gives it
    start = time.monotonic()
    with LocalFlinkCluster(jar.lib, tmp / "cluster", task_managers=2, slots=1,
                                 extra_classpath=[log_jar] if log_jar else []) as cluster:
        cluster_up = time.monotonic() - start
        try:
            on_flink = build_index.run_build(common + [
                "--output", str(tmp / "flink"), "--runner", "flink", "--workers", "2", "--progress-seconds", "1",
                "--flink_master", cluster.rest_address,
                "--environment_type=PROCESS", json.dumps({"command": str(boot)}).join(
                    ["--environment_config=", ""])])
            jobs = [_rest(cluster, f"/jobs/{j['jid']}") for j in _rest(cluster, "/jobs/overview")["jobs"]]
        finally:
            flink.shutdown_managed()  # the job server densebeam started
    elapsed = time.monotonic() - start

    def leftover_processes():
        return [p for p in _our_processes(markers) if p.pid not in before and p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]

    deadline = time.monotonic() + 10  # processes being torn down get a moment to exit; polled, not slept
    leftovers = leftover_processes()
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.1)
        leftovers = leftover_processes()
    progress_log.removeHandler(progress)
    progress_log.setLevel(level)
    return {"tmp": tmp, "local": local, "flink": on_flink, "jobs": jobs, "wlog": wlog, "progress": progress.lines,
            "leftovers": leftovers, "elapsed": elapsed, "cluster_up": cluster_up, "jar": jar}


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def test_the_launcher_shows_progress_while_flink_runs(runs):
    """The console is not silent for the minutes a cluster run takes: the launcher logs the workers'
    counters as it waits."""
    assert any(line.startswith("progress after") for line in runs["progress"]), runs["progress"]


def test_flink_bundle_equals_local_bundle(runs):
    tmp = runs["tmp"]
    (l_emb, l_idx), (f_emb, f_idx) = runs["local"], runs["flink"]
    assert f_emb["counts"] == l_emb["counts"]
    assert f_emb["counts"]["encoded"] == N_BIG + N_SMALL
    assert f_emb["model_facts"] == l_emb["model_facts"]
    local_rows, flink_rows = load_rows(tmp / "local.embeddings"), load_rows(tmp / "flink.embeddings")
    assert set(flink_rows) == set(local_rows)
    for doc_id, (vec, text, title) in local_rows.items():
        np.testing.assert_allclose(flink_rows[doc_id][0], vec, atol=1e-6)
        assert flink_rows[doc_id][1:] == (text, title)
    for key in ("vectors", "training_vectors"):
        assert f_idx["counts"][key] == l_idx["counts"][key]
    assert (f_idx["factory"], f_idx["nlist"], f_idx["model_facts"]) == \
        (l_idx["factory"], l_idx["nlist"], l_idx["model_facts"])
    # Every vector sits in both indexes under its document: an exhaustive search for each passage's
    # own vector finds it first (or a passage with the very same text and vector), in both bundles.
    ids = sorted(local_rows)
    queries = np.stack([local_rows[i][0] for i in ids])
    for root in (tmp / "local", tmp / "flink"):
        b = bundle_lib.open_bundle(str(root))
        scores, rows = b.searcher.search(queries, 1, b.manifest["nlist"])
        found = [d["id"] for d in b.docstore.get(rows[:, 0].tolist())]
        same = [f == i or np.array_equal(local_rows[f][0], local_rows[i][0]) for f, i in zip(found, ids)]
        assert all(same), (root, [(i, f) for i, f, ok in zip(ids, found, same) if not ok][:5])
        np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_flink_really_ran_both_jobs_in_parallel(runs):
    jobs = runs["jobs"]
    assert len(jobs) == 2 and all(j["state"] == "FINISHED" for j in jobs), [j["state"] for j in jobs]
    assert max(v["parallelism"] for j in jobs for v in j["vertices"]) == 2
    # The encoding itself was spread evenly over the two SDK worker processes. Each copy of the encode
    # step logs to encode-<host>-<pid>-<copy>.log (a process can hold several): add up per process.
    per_worker = collections.Counter()
    for log in runs["wlog"].glob("encode-*.log"):
        per_worker[log.stem.rsplit("-", 1)[0]] += sum(int(x) for x in log.read_text().split())
    total = N_BIG + N_SMALL
    print(f"\nFlink: passages encoded per SDK worker process {dict(sorted(per_worker.items()))}")
    assert len(per_worker) == 2, per_worker
    assert sum(per_worker.values()) == total
    even = total / len(per_worker)
    assert all(abs(n - even) <= 0.15 * even for n in per_worker.values()), (even, per_worker)
    print(f"\nFlink: cluster up in {runs['cluster_up']:.0f} s, cluster+build+teardown "
          f"{runs['elapsed']:.0f} s; passages per SDK worker {sorted(per_worker.values())}; "
          f"job server {runs['jar'].artifact}:{runs['jar'].beam_java_version} (Flink "
          f"{runs['jar'].flink_version})")


def test_nothing_outlives_the_run(runs):
    assert runs["leftovers"] == [], [(p.pid, p.cmdline()[:4]) for p in runs["leftovers"]]


def test_flink_preset_flags_and_user_flags_win(monkeypatch, tmp_path):
    fake = flink.JobServerJar(tmp_path / "launcher.jar", tmp_path, "1.19", "2.62.0", "beam-runners-flink-1.19")
    monkeypatch.setattr(flink, "fetch_job_server", lambda version=None: fake)
    # A job endpoint given: nothing is started; a remote master keeps the user's environment.
    opts = pipeline_options("flink", ["--job_endpoint=localhost:1", "--flink_master", "jm:8081",
                                      "--environment_type=PROCESS", "--parallelism=8"], workers=4)
    d = opts.get_all_options()
    assert d["runner"] == "FlinkRunner" and d["flink_master"] == "jm:8081"
    assert d["job_endpoint"] == "localhost:1" and d["environment_type"] == "PROCESS"
    assert d["parallelism"] == 8  # the user's flag beats --workers
    # A job server jar given and no environment: densebeam starts the job server and a worker pool.
    started = []
    monkeypatch.setattr(flink.JobServer, "start", lambda self: started.append(self.jar) or self)
    monkeypatch.setattr(flink.WorkerPool, "start", lambda self: started.append("pool") or self)
    try:
        d = pipeline_options("flink", [f"--flink_job_server_jar={tmp_path}/x.jar"], workers=2).get_all_options()
        assert d["flink_master"] == "[local]" and d["environment_type"] == "EXTERNAL"
        assert int(d["sdk_worker_parallelism"]) == 2 and d["parallelism"] == 2
        assert d["job_endpoint"].startswith("localhost:") and d["flink_job_server_jar"] == f"{tmp_path}/x.jar"
        assert started[0] == tmp_path / "x.jar" and started[1] == "pool"
    finally:
        flink._MANAGED.clear()


def test_launcher_manifest_names_every_jar(tmp_path):
    import zipfile

    lib = tmp_path / "lib"
    lib.mkdir()
    names = [f"some-rather-long-artifact-name-number-{i:03d}-1.2.3.jar" for i in range(40)]
    for n in names:
        (lib / n).write_bytes(b"")
    jar = flink.write_launcher(lib, tmp_path / "launcher.jar")
    with zipfile.ZipFile(jar) as z:
        raw = z.read("META-INF/MANIFEST.MF")
    assert all(len(line) <= 72 for line in raw.split(b"\r\n"))
    text = raw.replace(b"\r\n ", b"").decode()
    assert f"Main-Class: {flink.JOB_SERVER_MAIN}" in text
    cp = next(line for line in text.split("\r\n") if line.startswith("Class-Path: "))
    assert cp.split()[1:] == [f"lib/{n}" for n in sorted(names)]
