"""Index bundles: build both layouts, open, search, and refuse damaged or unsafe bundles."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import fsspec
import numpy as np
import pytest

from densebeam.index_store import bundle as bundle_mod
from densebeam.index_store import ivf
from densebeam.index_store.bundle import BundleError, layout_paths, open_bundle, read_manifest, verify, write_manifest
from densebeam.index_store.docstore import DocstoreWriter
from densebeam.index_store.types import ModelFacts

DIM, N, NLIST, SHARDS = 32, 3000, 32, 3
FACTS = ModelFacts(model="tiny-test", revision=None, dim=DIM, similarity="cos", dtype="float32")


def clustered(n: int, seed: int, dim: int = DIM, clusters: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def build(root: Path, layout: str) -> dict:
    """A complete small bundle the way the pipeline writes it: files first, manifest last."""
    xb = clustered(N, seed=1)
    paths = layout_paths(SHARDS)
    trained = ivf.train_empty_index(xb[::2], ivf.factory_string(NLIST, "Flat"))
    (root / "shards").mkdir(parents=True)
    (root / paths.trained).write_bytes(trained)
    bounds = np.linspace(0, N, SHARDS + 1).astype(int)
    for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
        ivf.write_index(ivf.add_to_empty(trained, np.arange(s, e), xb[s:e]), str(root / paths.shards[i]))
        with DocstoreWriter(str(root / paths.docstore[i]), base_row=int(s), batch_rows=256) as w:
            w.write([f"d{r}" for r in range(s, e)], [f"passage {r}" for r in range(s, e)], None)
    files = [paths.trained] + paths.docstore
    if layout == "merged":
        ivf.merge_on_disk(trained, [str(root / p) for p in paths.shards], str(root / paths.merged_index),
                          str(root / paths.merged_ivfdata))
        shutil.rmtree(root / "shards")
        files += [paths.merged_index, paths.merged_ivfdata]
    else:
        files += paths.shards
    fields = {"model_facts": FACTS.to_dict(), "factory": ivf.factory_string(NLIST, "Flat"), "nlist": NLIST,
              "codec": "Flat", "metric": "inner_product", "nprobe": 8, "recall_at_k": 0.97, "k": 10,
              "recall_curve": [{"nprobe": 8, "recall": 0.97}], "layout": layout,
              "counts": {"vectors": N, "shards": SHARDS},
              "shards": [{"base": int(s), "rows": int(e - s)} for s, e in zip(bounds, bounds[1:])],
              "inputs": {"embeddings": "file:///x"}}
    return write_manifest(str(root), fields, files)


@pytest.mark.parametrize("layout", ["shards", "merged"])
def test_bundle_opens_and_searches(tmp_path, layout):
    manifest = build(tmp_path / "b", layout)
    assert read_manifest(str(tmp_path / "b")) == manifest
    assert manifest["format"] == "densebeam.index" and manifest["format_version"] == 1
    assert {e["path"] for e in manifest["files"]} >= {"trained.faiss", "docstore/part-00002-of-00003.arrow"}
    # a moved bundle still opens (the merged .ivfdata path must not be absolute inside index.faiss)
    shutil.move(str(tmp_path / "b"), str(tmp_path / "moved"))
    b = open_bundle(str(tmp_path / "moved"))
    assert b.facts == FACTS and b.default_nprobe == 8 and b.searcher.ntotal == N and len(b.docstore) == N
    xb = clustered(N, seed=1)
    scores, ids = b.searcher.search(xb[[5, 1500, 2999]], 3, b.default_nprobe)
    assert ids[:, 0].tolist() == [5, 1500, 2999]  # each vector finds itself first
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert [h["id"] for h in b.docstore.get(ids[:, 0])] == ["d5", "d1500", "d2999"]
    assert b.docstore.get([2999])[0]["text"] == "passage 2999"


def test_layout_paths_sort_and_name_shards():
    paths = layout_paths(4)
    assert paths.shards[0] == "shards/shard-00000-of-00004.faiss"
    assert paths.docstore[3] == "docstore/part-00003-of-00004.arrow"
    assert paths.shards == sorted(paths.shards) and paths.manifest == "manifest.json"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles") / "good"
    build(root, "shards")
    return root


@pytest.fixture
def copy(built, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(built, dst)
    return dst


def test_missing_file_is_named(copy):
    os.remove(copy / "docstore/part-00001-of-00003.arrow")
    with pytest.raises(BundleError, match="part-00001-of-00003.arrow.*missing"):
        open_bundle(str(copy))


def test_flipped_byte_is_named(copy):
    target = copy / "shards/shard-00002-of-00003.faiss"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="shard-00002-of-00003.faiss.*sha256"):
        open_bundle(str(copy))
    verify(str(copy), read_manifest(str(copy)), mode="sizes")  # same size: only a full check sees it


def test_truncated_file_fails_size_check(copy):
    target = copy / "trained.faiss"
    target.write_bytes(target.read_bytes()[:-1])
    with pytest.raises(BundleError, match="trained.faiss has"):
        verify(str(copy), read_manifest(str(copy)), mode="sizes")


def edit_manifest(root: Path, change) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "shards/../../x", "docstore\\p.arrow", "C:/x", "./x"])
def test_escaping_paths_are_refused(copy, bad):
    edit_manifest(copy, lambda m: m["files"].append({"path": bad, "size": 1, "sha256": "0" * 64}))
    with pytest.raises(BundleError, match="unsafe path"):
        read_manifest(str(copy))
    with pytest.raises(BundleError, match="unsafe path"):
        open_bundle(str(copy), verify="none")


def test_newer_format_version_asks_for_upgrade(copy):
    edit_manifest(copy, lambda m: m.update(format_version=99))
    with pytest.raises(BundleError, match="format_version 99.*[Uu]pgrade densebeam"):
        open_bundle(str(copy))


def test_no_manifest_means_unfinished(copy):
    os.remove(copy / "manifest.json")
    with pytest.raises(BundleError, match="manifest.json does not exist"):
        open_bundle(str(copy))


def test_write_manifest_refuses_reserved_fields(copy):
    with pytest.raises(ValueError, match="format_version"):
        write_manifest(str(copy), {"format_version": 2}, ["trained.faiss"])


def test_fsspec_bundle_is_cached_locally(built, tmp_path):
    fs = fsspec.filesystem("memory")
    remote = "memory://densebeam-bundle-test/b"
    for path in sorted(p for p in built.rglob("*") if p.is_file()):
        fs.pipe(f"/densebeam-bundle-test/b/{path.relative_to(built).as_posix()}", path.read_bytes())
    cache = tmp_path / "cache"
    b = open_bundle(remote, cache_dir=str(cache))
    assert Path(b.root).parent == cache and (Path(b.root) / "manifest.json").exists()
    assert b.searcher.ntotal == N
    _, ids = b.searcher.search(clustered(N, seed=1)[[42]], 1, b.default_nprobe)
    assert b.docstore.get(ids[0])[0]["id"] == "d42"
    again = open_bundle(remote, cache_dir=str(cache), verify="sizes")
    assert again.root == b.root and len(os.listdir(cache)) == 1  # reused, no second copy
    assert bundle_mod.read_manifest(remote)["layout"] == "shards"
