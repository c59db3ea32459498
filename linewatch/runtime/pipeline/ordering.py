"""Per-key release order for work that finishes in any order.

Ingest decodes frames in a pool of threads: two messages of one camera can finish decoding in
either order, but their frames (and their `error` answers) must reach the pipeline in the order
they came off the socket, or one camera's verdicts come out shuffled. `PerKeyOrder` hands out a
ticket per message in arrival order (on the single receive thread of the socket) and releases
the finished results of each key strictly in ticket order; keys do not wait for each other.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable


class PerKeyOrder:
    """ticket(key) in arrival order; finish(key, ticket, release) calls `release` once every
    earlier ticket of that key has been released. Each ticket must be finished exactly once,
    or the key's later results wait for it. Releases of one key run one at a time, on whichever
    finishing thread found them ready, outside the lock."""

    def __init__(self, on_failure: Callable[[], None] | None = None) -> None:
        """on_failure: called (inside the except block) when a release raises; the order goes on."""
        self._on_failure = on_failure
        self._lock = threading.Lock()
        self._next_ticket: dict[Hashable, int] = {}
        self._next_release: dict[Hashable, int] = {}
        self._ready: dict[Hashable, dict[int, Callable[[], None]]] = {}
        self._releasing: set[Hashable] = set()

    def ticket(self, key: Hashable) -> int:
        with self._lock:
            n = self._next_ticket.get(key, 0)
            self._next_ticket[key] = n + 1
            return n

    def finish(self, key: Hashable, ticket: int, release: Callable[[], None]) -> None:
        with self._lock:
            self._ready.setdefault(key, {})[ticket] = release
            if key in self._releasing:  # the releasing thread will find it
                return
            self._releasing.add(key)
        while True:
            with self._lock:
                n = self._next_release.get(key, 0)
                fn = self._ready[key].pop(n, None)
                if fn is None:
                    self._releasing.discard(key)
                    if n == self._next_ticket.get(key):  # nothing outstanding: forget the key
                        del self._next_ticket[key], self._ready[key]
                        self._next_release.pop(key, None)
                    return
                self._next_release[key] = n + 1
            try:
                fn()
            except Exception:  # noqa: BLE001 - one failed release must not stall the key
                if self._on_failure is not None:
                    self._on_failure()

    def outstanding(self) -> int:
        """Tickets handed out and not yet released, over all keys."""
        with self._lock:
            return sum(self._next_ticket[k] - self._next_release.get(k, 0) for k in self._next_ticket)
