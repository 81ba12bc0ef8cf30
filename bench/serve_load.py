"""Load and attack test for ``densebeam serve`` (localhost only, bounded in time and count).

    .venv/bin/python bench/serve_load.py --index out/sample-index [--seconds 20 --clients 32 --repeat 3]

Serves a copy of ``--index`` from a temporary versioned location at the default precision, then:

1. **load**: ``--clients`` concurrent clients for ``--seconds``, 30% invalid requests, one slow client
   trickling a body; every valid answer is compared with the library API asking that one query alone
   (doc ids *and* scores, exact float equality). Halfway through, a new version (a copy of the bundle
   whose pages are evicted from the page cache, so it starts cold) is published and the service is told
   to reload; latency is reported for the ``--window`` seconds before the reload, during it, and after
   the swap.
2. **attack**: chunked bodies of 2/64/256 MiB, a declared 256 MiB body, slow heads and bodies, an idle
   connection, inputs a careless service echoes, requests over the cost budget, /admin without or with a
   wrong token and a brute force of it, a burst of work over the queue bound. Each case has an expected
   answer; the report counts cases tried, 5xx answers, unexpected answers, connections left open and the
   server's memory.

Prints one JSON object (with ``--repeat``, every run and the median of each figure). The same load
generator runs in tests/test_load.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

INVALID = [
    (b'{"query": ""}', "empty query"),
    (b'{"query": "x", "k": 0}', "k too small"),
    (b'{"query": "x", "k": 100000}', "k too large"),
    (b'{"query": "' + b"a" * 5000 + b'"}', "query too long"),
    (b'{"queries": []}', "no queries"),
    (json.dumps({"queries": ["q"] * 500}).encode(), "too many queries"),
    (b'{"query": 42}', "wrong type"),
    (b'{"query": "x", "rerank_depth": 999999}', "depth too large"),
    (b'{"query": "x"', "bad JSON"),
    (b'not json at all', "not JSON"),
    (b'{"query": "x", "bogus": 1}', "unknown field"),
    (json.dumps({"queries": ["q"] * 64, "k": 1000}).encode(), "over the cost budget"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: str, port: int, extra: tuple = (), env: Optional[dict] = None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "densebeam.pipelines.cli", "serve", "--index", index, "--host",
                             "127.0.0.1", "--port", str(port), *extra], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become healthy in 180 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def server_memory_mib(pid: int) -> dict:
    """The server's resident memory now and at its peak (VmRSS, VmHWM), MiB."""
    out = {}
    with open(f"/proc/{pid}/status", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = round(int(value.split()[0]) / 1024, 1)
    return out


def slow_client(port: int, stop: threading.Event, result: dict) -> None:
    """Announces a 1,000-byte body and sends one byte every 0.2 s until told to stop or cut off."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n")
        sent = 0
        while not stop.wait(0.2) and sent < 999:
            try:
                s.sendall(b" ")
            except OSError:
                break
            sent += 1
        s.settimeout(1)
        try:
            result["slow_client_answer"] = s.recv(200).split(b"\r\n", 1)[0].decode(errors="replace")
        except OSError:
            result["slow_client_answer"] = None
        result["slow_bytes_sent"] = sent


def _window(samples: list, lo: float, hi: float) -> dict:
    lat = [ms for t, ms in samples if lo <= t < hi]
    if not lat:
        return {"n": 0}
    return {"n": len(lat), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p95_ms": round(float(np.percentile(lat, 95)), 1), "max_ms": round(max(lat), 1)}


def run_load(port: int, queries: list[str], check: Callable[[str, int, list], Optional[str]],
             seconds: float = 10.0, clients: int = 16, invalid_share: float = 0.3,
             max_requests: int = 100_000, seed: int = 0, during: Optional[Callable[[], None]] = None,
             window_s: float = 2.0) -> dict:
    """Drive the server; ``check(query, k, hits)`` returns None when an answer is right, else why not.

    ``during`` runs once, halfway through (e.g. a reload); its start and end split the latencies into
    before / during / after windows of ``window_s`` seconds.
    """
    import httpx

    url = f"http://127.0.0.1:{port}/search"
    lock = threading.Lock()
    stats = {"status": {}, "samples": [], "wrong": [], "errors": [], "requests": 0, "answers": 0}
    start = time.monotonic()
    stop_at = start + seconds

    def client(i: int):
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < stop_at:
                with lock:
                    if stats["requests"] >= max_requests:
                        return
                    stats["requests"] += 1
                if rng.random() < invalid_share:
                    body, query, k = rng.choice(INVALID)[0], None, None
                else:
                    query, k = rng.choice(queries), rng.choice([1, 5, 10])
                    body = json.dumps({"query": query, "k": k}).encode()
                t = time.monotonic()
                try:
                    r = http.post(url, content=body, headers={"content-type": "application/json"})
                except httpx.HTTPError as err:
                    with lock:
                        stats["errors"].append(repr(err))
                    continue
                ms = (time.monotonic() - t) * 1000
                why = None
                if query is not None and r.status_code == 200:
                    why = check(query, k, r.json()["results"][0]["hits"])
                with lock:
                    stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1
                    if query is not None:
                        stats["samples"].append((t - start, ms))
                        stats["answers"] += r.status_code == 200
                        if r.status_code != 200:
                            stats["wrong"].append(f"{query!r}: status {r.status_code}")
                    elif r.status_code < 400 or r.status_code >= 500:
                        stats["wrong"].append(f"invalid request answered {r.status_code}")
                    if why:
                        stats["wrong"].append(why)

    stop_slow, slow = threading.Event(), {}
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    slow_thread = threading.Thread(target=slow_client, args=(port, stop_slow, slow))
    slow_thread.start()
    for t in threads:
        t.start()
    event = None
    if during:
        time.sleep(seconds / 2)
        t0 = time.monotonic() - start
        during()
        event = (t0, time.monotonic() - start)
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    stop_slow.set()
    slow_thread.join()
    samples = stats["samples"]
    lat = np.asarray([ms for _, ms in samples]) if samples else np.zeros(1)
    n = sum(stats["status"].values())
    out = {"requests": n, "answers_checked": stats["answers"], "seconds": round(elapsed, 2),
           "requests_per_s": round(n / elapsed, 1),
           "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
           "p99_ms": round(float(np.percentile(lat, 99)), 1), "status": stats["status"],
           "server_errors": sum(c for s, c in stats["status"].items() if s >= 500),
           "wrong": stats["wrong"][:20], "n_wrong": len(stats["wrong"]), "client_errors": stats["errors"][:5],
           "slow_client_bytes": slow.get("slow_bytes_sent", 0), "slow_client_answer": slow.get("slow_client_answer")}
    if event:
        out["reload"] = {"seconds": round(event[1] - event[0], 2),
                         "before": _window(samples, event[0] - window_s, event[0]),
                         "during": _window(samples, event[0], event[1]),
                         "after": _window(samples, event[1], event[1] + window_s)}
    return out


def library_checker(index: str, queries: list[str], precision: str = "auto", ks=(1, 5, 10)):
    """Expected answers from the library API, each query asked alone, for every k: doc ids and scores
    must be equal exactly (a tolerance would hide answers that depend on the batch)."""
    from densebeam.index_store.query.search import Searcher

    s = Searcher.open(index, precision=precision)
    want = {(q, k): [(h.doc_id, h.score) for h in s.search([q], k)[0]] for q in queries for k in ks}

    def check(query, k, hits):
        got = [(h["doc_id"], h["score"]) for h in hits]
        return None if got == want[(query, k)] else f"{query!r} k={k}: got {got}, want {want[(query, k)]}"

    return check


# ---------------------------------------------------------------------------------------------- attacks

def _read_answer(sock: socket.socket, limit_s: float) -> tuple[bytes, Optional[float]]:
    """What the server sends until it closes (or ``limit_s``), and when it closed (None: still open)."""
    start, data = time.monotonic(), b""
    sock.settimeout(0.25)
    while time.monotonic() - start < limit_s:
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except OSError:
            chunk = b""
        if not chunk:
            return data, time.monotonic() - start
        data += chunk
    return data, None


def _status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else -1


def _chunked(port: int, mib: int) -> dict:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    got: dict = {}
    reader = threading.Thread(target=lambda: got.update(zip(("data", "closed"), _read_answer(sock, 30))))
    reader.start()
    sock.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n")
    chunk, sent, start = b"10000\r\n" + b" " * 65536 + b"\r\n", 0, time.monotonic()
    try:
        while sent < mib << 20 and time.monotonic() - start < 30:
            sock.sendall(chunk)
            sent += 65536
    except OSError:
        pass
    reader.join(timeout=35)
    sock.close()
    return {"status": _status(got.get("data", b"")), "closed": got.get("closed") is not None,
            "mib_accepted": round(sent / 2**20, 1)}


def _declared(port: int) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 268435456\r\n\r\n")
        data, closed = _read_answer(sock, 10)
    return {"status": _status(data), "closed": closed is not None}


def _slow(port: int, n_head: int, n_body: int, limit_s: float) -> dict:
    """Slow heads (a header byte every 0.2 s) and slow bodies (a body byte every 0.2 s), plus one
    connection that says nothing; how many the server answered 408 and closed within ``limit_s``."""
    stop, socks, results = threading.Event(), [], {}

    def trickle(sock, byte):
        while not stop.wait(0.2):
            try:
                sock.sendall(byte)
            except OSError:
                return

    for i in range(n_head + n_body + 1):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        if i < n_head:
            sock.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            threading.Thread(target=trickle, args=(sock, b"a"), daemon=True).start()
        elif i < n_head + n_body:
            sock.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n")
            threading.Thread(target=trickle, args=(sock, b" "), daemon=True).start()
        socks.append(sock)

    def watch(i, sock):
        results[i] = _read_answer(sock, limit_s)

    watchers = [threading.Thread(target=watch, args=(i, s)) for i, s in enumerate(socks)]
    for w in watchers:
        w.start()
    for w in watchers:
        w.join(timeout=limit_s + 5)
    stop.set()
    for s in socks:
        s.close()
    still_open = sum(1 for data, closed in results.values() if closed is None)
    answered_408 = sum(1 for data, _ in results.values() if _status(data) == 408)
    return {"connections": len(socks), "still_open": still_open, "answered_408": answered_408,
            "closed_after_max_s": round(max((c for _, c in results.values() if c is not None), default=0), 1)}


def attack(port: int, token: str, query: str, slow_limit_s: float = 25.0) -> dict:
    """Every attack case once; each row: what was expected, what came back, whether that was right."""
    import httpx

    url = f"http://127.0.0.1:{port}"
    cases, statuses = [], []

    def case(name, expect, got, ok, codes=(), **extra):
        cases.append({"case": name, "expect": expect, "got": got, "ok": bool(ok), **extra})
        statuses.extend(codes)

    for mib in (2, 64, 256):
        r = _chunked(port, mib)
        case(f"chunked body {mib} MiB", 413, r["status"], r["status"] == 413 and r["closed"] and
             (mib == 2 or r["mib_accepted"] < 32), [r["status"]], mib_accepted=r["mib_accepted"])
    r = _declared(port)
    case("declared 256 MiB body", 413, r["status"], r["status"] == 413 and r["closed"], [r["status"]])
    r = _slow(port, 8, 4, slow_limit_s)
    case("8 slow heads, 4 slow bodies, 1 idle", "408/closed", r, r["still_open"] == 0 and r["answered_408"] == 12)
    big = "river " * 150_000  # 900 kB: inside the body limit, far over the query length limit
    with httpx.Client(base_url=url, timeout=60) as c:
        for name, body in (("900 kB query", {"query": big}), ("900 kB unknown field", {"query": "x", big: 1}),
                           ("900 kB k", {"query": "x", "k": big})):
            r = c.post("/search", json=body)
            case(f"echo: {name}", "422 < 4 kB", [r.status_code, len(r.content)],
                 r.status_code == 422 and len(r.content) < 4096, [r.status_code])
        r = c.post("/search", json={"queries": [query] * 64, "k": 1000})
        case("cost: 64 queries x k 1000", "422 < 4 kB", [r.status_code, len(r.content)],
             r.status_code == 422 and len(r.content) < 4096, [r.status_code])
        r = c.post("/search", json={"queries": [query] * 64, "k": 100})
        case("cost: 64 queries x k 100 (in budget)", "200 <= 8 MiB", [r.status_code, len(r.content)],
             r.status_code == 200 and len(r.content) <= 8 << 20, [r.status_code])
        r = c.post("/admin/reload")
        case("admin: no token", 401, r.status_code, r.status_code == 401, [r.status_code])
        r = c.post("/admin/reload", headers={"Authorization": "Bearer wrong-" + token})
        case("admin: wrong token", 401, r.status_code, r.status_code == 401, [r.status_code])
        codes = [c.post("/admin/reload", headers={"Authorization": f"Bearer guess-{i}"}).status_code
                 for i in range(20)]
        case("admin: 20 guesses", "401 then 429", codes, set(codes) <= {401, 429} and codes[-1] == 429, codes)
        health = c.get("/health")
        case("health has no local path", "no '/'", health.text[:200], "/" not in health.text, [health.status_code])
    # A burst over the queue bound: 24 clients at once, 64 distinct queries each.
    codes, times = [], []
    go = threading.Barrier(24)

    def burst(i):
        with httpx.Client(timeout=120) as c:
            go.wait()
            t = time.monotonic()
            r = c.post(url + "/search", json={"queries": [f"{query} {i} {j}" for j in range(64)], "k": 10})
            codes.append(r.status_code)
            queue_full = r.status_code == 503 and "are waiting" in r.json()["detail"]
            times.append((queue_full, time.monotonic() - t))

    threads = [threading.Thread(target=burst, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    refused_s = [s for queue_full, s in times if queue_full]
    case("burst of 24 x 64 queries", "200 or 503 (queue full: at once)", sorted(codes),
         set(codes) <= {200, 503} and refused_s and max(refused_s) < 2, [c for c in codes if c != 503],
         slowest_queue_full_s=round(max(refused_s, default=0), 2))
    return {"cases": len(cases), "unexpected": sum(not c["ok"] for c in cases),
            "server_errors": sum(1 for code in statuses if code >= 500), "detail": cases}


# ------------------------------------------------------------------------------------------------ main

def _evict(path: str) -> None:
    """Drop a directory's files from the page cache (no root needed): the next reads come from disk."""
    for dirpath, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def synthetic_bundle(work: str, n: int, nlist: int) -> str:
    """A merged bundle of ``n`` synthetic clustered 384-d unit vectors (bench/index_bench.py's recipe)
    labelled as the bundled all-MiniLM-L6-v2, so the service encodes real queries against it: its answers
    mean nothing, its size and latency are those of an ``n``-passage MiniLM bundle. Built once per
    ``work`` dir with ``densebeam index``."""
    import pyarrow.parquet as pq

    from densebeam.index_store.artifacts import embeddings as emb
    from densebeam.index_store.encoding.encoder import DEFAULT_MODEL
    from densebeam.index_store.types import ModelFacts
    from index_bench import DIM, clustered_batches

    bundle, root = os.path.join(work, f"synthetic-{n}"), os.path.join(work, f"synthetic-{n}.embeddings")
    if os.path.exists(os.path.join(bundle, "manifest.json")):
        return bundle
    facts = ModelFacts(model=DEFAULT_MODEL, revision=None, dim=DIM, similarity="cos", dtype="float32",
                       max_seq_length=256, precision="fp32")
    os.makedirs(root, exist_ok=True)
    name = emb.SHARD_PATTERN.format(index=0, count=1)
    writer, row = None, 0
    for x in clustered_batches(n, DIM):
        ids = [f"p{row + j}" for j in range(len(x))]
        table = emb.to_table(facts, ids, x, texts=[f"synthetic passage {i}" for i in ids])
        writer = writer or pq.ParquetWriter(os.path.join(root, name), table.schema)
        writer.write_table(table)
        row += len(x)
    writer.close()
    with open(os.path.join(root, emb.MANIFEST), "w", encoding="utf-8") as f:
        json.dump({"format": emb.FORMAT, "format_version": 1, "model_facts": facts.to_dict(),
                   "shards": [{"path": name, "rows": n}], "counts": {"read": n, "encoded": n, "rejected": 0},
                   "rejected_files": []}, f)
    subprocess.run([sys.executable, "-m", "densebeam.pipelines.cli", "index", "--embeddings", root, "--output",
                    bundle, "--nlist", str(nlist), "--runner", "local", "--overwrite"], cwd=REPO, check=True)
    return bundle


def run_once(index: str, queries: list[str], args, check) -> dict:
    from densebeam.index_store.artifacts import versions

    import httpx

    work = tempfile.mkdtemp(prefix="serve-load-", dir=args.work_dir)
    try:
        loc = os.path.join(work, "loc")
        shutil.copytree(index, os.path.join(loc, "versions", "v1"))
        versions.switch(loc, "v1")
        token = secrets.token_urlsafe(24)
        with open(os.path.join(work, "token"), "w", encoding="utf-8") as f:
            f.write(token)
        port = free_port()
        extra = ("--precision", args.precision, "--admin-token-file", os.path.join(work, "token"),
                 "--warm-bytes", args.warm_bytes)
        server = start_server(loc, port, extra)
        try:
            memory_start = server_memory_mib(server.pid)

            def reload_to_a_cold_copy():
                shutil.copytree(index, os.path.join(loc, "versions", "v2"))
                _evict(os.path.join(loc, "versions", "v2"))
                versions.switch(loc, "v2")
                r = httpx.post(f"http://127.0.0.1:{port}/admin/reload", headers={"Authorization": f"Bearer {token}"},
                               timeout=600)
                assert r.status_code == 200 and r.json()["reloaded"], r.text

            load = run_load(port, queries, check, seconds=args.seconds, clients=args.clients,
                            during=reload_to_a_cold_copy, window_s=args.window)
            time.sleep(2)  # let the admin throttle refill a little; the attack tries its own guesses
            attacks = attack(port, token, queries[0])
            memory_end = server_memory_mib(server.pid)
        finally:
            stop_server(server)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"load": load, "attack": attacks, "server_memory_mib": {"start": memory_start, "end": memory_end}}


def encoding_cost(index: str, queries: list[str], precisions=("fp32", "bf16"), repeat: int = 3,
                  torch_threads: Optional[int] = None) -> dict:
    """What batch-invariant query encoding costs: ms per query encoded one by one (the service's and
    the library's path, :meth:`Searcher.encode_queries`) against one padded batch of all of them (the
    cheaper way, under which a query's vector depends on its batch mates), per precision.
    Every query is encoded twice first (kernels for each length are created on first use). Median of
    ``repeat`` rounds."""
    import torch

    from densebeam.index_store.query.search import Searcher

    if torch_threads:
        torch.set_num_threads(torch_threads)
    searchers = {p: Searcher.open(index, precision=p, verify="sizes") for p in precisions}
    auto = Searcher.open(index, precision="auto", verify="sizes").encoder.precision
    times: dict = {}
    for s in searchers.values():
        for _ in range(2):
            s.encode_queries(queries)
            s.encoder.encode(queries)
    for _ in range(repeat):
        for p, s in searchers.items():
            t = time.perf_counter()
            s.encode_queries(queries)
            times.setdefault((p, "one_by_one"), []).append(time.perf_counter() - t)
            t = time.perf_counter()
            s.encoder.encode(queries)
            times.setdefault((p, "one_batch"), []).append(time.perf_counter() - t)
    out = {}
    for p in searchers:
        one, batch = (statistics.median(times[(p, m)]) * 1000 / len(queries) for m in ("one_by_one", "one_batch"))
        out[p] = {"one_by_one_ms_per_query": round(one, 2), "one_batch_ms_per_query": round(batch, 2),
                  "ratio": round(one / batch, 2)}
    return {"queries": len(queries), "repeat": repeat, "torch_threads": torch.get_num_threads(),
            "auto_is": auto, "cost": out}


def warm_effect(index: str, n_queries: int = 200, budget_bytes: int = 2 << 30, repeat: int = 3) -> dict:
    """Queries/s of the first ``n_queries`` single-query searches (default nprobe) of a bundle opened
    cold (its pages evicted from the page cache, ``verify="sizes"`` so nothing reads it first) against the
    same after :func:`reload.warm`. Median of ``repeat`` rounds; the warm-up's own seconds are reported."""
    from densebeam.index_store.artifacts.bundle import open_bundle
    from densebeam.index_store.query import reload as reload_lib

    import gc

    rng = np.random.default_rng(7)
    rounds = {"cold": [], "warmed": [], "warm_seconds": []}
    bundle = facts = None
    for _ in range(repeat):
        for mode in ("cold", "warmed"):
            bundle = None  # unmapped first: the kernel keeps the pages of a file someone maps
            gc.collect()
            _evict(index)
            bundle = open_bundle(index, verify="sizes")
            facts = {"index_bytes": sum(e["size"] for e in bundle.manifest["files"]),
                     "nprobe": bundle.default_nprobe, "nlist": bundle.searcher.nlist}
            if mode == "warmed":
                rounds["warm_seconds"].append(reload_lib.warm(bundle, budget_bytes)["seconds"])
            q = rng.standard_normal((n_queries, bundle.searcher.d)).astype(np.float32)
            q /= np.linalg.norm(q, axis=1, keepdims=True)
            t = time.perf_counter()
            for row in q:
                bundle.searcher.search(row[None], 10, bundle.default_nprobe)
            rounds[mode].append(n_queries / (time.perf_counter() - t))
    return {**facts, "queries": n_queries, "repeat": repeat,
            "cold_queries_per_s": round(statistics.median(rounds["cold"]), 1),
            "warmed_queries_per_s": round(statistics.median(rounds["warmed"]), 1),
            "warm_seconds": round(statistics.median(rounds["warm_seconds"]), 2),
            "all": {k: [round(v, 2) for v in vs] for k, vs in rounds.items()}}


def _median_of(runs: list[dict]) -> dict:
    pick = {
        "requests_per_s": lambda r: r["load"]["requests_per_s"],
        "answers_checked": lambda r: r["load"]["answers_checked"],
        "p50_ms": lambda r: r["load"]["p50_ms"], "p95_ms": lambda r: r["load"]["p95_ms"],
        "wrong_answers": lambda r: r["load"]["n_wrong"], "load_5xx": lambda r: r["load"]["server_errors"],
        "reload_seconds": lambda r: r["load"]["reload"]["seconds"],
        "before_reload_p50_ms": lambda r: r["load"]["reload"]["before"].get("p50_ms"),
        "before_reload_p95_ms": lambda r: r["load"]["reload"]["before"].get("p95_ms"),
        "during_reload_p50_ms": lambda r: r["load"]["reload"]["during"].get("p50_ms"),
        "after_reload_p50_ms": lambda r: r["load"]["reload"]["after"].get("p50_ms"),
        "after_reload_p95_ms": lambda r: r["load"]["reload"]["after"].get("p95_ms"),
        "attack_cases": lambda r: r["attack"]["cases"], "attack_unexpected": lambda r: r["attack"]["unexpected"],
        "attack_5xx": lambda r: r["attack"]["server_errors"],
        "server_peak_rss_mib": lambda r: r["server_memory_mib"]["end"]["VmHWM"],
    }
    out = {}
    for name, get in pick.items():
        values = [v for v in (get(r) for r in runs) if v is not None]
        out[name] = statistics.median(values) if values else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", default=None, help="a bundle (plain); it is copied, never changed")
    p.add_argument("--synthetic", type=int, default=None, metavar="N",
                   help="instead of --index: a bundle of N synthetic vectors labelled as all-MiniLM-L6-v2 "
                        "(built once in --work-dir), to see latency around a reload of a bigger bundle")
    p.add_argument("--nlist", type=int, default=512, help="IVF lists of the --synthetic bundle")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "densebeam-serve-load"))
    p.add_argument("--queries", action="append", default=None,
                   help="BEIR queries.jsonl (repeatable; default: data/sample/queries.jsonl)")
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--precision", default="auto", help="the service's and the library's (default: auto)")
    p.add_argument("--warm-bytes", default="2GiB", help="the service's --warm-bytes")
    p.add_argument("--window", type=float, default=2.0, help="seconds of latency before and after the reload")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--encoding-cost", action="store_true",
                   help="only measure query encoding: one by one (batch-invariant) against one padded batch")
    p.add_argument("--torch-threads", type=int, default=None, help="with --encoding-cost: torch threads")
    p.add_argument("--warm-effect", action="store_true",
                   help="only measure searches right after opening the bundle cold against after warming it")
    args = p.parse_args()
    if (args.index is None) == (args.synthetic is None):
        p.error("give one of --index or --synthetic")
    if args.synthetic:
        args.index = synthetic_bundle(args.work_dir, args.synthetic, args.nlist)
    files = args.queries or [os.path.join(REPO, "data", "sample", "queries.jsonl")]
    from densebeam.index_store.query.serve import Limits

    queries = list(dict.fromkeys(json.loads(line)["text"] for f in files for line in open(f, encoding="utf-8")
                                 if line.strip()))
    queries = [q for q in queries if len(q) <= Limits().max_query_chars]  # longer ones are invalid (422)
    if args.warm_effect:
        print(json.dumps({"command": " ".join(sys.argv), **warm_effect(args.index, repeat=max(args.repeat, 3))},
                         indent=2))
        return
    if args.encoding_cost:
        print(json.dumps({"command": " ".join(sys.argv), **encoding_cost(
            args.index, queries[:64], repeat=max(args.repeat, 3), torch_threads=args.torch_threads)}, indent=2))
        return
    check = library_checker(args.index, queries, args.precision)
    runs = [run_once(args.index, queries, args, check) for _ in range(args.repeat)]
    print(json.dumps({"command": " ".join(sys.argv), "runs": runs, "median": _median_of(runs)}, indent=2))


if __name__ == "__main__":
    main()
