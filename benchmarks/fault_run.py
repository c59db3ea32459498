"""Fault run against a real `linewatch serve` (classic backend, demo config): prints figures.

    python benchmarks/fault_run.py [--soak-s 600] [--capacity-fps 20] [--malformed 10000]

Phases, each against a live daemon process on loopback:
  malformed  N malformed messages (bad topics, bad headers, bad shapes, over-long camera ids, a
             decompression bomb, ...) interleaved with valid frames at half capacity: the daemon
             stays up, every valid frame gets exactly one verdict, and every malformed message
             is accounted for: an `error` verdict or linewatch_messages_dropped_total.
  soak       valid frames at 2x the daemon's capacity for --soak-s seconds: every frame gets
             exactly one verdict (pass/fail/shed/timeout); RSS of the daemon sampled every 10 s,
             growth measured from the end of the first minute.
  sigterm    frames in flight when SIGTERM arrives: every received frame answered, exit 0.
  kill9      kill -9 mid-stream, restart: seconds from the new process's start to /readyz 200.

Every frame has a unique (camera, frame_id); the verdict subscriber counts verdicts per frame
and the gaps in the verdicts' seq (verdicts lost between daemon and subscriber). Nothing here
is a test: it prints what it measured, and exits 1 if an invariant broke.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import zmq

from linewatch import wire
from serve_harness import Daemon, Subscriber, build_bank, camera_socket, check, pace, wait_joined


def jpeg_declaring(h: int, w: int) -> bytes:
    data = bytearray(cv2.imencode(".jpg", np.zeros((16, 16, 3), np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(data)


def malformed(i: int, good: list[bytes], raw: list[bytes]) -> list[bytes]:
    """Malformed message number i (ten kinds, round robin); cameras "bad*" where addressable.
    `good` is a valid JPEG frame message, `raw` a valid raw one."""
    header = json.loads(good[1])
    raw_header = json.loads(raw[1])
    kind = i % 10
    if kind == 0:
        return [b"\xff\xfe" + bytes([i % 256]), good[1], good[2]]  # topic not UTF-8: unaddressable
    if kind == 1:
        return [b"bad1", b"{not json", b""]
    if kind == 2:
        return [b"bad2", json.dumps({**raw_header, "camera": "bad2", "frame_id": i, "dtype": "float32"}).encode(), raw[2]]
    if kind == 3:
        return [b"bad3", json.dumps({**header, "camera": "bad3", "frame_id": i}).encode()]  # truncated
    if kind == 4:
        return [b"x" * 500, good[1], good[2]]  # camera id far too long: unaddressable
    if kind == 5:
        return [b"bad5", json.dumps({**header, "camera": "bad5", "frame_id": i, "v": 99}).encode(), good[2]]
    if kind == 6:
        h = {**header, "camera": "bad6", "frame_id": i, "encoding": "jpeg"}
        return [b"bad6", json.dumps(h).encode(), jpeg_declaring(20000, 20000)]  # decompression bomb
    if kind == 7:
        h = {**header, "camera": "bad7", "frame_id": i, "encoding": "png"}
        return [b"bad7", json.dumps(h).encode(), b"\x89PNG\r\n\x1a\n" + zlib.compress(b"nonsense")]
    if kind == 8:
        return [b"bad8", json.dumps({**raw_header, "camera": "bad8", "frame_id": i, "shape": [3, 3, 3]}).encode(), raw[2]]
    return [b"", good[1], good[2]]  # empty camera id: unaddressable


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--soak-s", type=float, default=600.0)
    ap.add_argument("--capacity-fps", type=float, default=20.0, help="what the daemon judges per second here")
    ap.add_argument("--malformed", type=int, default=10_000)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lw-fault-"))
    failures: list[str] = []
    print(f"work folder {work}; building the bank", flush=True)
    bank, images = build_bank(work)
    daemon = Daemon(work, bank)
    print(f"ready in {daemon.start():.2f} s (first start)", flush=True)
    sub = Subscriber(daemon.publish_url)
    sub.start()
    ctx = zmq.Context()
    cam = camera_socket(ctx, daemon)
    encoded = [wire.encode_frame("warm", 0, im, encoding="jpeg") for im in images]
    raw_frame = wire.encode_frame("warm", 0, images[0][:32, :32].copy())
    wait_joined(cam, sub, images[0])
    time.sleep(2.0)

    def frame(camera: str, fid: int) -> list[bytes]:
        parts = encoded[fid % len(encoded)]
        header = {**json.loads(parts[1]), "camera": camera, "frame_id": fid, "capture_ts": time.time()}
        return [camera.encode(), json.dumps(header).encode(), parts[2]]

    # ------------------------------------------------------------------ malformed
    before = daemon.metrics()
    rss0 = daemon.rss_mb()
    rate_valid = args.capacity_fps / 2
    n_valid = 0
    t0 = time.monotonic()
    per_valid = max(1, int(args.malformed / (rate_valid * 20)))  # spread over ~20 s
    for i in range(args.malformed):
        cam.send_multipart(malformed(i, encoded[0], raw_frame))
        if i % per_valid == 0:
            cam.send_multipart(frame("cam0", n_valid))
            n_valid += 1
            pace(t0, n_valid, rate_valid)
    sub.settle([("cam0", i) for i in range(n_valid)])
    time.sleep(2.0)
    after = daemon.metrics()
    with sub.lock:
        once = sum(sub.per_frame[("cam0", i)] == 1 for i in range(n_valid))
        error_verdicts = sum(n for (camera, _), n in sub.reasons.items() if camera != "cam0")
    dropped = after["linewatch_messages_dropped_total"] - before.get("linewatch_messages_dropped_total", 0)
    print(f"\nmalformed: {args.malformed} malformed messages interleaved with {n_valid} valid frames "
          f"in {time.monotonic() - t0:.1f} s")
    print(f"  daemon alive: {check('malformed: alive', daemon.proc.poll() is None, failures)}; "
          f"RSS {rss0:.0f} -> {daemon.rss_mb():.0f} MB")
    print(f"  valid frames with exactly one verdict: {once}/{n_valid} "
          f"{check('malformed: valid answered once', once == n_valid, failures)}")
    print(f"  malformed accounted for: {error_verdicts} error verdicts + {dropped:.0f} dropped (counted) = "
          f"{error_verdicts + dropped:.0f}/{args.malformed} "
          f"{check('malformed: all counted', error_verdicts + dropped == args.malformed, failures)}")
    with sub.lock:
        reasons = Counter()
        for (camera, reason), n in sub.reasons.items():
            if camera != "cam0":
                reasons[reason] += n
    print(f"  error reasons: {dict(reasons)}")
    print(f"  dropped by reason: { {k.split('=')[1][:-1]: v - before.get(k, 0) for k, v in after.items() if k.startswith('linewatch_messages_dropped_total{')} }")

    # ------------------------------------------------------------------ soak
    rate = 2 * args.capacity_fps
    print(f"\nsoak: {rate:.0f} frames/s (2x capacity) for {args.soak_s:.0f} s", flush=True)
    rss: list[tuple[float, float]] = []
    n_soak = 0
    t0 = time.monotonic()
    next_sample = t0
    while time.monotonic() - t0 < args.soak_s:
        cam.send_multipart(frame("soak", n_soak))
        n_soak += 1
        if time.monotonic() >= next_sample:
            rss.append((time.monotonic() - t0, daemon.rss_mb()))
            next_sample += 10.0
        pace(t0, n_soak, rate)
    sub.settle([("soak", i) for i in range(n_soak)], 120)
    with sub.lock:
        counts = Counter(sub.per_frame[("soak", i)] for i in range(n_soak))
        values = Counter(sub.values)
    warm = [r for t, r in rss if t >= 60.0] or [r for _, r in rss]
    growth = (warm[-1] - warm[0]) / warm[0] * 100 if warm else float("nan")
    print(f"  frames sent {n_soak}; verdicts per frame: {dict(counts)} "
          f"{check('soak: one verdict each', set(counts) == {1}, failures)}")
    print(f"  verdict values so far (all phases): {dict(values)}")
    print(f"  RSS after warm-up {warm[0]:.1f} MB -> end {warm[-1]:.1f} MB: {growth:+.2f} % "
          f"{check('soak: RSS growth < 5 %', growth < 5.0, failures)} "
          f"(max {max(r for _, r in rss):.1f} MB, {len(rss)} samples)")
    print(f"  verdicts lost between daemon and subscriber (seq gaps): {sub.lost}")

    # ------------------------------------------------------------------ sigterm
    n_term = int(3 * args.capacity_fps)
    for i in range(n_term):  # faster than the detector: most are still in flight
        cam.send_multipart(frame("term", i))
    end = time.monotonic() + 30
    while daemon.metrics().get("linewatch_frames_received_total{camera=term}", 0) < n_term and time.monotonic() < end:
        time.sleep(0.02)
    inflight = daemon.metrics().get("linewatch_inflight_frames", 0)
    daemon.proc.send_signal(signal.SIGTERM)
    rc = daemon.proc.wait(60)
    time.sleep(1.0)
    with sub.lock:
        counts = Counter(sub.per_frame[("term", i)] for i in range(n_term))
    print(f"\nsigterm: {n_term} frames received, {inflight:.0f} in flight at SIGTERM; exit {rc}; "
          f"verdicts per frame {dict(counts)} "
          f"{check('sigterm: none lost', set(counts) == {1} and rc == 0, failures)}")

    # ------------------------------------------------------------------ kill -9
    ready = daemon.start()
    for i in range(int(args.capacity_fps)):
        cam.send_multipart(frame("k9", i))
    time.sleep(0.5)
    os.kill(daemon.proc.pid, signal.SIGKILL)
    daemon.proc.wait(10)
    ready = daemon.start()
    print(f"\nkill9: kill -9 mid-stream, restart -> ready in {ready:.2f} s "
          f"{check('kill9: ready < 10 s', ready < 10.0, failures)}")
    daemon.proc.send_signal(signal.SIGTERM)
    daemon.proc.wait(60)

    sub.close()
    cam.close(linger=0)
    ctx.term()
    print("\nall invariants held" if not failures else f"\nBROKEN: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
