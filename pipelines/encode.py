"""densebeam encode: corpus shards -> Parquet embeddings dir (one Beam pipeline).

    densebeam encode --input 'corpus/*.jsonl.gz' --output emb/ --model sentence-transformers/all-MiniLM-L6-v2
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from typing import Optional, Sequence

import apache_beam as beam
import fsspec

from densebeam.index_store.artifacts import embeddings as emb
from densebeam.index_store.encoding import precision_memo
from densebeam.index_store.encoding.encoder import MIN_CALIBRATION_TEXTS, load_encoder, resolve_model_path
from densebeam.index_store.encoding.model_id import weights_revision
from densebeam.pipelines.argparsing import parse_pipeline_args
from densebeam.pipelines.errors import RunFailed
from densebeam.pipelines.options import default_batch_size, max_rejected_share, read_options
from densebeam.pipelines.parsers import build_encode_parser as build_parser  # noqa: F401 - encode.build_parser
from densebeam.runners.presets import pipeline_options
from densebeam.runners.progress import wait_with_progress
from densebeam.transforms.cache import JournalEncoded, ReuseEmbeddings, cache_files
from densebeam.index_store.corpus_io import ReadOptions, detect_format, expand_patterns
from densebeam.transforms.estimate import estimate_records, sample_texts
from densebeam.transforms.encode import EncodeOptions, EncodePassages
from densebeam.transforms.read import ReadCorpus
from densebeam.transforms.write import FAILED_REPORT, InSourceOrder, WriteEmbeddings, describe_failure

log = logging.getLogger(__name__)


def encode_options(args) -> EncodeOptions:
    return EncodeOptions(model=args.model, similarity=args.similarity, device=args.device,
                         precision=args.precision, max_seq_length=args.max_seq_length,
                         token_budget=args.token_budget, join_title=not args.no_join_title,
                         batch_size=(default_batch_size(args.device) if args.batch_size is None
                                     else args.batch_size),
                         progress_every_s=args.progress_seconds, document_prompt=args.document_prompt,
                         query_prompt=args.query_prompt)


def check_output(path: str, overwrite: bool) -> None:
    fs, root = fsspec.core.url_to_fs(path)
    if fs.exists(emb.join(root, emb.MANIFEST)) and not overwrite:
        raise FileExistsError(f"{path} already holds an embeddings dir; pass --overwrite to replace it")


def encode_identity(facts, enc_opts: EncodeOptions) -> dict:
    """What must agree for a cached vector to be reused: a different model, weights or settings never
    are. The compute precision is not part of it here: each cache file records the precision its vectors
    were computed in, which must be one this run computes in (``transforms.cache.reusable_precisions``)."""
    return {"model": facts.model, "revision": facts.revision, "similarity": facts.similarity,
            "max_seq_length": facts.max_seq_length, "dtype": facts.dtype, "join_title": enc_opts.join_title,
            "document_prompt": facts.document_prompt}


def encode_stage(p: beam.Pipeline, files, read_opts: ReadOptions, enc_opts: EncodeOptions, facts,
                 output: str, args, cache: Sequence[str] = (), precision_measurement: Optional[dict] = None,
                 requested: Optional[EncodeOptions] = None) -> beam.PCollection:
    """The labelled steps of the encode pipeline; returns the one-element manifest PCollection.
    ``requested`` are the options as the user gave them (recorded in the manifest; ``enc_opts`` may hold
    the precision ``auto`` resolved to at launch) and ``precision_measurement`` how it was chosen."""
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
             "options": {"read": dataclasses.asdict(read_opts),
                         "encode": dataclasses.asdict(requested or enc_opts)},
             "precision_measurement": precision_measurement or _measured_on_workers(enc_opts.precision)}
    return ({"encoded": rows, "rejected": rejected, "read_counts": corpus["read_counts"]}
            | "Write" >> WriteEmbeddings(output, facts, keep_text=not args.no_text,
                                         rows_per_shard=args.rows_per_shard, manifest_extra=extra,
                                         identity=identity, join_title=enc_opts.join_title,
                                         max_rejected_share=max_rejected_share(args.max_rejected_share),
                                         files=[f for f, _ in files]))


def _measured_on_workers(precision: str) -> dict:
    if precision != "auto":
        return {"measured": False, "chosen": precision, "reason": "--precision given"}
    return {"measured": "on each worker, on a sample of the first batch it encodes",
            "chosen": "see model_facts.precision (each shard file records its own)"}


def resolve_precision_at_launch(encoder, files, read_opts: ReadOptions, runner: str, join_title: bool,
                                model_id: dict) -> Optional[dict]:
    """``--precision auto`` on the local runner: the workers run on this machine, in this process, so the
    precision is decided once here and every worker encodes in the one chosen (the same bits whatever
    the worker count). On a CPU without bf16 arithmetic it is fp32, measuring nothing. Elsewhere it is
    measured on a deterministic sample of the corpus (the start of its first files) the first time a
    model runs on a machine, and remembered (:mod:`densebeam.index_store.encoding.precision_memo`): later runs with
    the same model on the same machine, on this corpus grown or on another one, adopt it without
    measuring. Other runners' workers may have other hardware: they decide on their own. Returns the
    record for the manifest, with the seconds it took (None when not decided here)."""
    if encoder.precision != "auto" or runner != "local":
        return None
    start = time.monotonic()
    record = _decide_precision(encoder, files, read_opts, join_title, model_id)
    return None if record is None else {**record, "seconds": round(time.monotonic() - start, 3)}


def _decide_precision(encoder, files, read_opts: ReadOptions, join_title: bool, model_id: dict) -> Optional[dict]:
    if not encoder.candidates():  # nothing to measure: fp32 by rule
        record, _ = encoder.calibrate_once([])
        return {**record, "where": "at launch, on the machine that runs the local workers"}
    memo_key = precision_memo.key(model_id, encoder.device, encoder.calibration_rules())
    remembered = precision_memo.load(memo_key)
    if remembered is not None and encoder.adopt(remembered):
        log.info("precision auto -> %s, as measured for this model on this machine by an earlier run (%s)",
                 encoder.precision, remembered.get("measured_at", "?"))
        return {**remembered, "reused": f"remembered on this machine, key {memo_key[:16]}; delete "
                                        f"{precision_memo.path(memo_key)} to measure again"}
    sample = sample_texts(files, read_opts, join_title=join_title)
    if len(sample) < MIN_CALIBRATION_TEXTS:
        return None
    record, now = encoder.calibrate_once(sample)
    if not now:  # a library caller's earlier run in this process measured it
        return {**record, "where": "earlier in this process (the encoder is kept per process)"}
    record = {**record, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    precision_memo.save(memo_key, record)
    log.info("precision auto -> %s, measured on %d passages from the start of the corpus (%s)",
             encoder.precision, record.get("sample_passages", 0),
             ", ".join(f"{k} {v.get('passages_per_s', 0):.0f}/s" for k, v in record.get("candidates", {}).items()))
    return {**record, "where": "at launch, on the machine that runs the local workers",
            "sample": "the start of the first input files"}


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
    start, start_wall = time.monotonic(), time.time()  # end to end: planning, model load and measurement too
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
                           token_budget=enc_opts.token_budget, document_prompt=enc_opts.document_prompt,
                           query_prompt=enc_opts.query_prompt)
    # A model from a local directory has no hub revision: its files' digest identifies the weights, so
    # retrained weights at the same path are never taken for the old ones.
    revision = weights_revision(encoder.facts().revision, resolve_model_path(args.model))
    model_id = {"model": args.model, "revision": revision, "similarity": encoder.similarity,
                "max_seq_length": encoder.max_seq_length}
    measurement = resolve_precision_at_launch(encoder, files, read_opts, args.runner, enc_opts.join_title,
                                              model_id)
    requested = enc_opts
    if measurement is not None:  # the workers (this process) encode in the precision measured here
        enc_opts = dataclasses.replace(enc_opts, precision=encoder.precision)
    facts = dataclasses.replace(encoder.facts(dtype=args.dtype), revision=revision)
    cache = [] if args.no_reuse else cache_files([args.output] + list(args.reuse or []))
    if cache:
        log.info("reusing vectors from %d cache file(s) where model, settings and text match", len(cache))
    max_rejected_share(args.max_rejected_share)  # a bad value fails before the run starts
    p = beam.Pipeline(options=pipeline_options(args.runner, beam_args, workers=args.workers))
    encode_stage(p, files, read_opts, enc_opts, facts, args.output, args, cache, measurement, requested)
    try:
        result = p.run()
        wait_with_progress(result, args.progress_seconds, expected)
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
