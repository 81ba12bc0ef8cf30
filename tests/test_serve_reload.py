"""Reloading a running service: the admin token and throttle, no work for an unchanged version, a new
version proven in a child process before it swaps, warming. Real bundles (copies of one tiny build in a
versioned location), a real uvicorn server on 127.0.0.1, real tiny models."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import re
import struct
import sys
import time
from pathlib import Path

import httpx
import pytest

from densebeam.index_store.artifacts import versions
from densebeam.index_store.artifacts.bundle import open_bundle
from densebeam.index_store.query import reload as reload_lib
from densebeam.index_store.query.search import Searcher
from densebeam.index_store.query.serve import Limits, Reloading
from query_fixtures import build_tiny_bundle, toy_queries
from test_serve_limits import FAST, Served

TOKEN = "t0ken-for-the-reload-tests-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
QUERIES = toy_queries(6, seed=9)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_cos_model) -> str:
    return build_tiny_bundle(tmp_path_factory.mktemp("reload-build"), tiny_cos_model, 200, 23)


def _add_version(root: Path, name: str, bundle: str, switch: bool = True) -> Path:
    path = root / "versions" / name
    shutil.copytree(bundle, path)
    if switch:
        versions.switch(str(root), name)
    return path


@pytest.fixture()
def location(tmp_path, built) -> Path:
    root = tmp_path / "idx"
    _add_version(root, "v1", built)
    return root


def _serve(location: Path, token=TOKEN, limits: Limits = Limits(**FAST), **options):
    vid = reload_lib.identify(str(location))
    searcher = Searcher.open(vid.path, precision="fp32", device="cpu")
    reloading = Reloading(location=str(location), verify="full", proof_timeout_s=120)
    return Served(searcher, limits, reloading=reloading, admin_token=token, version=vid, **options)


def _search_ok(url: str) -> list:
    r = httpx.post(url + "/search", json={"queries": QUERIES, "k": 5}, timeout=30)
    assert r.status_code == 200
    return [[h["doc_id"] for h in o["hits"]] for o in r.json()["results"]]


def test_admin_is_off_without_a_token(location):
    with _serve(location, token=None) as srv:
        r = httpx.post(srv.url + "/admin/reload", headers=AUTH, timeout=30)
        assert r.status_code == 403 and "--admin-token-file" in r.json()["detail"]


def test_admin_needs_the_token_and_is_throttled(location):
    with _serve(location, limits=Limits(admin_burst=4, admin_per_s=0.01, **FAST)) as srv:
        post = lambda headers: httpx.post(srv.url + "/admin/reload", headers=headers, timeout=30)  # noqa: E731
        assert post({}).status_code == 401
        assert post({"Authorization": "Bearer " + TOKEN[:-1] + "x"}).status_code == 401
        ok = post(AUTH)
        assert ok.status_code == 200 and ok.json()["reloaded"] is False
        assert post(AUTH).status_code == 200  # 4 of the burst of 4 spent
        throttled = post(AUTH)  # right token or not: the throttle comes first
        assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1
        assert post({}).status_code == 429


def test_new_version_swaps_unchanged_is_free_and_no_paths_leak(location, built, tmp_path):
    with _serve(location) as srv:
        before = _search_ok(srv.url)
        assert httpx.get(srv.url + "/health").json()["version"] == "v1"
        v2 = _add_version(location, "v2", built)
        r = httpx.post(srv.url + "/admin/reload", headers=AUTH, timeout=120)
        assert r.status_code == 200 and r.json()["reloaded"] is True and r.json()["version"] == "v2", r.text
        health = httpx.get(srv.url + "/health").json()
        assert health["version"] == "v2" and health["reloads"] == 1
        assert _search_ok(srv.url) == before  # the same build: the same answers
        # Unchanged: nothing is read. A flipped byte in a file the service does not use (trained.faiss)
        # goes unnoticed by a plain reload and is caught by a forced one, which keeps v2 serving.
        with open(v2 / "trained.faiss", "r+b") as f:
            f.seek(100)
            byte = f.read(1)
            f.seek(100)
            f.write(bytes([byte[0] ^ 0xFF]))
        same = httpx.post(srv.url + "/admin/reload", headers=AUTH, timeout=120)
        assert same.status_code == 200 and same.json()["reloaded"] is False and same.json()["version"] == "v2"
        forced = httpx.post(srv.url + "/admin/reload?force=true", headers=AUTH, timeout=120)
        assert forced.status_code == 409 and "trained.faiss" in forced.json()["detail"], forced.text
        assert httpx.get(srv.url + "/health").json()["reloads"] == 1 and _search_ok(srv.url) == before
        for answer in (r, same, forced):
            assert str(tmp_path) not in answer.text and "/versions/" not in answer.text, answer.text


def test_expose_paths_puts_them_back(location):
    with _serve(location, expose_paths=True) as srv:
        health = httpx.get(srv.url + "/health").json()
        assert health["bundle"] == str(location / "versions" / "v1")
        info = httpx.get(srv.url + "/info").json()
        assert info["manifest"]["inputs"][0]["embeddings"].startswith("/")


def _corrupt_list_offset(bundle: Path) -> None:
    """Point one inverted list of index.faiss far outside index.ivfdata and re-hash the manifest: the
    files match their hashes, and FAISS would read unmapped memory searching that list."""
    path = bundle / "index.faiss"
    data = bytearray(path.read_bytes())
    at = data.rindex(b"ilod") + 4
    nlist, _code_size, n = struct.unpack_from("<QQQ", data, at)
    assert n == nlist
    table = at + 24
    sizes = [struct.unpack_from("<Q", data, table + 24 * j)[0] for j in range(nlist)]
    j = max(range(nlist), key=lambda i: sizes[i])  # a non-empty list: every probe of it reads there
    struct.pack_into("<Q", data, table + 24 * j + 16, 1 << 44)
    path.write_bytes(bytes(data))
    manifest = json.loads((bundle / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == "index.faiss":
            entry["size"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def test_a_hash_consistent_corrupt_version_is_refused_and_the_old_one_keeps_serving(location, built):
    """POST /admin/reload to such a version is refused (not a 200 followed by a search that kills the
    service), and the old version keeps serving."""
    bad = _add_version(location, "v-bad", built)
    _corrupt_list_offset(bad)
    with pytest.raises(reload_lib.ReloadError):
        reload_lib.prove(str(bad), "full", timeout_s=120)  # hashes match: only the child's search can tell
    versions.switch(str(location), "v1")
    with _serve(location, limits=Limits(admin_burst=10, **FAST)) as srv:
        before = _search_ok(srv.url)
        versions.switch(str(location), "v-bad")
        r = httpx.post(srv.url + "/admin/reload", headers=AUTH, timeout=120)
        assert r.status_code == 409 and "refused" in r.json()["detail"], r.text
        health = httpx.get(srv.url + "/health").json()
        assert health["version"] == "v1" and health["reloads"] == 0
        assert _search_ok(srv.url) == before  # alive, and still the old version


def _fake_python(tmp_path: Path, script: str) -> str:
    exe = tmp_path / "fake-python"
    exe.write_text("#!/bin/sh\n" + script + "\n")
    exe.chmod(0o755)
    return str(exe)


def test_prove_reports_a_child_killed_by_a_signal_or_hanging(tmp_path, monkeypatch, built):
    # What the parent sees when a bundle crashes FAISS in the child: a death by signal, reported by name.
    monkeypatch.setattr(sys, "executable", _fake_python(tmp_path, "kill -SEGV $$"))
    with pytest.raises(reload_lib.ReloadError, match="died with SIGSEGV"):
        reload_lib.prove(built)
    monkeypatch.setattr(sys, "executable", _fake_python(tmp_path, "exec sleep 30"))
    with pytest.raises(reload_lib.ReloadError, match="took over 1 s"):
        reload_lib.prove(built, timeout_s=1)


def test_prove_and_warm_a_good_bundle(built):
    report = reload_lib.prove(built, "full", timeout_s=120)
    assert report["vectors"] == 200 and report["hits"] > 0
    bundle = open_bundle(built)
    manifest_files = {e["path"]: e["size"] for e in bundle.manifest["files"]}
    lists = sum(s for p, s in manifest_files.items() if p.endswith(".ivfdata") or p.startswith("shards/"))
    docstore = sum(s for p, s in manifest_files.items() if p.startswith("docstore/"))
    whole = reload_lib.warm(bundle, 1 << 30)
    assert whole["bytes_read"] == lists + docstore and whole["lists_whole"] and whole["scan_seconds"] is not None
    part = reload_lib.warm(bundle, 1000)
    assert part["bytes_read"] == 1000 and not part["lists_whole"] and part["scan_seconds"] is None
    assert os.path.getsize(os.path.join(bundle.root, "index.ivfdata")) > 1000


def _polls(url: str) -> int:
    text = httpx.get(url + "/metrics").text
    return int(re.search(r"^densebeam_watch_polls_total (\d+)$", text, re.M).group(1))


def _wait_polls(url: str, n: int, timeout_s: float = 60) -> None:
    """Until the reload watch has read the location ``n`` more times (its /metrics counter)."""
    want, deadline = _polls(url) + n, time.monotonic() + timeout_s
    while _polls(url) < want:
        assert time.monotonic() < deadline, "the watch stopped polling"
        time.sleep(0.05)


def test_the_watch_refuses_a_bad_version_once_and_takes_the_next_good_one(location, built, caplog):
    bad = _add_version(location, "v-bad", built, switch=False)
    _corrupt_list_offset(bad)
    _add_version(location, "v2", built, switch=False)
    vid = reload_lib.identify(str(location))
    searcher = Searcher.open(vid.path, precision="fp32", device="cpu")
    reloading = Reloading(location=str(location), verify="full", watch_seconds=0.1, proof_timeout_s=120)
    with Served(searcher, Limits(**FAST), reloading=reloading, version=vid) as srv:
        with caplog.at_level("ERROR", logger="densebeam.index_store.query.serve"):
            versions.switch(str(location), "v-bad")
            deadline = time.monotonic() + 30
            while not any("refused version v-bad" in r.getMessage() for r in caplog.records):
                assert time.monotonic() < deadline, "the watch never tried the new version"
                time.sleep(0.1)
            _wait_polls(srv.url, 10)  # ten more polls of the same bad version
        refusals = [r for r in caplog.records if "refused version v-bad" in r.getMessage()]
        assert len(refusals) == 1, [r.getMessage() for r in refusals]
        assert httpx.get(srv.url + "/health").json()["version"] == "v1" and _search_ok(srv.url)
        versions.switch(str(location), "v2")
        deadline = time.monotonic() + 60
        while httpx.get(srv.url + "/health").json()["version"] != "v2":
            assert time.monotonic() < deadline, "the watch did not take the next good version"
            time.sleep(0.1)
