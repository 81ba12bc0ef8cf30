"""Query benchmark on the shared IR collections: retrieval quality with and without re-ranking, latency,
cross-encoder throughput.

    .venv/bin/python bench/query_bench.py                        # adi, cisi, cranfield, dl19-subset
    .venv/bin/python bench/query_bench.py --collections dl19-subset --skip-quality --cpu-family avx2

For each collection: build the bundle with the real bundled all-MiniLM-L6-v2 through the pipeline
(``densebeam build``, defaults; reused when ``--work-dir`` already holds it), then report nDCG@10,
MRR@10 and R@100 (ir_measures; dl19-subset counts grade >= 2 relevant for MRR/R, as TREC DL does) for
BM25, dense exact, dense IVF at the bundle's default nprobe, hybrid (reciprocal rank fusion of BM25 and
dense), BM25 + bi-encoder re-rank of the top 100, and the trained cross-encoder
(``../shared/models/ms-marco-MiniLM-L-12-v2``, ``--rerank-model``) re-ranking the dense and the BM25
top 20 and top 100 in the default precision; then single-query latency (p50, p95) of dense search, of
dense search + re-rank at depth 100, and of plain ``CrossEncoder.predict`` scoring the same 100 pairs;
and re-rank throughput (pairs/s) of plain ``CrossEncoder.predict`` fp32 (and bf16 autocast where the CPU
has bf16 arithmetic) against densebeam's packed cross-encoder in fp32 and in its default precision, on
the same pairs, interleaved, median of ``--repeats``.

``--rerank-fidelity``: only the re-ranker's default precision against fp32, per collection: the dense top
100 of every judged query re-ranked by both, nDCG@10 of each, the mean top-10 overlap and the largest
score difference (the bar a default precision keeps: overlap >= 0.98 and nDCG@10 within 0.005).

    .venv/bin/python bench/query_bench.py --rerank-fidelity --cpu-family avx512   # int16 against fp32
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
CROSS_ENCODER = REPO.parent / "shared" / "models" / "ms-marco-MiniLM-L-12-v2"


def ensure_bundle(collection: Path, work: Path) -> str:
    from densebeam.index_store.artifacts.bundle import MANIFEST
    from densebeam.pipelines.build_index import run_build

    out = work / collection.name / "bundle"
    if not (out / MANIFEST).exists():
        run_build(["--input", str(collection / "corpus.jsonl"), "--output", str(out), "--model", MODEL,
                   "--runner", "local", "--overwrite"])
    return str(out)


def quality(searcher, queries, qrels, level, rerank: bool) -> list[tuple[str, dict, float, int]]:
    from densebeam.index_store.query import evaluate as ev

    qids, texts = list(queries), list(queries.values())
    runs = {
        "BM25": lambda: searcher.search_bm25(texts, 1000),
        "dense exact": lambda: searcher.search_exact(texts, 1000),
        f"dense IVF (nprobe {searcher.default_nprobe}/{searcher.nlist})": lambda: searcher.search(texts, 1000),
        "hybrid (RRF k=60)": lambda: searcher.retrieve(texts, 1000, first_stage="hybrid"),
        "BM25 + bi-encoder re-rank top 100": lambda: searcher.retrieve(texts, 100, first_stage="bm25",
                                                                       bi_encoder_depth=100),
    }
    if rerank:
        for stage in ("dense", "bm25"):
            for depth in (20, 100):
                runs[f"{stage} + cross-encoder top {depth} ({searcher.reranker.precision})"] = (
                    lambda s=stage, d=depth: searcher.retrieve(texts, d, first_stage=s, rerank=True, rerank_depth=d))
        if searcher.reranker.precision != "fp32":  # the default precision's re-ranking against fp32's
            from densebeam.index_store.query.rerank import CrossEncoderReranker

            fp32 = CrossEncoderReranker(searcher.reranker.name, device="cpu", precision="fp32")
            runs["dense + cross-encoder top 100 (fp32)"] = lambda: fp32.rerank(
                texts, searcher.retrieve(texts, 100, first_stage="dense"), 100)
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
    """pairs/s of plain ``CrossEncoder.predict`` (fp32, and bf16 autocast where the CPU has bf16
    arithmetic; batch 32, its default) and densebeam's re-ranker (fp32 and its default precision) on the
    same pairs: the dense top 100 of ``n_queries`` queries. Runs interleaved, median of ``repeats``."""
    import torch
    from sentence_transformers import CrossEncoder

    from densebeam.index_store.encoding import cpu
    from densebeam.index_store.query.rerank import CrossEncoderReranker

    texts = texts[:n_queries]
    results = searcher.search(texts, 100)
    pairs = [(q, h.passage()) for q, hits in zip(texts, results) for h in hits]
    plain = CrossEncoder(ce_path, device="cpu")
    ours_fp32 = CrossEncoderReranker(ce_path, device="cpu", precision="fp32")
    ours_auto = CrossEncoderReranker(ce_path, device="cpu")
    scorers = {"plain CrossEncoder.predict fp32": lambda: plain.predict(pairs, batch_size=32, show_progress_bar=False)}
    if cpu.native_bf16():
        def plain_bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return plain.predict(pairs, batch_size=32, show_progress_bar=False)
        scorers["plain CrossEncoder.predict bf16 autocast"] = plain_bf16
    scorers["densebeam fp32"] = lambda: ours_fp32.score_pairs(pairs)
    scorers[f"densebeam default ({ours_auto.precision})"] = lambda: ours_auto.score_pairs(pairs)
    for fn in scorers.values():
        fn()  # warm-up
    secs = {name: [] for name in scorers}
    for _ in range(repeats):
        for name, fn in scorers.items():
            start = time.perf_counter()
            fn()
            secs[name].append(time.perf_counter() - start)
    return {"pairs": len(pairs), **{name: len(pairs) / statistics.median(v) for name, v in secs.items()}}


def rerank_fidelity(searcher, queries, qrels, level) -> dict:
    """The re-ranker's default precision against fp32 on the dense top 100 of every query."""
    import numpy as np

    from densebeam.index_store.query import evaluate as ev
    from densebeam.index_store.query.rerank import CrossEncoderReranker

    qids, texts = list(queries), list(queries.values())
    first = searcher.retrieve(texts, 100, first_stage="dense")
    fp32 = CrossEncoderReranker(searcher.reranker.name, device="cpu", precision="fp32")
    out = {"precision": searcher.reranker.precision, "queries": len(qids), "pairs": sum(map(len, first))}
    tops = {}
    for name, scorer in (("default", searcher.reranker), ("fp32", fp32)):
        start = time.perf_counter()
        tops[name] = scorer.rerank(texts, first, 100)
        out[f"{name} pairs/s"] = out["pairs"] / (time.perf_counter() - start)
        out[f"{name} ndcg@10"] = ev.evaluate(qrels, ev.run_from_hits(qids, tops[name]), qids, level).metrics["ndcg@10"]
    out["overlap@10"] = float(np.mean([len({h.doc_id for h in a[:10]} & {h.doc_id for h in b[:10]}) / 10
                                       for a, b in zip(tops["default"], tops["fp32"])]))
    diffs = [abs(x.score - y.score) for a, b in zip(tops["default"], tops["fp32"])
             for x, y in zip(sorted(a, key=lambda h: h.doc_id), sorted(b, key=lambda h: h.doc_id))]
    out["max |score diff|"], out["mean |score diff|"] = max(diffs), float(np.mean(diffs))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DATA))
    p.add_argument("--collections", default=",".join(COLLECTIONS))
    p.add_argument("--work-dir", default="/tmp/densebeam-query-bench", help="bundles are built (or reused) here")
    p.add_argument("--rerank-model", default=str(CROSS_ENCODER), help="the cross-encoder (name or directory)")
    p.add_argument("--latency-queries", type=int, default=50, help="single-query calls for search latency")
    p.add_argument("--rerank-queries", type=int, default=15, help="single-query calls with rerank depth 100")
    p.add_argument("--throughput-queries", type=int, default=10, help="queries (x100 pairs) for the throughput")
    p.add_argument("--repeats", type=int, default=3, help="throughput runs per scorer (the median is kept)")
    p.add_argument("--skip-quality", action="store_true", help="latency and throughput only")
    p.add_argument("--rerank-fidelity", action="store_true",
                   help="only the re-ranker's default precision against fp32 (dense top 100, every judged query)")
    p.add_argument("--cpu-family", choices=("avx512-bf16", "avx512", "avx2"),
                   help="run as this CPU family (index_store.encoding.cpu.limit_env; simulated on a CPU that has more)")
    p.add_argument("--out", default=None, help="also write the markdown tables here")
    args = p.parse_args(argv)
    if args.cpu_family and os.environ.get("DENSEBEAM_MAX_CPU_ISA") is None:  # before torch loads: re-run capped
        from densebeam.index_store.encoding import cpu

        if not cpu.can_limit_to(args.cpu_family):
            raise SystemExit(f"this CPU ({cpu.family()}) cannot run as {args.cpu_family}")
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **cpu.limit_env(args.cpu_family)})
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import logging

    logging.basicConfig(level=logging.WARNING)
    from densebeam.index_store.encoding import cpu
    from densebeam.index_store.query import evaluate as ev
    from densebeam.index_store.query.search import Searcher

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    d = cpu.describe()
    machine = (f"CPU {d['model']}, {os.cpu_count()} cores, family {d['family']}, flags {' '.join(d['flags'])}; "
               f"ISA limits: {', '.join(f'{k}={v}' for k, v in d['caps'].items()) or 'none'}")
    print(machine, file=sys.stderr, flush=True)
    qual = ["| collection | first stage | nDCG@10 | MRR@10 | R@100 | queries | batch q/s |",
            "|---|---|---:|---:|---:|---:|---:|"]
    lat = ["| collection | docs | dense search p50 / p95 ms | dense + re-rank@100 p50 / p95 ms | plain predict "
           "of the 100 pairs p50 / p95 ms |", "|---|---:|---:|---:|---:|"]
    fid = ["| collection | queries | default | nDCG@10 default | nDCG@10 fp32 | top-10 overlap | max / mean "
           "|score diff| | pairs/s default / fp32 |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    thr = None
    names = args.collections.split(",")
    thr_on = next((n for n in names if n.startswith("dl19")), names[-1])  # MS MARCO-length passages
    for name in names:
        coll = Path(args.data) / name
        if not coll.exists():
            print(f"skipping {name}: {coll} not present", file=sys.stderr)
            continue
        bundle = ensure_bundle(coll, work)
        searcher = Searcher.open(bundle, rerank_model=args.rerank_model)
        queries, qrels = ev.read_queries(str(coll / "queries.jsonl")), ev.read_qrels(str(coll / "qrels.tsv"))
        queries = {q: t for q, t in queries.items() if q in qrels}  # judged queries
        level = 2 if name.startswith("dl19") else 1
        if args.rerank_fidelity:
            f = rerank_fidelity(searcher, queries, qrels, level)
            fid.append(f"| {name} | {f['queries']} | {f['precision']} | {f['default ndcg@10']:.4f} | "
                       f"{f['fp32 ndcg@10']:.4f} ({f['default ndcg@10'] - f['fp32 ndcg@10']:+.4f}) | "
                       f"{f['overlap@10']:.4f} | {f['max |score diff|']:.4f} / {f['mean |score diff|']:.5f} | "
                       f"{f['default pairs/s']:.0f} / {f['fp32 pairs/s']:.0f} |")
            print(fid[-1], file=sys.stderr, flush=True)
            continue
        if not args.skip_quality:
            for method, m, qps, n in quality(searcher, queries, qrels, level, rerank=True):
                qual.append(f"| {name} | {method} | {m['ndcg@10']:.4f} | {m['mrr@10']:.4f} | {m['recall@100']:.4f} "
                            f"| {n} | {qps:.1f} |")
                print(qual[-1], file=sys.stderr, flush=True)
        texts = list(queries.values())
        dense = latency(lambda q: searcher.search([q], 10), texts, args.latency_queries)
        rr = latency(lambda q: searcher.retrieve([q], 10, rerank=True, rerank_depth=100), texts, args.rerank_queries)
        plain_model = searcher.reranker.model
        hits = {q: searcher.search([q], 100)[0] for q in texts[:args.rerank_queries + 3]}
        plain = latency(lambda q: plain_model.predict([(q, h.passage()) for h in hits[q]], batch_size=32,
                                                      show_progress_bar=False), texts[:args.rerank_queries + 3],
                        args.rerank_queries)
        lat.append(f"| {name} | {searcher.bundle.searcher.ntotal} | {dense['p50']:.1f} / {dense['p95']:.1f} | "
                   f"{rr['p50']:.0f} / {rr['p95']:.0f} | {plain['p50']:.0f} / {plain['p95']:.0f} |")
        print(lat[-1], file=sys.stderr, flush=True)
        if name == thr_on:
            thr = (name, rerank_throughput(searcher, args.rerank_model, texts, args.throughput_queries, args.repeats))
    ce = Path(args.rerank_model).name
    lines = [machine, ""]
    if args.rerank_fidelity:
        lines += [f"### Re-ranking fidelity ({ce}: the dense top 100 re-ranked in the default precision and "
                  "in fp32)", "", *fid]
        print("\n".join(lines))
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
        return 0
    if not args.skip_quality:
        lines += [f"### Retrieval quality (all-MiniLM-L6-v2; cross-encoder {ce}; dl19-subset: MRR/R at grade >= 2)",
                  "", *qual, ""]
    lines += [f"### Single-query latency (library calls, one at a time, k=10; re-rank: {ce}, default precision)",
              "", *lat]
    if thr:
        name, t = thr
        base = t["plain CrossEncoder.predict fp32"]
        lines += ["", f"### Cross-encoder re-rank throughput ({name}: {t['pairs']} pairs, the dense top 100 of "
                      f"{args.throughput_queries} queries, median of {args.repeats})", "",
                  "| scorer | pairs/s | vs plain fp32 |", "|---|---:|---:|"]
        lines += [f"| {k} | {v:.0f} | {v / base:.2f}x |" for k, v in t.items() if k != "pairs"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
