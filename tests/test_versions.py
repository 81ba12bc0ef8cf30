"""Versioned publishing: versions/<name>/ bundles, CURRENT switched atomically after verification,
old versions pruned, a failed build never switches the pointer."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from densebeam.index_store.artifacts import bundle as bundle_lib
from densebeam.index_store.artifacts import versions
from densebeam.index_store.types import ModelFacts
from densebeam.pipelines import build_index
from test_build_index import clustered, write_embeddings_dir

FACTS = ModelFacts(model="synthetic", revision=None, dim=32, similarity="cos", dtype="float32")


def test_versioned_builds_switch_current_and_prune(tmp_path):
    a = write_embeddings_dir(tmp_path / "a", clustered(600), FACTS, 300)
    b = write_embeddings_dir(tmp_path / "b", clustered(900, seed=3), FACTS, 300, prefix="w")
    root = str(tmp_path / "idx")
    args = ["--output", root, "--versioned", "--keep-versions", "2", "--nlist", "8", "--runner", "local"]
    build_index.run(["--embeddings", a] + args)
    first = versions.current(root)
    assert bundle_lib.open_bundle(root).searcher.ntotal == 600
    old = bundle_lib.open_bundle(root)  # a service holding the old version keeps serving it
    build_index.run(["--embeddings", b] + args)
    second = versions.current(root)
    assert second != first and bundle_lib.open_bundle(root).searcher.ntotal == 900
    assert old.searcher.search(clustered(3, seed=9), 5, 8)[1].shape == (3, 5)
    assert old.docstore.get([0])[0]["id"] == "v0"
    build_index.run(["--embeddings", a] + args)
    names = [v["name"] for v in versions.list_versions(root)]
    assert len(names) == 3 and first in names  # retired a moment ago: kept for its grace period
    assert (tmp_path / "idx" / "versions" / first / versions.RETIRED).exists()
    assert versions.prune(root, keep=2, stale_after_s=3600, grace_s=0) == [first]
    names = [v["name"] for v in versions.list_versions(root)]
    assert len(names) == 2 and first not in names and second in names  # pruned to --keep-versions


def test_version_names_sort_in_creation_order():
    names = []
    for _ in range(200):  # many within one second, and within one clock tick now and then
        name = versions.new_version_name()
        if not names or name[:22] != names[-1][:22]:
            names.append(name)
    assert len(names) > 20 and names == sorted(names)


def test_failed_versioned_build_keeps_the_current_version(tmp_path):
    a = write_embeddings_dir(tmp_path / "a", clustered(600), FACTS, 300)
    root = str(tmp_path / "idx")
    args = ["--embeddings", a, "--output", root, "--versioned", "--nlist", "8", "--runner", "local"]
    build_index.run(args)
    good = versions.current(root)
    shard = tmp_path / "a" / "part-00001-of-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(Exception):
        build_index.run(args)
    assert versions.current(root) == good
    assert bundle_lib.open_bundle(root).searcher.ntotal == 600
    incomplete = [v for v in versions.list_versions(root) if not v["complete"]]
    assert len(incomplete) == 1  # left for inspection; pruned once stale


def test_publish_refuses_a_corrupt_version(tmp_path):
    a = write_embeddings_dir(tmp_path / "a", clustered(600), FACTS, 300)
    root = str(tmp_path / "idx")
    build_index.run(["--embeddings", a, "--output", root, "--versioned", "--nlist", "8", "--runner", "local"])
    good = versions.current(root)
    name = versions.new_version_name()
    import shutil

    shutil.copytree(versions.version_path(root, good), versions.version_path(root, name))
    f = tmp_path / "idx" / "versions" / name / "trained.faiss"
    data = bytearray(f.read_bytes())
    data[100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(bundle_lib.BundleError, match="trained.faiss"):
        bundle_lib.publish_version(root, name)
    assert versions.current(root) == good
    assert np.isfinite(bundle_lib.open_bundle(root).searcher.search(clustered(2), 3, 8)[0]).all()


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    """A small complete bundle (no Beam: built directly, as tests/test_bundle.py does)."""
    from test_bundle import build

    root = tmp_path_factory.mktemp("versions-src") / "bundle"
    build(root, "merged")
    return root


def add_version(root, src) -> str:
    """Copy a complete bundle in as a new version (what a build writes before it publishes)."""
    import shutil

    name = versions.new_version_name()
    shutil.copytree(src, versions.version_path(str(root), name))
    return name


def age(path, seconds: float) -> None:
    import os
    import time

    t = time.time() - seconds
    os.utime(path, (t, t))


def test_a_retired_version_survives_its_grace_period(tmp_path, small_bundle):
    root = tmp_path / "idx"
    v1 = add_version(root, small_bundle)
    bundle_lib.publish_version(str(root), v1, keep=1)
    reader = versions.resolve(str(root))  # a reader resolved CURRENT ... then a new version publishes
    v2 = add_version(root, small_bundle)
    bundle_lib.publish_version(str(root), v2, keep=1)
    assert versions.current(str(root)) == v2
    assert bundle_lib.open_bundle(reader).searcher.ntotal == 3000  # v1 is still there: within its grace
    retired = root / "versions" / v1 / versions.RETIRED
    assert retired.exists() and not (root / "versions" / v2 / versions.RETIRED).exists()
    age(retired, versions.DEFAULT_GRACE_S + 1)  # ... its grace has passed: the next publish prunes it
    v3 = add_version(root, small_bundle)
    bundle_lib.publish_version(str(root), v3, keep=1)
    assert [v["name"] for v in versions.list_versions(str(root))] == [v2, v3]
    # a version retired without a marker (an older densebeam) counts from CURRENT's last switch
    (root / "versions" / v2 / versions.RETIRED).unlink()
    assert versions.prune(str(root), keep=1, stale_after_s=3600) == []
    age(root / versions.POINTER, versions.DEFAULT_GRACE_S + 1)
    assert versions.prune(str(root), keep=1, stale_after_s=3600) == [v2]


READER = r"""
import json, logging, os, sys, time
from densebeam.index_store.artifacts.bundle import open_bundle

root, stop, ready = sys.argv[1], sys.argv[2], sys.argv[3]
retries = []
class Count(logging.Handler):
    def emit(self, record):
        retries.append(record.getMessage())
logging.getLogger("densebeam.index_store.artifacts.bundle").addHandler(Count(logging.WARNING))
opens, failures = 0, []
while not os.path.exists(stop) or opens < 5:
    try:
        assert open_bundle(root).searcher.ntotal == 3000
        opens += 1
        open(ready, "w").close()
    except Exception as err:
        failures.append(f"{type(err).__name__}: {err}")
print(json.dumps({"opens": opens, "failures": failures, "retries": len(retries)}))
"""


@pytest.mark.parametrize("grace_s", [versions.DEFAULT_GRACE_S, 0.0])
def test_readers_never_lose_their_version_while_versions_publish(tmp_path, small_bundle, grace_s):
    """A reader opening a versioned location in a loop while new versions publish with --keep-versions 1:
    no open fails. With the default grace period old versions outlive every open; with none (pruned at
    once, the race), an open that loses its version opens the new current one instead."""
    import json
    import os
    import subprocess
    import sys
    import time

    root, stop, ready = tmp_path / "idx", tmp_path / "stop", tmp_path / "ready"
    bundle_lib.publish_version(str(root), add_version(root, small_bundle), keep=1)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    reader = subprocess.Popen([sys.executable, "-c", READER, str(root), str(stop), str(ready)],
                              stdout=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 60
    while not ready.exists() and reader.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    published, deadline = 0, time.monotonic() + 20
    while published < 60 and time.monotonic() < deadline:
        bundle_lib.publish_version(str(root), add_version(root, small_bundle), keep=1, grace_s=grace_s)
        published += 1
    stop.touch()
    out, _ = reader.communicate(timeout=120)
    result = json.loads(out)
    logging.getLogger(__name__).warning("grace %gs: %d versions published, %d opens, %d retried, failures %s",
                                        grace_s, published, result["opens"], result["retries"], result["failures"])
    assert reader.returncode == 0 and result["failures"] == [] and result["opens"] >= 5
    left = versions.list_versions(str(root))
    assert len(left) == (published + 1 if grace_s else 1)
