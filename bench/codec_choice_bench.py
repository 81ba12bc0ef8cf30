"""What ``--memory-budget`` costs and chooses: the measured codec choice per budget, and PQ training with
and without FAISS's polysemous code re-ordering (its IVF-PQ default).

    .venv/bin/python bench/codec_choice_bench.py --embeddings WORK88/emb --budgets 2GB,1GB,600MB

Per budget: the candidates that fit, each one's recall@k at its chosen refine factor on the sample, the
codec chosen, and the seconds the choice took (reading the sample included). Then ``IVF128,PQ<m>x8``
trained on ``--train-rows`` vectors of the sample, ``--runs`` times each way, median and spread.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import time

import faiss
import numpy as np

from densebeam.index_store.artifacts.embeddings import open_embeddings
from densebeam.index_store.ivf import codec_choice
from densebeam.index_store.ivf.build import new_index
from densebeam.index_store.ivf.nprobe import DEFAULT_KS
from densebeam.index_store.ivf.params import REFINE_FACTORS
from densebeam.pipelines.parsers import parse_bytes


def cpu() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def train_seconds(x: np.ndarray, factory: str, polysemous: bool) -> float:
    index = new_index(x.shape[1], factory)
    faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = polysemous
    t = time.perf_counter()
    index.train(x)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", required=True)
    p.add_argument("--budgets", default="2GB")
    p.add_argument("--pq", default="PQ48x8")
    p.add_argument("--train-rows", type=int, default=10_000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    emb = open_embeddings(args.embeddings)
    paths, rows, dim = emb.shard_paths, [s.rows for s in emb.record.shards], emb.facts.dim
    n = sum(rows)
    print(f"CPU {cpu()}; {n} vectors x {dim}", flush=True)
    for budget in args.budgets.split(","):
        t = time.perf_counter()
        codec, record = codec_choice.choose_codec(paths, rows, dim, parse_bytes(budget), 65536, DEFAULT_KS, 0.95,
                                                  REFINE_FACTORS, 1234)
        secs = time.perf_counter() - t
        print(f"\nbudget {budget}: {codec} in {secs:.1f} s", flush=True)
        for c in (record or {}).get("candidates", []):
            got = "  ".join(f"@{k} {c['recall'][k][str(r)]:.4f} (r {r})" for k, r in c["factors"].items())
            print(f"  {'*' if c['chosen'] else ' '} {c['codec']:<8} {c['bytes_per_vector']} B/vector  {got}")
    x = codec_choice.read_sample(paths, args.train_rows, 1234)
    factory = f"IVF128,{args.pq}"
    print(f"\n{factory} trained on {len(x)} vectors, {args.runs} runs each (median, min-max):")
    for polysemous in (False, True):
        secs = [train_seconds(x, factory, polysemous) for _ in range(args.runs)]
        print(f"  polysemous {'on ' if polysemous else 'off'}: {statistics.median(secs):.1f} s "
              f"({min(secs):.1f}-{max(secs):.1f})", flush=True)


if __name__ == "__main__":
    main()
