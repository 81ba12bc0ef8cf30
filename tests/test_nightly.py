"""The README's nightly commands work the second night: `densebeam build ... --versioned` and
`densebeam build ... --overwrite` run twice into the same location; the second run reuses every vector,
in the default precision (``auto``) and in every precision this CPU computes in."""

from __future__ import annotations

import json

import pytest

from densebeam.index_store.artifacts import versions
from densebeam.index_store.encoding import cpu
from densebeam.index_store.query.search import Searcher
from densebeam.pipelines import cli
from densebeam.transforms.cache import reusable_precisions
from conftest import make_passages, write_jsonl
from kernel_checks import int16_kernels_here


@pytest.mark.parametrize("mode", ["--versioned", "--overwrite"])
def test_the_same_command_twice(tmp_path, tiny_cos_model, mode, capsys):
    src = write_jsonl(tmp_path / "corpus" / "c.jsonl.gz", make_passages(150, seed=6), gz=True)
    out = tmp_path / "index"
    cmd = ["build", "--input", str(tmp_path / "corpus" / "*.jsonl.gz"), "--output", str(out), mode,
           "--model", tiny_cos_model, "--runner", "local"]  # the default precision, auto
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


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16", "int16"])
def test_a_second_run_reuses_the_vectors_of_its_precision(tmp_path, tiny_cos_model, precision, capsys):
    if precision.startswith("bf16") and not cpu.native_bf16():
        pytest.skip(f"this CPU ({cpu.family()}) has no bf16 arithmetic")
    if precision == "int16" and not int16_kernels_here():
        pytest.skip("the native int16 kernels do not run here")
    write_jsonl(tmp_path / "c.jsonl", make_passages(60, seed=8))
    cmd = ["encode", "--input", str(tmp_path / "c.jsonl"), "--output", str(tmp_path / "emb"), "--overwrite",
           "--model", tiny_cos_model, "--runner", "local", "--precision", precision]
    assert cli.main(cmd) == 0
    first = json.loads((tmp_path / "emb" / "_manifest.json").read_text())
    assert first["model_facts"]["precision"] == precision and first["counts"]["encoded"] == 60
    capsys.readouterr()
    assert cli.main(cmd) == 0
    assert "(0 encoded now, 60 reused from earlier runs)" in capsys.readouterr().out
    again = json.loads((tmp_path / "emb" / "_manifest.json").read_text())
    assert again["counts"]["reused"] == 60 and again["model_facts"]["precision"] == precision


def test_which_precisions_a_run_reuses():
    """A given precision reuses only its own vectors; ``auto`` left to the workers any it may choose."""
    assert reusable_precisions("bf16-mixed" if cpu.native_bf16() else "fp32", "cpu") == \
        {"bf16-mixed" if cpu.native_bf16() else "fp32"}
    auto = reusable_precisions("auto", "cpu")
    assert "fp32" in auto and "fp16" not in auto
    assert auto == ({"fp32", "bf16-mixed", "bf16"} if cpu.native_bf16() else
                    {"fp32", "int16"} if cpu.family() in ("avx2", "avx512") else {"fp32"})
