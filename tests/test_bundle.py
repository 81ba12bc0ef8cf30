"""Index bundles: build both layouts, open, search, and refuse damaged or unsafe bundles."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import faiss
import fsspec
import numpy as np
import pytest

from densebeam.index_store.artifacts import bundle as bundle_mod
from densebeam.index_store import ivf
from densebeam.index_store.artifacts.bundle_manifest import REFINE_PATTERN
from densebeam.index_store.artifacts.bundle import (BundleError, CurvePoint, layout_paths, open_bundle, read_manifest,
                                                   verify, write_manifest)
from densebeam.index_store.artifacts.docstore import DocstoreWriter
from densebeam.index_store.types import ModelFacts
from ivf_helpers import add_to_empty

DIM, N, NLIST, SHARDS = 32, 3000, 32, 3
FACTS = ModelFacts(model="tiny-test", revision=None, dim=DIM, similarity="cos", dtype="float32")


def clustered(n: int, seed: int, dim: int = DIM, clusters: int = 40) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = centres[rng.integers(0, clusters, n)] + 0.35 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def train(sample: np.ndarray, factory: str) -> bytes:
    """ivf.train_empty_index, except for PQ: few k-means iterations, so a test bundle trains in a second;
    the file format is the same."""
    if ",PQ" not in factory:
        return ivf.train_empty_index(sample, factory)
    index = ivf.new_index(DIM, factory)
    pq_index = faiss.downcast_index(faiss.extract_index_ivf(index))
    pq_index.pq.cp.niter, pq_index.cp.seed = 4, 1234
    index.train(sample)
    return ivf.index_to_bytes(index)


def build(root: Path, layout: str, codec: str = "Flat", quantizer: str = "", refine: bool = False) -> dict:
    """A complete small bundle the way the pipeline writes it: files first, manifest last. ``quantizer``
    "_HNSW32" gives the graph coarse quantizer large builds get; ``refine`` a tiered bundle (float32
    vectors files re-scoring the compact codes)."""
    xb = clustered(N, seed=1)
    paths = layout_paths(SHARDS)
    factory = f"IVF{NLIST}{quantizer},{codec}"
    trained = train(xb[::2] if codec == "Flat" else xb, factory)
    (root / "shards").mkdir(parents=True)
    (root / paths.trained).write_bytes(trained)
    bounds = np.linspace(0, N, SHARDS + 1).astype(int)
    for i, (s, e) in enumerate(zip(bounds, bounds[1:])):
        ivf.write_index(add_to_empty(trained, np.arange(s, e), xb[s:e]), str(root / paths.shards[i]))
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
    refine_fields = {}
    if refine:
        (root / "vectors").mkdir()
        vector_files = [REFINE_PATTERN.format(index=i, count=SHARDS) for i in range(SHARDS)]
        for rel, (s, e) in zip(vector_files, zip(bounds, bounds[1:])):
            np.save(root / rel, xb[s:e])
        files += vector_files
        refine_fields = {"refine": {"factors_by_k": {"10": 4}, "files": vector_files}}
    fields = {**refine_fields, "model_facts": FACTS.to_dict(), "factory": factory, "nlist": NLIST, "codec": codec, "metric": "inner_product", "nprobe": 8, "recall_at_k": 0.97, "k": 10,
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
    # the typed record carries what the JSON says, typed
    r = b.record
    assert (r.layout, r.factory, r.nlist, r.nprobe, r.k, r.vectors, r.shards) == (layout, f"IVF{NLIST},Flat", NLIST, 8, 10, N, SHARDS)
    assert r.recall_curve == (CurvePoint(8, 0.97),) and r.model_facts == FACTS and r.codec == "Flat"
    assert [(f.path, f.size, f.sha256) for f in r.files] == [(e["path"], e["size"], e["sha256"]) for e in manifest["files"]]
    assert r.raw["inputs"] == {"embeddings": "file:///x"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.nprobe = 1
    xb = clustered(N, seed=1)
    scores, ids = b.searcher.search(xb[[5, 1500, 2999]], 3, b.default_nprobe)
    assert ids[:, 0].tolist() == [5, 1500, 2999]  # each vector finds itself first
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert [h["id"] for h in b.docstore.get(ids[:, 0])] == ["d5", "d1500", "d2999"]
    assert b.docstore.get([2999])[0]["text"] == "passage 2999"


@pytest.mark.parametrize("layout,codec,quantizer", [("shards", "SQ8", ""), ("merged", "PQ8x8", ""),
                                                    ("merged", "Flat", "_HNSW32"), ("shards", "SQ8", "_HNSW32")])
def test_every_codec_and_quantizer_densebeam_writes_validates_and_searches(tmp_path, layout, codec, quantizer):
    """The structural validation knows every index kind a build can write (SQ8, PQ, the HNSW coarse
    quantizer of nlist >= 65536 builds): they open, and each vector finds itself."""
    build(tmp_path / "b", layout, codec, quantizer)
    b = open_bundle(str(tmp_path / "b"))
    assert b.searcher.ntotal == N and len(b.docstore) == N
    rows = [5, 1500, 2999]
    _, ids = b.searcher.search(clustered(N, seed=1)[rows], 10, NLIST)
    assert all(r in found for r, found in zip(rows, ids.tolist()))


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


# ---------------------------------------------------------------- only what the manifest covers

@pytest.fixture(scope="module")
def built_merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles") / "merged"
    build(root, "merged")
    return root


@pytest.fixture
def merged(built_merged, tmp_path):
    dst = tmp_path / "merged"
    shutil.copytree(built_merged, dst)
    return dst


def outside_link(root: Path, rel: str, outside: Path) -> None:
    """Replace ``rel`` (a file or a folder) by a symlink to an identical copy outside the bundle: every
    hash still matches."""
    target = outside / rel.replace("/", "_")
    shutil.move(str(root / rel), str(target))
    os.symlink(target, root / rel)


@pytest.mark.parametrize("rel", ["docstore/part-00001-of-00003.arrow", "docstore", "index.ivfdata", "trained.faiss"])
def test_links_out_of_the_bundle_are_refused(merged, tmp_path, rel):
    outside_link(merged, rel, tmp_path)
    for mode in ("full", "sizes", "none"):
        with pytest.raises(BundleError, match="outside the bundle"):
            open_bundle(str(merged), verify=mode)
    with pytest.raises(BundleError, match="outside the bundle"):
        verify(str(merged), read_manifest(str(merged)))


def test_a_manifest_linked_from_outside_is_refused(merged, tmp_path):
    outside_link(merged, "manifest.json", tmp_path)
    with pytest.raises(BundleError, match="manifest.json is a link to .* outside the bundle"):
        open_bundle(str(merged))


def test_links_inside_the_bundle_are_resolved_and_opened(merged, tmp_path):
    (merged / "data").mkdir()
    shutil.move(str(merged / "index.ivfdata"), str(merged / "data" / "lists.bin"))
    os.symlink(os.path.join("data", "lists.bin"), merged / "index.ivfdata")  # relative, inside
    os.symlink(merged, tmp_path / "alias")  # the bundle itself reached through a link
    b = open_bundle(str(tmp_path / "alias"))
    assert b.searcher.ntotal == N
    assert b.searcher.search(clustered(N, seed=1)[[7]], 1, NLIST)[1][0, 0] == 7


@pytest.mark.parametrize("unlisted", ["index.faiss", "index.ivfdata", "trained.faiss",
                                      "docstore/part-00000-of-00003.arrow"])
def test_files_the_manifest_does_not_list_are_never_opened(merged, unlisted):
    """A layout file missing from ``files`` refuses the bundle, even when present and valid (a reader
    opening files by fixed name would take it), and even a flipped .ivfdata the manifest never covered."""
    edit_manifest(merged, lambda m: m.update(files=[e for e in m["files"] if e["path"] != unlisted]))
    data = bytearray((merged / unlisted).read_bytes())
    data[len(data) // 2] ^= 0x10
    (merged / unlisted).write_bytes(bytes(data))
    for mode in ("full", "none"):
        with pytest.raises(BundleError, match=f"(does not list|lists docstore parts).*{unlisted.split('/')[0]}"):
            open_bundle(str(merged), verify=mode)


def test_an_empty_file_list_never_reaches_faiss(merged):
    (merged / "index.faiss").write_bytes(b"IwFl" + b"\xff" * 64)  # FAISS would be asked to read this
    edit_manifest(merged, lambda m: m.update(files=[]))
    for mode in ("full", "sizes", "none"):
        with pytest.raises(BundleError, match="lists docstore parts \\[\\]"):
            open_bundle(str(merged), verify=mode)


@pytest.mark.parametrize("version", [True, False, 0, -1, 1.0, "1", None, [1], {"v": 1}])
def test_malformed_format_versions_are_refused(copy, version):
    edit_manifest(copy, lambda m: m.update(format_version=version))
    with pytest.raises(BundleError, match="malformed format_version"):
        read_manifest(str(copy))
    with pytest.raises(BundleError, match="malformed format_version"):
        open_bundle(str(copy), verify="none")


def test_a_missing_format_version_is_refused(copy):
    edit_manifest(copy, lambda m: m.pop("format_version"))
    with pytest.raises(BundleError, match="malformed format_version None"):
        open_bundle(str(copy))


@pytest.mark.parametrize("field,value", [("nlist", "32"), ("nprobe", 0), ("layout", "flat"), ("counts", {}),
                                         ("model_facts", {"dim": 32}), ("recall_curve", [{"nprobe": "8"}])])
def test_malformed_manifest_fields_are_refused(copy, field, value):
    edit_manifest(copy, lambda m: m.update({field: value}))
    with pytest.raises(BundleError, match=f"manifest.json has .*{field}"):
        read_manifest(str(copy))


def test_a_fifo_or_folder_in_place_of_a_file_is_refused_without_hanging(copy):
    target = copy / "docstore/part-00001-of-00003.arrow"
    target.unlink()
    os.mkfifo(target)  # opening a FIFO for reading would block until a writer comes
    with pytest.raises(BundleError, match="part-00001-of-00003.arrow .*not a regular file"):
        open_bundle(str(copy), verify="none")
    target.unlink()
    target.mkdir()
    with pytest.raises(BundleError, match="part-00001-of-00003.arrow .*not a regular file"):
        open_bundle(str(copy))


def test_a_pinned_file_is_the_file_that_was_hashed(tmp_path):
    from densebeam.index_store.fsutil import PinnedFile

    path = tmp_path / "f.bin"
    path.write_bytes(b"A" * 4096)
    with PinnedFile(str(path), "f.bin") as pinned:
        digest = pinned.sha256()
        replacement = tmp_path / "g.bin"
        replacement.write_bytes(b"B" * 4096)
        os.replace(replacement, path)  # the name now holds other bytes ...
        with open(pinned.use_path, "rb") as f:  # ... but what is opened through the pin is what was hashed
            assert f.read() == b"A" * 4096
        pinned.check_unchanged()
    with PinnedFile(str(path), "f.bin") as pinned:
        pinned.sha256()
        time.sleep(0.01)
        with open(path, "r+b") as f:  # written in place after hashing: refused
            f.write(b"C")
        with pytest.raises(ValueError, match="f.bin changed while it was being opened"):
            pinned.check_unchanged()
    assert digest == hashlib.sha256(b"A" * 4096).hexdigest()


def plant(index: Path, ivfdata: Path, query: np.ndarray) -> int:
    """Overwrite the first vector of the first non-empty list of a merged bundle's data file with
    ``query`` (same size, so only the sha256 tells the files apart); return that vector's row id."""
    from densebeam.index_store.artifacts.faiss_format import list_ids, parse_ivf

    parsed = parse_ivf(index.read_bytes(), "index.faiss")
    data = bytearray(ivfdata.read_bytes())
    j = int(np.flatnonzero(parsed.lists.sizes)[0])
    at = int(parsed.lists.offsets[j])
    row = int(next(list_ids(parsed, bytes(data)))[0])
    data[at:at + 4 * DIM] = query.astype(np.float32).tobytes()
    ivfdata.write_bytes(bytes(data))
    return row


def test_what_is_used_is_what_was_hashed_while_the_file_is_swapped(merged, tmp_path):
    """A writer keeps swapping index.ivfdata between the hashed bytes and other bytes of the same size
    (a planted vector) while a reader opens and searches: every open either refuses (the sha256 of the
    bytes it pinned does not match) or serves the hashed bytes, never the planted ones."""
    import threading

    query = np.random.default_rng(3).standard_normal((1, DIM)).astype(np.float32)
    query /= np.linalg.norm(query)
    good, bad = tmp_path / "good.ivfdata", tmp_path / "bad.ivfdata"
    shutil.copy(merged / "index.ivfdata", good)
    shutil.copy(merged / "index.ivfdata", bad)
    planted = plant(merged / "index.faiss", bad, query[0])
    honest = open_bundle(str(merged)).searcher.search(query, 1, NLIST)[1][0, 0]
    assert honest != planted
    stop = threading.Event()

    def swap():
        i = 0
        while not stop.is_set():
            src = (good, bad)[i % 2]
            shutil.copy(src, tmp_path / "next")
            os.replace(tmp_path / "next", merged / "index.ivfdata")
            i += 1

    writer = threading.Thread(target=swap)
    writer.start()
    outcomes: Counter = Counter()
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline or min(outcomes["served"], outcomes["refused"]) == 0 and time.monotonic() < deadline + 20:
            try:
                b = open_bundle(str(merged))
            except BundleError as err:
                assert "index.ivfdata" in str(err) and ("sha256" in str(err) or "changed" in str(err)), err
                outcomes["refused"] += 1
                continue
            top = b.searcher.search(query, 1, NLIST)[1][0, 0]
            assert top == honest, "served bytes other than the ones that were hashed"
            outcomes["served"] += 1
    finally:
        stop.set()
        writer.join()
    logging.getLogger(__name__).warning("index.ivfdata swapped while opening: %s", dict(outcomes))
    assert outcomes["served"] > 0 and outcomes["refused"] > 0, outcomes
