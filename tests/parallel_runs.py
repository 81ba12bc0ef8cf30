"""How the suite shares a machine's cores between pytest-xdist workers (pytest.ini runs ``-n auto --dist
loadfile``: each test module stays on one worker, so module fixtures are built once).

- **Order**: modules holding ``slow`` tests are handed out first and modules holding ``timing`` tests last,
  so the workers finish together instead of one running the Flink cluster alone at the end, and the
  timing tests mostly run when the other workers have nothing left.
- **Turns**: a ``timing`` test asserts a wall-clock bound (an error within 2 s, a refusal "at once"), so it
  runs while no other test runs on any worker: every test takes a shared lock on a file, a timing test an
  exclusive one, with a turnstile lock in front so that a waiting timing test is not starved by the
  other worker's next tests. Consecutive timing tests of one worker keep the lock between them.
- **Caches**: each worker gets its own ``DENSEBEAM_CACHE_DIR``, as a one-process run has its own: a
  precision remembered by one worker's test does not change what another worker's test measures.

With ``-n 0`` (one process) nothing here changes how tests run, except the order."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

TURNS_ENV = "DENSEBEAM_TEST_TURNS"  # the run's lock folder, made by the controlling process
OWN_CACHE_ENV = "DENSEBEAM_TEST_CACHE"  # the cache folder the suite made (not one the user gave)


def worker() -> str | None:
    return os.environ.get("PYTEST_XDIST_WORKER")


def own_cache_dir() -> None:
    """A fresh ``DENSEBEAM_CACHE_DIR`` for this process unless the user set one (removed at exit).
    Workers inherit the controlling process's folder, so they make their own."""
    given = os.environ.get("DENSEBEAM_CACHE_DIR")
    if given and given != os.environ.get(OWN_CACHE_ENV):
        return
    import atexit
    import shutil

    path = tempfile.mkdtemp(prefix="densebeam-test-cache-")
    os.environ["DENSEBEAM_CACHE_DIR"] = os.environ[OWN_CACHE_ENV] = path
    atexit.register(shutil.rmtree, path, True)


def make_turns_dir() -> None:
    """In the controlling process (the workers inherit its environment): the folder of the lock files."""
    if worker() is None and TURNS_ENV not in os.environ:
        import atexit
        import shutil

        path = tempfile.mkdtemp(prefix="densebeam-test-turns-")
        os.environ[TURNS_ENV] = path
        atexit.register(shutil.rmtree, path, True)


def order(items: list) -> None:
    """In place, stable: modules with ``slow`` tests first, modules with ``timing`` tests last; every worker
    collects the same order (xdist checks), and a module's tests keep theirs."""
    slow, timing = set(), set()
    for item in items:
        if item.get_closest_marker("slow"):
            slow.add(item.path)
        if item.get_closest_marker("timing"):
            timing.add(item.path)
    items.sort(key=lambda item: 2 if item.path in timing else 0 if item.path in slow else 1)


class Turns:
    """The locks of one worker (see the module's docstring)."""

    def __init__(self, folder: str):
        self.turnstile = os.open(Path(folder) / "turnstile", os.O_RDWR | os.O_CREAT, 0o600)
        self.room = os.open(Path(folder) / "room", os.O_RDWR | os.O_CREAT, 0o600)
        self.alone = False

    def enter(self, timing: bool) -> None:
        if timing:
            if not self.alone:
                fcntl.flock(self.turnstile, fcntl.LOCK_EX)  # no new test starts on another worker
                fcntl.flock(self.room, fcntl.LOCK_EX)  # the ones running there have ended
                self.alone = True
            return
        self.release()
        fcntl.flock(self.turnstile, fcntl.LOCK_EX)
        fcntl.flock(self.room, fcntl.LOCK_SH)
        fcntl.flock(self.turnstile, fcntl.LOCK_UN)

    def leave(self, keep_alone: bool) -> None:
        if self.alone and keep_alone:
            return
        self.release()

    def release(self) -> None:
        fcntl.flock(self.room, fcntl.LOCK_UN)
        if self.alone:
            fcntl.flock(self.turnstile, fcntl.LOCK_UN)
            self.alone = False
