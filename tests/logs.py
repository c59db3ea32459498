"""A structlog-like logger for tests that keeps what it was given, to be read back."""

from __future__ import annotations

import json
from pathlib import Path
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


def json_lines(path: Path) -> list[dict]:
    """The JSON records of a process's log file (lines that are not JSON are skipped)."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out
