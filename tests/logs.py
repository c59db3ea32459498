"""A structlog-like logger for tests that keeps what it was given, to be read back."""

from __future__ import annotations

from typing import Any


class ListLog:
    """Keeps every call as (event, fields), in order; `named(event)` gives the fields of each
    call with that event. Any level (info, warning, error, debug, exception) is kept alike."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _add(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    info = warning = error = debug = exception = _add

    def named(self, event: str) -> list[dict[str, Any]]:
        return [fields for e, fields in list(self.events) if e == event]
