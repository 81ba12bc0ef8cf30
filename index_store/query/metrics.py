"""The service's ``GET /metrics`` in Prometheus' text exposition format (version 0.0.4), without a client
library: counters and histograms kept here, gauges read from the service when scraped.

    densebeam_requests_total{route,method,status}      every answered request (errors are status >= 400)
    densebeam_request_seconds{route}                   histogram: arrival to the end of the answer
    densebeam_stage_seconds{stage}                     histogram per query stage of each batch
                                                       (encode, search, docstore, bm25, rerank)
    densebeam_queue_queries                            queries waiting for the search thread
    densebeam_batches_total, densebeam_batched_queries_total
    densebeam_refused_total{reason}                    overload and request-size refusals
    densebeam_reloads_total, densebeam_bundle_info{version,manifest_sha256}, densebeam_vectors

Routes are the app's own paths; any other path counts as ``other``, so a scan of random URLs cannot grow
the label set.
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Callable, Iterable, Mapping, Optional, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: from a cached query's sub-millisecond answer to a deep cross-encoder re-rank.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[object]) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values)) + "}"


def _number(x: float) -> str:
    if x == float("inf"):
        return "+Inf"
    return repr(float(x)) if isinstance(x, float) and not float(x).is_integer() else str(int(x))


class Counter:
    def __init__(self, name: str, help: str, labels: Sequence[str] = ()):
        self.name, self.help, self.labels = name, help, tuple(labels)
        self._values: dict[tuple, float] = {}
        self._lock = threading.Lock()

    def inc(self, *label_values: object, by: float = 1.0) -> None:
        key = tuple(str(v) for v in label_values)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + by


    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            items = sorted(self._values.items())
        out += [f"{self.name}{_labels(self.labels, k)} {_number(v)}" for k, v in items]
        return out


class Histogram:
    def __init__(self, name: str, help: str, labels: Sequence[str] = (),
                 buckets: Sequence[float] = LATENCY_BUCKETS):
        self.name, self.help, self.labels = name, help, tuple(labels)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[tuple, list] = {}  # key -> [counts per bucket (+Inf last), sum]
        self._lock = threading.Lock()

    def observe(self, seconds: float, *label_values: object) -> None:
        key = tuple(str(v) for v in label_values)
        i = bisect.bisect_left(self.buckets, seconds)  # the first bucket whose bound is >= seconds
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = [[0] * (len(self.buckets) + 1), 0.0]
            series[0][i] += 1
            series[1] += seconds


    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            items = sorted((k, (list(s[0]), s[1])) for k, s in self._series.items())
        for key, (counts, total) in items:
            running = 0
            for bound, n in zip(self.buckets + (float("inf"),), counts):
                running += n
                out.append(f"{self.name}_bucket{_labels(self.labels + ('le',), key + (_number(bound),))} {running}")
            out.append(f"{self.name}_sum{_labels(self.labels, key)} {_number(total)}")
            out.append(f"{self.name}_count{_labels(self.labels, key)} {running}")
        return out


def gauge_lines(name: str, help: str, values: Iterable[tuple[Mapping[str, object], float]]) -> list[str]:
    out = [f"# HELP {name} {help}", f"# TYPE {name} gauge"]
    for labels, value in values:
        out.append(f"{name}{_labels(tuple(labels), tuple(labels.values()))} {_number(value)}")
    return out


class ServiceMetrics:
    """What ``/metrics`` reports. Request counts and latencies come from :class:`MetricsMiddleware`, stage times
    from :meth:`observe_stage` (a :func:`index_store.query.stages.listening` listener); everything else is
    read from the service when scraped (``gauges``)."""

    def __init__(self, routes: Sequence[str]):
        self.routes = frozenset(routes)
        self.requests = Counter("densebeam_requests_total", "HTTP requests answered, by route, method and status.",
                                ("route", "method", "status"))
        self.latency = Histogram("densebeam_request_seconds", "Time from a request's arrival to the end of its "
                                 "answer, by route.", ("route",))
        self.stages = Histogram("densebeam_stage_seconds", "Time per query stage of each search batch "
                                "(encode, search, docstore, bm25, rerank).", ("stage",))
        self.gauges: Optional[Callable[[], list[str]]] = None

    def route(self, path: str) -> str:
        return path if path in self.routes else "other"

    def observe_stage(self, name: str, seconds: float) -> None:
        self.stages.observe(seconds, name)

    def render(self) -> str:
        lines = self.requests.lines() + self.latency.lines() + self.stages.lines()
        if self.gauges is not None:
            lines += self.gauges()
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """A pure ASGI middleware counting every HTTP answer (its status as sent) and its latency. Added last,
    so it is the outermost of the app's middleware and sees the request-size refusals too."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), {"code": 500}  # no answer started: Starlette answers 500

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = self.metrics.route(scope.get("path", ""))
            self.metrics.requests.inc(route, scope.get("method", ""), status["code"])
            self.metrics.latency.observe(time.perf_counter() - start, route)
