"""The README's nightly commands work the second night: `densebeam build ... --versioned` and
`densebeam build ... --overwrite` run twice into the same location; the second run reuses every vector."""

from __future__ import annotations

import json

import pytest

from densebeam.index_store.artifacts import versions
from densebeam.index_store.query.search import Searcher
from densebeam.pipelines import cli
from conftest import make_passages, write_jsonl


@pytest.mark.parametrize("mode", ["--versioned", "--overwrite"])
def test_the_same_command_twice(tmp_path, tiny_cos_model, mode, capsys):
    src = write_jsonl(tmp_path / "corpus" / "c.jsonl.gz", make_passages(150, seed=6), gz=True)
    out = tmp_path / "index"
    cmd = ["build", "--input", str(tmp_path / "corpus" / "*.jsonl.gz"), "--output", str(out), mode,
           "--model", tiny_cos_model, "--runner", "local", "--precision", "fp32"]
    assert cli.main(cmd) == 0
    first = versions.resolve(str(out))
    capsys.readouterr()
    assert cli.main(cmd) == 0  # the second night
    summary = capsys.readouterr().out
    assert "read 150  vectors 150 (0 encoded now, 150 reused from earlier runs)  rejected 0" in summary
    assert "nothing to encode: every vector was reused" in summary
    emb = json.loads((tmp_path / "index.embeddings" / "_manifest.json").read_text())
    assert emb["counts"]["reused"] == 150  # nothing re-encoded
    second = versions.resolve(str(out))
    if mode == "--versioned":
        assert second != first and versions.current(str(out)) in second
    hits = Searcher.open(str(out), precision="fp32", device="cpu").retrieve(["river music"], 3)
    assert len(hits[0]) == 3
    assert src.exists()
