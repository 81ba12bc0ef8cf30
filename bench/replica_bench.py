"""Replica benchmark: what one search process needs to serve a bundle, per codec, beside plain FAISS doing the
same by hand.

    .venv/bin/python bench/replica_bench.py --n 1000000 --workdir WORK                       # Flat, SQ8, PQ48x8
    .venv/bin/python bench/replica_bench.py --n 8800000 --shards 44 --codecs PQ48x8 --workdir WORK88

Vectors: ``bench/index_bench.py``'s synthetic clustered 384-d generator (an embeddings dir written once per
workdir, reused). Each codec is built with ``densebeam index --codec C`` (defaults otherwise: SQ8 and PQ
are tiered, their float32 vectors on disk and re-scored). Then, each in a fresh process:

- ``densebeam``: the bundle opened as a service opens it (``Searcher``, hits with their docstore rows), k
  and nprobe and refine factor as the bundle measured them;
- ``plain``: ``faiss.read_index`` of the same files (on-disk lists) with the same nprobe, and for tiered
  bundles the documented re-scoring by hand from the memory-mapped ``vectors/*.npy`` (docs/query.md).

Per process: resident memory after opening and after a warm-up of 1,000 single queries (VmRSS, split into
anonymous memory and mapped file pages), single-query latency p50/p95 (k=10, 1,000 more queries), batch
queries/s (2,000 queries, k=10), and recall@10 / recall@100 of 2,000 fresh queries against brute force.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from index_bench import DIM, make_embeddings, queries_and_truth  # noqa: E402

N_QUERIES, WARM, TIMED = 2000, 1000, 1000


def truth(work: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    """2,000 fresh queries of the same distribution and their exact top-100 (brute force, cached)."""
    return queries_and_truth(work, n, N_QUERIES, k=100)


def memory() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024
    return out


def recall(ids: np.ndarray, want: np.ndarray, k: int) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ids, want)]))


def child(variant: str, bundle: str, work: str, n: int) -> dict:
    q, want = truth(work, n)
    t0 = time.perf_counter()
    if variant == "densebeam":
        from densebeam.index_store.artifacts.bundle import open_bundle
        from densebeam.index_store.ivf.nprobe import nprobe_for_k
        from densebeam.index_store.query.search import Searcher

        def no_encoder():
            raise RuntimeError("the benchmark searches vectors")

        searcher = Searcher(open_bundle(bundle, verify="sizes"), no_encoder)

        def search(x, k):
            hits = searcher.search_vectors(x, k)
            return np.array([[h.row for h in row] + [-1] * (k - len(row)) for row in hits])

        record = searcher.bundle.record
        setting = {"nprobe@10": nprobe_for_k(record, 10), "nprobe@100": nprobe_for_k(record, 100),
                   "refine@10": searcher.bundle.searcher.factor(10) if record.tiered else None,
                   "refine@100": searcher.bundle.searcher.factor(100) if record.tiered else None}
    else:
        import faiss

        manifest = json.load(open(os.path.join(bundle, "manifest.json")))
        index = faiss.read_index(os.path.join(bundle, "index.faiss"),
                                 faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY)
        ivf = faiss.extract_index_ivf(index)
        quantizer = faiss.downcast_index(ivf.quantizer)
        refine = manifest.get("refine")
        parts = [np.load(os.path.join(bundle, p), mmap_mode="r") for p in refine["files"]] if refine else []
        starts = np.cumsum([0] + [len(p) for p in parts])
        setting = {f"nprobe@{k}": manifest["nprobe_by_k"][str(k)]["nprobe"] for k in (10, 100)}
        setting.update({f"refine@{k}": refine["factors_by_k"][str(k)] if refine else None for k in (10, 100)})

        def search(x, k):
            ivf.nprobe = setting[f"nprobe@{k}"]
            if hasattr(quantizer, "hnsw"):
                quantizer.hnsw.efSearch = max(64, ivf.nprobe)
            r = setting[f"refine@{k}"]
            if not r:
                return index.search(x, k)[1]
            _, cand = index.search(x, k * r)
            out = np.full((len(x), k), -1)
            for i, row in enumerate(cand):
                row = row[row >= 0]
                part = np.searchsorted(starts, row, side="right") - 1
                exact = np.stack([parts[j][c - starts[j]] for c, j in zip(row, part)]) @ x[i]
                best = np.argsort(-exact, kind="stable")[:k]
                out[i, :len(best)] = row[best]
            return out

    opened_s = time.perf_counter() - t0
    mem_open = memory()
    got10 = np.empty((N_QUERIES, 10), dtype=np.int64)
    for i in range(WARM):
        got10[i] = search(q[i:i + 1], 10)[0]
    mem_warm = memory()
    lat = []
    for i in range(WARM, WARM + TIMED):
        t = time.perf_counter()
        got10[i] = search(q[i:i + 1], 10)[0]
        lat.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    batch10 = search(q, 10)
    batch_qps = N_QUERIES / (time.perf_counter() - t)
    got100 = search(q, 100)
    return {"variant": variant, "bundle": os.path.basename(bundle), "open_s": round(opened_s, 2),
            **setting, "rss_open_mb": round(mem_open["VmRSS"]), "rss_warm_mb": round(mem_warm["VmRSS"]),
            "anon_warm_mb": round(mem_warm["RssAnon"]), "file_warm_mb": round(mem_warm["RssFile"]),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p95_ms": round(float(np.percentile(lat, 95)), 2),
            "batch_qps": round(batch_qps), "recall@10": round(recall(got10, want, 10), 4),
            "recall@10_batch": round(recall(batch10, want, 10), 4), "recall@100": round(recall(got100, want, 100), 4),
            "mem_final": memory()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=5)
    p.add_argument("--workdir", required=True)
    p.add_argument("--codecs", default="Flat,SQ8,PQ48x8")
    p.add_argument("--variants", default="densebeam,plain")
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    work = args.workdir
    if args._child:
        print("RESULT " + json.dumps(child(args._child[0], args._child[1], work, args.n)), flush=True)
        return
    os.makedirs(work, exist_ok=True)
    emb_dir = os.path.join(work, "emb")
    from densebeam.index_store.artifacts.embeddings import MANIFEST

    if not os.path.exists(os.path.join(emb_dir, MANIFEST)):
        t = time.time()
        make_embeddings(emb_dir, args.n, args.shards)
        print(f"embeddings: {args.n} x {DIM} in {time.time() - t:.0f} s", flush=True)
    truth(work, args.n)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    print(f"CPU {model}, {os.cpu_count()} cores; {args.n} vectors", flush=True)
    rows = []
    for codec in args.codecs.split(","):
        bundle = os.path.join(work, f"bundle-{codec}")
        if not os.path.exists(os.path.join(bundle, "manifest.json")):
            t = time.time()
            subprocess.run([sys.executable, "-m", "densebeam.pipelines.cli", "index", "--embeddings", emb_dir,
                            "--output", bundle, "--codec", codec, "--runner", "local", "--overwrite"], check=True)
            print(f"built {bundle} in {time.time() - t:.0f} s", flush=True)
        sizes = {}
        for f in json.load(open(os.path.join(bundle, "manifest.json")))["files"]:
            kind = f["path"].split("/")[0] if "/" in f["path"] else f["path"]
            sizes[kind] = sizes.get(kind, 0) + f["size"]
        print(f"{codec}: files MB " + ", ".join(f"{k} {v / 1e6:.0f}" for k, v in sorted(sizes.items())), flush=True)
        for variant in args.variants.split(","):
            r = subprocess.run([sys.executable, __file__, "--workdir", work, "--n", str(args.n),
                                "--_child", variant, bundle], capture_output=True, text=True)
            line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(r.stdout[-2000:], r.stderr[-4000:])
                raise SystemExit(f"{variant} on {bundle} failed")
            res = json.loads(line[7:])
            res["codec"] = codec
            rows.append(res)
            print(json.dumps(res), flush=True)
    print("\n| codec | who | nprobe@10 | r@10 | RSS warm MB (anon + file) | p50 / p95 ms | batch q/s | "
          "recall@10 | recall@100 |")
    print("|---|---|---:|---:|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['codec']} | {r['variant']} | {r['nprobe@10']} | {r['refine@10'] or '-'} | {r['rss_warm_mb']:,} "
              f"({r['anon_warm_mb']:,} + {r['file_warm_mb']:,}) | {r['p50_ms']} / {r['p95_ms']} | {r['batch_qps']:,} | "
              f"{r['recall@10']:.4f} | {r['recall@100']:.4f} |")


if __name__ == "__main__":
    main()
