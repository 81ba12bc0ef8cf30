"""The ``densebeam`` console script: one subcommand per pipeline or tool.

    densebeam encode  --input GLOB --output EMB_DIR [--model M] [Beam flags...]
"""

from __future__ import annotations

import json
import logging
import os
import sys
from typing import Optional, Sequence

USAGE = """usage: densebeam COMMAND [options]

commands:
  encode    corpus shards -> Parquet embeddings dir (Beam pipeline)

'densebeam COMMAND --help' shows a command's options. Beam flags (--runner, --direct_num_workers,
Dataflow/Flink flags) pass through to the pipeline.
"""


def _setup_logging() -> None:
    level = os.environ.get("DENSEBEAM_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    for noisy in ("apache_beam", "urllib3", "filelock", "httpx", "sentence_transformers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def format_encode_summary(manifest: dict, output: str) -> str:
    c = manifest["counts"]
    facts = manifest["model_facts"]
    secs = manifest.get("_wall_seconds")
    lines = [
        f"embeddings: {output}",
        f"  model {facts['model']}  dim {facts['dim']}  similarity {facts['similarity']}  "
        f"dtype {facts['dtype']}  precision {facts.get('precision')}",
        f"  read {c['read']}  encoded {c['encoded']}  rejected {c['rejected']}  "
        f"in {len(manifest['shards'])} shard(s)",
    ]
    for reason, n in c.get("rejected_by_reason", {}).items():
        lines.append(f"    rejected {reason}: {n}")
    if c["rejected"]:
        lines.append(f"  rejected records (with reason and source): {output.rstrip('/')}/rejected/")
    if secs:
        lines.append(f"  wall time {secs:.1f} s, {c['encoded'] / secs:.1f} passages/s end to end")
    return "\n".join(lines)


def _encode(argv: Sequence[str]) -> int:
    from pipelines import encode

    manifest = encode.run(argv)
    out = encode.build_parser().parse_known_args(argv)[0].output
    print(format_encode_summary(manifest, out))
    return 0


COMMANDS = {"encode": _encode}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"densebeam: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    _setup_logging()
    try:
        return COMMANDS[command](rest)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"densebeam {command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
