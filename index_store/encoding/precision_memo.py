"""The ``--precision auto`` measurement, remembered per machine and model: the first run of a model on a
machine measures, and every later run of that model there (a re-run after a crash, the next night on a
grown corpus, another corpus) encodes in the precision that run chose without measuring again. Measured
afresh, runs would not always agree: two precisions can time close together.

Kept under ``$DENSEBEAM_CACHE_DIR/precision`` (default ``~/.cache/densebeam``), one small JSON file per
key; delete it (or pass ``--precision`` explicitly) to measure again. No Beam import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Optional

from densebeam.index_store.fsutil import cache_root

log = logging.getLogger(__name__)

VERSION = 2  # bump when the measurement itself changes: older records are not reused


def machine() -> dict:
    """What the timing depends on besides the model: CPU model, family and flags (after any ISA cap,
    :mod:`index_store.encoding.cpu`), cores, torch."""
    import torch

    from densebeam.index_store.encoding import cpu

    return {"cpu": cpu.describe()["model"], "family": cpu.family(),
            "cpu_flags": hashlib.sha256(" ".join(sorted(cpu.flags())).encode()).hexdigest()[:16],
            "cores": os.cpu_count(), "torch": torch.__version__}


def key(model: dict, device: str, rules: dict) -> str:
    """sha256 over everything the measurement depends on but the corpus: model identity (name, revision
    or weights digest, settings), device, machine and the acceptance rules."""
    head = {"version": VERSION, "model": model, "device": device, "machine": machine(), "rules": rules}
    return hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()


def path(k: str) -> str:
    """Where the record of key ``k`` is kept."""
    return os.path.join(cache_root(), "precision", f"{k}.json")


def load(k: str) -> Optional[dict]:
    """The remembered record for key ``k``, or None (missing or unreadable: measure again)."""
    try:
        with open(path(k), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("chosen"), str) else None


def save(k: str, record: dict) -> None:
    """Remember ``record`` under ``k`` (atomically; a failure to write is logged, never fatal)."""
    where = path(k)
    try:
        os.makedirs(os.path.dirname(where), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(where), prefix=".tmp-")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f, sort_keys=True)
        os.replace(tmp, where)
    except OSError as err:
        log.warning("could not remember the precision measurement in %s: %s", where, err)
