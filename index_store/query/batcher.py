"""An asyncio micro-batcher: concurrent search requests share one encode + search (+ rerank) call.

Encoding is the cost of a dense query (a transformer forward pass; FAISS search of a few lists is
cheap), and a forward pass over 16 queries costs far less than 16 passes of one. So requests wait in a
queue; the worker takes the first, gathers whatever else arrives within ``window_s`` (a few ms) up to
``max_queries`` queries, and runs them as one batch on a single worker thread (torch already uses every
core, so two batches at once would only contend). While a batch runs, new requests queue up and form
the next batch: under load batches grow by themselves, and an idle service adds at most ``window_s``.

The queue is bounded: a request that would take the queries waiting past ``max_pending_queries`` is
refused at once (:class:`Overloaded`, which the service answers 503), and one that has waited longer than
``queue_timeout_s`` when its batch starts is refused rather than run for a client that has likely given
up. Queries are encoded one by one (:meth:`Searcher.encode_queries`) and searched at their own ``k``, so
sharing a batch never changes an answer.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
from typing import Callable, Optional

from densebeam.index_store.query.hits import Hit
from densebeam.index_store.query.search import Searcher
from densebeam.index_store.query.stages import listening

log = logging.getLogger(__name__)


class Overloaded(RuntimeError):
    """The service has more work waiting than it may queue; the client should retry later."""


@dataclasses.dataclass
class SearchJob:
    queries: list[str]
    k: int
    nprobe: Optional[int]
    rerank: bool
    rerank_depth: int
    future: Optional[asyncio.Future] = None
    queued_at: float = 0.0


def run_jobs(searcher: Searcher, jobs: list[SearchJob]) -> list[list[list[Hit]]]:
    """Blocking: encode every job's queries in one call, then search (and re-rank) per group of jobs that
    share nprobe, k and re-rank settings. (A re-ranked group shares only the depth: its first stage
    fetches ``depth`` hits whatever k is. A dense search at a larger k and cut is not the same as one at
    the job's k where scores tie at the cut, so dense groups are per k.)"""
    texts = [q for job in jobs for q in job.queries]
    vectors = searcher.encode_queries(texts)
    starts, pos = [], 0
    for job in jobs:
        starts.append(pos)
        pos += len(job.queries)
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        key = (job.nprobe, True, job.rerank_depth, 0) if job.rerank else (job.nprobe, False, 0, job.k)
        groups.setdefault(key, []).append(i)
    out: list[list[list[Hit]]] = [[] for _ in jobs]
    for (nprobe, rerank, depth, _), members in groups.items():
        idx = [starts[i] + j for i in members for j in range(len(jobs[i].queries))]
        k = max(jobs[i].k for i in members)
        results = searcher.retrieve([texts[j] for j in idx], k, nprobe=nprobe, rerank=rerank,
                                    rerank_depth=depth or 100, query_vectors=vectors[idx])
        at = 0
        for i in members:
            n = len(jobs[i].queries)
            out[i] = [hits[:jobs[i].k] for hits in results[at:at + n]]
            at += n
    return out


class MicroBatcher:
    """Queue requests; one worker task runs them in batches on one thread. Start/stop in the app's lifespan."""

    def __init__(self, searcher: Searcher, window_s: float = 0.003, max_queries: int = 64,
                 max_pending_queries: int = 256, queue_timeout_s: float = 10.0,
                 on_stage: Optional[Callable[[str, float], None]] = None):
        if max_pending_queries < max_queries:
            raise ValueError(f"max_pending_queries ({max_pending_queries}) must be at least max_queries "
                             f"({max_queries})")
        self.searcher, self.window_s, self.max_queries = searcher, float(window_s), int(max_queries)
        self.max_pending_queries, self.queue_timeout_s = int(max_pending_queries), float(queue_timeout_s)
        self._queue: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="search")
        self.pending_queries = 0  # queued or running
        self.batches = 0  # counters for /health
        self.batched_queries = 0
        self.refused = {"queue_full": 0, "waited_too_long": 0}
        self.on_stage = on_stage  # (stage, seconds) of every batch's stages (index_store.query.stages)

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._worker())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)

    async def submit(self, job: SearchJob) -> list[list[Hit]]:
        """Queue ``job`` and wait for its answer; :class:`Overloaded` at once when the queue is full."""
        if self._queue is None:
            raise RuntimeError("MicroBatcher.start() was not awaited")
        if self.pending_queries + len(job.queries) > self.max_pending_queries:
            self.refused["queue_full"] += 1
            raise Overloaded(f"{self.pending_queries} queries are waiting (at most {self.max_pending_queries}); "
                             "retry in a moment")
        loop = asyncio.get_running_loop()
        job.future, job.queued_at = loop.create_future(), loop.time()
        self.pending_queries += len(job.queries)
        try:
            self._queue.put_nowait(job)
            return await job.future
        finally:
            self.pending_queries -= len(job.queries)

    async def _collect(self) -> list[SearchJob]:
        loop = asyncio.get_running_loop()
        jobs = [await self._queue.get()]
        n = len(jobs[0].queries)
        deadline = loop.time() + self.window_s
        while n < self.max_queries:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
            jobs.append(job)
            n += len(job.queries)
        return jobs

    def _run(self, searcher: Searcher, jobs: list[SearchJob]) -> list[list[list[Hit]]]:
        if self.on_stage is None:
            return run_jobs(searcher, jobs)
        with listening(self.on_stage):
            return run_jobs(searcher, jobs)

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            now = loop.time()
            for job in jobs:
                if not job.future.done() and now - job.queued_at > self.queue_timeout_s:
                    self.refused["waited_too_long"] += 1
                    job.future.set_exception(Overloaded(
                        f"the request waited {now - job.queued_at:.1f} s for its turn (at most "
                        f"{self.queue_timeout_s:g} s); the service is overloaded, retry later"))
            live = [j for j in jobs if not j.future.done()]  # drop requests whose client went away
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self._pool, self._run, self.searcher, live)
            except Exception as err:  # noqa: BLE001 - delivered to every waiting request, not swallowed
                log.exception("search batch of %d requests failed", len(live))
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            self.batches += 1
            self.batched_queries += sum(len(j.queries) for j in live)
            for job, res in zip(live, results):
                if not job.future.done():
                    job.future.set_result(res)
