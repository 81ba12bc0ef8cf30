"""Checks that run before anything heavy loads (Beam's pipeline modules, torch, FAISS, a model): the
flags, the inputs, the output, the model path, the corpus's field names, key files. A mistake fails
within about a second, naming what is wrong and the flag that fixes it, instead of after the model has
loaded. Raises ValueError / FileNotFoundError / FileExistsError (``cli.main`` prints them, exit 2);
argparse's own errors exit 2 too. Nothing here imports torch or Beam's pipeline machinery.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Optional, Sequence

import fsspec

# field names corpora commonly use, to suggest --id-field / --text-field
_ID_NAMES = ("_id", "id", "docid", "doc_id", "pid", "passage_id", "document_id")
_TEXT_NAMES = ("text", "contents", "content", "body", "passage", "document", "abstract")
SNIFF_BYTES = 64 << 10
SNIFF_RECORDS = 5


def check_pipeline(command: str, argv: Sequence[str]) -> None:
    """``encode``, ``index`` or ``build``: everything checkable before the pipeline is built."""
    from densebeam.pipelines import parsers
    from densebeam.pipelines.argparsing import parse_pipeline_args

    parser = {"encode": parsers.build_encode_parser, "index": parsers.build_parser,
              "build": parsers.build_command_parser}[command]()
    args, _ = parse_pipeline_args(parser, list(argv))
    if command in ("index", "build"):
        from densebeam.index_store.artifacts import signing

        signing.read_key(args.sign_key)
        if args.memory_budget is not None:
            parsers.parse_bytes(args.memory_budget)
    if command == "index":
        for d in args.embeddings:
            _require(_join(d, "_manifest.json"), f"--embeddings {d} is not an embeddings dir (no _manifest.json); "
                     "give the folder densebeam encode wrote")
        _bundle_output_free(args.output, args.overwrite, args.versioned)
        return
    from densebeam.pipelines.options import max_rejected_share, read_options

    max_rejected_share(args.max_rejected_share)
    opts = read_options(args)
    files = input_files(args.input, opts)
    check_records(files, opts)
    check_model(args.model)
    if command == "encode":
        _embeddings_output_free(args.output, args.overwrite)
    else:
        _bundle_output_free(args.output, args.overwrite, args.versioned)


def check_query(command: str, argv: Sequence[str]) -> None:
    """``search``, ``eval`` or ``serve``: the bundle, the files and the models named exist."""
    from densebeam.pipelines import query_cli

    args = query_cli.parser(command).parse_args(list(argv))
    from densebeam.index_store.artifacts import signing

    signing.read_key(args.trust_key)
    _bundle_exists(args.index)
    if args.model:
        check_model(args.model)
    if args.rerank_model:
        check_model(args.rerank_model, what="--rerank-model")
    if command == "eval":
        from densebeam.index_store.query import evaluate as ev

        for flag in ("queries", "qrels"):
            _require(getattr(args, flag), f"--{flag} {getattr(args, flag)} does not exist")
        ev.measures(args.relevance_level, query_cli.metric_names(args.metrics))


def input_files(patterns: Sequence[str], opts) -> list[tuple[str, int]]:
    """The matched files, as the pipeline will read them; a pattern naming a folder says what is in it."""
    from densebeam.index_store.corpus_io import expand_patterns

    for pattern in patterns:
        fs, path = fsspec.core.url_to_fs(pattern)
        if fs.isdir(path):
            inside = sorted({_extension(p) for p in fs.ls(path, detail=False) if fs.isfile(p)} - {""})
            raise ValueError(f"--input {pattern} is a folder; give its corpus files, e.g. --input "
                             f"'{pattern.rstrip('/')}/*{inside[0] if inside else '.jsonl'}'"
                             + (f" (it holds {', '.join(inside)} files)" if inside else " (it holds no files)"))
    return expand_patterns(patterns)


def _extension(path: str) -> str:
    name = path.rsplit("/", 1)[-1].lower()
    for comp in (".gz", ".bz2", ".zst", ".xz"):
        if name.endswith(comp):
            return os.path.splitext(name[: -len(comp)])[1] + comp
    return os.path.splitext(name)[1]


def check_records(files: Sequence[tuple[str, int]], opts) -> None:
    """The first records of every matched file (up to 64 files) are what the options describe: a format
    known from the extension (or ``--format``), JSON objects or Parquet columns holding the id and text
    fields, TSV lines of ``--tsv-columns`` columns. Files that are not are refused by name, with the
    fields or columns they do have and the flags that map them."""
    from densebeam.index_store.corpus_io import detect_format

    problems, field_sets = [], []
    for path, size in itertools.islice(files, 64):
        if size == 0:
            continue  # empty: 0 records, named in the summary
        try:
            fmt, compression = detect_format(path, opts.format)
        except ValueError as err:
            problems.append((path, str(err)))
            continue
        why, fields = _sniff(path, size, fmt, compression, opts)
        if fields is not None:
            field_sets.append(fields)
        if why:
            problems.append((path, why))
    if not problems:
        return
    names = [os.path.basename(p) for p, _ in problems]
    if len(problems) == len(files) and field_sets and all(f is not None for f in field_sets):
        have = sorted(set().union(*field_sets))
        hint = _field_hint(have, opts)
        raise ValueError(f"the records do not have the fields the options name (--id-field {opts.id_field}, "
                         f"--text-field {opts.text_field}): their first records have {have}. {hint}")
    detail = "; ".join(f"{os.path.basename(p)}: {why}" for p, why in problems[:8])
    raise ValueError(f"{len(problems)} of the {len(files)} input file(s) do not look like corpus records "
                     f"({', '.join(names[:8])}{' ...' if len(names) > 8 else ''}): {detail}. Narrow --input to the "
                     "corpus files, or set --format / --tsv-columns / --id-field / --text-field")


# Column names a TSV header line holds (with --tsv-columns' own): such a first line is refused, not indexed.
_HEADER_WORDS = {"id", "_id", "pid", "docid", "doc_id", "did", "passage", "passage_text", "text", "title", "contents",
                 "content", "body", "qid", "query", "query-id", "corpus-id"}


def _sniff(path: str, size: int, fmt: str, compression: Optional[str], opts) -> tuple[Optional[str], Optional[set]]:
    """(why the first records do not fit, or None; the field names they have, for JSONL/Parquet)."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            with fsspec.open(path, "rb", compression=compression) as f:
                names = set(pq.ParquetFile(f).schema_arrow.names)
        except Exception as err:  # noqa: BLE001 - the reader names it with the same words later
            return f"not readable as Parquet ({type(err).__name__})", None
        missing = [c for c in (opts.id_field, opts.text_field) if c not in names]
        return (f"no column {', '.join(missing)}" if missing else None), names
    from densebeam.index_store.corpus_io import read_head

    head = read_head(path, compression, size, SNIFF_BYTES)  # an unreadable file: CorpusError, as the run
    lines = [ln for ln in head.decode("utf-8", errors="replace").splitlines() if ln.strip()]
    if len(head) >= SNIFF_BYTES and len(lines) > 1:
        lines = lines[:-1]  # the last one may be cut
    lines = lines[:SNIFF_RECORDS]
    if not lines:
        return None, None  # blank: 0 records, named in the summary
    if fmt == "tsv":
        want = len(opts.tsv_columns)
        counts = sorted({len(ln.split("\t")) for ln in lines})
        if want not in counts:
            return (f"its first lines have {'/'.join(map(str, counts))} tab-separated column(s), --tsv-columns "
                    f"{','.join(opts.tsv_columns)} expects {want}"), None
        names = _HEADER_WORDS | {n.lower() for n in opts.tsv_columns}
        if len(lines) > 1 and all(c.strip().lower() in names for c in lines[0].split("\t")):
            return (f"its first line looks like a header ({', '.join(lines[0].split(chr(9)))}): TSV corpora have "
                    "none, so it would be indexed as a passage; remove it (tail -n +2)"), None
        return None, None
    fields: set = set()
    complete = False
    for ln in lines:
        try:
            rec = json.loads(ln)
        except ValueError:
            return "its first line is not JSON", None
        if not isinstance(rec, dict):
            return "its first line is not a JSON object", None
        fields |= set(rec)
        complete = complete or (opts.id_field in rec and opts.text_field in rec)
    if not complete:
        return f"no record among the first has both {opts.id_field!r} and {opts.text_field!r}", fields
    return None, fields


def _field_hint(have: Sequence[str], opts) -> str:
    id_guess = next((n for n in _ID_NAMES if n in have), None)
    text_guess = next((n for n in _TEXT_NAMES if n in have), None)
    flags = []
    if opts.id_field not in have and id_guess:
        flags.append(f"--id-field {id_guess}")
    if opts.text_field not in have and text_guess:
        flags.append(f"--text-field {text_guess}")
    return f"Map them with {' '.join(flags)}." if flags else "Name them with --id-field and --text-field."


def check_model(model: str, what: str = "--model") -> None:
    """A model given as a local path must be a folder; a hub name must be in the local cache when this
    process may not download (``HF_HUB_OFFLINE``). The model itself loads later."""
    from densebeam.index_store.encoding.encoder import resolve_model_path

    path = resolve_model_path(model)
    if os.path.isdir(path):
        return
    looks_local = path.startswith(("/", "./", "../", "~")) or os.path.exists(path) or path.count("/") > 1
    if looks_local:
        raise FileNotFoundError(f"{what} {model}: no such model folder" if not os.path.exists(path) else
                                f"{what} {model} is a file; give the model's folder")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            return
        if not isinstance(try_to_load_from_cache(path, "config.json"), str):
            raise FileNotFoundError(f"{what} {model} is neither a local folder nor in the Hugging Face cache, and "
                                    "downloads are off (HF_HUB_OFFLINE): give a local model folder")


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def _require(path: str, message: str) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    if not fs.exists(p):
        raise FileNotFoundError(message)


# What densebeam writes in an output folder (a killed run leaves some of it): a folder that holds files but
# none of these (dot files aside) is someone else's, and is refused even with --overwrite.
_BUNDLE_ENTRIES = ("manifest.json", "manifest.sig", "CURRENT", "versions", "_build", "shards", "docstore", "vectors",
                   "index.faiss", "index.ivfdata", "trained.faiss")
_EMBEDDINGS_ENTRIES = ("_manifest.json", "_temporary", "_cache", "rejected", "_FAILED.json", "part-")


def _not_ours(fs, root: str, output: str, ours: Sequence[str], what: str) -> None:
    if not fs.isdir(root):
        return
    names = sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(root, detail=False))
    names = [n for n in names if not n.startswith(".")]
    if names and not any(n.startswith(ours) for n in names):
        raise FileExistsError(f"--output {output} holds other files ({', '.join(names[:5])}"
                              f"{' ...' if len(names) > 5 else ''}), not {what}: give a new or empty folder")


def _embeddings_output_free(output: str, overwrite: bool) -> None:
    fs, root = fsspec.core.url_to_fs(output)
    if fs.isfile(root):
        raise FileExistsError(f"--output {output} is a file; give a folder for the embeddings dir")
    _not_ours(fs, root, output, _EMBEDDINGS_ENTRIES, "an embeddings dir")
    if fs.exists(_join(root, "_manifest.json")) and not overwrite:
        raise FileExistsError(f"{output} already holds an embeddings dir; pass --overwrite to replace it")


def _bundle_output_free(output: str, overwrite: bool, versioned: bool) -> None:
    fs, root = fsspec.core.url_to_fs(output)
    if fs.isfile(root):
        raise FileExistsError(f"--output {output} is a file; give a folder for the index bundle")
    _not_ours(fs, root, output, _BUNDLE_ENTRIES, "an index bundle")
    if fs.exists(_join(root, "manifest.json")) and not (overwrite or versioned):
        raise FileExistsError(f"{output} already holds an index bundle; pass --overwrite to replace it (or "
                              "--versioned to publish a new version beside it)")


def _bundle_exists(index: str) -> None:
    fs, root = fsspec.core.url_to_fs(index)
    if not (fs.exists(_join(root, "manifest.json")) or fs.exists(_join(root, "CURRENT"))):
        what = "does not exist" if not fs.exists(root) else "holds no manifest.json (not an index bundle, or a build " \
            "that did not finish)"
        raise FileNotFoundError(f"--index {index} {what}; give the folder densebeam index or build wrote")
