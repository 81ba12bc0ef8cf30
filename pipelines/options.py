"""Command-line option groups shared by the pipelines (no heavy imports: no torch, no Beam ML)."""

from __future__ import annotations

import argparse
from typing import Sequence

from densebeam.index_store.encoding.encoder import DEFAULT_MODEL, DEFAULT_TOKEN_BUDGET, DEVICES, PRECISIONS
from densebeam.pipelines.argparsing import positive_int
from densebeam.runners.presets import LOCAL
from densebeam.index_store.corpus_io import DEFAULT_SPLIT_BYTES, FORMATS, ReadOptions

CPU_BATCH_SIZE = 512
# On a GPU a call's tokenization and transfers are paid per call: larger calls keep it busy
# (docs/benchmarks.md)
GPU_BATCH_SIZE = 8192


def default_batch_size(device: str) -> int:
    """Passages per inference call when ``--batch-size`` is not given: larger on a CUDA GPU."""
    if device == "auto":  # what this (launching) machine has
        from densebeam.index_store.encoding.encoder import pick_device

        device = pick_device(device)
    return GPU_BATCH_SIZE if device == "cuda" else CPU_BATCH_SIZE


def add_read_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--input", action="append", required=True, metavar="GLOB",
                   help="corpus file or glob, local or fsspec URL (repeatable)")
    g.add_argument("--format", default="auto", choices=("auto",) + FORMATS,
                   help="record format; auto = from the extension (.jsonl/.tsv/.parquet, .gz allowed)")
    g.add_argument("--id-field", default="_id", help="JSONL/Parquet id field (default: _id)")
    g.add_argument("--text-field", default="text", help="JSONL/Parquet text field (default: text)")
    g.add_argument("--title-field", default="title", help="JSONL/Parquet title field ('' for none)")
    g.add_argument("--tsv-columns", default="id,text",
                   help="TSV column names, comma separated: id,text (MS MARCO) or id,title,text")
    g.add_argument("--max-id-bytes", type=positive_int, default=256, help="longer ids are rejected")
    g.add_argument("--max-text-bytes", type=positive_int, default=1 << 20, help="longer texts are rejected")
    g.add_argument("--split-bytes", type=int, default=DEFAULT_SPLIT_BYTES,
                   help="uncompressed files larger than this are read in parallel pieces")
    g.add_argument("--no-dedup", action="store_true",
                   help="skip the duplicate-id check (only when ids are known to be unique)")


def add_encode_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="sentence-transformers model: Hugging Face name or local path "
                        f"(default: {DEFAULT_MODEL}, bundled offline)")
    g.add_argument("--similarity", default="auto", choices=("auto", "cos", "dot"),
                   help="cos = unit-normalized vectors, dot = raw; auto = inferred from the model")
    g.add_argument("--device", default="auto", choices=DEVICES,
                   help="where the model runs; auto = a CUDA GPU when torch sees one, else the CPU")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="compute precision; auto = the fastest precision faithful to fp32, measured once per "
                        "machine and model: bf16-mixed on CPUs with bf16 arithmetic, int16 (integer products) on "
                        "other x86-64 CPUs, fp32 where neither is faster or faithful (docs/guide.md)")
    g.add_argument("--max-seq-length", type=positive_int, default=None,
                   help="truncate passages to this many tokens (default: the model's max_seq_length)")
    g.add_argument("--no-join-title", action="store_true", help="encode the text only, not title + text")
    g.add_argument("--document-prompt", default=None, metavar="TEXT",
                   help="prepended to every passage (default: the model's document prompt, as "
                        "sentence-transformers' encode_document takes it; '' for none); recorded in the model facts")
    g.add_argument("--query-prompt", default=None, metavar="TEXT",
                   help="prepended to every query at search time (default: the model's query prompt, as "
                        "encode_query takes it; '' for none); recorded in the model facts")
    g.add_argument("--batch-size", type=positive_int, default=None,
                   help=f"passages per inference call (re-batched by tokens inside); default {CPU_BATCH_SIZE} on CPU, "
                        f"{GPU_BATCH_SIZE} on a CUDA GPU (--device cuda, or auto on a launching machine with one)")
    g.add_argument("--token-budget", type=positive_int, default=DEFAULT_TOKEN_BUDGET,
                   help="max padded tokens per forward pass (length-sorted batches)")
    g.add_argument("--progress-seconds", type=float, default=30.0,
                   help="each worker logs passages done, rate, the run's share done and an ETA this often")


def add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="stored vector dtype")
    g.add_argument("--no-text", action="store_true", help="do not store text/title beside the vectors")
    g.add_argument("--rows-per-shard", type=positive_int, default=200_000,
                   help="at most this many vectors per Parquet shard")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (its vectors are reused for unchanged passages)")
    g.add_argument("--reuse", action="append", metavar="EMB_DIR",
                   help="also reuse vectors from this embeddings dir (same model and settings; repeatable)")
    g.add_argument("--no-reuse", action="store_true",
                   help="re-encode everything: ignore the output's previous vectors and journal")
    g.add_argument("--journal-rows", type=positive_int, default=10_000,
                   help="encoded vectors per journal file (what a killed run can resume from)")
    g.add_argument("--max-rejected-share", action="append", default=[], metavar="REASON=SHARE",
                   help="fail the run (publishing nothing) when dead letters of REASON exceed SHARE of the "
                        "records read; '*' = all reasons (defaults: encode_failed=0.01, bad_embedding=0.01, "
                        "*=0.5; repeatable, e.g. --max-rejected-share '*=1' to never fail on rejections)")


def add_runner_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runner (other Beam flags pass through unchanged)")
    g.add_argument("--runner", default=LOCAL,
                   help="preset: 'local' (FnApiRunner, no downloads), 'flink' (portable Flink, job server "
                        "fetched by Maven, no Docker), 'dataflow' (needs --project, --region, "
                        "--temp_location gs://...); or any Beam runner name. See docs/scale.md")
    g.add_argument("--workers", type=positive_int, default=1,
                   help="local: Beam workers (threads sharing one model); flink: parallelism; "
                        "dataflow: max workers")


def max_rejected_share(values: Sequence[str]) -> dict:
    """``["encode_failed=0.05", "*=1"]`` over the defaults -> {reason: share}."""
    from densebeam.index_store.artifacts.embeddings import DEFAULT_MAX_REJECTED_SHARE

    out = dict(DEFAULT_MAX_REJECTED_SHARE)
    for item in values:
        reason, sep, share = item.partition("=")
        try:
            value = float(share)
        except ValueError:
            value = -1.0
        if not sep or not reason or not 0.0 <= value <= 1.0:
            raise ValueError(f"--max-rejected-share takes REASON=SHARE with SHARE in [0, 1], e.g. "
                             f"encode_failed=0.01 or '*=0.5'; got {item!r}")
        out[reason.strip()] = value
    return out


def read_options(args) -> ReadOptions:
    return ReadOptions(format=args.format, id_field=args.id_field, text_field=args.text_field,
                       title_field=args.title_field or None,
                       tsv_columns=tuple(c.strip() for c in args.tsv_columns.split(",")),
                       max_id_bytes=args.max_id_bytes, max_text_bytes=args.max_text_bytes,
                       split_bytes=args.split_bytes, join_title=not args.no_join_title)
