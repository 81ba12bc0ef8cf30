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

from densebeam.index_store.encoding.encoder import DEVICES, PRECISIONS
from densebeam.pipelines.argparsing import ArgumentParser, positive_int


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="index bundle (local path or fsspec URL)")
    p.add_argument("--model", default=None,
                   help="query bi-encoder override (default: the bundle's model; must agree on dim and similarity)")
    p.add_argument("--device", default="auto", choices=DEVICES,
                   help="where the models run; auto = a CUDA GPU when torch sees one, else the CPU")
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="queries: auto = fp32 on CPU, fp16 on CUDA; the cross-encoder: auto = bf16-mixed on CPUs "
                        "with bf16 arithmetic, fp16 on CUDA, int16 on other x86-64 CPUs, else fp32")
    p.add_argument("--verify", default="full", choices=("full", "sizes", "none"),
                   help="bundle check at open: full hashes every file (a flipped byte is caught before any "
                        "result is served), sizes only stats them")
    p.add_argument("--trust-key", default=None, metavar="FILE",
                   help="open only a bundle signed with the key in FILE (index --sign-key), unchanged in any "
                        "byte and with no unlisted file (docs/reliability.md)")
    p.add_argument("--nprobe", type=positive_int, default=None,
                   help="IVF lists probed (default: the bundle's measured nprobe for the search's k)")
    p.add_argument("--rerank-model", default=None,
                   help="cross-encoder name or path, e.g. cross-encoder/ms-marco-MiniLM-L6-v2")
    p.add_argument("--rerank-depth", type=positive_int, default=100,
                   help="hits per query the cross-encoder re-scores (serve: a request's default, at least its k)")
    p.add_argument("--rerank-batch-size", type=positive_int, default=64,
                   help="pairs per CrossEncoder.predict batch, for cross-encoders the packed forward cannot run")


def _add_first_stage(p: argparse.ArgumentParser) -> None:
    from densebeam.index_store.query.hits import FIRST_STAGES, RRF_K

    p.add_argument("--first-stage", default="dense", choices=FIRST_STAGES,
                   help="dense (IVF), exact (every vector), bm25, or hybrid (BM25 and dense fused by reciprocal "
                        "rank fusion)")
    p.add_argument("--rrf-k", type=int, default=RRF_K,
                   help="hybrid: a document scores the sum of 1 / (rrf-k + rank) over the two lists")


def _open(args, lazy_encoder: bool = False, index: str | None = None):
    from densebeam.index_store.query.search import Searcher

    from densebeam.index_store.artifacts import signing

    return Searcher.open(index or args.index, model=args.model, device=args.device, precision=args.precision,
                         verify=args.verify, rerank_model=args.rerank_model,
                         rerank_batch_size=args.rerank_batch_size, lazy_encoder=lazy_encoder,
                         trust_key=signing.read_key(args.trust_key))


def search_parser() -> ArgumentParser:
    p = ArgumentParser(prog="densebeam search", description="search an index bundle",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_common(p)
    p.add_argument("--query", action="append", required=True, help="query text (repeatable)")
    p.add_argument("--k", type=positive_int, default=10, help="hits per query")
    _add_first_stage(p)
    p.add_argument("--json", action="store_true", help="print JSON: [{query, hits: [...]}]")
    return p


def parser(command: str) -> ArgumentParser:
    """The command line of ``search``, ``eval`` or ``serve``."""
    return {"search": search_parser, "eval": eval_parser, "serve": serve_parser}[command]()


def metric_names(text):
    """``--metrics`` as a list of names (None: the defaults)."""
    return [m.strip() for m in text.split(",") if m.strip()] if text else None


def search_main(argv: Sequence[str]) -> int:
    args = search_parser().parse_args(argv)
    searcher = _open(args, lazy_encoder=True)
    results = searcher.retrieve(args.query, args.k, first_stage=args.first_stage, nprobe=args.nprobe,
                                rerank=args.rerank_model is not None, rerank_depth=args.rerank_depth,
                                rrf_k=args.rrf_k)
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


def eval_parser() -> ArgumentParser:
    p = ArgumentParser(prog="densebeam eval", description="retrieve for a query set and score it",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_common(p)
    p.add_argument("--queries", required=True, help="BEIR queries.jsonl or MS MARCO qid<TAB>text TSV")
    p.add_argument("--qrels", required=True, help="BEIR qrels TSV (with header) or TREC qrels")
    _add_first_stage(p)
    p.add_argument("--bi-encoder-rerank-depth", type=positive_int, default=None, metavar="N",
                   help="re-score the first stage's top N by the bi-encoder (e.g. BM25 + dense re-rank)")
    p.add_argument("--k", type=positive_int, default=1000, help="hits kept per query (R@1000 needs 1000)")
    p.add_argument("--relevance-level", type=int, default=1,
                   help="grade from which RR and R count a document relevant (TREC DL: 2)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="queries per retrieval call")
    p.add_argument("--metrics", default=None, metavar="M1,M2",
                   help="ir_measures names, e.g. nDCG@10,RR@10,R@100,AP,P@5 (default: nDCG@10, RR@10, R@100, "
                        "R@1000)")
    p.add_argument("--per-query", action="store_true",
                   help="also print each query's value of each metric (trec_eval -q style: metric, qid, value)")
    p.add_argument("--run-out", default=None, help="also write the run in TREC format here")
    p.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    return p


def eval_main(argv: Sequence[str]) -> int:
    from tqdm import tqdm

    from densebeam.index_store.query import evaluate as ev
    from densebeam.index_store.query.hits import write_trec_run

    args = eval_parser().parse_args(argv)
    metrics = metric_names(args.metrics)
    named = ev.measures(args.relevance_level, metrics)  # an unknown metric fails before any work
    queries = ev.read_queries(args.queries)
    qrels = ev.read_qrels(args.qrels)
    qids = list(queries)
    judged = ev.judged_documents(qrels, qids)
    if not judged:
        raise ValueError(f"no query of {args.queries} has a judgment in {args.qrels}: the query ids do not match")
    grades = sorted({int(g) for q in qids if q in qrels for g in qrels[q].values()})
    takes_level = [n for n, m in named.items() if dict(m.params).get("rel") == args.relevance_level]
    if args.relevance_level > 1 and grades[-1] < args.relevance_level and takes_level:
        raise ValueError(f"no judgment in {args.qrels} reaches --relevance-level {args.relevance_level} (its "
                         f"grades: {', '.join(map(str, grades))}): {', '.join(takes_level)} would be 0; use "
                         f"--relevance-level {max(1, grades[-1])}")
    searcher = _open(args, lazy_encoder=True)
    if not searcher.bundle.docstore.contains_any(judged):
        raise ValueError(f"none of the {len(judged)} documents judged in {args.qrels} is in {args.index}: the "
                         "qrels belong to another corpus, or its document ids were written otherwise (every "
                         "metric would be 0)")
    # Exact search reads every vector once per call: one call for all queries.
    step = len(qids) if args.first_stage == "exact" else max(1, args.batch_size)
    results, start = [], time.monotonic()
    with tqdm(total=len(qids), desc="queries", unit="q", file=sys.stderr, disable=None) as bar:
        for i in range(0, len(qids), step):
            chunk = [queries[q] for q in qids[i:i + step]]
            results += searcher.retrieve(chunk, args.k, first_stage=args.first_stage, nprobe=args.nprobe,
                                         bi_encoder_depth=args.bi_encoder_rerank_depth,
                                         rerank=args.rerank_model is not None, rerank_depth=args.rerank_depth,
                                         rrf_k=args.rrf_k)
            bar.update(len(chunk))
    seconds = time.monotonic() - start
    if args.run_out:
        import fsspec

        with fsspec.open(args.run_out, "w", encoding="utf-8") as f:
            write_trec_run(f, qids, results, tag=f"densebeam-{args.first_stage}")
    report = ev.evaluate(qrels, ev.run_from_hits(qids, results), qids, args.relevance_level, metrics)
    if args.json:
        extra = {"per_query": report.per_query} if args.per_query else {}
        print(json.dumps({**report.to_dict(), "seconds": round(seconds, 3), **extra}, sort_keys=True))
        return 0
    if args.per_query:
        print(ev.format_per_query(report))
    stages = [args.first_stage] + ([f"bi-encoder@{args.bi_encoder_rerank_depth}"]
                                   if args.bi_encoder_rerank_depth else [])
    stages += [f"{args.rerank_model}@{args.rerank_depth}"] if args.rerank_model else []
    print(ev.format_report(report, f"{args.index}: {' -> '.join(stages)}, {len(qids)} queries "
                                   f"in {seconds:.1f} s"))
    return 0


def _size(text: str) -> int:
    """'2GiB', '512MB', '1048576' -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    t = text.strip().lower()
    num = t.rstrip("kmgib")
    try:
        return int(float(num) * units[t[len(num):]])
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"cannot read the size {text!r}; write e.g. 2GiB or 512MB") from None


def serve_parser() -> ArgumentParser:
    from densebeam.index_store.query.limits import Limits

    d = Limits()
    p = ArgumentParser(prog="densebeam serve", description="HTTP search service over one bundle",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_common(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8080, help="port to listen on")
    p.add_argument("--batch-window-ms", type=float, default=d.batch_window_ms,
                   help="how long the micro-batcher waits to gather concurrent requests")
    p.add_argument("--watch-seconds", type=float, default=0,
                   help="check the index location's version this often and reload to a new one without "
                        "dropping requests (0: only POST /admin/reload)")
    g = p.add_argument_group("limits per request")
    g.add_argument("--max-k", type=int, default=d.max_k, help="hits a request may ask for per query")
    g.add_argument("--max-queries", type=int, default=d.max_queries, help="queries per request")
    g.add_argument("--max-hits", type=int, default=d.max_hits, help="queries x k per request")
    g.add_argument("--max-rerank-pairs", type=int, default=d.max_rerank_pairs,
                   help="queries x rerank depth per request (cross-encoder forward passes)")
    g.add_argument("--max-body-bytes", type=_size, default=d.max_body_bytes,
                   help="request body, counted as it streams in whatever the transfer encoding (413 beyond)")
    g.add_argument("--max-response-bytes", type=_size, default=d.max_response_bytes,
                   help="an answer larger than this is refused (422), saying what to ask instead")
    g.add_argument("--header-timeout", type=float, default=d.header_timeout_s, metavar="SECONDS",
                   help="time for a request's head (408 and close beyond)")
    g.add_argument("--body-timeout", type=float, default=d.body_timeout_s, metavar="SECONDS",
                   help="time for a request's whole body (408 and close beyond)")
    g = p.add_argument_group("load")
    g.add_argument("--max-pending-queries", type=int, default=d.max_pending_queries,
                   help="queries queued or running; a request beyond is answered 503 at once")
    g.add_argument("--queue-timeout", type=float, default=d.queue_timeout_s, metavar="SECONDS",
                   help="a request still waiting for its batch after this is answered 503")
    g.add_argument("--max-connections", type=int, default=d.max_connections, help="503 beyond")
    g = p.add_argument_group("admin and reloads")
    g.add_argument("--admin-token-file", default=None,
                   help="file holding the token that POST /admin/* needs (Authorization: Bearer TOKEN); "
                        "or set DENSEBEAM_ADMIN_TOKEN. Without either, /admin/* is off")
    g.add_argument("--expose-paths", action="store_true",
                   help="show local paths in /health, /info and reload answers (off: version names only)")
    g.add_argument("--warm-bytes", type=_size, default="2GiB",
                   help="page in at most this much of a bundle's inverted lists (then docstore) before it "
                        "serves or is swapped in")
    g.add_argument("--reload-proof-timeout", type=float, default=600, metavar="SECONDS",
                   help="time a child process gets to open and search a new version before it is refused")
    return p


def serve_main(argv: Sequence[str]) -> int:
    from densebeam.index_store.query.http_limits import check_port

    args = serve_parser().parse_args(argv)
    check_port(args.host, args.port)  # a port in use fails here, before FAISS, torch or a model load
    from densebeam.index_store.query.serve import Limits, Reloading, open_version, read_admin_token, serve

    limits = Limits(max_queries=args.max_queries, max_k=args.max_k, batch_window_ms=args.batch_window_ms,
                    max_hits=args.max_hits, max_rerank_pairs=args.max_rerank_pairs,
                    max_body_bytes=args.max_body_bytes, max_response_bytes=args.max_response_bytes,
                    header_timeout_s=args.header_timeout, body_timeout_s=args.body_timeout,
                    max_pending_queries=max(args.max_pending_queries, args.max_queries),
                    queue_timeout_s=args.queue_timeout, max_connections=args.max_connections)
    reloading = Reloading(location=args.index, verify=args.verify, watch_seconds=args.watch_seconds,
                          proof_timeout_s=args.reload_proof_timeout, warm_bytes=args.warm_bytes,
                          trust_key_file=args.trust_key)
    token = read_admin_token(args.admin_token_file)
    # The first version is proven in a child process too: a corrupt bundle is refused with a message,
    # never a crash of the service (nor a crash loop of its restarts).
    searcher, version = open_version(reloading, lambda path: _open(args, index=path))
    # /health's fields: a versioned location's version name, else the bundle's manifest digest
    name = f"version {version.name}" if version.name else f"manifest_sha256 {version.manifest_sha256[:16]}"
    print(f"densebeam serve: {args.index} ({name}, {searcher.bundle.searcher.ntotal} vectors) on "
          f"http://{args.host}:{args.port}; /admin {'on' if token else 'off'}", file=sys.stderr)
    serve(searcher, host=args.host, port=args.port, limits=limits, reloading=reloading, admin_token=token,
          expose_paths=args.expose_paths, version=version, default_nprobe=args.nprobe,
          default_rerank_depth=args.rerank_depth)
    return 0
