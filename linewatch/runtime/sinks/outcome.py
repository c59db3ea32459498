"""What every verdict sink receives: one immutable `Outcome` per released verdict.

The pipeline releases a `Verdict` with the frame's image attached (`Verdict.image`, when a sink
wants pictures). The daemon splits it once, on the output thread, into an `Outcome`: the verdict
as it is sent (no image; the wire encoding never carries one anyway), the image beside it, and
the overlay (heatmap, object boxes, banner) as a JPEG, rendered once, by whoever first needs it,
and shared by the others: the pipeline when `publish.overlay_jpeg` asks for it on the wire (its
rendering is taken over), else the first sink that asks: the live page (at a browser's request)
or the archive (in its picture encoder process, with the frame's file).

Sinks run on several threads: they only read the outcome and its verdict, never change them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from linewatch.wire import Verdict


class _Once:
    """A value computed at most once, whichever thread asks first (the others wait for it)."""

    __slots__ = ("lock", "done", "value")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = False
        self.value: bytes | None = None


@dataclass(frozen=True)
class Outcome:
    """One released verdict as the sinks see it. `verdict` is shared by every sink: read-only."""

    verdict: Verdict  # as sent: `image` is None
    image: np.ndarray | None = field(default=None, repr=False)  # the frame as judged (RGB), when kept
    _overlay: _Once = field(default_factory=_Once, repr=False, compare=False)

    @classmethod
    def of(cls, released: Verdict) -> Outcome:
        """The outcome of a verdict as the pipeline releases it: its image moves beside a copy
        of it (the released one is not changed), and an overlay the pipeline rendered for the
        wire is the outcome's overlay."""
        image = released.image
        verdict = with_image(released, None) if image is not None else released
        outcome = cls(verdict, image)
        if verdict.overlay_jpeg is not None:
            outcome._overlay.value, outcome._overlay.done = verdict.overlay_jpeg, True
        return outcome

    @property
    def overlay_rendered(self) -> bool:
        """Whether the overlay is there already (asking for it now costs nothing)."""
        return self._overlay.done

    def overlay_jpeg(self, render: Callable[[], bytes] | None = None) -> bytes | None:
        """The overlay as JPEG (linewatch.overlay.overlay_jpeg), rendered at the first call and
        kept; None for a verdict without its image or one that was not judged (pass/fail).
        `render`: how the first caller renders it, when not here (the archive: in its encoder
        process); a caller meanwhile waits for it. May raise (a picture that cannot be drawn),
        and then the next call renders it again."""
        once = self._overlay
        if once.done:
            return once.value
        with once.lock:
            if not once.done:
                if self.image is not None and self.verdict.verdict in ("pass", "fail"):
                    once.value = render() if render is not None else overlay_jpeg(self.image, self.verdict)
                once.done = True
        return once.value


def with_image(verdict: Verdict, image: np.ndarray | None) -> Verdict:
    """A copy of `verdict` carrying `image` (the original is not changed). Shallow, as
    dataclasses.replace would make it, without its __init__ and checks (a few times faster on
    the verdict path; the verdict was checked when it was made)."""
    copy = object.__new__(type(verdict))
    copy.__dict__.update(verdict.__dict__)
    copy.image = image
    return copy


def overlay_jpeg(image: np.ndarray, verdict: Verdict) -> bytes:
    """The rendering itself (a function of this module, so that a test can count its calls)."""
    from linewatch.overlay import overlay_jpeg as render  # cv2: only when a picture is drawn

    return render(image, verdict)
