"""Mistakes fail in the first second: flags, inputs, outputs, model paths, a corpus's field names, files
of other formats in a glob and qrels are checked before torch, Beam's pipeline modules or a model load
(``pipelines/preflight.py``), with a message naming what is wrong and the flag that fixes it. And every
option's --help says what it does and its default."""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import time

import pytest

from densebeam.pipelines import parsers, query_cli
from conftest import REPO, make_passages, write_jsonl

_PROBE = """
import sys, time
start = time.monotonic()
from densebeam.pipelines import cli
try:
    rc = cli.main(sys.argv[1:])
except SystemExit as err:  # argparse's own errors
    rc = err.code
# Beam's core may load to check a flag densebeam does not know (Beam's option names); never its ML,
# torch, FAISS or a model
heavy = sorted(m for m in ("torch", "apache_beam.ml", "faiss", "sentence_transformers", "transformers")
               if m in sys.modules)
print("PROBE", rc, round(time.monotonic() - start, 3), ",".join(heavy), file=sys.stderr)
"""


def _run(*argv, cwd=REPO):
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, cwd=cwd, timeout=120)
    wall = time.monotonic() - start
    probe = [ln for ln in out.stderr.splitlines() if ln.startswith("PROBE")]
    assert probe, out.stderr[-2000:]
    _, rc, seconds, heavy = (probe[-1].split(" ") + [""])[:4]
    errors = [ln for ln in out.stderr.splitlines() if ": error: " in ln]
    return int(rc), float(seconds), heavy, errors[-1] if errors else "", wall


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fail-fast")
    good = write_jsonl(tmp / "in" / "corpus.jsonl", make_passages(20, seed=1))
    (tmp / "in" / "README.txt").write_text("what this folder holds\n")
    (tmp / "in" / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td00001\t1\n")
    pyserini = write_jsonl(tmp / "pyserini.jsonl", [{"id": f"d{i}", "contents": "some text"} for i in range(5)])
    (tmp / "headed.tsv").write_text("pid\tpassage\n1\tthe river\n2\tthe city\n")
    existing = tmp / "existing"
    existing.mkdir()
    (existing / "_manifest.json").write_text("{}")
    return tmp, good, pyserini, existing


@pytest.mark.timing
@pytest.mark.parametrize("case", ["missing input", "folder input", "mistyped flag", "existing output",
                                  "missing model", "fields named otherwise", "other formats in a glob",
                                  "a bad value", "missing bundle", "missing qrels", "unknown metric",
                                  "port in use", "a TSV header", "someone else's folder"])
def test_mistakes_fail_before_anything_heavy_loads(corpora, case):
    tmp, good, pyserini, existing = corpora
    out = str(tmp / "out")
    argv, expect = {
        "missing input": (["encode", "--input", str(tmp / "nope.jsonl"), "--output", out], "matches no file"),
        "folder input": (["encode", "--input", str(tmp / "in"), "--output", out], "is a folder; give its corpus files"),
        "mistyped flag": (["encode", "--input", str(good), "--output", out, "--modle", "x"], "did you mean --model"),
        "existing output": (["encode", "--input", str(good), "--output", str(existing)], "pass --overwrite"),
        "missing model": (["build", "--input", str(good), "--output", out, "--model", str(tmp / "no-model")],
                          "no such model folder"),
        "fields named otherwise": (["encode", "--input", str(pyserini), "--output", out],
                                   "Map them with --id-field id --text-field contents"),
        "other formats in a glob": (["encode", "--input", str(tmp / "in" / "*"), "--output", out],
                                    "2 of the 3 input file(s) do not look like corpus records (README.txt, qrels.tsv)"),
        "a bad value": (["build", "--input", str(good), "--output", out, "--memory-budget", "lots"],
                        "cannot read the size"),
        "missing bundle": (["search", "--index", str(tmp / "no-bundle"), "--query", "x"], "does not exist"),
        "missing qrels": (["eval", "--index", str(existing), "--queries", str(good), "--qrels", str(tmp / "q.tsv")],
                          None),
        "unknown metric": (["eval", "--index", str(existing), "--queries", str(good), "--qrels", str(good),
                            "--metrics", "nDGC@10"], None),
        "someone else's folder": (["build", "--input", str(good), "--output", str(tmp / "in"), "--overwrite"],
                                  "--output " + str(tmp / "in") + " holds other files (README.txt, corpus.jsonl, "
                                  "qrels.tsv), not an index bundle: give a new or empty folder"),
        "a TSV header": (["encode", "--input", str(tmp / "headed.tsv"), "--output", out],
                         "its first line looks like a header (pid, passage)"),
        "port in use": (["serve", "--index", str(existing), "--port", "PORT"],
                        "Address already in use; pick another --port"),
    }[case]
    busy = None
    if case == "port in use":  # another process listens there
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        argv[argv.index("PORT")] = str(busy.getsockname()[1])
    if case in ("missing qrels", "unknown metric", "port in use"):  # only a bundle's manifest is looked at
        (existing / "manifest.json").write_text("{}")
        expect = {"missing qrels": "does not exist", "unknown metric": "unknown metric 'nDGC@10'"}.get(case, expect)
    try:
        rc, seconds, heavy, error, wall = _run(*argv)
    finally:
        if busy is not None:
            busy.close()
    assert rc == 2 and expect in error, (rc, error)
    assert heavy == "", f"{heavy} imported before the mistake was reported"
    assert seconds < 2.5, f"{seconds} s to report {case}"  # about 1 s on a quiet 2-core machine


def test_every_option_says_what_it_does_and_its_default():
    commands = {"encode": parsers.build_encode_parser(), "index": parsers.build_parser(),
                "build": parsers.build_command_parser(), **{c: query_cli.parser(c) for c in ("search", "eval", "serve")}}
    for name, p in commands.items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            assert action.help and len(action.help) > 8, (name, action.option_strings)
            if action.default is not None and action.default is not False and action.default != []:
                shown = p._get_formatter()._get_help_string(action)  # what --help prints after the flag
                assert re.search(r"\bdefaults?[: ]", shown), (name, action.option_strings, shown)
        text = p.format_help()
        assert "(default: " in text, name
    assert "(default: 10)" in query_cli.parser("search").format_help()
    assert "(default: 0)" in query_cli.parser("serve").format_help()  # --watch-seconds: 0 is a value, not "off"
    assert "(default: 100)" in query_cli.parser("search").format_help()  # --rerank-depth
    assert "(default: 1234)" in parsers.build_parser().format_help()
