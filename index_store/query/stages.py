"""Time spent per query stage (``encode``, ``search``, ``docstore``, ``bm25``, ``rerank``), reported to
whoever listens on the current thread: the service's ``/metrics`` listens around each batch; library
calls with no listener pay one context-variable lookup per stage."""

from __future__ import annotations

import contextlib
import contextvars
import time
from typing import Callable, Iterator, Optional

STAGES = ("encode", "search", "docstore", "bm25", "rerank")

_LISTENER: contextvars.ContextVar[Optional[Callable[[str, float], None]]] = contextvars.ContextVar(
    "densebeam_stage_listener", default=None)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block as stage ``name`` for the current listener, if any."""
    listener = _LISTENER.get()
    if listener is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        listener(name, time.perf_counter() - start)


@contextlib.contextmanager
def listening(listener: Callable[[str, float], None]) -> Iterator[None]:
    """Report every :func:`stage` run inside the block (on this thread) to ``listener(name, seconds)``."""
    token = _LISTENER.set(listener)
    try:
        yield
    finally:
        _LISTENER.reset(token)
