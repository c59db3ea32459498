"""A verdict's row: the columns of the `verdicts` table, and the journal line that carries one.

record() writes a row as one journal line (journal_line); the store inserts lines, parsed by
SQLite itself, or, for a line SQLite's JSON does not take, by row_from_line in Python.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from linewatch.wire import Verdict

# the columns of a row, in table order (the CLI's export writes them in this order too)
COLUMNS = ("id", "run_id", "seq", "camera", "frame_id", "part_id", "capture_ts", "verdict_ts", "verdict",
           "reason", "score", "threshold", "bank_id", "backend", "latency_s", "objects", "branch_scores",
           "pictures")
JSON_COLUMNS = ("objects", "branch_scores")  # stored as JSON text (JSON values inside a journal line)


def _json_default(value: Any) -> Any:
    """numpy values in objects / branch scores as plain JSON numbers and lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


# built once (json.dumps with arguments builds an encoder per call): the JSON columns' text, as
# json.dumps writes it, and the journal line around them
_COLUMN_ENCODER = json.JSONEncoder(default=_json_default)
_LINE_ENCODER = json.JSONEncoder(default=_json_default, separators=(",", ":"))


def journal_line(verdict: Verdict, verdict_ts: float, pictures: str | None) -> bytes:
    """A verdict's row as one journal line: a JSON array of the COLUMNS in order (an array: a
    third shorter and quicker to encode than an object), objects and branch_scores already as
    the JSON text stored in their columns, so the background thread only parses the line."""
    return (_LINE_ENCODER.encode([
        verdict.id, verdict.run_id, verdict.seq, verdict.camera, verdict.frame_id, verdict.part_id,
        verdict.capture_ts, verdict_ts, verdict.verdict, verdict.reason, verdict.score, verdict.threshold,
        verdict.bank_id, verdict.backend, verdict.latency_s, _COLUMN_ENCODER.encode(verdict.objects),
        _COLUMN_ENCODER.encode(verdict.branch_scores or {}), pictures]) + "\n").encode()


def row_from_line(line: bytes) -> tuple[Any, ...]:
    """A journal line back into a row (COLUMNS order). ValueError naming what is wrong."""
    row = json.loads(line)
    if not isinstance(row, list) or len(row) != len(COLUMNS):
        raise ValueError(f"not a row of {len(COLUMNS)} columns: {line[:80]!r}")
    for column, value in zip(COLUMNS, row):
        if isinstance(value, (list, dict)) or (column in JSON_COLUMNS and not isinstance(value, str)):
            raise ValueError(f"{column}: not what the journal writes: {str(value)[:80]}")
    return tuple(row)
