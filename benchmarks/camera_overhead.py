"""What `linewatch camera` costs per frame: 1024x1024 frames at 30 frames/s (issue 21).

The camera process plays a 1024x1024 MJPG video this script writes (`file://`, at the video's
own 30 frames/s) and publishes each frame to a SUB socket here, as it would to the daemon's
ingest, once per --encoding. Measured per encoding:

- the camera process's CPU per frame (user + system, from /proc, between the first and the last
  frame received, so start-up is left out). It includes decoding the video's JPEG frames, which a
  real camera does not cost; that part is measured alone too (cv2.VideoCapture over the same file
  in this process) and shown beside it;
- capture -> received: from the frame's capture_ts (stamped when the source handed the frame
  over) to its arrival here: conversion, encoding, sending and the loopback hop;
- frames sent and received, and the rate they came at.

    PYTHONPATH=. python benchmarks/camera_overhead.py [--seconds 10] [--encodings raw jpeg png]

The GigE Vision source (Aravis) is not measured: it cannot be installed on the machines here.
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


def run(video: Path, encoding: str, frames: int) -> dict:
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.RCVHWM, 10_000)
    sub.bind("tcp://127.0.0.1:0")
    endpoint = sub.getsockopt_string(zmq.LAST_ENDPOINT)
    camera = subprocess.Popen([sys.executable, "-m", "linewatch.cli", "camera", "--source", f"file://{video}",
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
    args = p.parse_args()
    frames = int(args.seconds * FPS)
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "line.avi"
        write_video(video, frames)
        decode = video_decode_ms(video)
        print(f"{SIZE}x{SIZE} frames at {FPS:g}/s, {frames} per encoding; decoding the MJPG video alone: "
              f"{decode:.1f} ms CPU per frame (included in the camera process's CPU below)")
        for encoding in args.encodings:
            r = run(video, encoding, frames)
            print(f"  {encoding:5s} camera CPU {r['cpu_ms_per_frame']:6.1f} ms/frame   capture -> received "
                  f"p50 {r['p50']:6.1f} ms  p99 {r['p99']:6.1f} ms   {r['received']}/{frames} received at "
                  f"{r['rate']:.1f}/s")


if __name__ == "__main__":
    main()
