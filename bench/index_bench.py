"""Index build benchmark: the Beam build (``densebeam index``: sample, train once, add per shard, exact
recall measurement, on-disk merge, checksummed manifest) against a plain single-process FAISS train + add
(FAISS's default k-means) with the same factory string on the very training rows densebeam's plan
samples, on synthetic clustered vectors.

    .venv/bin/python bench/index_bench.py                    # 1,000,000 x 384-d, 5 shards
    .venv/bin/python bench/index_bench.py --n 200000         # quicker
    .venv/bin/python bench/index_bench.py --repeat 3         # three interleaved rounds, median ratio
    .venv/bin/python bench/index_bench.py --variants plain,beam,beam-flat   # also densebeam's flat k-means
    .venv/bin/python bench/index_bench.py --plot WORKDIR/bundle docs/img/index-1m.svg   # its picture
    python bench/index_bench.py --n 2000000 --variants plain,beam-cpu,beam   # a GPU machine: GPU vs not

Each build runs in a fresh process so its peak RSS is its own; the variants of a round run one after the
other, in an order that rotates from round to round. Prints build seconds, the ratio to the first
variant, peak RSS against the raw float32 vector bytes, recall@10 of every build at nprobe 4/8/16/32 on
the same 2,000 fresh queries against brute force, densebeam's default nprobe and queries/s.
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

    from densebeam.index_store.artifacts import embeddings as emb
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


NPROBES = (4, 8, 16, 32)  # recall@10 of every build is measured at these, on the same queries


def queries_and_truth(work: str, n: int, n_queries: int = 2000, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Fresh queries from the same distribution and their exact top-k over all n vectors (brute force,
    once per workdir)."""
    import faiss

    path = os.path.join(work, f"truth-{n}-{n_queries}.npy" if k == 10 else f"truth{k}-{n}.npy")
    q = next(clustered_batches(n_queries, DIM, seed=99))
    if not os.path.exists(path):
        heap = faiss.ResultHeap(n_queries, k, keep_max=True)
        at = 0
        for x in clustered_batches(n, DIM):
            d, i = faiss.knn(q, x, k, metric=faiss.METRIC_INNER_PRODUCT)
            heap.add_result(d, i + at)
            at += len(x)
        heap.finalize()
        np.save(path, heap.I)
    return q, np.load(path)


def recall_at(search, q: np.ndarray, truth: np.ndarray) -> dict:
    """recall@10 of ``search(q, nprobe)`` -> ids, at each of NPROBES."""
    out = {}
    for nprobe in NPROBES:
        ids = search(q, nprobe)
        out[str(nprobe)] = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)]))
    return out


def child_beam(emb_dir: str, out: str, work: str, n: int, kmeans: str = "auto") -> dict:
    from densebeam.pipelines import build_index

    anon = AnonPeak()
    start = time.perf_counter()
    m = build_index.run(["--embeddings", emb_dir, "--output", out, "--runner", "local", "--overwrite",
                         "--kmeans", kmeans])
    secs = time.perf_counter() - start
    anon_peak, rss_peak = anon.stop(), _peak_mb()  # the build's peaks, before searching maps the index
    from densebeam.index_store.artifacts.bundle import open_bundle

    b = open_bundle(out, verify="sizes")
    q, truth = queries_and_truth(work, n)
    t = time.perf_counter()
    b.searcher.search(q, 10, m["nprobe"])
    qps = len(q) / (time.perf_counter() - t)
    recalls = recall_at(lambda x, p: b.searcher.search(x, 10, p)[1], q, truth)
    return {"seconds": secs, "peak_rss_mb": rss_peak, "peak_anon_mb": anon_peak,
            "factory": m["factory"], "nprobe": m["nprobe"], "kmeans": m["training"]["kmeans"],
            "devices": m["devices"], "timings": {k: v["seconds"] for k, v in m["timings"].items()},
            "recall_at_10": m["recall_at_k"], "train": m["counts"]["training_vectors"], "qps": qps,
            "recall_fresh": recalls}


def child_plain(emb_dir: str, work: str, n: int) -> dict:
    """FAISS as a user would run it: all vectors in RAM, ``index.train`` (FAISS's default k-means) on the
    very rows densebeam's plan trains on, ``index.add``."""
    import faiss

    from densebeam.index_store.ivf.plan import plan_build
    from densebeam.index_store.artifacts.embeddings import open_embeddings

    anon = AnonPeak()
    start = time.perf_counter()
    d = open_embeddings(emb_dir)
    plan = plan_build([d])
    x = np.concatenate([v for _, v in d.iter_batches(batch_rows=100_000)])
    rows = np.concatenate([s.base + plan.sample_rows(s)[0] for s in plan.shards])
    index = faiss.index_factory(DIM, plan.factory, faiss.METRIC_INNER_PRODUCT)
    t_train = time.perf_counter()
    index.train(x[rows])
    t_add = time.perf_counter()
    index.add(x)
    secs = time.perf_counter() - start
    res = {"seconds": secs, "train_seconds": t_add - t_train, "add_seconds": time.perf_counter() - t_add,
           "peak_rss_mb": _peak_mb(), "peak_anon_mb": anon.stop(), "factory": plan.factory,
           "train": len(rows)}
    del x
    q, truth = queries_and_truth(work, n)
    res["recall_fresh"] = recall_at(
        lambda x, p: index.search(x, 10, params=faiss.SearchParametersIVF(nprobe=p))[1], q, truth)
    return res


def write_plot(bundle: str, path: str) -> str:
    """The bundle's recall curves per k above its build's worker-seconds per stage, as one SVG file: the
    same picture as ``densebeam inspect BUNDLE --plot PATH``."""
    from densebeam.index_store.artifacts.bundle import read_manifest
    from densebeam.index_store.artifacts.bundle_plot import write_bundle_svg

    return f"{path}: {write_bundle_svg(read_manifest(bundle), path)}"


VARIANTS = {"plain": "plain FAISS train+add (1 process)", "beam": "densebeam index",
            "beam-flat": "densebeam index --kmeans flat", "beam-cpu": "densebeam index, DENSEBEAM_GPU=0"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--shards", type=int, default=5)
    p.add_argument("--workdir", default=None)
    p.add_argument("--repeat", type=int, default=1,
                   help="run every variant this many times, interleaved (the order rotates each round); "
                        "ratios are per round, the summary their median")
    p.add_argument("--variants", default="plain,beam",
                   help=f"comma-separated, from {', '.join(VARIANTS)}; the first is the baseline")
    p.add_argument("--plot", nargs=2, metavar=("BUNDLE", "FILE"),
                   help="only write BUNDLE's recall curves and build time breakdown to the SVG FILE (as "
                        "densebeam inspect BUNDLE --plot FILE does), e.g. the bundle under --workdir")
    p.add_argument("--_child", choices=tuple(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--_args", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plot:
        print(write_plot(*args.plot))
        return
    if args._child:
        a = json.loads(args._args)
        if args._child == "plain":
            res = child_plain(**a)
        else:
            res = child_beam(kmeans="flat" if args._child == "beam-flat" else "auto", **a)
        print(json.dumps(res))
        return
    variants = args.variants.split(",")
    if not variants or any(v not in VARIANTS for v in variants):
        sys.exit(f"--variants takes names from {', '.join(VARIANTS)}")
    work = args.workdir or tempfile.mkdtemp(prefix="densebeam-index-bench-")
    emb_dir = os.path.join(work, "emb")
    if not os.path.exists(os.path.join(emb_dir, "_manifest.json")):
        t = time.perf_counter()
        make_embeddings(emb_dir, args.n, args.shards)
        print(f"wrote {args.n} x {DIM} vectors in {args.shards} shards in {time.perf_counter() - t:.0f} s")
    t = time.perf_counter()
    queries_and_truth(work, args.n)
    print(f"exact top-10 of 2,000 fresh queries in {time.perf_counter() - t:.0f} s (not timed below)")

    def run_child(kind):
        kw = {"emb_dir": emb_dir, "work": work, "n": args.n}
        if kind != "plain":
            kw["out"] = os.path.join(work, "bundle")
            shutil.rmtree(kw["out"], ignore_errors=True)
        env = dict(os.environ, **({"DENSEBEAM_GPU": "0"} if kind == "beam-cpu" else {}))
        proc = subprocess.run([sys.executable, __file__, "--_child", kind, "--_args", json.dumps(kw)],
                              capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"the {kind} build failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(proc.stdout.strip().splitlines()[-1])

    import shutil

    rounds = []
    for r in range(args.repeat):
        order = variants[r % len(variants):] + variants[:r % len(variants)]  # rotate: no variant always first
        got = {}
        for kind in order:
            got[kind] = run_child(kind)
            print(f"round {r + 1} {kind}: {got[kind]['seconds']:.1f} s", flush=True)
        rounds.append(got)
    base = variants[0]
    raw_mb = args.n * DIM * 4 / 2**20
    first = rounds[0][variants[-1]]
    print(f"\n{args.n} vectors x {DIM} (raw float32 {raw_mb:.0f} MB), {first['factory']}, "
          f"training sample {first['train']}, {os.cpu_count()} cores")
    print(f"{'build':38s} {'seconds':>8s} {'ratio':>6s} {'peak RSS MB':>12s} {'x raw':>6s} "
          f"{'peak heap MB':>13s} {'x raw':>6s}  recall@10 at nprobe {'/'.join(map(str, NPROBES))}")
    for i, got in enumerate(rounds, 1):
        for kind in variants:
            res = got[kind]
            label = f"{VARIANTS[kind]} #{i}" if len(rounds) > 1 else VARIANTS[kind]
            recalls = " ".join(f"{res['recall_fresh'][str(p)]:.4f}" for p in NPROBES)
            print(f"{label:38s} {res['seconds']:8.1f} {res['seconds'] / got[base]['seconds']:5.2f}x "
                  f"{res['peak_rss_mb']:12.0f} {res['peak_rss_mb'] / raw_mb:5.2f}x "
                  f"{res['peak_anon_mb']:13.0f} {res['peak_anon_mb'] / raw_mb:5.2f}x  {recalls}")
    for kind in variants[1:]:
        ratios = sorted(got[kind]["seconds"] / got[base]["seconds"] for got in rounds)
        print(f"{VARIANTS[kind]} / {VARIANTS[base]}: median {ratios[len(ratios) // 2]:.2f}x over "
              f"{len(ratios)} round(s) (all: {', '.join(f'{r:.2f}x' for r in ratios)})")
    for kind in variants:
        if kind != "plain":
            res = rounds[-1][kind]
            print(f"{VARIANTS[kind]}: default nprobe {res['nprobe']}, recall@10 {res['recall_at_10']:.3f} "
                  f"(held-out vectors vs exact), {res['qps']:.0f} queries/s (batch of 2,000); "
                  f"{res['kmeans']} k-means on {res['devices']['kmeans']}, adding on {res['devices']['add']}; "
                  f"stage seconds {res['timings']}")
        if "train_seconds" in rounds[-1][kind]:
            res = rounds[-1][kind]
            print(f"{VARIANTS[kind]}: train {res['train_seconds']:.1f} s, add {res['add_seconds']:.1f} s")


if __name__ == "__main__":
    main()
