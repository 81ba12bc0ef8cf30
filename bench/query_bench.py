"""Query benchmark on the shared IR collections: retrieval quality, latency, reranker throughput.

    .venv/bin/python bench/query_bench.py                        # adi, cisi, cranfield, dl19-subset
    .venv/bin/python bench/query_bench.py --collections adi --work-dir /tmp/qbench --out table.md

For each collection: build the bundle with the real bundled all-MiniLM-L6-v2 through the pipeline
(``densebeam build``, defaults; reused when ``--work-dir`` already holds it), then report nDCG@10,
MRR@10 and R@100 (ir_measures; dl19-subset counts grade >= 2 relevant for MRR/R, as TREC DL does) for
BM25, dense exact, dense IVF at the bundle's default nprobe, and BM25 + bi-encoder re-rank of the top
100; then single-query latency (queries/s, p50, p95) for dense search alone and for dense search +
cross-encoder re-rank at depth 100; and our re-ranker's throughput against plain
``CrossEncoder.predict`` on the same pairs (ratio measured in the same run).

No trained cross-encoder can be downloaded on this machine, so the cross-encoder here is an *untrained*
MiniLM-L6 cross-encoder: the all-MiniLM-L6-v2 encoder weights with a random one-logit head. It has the
architecture and cost of cross-encoder/ms-marco-MiniLM-L6-v2 (6 layers, 384 hidden), so its speed is
representative; its scores are meaningless, so no quality is reported for it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
COLLECTIONS = ("adi", "cisi", "cranfield", "dl19-subset")
MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def ensure_bundle(collection: Path, work: Path) -> str:
    from densebeam.index_store.bundle import MANIFEST
    from densebeam.pipelines.build_index import run_build

    out = work / collection.name / "bundle"
    if not (out / MANIFEST).exists():
        run_build(["--input", str(collection / "corpus.jsonl"), "--output", str(out), "--model", MODEL,
                   "--runner", "local", "--overwrite"])
    return str(out)


def build_minilm_cross_encoder(path: Path) -> str:
    """all-MiniLM-L6-v2's BERT with a freshly initialized 1-logit head (seeded), as a HF directory."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from densebeam.index_store.encoder import resolve_model_path

    if (path / "config.json").exists():
        return str(path)
    src = resolve_model_path(MODEL)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(src, num_labels=1)
    tok = AutoTokenizer.from_pretrained(src)
    tok.model_max_length = 512
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def quality(searcher, queries, qrels, level) -> list[tuple[str, dict, float]]:
    from densebeam.index_store.query import evaluate as ev

    qids, texts = list(queries), list(queries.values())
    runs = {
        "BM25": lambda: searcher.search_bm25(texts, 1000),
        "dense exact": lambda: searcher.search_exact(texts, 1000),
        f"dense IVF (nprobe {searcher.default_nprobe}/{searcher.nlist})": lambda: searcher.search(texts, 1000),
        "BM25 + bi-encoder re-rank top 100": lambda: searcher.retrieve(texts, 100, first_stage="bm25",
                                                                       bi_encoder_depth=100),
    }
    rows = []
    for name, fn in runs.items():
        start = time.perf_counter()
        results = fn()
        seconds = time.perf_counter() - start
        report = ev.evaluate(qrels, ev.run_from_hits(qids, results), qids, level)
        rows.append((name, report.metrics, len(qids) / seconds, report.queries))
    return rows


def latency(fn, queries: list[str], n: int) -> dict:
    """Single-query calls, one after another: queries/s, p50 and p95 in ms (after 3 warm-up calls)."""
    for q in queries[:3]:
        fn(q)
    times = []
    for i in range(n):
        q = queries[i % len(queries)]
        start = time.perf_counter()
        fn(q)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {"qps": 1000 * len(times) / sum(times), "p50": statistics.median(times),
            "p95": times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]}


def rerank_throughput(searcher, ce_path: str, texts: list[str], n_queries: int = 10, repeats: int = 3) -> dict:
    """pairs/s of our reranker (auto precision and fp32) and plain CrossEncoder.predict (fp32, batch 32)
    on the same pairs: BM25's top 100 for ``n_queries`` queries. Best of ``repeats``, interleaved."""
    from sentence_transformers import CrossEncoder

    from densebeam.index_store.query.rerank import CrossEncoderReranker

    texts = texts[:n_queries]
    results = searcher.search_bm25(texts, 100)
    pairs = [(q, h.passage()) for q, hits in zip(texts, results) for h in hits]
    plain = CrossEncoder(ce_path, device="cpu")
    ours_fp32 = CrossEncoderReranker(ce_path, device="cpu", precision="fp32", batch_size=32)
    ours_auto = CrossEncoderReranker(ce_path, device="cpu", precision="auto", batch_size=32)
    best = {"plain predict (fp32)": 0.0, "ours fp32": 0.0, f"ours {ours_auto.precision}": 0.0}
    plain.predict(pairs[:32], show_progress_bar=False)
    for _ in range(repeats):
        for name, fn in (("plain predict (fp32)", lambda: plain.predict(pairs, batch_size=32,
                                                                        show_progress_bar=False)),
                         ("ours fp32", lambda: ours_fp32.rerank(texts, results, 100)),
                         (f"ours {ours_auto.precision}", lambda: ours_auto.rerank(texts, results, 100))):
            start = time.perf_counter()
            fn()
            best[name] = max(best[name], len(pairs) / (time.perf_counter() - start))
    return {"pairs": len(pairs), **best}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--collections", default=",".join(COLLECTIONS))
    p.add_argument("--work-dir", default="/tmp/densebeam-query-bench", help="bundles are built (or reused) here")
    p.add_argument("--latency-queries", type=int, default=50, help="single-query calls for search latency")
    p.add_argument("--rerank-queries", type=int, default=15, help="single-query calls with rerank depth 100")
    p.add_argument("--throughput-queries", type=int, default=10, help="queries (x100 pairs) for the reranker ratio")
    p.add_argument("--repeats", type=int, default=3, help="throughput runs per scorer (best is kept)")
    p.add_argument("--out", default=None, help="also write the markdown tables here")
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.basicConfig(level=logging.WARNING)
    from densebeam.index_store.query import evaluate as ev
    from densebeam.index_store.query.search import Searcher

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ce_path = build_minilm_cross_encoder(work / "minilm-l6-cross-encoder-untrained")
    qual = ["| collection | first stage | nDCG@10 | MRR@10 | R@100 | queries | batch q/s |",
            "|---|---|---:|---:|---:|---:|---:|"]
    lat = ["| collection | docs | dense search q/s | p50 ms | p95 ms | + rerank@100 q/s | p50 ms | p95 ms |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    thr = None
    names = args.collections.split(",")
    thr_on = next((n for n in names if n.startswith("dl19")), names[-1])  # MS MARCO-length passages
    for name in names:
        coll = Path(args.data) / name
        if not coll.exists():
            print(f"skipping {name}: {coll} not present", file=sys.stderr)
            continue
        bundle = ensure_bundle(coll, work)
        searcher = Searcher.open(bundle, rerank_model=ce_path)
        queries, qrels = ev.read_queries(str(coll / "queries.jsonl")), ev.read_qrels(str(coll / "qrels.tsv"))
        level = 2 if name.startswith("dl19") else 1
        for method, m, qps, n in quality(searcher, queries, qrels, level):
            qual.append(f"| {name} | {method} | {m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | {m['recall@100']:.4f} "
                        f"| {n} | {qps:.0f} |")
        texts = list(queries.values())
        dense = latency(lambda q: searcher.search([q], 10), texts, args.latency_queries)
        rr = latency(lambda q: searcher.retrieve([q], 10, rerank=True, rerank_depth=100), texts,
                     args.rerank_queries)
        lat.append(f"| {name} | {searcher.bundle.searcher.ntotal} | {dense['qps']:.1f} | {dense['p50']:.1f} | "
                   f"{dense['p95']:.1f} | {rr['qps']:.2f} | {rr['p50']:.0f} | {rr['p95']:.0f} |")
        if name == thr_on:
            thr = (name, rerank_throughput(searcher, ce_path, texts, args.throughput_queries, args.repeats))
        print("\n".join([qual[-4], qual[-3], qual[-2], qual[-1], lat[-1]]), file=sys.stderr, flush=True)
    lines = ["### Retrieval quality (all-MiniLM-L6-v2, bf16/fp32 per `auto`; dl19-subset: MRR/R at grade >= 2)",
             "", *qual, "", "### Single-query latency (library calls, one at a time, k=10)", "", *lat]
    if thr:
        name, t = thr
        base = t["plain predict (fp32)"]
        lines += ["", f"### Cross-encoder re-rank throughput ({name}: {t['pairs']} pairs, BM25 top 100 of "
                      f"{args.throughput_queries} queries, batch 32, best of {args.repeats})", "", "| scorer | pairs/s | ratio to plain predict |",
                  "|---|---:|---:|"]
        lines += [f"| {k} | {v:.0f} | {v / base:.2f} |" for k, v in t.items() if k != "pairs"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
