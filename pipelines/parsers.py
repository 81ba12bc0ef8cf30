"""The command lines of ``densebeam encode | index | build``, with no heavy import (no Beam pipeline, no
torch, no FAISS): the CLI parses and checks them before anything heavy loads (:mod:`pipelines.preflight`)."""

from __future__ import annotations

import argparse
from typing import Optional

from densebeam.index_store.ivf import params as ivf_params
from densebeam.index_store.ivf.nprobe import DEFAULT_KS
from densebeam.pipelines.argparsing import ArgumentParser
from densebeam.pipelines.options import add_encode_args, add_output_args, add_read_args, add_runner_args

ENCODE_DOC = """densebeam encode: corpus shards -> Parquet embeddings dir (one Beam pipeline).

    densebeam encode --input 'corpus/*.jsonl.gz' --output emb/ --model sentence-transformers/all-MiniLM-L6-v2
"""
INDEX_DOC = """densebeam index: embeddings dir(s) -> FAISS IVF index bundle (one Beam pipeline).

    densebeam index --embeddings emb/ --output index/
"""
BUILD_DOC = """densebeam build: encode + index in one command.

    densebeam build --input 'corpus/*.jsonl.gz' --output index/
"""


def build_encode_parser() -> ArgumentParser:
    p = ArgumentParser(prog="densebeam encode", description=ENCODE_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="embeddings dir (local path or fsspec URL)")
    add_read_args(p)
    add_encode_args(p)
    add_output_args(p)
    add_runner_args(p)
    return p


def parse_bytes(text: Optional[str]) -> Optional[int]:
    """'4GB', '512MiB', '1e9' -> bytes."""
    if text is None:
        return None
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    t = text.strip().lower()
    num = t.rstrip("kmgtib")
    unit = t[len(num):]
    try:
        if unit not in units:
            raise ValueError(unit)
        return int(float(num) * units[unit])
    except ValueError:
        raise ValueError(f"cannot read the size {text!r}; write e.g. 4GB or 512MiB") from None


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
    g.add_argument("--codec", default=None,
                   help="Flat, SQ8, PQ<m>x8 or RaBitQ (1 bit per dimension) (default: Flat, or what fits "
                        "--memory-budget)")
    g.add_argument("--refine", default="auto", choices=ivf_params.REFINE,
                   help="auto: an SQ8, PQ or RaBitQ index keeps its float32 vectors on disk (vectors/*.npy) "
                        "and re-scores its top k x r exactly, r measured per k like nprobe; off: compact "
                        "scores only (default: auto)")
    g.add_argument("--memory-budget", default=None,
                   help="resident bytes for codes and ids, e.g. 2GB: Flat if it fits, else the fitting codec "
                        "measured on a sample to reach --target-recall re-scoring the fewest vectors; also "
                        "bounds the training sample (default: none)")
    g.add_argument("--layout", default="merged", choices=ivf_params.LAYOUTS,
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
    g.add_argument("--kmeans", default="auto", choices=ivf_params.KMEANS,
                   help="coarse quantizer training: two-level k-means (fast, spread over workers; auto "
                        f"picks it from {ivf_params.TWO_LEVEL_MIN_NLIST} lists up) or FAISS's flat k-means")
    g.add_argument("--seed", type=int, default=1234,
                   help="seed of the training sample, the held-out queries and k-means (same seed, same bundle)")
    g.add_argument("--versioned", action="store_true",
                   help="publish into OUTPUT/versions/<name>/ and switch OUTPUT/CURRENT atomically after "
                        "verifying it (no --overwrite needed; services reload to the new version)")
    g.add_argument("--keep-versions", type=int, default=3, help="versions kept with --versioned")
    g.add_argument("--sign-key", default=None, metavar="FILE",
                   help="sign the bundle's manifest with this key (HMAC-SHA256, >= 32 bytes): readers given it "
                        "with --trust-key refuse any change (docs/reliability.md)")


def build_parser() -> ArgumentParser:
    """``densebeam index``."""
    p = ArgumentParser(prog="densebeam index", description=INDEX_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", action="append", required=True, metavar="DIR",
                   help="embeddings dir written by densebeam encode (repeatable; same model facts)")
    p.add_argument("--output", required=True, help="index bundle dir (local path or fsspec URL)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    add_index_args(p)
    add_runner_args(p)
    return p


def build_command_parser() -> ArgumentParser:
    p = ArgumentParser(prog="densebeam build", description=BUILD_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="index bundle dir (local path or fsspec URL)")
    p.add_argument("--embeddings-dir", default=None,
                   help="where the intermediate embeddings go (default: OUTPUT.embeddings beside it)")
    add_read_args(p)
    add_encode_args(p)
    add_output_args(p)
    add_index_args(p)
    add_runner_args(p)
    return p
