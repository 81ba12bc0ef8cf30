"""Index build benchmark: the Beam build (``densebeam index``: sample, train once, add per shard, exact
recall measurement, on-disk merge, checksummed manifest) against a plain single-process FAISS train + add
with the same factory string and training-sample size, on synthetic clustered vectors.

    .venv/bin/python bench/index_bench.py                    # 1,000,000 x 384-d, 5 shards
    .venv/bin/python bench/index_bench.py --n 200000         # quicker
    .venv/bin/python bench/index_bench.py --repeat 3         # three pairs, median ratio

Each side runs in a fresh process so its peak RSS is its own. Prints build seconds, the ratio, peak RSS
against the raw float32 vector bytes, recall@10 at the chosen nprobe and queries/s.
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

import numpy as np

DIM = 384


def clustered_batches(n: int, dim: int, seed: int = 0, batch: int = 100_000):
    """Cluster structure on a low-dimensional manifold, not isotropic noise (which flatters nothing and
    misleads about IVF): a 16-d latent mixture of 200 Gaussian clusters of varying spread, mapped into
    ``dim`` dimensions by FAISS's SyntheticDataset recipe (random projection, per-axis frequency, sine),
    then normalized like a cosine model's output. Fixed mixture and mapping: batches drawn with another
    seed come from the same distribution (held-out queries)."""
    d1, k = 16, 200
    crng = np.random.default_rng(0)
    centers = crng.normal(scale=1.5, size=(k, d1))
    spread = crng.uniform(0.3, 1.0, size=k)
    proj = crng.random((d1, dim)) * (crng.random(dim) * 4 + 0.1)
    rng = np.random.default_rng(seed + 1)
    for start in range(0, n, batch):
        m = min(batch, n - start)
        c = rng.integers(0, k, m)
        z = centers[c] + spread[c, None] * rng.normal(size=(m, d1))
        x = np.sin(z @ proj).astype(np.float32)
        yield x / np.linalg.norm(x, axis=1, keepdims=True)


def make_embeddings(root: str, n: int, shards: int) -> None:
    import pyarrow.parquet as pq

    from densebeam.index_store import embeddings as emb
    from densebeam.index_store.types import ModelFacts

    facts = ModelFacts(model="synthetic-clustered", revision=None, dim=DIM, similarity="cos", dtype="float32")
    os.makedirs(root, exist_ok=True)
    per = -(-n // shards)
    writers, entries, row = {}, [], 0
    for x in clustered_batches(n, DIM):
        s = row // per
        name = emb.SHARD_PATTERN.format(index=s, count=shards)
        table = emb.to_table(facts, [str(row + j) for j in range(len(x))], x)
        if name not in writers:
            writers[name] = pq.ParquetWriter(os.path.join(root, name), table.schema)
            entries.append({"path": name, "rows": 0})
        writers[name].write_table(table)
        entries[-1]["rows"] += len(x)
        row += len(x)
    for w in writers.values():
        w.close()
    manifest = {"format": emb.FORMAT, "format_version": 1, "model_facts": facts.to_dict(), "shards": entries,
                "counts": {"read": n, "encoded": n, "rejected": 0}, "rejected_files": []}
    with open(os.path.join(root, emb.MANIFEST), "w") as f:
        json.dump(manifest, f)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class AnonPeak:
    """Peak anonymous resident memory (heap: RssAnon), sampled every 50 ms. Peak RSS also counts the
    pages of memory-mapped files (the on-disk index being merged), which the kernel can drop at will."""

    def __init__(self):
        import threading

        self.peak = 0.0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(0.05):
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        self.peak = max(self.peak, int(line.split()[1]) / 1024)

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        return self.peak


def child_beam(emb_dir: str, out: str) -> dict:
    from densebeam.pipelines import build_index

    anon = AnonPeak()
    start = time.perf_counter()
    m = build_index.run(["--embeddings", emb_dir, "--output", out, "--runner", "local", "--overwrite"])
    secs = time.perf_counter() - start
    anon_peak, rss_peak = anon.stop(), _peak_mb()  # the build's peaks, before searching maps the index
    from densebeam.index_store.bundle import open_bundle

    b = open_bundle(out, verify="sizes")
    q = next(clustered_batches(2000, DIM, seed=99))
    t = time.perf_counter()
    b.searcher.search(q, 10, m["nprobe"])
    qps = len(q) / (time.perf_counter() - t)
    return {"seconds": secs, "peak_rss_mb": rss_peak, "peak_anon_mb": anon_peak,
            "factory": m["factory"], "nprobe": m["nprobe"],
            "recall_at_10": m["recall_at_k"], "train": m["counts"]["training_vectors"], "qps": qps}


def child_plain(emb_dir: str, factory: str, train: int) -> dict:
    import faiss

    from densebeam.index_store.embeddings import open_embeddings

    anon = AnonPeak()
    start = time.perf_counter()
    d = open_embeddings(emb_dir)
    x = np.concatenate([v for _, v in d.iter_batches(batch_rows=100_000)])
    index = faiss.index_factory(DIM, factory, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(1234)
    index.train(x[np.sort(rng.choice(len(x), train, replace=False))])
    index.add(x)
    secs = time.perf_counter() - start
    return {"seconds": secs, "peak_rss_mb": _peak_mb(), "peak_anon_mb": anon.stop()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=5)
    p.add_argument("--workdir", default=None)
    p.add_argument("--repeat", type=int, default=1,
                   help="run the pair (Beam, then plain) this many times; the ratio is per pair, the "
                        "summary the median pair")
    p.add_argument("--_child", choices=("beam", "plain"), help=argparse.SUPPRESS)
    p.add_argument("--_args", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        a = json.loads(args._args)
        res = child_beam(**a) if args._child == "beam" else child_plain(**a)
        print(json.dumps(res))
        return
    work = args.workdir or tempfile.mkdtemp(prefix="densebeam-index-bench-")
    emb_dir = os.path.join(work, "emb")
    if not os.path.exists(os.path.join(emb_dir, "_manifest.json")):
        t = time.perf_counter()
        make_embeddings(emb_dir, args.n, args.shards)
        print(f"wrote {args.n} x {DIM} vectors in {args.shards} shards in {time.perf_counter() - t:.0f} s")

    def run_child(kind, **kw):
        proc = subprocess.run([sys.executable, __file__, "--_child", kind, "--_args", json.dumps(kw)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"the {kind} build failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    import shutil

    pairs = []
    for _ in range(args.repeat):
        shutil.rmtree(os.path.join(work, "bundle"), ignore_errors=True)
        beam_res = run_child("beam", emb_dir=emb_dir, out=os.path.join(work, "bundle"))
        plain = run_child("plain", emb_dir=emb_dir, factory=beam_res["factory"], train=beam_res["train"])
        pairs.append((beam_res["seconds"] / plain["seconds"], beam_res, plain))
    raw_mb = args.n * DIM * 4 / 2**20
    print(f"{args.n} vectors x {DIM} (raw float32 {raw_mb:.0f} MB), {beam_res['factory']}, "
          f"training sample {beam_res['train']}")
    print(f"{'build':38s} {'seconds':>8s} {'ratio':>6s} {'peak RSS MB':>12s} {'x raw':>6s} "
          f"{'peak heap MB':>13s} {'x raw':>6s}")
    for i, (_, beam_res, plain) in enumerate(pairs, 1):
        for name, r in [("plain FAISS train+add (1 process)", plain), ("densebeam index (Beam, local)", beam_res)]:
            label = f"{name} #{i}" if len(pairs) > 1 else name
            print(f"{label:38s} {r['seconds']:8.1f} {r['seconds'] / plain['seconds']:5.2f}x "
                  f"{r['peak_rss_mb']:12.0f} {r['peak_rss_mb'] / raw_mb:5.2f}x "
                  f"{r['peak_anon_mb']:13.0f} {r['peak_anon_mb'] / raw_mb:5.2f}x")
    ratio, beam_res, _ = sorted(pairs, key=lambda x: x[0])[len(pairs) // 2]
    if len(pairs) > 1:
        print(f"median ratio over {len(pairs)} pairs: {ratio:.2f}x "
              f"(all: {', '.join(f'{r:.2f}x' for r, _, _ in pairs)})")
    print(f"default nprobe {beam_res['nprobe']}: recall@10 {beam_res['recall_at_10']:.3f} (held-out vectors "
          f"vs exact), {beam_res['qps']:.0f} queries/s (batch of 2,000, 2 cores)")

if __name__ == "__main__":
    main()
