"""Retention: what the archive keeps, over the store and the pictures.

Rows older than the age cutoff go, with their pictures and the day folders before it; then,
while the archive is above its byte budget, the oldest pictures (their rows stay, `pictures`
cleared), then the oldest rows. Small transactions (RETENTION_BATCH rows), and between two of
them `between_batches()` runs (the Archive puts the journal's new lines in there, so a long
pass does not hold rows back until the journal is full) and may end the pass.
"""

from __future__ import annotations

import math
from typing import Callable

from linewatch.runtime.sinks.archive.pictures import PictureFiles
from linewatch.runtime.sinks.archive.store import Store

RETENTION_BATCH = 100  # rows per delete statement: a short transaction


class Retention:
    """Deletes from `store` and `pictures` (one caller at a time, as the store's)."""

    def __init__(self, store: Store, pictures: PictureFiles,
                 between_batches: Callable[[], bool] = lambda: False) -> None:
        self._store = store
        self._pictures = pictures
        self._between_batches = between_batches  # True: stop now

    def retained_bytes(self) -> int:
        """What the budget holds: the database (its pages as the file will hold them after the
        next checkpoint) and the pictures."""
        return self._store.page_bytes("page_count") + self._pictures.bytes

    def enforce(self, cutoff: float, budget: int) -> dict[str, int]:
        """Delete rows older than `cutoff` (epoch seconds); then, above `budget` bytes
        (retained_bytes), the oldest pictures, then the oldest rows. Returns what was removed."""
        removed = {"rows_by_age": 0, "day_folders": 0, "pictures_by_size": 0, "rows_by_size": 0}
        removed["rows_by_age"] = self._delete_oldest_rows(until_ts=cutoff)
        removed["day_folders"] = self._pictures.remove_days_before(cutoff)
        removed["pictures_by_size"] = self._remove_oldest_pictures(budget)
        while (over := self.retained_bytes() - budget) > 0:
            rows = self._store.row_count()
            if not rows:
                break
            used = self._store.page_bytes("page_count") - self._store.page_bytes("freelist_count")
            deleted = self._delete_oldest_rows(count=max(1, math.ceil(over * rows / used)))
            removed["rows_by_size"] += deleted
            self._store.give_back_free_pages(self._between_batches)
            if not deleted:
                break
        if removed["rows_by_age"]:
            self._store.give_back_free_pages(self._between_batches)
        return removed

    def _delete_oldest_rows(self, until_ts: float | None = None, count: int | None = None) -> int:
        """Delete the oldest rows (older than `until_ts`, or `count` of them) with their pictures,
        RETENTION_BATCH per transaction. Returns how many."""
        deleted = 0
        while count is None or deleted < count:
            limit = RETENTION_BATCH if count is None else min(RETENTION_BATCH, count - deleted)
            batch = self._store.oldest_rows(limit, until_ts)
            if not batch:
                break
            self._store.delete_rows([rowid for rowid, _ in batch])
            for _, stem in batch:
                if stem:
                    self._pictures.remove(stem)
            deleted += len(batch)
            if self._between_batches():
                break
        return deleted

    def _remove_oldest_pictures(self, budget: int) -> int:
        """Remove the oldest pictures until the archive fits `budget` (or none are left); their
        rows stay, with `pictures` cleared."""
        removed = 0
        while self.retained_bytes() > budget:
            batch = self._store.oldest_pictures(RETENTION_BATCH)
            if not batch:
                break
            done = []
            for rowid, stem in batch:
                self._pictures.remove(stem)
                done.append(rowid)
                if self.retained_bytes() <= budget:
                    break
            self._store.clear_pictures(done)
            removed += len(done)
        return removed
