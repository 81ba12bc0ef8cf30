"""More workers are never slower: ``densebeam encode`` with ``--workers 1`` and ``--workers N`` on the
same corpus, interleaved, several repeats; prints passages/s (whole process, start-up included), each
worker's share and the ratios. ``--workers N`` on the local runner runs N Beam workers as threads of one
process; the alternative a Beam user would reach for, N worker processes (Beam's ``multi_processing``
mode), is measured in the same run.

    .venv/bin/python bench/workers_bench.py --corpus ../shared/data/dl19-subset/corpus.jsonl --repeat 3

The corpus is copied once as one gzip file (the layout that used to keep every passage on one worker).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_once(corpus: Path, workers: int, work: Path, model: str, extra: tuple[str, ...] = ()
             ) -> tuple[float, list[int], int]:
    out, logs = work / f"emb-{workers}", work / f"logs-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    env = {**os.environ, "DENSEBEAM_WORKER_LOG_DIR": str(logs)}
    start = time.monotonic()
    subprocess.run([sys.executable, "-m", "densebeam.pipelines.cli", "encode", "--input", str(corpus), "--output",
                    str(out), "--model", model, "--workers", str(workers), "--no-reuse", *extra],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    secs = time.monotonic() - start
    n = json.loads((out / "_manifest.json").read_text())["counts"]["encoded"]
    shares = sorted(sum(int(x) for x in f.read_text().split()) for f in logs.iterdir())
    return n / secs, shares, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default=str(REPO.parent / "shared" / "data" / "dl19-subset" / "corpus.jsonl"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="densebeam-workers-"))
    corpus = work / "corpus.jsonl.gz"
    with open(args.corpus, "rb") as src, gzip.open(corpus, "wb") as dst:
        shutil.copyfileobj(src, dst)
    n_w = args.workers
    variants = {"--workers 1": (1, ()), f"--workers {n_w}": (n_w, ()),
                f"--workers {n_w} as processes": (n_w, ("--direct_running_mode=multi_processing",))}
    rates = collections.defaultdict(list)
    for r in range(args.repeat):
        for name, (w, extra) in variants.items():
            rate, shares, n = run_once(corpus, w, work, args.model, extra)
            rates[name].append(rate)
            print(f"repeat {r + 1}: {name}: {rate:.1f} passages/s, {n} passages, per worker {shares}",
                  flush=True)
    spread = lambda xs: f"{min(xs):.1f}-{max(xs):.1f}"  # noqa: E731
    one = statistics.median(rates["--workers 1"])
    for name in variants:
        med = statistics.median(rates[name])
        print(f"median {name}: {med:.1f} passages/s ({spread(rates[name])}), {med / one:.2f}x --workers 1")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
