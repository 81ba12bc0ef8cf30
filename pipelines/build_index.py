"""densebeam index: embeddings dir(s) -> FAISS IVF index bundle (one Beam pipeline).
densebeam build: encode then index, in one command.

    densebeam index --embeddings emb/ --output index/
    densebeam build --input 'corpus/*.jsonl' --output index/ [--model M]
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import apache_beam as beam
import fsspec

from densebeam.index_store.artifacts import bundle as bundle_lib
from densebeam.index_store import fsutil
from densebeam.index_store.artifacts import signing
from densebeam.index_store.artifacts import versions
from densebeam.index_store.ivf.plan import plan_build
from densebeam.index_store.artifacts.embeddings import join, open_embeddings
from densebeam.pipelines.argparsing import parse_pipeline_args
from densebeam.pipelines.parsers import build_command_parser, build_parser, parse_bytes  # noqa: F401
from densebeam.runners.presets import pipeline_options
from densebeam.runners.progress import wait_with_progress
from densebeam.transforms.index import BuildIndex

log = logging.getLogger(__name__)
PROGRESS_SECONDS = 30.0  # the launcher logs the index build's counters this often (Flink, Dataflow)


def prepare_output(root: str, overwrite: bool) -> None:
    """Refuse to replace a bundle unless asked; when asked, un-publish it first (manifest removed before
    anything else), so a failed rebuild never leaves a bundle that opens."""
    fs, path = fsspec.core.url_to_fs(root)
    manifest = join(path, bundle_lib.MANIFEST)
    if fs.exists(manifest):
        if not overwrite:
            raise FileExistsError(f"{root} already holds an index bundle; pass --overwrite to replace it")
        fs.rm(manifest)
    for stale in ("_build", "shards", "docstore", "vectors", "index.faiss", "index.ivfdata", "trained.faiss"):
        if fs.exists(join(path, stale)):
            fs.rm(join(path, stale), recursive=True)
    fs.makedirs(path, exist_ok=True)


def run_index(args, beam_args: Sequence[str]):
    sign_key = signing.read_key(args.sign_key)  # a bad key file fails before any work
    dirs = [open_embeddings(d) for d in args.embeddings]
    plan = plan_build(dirs, nlist=args.nlist, codec=args.codec,
                      memory_budget_bytes=parse_bytes(args.memory_budget), n_queries=args.recall_queries,
                      k=args.k, target_recall=args.target_recall, layout=args.layout, seed=args.seed,
                      calibration_queries=args.calibration_queries, kmeans=args.kmeans,
                      refine=args.refine)
    log.info("indexing %d vectors from %d shard(s): %s, training on %d, layout %s", plan.n_vectors,
             len(plan.shards), plan.factory, plan.train_size, plan.layout)
    target = args.output
    if args.versioned:
        name = versions.new_version_name()
        target = versions.version_path(args.output, name)
    else:
        prepare_output(args.output, args.overwrite)
    extra = {"inputs": [{"embeddings": fsutil.canonical_url(d.root), "counts": d.counts} for d in dirs]}
    p = beam.Pipeline(options=pipeline_options(args.runner, beam_args, workers=args.workers))
    _ = p | "BuildIndex" >> BuildIndex(plan, target, extra)
    result = p.run()
    wait_with_progress(result, PROGRESS_SECONDS, plan.n_vectors)
    if sign_key is not None:
        signing.sign_bundle(target, sign_key)
    if args.versioned:
        bundle_lib.publish_version(args.output, name, keep=args.keep_versions)
    return bundle_lib.read_manifest(target), result


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """``densebeam index``: returns the bundle manifest."""
    args, beam_args = parse_pipeline_args(build_parser(), argv)
    return run_index(args, beam_args)[0]


def run_build(argv: Optional[Sequence[str]] = None) -> tuple[dict, dict]:
    """``densebeam build``: encode to the embeddings dir, then index; returns both manifests."""
    from densebeam.pipelines import encode  # imports torch (via Beam's RunInference): only when encoding

    args, beam_args = parse_pipeline_args(build_command_parser(), argv)
    signing.read_key(args.sign_key)  # a bad key file fails before the encoding
    emb_dir = args.embeddings_dir or args.output.rstrip("/") + ".embeddings"
    start = time.monotonic()
    enc_argv = _encode_argv(list(argv or []), emb_dir)
    emb_manifest = encode.run(enc_argv)
    args.embeddings = [emb_dir]
    manifest, _ = run_index(args, beam_args)
    manifest["_wall_seconds"] = time.monotonic() - start
    return emb_manifest, manifest


_INDEX_ONLY = {"--nlist", "--codec", "--refine", "--memory-budget", "--layout", "--target-recall", "--recall-queries",
               "--k", "--seed", "--embeddings-dir", "--output", "--keep-versions", "--calibration-queries",
               "--kmeans", "--sign-key"}
_INDEX_FLAGS = {"--versioned"}


def _encode_argv(argv: list[str], emb_dir: str) -> list[str]:
    """The build command's flags minus the index-only ones, with --output pointing at the embeddings."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in _INDEX_ONLY:
            skip = "=" not in a
            continue
        if name in _INDEX_FLAGS:
            continue
        out.append(a)
    if "--overwrite" not in out:
        out.append("--overwrite")  # the intermediate embeddings are the build's own
    return out + ["--output", emb_dir]
