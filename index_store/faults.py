"""Fault-injection hook used by the kill-and-restart tests (tests/test_resume.py).

``pause_point(name)`` does nothing unless the environment variable ``DENSEBEAM_PAUSE_AT`` equals
``name``; then it creates the file named by ``DENSEBEAM_PAUSE_MARKER`` and sleeps, so a test can SIGKILL
the whole run at exactly that point (mid-encoding, mid-index-build, mid-publish) and restart it.
"""

from __future__ import annotations

import os
import time

POINTS = ("encode", "embeddings_publish", "index", "publish")


def pause_point(name: str) -> None:
    if os.environ.get("DENSEBEAM_PAUSE_AT") != name:
        return
    marker = os.environ.get("DENSEBEAM_PAUSE_MARKER")
    if marker:
        with open(marker, "w", encoding="utf-8") as f:
            f.write(name)
    time.sleep(float(os.environ.get("DENSEBEAM_PAUSE_SECONDS", "600")))
