"""Recipe changeover: putting another bank (and product config) in service while frames flow.

The daemon's `switch_bank` (asked by the control socket, `linewatch bank switch`, and SIGHUP)
runs a `Changeover`: the bank loader the caller gave loads and checks the bank
(`linewatch serve`'s is linewatch.recipe.RecipeLoader), the pipeline cuts over. See
docs/operations.md, Recipe changeover.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from linewatch.runtime.ops.metrics import Metrics
from linewatch.runtime.pipeline.runner import Pipeline, Processor


class SwitchRefused(Exception):
    """A bank that cannot go into service; the message says why, in words for the operator
    (a bank loader raises it for a bad file, a bank built under other settings, ...)."""


@dataclass
class LoadedBank:
    """What a bank loader hands the daemon for a switch."""

    processor: Processor
    path: str  # the bank file it came from (logged, and in the reply)
    warnings: list[str] = field(default_factory=list)  # what could not be applied (restart-only settings)


# loader(bank, config, in_service) -> LoadedBank: `bank` and `config` are the request's file
# paths (None: the loader's defaults), `in_service` the processor serving now (its models may
# be reused). It raises SwitchRefused (or anything else) when the bank cannot go into service.
BankLoader = Callable[[str | None, str | None, Processor], LoadedBank]


@dataclass
class BankSwitch:
    """The outcome of a switch request (the control socket sends it back as JSON)."""

    switched: bool
    bank_id: str  # in service afterwards: the new bank, or the old one when refused
    reason: str | None = None  # why it was refused
    old_bank_id: str | None = None
    bank: str | None = None  # the bank file put in service
    frames_before: int | None = None  # frames received before the cut (over the run): the old bank's
    last_frame_ids: dict[str, int] | None = None  # per camera, the last frame the old bank judges
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Changeover:
    """Bank switches for one pipeline, one at a time. `show_bank(old, new)` updates what the
    daemon shows about the bank in service; `stopping()` says the daemon is shutting down."""

    def __init__(self, pipeline: Pipeline, loader: BankLoader | None, metrics: Metrics, log: Any,
                 show_bank: Callable[[Processor, Processor], None], stopping: Callable[[], bool]) -> None:
        self.pipeline = pipeline
        self.loader = loader
        self.metrics = metrics
        self.log = log
        self._show_bank = show_bank
        self._stopping = stopping
        self._switching = threading.Lock()  # one bank switch at a time

    def switch(self, bank: str | None = None, config: str | None = None) -> BankSwitch:
        """Put another bank in service while frames flow (a recipe changeover).

        `bank`, `config`: file paths for the bank loader (None: its defaults; both None: what a
        restart would load). The loader loads and checks the bank (it reads, fits the config,
        its threshold the calibration target); the pipeline then takes it if its stages are
        the running ones, and cuts over: frames received before the cut are judged by the old
        bank, frames after it by the new one. On any failure the old bank stays in service and
        the reason is returned and logged (`bank_switch_refused`). One switch at a time: a
        request meanwhile is refused. Slow (it loads a bank, maybe models): never call it on
        the verdict path.
        """
        if not self._switching.acquire(blocking=False):
            return self._refused(bank, "another bank switch is in progress; try again when it is done")
        try:
            return self._switch(bank, config)
        finally:
            self._switching.release()

    def _switch(self, bank: str | None, config: str | None) -> BankSwitch:
        if self._stopping():
            return self._refused(bank, "the daemon is stopping")
        if self.loader is None:
            return self._refused(bank, "this daemon was started without a bank loader; restart it to load a bank")
        old = self.pipeline.processor
        try:
            loaded = self.loader(bank, config, old)
            cut = self.pipeline.switch_processor(loaded.processor)
        except (SwitchRefused, ValueError) as e:  # ValueError: the pipeline's stage check
            return self._refused(bank, str(e))
        except Exception as e:  # noqa: BLE001 - a bug or the machine (GPU memory): still not the line's end
            return self._refused(bank, f"{type(e).__name__}: {e}", exc_info=e)
        new = loaded.processor
        self._show_bank(old, new)
        self.metrics.bank_switches.labels(result="switched").inc()
        result = BankSwitch(switched=True, bank_id=new.bank_id, old_bank_id=old.bank_id, bank=loaded.path,
                            frames_before=cut.frames_before, last_frame_ids=cut.last_frame_ids,
                            warnings=list(loaded.warnings))
        self.log.info("bank_switched", old_bank_id=old.bank_id, bank_id=new.bank_id, bank=loaded.path,
                      backend=new.backend, frames_before=cut.frames_before, last_frame_ids=cut.last_frame_ids)
        for warning in loaded.warnings:
            self.log.warning("bank_switch_not_applied", bank_id=new.bank_id, warning=warning)
        return result

    def _refused(self, bank: str | None, reason: str, exc_info: BaseException | None = None) -> BankSwitch:
        in_service = self.pipeline.processor.bank_id
        self.metrics.bank_switches.labels(result="refused").inc()
        self.log.error("bank_switch_refused", bank=bank, bank_id=in_service, reason=reason, exc_info=exc_info)
        return BankSwitch(switched=False, bank_id=in_service, reason=reason, bank=bank)
