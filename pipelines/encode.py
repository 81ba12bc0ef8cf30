"""densebeam encode: corpus shards -> Parquet embeddings dir (one Beam pipeline).

    densebeam encode --input 'corpus/*.jsonl.gz' --output emb/ --model sentence-transformers/all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from typing import Optional, Sequence

import apache_beam as beam
import fsspec

from index_store import embeddings as emb
from index_store.encoder import DEFAULT_MODEL, DEFAULT_TOKEN_BUDGET, DEVICES, PRECISIONS, load_encoder
from runners.presets import LOCAL, pipeline_options
from transforms.corpus_io import DEFAULT_SPLIT_BYTES, FORMATS, ReadOptions, expand_patterns
from transforms.encode import EncodeOptions, EncodePassages
from transforms.read import ReadCorpus
from transforms.write import WriteEmbeddings

log = logging.getLogger(__name__)


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
    g.add_argument("--max-id-bytes", type=int, default=256, help="longer ids are rejected")
    g.add_argument("--max-text-bytes", type=int, default=1 << 20, help="longer texts are rejected")
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
    g.add_argument("--device", default="auto", choices=DEVICES)
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="compute precision; auto = bf16 on CPUs with native bf16, fp16 on CUDA, else fp32")
    g.add_argument("--max-seq-length", type=int, default=None, help="truncate passages to this many tokens")
    g.add_argument("--no-join-title", action="store_true", help="encode the text only, not title + text")
    g.add_argument("--batch-size", type=int, default=512, help="passages per inference call")
    g.add_argument("--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET,
                   help="max padded tokens per forward pass (length-sorted batches)")


def add_output_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="stored vector dtype")
    g.add_argument("--no-text", action="store_true", help="do not store text/title beside the vectors")
    g.add_argument("--rows-per-shard", type=int, default=200_000)
    g.add_argument("--overwrite", action="store_true", help="replace an existing output")


def add_runner_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runner (other Beam flags pass through unchanged)")
    g.add_argument("--runner", default=LOCAL,
                   help="'local' (FnApiRunner, no downloads) or any Beam runner name")
    g.add_argument("--workers", type=int, default=1, help="local worker processes")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="densebeam encode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="embeddings dir (local path or fsspec URL)")
    add_read_args(p)
    add_encode_args(p)
    add_output_args(p)
    add_runner_args(p)
    return p


def read_options(args) -> ReadOptions:
    return ReadOptions(format=args.format, id_field=args.id_field, text_field=args.text_field,
                       title_field=args.title_field or None,
                       tsv_columns=tuple(c.strip() for c in args.tsv_columns.split(",")),
                       max_id_bytes=args.max_id_bytes, max_text_bytes=args.max_text_bytes,
                       split_bytes=args.split_bytes)


def encode_options(args) -> EncodeOptions:
    return EncodeOptions(model=args.model, similarity=args.similarity, device=args.device,
                         precision=args.precision, max_seq_length=args.max_seq_length,
                         token_budget=args.token_budget, join_title=not args.no_join_title,
                         batch_size=args.batch_size)


def check_output(path: str, overwrite: bool) -> None:
    fs, root = fsspec.core.url_to_fs(path)
    if fs.exists(emb.join(root, emb.MANIFEST)) and not overwrite:
        raise FileExistsError(f"{path} already holds an embeddings dir; pass --overwrite to replace it")


def encode_stage(p: beam.Pipeline, files, read_opts: ReadOptions, enc_opts: EncodeOptions, facts,
                 output: str, args) -> beam.PCollection:
    """The labelled steps of the encode pipeline; returns the one-element manifest PCollection."""
    corpus = p | "ReadCorpus" >> ReadCorpus(files, read_opts, dedup=not args.no_dedup)
    encoded = corpus["passages"] | "Encode" >> EncodePassages(enc_opts, facts.similarity)
    rejected = (corpus["rejected"], encoded["rejected"]) | "Rejected" >> beam.Flatten()
    extra = {"inputs": [{"path": f, "bytes": s} for f, s in files],
             "options": {"read": dataclasses.asdict(read_opts), "encode": dataclasses.asdict(enc_opts)}}
    return ({"encoded": encoded["encoded"], "rejected": rejected, "read_counts": corpus["read_counts"]}
            | "Write" >> WriteEmbeddings(output, facts, keep_text=not args.no_text,
                                         rows_per_shard=args.rows_per_shard, manifest_extra=extra))


def run_pipeline(argv: Optional[Sequence[str]] = None):
    """Parse options and run the encode pipeline to completion; returns (manifest, Beam result)."""
    args, beam_args = build_parser().parse_known_args(argv)
    read_opts, enc_opts = read_options(args), encode_options(args)
    check_output(args.output, args.overwrite)
    files = expand_patterns(args.input)
    log.info("encoding %d file(s), %.1f MB", len(files), sum(s for _, s in files) / 1e6)
    # Resolve the model facts up front: a bad model name fails here, before any worker starts.
    encoder = load_encoder(enc_opts.model, similarity=enc_opts.similarity, device=enc_opts.device,
                           precision=enc_opts.precision, max_seq_length=enc_opts.max_seq_length,
                           token_budget=enc_opts.token_budget)
    facts = encoder.facts(dtype=args.dtype)
    start = time.monotonic()
    p = beam.Pipeline(options=pipeline_options(args.runner, beam_args, workers=args.workers))
    encode_stage(p, files, read_opts, enc_opts, facts, args.output, args)
    result = p.run()
    result.wait_until_finish()
    manifest = emb.open_embeddings(args.output).manifest
    manifest["_wall_seconds"] = time.monotonic() - start
    return manifest, result


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the encode pipeline; returns the embeddings manifest (plus ``_wall_seconds``)."""
    return run_pipeline(argv)[0]
