"""Bounded waiting for state that lives in another process (a `linewatch serve`, Prometheus).

Inside this process, tests wait on events, conditions and fake clocks. Another process gives
no such hook: the only way to see that Prometheus has scraped, or that a daemon answers
/readyz, is to ask again. `wait_until` is that loop, in one place: it asks every `poll_s`,
gives up after `timeout_s` (generous: a loaded CI machine is slow, never wrong), and reports
what it was waiting for. Nothing here measures how long anything took.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(probe: Callable[[], T], timeout_s: float, poll_s: float = 0.05) -> T:
    """Call `probe` until it returns something truthy, and return that; the last (falsy)
    value after `timeout_s`. `probe` may raise to abort (a process that died, say)."""
    end = time.monotonic() + timeout_s
    while True:
        value = probe()
        if value or time.monotonic() >= end:
            return value
        time.sleep(poll_s)
