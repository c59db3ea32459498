"""What `linewatch camera` costs per frame: 1024x1024 frames at 30 frames/s (issue 21).

The camera process reads 1024x1024 frames at 30 frames/s from one of two sources and publishes
each to a SUB socket here, as it would to the daemon's ingest, once per --encoding:

- `--source video` (default): a colour MJPG video this script writes (`file://`, at the video's
  own 30 frames/s);
- `--source gige`: a GigE Vision camera on loopback (`aravis:`, Aravis's fake GigE Vision camera
  from tests/gige.py showing a grey sim part, Mono8, its region set to 1024x1024 and its frame
  rate to 30 by the bridge's `aravis:` settings). Needs Aravis 0.8's bindings (docs/line.md).
  The fake camera fills each frame in Python (tests/gige.py), after Aravis has stamped it;
- `--source gige-ramp`: the same through Debian's `arv-fake-gv-camera-0.8`, which fills each
  frame with its own moving grey ramp in C (no realistic content for the JPEG and PNG encoders).

Measured per encoding:

- the camera process's CPU per frame (user + system, from /proc, between the first and the last
  frame received, so start-up is left out). For the video it includes decoding the video's JPEG
  frames, which a real camera does not cost; that part is measured alone too (cv2.VideoCapture
  over the same file in this process) and shown beside it. For the GigE camera it includes
  Aravis's receiving of the stream's packets (the fake camera's own process is not counted);
- capture -> received: from the frame's capture_ts to its arrival here. The video's capture_ts is
  stamped when OpenCV hands the frame over; the GigE camera's is its own timestamp on the host
  clock, by the smallest offset seen (docs/line.md), so about when the fastest frame's last packet
  arrived. Either way: conversion, encoding, sending and the loopback hop;
- frames sent and received, and the rate they came at.

    PYTHONPATH=. python benchmarks/camera_overhead.py [--seconds 10] [--encodings raw jpeg png]
        [--source video|gige|gige-ramp] [--packet-size 8000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import zmq

from linewatch import wire
from linewatch.sim import render
from tests.gige import FAKE_ID, FakeGigECamera

SIZE = 1024
FPS = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def write_video(path: Path, frames: int) -> None:
    """A sim part image moving by a pixel a frame: realistic content for the JPEG encoders."""
    base = cv2.cvtColor(render("screw_tray", np.random.default_rng(0), None, size=SIZE)[0], cv2.COLOR_RGB2BGR)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), FPS, (SIZE, SIZE))
    for i in range(frames):
        writer.write(np.roll(base, i, axis=1))
    writer.release()


def video_decode_ms(path: Path) -> float:
    capture = cv2.VideoCapture(str(path))
    n, started = 0, time.process_time()
    while capture.read()[0]:
        n += 1
    capture.release()
    return (time.process_time() - started) / n * 1000


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def gige_config(folder: Path, packet_size: int | None) -> list[str]:
    """The bridge's options for the fake GigE camera: its region, rate and packet size (a camera config file)."""
    config = folder / "gige.yaml"
    config.write_text(f"aravis:\n  width: {SIZE}\n  height: {SIZE}\n  frame_rate: {FPS}\n  pixel_format: Mono8\n"
                      + (f"  packet_size: {packet_size}\n" if packet_size else ""))
    return ["-c", str(config), "--source", f"aravis:{FAKE_ID}"]


def run(source: list[str], encoding: str, frames: int) -> dict:
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 10_000)
    sub.bind("tcp://127.0.0.1:0")
    endpoint = sub.getsockopt_string(zmq.LAST_ENDPOINT)
    camera = subprocess.Popen([sys.executable, "-m", "linewatch.cli", "camera", *source,
                               "--camera", "bench", "--endpoint", endpoint, "--encoding", encoding,
                               "--metrics-port", "0", "--count", str(frames)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latencies, first_cpu, last_cpu, first_at, last_at = [], None, None, None, None
    limits = wire.ImageLimits()
    try:
        while sub.poll(20_000):
            parts = sub.recv_multipart(copy=False)
            now = time.time()
            frame = wire.read_frame([p.buffer for p in parts], limits, now, time.monotonic(), frozenset())
            latencies.append(now - frame.capture_ts)
            cpu = cpu_seconds(camera.pid) if camera.poll() is None else last_cpu
            if first_cpu is None:
                first_cpu, first_at = cpu, now
            last_cpu, last_at = cpu, now
            if len(latencies) >= frames:
                break
    finally:
        camera.wait(30) if camera.poll() is None else None
        sub.close(0)
        context.term()
    n = len(latencies)
    ms = np.array(latencies[1:]) * 1000
    return {"received": n, "cpu_ms_per_frame": (last_cpu - first_cpu) / max(1, n - 1) * 1000,
            "rate": (n - 1) / (last_at - first_at) if n > 1 else 0.0,
            "p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--encodings", nargs="+", default=["raw", "jpeg", "png"], choices=wire.ENCODINGS)
    p.add_argument("--source", choices=["video", "gige", "gige-ramp"], default="video",
                   help="video: an MJPG file (colour); gige: the fake GigE Vision camera showing a sim part "
                   "(Mono8); gige-ramp: Debian's fake camera, its own test pattern")
    p.add_argument("--packet-size", type=int, default=None,
                   help="gige sources: the stream's packet size in bytes (aravis.packet_size; default: the camera's)")
    args = p.parse_args()
    frames = int(args.seconds * FPS)
    with tempfile.TemporaryDirectory() as tmp:
        if args.source == "video":
            video = Path(tmp) / "line.avi"
            write_video(video, frames)
            decode = video_decode_ms(video)
            print(f"{SIZE}x{SIZE} colour frames from a video at {FPS:g}/s, {frames} per encoding; decoding the MJPG "
                  f"video alone: {decode:.1f} ms CPU per frame (included in the camera process's CPU below)")
            measure(["--source", f"file://{video}"], args.encodings, frames)
            return
        parts = None
        if args.source == "gige":
            parts = Path(tmp) / "parts"
            parts.mkdir()
            grey = render("screw_tray", np.random.default_rng(0), None, size=SIZE, mono=True)[0]
            cv2.imwrite(str(parts / "part.png"), grey)
        print(f"{SIZE}x{SIZE} Mono8 frames from the fake GigE Vision camera ({'a sim part' if parts else 'its ramp'}) "
              f"at {FPS:g}/s, packet size {args.packet_size or 'the camera default'}, {frames} per encoding")
        with FakeGigECamera(images=parts, log=Path(tmp) / "fake-camera.log"):
            measure(gige_config(Path(tmp), args.packet_size), args.encodings, frames)


def measure(source: list[str], encodings: list[str], frames: int) -> None:
    for encoding in encodings:
        r = run(source, encoding, frames)
        print(f"  {encoding:5s} camera CPU {r['cpu_ms_per_frame']:6.1f} ms/frame   capture -> received "
              f"p50 {r['p50']:6.1f} ms  p99 {r['p99']:6.1f} ms   {r['received']}/{frames} received at "
              f"{r['rate']:.1f}/s")


if __name__ == "__main__":
    main()
