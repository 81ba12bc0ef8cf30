"""The service's limits per request, per batch and per connection (``densebeam serve`` flags). No import
beyond the standard library: the CLI reads their defaults before anything heavy loads."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Limits:
    max_queries: int = 64  # per request
    max_query_chars: int = 2048
    max_k: int = 1000
    max_rerank_depth: int = 1000
    batch_window_ms: float = 3.0
    max_batch_queries: int = 64
    max_body_bytes: int = 1 << 20  # counted as the body streams in, whatever its transfer encoding
    body_timeout_s: float = 10.0  # the whole body, from the end of the request head
    header_timeout_s: float = 10.0  # the request head, from the connection opening or the last answer
    max_hits: int = 10_000  # queries x k per request
    max_rerank_pairs: int = 2_000  # queries x rerank_depth per request (cross-encoder forward passes)
    max_response_bytes: int = 8 << 20
    max_pending_queries: int = 256  # queued or running; more is answered 503 at once
    queue_timeout_s: float = 10.0  # a request still waiting for its batch after this is answered 503
    max_connections: int = 256  # uvicorn answers 503 beyond this many connections or tasks
    admin_burst: int = 5  # /admin/* requests in a burst, then ...
    admin_per_s: float = 0.2  # ... this many per second (429 beyond)
