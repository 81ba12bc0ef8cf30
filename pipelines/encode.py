"""densebeam encode: corpus shards -> Parquet embeddings dir (one Beam pipeline).

    densebeam encode --input 'corpus/*.jsonl.gz' --output emb/ --model sentence-transformers/all-MiniLM-L6-v2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from typing import Optional, Sequence

import apache_beam as beam
import fsspec

from densebeam.index_store import embeddings as emb
from densebeam.index_store.encoder import load_encoder, resolve_model_path
from densebeam.index_store.model_id import weights_revision
from densebeam.pipelines.argparsing import ArgumentParser, parse_pipeline_args
from densebeam.pipelines.errors import RunFailed
from densebeam.pipelines.options import (add_encode_args, add_output_args, add_read_args, add_runner_args,
                                         max_rejected_share, read_options)
from densebeam.runners.presets import pipeline_options
from densebeam.transforms.cache import JournalEncoded, ReuseEmbeddings, cache_files
from densebeam.transforms.corpus_io import ReadOptions, detect_format, expand_patterns
from densebeam.transforms.estimate import estimate_records
from densebeam.transforms.encode import EncodeOptions, EncodePassages
from densebeam.transforms.read import ReadCorpus
from densebeam.transforms.write import FAILED_REPORT, InSourceOrder, WriteEmbeddings, describe_failure

log = logging.getLogger(__name__)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="densebeam encode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="embeddings dir (local path or fsspec URL)")
    add_read_args(p)
    add_encode_args(p)
    add_output_args(p)
    add_runner_args(p)
    return p


def encode_options(args) -> EncodeOptions:
    return EncodeOptions(model=args.model, similarity=args.similarity, device=args.device,
                         precision=args.precision, max_seq_length=args.max_seq_length,
                         token_budget=args.token_budget, join_title=not args.no_join_title,
                         batch_size=args.batch_size, progress_every_s=args.progress_seconds)


def check_output(path: str, overwrite: bool) -> None:
    fs, root = fsspec.core.url_to_fs(path)
    if fs.exists(emb.join(root, emb.MANIFEST)) and not overwrite:
        raise FileExistsError(f"{path} already holds an embeddings dir; pass --overwrite to replace it")


def encode_identity(facts, enc_opts: EncodeOptions) -> dict:
    """What must agree for a cached vector to be reused: a different model, weights or settings never
    are. The compute precision is not part of it here: each cache file records the precision its vectors
    were computed in, and the worker joining the cache compares it with the one it resolves."""
    return {"model": facts.model, "revision": facts.revision, "similarity": facts.similarity,
            "max_seq_length": facts.max_seq_length, "dtype": facts.dtype, "join_title": enc_opts.join_title}


def encode_stage(p: beam.Pipeline, files, read_opts: ReadOptions, enc_opts: EncodeOptions, facts,
                 output: str, args, cache: Sequence[str] = ()) -> beam.PCollection:
    """The labelled steps of the encode pipeline; returns the one-element manifest PCollection."""
    identity = encode_identity(facts, enc_opts)
    corpus = p | "ReadCorpus" >> ReadCorpus(files, read_opts, dedup=not args.no_dedup, workers=args.workers)
    passages, reused = corpus["passages"], None
    if cache:  # incremental / resumed run: only new or changed passages reach the model
        split = passages | "ReuseEmbeddings" >> ReuseEmbeddings(cache, identity, enc_opts.join_title,
                                                                enc_opts.precision, enc_opts.device)
        passages, reused = split["to_encode"], split["reused"]
    encoded = passages | "Encode" >> EncodePassages(enc_opts, facts.similarity, facts.dim)
    rows = encoded["encoded"] | "Journal" >> JournalEncoded(
        output, facts.to_json(), identity, enc_opts.join_title, args.journal_rows)
    if reused is not None:  # the reuse join shuffled the rows: put each piece's back in source order
        rows = ((rows, reused) | "EncodedAndReused" >> beam.Flatten()
                | "InSourceOrder" >> InSourceOrder([f for f, _ in files]))
    rejected = (corpus["rejected"], encoded["rejected"]) | "Rejected" >> beam.Flatten()
    extra = {"inputs": [{"path": f, "bytes": s} for f, s in files], "encode_identity": identity,
             "options": {"read": dataclasses.asdict(read_opts), "encode": dataclasses.asdict(enc_opts)}}
    return ({"encoded": rows, "rejected": rejected, "read_counts": corpus["read_counts"]}
            | "Write" >> WriteEmbeddings(output, facts, keep_text=not args.no_text,
                                         rows_per_shard=args.rows_per_shard, manifest_extra=extra,
                                         identity=identity, join_title=enc_opts.join_title,
                                         max_rejected_share=max_rejected_share(args.max_rejected_share),
                                         files=[f for f, _ in files]))


def _failure_report(output: str, since: float) -> Optional[str]:
    """The message of a ``_FAILED.json`` this run wrote (None if it wrote none)."""
    fs, root = fsspec.core.url_to_fs(output)
    path = emb.join(root, FAILED_REPORT)
    if not fs.exists(path) or _mtime(fs, path) < since - 1:
        return None
    with fs.open(path, "r", encoding="utf-8") as f:
        return describe_failure(json.load(f), output)


def _counter(result, name: str) -> int:
    from apache_beam.metrics.metric import MetricsFilter

    try:
        found = result.metrics().query(MetricsFilter().with_name(name))["counters"]
    except Exception:  # noqa: BLE001 - a runner without metrics: no breakdown, not a failed run
        return 0
    return int(sum((c.committed or c.attempted or 0) for c in found))


def _mtime(fs, path: str) -> float:
    info = fs.info(path)
    m = info.get("mtime") or info.get("updated") or info.get("LastModified") or 0
    return m.timestamp() if hasattr(m, "timestamp") else float(m)


def run_pipeline(argv: Optional[Sequence[str]] = None):
    """Parse options and run the encode pipeline to completion; returns (manifest, Beam result)."""
    args, beam_args = parse_pipeline_args(build_parser(), argv)
    read_opts, enc_opts = read_options(args), encode_options(args)
    check_output(args.output, args.overwrite)
    files = expand_patterns(args.input)
    expected = estimate_records(files, lambda path: detect_format(path, read_opts.format))
    log.info("encoding %d file(s), %.1f MB, about %s records (estimated from a sample)", len(files),
             sum(s for _, s in files) / 1e6, expected if expected is not None else "an unknown number of")
    enc_opts = dataclasses.replace(enc_opts, expected_passages=expected, workers=args.workers)
    # Resolve the model facts up front: a bad model name fails here, before any worker starts.
    encoder = load_encoder(enc_opts.model, similarity=enc_opts.similarity, device=enc_opts.device,
                           precision=enc_opts.precision, max_seq_length=enc_opts.max_seq_length,
                           token_budget=enc_opts.token_budget)
    # A model from a local directory has no hub revision: its files' digest identifies the weights, so
    # retrained weights at the same path are never taken for the old ones.
    facts = encoder.facts(dtype=args.dtype)
    facts = dataclasses.replace(facts, revision=weights_revision(facts.revision, resolve_model_path(args.model)))
    cache = [] if args.no_reuse else cache_files([args.output] + list(args.reuse or []))
    if cache:
        log.info("reusing vectors from %d cache file(s) where model, settings and text match", len(cache))
    max_rejected_share(args.max_rejected_share)  # a bad value fails before the run starts
    start, start_wall = time.monotonic(), time.time()
    p = beam.Pipeline(options=pipeline_options(args.runner, beam_args, workers=args.workers))
    encode_stage(p, files, read_opts, enc_opts, facts, args.output, args, cache)
    try:
        result = p.run()
        result.wait_until_finish()
    except Exception as err:
        report = _failure_report(args.output, start_wall)
        if report is not None:
            raise RunFailed(report) from err
        raise
    manifest = emb.open_embeddings(args.output).manifest
    manifest["_wall_seconds"] = time.monotonic() - start
    manifest["_worker_msec"] = {name: _counter(result, name) for name in ("encode_msec", "write_msec")}
    manifest["_workers"] = args.workers
    return manifest, result


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the encode pipeline; returns the embeddings manifest (plus ``_wall_seconds``)."""
    return run_pipeline(argv)[0]
