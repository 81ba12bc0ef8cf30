"""Encode benchmark: plain ``SentenceTransformer.encode`` (fp32, default settings) against
``densebeam encode`` end to end (pipeline construction, Beam start-up, model load, read, dedup, encode,
write, manifest) in fp32 and in the default precision, on the same passages, in one run.

    .venv/bin/python bench/encode_bench.py                      # 5,000 passages of dl19-subset
    .venv/bin/python bench/encode_bench.py --memory 5000,50000  # peak RSS, each size in a fresh process
    .venv/bin/python bench/encode_bench.py --memory 5000,50000,200000 --model tiny  # pipeline memory only

Prints passages/s and ratios against the baseline measured in the same run (machines are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "dl19-subset" / "corpus.jsonl"
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def iter_docs(path: Path, n: int):
    """``n`` passages, streamed; the corpus is repeated with fresh ids when n is larger than the file."""
    made, round_ = 0, 0
    while made < n:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if made == n:
                    return
                d = json.loads(line)
                yield {**d, "_id": f"{d['_id']}-{round_}"}
                made += 1
        if made == 0:
            raise ValueError(f"{path} holds no passages")
        round_ += 1


def load_docs(path: Path, n: int) -> list[dict]:
    return list(iter_docs(path, n))


def write_corpus(docs, directory: str) -> str:
    path = os.path.join(directory, "corpus.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    return path


def plain_encode(docs) -> float:
    from sentence_transformers import SentenceTransformer

    from densebeam.index_store.encoder import resolve_model_path

    model = SentenceTransformer(resolve_model_path(MODEL), device="cpu")
    texts = [d["text"] for d in docs]
    model.encode(texts[:32])  # warm-up, as any fair baseline
    start = time.perf_counter()
    model.encode(texts)  # default settings: batch_size 32, fp32
    return time.perf_counter() - start


def pipeline_encode(corpus: str, out: str, precision: str, model: str = MODEL) -> float:
    from densebeam.pipelines import encode

    start = time.perf_counter()
    encode.run(["--input", corpus, "--output", out, "--model", model, "--precision", precision,
                "--runner", "local", "--overwrite"])
    return time.perf_counter() - start


def speed(args) -> None:
    docs = load_docs(Path(args.corpus), args.n)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = write_corpus(docs, tmp)
        results = {"plain ST.encode fp32": plain_encode(docs)}
        results["densebeam encode fp32"] = pipeline_encode(corpus, os.path.join(tmp, "fp32"), "fp32")
        results["densebeam encode default"] = pipeline_encode(corpus, os.path.join(tmp, "auto"), "auto")
    base = results["plain ST.encode fp32"]
    print(f"{len(docs)} passages from {args.corpus}")
    print(f"{'run':28s} {'seconds':>8s} {'passages/s':>11s} {'vs plain fp32':>14s}")
    for name, secs in results.items():
        print(f"{name:28s} {secs:8.1f} {len(docs) / secs:11.1f} {base / secs:13.2f}x")


def _child_peak_rss(corpus: str, model: str) -> None:
    """Only the pipeline runs in this process: the corpus was written by the parent, so the peak is
    the pipeline's own (an earlier version built the passages in the child and counted them too)."""
    with tempfile.TemporaryDirectory() as tmp:
        secs = pipeline_encode(corpus, os.path.join(tmp, "out"), "auto", model)
    print(json.dumps({"seconds": secs, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def memory(args) -> None:
    model = args.model
    if model == "tiny":  # the tests' 2-layer model: isolates the pipeline's memory from the model's
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import build_tiny_bi_encoder

        model = str(build_tiny_bi_encoder(Path(tempfile.mkdtemp(prefix="densebeam-tiny-")), normalize=True))
    rows = []
    for n in [int(x) for x in args.memory.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            corpus = write_corpus(iter_docs(Path(args.corpus), n), tmp)
            out = subprocess.run([sys.executable, __file__, "--_child", corpus, "--model", model],
                                 check=True, capture_output=True, text=True).stdout
        rows.append({"n": n, **json.loads(out.strip().splitlines()[-1])})
    base = rows[0]["peak_rss_mb"]
    print(f"{'passages':>9s} {'seconds':>8s} {'peak RSS MB':>12s} {'vs first':>9s}")
    for r in rows:
        print(f"{r['n']:9d} {r['seconds']:8.1f} {r['peak_rss_mb']:12.0f} {r['peak_rss_mb'] / base:8.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS))
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--memory", help="comma-separated passage counts for the peak-memory comparison")
    p.add_argument("--model", default=MODEL,
                   help="model for --memory; 'tiny' builds the tests' 2-layer model (pipeline memory only)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args._child:
        import logging

        logging.basicConfig(level=logging.WARNING)
        _child_peak_rss(args._child, args.model)
    elif args.memory:
        memory(args)
    else:
        speed(args)


if __name__ == "__main__":
    main()
