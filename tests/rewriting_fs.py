"""A real local filesystem under the fsspec protocol ``rewritefs://`` that rewrites one file just
before its N-th open: how a test makes a corpus file change between the passes of a run (the duplicate-id
pass and the parse pass each open every piece) without any hook in the product code."""

from __future__ import annotations

import os
import threading

import fsspec
from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "rewritefs"


class RewritingFileSystem(LocalFileSystem):
    protocol = (PROTOCOL,)
    root_marker = "/"
    plan: dict = {}  # OS path -> {"open": N, "content": bytes, "opens": count}
    _lock = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith(PROTOCOL + "://"):
            path = path[len(PROTOCOL) + 3:]
        return LocalFileSystem._strip_protocol(path)

    def unstrip_protocol(self, name: str) -> str:
        return f"{PROTOCOL}://{self._strip_protocol(name)}"

    def _open(self, path, mode="rb", **kwargs):
        p = self._strip_protocol(path)
        with self._lock:
            job = self.plan.get(p)
            if job is not None and "r" in mode:
                job["opens"] += 1
                if job["opens"] == job["open"]:
                    tmp = p + ".rewrite"
                    with open(tmp, "wb") as f:
                        f.write(job["content"])
                    os.replace(tmp, p)
        return super()._open(path, mode=mode, **kwargs)


def rewrite_before_open(path: str, nth_open: int, content: bytes) -> str:
    """Register the rewrite; returns the file's ``rewritefs://`` URL."""
    fsspec.register_implementation(PROTOCOL, RewritingFileSystem, clobber=True)
    RewritingFileSystem.plan[os.path.abspath(path)] = {"open": nth_open, "content": content, "opens": 0}
    return f"{PROTOCOL}://{os.path.abspath(path)}"
