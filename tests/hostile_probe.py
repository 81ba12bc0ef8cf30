"""Child-process prober for tests/test_hostile_bundles.py: opens bundles the way a reader does.

Run as ``python hostile_probe.py RESULT_FD``; reads one JSON task per line on stdin
(``{"path": bundle, "queries": [[...], ...], "k": 10}``) and writes one JSON result per line to the
file descriptor RESULT_FD (stdout and stderr stay free for FAISS's own chatter):

- ``{"status": "refused", "error": "<class>: <message>", "inspect_rc": n}``: open_bundle raised;
- ``{"status": "opened", "ids": [...], "inspect_rc": n}``: it opened, every list was scanned
  (nprobe = nlist), every docstore row was read, and the hits' ids came back.

A segfault or abort kills only this process; the parent sees it die by a signal.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import sys

import numpy as np


def probe(task: dict) -> dict:
    from densebeam.index_store.artifacts.bundle import open_bundle
    from densebeam.pipelines import cli

    out: dict = {}
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        out["inspect_rc"] = cli.main(["inspect", "--verify", task["path"]])
    try:
        bundle = open_bundle(task["path"])
    except Exception as err:  # noqa: BLE001 - the prober reports every refusal, whatever its type
        out.update(status="refused", error=f"{type(err).__name__}: {err}")
        return out
    queries = np.asarray(task["queries"], dtype=np.float32)
    _, ids = bundle.searcher.search(queries, task["k"], bundle.searcher.nlist)
    hits = bundle.docstore.get(ids.ravel().tolist())
    everything = bundle.docstore.get(range(len(bundle.docstore)))
    out.update(status="opened", ids=ids.tolist(), doc_ids=[h and h["id"] for h in hits],
               rows=len(everything))
    del bundle, everything
    gc.collect()
    return out


def main() -> None:
    results = os.fdopen(int(sys.argv[1]), "w", buffering=1)
    for line in sys.stdin:
        task = json.loads(line)
        try:
            result = probe(task)
        except Exception as err:  # noqa: BLE001 - opened, then failed: reported as such, not a crash
            result = {"status": "failed_after_open", "error": f"{type(err).__name__}: {err}"}
        results.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
