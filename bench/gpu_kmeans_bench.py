"""Coarse k-means at MS MARCO's size on a GPU machine: PyTorch's flat spherical k-means on CUDA
(``index_store.ivf.gpu``, what ``densebeam index`` runs there) against densebeam's two-level k-means on the
machine's CPU cores, on the same synthetic clustered vectors (``bench/index_bench.py``'s), with the
objective (sum of best inner products) of each.

    python bench/gpu_kmeans_bench.py --n 6553600 --nlist 65536          # 8.8M build's sample
    python bench/gpu_kmeans_bench.py --n 819200 --nlist 8192 --methods cuda,two-level,faiss-flat
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from index_bench import clustered_batches  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=6_553_600)
    p.add_argument("--nlist", type=int, default=65536)
    p.add_argument("--methods", default="cuda,two-level", help="from cuda, two-level, faiss-flat")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    import faiss

    from densebeam.index_store.ivf import gpu
    from densebeam.index_store.ivf import kmeans

    t = time.perf_counter()
    x = np.concatenate(list(clustered_batches(args.n, 384)))
    print(f"{args.n} x 384 vectors in {time.perf_counter() - t:.0f} s; {os.cpu_count()} CPU cores", flush=True)
    results = {}
    for method in args.methods.split(","):
        t = time.perf_counter()
        if method == "cuda":
            c = gpu.spherical_kmeans(lambda: (x[a:a + 500_000] for a in range(0, len(x), 500_000)), len(x),
                                     x.shape[1], args.nlist, seed=args.seed, niter=10, device="cuda")
        elif method == "two-level":
            c = kmeans.two_level_kmeans(x, kmeans.two_level_params(args.nlist, args.seed))
        elif method == "faiss-flat":
            idx = faiss.index_factory(384, f"IVF{args.nlist},Flat", faiss.METRIC_INNER_PRODUCT)
            faiss.extract_index_ivf(idx).cp.seed = args.seed
            idx.train(x)
            c = faiss.extract_index_ivf(idx).quantizer.reconstruct_n(0, args.nlist)
        else:
            sys.exit(f"unknown method {method}")
        secs = time.perf_counter() - t
        objective = float(gpu.InnerProductAssigner(c, device="cuda").search(x, 1)[0].astype(np.float64).sum())
        results[method] = secs
        print(f"{method:10s} {secs:8.1f} s  objective/n {objective / len(x):.5f}", flush=True)
    if "cuda" in results:
        for m, s in results.items():
            print(f"{m} / cuda: {s / results['cuda']:.1f}x")


if __name__ == "__main__":
    main()
