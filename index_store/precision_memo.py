"""The ``--precision auto`` measurement, remembered per machine: the same model, the same corpus sample and
the same hardware and software get the same precision on every run, so a re-run (after a crash, or the
next night on a grown corpus that starts the same) encodes in the precision the first run chose, and the
measurement's seconds are spent once. The choice is timed, and two precisions can be close (bf16 and
bf16-mixed within 10% on an AVX-512 CPU): measured afresh, runs would not always agree.

Kept under ``$DENSEBEAM_CACHE_DIR/precision`` (default ``~/.cache/densebeam``), one small JSON file per
key; delete it (or pass ``--precision`` explicitly) to measure again. No Beam import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from typing import Optional, Sequence

from densebeam.index_store.fsutil import cache_root

log = logging.getLogger(__name__)

VERSION = 1  # bump when the measurement itself changes: older records are not reused


def machine() -> dict:
    """What the timing depends on besides the model: CPU model and flags, torch, the device."""
    cpu = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip()
                if name in ("model name", "flags") and name not in cpu:
                    cpu[name] = value.strip()
                if len(cpu) == 2:
                    break
    except OSError:
        pass
    import torch

    return {"cpu": cpu.get("model name") or platform.processor() or platform.machine(),
            "cpu_flags": hashlib.sha256(cpu.get("flags", "").encode()).hexdigest()[:16],
            "cores": os.cpu_count(), "torch": torch.__version__}


def key(model: dict, device: str, sample: Sequence[str], rules: dict) -> str:
    """sha256 over everything the measurement depends on: model identity (name, revision or weights
    digest, settings), device, machine, the sample's texts and the acceptance rules."""
    h = hashlib.sha256()
    head = {"version": VERSION, "model": model, "device": device, "machine": machine(), "rules": rules}
    h.update(json.dumps(head, sort_keys=True).encode())
    for text in sample:
        h.update(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())
    return h.hexdigest()


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
