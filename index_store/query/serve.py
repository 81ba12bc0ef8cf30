"""HTTP search service over one bundle: FastAPI app, served by uvicorn (``densebeam serve``). No Beam.

    POST /search  {"query": "..."} or {"queries": ["...", ...]}, "k": 10, "nprobe": N?, "rerank": bool?,
                  "rerank_depth": int?  ->  {"results": [{"query", "hits": [{doc_id, score, text, title,
                  row}]}], "k", "nprobe", "reranked", "took_ms"}
    GET  /health  -> {"status": "ok", "vectors", "batches", "batched_queries"}
    GET  /info    -> {"manifest": the bundle manifest, "query_model", "rerank_model", "limits"}
    POST /admin/reload -> reopen the index location (a versioned location: its CURRENT version) and swap
                  it in between batches; requests in flight finish on the version they started on

Requests are validated strictly (types are not coerced; unknown fields are refused): every bad request
is a 4xx whose body says what was wrong. Concurrent requests are batched by
:class:`index_store.batcher.MicroBatcher` into one encode/search call.
"""

# No ``from __future__ import annotations``: FastAPI must see the real (locally built) request model.
import contextlib
import dataclasses
import logging
import time
from typing import Optional

from densebeam.index_store.query.batcher import MicroBatcher, SearchJob
from densebeam.index_store.query.search import Searcher

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Limits:
    max_queries: int = 64  # per request
    max_query_chars: int = 2048
    max_k: int = 1000
    max_rerank_depth: int = 1000
    batch_window_ms: float = 3.0
    max_batch_queries: int = 64
    max_body_bytes: int = 1 << 20  # larger request bodies are refused with 413 before they are read


def create_app(searcher: Searcher, limits: Limits = Limits(), reopen=None, watch=None):
    """The FastAPI app; the micro-batcher starts and stops with the app's lifespan.

    ``reopen`` is a callable returning a freshly opened :class:`Searcher` (same location and settings),
    used by ``POST /admin/reload``; ``watch=(location, seconds)`` polls a versioned location's CURRENT
    pointer and reloads when it moves. Opening happens on a worker thread while the old searcher keeps
    serving; the swap is one attribute assignment between batches, so no request is dropped.
    """
    import asyncio
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.responses import JSONResponse
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    class SearchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

        query: Optional[str] = Field(None, max_length=limits.max_query_chars)
        queries: Optional[list[str]] = Field(None, min_length=1, max_length=limits.max_queries)
        k: int = Field(10, ge=1, le=limits.max_k)
        nprobe: Optional[int] = Field(None, ge=1, le=max(searcher.nlist, 1))
        rerank: Optional[bool] = None
        rerank_depth: Optional[int] = Field(None, ge=1, le=limits.max_rerank_depth)

        @model_validator(mode="after")
        def _one_of(self):
            if (self.query is None) == (self.queries is None):
                raise ValueError("give exactly one of 'query' (a string) or 'queries' (a list of strings)")
            for q in [self.query] if self.query is not None else self.queries:
                if not q.strip():
                    raise ValueError("queries must not be empty or blank")
                if len(q) > limits.max_query_chars:
                    raise ValueError(f"a query is longer than {limits.max_query_chars} characters")
            return self

    batcher = MicroBatcher(searcher, window_s=limits.batch_window_ms / 1000.0,
                           max_queries=limits.max_batch_queries)

    reload_lock = asyncio.Lock()
    state = {"reloads": 0}

    async def do_reload() -> dict:
        if reopen is None:
            raise HTTPException(409, "this service was started without a way to reopen its index")
        async with reload_lock:
            old = batcher.searcher
            new = await asyncio.get_running_loop().run_in_executor(None, reopen)
            batcher.searcher = new
            state["reloads"] += 1
        log.info("reloaded %s -> %s", old.bundle.root, new.bundle.root)
        return {"reloaded": new.bundle.root != old.bundle.root, "bundle": new.bundle.root,
                "vectors": new.bundle.searcher.ntotal}

    async def watch_loop(location: str, every_s: float):
        from densebeam.index_store import versions

        seen = versions.current(location)
        while True:
            await asyncio.sleep(every_s)
            try:
                now = versions.current(location)
                if now != seen:
                    await do_reload()
                    seen = now
            except Exception as err:  # noqa: BLE001 - keep serving the version we have
                log.warning("reload of %s failed, still serving the previous version: %s", location, err)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        watcher = asyncio.create_task(watch_loop(*watch)) if watch else None
        try:
            yield
        finally:
            if watcher:
                watcher.cancel()
            await batcher.stop()

    app = FastAPI(title="densebeam search", lifespan=lifespan)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > limits.max_body_bytes):
            return JSONResponse(status_code=413, content={
                "detail": f"request body larger than {limits.max_body_bytes} bytes; send fewer or shorter queries"})
        return await call_next(request)

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, err: ValueError):
        return JSONResponse(status_code=400, content={"detail": str(err)})

    @app.post("/search")
    async def search(req: SearchRequest):
        start = time.perf_counter()
        searcher = batcher.searcher
        rerank = searcher.reranker is not None if req.rerank is None else req.rerank
        if rerank and searcher.reranker is None:
            raise HTTPException(400, "rerank was asked for but this service has no cross-encoder; start it "
                                     "with --rerank-model NAME_OR_PATH")
        queries = [req.query] if req.query is not None else list(req.queries)
        depth = req.rerank_depth or max(req.k, 100)
        results = await batcher.submit(SearchJob(queries, req.k, req.nprobe, rerank, depth))
        return {"results": [{"query": q, "hits": [h.to_dict() for h in hits]}
                            for q, hits in zip(queries, results)],
                "k": req.k, "nprobe": req.nprobe or searcher.default_nprobe, "reranked": rerank,
                "took_ms": round((time.perf_counter() - start) * 1000, 3)}

    @app.post("/admin/reload")
    async def reload():
        return await do_reload()

    @app.get("/health")
    async def health():
        return {"status": "ok", "vectors": batcher.searcher.bundle.searcher.ntotal, "batches": batcher.batches,
                "batched_queries": batcher.batched_queries, "bundle": batcher.searcher.bundle.root,
                "reloads": state["reloads"]}

    @app.get("/info")
    async def info():
        searcher = batcher.searcher
        return {"manifest": searcher.bundle.manifest, "query_model": searcher.encoder.name,
                "query_precision": searcher.encoder.precision, "default_nprobe": searcher.default_nprobe,
                "rerank_model": searcher.reranker.name if searcher.reranker else None,
                "limits": dataclasses.asdict(limits)}

    return app


def serve(searcher: Searcher, host: str = "127.0.0.1", port: int = 8080, limits: Limits = Limits(),
          log_level: str = "info", reopen=None, watch=None) -> None:
    """Run the app with uvicorn until interrupted (one process: the models are loaded once)."""
    import uvicorn

    uvicorn.run(create_app(searcher, limits, reopen=reopen, watch=watch), host=host, port=port, log_level=log_level, workers=1)
