"""The two clocks the runtime reads, behind one object so that tests can drive them.

`monotonic()` measures intervals (deadlines, batch delays, stage times); `time()` is the wall
clock, seconds since the epoch, the clock of senders' capture timestamps. Code that needs
either takes a `Clock`; production passes SYSTEM_CLOCK, tests a fake one they advance by
hand, so nothing in a test depends on how fast the machine happens to be.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    """The process's real clocks."""

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()

    @staticmethod
    def time() -> float:
        return time.time()


SYSTEM_CLOCK: Clock = SystemClock()
