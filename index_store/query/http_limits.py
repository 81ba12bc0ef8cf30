"""HTTP limits the search service enforces below FastAPI: body size and time, header time. No Beam.

FastAPI sees a request only once uvicorn has parsed its headers, and reads the body whole before any
validation runs, so these limits live beneath it:

- :class:`BodyLimit` (ASGI middleware) reads the request body itself, before the app. A
  ``Content-Length`` over the limit is refused (413) before a byte of the body is read; any other body
  (``Transfer-Encoding: chunked``) is counted as it arrives and refused (413) as soon as it passes the
  limit; a body that has not arrived whole within ``timeout_s`` is answered 408. Memory is at most the
  limit per request. Every refusal here says ``Connection: close``, so uvicorn closes the connection
  and the rest of a refused body is never read.
- :func:`h11_protocol` makes uvicorn's h11 protocol class with a deadline for the request line and
  headers: a connection that has not sent a whole request head within ``header_timeout_s`` of opening
  (or of its previous answer) is answered 408 and closed; one that sent nothing is just closed.
  uvicorn's own keep-alive timeout only covers a connection that sends nothing at all.
- A request head (path, query and headers) over ``MAX_HEAD_BYTES`` is answered 431 by
  :class:`BodyLimit` before the app; h11 refuses one that is still incomplete past that size.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from typing import Optional

log = logging.getLogger(__name__)
MAX_HEAD_BYTES = 16 * 1024  # request line + headers (also h11's bound on a head still arriving)


def _error_response(status: int, detail: str, extra_headers: tuple = ()) -> tuple[dict, dict]:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), *extra_headers]
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False})


class BodyLimit:
    """ASGI middleware: the request body in at most ``max_bytes`` and ``timeout_s``, whatever its
    transfer encoding; the app then receives it as one message."""

    def __init__(self, app, max_bytes: int, timeout_s: float, counters: Optional[dict] = None,
                 max_head_bytes: int = MAX_HEAD_BYTES):
        if max_bytes < 1 or timeout_s <= 0:
            raise ValueError(f"max_bytes and timeout_s must be positive, got {max_bytes}, {timeout_s}")
        self.app, self.max_bytes, self.timeout_s = app, int(max_bytes), float(timeout_s)
        self.max_head_bytes = int(max_head_bytes)
        self.refused = counters if counters is not None else {}  # "too_large"/"too_slow" counts, for /health

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        head = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
            len(k) + len(v) + 4 for k, v in scope["headers"])
        if head > self.max_head_bytes:
            # h11 bounds only a head still incomplete in its buffer; one that arrived in one read is
            # parsed whatever its size, so the limit is enforced here, before the app.
            self.refused["head_too_large"] = self.refused.get("head_too_large", 0) + 1
            start, body = _error_response(431, f"request head larger than {self.max_head_bytes} bytes")
            await send(start)
            return await send(body)
        declared = [v for k, v in scope["headers"] if k == b"content-length"]
        if declared and (not declared[0].isdigit() or int(declared[0]) > self.max_bytes):
            return await self._refuse(send, 413, "too_large")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        body = bytearray()
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:
                return await self._refuse(send, 408, "too_slow")
            if message["type"] == "http.disconnect":
                return  # the client went away: nobody to answer
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await self._refuse(send, 413, "too_large")
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: wait for a disconnect, as the server would

        await self.app(scope, replay, send)

    async def _refuse(self, send, status: int, why: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1
        detail = (f"request body larger than {self.max_bytes} bytes; send fewer or shorter queries"
                  if status == 413 else
                  f"the request body did not arrive within {self.timeout_s:g} s; send it whole, promptly")
        start, body = _error_response(status, detail)
        await send(start)
        await send(body)


def h11_protocol(header_timeout_s: float):
    """uvicorn's ``H11Protocol`` with a request-head deadline (pass it as ``uvicorn.Config(http=...)``)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    if header_timeout_s <= 0:
        raise ValueError(f"header_timeout_s must be positive, got {header_timeout_s}")
    _, timeout_body = _error_response(408, f"the request head did not arrive within {header_timeout_s:g} s")
    timeout_answer = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                      b"content-length: %d\r\nconnection: close\r\n\r\n" % len(timeout_body["body"])
                      + timeout_body["body"])

    class HeaderDeadlineH11Protocol(H11Protocol):
        """The head of each request must arrive within ``header_timeout_s`` of the connection opening or
        of the previous answer; a new request cycle (uvicorn's ``self.cycle``) means it did."""

        _deadline = None
        _waiting_cycle = None
        _bytes_waiting = 0

        def _arm(self) -> None:
            self._disarm()
            self._waiting_cycle, self._bytes_waiting = self.cycle, 0
            self._deadline = self.loop.call_later(header_timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self._bytes_waiting += len(data)
            super().data_received(data)
            if self._deadline is not None and self.cycle is not self._waiting_cycle:
                self._disarm()  # the head arrived: the body deadline is BodyLimit's

        def on_response_complete(self) -> None:
            done = self.cycle
            super().on_response_complete()
            if not self.transport.is_closing() and self.cycle is done:  # idle until the next head
                self._arm()

        def _expired(self) -> None:
            self._deadline = None
            if self.transport.is_closing() or self.cycle is not self._waiting_cycle:
                return
            if self._bytes_waiting:  # part of a head: say why before closing
                log.info("closing a connection whose request head took over %g s", header_timeout_s)
                self.transport.write(timeout_answer)
            self.transport.close()

    return HeaderDeadlineH11Protocol


def check_port(host: str, port: int) -> None:
    """Raise ValueError naming --port (or --host) if the service could not listen on ``host:port``: each
    address is bound and released as asyncio's ``create_server`` (uvicorn's) binds it (``""``: every
    interface; address reuse on; IPv6 sockets IPv6-only), so a port in use is reported before the models
    load rather than after."""
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise ValueError(f"cannot listen on {host}:{port}: {err.strerror} (--host)") from None
    for family, kind, proto, _, address in dict.fromkeys(infos):
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as err:
                raise ValueError(f"cannot listen on {host}:{port}: {err.strerror}; pick another --port "
                                 "(or --host)") from None
