"""The ``densebeam`` console script: one subcommand per pipeline or tool.

    densebeam encode  --input GLOB --output EMB_DIR [--model M] [Beam flags...]
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import sys
from typing import Optional, Sequence

from densebeam.pipelines.errors import RunFailed

USAGE = """usage: densebeam COMMAND [options]
       densebeam --version

commands:
  encode    corpus shards -> Parquet embeddings dir (Beam pipeline)
  index     embeddings dir(s) -> FAISS IVF index bundle (Beam pipeline)
  build     encode + index in one command
  inspect   print an index bundle's (or embeddings dir's) manifest in human form; --plot FILE: SVG
  search    query an index bundle (dense IVF, exact or BM25; optional cross-encoder re-rank)
  eval      retrieve for a query set and score it against qrels (nDCG@10, MRR@10, R@100, R@1000)
  serve     HTTP search service over an index bundle (FastAPI + uvicorn)

'densebeam COMMAND --help' shows a command's options. Beam flags (--runner, --direct_num_workers,
Dataflow/Flink flags) pass through to the pipeline.
"""


def _setup_logging() -> None:
    level = os.environ.get("DENSEBEAM_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("apache_beam", "faiss", "urllib3", "filelock", "httpx", "sentence_transformers", "transformers",
                  "bm25s"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # the summary and densebeam's own progress lines report; no third-party progress bars on stderr
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def format_encode_summary(manifest: dict, output: str) -> str:
    c = manifest["counts"]
    facts = manifest["model_facts"]
    secs = manifest.get("_wall_seconds")
    lines = [
        f"embeddings: {output}",
        f"  model {facts['model']}  dim {facts['dim']}  similarity {facts['similarity']}  "
        f"dtype {facts['dtype']}  precision {facts.get('precision')}",
        f"  read {c['read']}  vectors {c['encoded']} ({c['encoded'] - c.get('reused', 0)} encoded now, "
        f"{c.get('reused', 0)} reused from earlier runs)  rejected {c['rejected']}  in {len(manifest['shards'])} shard(s)",
    ]
    for reason, n in c.get("rejected_by_reason", {}).items():
        lines.append(f"    rejected {reason}: {n}")
    empty = [i for i in manifest.get("inputs", []) if isinstance(i, dict) and i.get("records") == 0]
    for i in empty[:10]:
        lines.append(f"  no records in {i['path']} ({'empty' if not i.get('bytes') else 'blank lines only'})")
    if len(empty) > 10:
        lines.append(f"  no records in {len(empty) - 10} more input file(s) (see inputs in the manifest)")
    if c["rejected"]:
        lines.append(f"  rejected records (with reason and source): {output.rstrip('/')}/rejected/")
    auto = manifest.get("precision_measurement") or {}
    line = precision_line(auto)
    if line:
        lines.append(line)
    if secs:
        fresh = c["encoded"] - c.get("reused", 0)
        rate = (f"{fresh / secs:.1f} passages encoded per second end to end" if fresh else
                "nothing to encode: every vector was reused")
        lines.append(f"  wall time {secs:.1f} s, {rate}")
        lines += time_breakdown(secs, manifest.get("_workers", 1), manifest.get("_worker_msec") or {},
                                auto.get("seconds") or 0.0)
    return "\n".join(lines)


def precision_line(record: dict) -> Optional[str]:
    """How ``--precision auto`` was decided at launch, and what it cost (None when it was not)."""
    if "seconds" not in record:
        return None
    took = f"{record['seconds']:.1f} s"
    if record.get("reused"):
        how = "remembered for this model on this machine"
    elif record.get("measured") is True:
        rates = ", ".join(f"{k} {v.get('passages_per_s', 0):.0f}/s" for k, v in record.get("candidates", {}).items())
        how = f"measured on {record.get('sample_passages')} passages ({rates})"
    else:
        how = record.get("reason") or "not measured"
    return f"  precision auto -> {record.get('chosen')} in {took}: {how}"


def time_breakdown(wall_s: float, workers: int, worker_msec: dict, auto_s: float = 0.0) -> list[str]:
    """Where the worker time went: the model's forward passes, Parquet writing, the ``auto`` precision
    decision at launch, and the rest (reading, parsing, the duplicate-id pass, Beam, start-up, idle
    workers) as wall time x workers minus those."""
    encode_s, write_s = worker_msec.get("encode_msec", 0) / 1000, worker_msec.get("write_msec", 0) / 1000
    if not encode_s:
        return []
    total = max(wall_s * max(1, workers), encode_s + write_s + auto_s)
    rest = total - encode_s - write_s - auto_s
    pct = lambda x: 100 * x / total  # noqa: E731
    auto = f", precision auto {auto_s:.1f} s ({pct(auto_s):.0f}%)" if auto_s else ""
    return [f"  time over {workers} worker(s), {total:.1f} worker-s: encode {encode_s:.1f} s "
            f"({pct(encode_s):.0f}%), write {write_s:.1f} s ({pct(write_s):.0f}%){auto}, read/parse/dedup/"
            f"Beam/start-up {rest:.1f} s ({pct(rest):.0f}%)"]


def _encode(argv: Sequence[str]) -> int:
    from densebeam.pipelines import encode

    manifest = encode.run(argv)
    out = encode.build_parser().parse_known_args(argv)[0].output
    print(format_encode_summary(manifest, out))
    return 0


def format_index_summary(m: dict, output: str) -> str:
    facts, counts = m["model_facts"], m["counts"]
    size = sum(f["size"] for f in m.get("files", []))
    curve = "  ".join(f"{c['nprobe']}:{c['recall']:.3f}" for c in m.get("recall_curve", []))
    return "\n".join([
        f"index bundle: {output}",
        f"  model {facts['model']}  dim {facts['dim']}  similarity {facts['similarity']}  "
        f"dtype {facts['dtype']}  precision {facts.get('precision')}",
        f"  {counts['vectors']} vectors in {counts['shards']} shard(s), layout {m['layout']}, "
        f"{m['factory']} (nlist {m['nlist']}, metric {m.get('metric')})",
        f"  default nprobe {m['nprobe']}: recall@{m.get('k', 10)} {m['recall_at_k']:.3f} against exact search "
        f"(target {m.get('target_recall')}, {m.get('recall_measured_on', '')})",
        f"  recall curve nprobe:recall  {curve}",
        f"  {len(m.get('files', []))} files, {size / 1e6:.1f} MB on disk, created {m.get('created')}",
        *_memory_lines(m),
    ])


def _memory_lines(m: dict) -> list[str]:
    """Where a search process's bytes come from: the index (codes, ids, quantizer: scanned on every
    search, so resident once warm), the docstore (mapped, read per hit) and, in a tiered bundle, the
    float32 vectors (mapped, k x r rows read per query)."""
    sizes: dict[str, int] = {}
    for f in m.get("files", []):
        path = f["path"]
        kind = ("vectors" if path.startswith("vectors/") else "docstore" if path.startswith("docstore/")
                else "trained" if path == "trained.faiss" else "index")
        sizes[kind] = sizes.get(kind, 0) + f["size"]
    lines = [f"  memory: index {sizes.get('index', 0) / 1e6:.1f} MB resident once warm (codes, ids, coarse "
             f"quantizer); docstore {sizes.get('docstore', 0) / 1e6:.1f} MB mapped, read per hit"]
    refine = m.get("refine")
    if refine:
        factors = "  ".join(f"{k}:{r}" for k, r in sorted(refine["factors_by_k"].items(), key=lambda x: int(x[0])))
        lines.append(f"  tiered: {m.get('codec')} scores re-scored exactly from {sizes.get('vectors', 0) / 1e6:.1f} MB "
                     f"of float32 vectors on disk (k x r rows read per query); refine r by k  "
                     f"{factors}")
    choice = m.get("codec_choice")
    if isinstance(choice, dict) and choice.get("candidates"):
        lines.append(f"  codec {m.get('codec')} chosen under --memory-budget {choice['budget_bytes']} bytes, "
                     f"measured on {choice['sample']} sampled vectors, {choice['queries']} queries "
                     f"({choice.get('queries_from', 'held-out vectors')}):")
        for c in choice["candidates"]:
            got = "  ".join(f"@{k} {c['recall'][k][str(r)]:.3f} r {r}" for k, r in c["factors"].items())
            mark = "*" if c.get("chosen") else " "
            lines.append(f"    {mark} {c['codec']:<8} {c['bytes_per_vector']} B/vector  {got}")
    return lines


def _index(argv: Sequence[str]) -> int:
    from densebeam.pipelines import build_index

    manifest = build_index.run(argv)
    print(format_index_summary(manifest, build_index.build_parser().parse_known_args(argv)[0].output))
    return 0


def _build(argv: Sequence[str]) -> int:
    from densebeam.pipelines import build_index

    emb_manifest, manifest = build_index.run_build(argv)
    args = build_index.build_command_parser().parse_known_args(argv)[0]
    emb_dir = args.embeddings_dir or args.output.rstrip("/") + ".embeddings"
    print(format_encode_summary(emb_manifest, emb_dir))
    print(format_index_summary(manifest, args.output))
    print(f"  total wall time {manifest['_wall_seconds']:.1f} s")
    return 0


def _inspect(argv: Sequence[str]) -> int:
    from densebeam.index_store.artifacts import bundle as bundle_lib
    from densebeam.index_store.artifacts import embeddings as emb

    from densebeam.pipelines.argparsing import ArgumentParser

    p = ArgumentParser(prog="densebeam inspect")
    p.add_argument("path", help="index bundle or embeddings dir")
    p.add_argument("--json", action="store_true", help="print the raw manifest")
    p.add_argument("--verify", action="store_true",
                   help="also check every file's size and sha256 and validate the bundle's structure")
    p.add_argument("--trust-key", default=None, metavar="FILE",
                   help="with --verify: also require the manifest's signature by the key in FILE and no "
                        "unlisted file (index --sign-key)")
    p.add_argument("--plot", metavar="FILE", default=None,
                   help="also write an SVG picture of the bundle to the local FILE: recall@k against nprobe "
                        "for every measured k (chosen nprobe marked, target dashed) above the build's "
                        "worker-seconds per stage")
    args = p.parse_args(argv)
    fs, root = fsspec_url_to_fs(args.path)
    if fs.exists(emb.join(root, emb.MANIFEST)):
        if args.plot:
            raise ValueError(f"{args.path} is an embeddings dir; --plot draws an index bundle's recall curves "
                             "and build timings: give it the bundle that `densebeam index` wrote")
        m = emb.open_embeddings(args.path).manifest
        print(json.dumps(m, indent=2) if args.json else format_encode_summary(m, args.path))
        return 0
    from densebeam.index_store.artifacts import versions

    path = versions.resolve(args.path)
    m = bundle_lib.read_manifest(path)
    if args.trust_key and not args.verify:
        raise ValueError("--trust-key checks a bundle's signature while verifying it: add --verify")
    if args.verify:  # what a reader checks: hashes, then the structure, then FAISS and Arrow open it
        from densebeam.index_store.artifacts import signing

        opened = bundle_lib.open_bundle(path, verify="full", trust_key=signing.read_key(args.trust_key))
        m = opened.manifest
    if path != args.path:
        print(f"versioned location {args.path}: current version {versions.current(args.path)}",
              file=sys.stderr if args.json else sys.stdout)
    print(json.dumps(m, indent=2) if args.json else format_index_summary(m, args.path))
    if args.verify:
        signed = "; manifest signed with the trusted key, no unlisted file" if args.trust_key else ""
        print(f"  verified: every file matches its size and sha256; structure validated ("
              f"{opened.searcher.ntotal} vectors in {opened.searcher.nlist} lists, ids = the "
              f"{len(opened.docstore)} docstore rows, Arrow data fully validated){signed}")
    if args.plot:
        from densebeam.index_store.artifacts.bundle_plot import write_bundle_svg

        print(f"  plot: {args.plot}: {write_bundle_svg(m, args.plot)}",
              file=sys.stderr if args.json else sys.stdout)  # --json's stdout stays one JSON document
    return 0


def fsspec_url_to_fs(path: str):
    import fsspec

    return fsspec.core.url_to_fs(path)


def _query_command(name: str):
    def run(argv: Sequence[str]) -> int:
        from densebeam.pipelines import query_cli

        return getattr(query_cli, name)(argv)

    return run


COMMANDS = {"encode": _encode, "index": _index, "build": _build, "inspect": _inspect,
            "search": _query_command("search_main"), "eval": _query_command("eval_main"),
            "serve": _query_command("serve_main")}


# The input errors of densebeam.index_store.corpus_io, as a runner's wrapped traceback prints them.
_INPUT_ERROR = re.compile(r"(?:CorpusError|InputChangedError): ([^\n]+)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        import densebeam

        print(f"densebeam {densebeam.__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"densebeam: unknown command {command!r}{hint}\n\n{USAGE}", file=sys.stderr)
        return 2
    _setup_logging()
    try:
        from densebeam.pipelines import preflight  # before anything heavy: mistakes fail in a second

        if command in ("encode", "index", "build"):
            preflight.check_pipeline(command, rest)
        elif command in ("search", "eval", "serve"):
            preflight.check_query(command, rest)
        return COMMANDS[command](rest)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"densebeam {command}: error: {err}", file=sys.stderr)
        return 2
    except RunFailed as err:
        print(f"densebeam {command}: failed: {err}", file=sys.stderr)
        return 1
    except RuntimeError as err:  # a worker process's input error, wrapped by the runner in its traceback
        found = _INPUT_ERROR.findall(str(err))
        if not found:
            raise
        print(f"densebeam {command}: error: {found[-1].strip()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
