"""A bundle (every codec) opens with plain FAISS + pyarrow exactly as docs/query.md shows: the documented snippet is run
as written (only the bundle path changed) and finds what densebeam's own search finds."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO
from query_fixtures import build_tiny_bundle

pytestmark = pytest.mark.timeout(600)


def documented_snippet() -> str:
    text = (REPO / "docs" / "query.md").read_text(encoding="utf-8")
    section = text[text.index("## Opening a bundle without densebeam"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.parametrize("codec", ["Flat", "SQ8", "RaBitQ"])
def test_documented_plain_faiss_and_pyarrow_recipe(tmp_path, tiny_cos_model, codec):
    """Flat, and SQ8 or RaBitQ codes re-scored from the full vectors (tiered bundles): the snippet finds what
    densebeam finds, with the same (exact) scores."""
    bundle = build_tiny_bundle(tmp_path, tiny_cos_model, 150, 3, "--codec", codec)
    assert ("refine" in __import__("json").load(open(f"{bundle}/manifest.json"))) == (codec != "Flat")
    code = documented_snippet().replace('bundle = "out/sample-index"', f"bundle = {bundle!r}")
    assert bundle in code
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("IO_FLAG_ONDISK_SAME_DIR")  # FAISS's own stdout line, as the docs warn
    pairs = eval(lines[-1], {"np": __import__("numpy"), "float32": float})  # noqa: S307 - our own output
    from densebeam.index_store.query.search import Searcher

    hits = Searcher.open(bundle, precision="fp32", device="cpu").retrieve(
        ["how do vector databases find similar items"], 5)[0]
    assert [float(p[1]) for p in pairs] == pytest.approx([h.score for h in hits], abs=1e-4)
    # The same documents in the same order up to exact ties (the synthetic corpus repeats passages;
    # densebeam breaks ties by the smaller row id, FAISS's heap in any order).
    def canonical(items):
        return sorted(items, key=lambda x: (-round(float(x[1]), 4), x[0]))

    assert [d for d, _ in canonical(pairs)] == [d for d, _ in canonical([(h.doc_id, h.score) for h in hits])]
