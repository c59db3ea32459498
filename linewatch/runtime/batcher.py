"""Micro-batcher: single frames in, batches of at most `max_batch` out.

A batch leaves as soon as it is full, or when its oldest frame has waited `max_delay_ms`
since it reached the batcher, whichever comes first. While the consumer (the first detector
stage) is busy, frames wait in a bounded pending queue; when that is full the shed policy
names one frame that is answered `shed` through a callback: a frame is never dropped
without an answer.

    add(item) --> pending deque (<= max_pending) --> batcher thread --> sink(batch)  (may block)
                        +--> on_shed(item, reason) when full
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Generic, Literal, TypeVar

T = TypeVar("T")

SHED_REASON_FULL = "pending_full"


class Batcher(Generic[T]):
    """Groups items into batches on its own thread.

    sink(batch): called on the batcher thread with 1..max_batch items in arrival order; it
    may block (backpressure), and while it does, items pile up in the pending queue.
    on_shed(item, reason): called for an item that will never reach the sink; it runs on the
    thread that called `add` (policy "newest" or "oldest" on overflow) or `flush_and_stop`.
    """

    def __init__(
        self,
        max_batch: int,
        max_delay_ms: float,
        max_pending: int,
        shed_policy: Literal["oldest", "newest"],
        sink: Callable[[list[T]], None],
        on_shed: Callable[[T, str], None],
        name: str = "batcher",
    ) -> None:
        if max_batch < 1 or max_pending < 1:
            raise ValueError("max_batch and max_pending must be >= 1")
        if shed_policy not in ("oldest", "newest"):
            raise ValueError(f"shed_policy must be 'oldest' or 'newest', got {shed_policy!r}")
        self.max_batch = max_batch
        self.max_delay_s = max_delay_ms / 1000.0
        self.max_pending = max_pending
        self.shed_policy = shed_policy
        self._sink = sink
        self._on_shed = on_shed
        self._pending: deque[tuple[float, T]] = deque()  # (arrival monotonic, item)
        self._cond = threading.Condition()
        self._stopping = False
        self._flush = False  # send what is pending without waiting for max_delay
        self._busy = False  # the thread holds a batch not yet accepted by the sink
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # ------------------------------------------------------------------ public

    def start(self) -> None:
        """Start the batcher thread."""
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        """The batcher thread (for liveness checks)."""
        return self._thread

    def depth(self) -> int:
        """Items waiting for a batch."""
        return len(self._pending)

    def idle(self) -> bool:
        """True when nothing is pending and no batch is being handed to the sink."""
        with self._cond:
            return not self._pending and not self._busy

    def add(self, item: T) -> bool:
        """Queue one item; never blocks on the consumer.

        Returns False when `item` itself was shed (policy "newest" with a full queue, or the
        batcher is stopping); True when it was queued (possibly shedding the oldest waiting
        item instead).
        """
        shed: T | None = None
        reason = SHED_REASON_FULL
        with self._cond:
            if self._stopping:
                shed, reason = item, "shutting_down"
            elif len(self._pending) >= self.max_pending:
                if self.shed_policy == "newest":
                    shed = item
                else:
                    shed = self._pending.popleft()[1]
                    self._pending.append((time.monotonic(), item))
            else:
                self._pending.append((time.monotonic(), item))
                self._cond.notify()
        # The callback runs outside the lock: it takes the pipeline's own lock.
        if shed is not None:
            self._on_shed(shed, reason)
            return shed is not item
        return True

    def flush(self) -> None:
        """From now on, send pending items at once instead of waiting for company (drain)."""
        with self._cond:
            self._flush = True
            self._cond.notify()

    def stop(self, timeout_s: float = 5.0) -> list[T]:
        """Stop the thread; returns the items that never reached the sink (caller answers them)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        with self._cond:
            left = [item for _, item in self._pending]
            self._pending.clear()
        return left

    # ------------------------------------------------------------------ thread

    def _next_batch(self) -> list[T] | None:
        """Wait until a batch is due; None when stopping."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if self._pending:
                    due = self._pending[0][0] + self.max_delay_s
                    wait = due - time.monotonic()
                    if len(self._pending) >= self.max_batch or wait <= 0 or self._flush:
                        n = min(self.max_batch, len(self._pending))
                        self._busy = True
                        return [self._pending.popleft()[1] for _ in range(n)]
                    self._cond.wait(wait)
                else:
                    self._cond.wait(0.5)

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._sink(batch)
            except Exception:
                # The sink must answer its items itself; if it breaks, answer them here so
                # none is lost, and keep batching (answers are idempotent downstream).
                for item in batch:
                    self._on_shed(item, "internal_error")
            finally:
                with self._cond:
                    self._busy = False
