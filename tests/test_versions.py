"""Versioned publishing: versions/<name>/ bundles, CURRENT switched atomically after verification,
old versions pruned, a failed build never switches the pointer."""

from __future__ import annotations

import numpy as np
import pytest

from densebeam.index_store import bundle as bundle_lib
from densebeam.index_store import versions
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
        versions.publish(root, name)
    assert versions.current(root) == good
    assert np.isfinite(bundle_lib.open_bundle(root).searcher.search(clustered(2), 3, 8)[0]).all()
