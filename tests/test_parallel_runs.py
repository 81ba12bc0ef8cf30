"""The suite's own sharing of cores between pytest-xdist workers (tests/parallel_runs.py): a timing test
runs alone, waiting for the tests running elsewhere and holding new ones back; ordinary tests share."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

from parallel_runs import Turns, order

WAIT = 10  # seconds a turn that is due may take to arrive; a turn that is not due is watched for 0.3 s


def _enter(turns: Turns, timing: bool) -> threading.Event:
    """``turns.enter(timing)`` on a thread (as another worker would); the event is set once it returned."""
    entered = threading.Event()
    threading.Thread(target=lambda: (turns.enter(timing), entered.set()), daemon=True).start()
    return entered


def test_a_timing_test_waits_for_running_tests_and_holds_new_ones_back(tmp_path):
    a, b = Turns(str(tmp_path)), Turns(str(tmp_path))  # two workers
    a.enter(timing=False)
    timed = _enter(b, timing=True)
    assert not timed.wait(0.3), "the timing test started beside a running test"
    a.leave(keep_alone=False)
    assert timed.wait(WAIT)
    after = _enter(a, timing=False)  # the other worker's next test
    assert not after.wait(0.3), "a test started beside a timing test"
    b.leave(keep_alone=False)
    assert after.wait(WAIT)
    a.leave(keep_alone=False)


def test_a_waiting_timing_test_is_not_starved_by_the_other_workers_next_tests(tmp_path):
    a, b = Turns(str(tmp_path)), Turns(str(tmp_path))
    a.enter(timing=False)
    timed = _enter(b, timing=True)
    assert not timed.wait(0.3)
    a.leave(keep_alone=False)
    nxt = _enter(a, timing=False)  # queued behind the timing test, not beside it
    assert timed.wait(WAIT) and not nxt.wait(0.3)
    b.leave(keep_alone=False)
    assert nxt.wait(WAIT)
    a.leave(keep_alone=False)


def test_consecutive_timing_tests_keep_the_machine_and_ordinary_tests_share_it(tmp_path):
    a, b, c = (Turns(str(tmp_path)) for _ in range(3))
    b.enter(timing=True)
    b.leave(keep_alone=True)  # the worker's next test is a timing test too
    other = _enter(a, timing=False)
    assert not other.wait(0.3), "a test slipped in between two timing tests"
    b.enter(timing=True)  # holds already: no deadlock with itself
    b.leave(keep_alone=False)
    assert other.wait(WAIT)
    assert _enter(c, timing=False).wait(WAIT), "two ordinary tests could not run together"
    a.leave(keep_alone=False)
    c.leave(keep_alone=False)


def test_slow_modules_go_first_timing_modules_last_and_each_module_keeps_its_order():
    def item(module: str, name: str, *marks: str):
        return SimpleNamespace(path=Path(module), name=name,
                               get_closest_marker=lambda m, marks=marks: m if m in marks else None)

    items = [item("a", "a1"), item("t", "t1", "timing"), item("t", "t2"), item("s", "s1"),
             item("s", "s2", "slow"), item("a", "a2"), item("b", "b1")]
    order(items)
    assert [i.name for i in items] == ["s1", "s2", "a1", "a2", "b1", "t1", "t2"]
