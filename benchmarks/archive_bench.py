"""Archive benchmark (a script, not a test): the cost of `Archive.record` on the verdict path.

    PYTHONPATH=. python benchmarks/archive_bench.py [--verdicts 5000] [--dir /tmp/lw-archive-bench]

Prints the time of one `record()` call (what the pipeline's output thread pays per verdict;
target: well under 0.2 ms) in four cases, on a real archive in --dir (the disk under it
matters): the row's journal line appended with one write(), while the background thread
puts the lines in SQLite
  rows        pass verdicts without pictures, back to back (as the verdicts of one batch leave)
  rows_paced  the same at 500 verdicts/s (a call after a pause costs more: the CPU's caches
              are cold again, more so on a shared machine)
  pictures    a line at 500 verdicts/s, one in ten a failed part with a 224x224 frame (the row
              plus a place on the picture queue) while the background thread encodes and writes
              the earlier ones
  retention   pass verdicts while a retention pass deletes 20,000 expired rows in batches
and then the time from record() until the row is in SQLite (wait_idle), one verdict at a time:
  lag         what `linewatch archive query` waits at most to see a verdict just published
and last (`--only encode` for this part alone) the CPU time of one failed part's pictures in the
encoder process (frame PNG, heatmap .npz, overlay JPEG: `encode_pictures`), each file alone,
with the frame as BMP (`runtime.archive.frame_format: bmp`), and the previous settings beside
the current ones (PNG deflate level 1 default strategy, npz at np.savez_compressed's level 6),
on a random-noise frame (PNG's worst case) and on a frame of the synthetic line, with a smooth
heatmap, at 224x224 and 1024x1024; each file's size beside its time.

Run it from the repository root; `PYTHONPATH=OTHER_CHECKOUT python benchmarks/archive_bench.py`
measures another version of linewatch with the same cases.
"""

from __future__ import annotations

import argparse
import io
import itertools
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from linewatch.config import ArchiveConfig
from linewatch.runtime.sinks.archive import Archive

try:
    from linewatch.runtime.sinks.archive import lower_thread_priority
except ImportError:  # a linewatch before the journal: its retention ran at the daemon's priority

    def lower_thread_priority() -> None:
        pass
from linewatch.runtime.ops.metrics import Metrics
from linewatch.wire import Verdict

OBJECTS = [{"bbox": [10.0 * i, 20.0, 30.0, 40.0], "area": 1200.0, "status": "matched", "score": 0.31} for i in range(4)]


class WallClock:
    """The real clocks, with the wall clock shifted on demand (to age rows for the retention case)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time() + self.offset


SEQ = itertools.count()


def verdict(value: str, image: np.ndarray | None = None) -> Verdict:
    seq = next(SEQ)
    v = Verdict(camera="cam0", frame_id=seq, verdict=value, capture_ts=time.time(), part_id=f"part-{seq}",
                score=1.4 if value == "fail" else 0.7, threshold=1.0, objects=list(OBJECTS), backend="classic",
                bank_id="bench", latency_s=0.03, run_id="bench", seq=seq,
                heatmap=np.zeros((224, 224), np.float32) if image is not None else None)
    v.branch_scores = {"objects": 0.5, "patch": 1.2}
    v.image = image
    return v


def timed(archive: Archive, verdicts: list[Verdict], period_s: float = 0.0) -> np.ndarray:
    """Microseconds per record() call; one call every `period_s` (0: back to back)."""
    out = np.empty(len(verdicts))
    start = time.perf_counter()
    for i, v in enumerate(verdicts):
        if period_s:
            time.sleep(max(0.0, start + i * period_s - time.perf_counter()))
        t0 = time.perf_counter_ns()
        archive.record(v)
        out[i] = time.perf_counter_ns() - t0
        v.image = None  # as the daemon does
    return out / 1000.0  # microseconds


def report(name: str, us: np.ndarray, archive: Archive) -> None:
    print(f"{name:10s} n={len(us):6d}  mean {us.mean():7.1f} us  p50 {np.percentile(us, 50):7.1f} us  "
          f"p99 {np.percentile(us, 99):7.1f} us  max {us.max():8.1f} us   {archive.stats()}")


def best_ms(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The fastest of `repeats` calls, in ms (the least disturbed by the machine's other work),
    and what the last call returned."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return 1000.0 * min(times), out


def bench_encoding(repeats: int) -> None:
    """CPU ms of one failed part's pictures, per file, current vs previous settings."""
    import cv2

    from linewatch.overlay import overlay_jpeg
    from linewatch.runtime.sinks.archive.encoder import PNG_PARAMS, _npz_bytes, encode_pictures
    from linewatch.sim.generator import render

    def npz_level6(heat: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(buf, heatmap=heat)
        return buf.getvalue()

    rng = np.random.default_rng(0)
    for size in (224, 1024):
        line_frame, _, _ = render("breakfast_box", np.random.default_rng(1), size=size)
        noise_heat = rng.random((size, size), dtype=np.float32)
        smooth_heat = cv2.GaussianBlur(noise_heat, (0, 0), size / 28)
        for name, frame, heat in (("noise", rng.integers(0, 256, (size, size, 3), dtype=np.uint8), noise_heat),
                                  ("line", line_frame, smooth_heat)):
            v = verdict("fail", frame)
            v.heatmap = heat
            bgr = cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)
            h16 = heat.astype(np.float16)
            cases = {  # a single file's case returns its bytes (their size is printed), `all` the three
                "all (encode_pictures, png)": lambda: encode_pictures(frame, v),
                "frame PNG rle level 1": lambda: cv2.imencode(".png", bgr, PNG_PARAMS)[1],
                "frame PNG level 1 (before)": lambda: cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])[1],
                "frame BMP (frame_format bmp)": lambda: cv2.imencode(".bmp", bgr)[1],
                "all, frame_format bmp": lambda: encode_pictures(frame, v, "bmp"),
                "heatmap npz level 1": lambda: _npz_bytes(h16),
                "heatmap npz level 6 (before)": lambda: npz_level6(h16),
                "overlay JPEG q90": lambda: overlay_jpeg(frame, v, quality=90),
            }
            for case, fn in cases.items():
                ms, out = best_ms(fn, repeats)
                extra = "" if isinstance(out, tuple) else f"  {len(out) / 1024:8.1f} KiB"
                print(f"encode {size}x{size} {name:5s} {case:30s} {ms:8.2f} ms{extra}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--verdicts", type=int, default=5000)
    ap.add_argument("--dir", help="where the archive goes (default: a temporary folder, removed after)")
    ap.add_argument("--only", choices=("encode",), help="run only the picture encoding part")
    ap.add_argument("--encode-repeats", type=int, default=15, help="calls per encoding case (the fastest is shown)")
    args = ap.parse_args()
    if args.only == "encode":
        bench_encoding(args.encode_repeats)
        return
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="lw-archive-bench-"))
    shutil.rmtree(root / "archive", ignore_errors=True)
    clock = WallClock()
    archive = Archive(ArchiveConfig(enabled=True, path=str(root / "archive"), queue_size=256), Metrics(), clock=clock)
    archive.start()
    try:
        n = args.verdicts
        report("rows", timed(archive, [verdict("pass") for _ in range(n)]), archive)
        report("rows_paced", timed(archive, [verdict("pass") for _ in range(n // 2)], period_s=0.002), archive)

        image = np.random.default_rng(0).integers(0, 256, (224, 224, 3), dtype=np.uint8)
        mixed = [verdict("fail", image) if i % 10 == 0 else verdict("pass") for i in range(n)]
        us = timed(archive, mixed, period_s=0.002)
        archive.wait_idle(120)
        report("pictures", us, archive)

        for _ in range(20_000):
            archive.record(verdict("pass"))
        archive.wait_idle(120)  # the 20,000 rows are in the database, to be deleted
        clock.offset = 91 * 86400.0  # everything so far is now past max_age_days (90)
        def retain() -> None:
            lower_thread_priority()  # as the archive's own thread, where retention runs in the daemon
            archive.enforce_retention()

        retention = threading.Thread(target=retain)
        retention.start()
        us = timed(archive, [verdict("pass") for _ in range(n)])
        retention.join()
        report("retention", us, archive)

        archive.wait_idle(120)
        lag = np.empty(200)
        for i in range(len(lag)):
            t0 = time.perf_counter_ns()
            archive.record(verdict("pass"))
            archive.wait_idle(120)
            lag[i] = time.perf_counter_ns() - t0
        report("lag", lag / 1000.0, archive)
    finally:
        archive.stop()
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    bench_encoding(args.encode_repeats)


if __name__ == "__main__":
    main()
