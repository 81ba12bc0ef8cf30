"""``densebeam search | eval | serve``: thin command-line fronts for :mod:`densebeam.index_store.query.search`.

    densebeam search --index INDEX --query "how big is london" [--k 10] [--rerank-model M] [--json]
    densebeam eval --index INDEX --queries queries.jsonl --qrels qrels.tsv [--first-stage bm25]
                   [--bi-encoder-rerank-depth 100] [--rerank-model M --rerank-depth 100] [--json]
    densebeam serve --index INDEX [--host 127.0.0.1 --port 8080] [--rerank-model M]

No Beam: these only open a bundle. Errors are ValueError/FileNotFoundError, which cli.main prints.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

from densebeam.index_store.encoder import DEVICES, PRECISIONS
from densebeam.pipelines.argparsing import ArgumentParser


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="index bundle (local path or fsspec URL)")
    p.add_argument("--model", default=None,
                   help="query bi-encoder override (default: the bundle's model; must agree on dim and similarity)")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--verify", default="full", choices=("full", "sizes", "none"),
                   help="bundle check at open: full hashes every file (default: a flipped byte is caught "
                        "before any result is served), sizes only stats them")
    p.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (default: the bundle's)")
    p.add_argument("--rerank-model", default=None,
                   help="cross-encoder name or path, e.g. cross-encoder/ms-marco-MiniLM-L6-v2")
    p.add_argument("--rerank-depth", type=int, default=100, help="hits per query the cross-encoder re-scores")
    p.add_argument("--rerank-batch-size", type=int, default=64)


def _open(args, lazy_encoder: bool = False):
    from densebeam.index_store.query.search import Searcher

    return Searcher.open(args.index, model=args.model, device=args.device, precision=args.precision,
                         verify=args.verify, rerank_model=args.rerank_model,
                         rerank_batch_size=args.rerank_batch_size, lazy_encoder=lazy_encoder)


def search_main(argv: Sequence[str]) -> int:
    p = ArgumentParser(prog="densebeam search", description="search an index bundle")
    _add_common(p)
    p.add_argument("--query", action="append", required=True, help="query text (repeatable)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--first-stage", default="dense", choices=("dense", "exact", "bm25"))
    p.add_argument("--json", action="store_true", help="print JSON: [{query, hits: [...]}]")
    args = p.parse_args(argv)
    searcher = _open(args, lazy_encoder=True)
    results = searcher.retrieve(args.query, args.k, first_stage=args.first_stage, nprobe=args.nprobe,
                                rerank=args.rerank_model is not None, rerank_depth=args.rerank_depth)
    if args.json:
        print(json.dumps([{"query": q, "hits": [h.to_dict() for h in hits]}
                          for q, hits in zip(args.query, results)], indent=2, ensure_ascii=False))
        return 0
    for q, hits in zip(args.query, results):
        print(f"query: {q}")
        for rank, h in enumerate(hits, start=1):
            text = (f"{h.title}: " if h.title else "") + h.text
            print(f"{rank:>4}  {h.score:>9.4f}  {h.doc_id:<16} {text[:100]}")
    return 0


def eval_main(argv: Sequence[str]) -> int:
    from tqdm import tqdm

    from densebeam.index_store.query import evaluate as ev
    from densebeam.index_store.query.hits import write_trec_run

    p = ArgumentParser(prog="densebeam eval", description="retrieve for a query set and score it")
    _add_common(p)
    p.add_argument("--queries", required=True, help="BEIR queries.jsonl or MS MARCO qid<TAB>text TSV")
    p.add_argument("--qrels", required=True, help="BEIR qrels TSV (with header) or TREC qrels")
    p.add_argument("--first-stage", default="dense", choices=("dense", "exact", "bm25"))
    p.add_argument("--bi-encoder-rerank-depth", type=int, default=None, metavar="N",
                   help="re-score the first stage's top N by the bi-encoder (e.g. BM25 + dense re-rank)")
    p.add_argument("--k", type=int, default=1000, help="hits kept per query (R@1000 needs 1000)")
    p.add_argument("--relevance-level", type=int, default=1,
                   help="grade from which RR and R count a document relevant (TREC DL: 2)")
    p.add_argument("--batch-size", type=int, default=64, help="queries per retrieval call")
    p.add_argument("--run-out", default=None, help="also write the run in TREC format here")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    args = p.parse_args(argv)
    queries = ev.read_queries(args.queries)
    qrels = ev.read_qrels(args.qrels)
    searcher = _open(args, lazy_encoder=True)
    qids = list(queries)
    # Exact search reads every vector once per call: one call for all queries.
    step = len(qids) if args.first_stage == "exact" else max(1, args.batch_size)
    results, start = [], time.monotonic()
    with tqdm(total=len(qids), desc="queries", unit="q", file=sys.stderr, disable=None) as bar:
        for i in range(0, len(qids), step):
            chunk = [queries[q] for q in qids[i:i + step]]
            results += searcher.retrieve(chunk, args.k, first_stage=args.first_stage, nprobe=args.nprobe,
                                         bi_encoder_depth=args.bi_encoder_rerank_depth,
                                         rerank=args.rerank_model is not None, rerank_depth=args.rerank_depth)
            bar.update(len(chunk))
    seconds = time.monotonic() - start
    if args.run_out:
        import fsspec

        with fsspec.open(args.run_out, "w", encoding="utf-8") as f:
            write_trec_run(f, qids, results, tag=f"densebeam-{args.first_stage}")
    report = ev.evaluate(qrels, ev.run_from_hits(qids, results), qids, args.relevance_level)
    if args.json:
        print(json.dumps({**report.to_dict(), "seconds": round(seconds, 3)}, sort_keys=True))
    else:
        stages = [args.first_stage] + ([f"bi-encoder@{args.bi_encoder_rerank_depth}"]
                                       if args.bi_encoder_rerank_depth else [])
        stages += [f"{args.rerank_model}@{args.rerank_depth}"] if args.rerank_model else []
        print(ev.format_report(report, f"{args.index}: {' -> '.join(stages)}, {len(qids)} queries "
                                       f"in {seconds:.1f} s"))
    return 0


def serve_main(argv: Sequence[str]) -> int:
    from densebeam.index_store.query.serve import Limits, serve

    p = ArgumentParser(prog="densebeam serve", description="HTTP search service over one bundle")
    _add_common(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--batch-window-ms", type=float, default=3.0,
                   help="how long the micro-batcher waits to gather concurrent requests")
    p.add_argument("--max-k", type=int, default=1000)
    p.add_argument("--max-queries", type=int, default=64, help="queries per request")
    p.add_argument("--watch-seconds", type=float, default=0,
                   help="for a versioned index location: check its CURRENT pointer this often and reload "
                        "to a new version without dropping requests (0: only POST /admin/reload)")
    args = p.parse_args(argv)
    searcher = _open(args)
    limits = Limits(max_queries=args.max_queries, max_k=args.max_k, batch_window_ms=args.batch_window_ms)
    print(f"densebeam serve: {args.index} ({searcher.bundle.searcher.ntotal} vectors) on "
          f"http://{args.host}:{args.port}", file=sys.stderr)
    serve(searcher, host=args.host, port=args.port, limits=limits, reopen=lambda: _open(args),
          watch=(args.index, args.watch_seconds) if args.watch_seconds > 0 else None)
    return 0
