"""The verdict archive as a sink (`runtime.archive`): linewatch.runtime.sinks.archive.Archive."""

from __future__ import annotations

from linewatch.runtime.sinks.outcome import Outcome, with_image
from linewatch.runtime.sinks import Adapter, SinkContext


class ArchiveSink(Adapter):
    name = "archive_row"  # the `sink` label its lost rows are counted under
    wants_image = True  # failed parts (and a sample of passes) keep their pictures

    def publish(self, outcome: Outcome) -> None:
        # The archive's own copy of the verdict carries the image (Archive.record's contract):
        # the row is in the journal when this returns, the pictures are queued with the copy,
        # and the outcome, whose overlay the archive shares with the other sinks.
        verdict = outcome.verdict
        self.target.record(verdict if outcome.image is None else with_image(verdict, outcome.image), outcome)

    @property
    def pending(self) -> int | None:
        return None  # rows are written at once; its picture queue is its own business (sink_dropped)


def build(context: SinkContext) -> ArchiveSink | None:
    if not context.config.archive.enabled:
        return None
    from linewatch.runtime.sinks.archive import Archive  # sqlite3, cv2: only when the archive is on

    return ArchiveSink(Archive(context.config.archive, metrics=context.metrics, log=context.log, clock=context.clock))
