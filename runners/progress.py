"""Progress of a running pipeline on any runner: the launcher waits in steps and logs the Beam counters
the workers update (``passages_read``, ``passages_encoded``, ``passages_reused``, ``vectors_indexed``),
so a Flink or Dataflow run is not silent for minutes. (The local runner finishes inside ``run()``; its
workers log their own progress lines.)"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

log = logging.getLogger(__name__)

COUNTERS = ("passages_read", "passages_encoded", "passages_reused", "vectors_indexed")


def counters(result) -> dict:
    """The run's counters of :data:`COUNTERS` so far (attempted values; {} where the runner has none)."""
    from apache_beam.metrics.metric import MetricsFilter

    out = {}
    try:
        found = result.metrics().query(MetricsFilter())["counters"]
    except Exception:  # noqa: BLE001 - a runner without metrics: no progress numbers, not a failure
        return out
    for c in found:
        name = c.key.metric.name
        if name in COUNTERS:
            out[name] = out.get(name, 0) + int(c.committed or c.attempted or 0)
    return out


def progress_line(seen: dict, elapsed_s: float, expected: Optional[int]) -> str:
    """``encoded 12,000 of ~88,000 passages (13.6%), 412/s, read 12,512`` from the counters so far."""
    done = seen.get("passages_encoded", 0) + seen.get("passages_reused", 0)
    parts = []
    if "passages_encoded" in seen or "passages_reused" in seen:
        share = f" of ~{expected:,} ({100 * done / expected:.1f}%)" if expected else ""
        rate = seen.get("passages_encoded", 0) / max(elapsed_s, 1e-9)
        parts.append(f"{done:,} passages done{share}, {rate:.0f} encoded/s")
    if "passages_read" in seen:
        parts.append(f"read {seen['passages_read']:,}")
    if "vectors_indexed" in seen:
        parts.append(f"indexed {seen['vectors_indexed']:,} vectors")
    return ", ".join(parts) if parts else "running (the runner reports no counters yet)"


def wait_with_progress(result, every_s: float = 30.0, expected: Optional[int] = None) -> str:
    """Wait for ``result`` to finish, logging a progress line every ``every_s`` seconds from the
    runner's counters; returns the final state. Raises what ``wait_until_finish`` raises.

    One ``wait_until_finish()`` runs in a helper thread for the whole job: the portable runner reads
    the job's state stream in the thread that waits, and a second wait on the same stream (what
    repeated ``wait_until_finish(duration=...)`` calls do) breaks the gRPC call."""
    if every_s <= 0:
        return _state_name(result.wait_until_finish())
    outcome: dict = {}

    def wait() -> None:
        try:
            outcome["state"] = result.wait_until_finish()
        except BaseException as err:  # noqa: BLE001 - raised again in the caller's thread
            outcome["error"] = err

    waiter = threading.Thread(target=wait, name="densebeam-wait-until-finish", daemon=True)
    start = time.monotonic()
    waiter.start()
    while True:
        waiter.join(every_s)
        if not waiter.is_alive():
            break
        log.info("progress after %.0f s: %s", time.monotonic() - start,
                 progress_line(counters(result), time.monotonic() - start, expected))
    if "error" in outcome:
        raise outcome["error"]
    return _state_name(outcome.get("state"))


def _state_name(state) -> str:
    return str(getattr(state, "name", state) or "")
