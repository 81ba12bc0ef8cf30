"""The service holds its limits: a real uvicorn server (the service's own connection settings) on
127.0.0.1, real tiny models, raw sockets for chunked, oversized and slow clients."""

from __future__ import annotations

import json
import resource
from pathlib import Path
import socket
import threading
import time

import httpx
import pytest

from densebeam.index_store.query.search import Searcher
from densebeam.index_store.query.serve import Limits, create_app, server_config
from query_fixtures import build_tiny_bundle, build_tiny_cross_encoder, free_port, toy_queries

pytestmark = pytest.mark.timing  # time-outs of 1 s, refusals "at once"

QUERIES = toy_queries(8, seed=5)
FAST = dict(header_timeout_s=1.0, body_timeout_s=1.0)  # timeouts short enough for a test


@pytest.fixture(scope="module")
def searcher(tmp_path_factory, tiny_cos_model):
    tmp = tmp_path_factory.mktemp("limits")
    bundle = build_tiny_bundle(tmp, tiny_cos_model, 200, 17)
    return Searcher.open(bundle, precision="fp32", device="cpu", rerank_model=build_tiny_cross_encoder(tmp / "ce"))


class Served:
    """``create_app(searcher, limits, **options)`` behind uvicorn with :func:`server_config` (the head
    deadline and connection limit the CLI uses), in a daemon thread."""

    def __init__(self, searcher, limits: Limits, **options):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = create_app(searcher, limits, **options)
        self.server = uvicorn.Server(server_config(app, limits, "127.0.0.1", self.port, "warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Served":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the test server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(searcher):
    with Served(searcher, Limits(max_body_bytes=256 << 10, **FAST)) as srv:
        yield srv


def _head(body_headers: bytes = b"Content-Type: application/json\r\n") -> bytes:
    return b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\n" + body_headers


class Reader(threading.Thread):
    """Reads a socket until EOF, an error or ``limit_s``; records when the server closed it."""

    def __init__(self, sock: socket.socket, limit_s: float = 20.0):
        super().__init__(daemon=True)
        self.sock, self.limit_s, self.data, self.closed_after = sock, limit_s, b"", None

    def run(self) -> None:
        start = time.monotonic()
        self.sock.settimeout(0.5)
        while time.monotonic() - start < self.limit_s:
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                self.closed_after = time.monotonic() - start
                return
            self.data += chunk


def _status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else -1


def _detail(data: bytes) -> str:
    return json.loads(data.split(b"\r\n\r\n", 1)[1])["detail"]


@pytest.mark.parametrize("mib", [2, 64, 256])
def test_a_chunked_body_is_cut_at_the_limit_while_it_streams(served, mib):
    """2, 64 and 256 MiB chunked bodies are cut at the limit while they stream, not read whole."""
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; the server runs in this process
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    reader = Reader(sock)
    reader.start()
    sock.sendall(_head(b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"))
    chunk, sent, start = b"10000\r\n" + b" " * 65536 + b"\r\n", 0, time.monotonic()
    try:
        while sent < mib << 20 and time.monotonic() - start < 30:
            sock.sendall(chunk)
            sent += 65536
    except OSError:  # the server closed the connection: what it should do
        pass
    reader.join(timeout=20)
    sock.close()
    assert _status(reader.data) == 413 and "larger than 262144 bytes" in _detail(reader.data)
    assert reader.closed_after is not None, "the server kept the connection open"
    if mib > 2:  # loopback buffers hold a few MiB; the rest was never accepted
        assert sent < 24 << 20, f"the server accepted {sent >> 20} MiB of a refused body"
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) / 1024
    assert grown_mib < 48, f"peak RSS grew by {grown_mib:.0f} MiB"


def test_a_declared_oversized_body_is_refused_before_it_is_read(served):
    sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
    reader = Reader(sock)
    reader.start()
    sock.sendall(_head(b"Content-Type: application/json\r\nContent-Length: 268435456\r\n\r\n"))
    reader.join(timeout=10)
    sock.close()
    assert _status(reader.data) == 413 and reader.closed_after is not None and reader.closed_after < 5


def test_a_small_chunked_body_is_served(served, searcher):
    def body():
        yield b'{"query": '
        yield json.dumps(QUERIES[0]).encode() + b', "k": 3, "rerank": false}'

    r = httpx.post(served.url + "/search", content=body(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 200
    assert [h["doc_id"] for h in r.json()["results"][0]["hits"]] == [h.doc_id for h in searcher.search(QUERIES[:1], 3)[0]]


def _trickle(sock: socket.socket, stop: threading.Event, byte: bytes = b" ", every_s: float = 0.2) -> None:
    while not stop.wait(every_s):
        try:
            sock.sendall(byte)
        except OSError:
            return


def test_slow_heads_and_bodies_are_cut_off_and_block_nobody(served):
    """8 slow-header and 4 slow-body connections are cut off, and block no other client."""
    stop, conns = threading.Event(), []
    try:
        for i in range(12):
            sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
            if i < 8:  # a head that never ends: one more header byte every 0.2 s
                sock.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                byte = b"a"
            else:  # a whole head, then a body one byte every 0.2 s
                sock.sendall(_head(b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"))
                byte = b" "
            reader = Reader(sock)
            reader.start()
            threading.Thread(target=_trickle, args=(sock, stop, byte), daemon=True).start()
            conns.append((sock, reader))
        idle = socket.create_connection(("127.0.0.1", served.port), timeout=10)  # says nothing at all
        idle_reader = Reader(idle)
        idle_reader.start()
        # Meanwhile an ordinary client is served at once.
        t = time.monotonic()
        ok = httpx.post(served.url + "/search", json={"query": QUERIES[1], "k": 2, "rerank": False}, timeout=30)
        assert ok.status_code == 200 and time.monotonic() - t < 5
        for sock, reader in conns + [(idle, idle_reader)]:
            reader.join(timeout=15)
    finally:
        stop.set()
    for i, (sock, reader) in enumerate(conns):
        sock.close()
        assert reader.closed_after is not None and reader.closed_after < 6, (i, reader.closed_after)
        assert _status(reader.data) == 408, (i, reader.data[:200])
        assert ("request head" if i < 8 else "request body") in _detail(reader.data)
    idle.close()
    assert idle_reader.closed_after is not None and idle_reader.closed_after < 6 and idle_reader.data == b""


def test_error_answers_never_echo_the_input(served):
    """An error answer (422) never echoes the input (an 8 MiB input must not come back whole)."""
    big = "river " * 40_000  # 240 kB, inside the body limit, far over the query length limit
    cases = [{"query": big}, {"queries": [big] * 1}, {"query": "river", big[:100_000]: 1},
             {"queries": list(range(64))}, {"query": "river", "k": big}]
    for body in cases:
        r = httpx.post(served.url + "/search", json=body, timeout=30)
        assert r.status_code == 422 and len(r.content) < 4096, (r.status_code, len(r.content))
        assert r.text.count("river") < 20 and r.json()["detail"]  # at most a short prefix of a field name
    broken = httpx.post(served.url + "/search", content=b'{"query": "' + big.encode(),
                        headers={"content-type": "application/json"}, timeout=30)
    assert broken.status_code == 422 and len(broken.content) < 4096
    # JSON nested deeper than the parser goes is malformed JSON too: 422, as docs/query.md says
    nested = httpx.post(served.url + "/search", content=b'{"query": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                        headers={"content-type": "application/json"}, timeout=30)
    assert nested.status_code == 422 and "nested too deeply" in nested.text and len(nested.content) < 4096
    assert httpx.get(served.url + "/search", timeout=30).status_code == 405  # other HTTP errors keep their codes


def test_cost_budget_per_request(searcher):
    limits = Limits(max_hits=100, max_rerank_pairs=50, **FAST)
    with Served(searcher, limits) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        over = c.post("/search", json={"queries": QUERIES[:6] + QUERIES[:5], "k": 10, "rerank": False})
        assert over.status_code == 422 and "11 queries x k 10 = 110 hits" in over.json()["detail"]
        assert c.post("/search", json={"queries": QUERIES[:5] * 2, "k": 10, "rerank": False}).status_code == 200
        deep = c.post("/search", json={"query": QUERIES[0], "rerank": True, "rerank_depth": 51})
        assert deep.status_code == 422 and "cross-encoder pairs" in deep.json()["detail"]
        default_depth = c.post("/search", json={"query": QUERIES[0], "rerank": True})  # depth max(k, 100)
        assert default_depth.status_code == 422
        assert c.post("/search", json={"query": QUERIES[0], "rerank": True, "rerank_depth": 50}).status_code == 200
    with Served(searcher, Limits(max_response_bytes=1500, **FAST)) as srv:
        big = httpx.post(srv.url + "/search", json={"queries": QUERIES[:4], "k": 10, "rerank": False}, timeout=30)
        assert big.status_code == 422 and "bytes" in big.json()["detail"] and len(big.content) < 1000
        small = httpx.post(srv.url + "/search", json={"query": QUERIES[0], "k": 1, "rerank": False}, timeout=30)
        assert small.status_code == 200


def test_overload_is_answered_503_at_once(searcher):
    """More queued queries than allowed: refused with 503 + Retry-After at once; whoever is served is
    served right; nothing else goes wrong."""
    limits = Limits(max_pending_queries=64, queue_timeout_s=0.01, **FAST)
    answers, lock = [], threading.Lock()
    with Served(searcher, limits) as srv:
        go = threading.Barrier(12)

        def client(i):
            batch = [QUERIES[(i + j) % len(QUERIES)] + f" {'river ' * (j % 7)}" for j in range(64)]
            with httpx.Client(timeout=60) as c:
                go.wait()
                t = time.monotonic()
                r = c.post(srv.url + "/search", json={"queries": batch, "k": 5, "rerank": False})
                with lock:
                    answers.append((r, time.monotonic() - t, batch))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        health = httpx.get(srv.url + "/health").json()
    statuses = sorted(r.status_code for r, _, _ in answers)
    assert len(answers) == 12 and set(statuses) <= {200, 503} and 503 in statuses, statuses
    for r, seconds, batch in answers:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1" and r.json()["detail"]
            if "are waiting" in r.json()["detail"]:
                assert seconds < 2, seconds  # refused at once, not after queueing
    refused = health["refused"]
    assert refused["queue_full"] + refused["waited_too_long"] == statuses.count(503)
    served = [(r, batch) for r, _, batch in answers if r.status_code == 200]
    for r, batch in served:
        lib = searcher.search(batch, 5)
        assert [[h["doc_id"] for h in o["hits"]] for o in r.json()["results"]] == [[h.doc_id for h in x] for x in lib]


def test_connections_beyond_the_limit_are_answered_503(searcher):
    def post():
        return httpx.post(srv.url + "/search", json={"query": QUERIES[0], "k": 1, "rerank": False}, timeout=30)

    def first(status: int) -> int:
        deadline = time.monotonic() + 10
        while (code := post().status_code) != status and time.monotonic() < deadline:
            time.sleep(0.05)
        return code

    with Served(searcher, Limits(max_connections=4, header_timeout_s=30)) as srv:
        idle = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(4)]
        try:
            assert first(503) == 503  # once the server holds the 4 idle connections
        finally:
            for s in idle:
                s.close()
        assert first(200) == 200  # and serves again when they are gone


def test_a_request_head_over_16_kib_is_refused_and_the_service_goes_on(served):
    big = "x" * (20 << 10)
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as s:
        s.sendall(f"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n".encode())
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    status = int(got.split(b" ", 2)[1])
    assert status == 431 and len(got) < 4096  # refused, closed, nothing echoed
    ok = httpx.get(served.url + "/health", headers={"X-Fine": "y" * (8 << 10)}, timeout=10)
    assert ok.status_code == 200 and ok.json()["refused"]["head_too_large"] >= 1


@pytest.mark.parametrize("content, env, message", [
    ("short-token", None, "shorter than 16"),
    ("   \n", None, "is empty"),
    (None, "short", "shorter than 16"),
])
def test_weak_or_empty_admin_tokens_are_refused(tmp_path, monkeypatch, content, env, message):
    from densebeam.index_store.query.serve import ADMIN_TOKEN_ENV, read_admin_token

    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    path = None
    if content is not None:
        path = tmp_path / "token"
        path.write_text(content)
    if env is not None:
        monkeypatch.setenv(ADMIN_TOKEN_ENV, env)
    with pytest.raises(ValueError, match=message):
        read_admin_token(str(path) if path else None)


def test_admin_is_off_without_a_token_and_on_with_a_long_one(tmp_path, monkeypatch):
    from densebeam.index_store.query.serve import ADMIN_TOKEN_ENV, read_admin_token

    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    assert read_admin_token(None) is None
    (tmp_path / "token").write_text("  a-long-random-token-0123456789\n")
    assert read_admin_token(str(tmp_path / "token")) == "a-long-random-token-0123456789"


def test_serve_refuses_a_forged_bundle_at_start_with_a_message(searcher, tmp_path):
    """``densebeam serve`` proves its first version as a reload does: a hash-consistent corrupt bundle
    (one byte of index.faiss's list table changed, the manifest's hashes recomputed) ends the process
    with exit 2 and a message naming the file, never a signal; and a weak admin token file ends it
    with a message before anything is opened."""
    import hashlib
    import shutil
    import subprocess
    import sys

    from densebeam.index_store.artifacts.bundle import BundleError, open_bundle

    root = tmp_path / "forged"
    original = (Path(searcher.bundle.root) / "index.faiss").read_bytes()
    for pos in range(len(original) - 1, len(original) - 200, -1):  # the list table at the file's end
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(searcher.bundle.root, root)
        data = bytearray(original)
        data[pos] ^= 0x40
        (root / "index.faiss").write_bytes(bytes(data))
        manifest = json.loads((root / "manifest.json").read_text())
        for entry in manifest["files"]:
            if entry["path"] == "index.faiss":
                entry.update(size=len(data), sha256=hashlib.sha256(bytes(data)).hexdigest())
        (root / "manifest.json").write_text(json.dumps(manifest))
        try:
            open_bundle(str(root)).close()
        except BundleError:
            break  # a flip the reader refuses: now through the service's start
    else:
        raise AssertionError("no flip in the last 200 bytes of index.faiss was refused")
    base = [sys.executable, "-m", "densebeam.pipelines.cli", "serve", "--host", "127.0.0.1",
            "--port", str(free_port())]
    done = subprocess.run(base + ["--index", str(root)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stderr[-2000:]  # an error exit with a message, not a signal
    assert "index.faiss" in done.stderr and "refused" in done.stderr and "Traceback" not in done.stderr
    (tmp_path / "token").write_text("short")
    weak = subprocess.run(base + ["--index", searcher.bundle.root, "--admin-token-file", str(tmp_path / "token")],
                          capture_output=True, text=True, timeout=180)
    assert weak.returncode != 0 and weak.returncode > 0 and "shorter than 16" in weak.stderr
