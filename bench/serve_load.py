"""Load test for ``densebeam serve`` (localhost only, bounded in time and count): many concurrent clients
for a fixed time, a mix of valid and invalid requests, every valid answer checked against the library
API, plus one slow client trickling a request body the whole time.

    .venv/bin/python bench/serve_load.py --index out/sample-index [--seconds 20 --clients 32]

Prints requests/s, p50/p95/p99 latency, status counts, 5xx and wrong answers (both must be 0).
The same load generator runs in tests/test_load.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
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
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: str, port: int, extra: tuple = ()) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "densebeam.pipelines.cli", "serve", "--index", index, "--host",
                             "127.0.0.1", "--port", str(port), *extra], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not become healthy in 120 s")


def slow_client(port: int, stop: threading.Event, result: dict) -> None:
    """Announces a 1,000-byte body and sends one byte every 0.2 s until told to stop."""
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
        result["slow_bytes_sent"] = sent


def run_load(port: int, queries: list[str], check: Callable[[str, int, list], Optional[str]],
             seconds: float = 10.0, clients: int = 16, invalid_share: float = 0.3,
             max_requests: int = 100_000, seed: int = 0, during: Optional[Callable[[], None]] = None) -> dict:
    """Drive the server; ``check(query, k, hits)`` returns None when an answer is right, else why not."""
    import httpx

    url = f"http://127.0.0.1:{port}/search"
    lock = threading.Lock()
    stats = {"status": {}, "latencies_ms": [], "wrong": [], "errors": [], "requests": 0}
    stop_at = time.monotonic() + seconds

    def client(i: int):
        rng = random.Random(seed * 1000 + i)
        with httpx.Client(timeout=30) as http:
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
                t = time.perf_counter()
                try:
                    r = http.post(url, content=body, headers={"content-type": "application/json"})
                except httpx.HTTPError as err:
                    with lock:
                        stats["errors"].append(repr(err))
                    continue
                ms = (time.perf_counter() - t) * 1000
                why = None
                if query is not None and r.status_code == 200:
                    why = check(query, k, r.json()["results"][0]["hits"])
                with lock:
                    stats["status"][r.status_code] = stats["status"].get(r.status_code, 0) + 1
                    if query is not None:
                        stats["latencies_ms"].append(ms)
                        if r.status_code != 200:
                            stats["wrong"].append(f"{query!r}: status {r.status_code}")
                    elif r.status_code < 400 or r.status_code >= 500:
                        stats["wrong"].append(f"invalid request answered {r.status_code}")
                    if why:
                        stats["wrong"].append(why)

    stop_slow, slow = threading.Event(), {}
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    slow_thread = threading.Thread(target=slow_client, args=(port, stop_slow, slow))
    start = time.monotonic()
    slow_thread.start()
    for t in threads:
        t.start()
    if during:
        time.sleep(seconds / 2)
        during()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    stop_slow.set()
    slow_thread.join()
    lat = np.asarray(stats["latencies_ms"]) if stats["latencies_ms"] else np.zeros(1)
    return {"requests": sum(stats["status"].values()), "seconds": round(elapsed, 2),
            "requests_per_s": round(sum(stats["status"].values()) / elapsed, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p95_ms": round(float(np.percentile(lat, 95)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1), "status": stats["status"],
            "server_errors": sum(n for s, n in stats["status"].items() if s >= 500),
            "wrong": stats["wrong"][:20], "n_wrong": len(stats["wrong"]), "client_errors": stats["errors"][:5],
            "slow_client_bytes": slow.get("slow_bytes_sent", 0)}


def library_checker(index: str, queries: list[str], precision: str):
    """Expected answers from the library API, for every query and k."""
    from densebeam.index_store.query.search import Searcher

    s = Searcher.open(index, precision=precision)
    want = {q: hits for q, hits in zip(queries, s.search(queries, 10))}

    def check(query, k, hits):
        exp = [h.doc_id for h in want[query][:k]]
        got = [h["doc_id"] for h in hits]
        return None if got == exp else f"{query!r} k={k}: got {got}, want {exp}"

    return check


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True)
    p.add_argument("--queries", default=os.path.join(REPO, "data", "sample", "queries.jsonl"))
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--precision", default="fp32")
    args = p.parse_args()
    queries = [json.loads(line)["text"] for line in open(args.queries, encoding="utf-8")]
    port = free_port()
    server = start_server(args.index, port, ("--precision", args.precision))
    try:
        res = run_load(port, queries, library_checker(args.index, queries, args.precision),
                       seconds=args.seconds, clients=args.clients)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
