"""Hostile bundles: hash-consistent bit flips in every file, links out of the bundle, files outside the
manifest's cover, malformed format versions. No bundle crashes a reader.

Each flipped bundle is probed in a child process (tests/hostile_probe.py), so a segfault in FAISS or
Arrow kills the child, not pytest: the child must never die by a signal, and each flip must either be
refused with an error naming the flipped file (by ``open_bundle`` and by ``densebeam inspect --verify``
alike) or open, scan every list and read every docstore row fine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import select
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from densebeam.index_store.types import ModelFacts
from densebeam.pipelines import build_index
from test_build_index import clustered, write_embeddings_dir

log = logging.getLogger(__name__)

DIM, N, NLIST = 32, 1500, 16
FACTS = ModelFacts(model="synthetic", revision=None, dim=DIM, similarity="cos", dtype="float32")
PROBE = str(Path(__file__).with_name("hostile_probe.py"))
REGION_BYTES = 512  # "header" = the first 512 bytes of a file, "tail" = the last 512, "middle" = the rest
FLIPS_PER_REGION = 12


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """One bundle per layout, built by the real index pipeline from 3 uneven embeddings shards."""
    tmp = tmp_path_factory.mktemp("hostile")
    emb = write_embeddings_dir(tmp / "emb", clustered(N, seed=4), FACTS, shard_rows=600)
    out = {}
    for layout in ("merged", "shards"):
        build_index.run(["--embeddings", emb, "--output", str(tmp / layout), "--layout", layout,
                         "--nlist", str(NLIST), "--recall-queries", "50", "--runner", "local"])
        out[layout] = tmp / layout
    return out


class Prober:
    """A long-lived child running hostile_probe.py; restarted whenever it dies."""

    def __init__(self):
        self.proc = None
        self._start()

    def _start(self) -> None:
        read_end, write_end = os.pipe()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent)] + sys.path))
        self.proc = subprocess.Popen([sys.executable, PROBE, str(write_end)], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
                                     pass_fds=(write_end,), env=env)
        os.close(write_end)
        self.results = os.fdopen(read_end, "r")

    def probe(self, path: Path, queries: np.ndarray, timeout: float = 120) -> dict:
        self.proc.stdin.write(json.dumps({"path": str(path), "queries": queries.tolist(), "k": 10}) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.results], [], [], timeout)
        line = self.results.readline() if ready else None
        if line:
            return json.loads(line)
        if not ready:
            self.proc.kill()
        rc = self.proc.wait()
        self.results.close()
        self._start()
        return {"status": "hung" if not ready else "crashed", "returncode": rc}

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.results.close()


@pytest.fixture(scope="module")
def prober():
    p = Prober()
    yield p
    p.close()


def flip_positions(size: int, rng: random.Random, per_region: int = FLIPS_PER_REGION) -> list[tuple[str, int, int]]:
    """(region, byte, bit) samples: ``per_region`` in the header, the tail and the middle."""
    regions = {"header": range(0, min(REGION_BYTES, size)), "tail": range(max(0, size - REGION_BYTES), size),
               "middle": range(REGION_BYTES, max(REGION_BYTES, size - REGION_BYTES))}
    out = []
    for region, span in regions.items():
        for byte in rng.sample(span, min(per_region, len(span))):
            out.append((region, byte, rng.randrange(8)))
    return out


def rehash(root: Path, rel: str) -> None:
    """Make the manifest agree with the file's current bytes (size and sha256): a forged bundle."""
    manifest = json.loads((root / "manifest.json").read_bytes())
    data = (root / rel).read_bytes()
    for entry in manifest["files"]:
        if entry["path"] == rel:
            entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def attack(root: Path, prober: Prober, queries: np.ndarray, reference: dict, only: tuple[str, ...] = ("",),
           per_region: int = FLIPS_PER_REGION) -> Counter:
    """Flip sampled bits in every file of the bundle at ``root`` whose name ends with one of ``only``
    (rehashed, so the hash check passes; the manifest's own flips are not), probe each, restore it.
    Returns counts by outcome."""
    rng = random.Random(14)
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name.endswith(only))
    counts: Counter = Counter()
    manifest_bytes = (root / "manifest.json").read_bytes()
    for rel in files:
        original = (root / rel).read_bytes()
        for region, byte, bit in flip_positions(len(original), rng, per_region):
            with open(root / rel, "r+b") as f:
                f.seek(byte)
                f.write(bytes([original[byte] ^ (1 << bit)]))
            if rel != "manifest.json":
                rehash(root, rel)
            result = prober.probe(root, queries)
            (root / rel).write_bytes(original)
            (root / "manifest.json").write_bytes(manifest_bytes)
            where = f"{rel} byte {byte} bit {bit} ({region})"
            status = result["status"]
            assert status in ("refused", "opened"), f"{where}: the reader {status}: {result}"
            if status == "refused":
                named = rel if rel != "manifest.json" else "manifest"
                assert named in result["error"], f"{where}: the refusal does not name the file: {result['error']}"
                assert result["inspect_rc"] == 2, f"{where}: inspect --verify did not refuse it"
                counts[f"refused:{rel.split('/')[0]}"] += 1
                counts["refused"] += 1
            else:
                assert result["inspect_rc"] == 0, f"{where}: opens, but inspect --verify refused it"
                same = result["ids"] == reference["ids"] and result["doc_ids"] == reference["doc_ids"]
                counts["harmless, same answers" if same else "harmless, other answers"] += 1
            counts["tried"] += 1
    return counts


@pytest.mark.parametrize("layout", ["merged", "shards"])
def test_hash_consistent_bit_flips_never_crash_a_reader(bundles, prober, tmp_path, layout):
    root = tmp_path / layout
    shutil.copytree(bundles[layout], root)
    queries = clustered(8, seed=21)
    reference = prober.probe(root, queries)
    assert reference["status"] == "opened" and reference["inspect_rc"] == 0, reference
    assert reference["rows"] == N
    start = time.monotonic()
    counts = attack(root, prober, queries, reference)
    log.warning("bit flips, %s layout: %s in %.1f s", layout, dict(sorted(counts.items())),
                time.monotonic() - start)
    assert counts["refused"] > 0 and counts["tried"] == counts["refused"] + counts[
        "harmless, same answers"] + counts["harmless, other answers"]


@pytest.mark.parametrize("layout,codec,quantizer,refine", [
    ("shards", "SQ8", "", False), ("merged", "PQ8x8", "", False), ("merged", "RaBitQ", "", False),
    ("merged", "Flat", "_HNSW32", False), ("merged", "SQ8", "", True)])
def test_bit_flips_in_every_index_kind_never_crash_a_reader(prober, tmp_path, layout, codec, quantizer, refine):
    """The same attack on the FAISS files of the other index kinds a build writes (SQ8, PQ and RaBitQ
    codecs, the HNSW coarse quantizer of nlist >= 65536 builds) and on a tiered bundle's float32 vectors
    files, fewer flips per file."""
    from test_bundle import N as ROWS, build

    root = tmp_path / "b"
    build(root, layout, codec, quantizer, refine)
    queries = clustered(8, seed=21)
    reference = prober.probe(root, queries)
    assert reference["status"] == "opened" and reference["rows"] == ROWS, reference
    counts = attack(root, prober, queries, reference, only=(".npy",) if refine else (".faiss", ".ivfdata"),
                    per_region=8)
    log.warning("bit flips, %s %s%s: %s", layout, codec, quantizer, dict(sorted(counts.items())))
    assert counts["refused"] > 0 and counts["tried"] >= 48
