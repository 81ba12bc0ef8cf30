"""densebeam index: embeddings dir(s) -> FAISS IVF index bundle (one Beam pipeline).
densebeam build: encode then index, in one command.

    densebeam index --embeddings emb/ --output index/
    densebeam build --input 'corpus/*.jsonl' --output index/ [--model M]
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Optional, Sequence

import apache_beam as beam
import fsspec

from densebeam.index_store import bundle as bundle_lib
from densebeam.index_store import fsutil, ivf, kmeans, signing, versions
from densebeam.index_store.build_plan import LAYOUTS, plan_build
from densebeam.index_store.embeddings import join, open_embeddings
from densebeam.index_store.nprobe import DEFAULT_KS
from densebeam.pipelines import options
from densebeam.pipelines.argparsing import ArgumentParser, parse_pipeline_args
from densebeam.runners.presets import pipeline_options
from densebeam.transforms.index import BuildIndex

log = logging.getLogger(__name__)


def parse_bytes(text: Optional[str]) -> Optional[int]:
    """'4GB', '512MiB', '1e9' -> bytes."""
    if text is None:
        return None
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    t = text.strip().lower()
    num = t.rstrip("kmgtib")
    unit = t[len(num):]
    if unit not in units:
        raise ValueError(f"cannot read the size {text!r}; write e.g. 4GB or 512MiB")
    return int(float(num) * units[unit])


def _ks(text: str) -> tuple[int, ...]:
    """'10,100,1000' -> (10, 100, 1000)."""
    try:
        ks = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--k takes positive integers separated by commas, e.g. 10,100,1000; "
                                         f"got {text!r}")
    return ks


def add_index_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("index")
    g.add_argument("--nlist", type=int, default=None, help="IVF lists (default: from the vector count)")
    g.add_argument("--codec", default=None, help="Flat, SQ8 or PQ<m>x8 (default: Flat, or what fits the budget)")
    g.add_argument("--memory-budget", default=None,
                   help="index memory budget, e.g. 8GB: picks the codec and bounds the training sample")
    g.add_argument("--layout", default="merged", choices=LAYOUTS,
                   help="merged: one memory-mappable on-disk index; shards: keep one index per shard")
    g.add_argument("--target-recall", type=float, default=0.95,
                   help="nprobe for each k = the smallest reaching this recall@k against exact search")
    g.add_argument("--recall-queries", type=int, default=1000,
                   help="held-out vectors (or most calibration queries) used to measure recall")
    g.add_argument("--k", type=_ks, default=DEFAULT_KS, metavar="K[,K...]",
                   help="the k of the recall@k measurements (default 10,100,1000); a search for k hits "
                        "uses the nprobe measured for the smallest of these >= k")
    g.add_argument("--calibration-queries", default=None, metavar="FILE",
                   help="measure recall with these real queries instead of held-out passages (for "
                        "asymmetric models): BEIR queries.jsonl or qid<TAB>text TSV, encoded with the "
                        "embeddings' model, or a .npy float32 (q, dim) array of query vectors")
    g.add_argument("--kmeans", default="auto", choices=ivf.KMEANS,
                   help="coarse quantizer training: two-level k-means (fast, spread over workers; auto "
                        f"picks it from {kmeans.TWO_LEVEL_MIN_NLIST} lists up) or FAISS's flat k-means")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--versioned", action="store_true",
                   help="publish into OUTPUT/versions/<name>/ and switch OUTPUT/CURRENT atomically after "
                        "verifying it (no --overwrite needed; services reload to the new version)")
    g.add_argument("--keep-versions", type=int, default=3, help="versions kept with --versioned")
    g.add_argument("--sign-key", default=None, metavar="FILE",
                   help="sign the bundle's manifest with this key (HMAC-SHA256, >= 32 bytes): readers given it "
                        "with --trust-key refuse any change (docs/reliability.md)")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="densebeam index", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", action="append", required=True, metavar="DIR",
                   help="embeddings dir written by densebeam encode (repeatable; same model facts)")
    p.add_argument("--output", required=True, help="index bundle dir (local path or fsspec URL)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    add_index_args(p)
    options.add_runner_args(p)
    return p


def build_command_parser() -> ArgumentParser:
    p = ArgumentParser(prog="densebeam build", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="index bundle dir (local path or fsspec URL)")
    p.add_argument("--embeddings-dir", default=None,
                   help="where the intermediate embeddings go (default: OUTPUT.embeddings beside it)")
    options.add_read_args(p)
    options.add_encode_args(p)
    options.add_output_args(p)
    add_index_args(p)
    options.add_runner_args(p)
    return p


def prepare_output(root: str, overwrite: bool) -> None:
    """Refuse to replace a bundle unless asked; when asked, un-publish it first (manifest removed before
    anything else), so a failed rebuild never leaves a bundle that opens."""
    fs, path = fsspec.core.url_to_fs(root)
    manifest = join(path, bundle_lib.MANIFEST)
    if fs.exists(manifest):
        if not overwrite:
            raise FileExistsError(f"{root} already holds an index bundle; pass --overwrite to replace it")
        fs.rm(manifest)
    for stale in ("_build", "shards", "docstore", "index.faiss", "index.ivfdata", "trained.faiss"):
        if fs.exists(join(path, stale)):
            fs.rm(join(path, stale), recursive=True)
    fs.makedirs(path, exist_ok=True)


def run_index(args, beam_args: Sequence[str]):
    sign_key = signing.read_key(args.sign_key)  # a bad key file fails before any work
    dirs = [open_embeddings(d) for d in args.embeddings]
    plan = plan_build(dirs, nlist=args.nlist, codec=args.codec,
                      memory_budget_bytes=parse_bytes(args.memory_budget), n_queries=args.recall_queries,
                      k=args.k, target_recall=args.target_recall, layout=args.layout, seed=args.seed,
                      calibration_queries=args.calibration_queries, kmeans=args.kmeans)
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
    result.wait_until_finish()
    if sign_key is not None:
        signing.sign_bundle(target, sign_key)
    if args.versioned:
        versions.publish(args.output, name, keep=args.keep_versions)
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


_INDEX_ONLY = {"--nlist", "--codec", "--memory-budget", "--layout", "--target-recall", "--recall-queries",
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
