"""HTTP search service over one bundle: FastAPI app, served by uvicorn (``densebeam serve``). No Beam.

    POST /search  {"query": "..."} or {"queries": ["...", ...]}, "k": 10, "nprobe": N?, "rerank": bool?,
                  "rerank_depth": int?, "fields": ["doc_id", "score", ...]?  ->  {"results": [{"query",
                  "hits": [{doc_id, score, text, title, row} or the fields asked for]}], "k", "nprobe",
                  "reranked", "took_ms"}
    GET  /health  -> {"status": "ok", "vectors", "version", "manifest_sha256", counters}
    GET  /info    -> {"manifest", "query_model", "rerank_model", "limits", ...}  (local paths left out)
    GET  /metrics -> Prometheus text format (:mod:`index_store.query.metrics`)
    GET  /openapi.json -> the API's schema (no documentation page: it would load its assets from a CDN)
    POST /admin/reload[?force=true]  (Authorization: Bearer TOKEN) -> prove, open and warm the location's
                  current version, then swap it in between batches; an unchanged version is not reopened

Limits, all in :class:`Limits`: request body size and time, request-head time
(:mod:`index_store.query.http_limits`); queries, query length, k, nprobe, re-rank depth, and a cost
budget per request (queries x k hits, queries x depth re-rank pairs, response bytes); a bounded queue
(503 when full, :class:`index_store.query.batcher.Overloaded`) and connection count (uvicorn's 503);
``/admin/*`` only with a token, and throttled (429). Every bad request is a 4xx whose body says what was
wrong, in a few hundred bytes whatever the request held (inputs are never echoed).
"""

# No ``from __future__ import annotations``: FastAPI must see the real (locally built) request model.
import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import logging
import os
import re
import time
from typing import Literal, Optional

from densebeam import __version__
from densebeam.index_store.artifacts.bundle import open_bundle
from densebeam.index_store.ivf.nprobe import nprobe_for_k
from densebeam.index_store.query import reload as reload_lib
from densebeam.index_store.query.batcher import MicroBatcher, Overloaded, SearchJob
from densebeam.index_store.query.http_limits import MAX_HEAD_BYTES, BodyLimit, h11_protocol
from densebeam.index_store.query.limits import Limits
from densebeam.index_store.query.metrics import CONTENT_TYPE, MetricsMiddleware, ServiceMetrics, gauge_lines
from densebeam.index_store.query.search import Searcher

log = logging.getLogger(__name__)

ADMIN_TOKEN_ENV = "DENSEBEAM_ADMIN_TOKEN"
ROUTES = ("/search", "/health", "/info", "/metrics", "/openapi.json", "/admin/reload")
HIT_FIELDS = ("doc_id", "score", "text", "title", "row")


@dataclasses.dataclass(frozen=True)
class Reloading:
    """Where ``POST /admin/reload`` and the watch reopen from, and how."""

    location: str  # a bundle, or a versioned location (its CURRENT version is opened)
    verify: str = "full"
    cache_dir: Optional[str] = None
    watch_seconds: float = 0.0  # > 0: poll the location and reload when its version changes
    proof_timeout_s: float = reload_lib.DEFAULT_PROOF_TIMEOUT_S
    warm_bytes: int = reload_lib.DEFAULT_WARM_BYTES
    trust_key_file: Optional[str] = None  # open only versions signed with this key (index_store.artifacts.signing)

    @property
    def trust_key(self) -> Optional[bytes]:
        from densebeam.index_store.artifacts import signing

        return signing.read_key(self.trust_key_file)


def read_admin_token(path: Optional[str] = None) -> Optional[str]:
    """The admin token from ``path`` (its stripped contents) or ``$DENSEBEAM_ADMIN_TOKEN``; None: admin off."""
    if path:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
        if not token:
            raise ValueError(f"the admin token file {path} is empty; write a long random token into it")
    else:
        token = os.environ.get(ADMIN_TOKEN_ENV, "").strip() or None
    if token is not None and len(token) < 16:
        raise ValueError("the admin token is shorter than 16 characters; use a long random one "
                         "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def open_version(reloading: Reloading, open_searcher, vid: Optional["reload_lib.VersionId"] = None):
    """Prove (in a child process), open and warm the current version of ``reloading.location``.

    ``open_searcher(path)`` opens the proven bundle path as a :class:`Searcher`; ``vid`` is the version
    to load if already identified. Returns (searcher, :class:`reload.VersionId`). Blocking; raises
    ``BundleError`` (:class:`reload.ReloadError` for a version the child refused) naming what is wrong.
    """
    vid = vid or reload_lib.identify(reloading.location)
    proof = reload_lib.prove(vid.path, reloading.verify, reloading.cache_dir, reloading.proof_timeout_s,
                             reloading.trust_key_file)
    searcher = open_searcher(vid.path)
    if reload_lib.manifest_sha256(searcher.bundle) != vid.manifest_sha256:
        raise reload_lib.ReloadError(f"{vid.path} changed while it was being loaded; try again")
    warmed = reload_lib.warm(searcher.bundle, reloading.warm_bytes)
    log.info("opened %s: proof %s, warm %s", vid.path, proof, warmed)
    return searcher, vid


_ABS_PATH = re.compile(r"(?<![\w.~:/])(?:file://)?(?:~|[A-Za-z]:)?(?:[/\\][^\s/\\'\",;()\[\]{}]+)+[/\\]?")


_LOCATION_KEYS = {"embeddings", "source", "input", "output", "root", "bundle", "location"}


def _last_part(path: str) -> str:
    return re.split(r"[/\\]", path.rstrip("/\\"))[-1] or "/"


def strip_paths(value, key: Optional[str] = None):
    """``value`` (JSON-like) with local paths replaced by their last component: every absolute path in a
    string, the value of a location key (``embeddings``, ``source``, ...) unless it is a remote URL, and a
    ``model`` that names a local directory."""
    if isinstance(value, dict):
        return {k: strip_paths(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [strip_paths(v, key) for v in value]
    if isinstance(value, str):
        if key in _LOCATION_KEYS and ("://" not in value or value.startswith("file://")):
            return _last_part(value)
        if key == "model" and os.path.exists(value):  # a local model directory, maybe relative
            return _last_part(value)
        return _ABS_PATH.sub(lambda m: _last_part(m.group(0)), value)
    return value


class _Throttle:
    """Token bucket: ``burst`` requests at once, refilled at ``per_s``."""

    def __init__(self, burst: int, per_s: float):
        self.burst, self.per_s = float(burst), float(per_s)
        self.tokens, self.at = float(burst), time.monotonic()

    def take(self) -> Optional[float]:
        """None if allowed, else the seconds until the next request would be."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_s)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return None
        return (1 - self.tokens) / self.per_s if self.per_s > 0 else 3600.0


def _brief(text: object, limit: int = 300) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


class ServiceState:
    """What the routes share: the micro-batcher (whose ``searcher`` is the serving version), the
    version served and the reload machinery, the limits and the counters. Built by :func:`create_app`."""

    def __init__(self, searcher: Searcher, limits: Limits, reloading: Optional[Reloading],
                 admin_token: Optional[str], expose_paths: bool, version: Optional["reload_lib.VersionId"],
                 default_nprobe: Optional[int], default_rerank_depth: int):
        self.limits, self.reloading, self.admin_token = limits, reloading, admin_token
        self.expose_paths = expose_paths
        self.default_nprobe, self.default_rerank_depth = default_nprobe, default_rerank_depth
        self.metrics = ServiceMetrics(ROUTES)
        self.metrics.gauges = self.gauge_lines
        self.batcher = MicroBatcher(searcher, window_s=limits.batch_window_ms / 1000.0,
                                    max_queries=limits.max_batch_queries,
                                    max_pending_queries=limits.max_pending_queries,
                                    queue_timeout_s=limits.queue_timeout_s, on_stage=self.metrics.observe_stage)
        self.version = version or reload_lib.VersionId(searcher.bundle.root, None,
                                                       reload_lib.manifest_sha256(searcher.bundle))
        self.reloads, self.failed = 0, None  # reloads done; the version last refused
        self.watch_polls = 0  # times the watch read the location's current version
        self.body_refused = {"too_large": 0, "too_slow": 0, "head_too_large": 0}
        self.reload_lock = asyncio.Lock()
        self.admin_throttle = _Throttle(limits.admin_burst, limits.admin_per_s)

    def public(self, value, key=None):
        """``value`` as answers may show it: local paths cut unless ``--expose-paths``."""
        return value if self.expose_paths else strip_paths(value, key)

    def version_fields(self) -> dict:
        fields = self.version.public()
        if self.expose_paths:
            fields["bundle"] = self.version.path
        return fields

    def refused(self) -> dict:
        """Requests refused before searching, by reason: the batcher's and the body/head limits'."""
        return {**self.batcher.refused, **{k if k.startswith("head") else f"body_{k}": n
                                           for k, n in self.body_refused.items()}}

    def gauge_lines(self) -> list[str]:
        """The scrape-time part of ``/metrics``: queue, batches, refusals, reloads, the version served."""
        b, v = self.batcher, self.version.public()
        lines = gauge_lines("densebeam_queue_queries", "Queries queued or running on the search thread.",
                            [({}, b.pending_queries)])
        for name, help_text, value in (
                ("densebeam_batches_total", "Search batches run.", b.batches),
                ("densebeam_batched_queries_total", "Queries answered in search batches.", b.batched_queries),
                ("densebeam_reloads_total", "Bundle versions swapped in since start.", self.reloads),
                ("densebeam_watch_polls_total", "Times the reload watch read the location's current version.",
                 self.watch_polls)):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
        lines += ["# HELP densebeam_refused_total Requests refused before searching, by reason.",
                  "# TYPE densebeam_refused_total counter"]
        lines += [f'densebeam_refused_total{{reason="{k}"}} {n}' for k, n in sorted(self.refused().items())]
        lines += gauge_lines("densebeam_bundle_info", "The bundle version served (value 1).",
                             [({"version": v.get("version") or "", "manifest_sha256": v["manifest_sha256"]}, 1)])
        lines += gauge_lines("densebeam_vectors", "Vectors in the bundle served.",
                             [({}, b.searcher.bundle.searcher.ntotal)])
        return lines

    def _load(self, vid) -> Searcher:
        """Blocking: prove, open and warm ``vid`` on top of the current models."""
        current, r = self.batcher.searcher, self.reloading
        return open_version(r, lambda path: current.with_bundle(
            open_bundle(path, verify=r.verify, cache_dir=r.cache_dir, trust_key=r.trust_key)), vid)[0]

    async def reload(self, force: bool = False) -> dict:
        """Reload if the location's version changed (or ``force``); raises HTTPException for answers."""
        from fastapi import HTTPException

        if self.reloading is None:
            raise HTTPException(409, "this service was started without a location to reload from")
        if self.reload_lock.locked():
            raise HTTPException(409, "a reload is already running; retry when it is done")
        loop = asyncio.get_running_loop()
        async with self.reload_lock:
            try:
                vid = await loop.run_in_executor(None, reload_lib.identify, self.reloading.location)
            except (OSError, ValueError) as err:
                raise HTTPException(409, self.public(f"cannot read the location's current version: {err}")) from err
            old = self.version
            if not force and (vid.path, vid.manifest_sha256) == (old.path, old.manifest_sha256):
                return {"reloaded": False, **self.version_fields(),
                        "vectors": self.batcher.searcher.bundle.searcher.ntotal}
            start = time.perf_counter()
            try:
                new = await loop.run_in_executor(None, self._load, vid)
            except (OSError, ValueError) as err:  # BundleError and ReloadError are ValueErrors
                self.failed = vid
                log.error("refused version %s of %s, still serving %s: %s", vid.name or vid.manifest_sha256[:16],
                          self.reloading.location, old.name or old.manifest_sha256[:16], err)
                raise HTTPException(409, self.public(f"the new version was refused and the previous one still "
                                                      f"serves: {err}")) from err
            self.batcher.searcher = new
            self.version, self.failed, self.reloads = vid, None, self.reloads + 1
        log.info("reloaded %s -> %s in %.1f s", old.path, vid.path, time.perf_counter() - start)
        return {"reloaded": True, **self.version_fields(), "vectors": new.bundle.searcher.ntotal,
                "seconds": round(time.perf_counter() - start, 3)}

    async def watch(self, every_s: float) -> None:
        """Poll the location and reload a new version (never the one last refused) until cancelled."""
        from fastapi import HTTPException

        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every_s)
            try:
                vid = await loop.run_in_executor(None, reload_lib.identify, self.reloading.location)
                self.watch_polls += 1
                known = [v for v in (self.version, self.failed) if v is not None]
                if any((vid.path, vid.manifest_sha256) == (v.path, v.manifest_sha256) for v in known):
                    continue  # unchanged, or the version that was refused: do not prove it again
                await self.reload()
            except HTTPException as err:
                log.warning("reload of %s did not happen, still serving the previous version: %s",
                            self.reloading.location, err.detail)
            except Exception as err:  # noqa: BLE001 - keep serving the version we have
                log.warning("reload of %s failed, still serving the previous version: %s",
                            self.reloading.location, err)


def create_app(searcher: Searcher, limits: Limits = Limits(), reloading: Optional[Reloading] = None,
               admin_token: Optional[str] = None, expose_paths: bool = False,
               version: Optional["reload_lib.VersionId"] = None, default_nprobe: Optional[int] = None,
               default_rerank_depth: int = 100):
    """The FastAPI app; the micro-batcher (and the watch, if any) start and stop with its lifespan.

    ``reloading`` enables ``POST /admin/reload`` (with ``admin_token``) and the watch: the location's
    current version is proven in a child process, opened and warmed on a worker thread while the old one
    keeps serving, and swapped in with one assignment between batches, so no request is dropped.
    ``version`` names what ``searcher`` holds (as :func:`reload.identify` would), so that an unchanged
    location is not reopened. ``expose_paths`` puts local paths into /health, /info and reload answers.
    ``default_nprobe`` (``serve --nprobe``) is the nprobe of requests that give none (at most the serving
    bundle's nlist; ``None``: the bundle's nprobe for the request's k); a request without
    ``rerank_depth`` re-ranks ``max(k, default_rerank_depth)`` hits (``serve --rerank-depth``).
    """
    from fastapi import FastAPI

    state = ServiceState(searcher, limits, reloading, admin_token, expose_paths, version, default_nprobe,
                         default_rerank_depth)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await state.batcher.start()
        watcher = None
        if reloading is not None and reloading.watch_seconds > 0:
            watcher = asyncio.create_task(state.watch(reloading.watch_seconds))
        try:
            yield
        finally:
            if watcher:
                watcher.cancel()
            await state.batcher.stop()

    # No /docs or /redoc: FastAPI's pages load their scripts from a CDN; /openapi.json is the schema.
    app = FastAPI(title="densebeam search", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Dense retrieval over one densebeam bundle, with optional cross-encoder re-ranking.")
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s,
                       counters=state.body_refused)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)  # added last: outermost, sees every answer
    _error_answers(app, state)
    _search_route(app, state)
    _admin_routes(app, state)
    _status_routes(app, state)
    return app


def _error_answers(app, state: ServiceState) -> None:
    """Errors as short answers that never echo the input, with the status codes docs/query.md lists."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        # FastAPI's default answer repeats each bad input whole: an 8 MiB query would come back as 8 MiB.
        errors = list(err.errors())
        detail = [{"loc": [_brief(part, 64) for part in e.get("loc", ())][:8], "msg": _brief(e.get("msg", "")),
                   "type": _brief(e.get("type", ""), 64)} for e in errors[:10]]
        if len(errors) > 10:
            detail.append({"loc": [], "msg": f"... and {len(errors) - 10} more errors", "type": "more"})
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        # FastAPI answers a body its JSON parser gave up on (nested too deeply: a RecursionError) with 400
        # "There was an error parsing the body"; it is malformed JSON, like any other: 422
        if err.status_code == 400 and err.detail == "There was an error parsing the body":
            return JSONResponse(status_code=422, content={"detail": [{
                "loc": ["body"], "msg": "the body is not JSON this service can read (malformed, or nested too "
                "deeply)", "type": "json_invalid"}]})
        return JSONResponse(status_code=err.status_code, content={"detail": err.detail},
                            headers=getattr(err, "headers", None))

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, err: ValueError):
        return JSONResponse(status_code=400, content={"detail": _brief(state.public(str(err)), 1000)})

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, err: Overloaded):
        return JSONResponse(status_code=503, content={"detail": str(err)}, headers={"Retry-After": "1"})


def _search_request_model(limits: Limits):
    """The strict pydantic model of a ``POST /search`` body under ``limits``."""
    from pydantic import BaseModel, ConfigDict, Field, model_validator

    class SearchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)

        query: Optional[str] = Field(None, max_length=limits.max_query_chars)
        queries: Optional[list[str]] = Field(None, min_length=1, max_length=limits.max_queries)
        k: int = Field(10, ge=1, le=limits.max_k)
        nprobe: Optional[int] = Field(None, ge=1)  # at most the serving bundle's nlist: checked per request
        rerank: Optional[bool] = None
        rerank_depth: Optional[int] = Field(None, ge=1, le=limits.max_rerank_depth)
        fields: Optional[list[Literal[HIT_FIELDS]]] = Field(  # type: ignore[valid-type]
            None, min_length=1, max_length=len(HIT_FIELDS),
            description="the hit fields to return (default: all); large-k answers stay small without text")

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

    return SearchRequest


def _answer_models():
    """The answers' schemas, for /openapi.json (the routes build their answers themselves)."""
    from pydantic import BaseModel, ConfigDict, Field

    class Hit(BaseModel):
        doc_id: Optional[str] = Field(None, description="the document's id as the corpus gave it")
        score: Optional[float] = Field(None, description="inner product, or the cross-encoder's score if re-ranked")
        text: Optional[str] = None
        title: Optional[str] = None
        row: Optional[int] = Field(None, description="the FAISS row id in the bundle")

    class QueryAnswer(BaseModel):
        query: str
        hits: list[Hit] = Field(description="best first; only the fields asked for when 'fields' is given")

    class SearchAnswer(BaseModel):
        results: list[QueryAnswer]
        k: int
        nprobe: int = Field(description="the number of inverted lists the search started from")
        reranked: bool
        took_ms: float

    class HealthAnswer(BaseModel):
        model_config = ConfigDict(extra="allow")
        status: Literal["ok"]
        vectors: int
        version: Optional[str] = Field(None, description="the version served, when the location is versioned")
        manifest_sha256: str
        reloads: int
        batches: int
        batched_queries: int
        pending_queries: int
        refused: dict[str, int]

    class InfoAnswer(BaseModel):
        model_config = ConfigDict(extra="allow")
        manifest: dict
        query_model: str
        query_precision: str
        default_nprobe: int
        rerank_model: Optional[str]
        limits: dict

    class ErrorAnswer(BaseModel):
        detail: object = Field(description="what was wrong (a string, or a list of field errors for 422)")

    return SearchAnswer, HealthAnswer, InfoAnswer, ErrorAnswer


def _search_route(app, state: ServiceState) -> None:
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse

    limits, SearchRequest = state.limits, _search_request_model(state.limits)
    SearchAnswer, _, _, ErrorAnswer = _answer_models()
    errors = {code: {"model": ErrorAnswer, "description": why} for code, why in (
        (400, "re-ranking asked of a service without a cross-encoder"), (413, "body too large"),
        (422, "an invalid request, or one over the limits"), (503, "overloaded: retry after Retry-After"))}

    @app.post("/search", responses={200: {"model": SearchAnswer}, **errors})
    async def search(req: SearchRequest):
        start = time.perf_counter()
        searcher = state.batcher.searcher
        rerank = searcher.reranker is not None if req.rerank is None else req.rerank
        if rerank and searcher.reranker is None:
            raise HTTPException(400, "rerank was asked for but this service has no cross-encoder; start it "
                                     "with --rerank-model NAME_OR_PATH")
        queries = [req.query] if req.query is not None else list(req.queries)
        depth = req.rerank_depth or max(req.k, state.default_rerank_depth)
        if req.nprobe is not None and req.nprobe > max(searcher.nlist, 1):
            raise HTTPException(422, f"nprobe {req.nprobe} is more than the {searcher.nlist} lists of this bundle")
        nprobe = req.nprobe if req.nprobe is not None else (
            min(state.default_nprobe, max(searcher.nlist, 1)) if state.default_nprobe else None)
        if len(queries) * req.k > limits.max_hits:
            raise HTTPException(422, f"{len(queries)} queries x k {req.k} = {len(queries) * req.k} hits, more than "
                                     f"the {limits.max_hits} a request may ask for; send fewer queries or a smaller k")
        if rerank and len(queries) * depth > limits.max_rerank_pairs:
            raise HTTPException(422, f"{len(queries)} queries x rerank_depth {depth} = {len(queries) * depth} "
                                     f"cross-encoder pairs, more than the {limits.max_rerank_pairs} a request may "
                                     "ask for; send fewer queries or a smaller rerank_depth")
        results = await state.batcher.submit(SearchJob(queries, req.k, nprobe, rerank, depth))
        # The nprobe the search started from (a query whose probed lists held fewer than k vectors is
        # searched again with more: ivf.search.search_filled).
        started = nprobe if nprobe is not None else nprobe_for_k(searcher.bundle.record,
                                                                 depth if rerank else req.k)
        fields = tuple(dict.fromkeys(req.fields)) if req.fields else None

        def hit(h):
            d = h.to_dict()
            return d if fields is None else {f: d[f] for f in fields}
        answer = JSONResponse({"results": [{"query": q, "hits": [hit(h) for h in hits]}
                                           for q, hits in zip(queries, results)],
                               "k": req.k, "nprobe": started, "reranked": rerank,
                               "took_ms": round((time.perf_counter() - start) * 1000, 3)})
        if len(answer.body) > limits.max_response_bytes:
            raise HTTPException(422, f"the answer would be {len(answer.body)} bytes, more than the "
                                     f"{limits.max_response_bytes} a response may hold; ask for fewer queries or "
                                     "a smaller k")
        return answer


def _admin_routes(app, state: ServiceState) -> None:
    """``/admin/*``: a throttle, then the token (off without one)."""
    from fastapi import APIRouter, Depends, HTTPException, Request

    async def admin_gate(request: Request):
        wait = state.admin_throttle.take()
        if wait is not None:
            raise HTTPException(429, "too many /admin requests; retry later",
                                headers={"Retry-After": str(max(1, round(wait)))})
        if state.admin_token is None:
            raise HTTPException(403, "the /admin endpoints are off; start the service with --admin-token-file "
                                     f"FILE (or {ADMIN_TOKEN_ENV}) to enable them")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                hashlib.sha256(given.strip().encode()).digest(), hashlib.sha256(state.admin_token.encode()).digest()):
            raise HTTPException(401, "a valid admin token is required: Authorization: Bearer TOKEN",
                                headers={"WWW-Authenticate": "Bearer"})

    admin = APIRouter(prefix="/admin", dependencies=[Depends(admin_gate)])

    @admin.post("/reload")
    async def reload(force: bool = False):
        return await state.reload(force)

    app.include_router(admin)


def _status_routes(app, state: ServiceState) -> None:
    """``GET /health``, ``GET /info`` and ``GET /metrics``."""
    from fastapi.responses import PlainTextResponse

    _, HealthAnswer, InfoAnswer, _ = _answer_models()

    def model_name(name: str) -> str:
        return state.public(name, "model")

    @app.get("/metrics", response_class=PlainTextResponse,
             responses={200: {"content": {CONTENT_TYPE: {}}, "description": "Prometheus text format 0.0.4"}})
    async def metrics():
        return PlainTextResponse(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/health", responses={200: {"model": HealthAnswer}})
    async def health():
        b = state.batcher
        return {"status": "ok", "vectors": b.searcher.bundle.searcher.ntotal, **state.version_fields(),
                "reloads": state.reloads, "batches": b.batches, "batched_queries": b.batched_queries,
                "pending_queries": b.pending_queries, "refused": state.refused()}

    @app.get("/info", responses={200: {"model": InfoAnswer}})
    async def info():
        s = state.batcher.searcher
        return {"manifest": state.public(s.bundle.manifest), **state.version_fields(),
                "query_model": model_name(s.encoder.name), "query_precision": s.encoder.precision,
                "default_nprobe": s.default_nprobe, "rerank_model": model_name(s.reranker.name) if s.reranker else None,
                "limits": dataclasses.asdict(state.limits)}


def server_config(app, limits: Limits = Limits(), host: str = "127.0.0.1", port: int = 8080,
                  log_level: str = "info"):
    """uvicorn's config for ``app`` with the service's connection limits: the request-head deadline
    (:func:`http_limits.h11_protocol`), at most ``max_connections`` (503 beyond), 16 KiB of headers."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, workers=1,
                          http=h11_protocol(limits.header_timeout_s), limit_concurrency=limits.max_connections,
                          timeout_keep_alive=5, h11_max_incomplete_event_size=MAX_HEAD_BYTES)


def serve(searcher: Searcher, host: str = "127.0.0.1", port: int = 8080, limits: Limits = Limits(),
          log_level: str = "info", **app_options) -> None:
    """Run the app with uvicorn until interrupted (one process: the models are loaded once)."""
    import uvicorn

    uvicorn.Server(server_config(create_app(searcher, limits, **app_options), limits, host, port, log_level)).run()
