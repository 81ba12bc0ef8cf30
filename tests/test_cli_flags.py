"""Command-line strictness: a flag that is neither densebeam's nor Beam's fails (exit 2) naming the
closest valid flag; Beam's and the runners' own flags pass through; ``--version``."""

from __future__ import annotations

import pytest

import densebeam
from densebeam.pipelines import build_index, cli, encode
from densebeam.pipelines.argparsing import parse_pipeline_args


@pytest.mark.parametrize("argv, wrong, right", [
    (["index", "--embeddings", "e", "--output", "o", "--memory-budgett", "8GB"], "--memory-budgett",
     "--memory-budget"),
    (["index", "--embeddings", "e", "--output", "o", "--memory-budg", "8GB"], "--memory-budg",
     "--memory-budget"),  # no prefix matching: an abbreviation is not taken for the full flag
    (["search", "--index", "i", "--query", "q", "--nprob", "8"], "--nprob", "--nprobe"),
    (["encode", "--input", "x", "--output", "o", "--direct_num_workrs", "2"], "--direct_num_workrs",
     "--direct_num_workers"),
    (["build", "--input", "x", "--output", "o", "--flink-mastr=host:8081"], "--flink-mastr", "--flink_master"),
    (["eval", "--index", "i", "--queries", "q", "--qrels", "r", "--frist-stage", "bm25"], "--frist-stage",
     "--first-stage"),
    # a mistyped required flag: argparse reports the missing one first, the typo is named beside it
    (["build", "--inputs", "x", "--output", "o"], "--inputs", "--input"),
    (["search", "--index", "i", "--querry", "q"], "--querry", "--query"),
    (["eval", "--index", "i", "--queries", "q", "--qrel", "r"], "--qrel", "--qrels"),
])
def test_mistyped_flags_fail_with_the_closest_valid_flag(argv, wrong, right, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"unrecognized argument {wrong} (did you mean {right}?)" in err


def test_beam_and_runner_flags_pass_through():
    args, beam_args = parse_pipeline_args(build_index.build_parser(), [
        "--embeddings", "e", "--output", "o", "--direct_num_workers=2", "--flink_master", "localhost:8081",
        "--experiments=use_runner_v2", "--project", "p", "--dataflow_service_options=x", "--parallelism", "4"])
    assert args.output == "o"
    assert beam_args == ["--direct_num_workers=2", "--flink_master", "localhost:8081",
                         "--experiments=use_runner_v2", "--project", "p", "--dataflow_service_options=x",
                         "--parallelism", "4"]
    args, beam_args = parse_pipeline_args(encode.build_parser(), ["--input", "x", "--output", "o"])
    assert beam_args == [] and args.input == ["x"]


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"densebeam {densebeam.__version__}"


def test_inference_batch_size_defaults_by_device():
    """``--batch-size`` unset: 512 passages per inference call on CPU, 8,192 on a CUDA GPU (where a call's
    tokenization and transfers are paid per call); an explicit value is kept."""
    import torch

    def batch(*argv):
        args, _ = parse_pipeline_args(encode.build_parser(), ["--input", "x", "--output", "o", *argv])
        return encode.encode_options(args).batch_size

    assert batch("--device", "cpu") == 512
    assert batch("--device", "cuda") == 8192  # a launcher without a GPU may plan for GPU workers
    assert batch("--device", "auto") == (8192 if torch.cuda.is_available() else 512)
    assert batch("--device", "cuda", "--batch-size", "64") == 64
    with pytest.raises(SystemExit) as exc:
        batch("--batch-size", "0")
    assert exc.value.code == 2


@pytest.mark.parametrize("argv, flag", [
    (["encode", "--input", "x", "--output", "o", "--token-budget", "0"], "--token-budget"),  # was: every passage a dead letter
    (["encode", "--input", "x", "--output", "o", "--max-seq-length", "0"], "--max-seq-length"),  # was: silently the model's
    (["encode", "--input", "x", "--output", "o", "--journal-rows", "0"], "--journal-rows"),  # was: a journal file per row
    (["encode", "--input", "x", "--output", "o", "--max-text-bytes", "0"], "--max-text-bytes"),
    (["encode", "--input", "x", "--output", "o", "--max-id-bytes", "-3"], "--max-id-bytes"),
    (["build", "--input", "x", "--output", "o", "--rows-per-shard", "0"], "--rows-per-shard"),
    (["encode", "--input", "x", "--output", "o", "--workers", "0"], "--workers"),
    (["search", "--index", "i", "--query", "q", "--k", "0"], "--k"),
    (["eval", "--index", "i", "--queries", "q", "--qrels", "r", "--batch-size", "0"], "--batch-size"),
    (["eval", "--index", "i", "--queries", "q", "--qrels", "r", "--bi-encoder-rerank-depth", "0"],
     "--bi-encoder-rerank-depth"),
    (["search", "--index", "i", "--query", "q", "--rerank-batch-size", "-1"], "--rerank-batch-size"),
])
def test_counts_below_one_fail_at_parse_time_naming_the_flag(argv, flag, capsys):
    """A count that must be at least 1 is refused before anything loads (exit 2, the flag named), not
    accepted and turned into dead letters, an ignored setting or a file per row later."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "expected a positive integer" in err


def test_a_beam_flag_is_not_taken_for_a_mistyped_required_flag(capsys):
    with pytest.raises(SystemExit):
        cli.main(["index", "--output", "o", "--streaming"])
    err = capsys.readouterr().err
    assert "required: --embeddings" in err and "--streaming" not in err


def test_a_mistyped_command_names_the_closest_one(capsys):
    assert cli.main(["serach", "--index", "i", "--query", "q"]) == 2
    assert "unknown command 'serach' (did you mean 'search'?)" in capsys.readouterr().err
    assert cli.main(["frobnicate"]) == 2
    assert "did you mean" not in capsys.readouterr().err  # nothing close: no guess
