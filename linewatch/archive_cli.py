"""`linewatch archive query` and `linewatch archive export`: read the verdict archive.

Both open the archive read-only (they work while the daemon writes to it: SQLite's WAL lets
readers see the last commit), select verdicts by camera, time range (the time a verdict was
archived) and value, and keep the newest `--limit` of them, printed oldest first. `query`
prints a table (or JSON lines) for a person; `export` writes CSV or a JSON array for other
tools. Errors a user can fix (a bad date, no archive there) print one `linewatch: error:`
line and exit with status 2.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from linewatch.runtime.sinks.archive import COLUMNS, FRAME_SUFFIXES, ArchiveError, open_read_only
from linewatch.wire import VERDICT_VALUES

EXIT_USAGE = 2
DEFAULT_QUERY_LIMIT = 100
# what a record holds beyond the table's columns: the archive time as ISO 8601 (UTC)
EXPORT_FIELDS = ("time", *COLUMNS)


class ArchiveQueryError(ValueError):
    """A filter the user can fix (a date that is not one)."""


def parse_time(text: str, option: str) -> float:
    """Epoch seconds from ISO 8601 (a date-time without a zone is local time) or epoch seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ArchiveQueryError(
            f"{option} {text!r}: not an ISO 8601 date-time (e.g. 2026-11-26T14:30, 2026-11-26T14:30:00+01:00, "
            "2026-11-26) nor epoch seconds") from None
    return moment.timestamp()  # naive: local time


def select(conn: sqlite3.Connection, cameras: list[str] | None = None, verdicts: list[str] | None = None,
           since: float | None = None, until: float | None = None, limit: int | None = None) -> Iterator[dict]:
    """The matching rows as dicts (COLUMNS), oldest first; with `limit`, the newest `limit` of them."""
    where, args = [], []
    if cameras:
        where.append(f"camera IN ({', '.join('?' * len(cameras))})")
        args += cameras
    if verdicts:
        where.append(f"verdict IN ({', '.join('?' * len(verdicts))})")
        args += verdicts
    if since is not None:
        where.append("verdict_ts >= ?")
        args.append(since)
    if until is not None:
        where.append("verdict_ts < ?")
        args.append(until)
    sql = f"SELECT {', '.join(COLUMNS)} FROM verdicts" + (f" WHERE {' AND '.join(where)}" if where else "")
    if limit:
        sql = f"SELECT * FROM ({sql} ORDER BY verdict_ts DESC, rowid DESC LIMIT ?) ORDER BY verdict_ts, rowid"
        args.append(limit)
    else:
        sql += " ORDER BY verdict_ts, rowid"
    for row in conn.execute(sql, args):
        yield dict(zip(COLUMNS, row))


def record(row: dict, folder: Path) -> dict[str, Any]:
    """One verdict for output: JSON columns parsed, the archive time as ISO 8601 (UTC), and
    `pictures` only when its files are there (retention, a failed write or a kill may have
    taken them)."""
    out: dict[str, Any] = {"time": _iso(row["verdict_ts"], dt.timezone.utc), **row}
    out["objects"] = json.loads(row["objects"])
    out["branch_scores"] = json.loads(row["branch_scores"])
    if row["pictures"] and not any((folder / (row["pictures"] + s)).is_file() for s in FRAME_SUFFIXES.values()):
        out["pictures"] = None
    return out


def _iso(ts: float, zone: dt.tzinfo | None = None) -> str:
    return dt.datetime.fromtimestamp(ts, zone).isoformat(timespec="milliseconds")


def _finite(value: Any) -> Any:
    """Strict JSON: NaN and infinities (an uncalibrated bank's threshold) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def table_line(r: dict[str, Any]) -> str:
    """One verdict for a person: local time, camera, frame, value, score / threshold, bank, part, reason, id,
    pictures."""
    return (f"{_iso(r['verdict_ts'])[:23]:23}  {r['camera']:<12} {r['frame_id']:>10}  {r['verdict']:<7} "
            f"{_number(r['score']):>9} {_number(r['threshold']):>9}  {r['bank_id'] or '-':<12}  "
            f"{r['part_id'] or '-':<16} {r['reason'] or '-':<14} {r['id'] or '-'}  {r['pictures'] or ''}").rstrip()


TABLE_HEADER = (f"{'time (local)':23}  {'camera':<12} {'frame_id':>10}  {'verdict':<7} {'score':>9} {'threshold':>9}  "
                f"{'bank_id':<12}  {'part_id':<16} {'reason':<14} id  pictures")


def _open(args: argparse.Namespace) -> tuple[sqlite3.Connection, Path]:
    if args.archive:
        folder = Path(args.archive)
    elif args.config:
        from linewatch.config import load_config

        folder = Path(load_config(args.config).runtime.archive.path)
    else:
        raise ArchiveQueryError("say which archive: --archive DIR, or -c CONFIG (its runtime.archive.path)")
    return open_read_only(folder), folder


def _rows(args: argparse.Namespace, conn: sqlite3.Connection, folder: Path) -> Iterator[dict[str, Any]]:
    """The selected verdicts as records (the dates are parsed here, before any output)."""
    since = parse_time(args.since, "--since") if args.since is not None else None
    until = parse_time(args.until, "--until") if args.until is not None else None
    return (record(row, folder) for row in select(conn, args.camera, args.verdict, since, until, args.limit))


def cmd_archive_query(args: argparse.Namespace) -> int:
    return _run(args, _print_query)


def cmd_archive_export(args: argparse.Namespace) -> int:
    return _run(args, _write_export)


def _run(args: argparse.Namespace, output) -> int:
    try:
        conn, folder = _open(args)
        try:
            output(args, _rows(args, conn, folder))
        finally:
            conn.close()
    except (ArchiveError, ArchiveQueryError) as e:
        print(f"linewatch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except sqlite3.Error as e:
        print(f"linewatch: error: reading the archive: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # --out not writable
        print(f"linewatch: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _print_query(args: argparse.Namespace, rows: Iterator[dict[str, Any]]) -> None:
    if not args.json:
        print(TABLE_HEADER)
    for r in rows:
        print(json.dumps(_finite(r)) if args.json else table_line(r))


def _write_export(args: argparse.Namespace, rows: Iterator[dict[str, Any]]) -> None:
    with (open(args.out, "w", newline="", encoding="utf-8") if args.out else nullcontext(sys.stdout)) as f:
        if args.format == "csv":
            writer = csv.DictWriter(f, fieldnames=EXPORT_FIELDS)
            writer.writeheader()
            for r in rows:
                writer.writerow({**r, "objects": json.dumps(r["objects"]),
                                 "branch_scores": json.dumps(r["branch_scores"])})
        else:
            f.write("[")
            for i, r in enumerate(rows):
                f.write(("," if i else "") + "\n" + json.dumps(_finite(r)))
            f.write("\n]\n")


def register(subparsers) -> None:
    """Add `archive query` and `archive export` to the `linewatch` argument parser."""
    archive = subparsers.add_parser("archive", help="the verdict archive: query, export")
    actions = archive.add_subparsers(dest="archive_command", required=True)
    for name, func, help_text in (
        ("query", cmd_archive_query, "print verdicts from the archive (the newest --limit, oldest first)"),
        ("export", cmd_archive_export, "write verdicts from the archive as CSV or JSON"),
    ):
        p = actions.add_parser(name, help=help_text)
        where = p.add_mutually_exclusive_group()
        where.add_argument("--archive", help="the archive folder (runtime.archive.path)")
        where.add_argument("--config", "-c", help="YAML config: its runtime.archive.path")
        p.add_argument("--camera", action="append", help="only this camera (repeatable)")
        p.add_argument("--verdict", action="append", choices=VERDICT_VALUES, help="only this value (repeatable)")
        p.add_argument("--since", help="archived at or after: ISO 8601 (local time unless a zone is given) "
                                       "or epoch seconds")
        p.add_argument("--until", help="archived before: ISO 8601 or epoch seconds")
        if name == "query":
            p.add_argument("--limit", type=int, default=DEFAULT_QUERY_LIMIT,
                           help=f"the newest this many (default {DEFAULT_QUERY_LIMIT}; 0: all)")
            p.add_argument("--json", action="store_true", help="one JSON object per line")
        else:
            p.add_argument("--limit", type=int, default=0, help="the newest this many (default 0: all)")
            p.add_argument("--format", choices=("csv", "json"), default="csv")
            p.add_argument("--out", "-o", help="output file (default: standard output)")
        p.set_defaults(func=func)
