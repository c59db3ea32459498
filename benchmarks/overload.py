"""Overload curve of a real `linewatch serve` (classic backend, demo config): prints figures.

    PYTHONPATH=. python benchmarks/overload.py [--capacity-s 20] [--phase-s 30] [--pause-s 5]
        [--windows 1 2 4 8 16] [--loads 0.5 1 2 3 5] [--encoding png|raw|jpeg] [--flood-fps F]
        [--json FILE] [--work DIR]

One daemon process on loopback, no camera allow-list (runtime.ingest.cameras empty), a bank
built from synthetic good parts (screw_tray, 256x256); the frames sent are held-out good parts
of the same product, PNG by default (decoding costs CPU as on a line). Phases, in order:

  capacity  closed loop, camera "cap": a window of frames outstanding (a frame holds its slot
            until judged, or until its deadline when refused, so refusals cannot turn the loop
            into a flood); after --warmup-s, judged (pass + fail) verdicts per second over
            --capacity-s, for each of --windows (default 1, 2, 4, max_batch, 2 x max_batch:
            on 2 cores a window of 2 x max_batch alone under-reads the capacity, its latency
            nears the deadline and frames are shed). Capacity is the best of them; every
            later rate is relative to it.
  load      one camera open-loop at each of --loads x capacity for --phase-s: offered fps,
            judged/s (pass + fail per second of sending) and its ratio to capacity, verdicts by
            value and reason, late detector results (linewatch_late_results_total from /metrics)
            as a share of detector work (late / (judged + late)), p50/p99 capture->verdict
            latency of judged frames (the verdict's latency_s).
  fairness  camera "slow" at 10 fps beside camera "flood" at --flood-fps (default 4 x capacity):
            judged/s per camera against its max-min fair share of the capacity
            (slow: min(10, capacity / 2), flood: the rest).
  big       two 7000x7000 16-bit RGBA PNGs (~400 KB each, under the 50 M-pixel cap) sent at once
            from camera "big" 1 s into --phase-s while "slow" sends 10 fps: each big frame's
            verdict and reason, the daemon's peak RSS (VmRSS sampled every 50 ms; VmHWM, the
            lifetime peak, before and after), the slow camera's verdicts.

Between phases every frame's verdict is awaited (up to 60 s), then --pause-s lets the daemon
drain before /metrics is read. Every frame has a unique (camera, frame_id); verdicts are counted
from the verdict stream only (value and reason per camera), /metrics gives only late results.
At the end: a table, and issue 18's acceptance lines (printed, not asserted). Exit 1 if a frame
did not get exactly one verdict. A default run takes about 7-8 minutes (estimated from a short
run's overheads); short: --capacity-s 5 --warmup-s 2 --phase-s 8 --pause-s 3, about 3 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import zmq

from linewatch import wire
from linewatch.config import load_config
from serve_harness import Daemon, RssSampler, Subscriber, build_bank, camera_socket, wait_joined

LATE = "linewatch_late_results_total"
JUDGED = ("pass", "fail")


def frame_maker(images: list[np.ndarray], encoding: str, big_png: bytes | None = None):
    """make(camera, frame_id) -> message parts, capture_ts now. Images are encoded once; camera
    "big" sends `big_png` (16-bit, so built by hand: wire.encode_frame encodes uint8 only)."""
    encoded = [wire.encode_frame("x", 0, im, encoding=encoding) for im in images]

    def make(camera: str, fid: int) -> list[bytes]:
        if camera == "big":
            header = {"v": 1, "camera": camera, "frame_id": fid, "capture_ts": time.time(), "encoding": "png"}
            return [camera.encode(), json.dumps(header).encode(), big_png]
        _, header, payload = encoded[fid % len(encoded)]
        header = {**json.loads(header), "camera": camera, "frame_id": fid, "capture_ts": time.time()}
        return [camera.encode(), json.dumps(header).encode(), payload]

    return make


def big_png() -> bytes:
    """A 7000x7000 16-bit RGBA PNG, mostly one grey, so the file is small (~400 KB)."""
    image = np.full((7000, 7000, 4), 30000, np.uint16)
    image[:, :, 3] = 65535
    image[3000:3100, 3000:3100, :3] = 50000  # a small square, so it is not a single colour
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def schedule(rates: dict[str, float], duration_s: float, next_id: Counter) -> list[tuple[float, str, int]]:
    """(time from start, camera, frame_id) for each camera at its rate; ids continue `next_id`."""
    events = []
    for camera, fps in rates.items():
        for k in range(int(duration_s * fps)):
            events.append((k / fps, camera, next_id[camera]))
            next_id[camera] += 1
    return sorted(events)


def send(sock: zmq.Socket, make, events: list[tuple[float, str, int]], duration_s: float) -> float:
    """Send every event at its absolute time from now; returns seconds of sending (>= duration_s)."""
    t0 = time.monotonic()
    for t, camera, fid in events:
        delay = t0 + t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        sock.send_multipart(make(camera, fid), copy=False)
    return max(duration_s, time.monotonic() - t0)


def closed_loop(sock: zmq.Socket, sub: Subscriber, make, window: int, warmup_s: float, measure_s: float,
                deadline_s: float, next_id: Counter) -> tuple[float, list[tuple[str, int]]]:
    """Camera "cap" keeps `window` frames outstanding: a frame holds its slot until it is judged
    (pass/fail), or, when refused (shed/timeout/error), until its deadline from sending has
    passed, so that refusals, which come back at once, cannot turn the loop into a flood.
    Returns judged/s after the warm-up, and the frames sent."""
    keys: list[tuple[str, int]] = []
    sent_at: dict[tuple[str, int], float] = {}
    busy: set[tuple[str, int]] = set()  # frames holding a slot
    t0 = time.monotonic()
    start = None  # (time, judged) when the measurement began
    while True:
        now = time.monotonic()
        with sub.lock:
            judged = sub.by_camera[("cap", "pass")] + sub.by_camera[("cap", "fail")]
            for key in list(busy):
                answer = sub.first.get(key)
                if answer and (answer[0] in JUDGED or now - sent_at[key] >= deadline_s):
                    busy.discard(key)
        if start is None and now - t0 >= warmup_s:
            start = (now, judged)
        if start is not None and now - start[0] >= measure_s:
            return (judged - start[1]) / (now - start[0]), keys
        if len(busy) >= window:
            with sub.lock:
                sub.cond.wait(0.05)
            continue
        key = ("cap", next_id["cap"])
        next_id["cap"] += 1
        sock.send_multipart(make(*key), copy=False)
        keys.append(key)
        sent_at[key] = time.monotonic()
        busy.add(key)


def summarize(sub: Subscriber, keys: list[tuple[str, int]], seconds: float) -> dict:
    """Figures of the frames `keys`, sent over `seconds`, from the verdict stream."""
    with sub.lock:
        answers = Counter(sub.per_frame[k] for k in keys)
        first = [sub.first[k] for k in keys if k in sub.first]
    values = Counter(v for v, _, _ in first)
    reasons = Counter(f"{v}/{r}" for v, r, _ in first if v not in JUDGED)
    latencies = [lat for v, _, lat in first if v in JUDGED and lat is not None]
    judged = sum(values[v] for v in JUDGED)
    return {
        "sent": len(keys),
        "offered_fps": len(keys) / seconds,
        "judged": judged,
        "judged_per_s": judged / seconds,
        "verdicts": dict(values),
        "reasons": dict(reasons),
        "not_once": len(keys) - answers[1],
        "answers_per_frame": {str(n): c for n, c in sorted(answers.items())},
        "p50_ms": float(np.percentile(latencies, 50)) * 1000 if latencies else None,
        "p99_ms": float(np.percentile(latencies, 99)) * 1000 if latencies else None,
    }


def run_phase(daemon: Daemon, sub: Subscriber, sock: zmq.Socket, make, events, duration_s: float,
              pause_s: float) -> tuple[float, float, list[tuple[str, int]]]:
    """Send `events`, await every verdict, let the daemon drain; returns (seconds of sending,
    late results during the phase, the frames sent)."""
    late0 = daemon.metrics().get(LATE, 0.0)
    seconds = send(sock, make, events, duration_s)
    keys = [(camera, fid) for _, camera, fid in events]
    if not sub.settle(keys, 60.0):
        print("  (some frames still without a verdict after 60 s)", flush=True)
    time.sleep(pause_s)
    return seconds, daemon.metrics().get(LATE, 0.0) - late0, keys


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def line(name: str, s: dict, capacity: float, late: float | None = None) -> str:
    v = s["verdicts"]
    late_s = "-" if late is None else f"{late:.0f} ({100 * late / max(1.0, s['judged'] + late):.1f}%)"
    return (f"{name:<14} {s['offered_fps']:7.1f} {s['judged_per_s']:8.2f} {s['judged_per_s'] / capacity:6.2f} "
            f"{v.get('pass', 0):5d} {v.get('fail', 0):5d} {v.get('shed', 0):5d} {v.get('timeout', 0):5d} "
            f"{v.get('error', 0):5d} {late_s:>12} {ms(s['p50_ms']):>5}/{ms(s['p99_ms']):<5} {s['not_once']:4d}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capacity-s", type=float, default=20.0, help="closed-loop measurement per window")
    ap.add_argument("--warmup-s", type=float, default=3.0, help="closed-loop warm-up per window")
    ap.add_argument("--windows", type=int, nargs="+", default=None,
                    help="closed-loop frames outstanding, one run each; default 1 2 4 max_batch 2xmax_batch")
    ap.add_argument("--phase-s", type=float, default=30.0, help="seconds of sending per open-loop phase")
    ap.add_argument("--pause-s", type=float, default=5.0, help="drain time after each phase's last verdict")
    ap.add_argument("--loads", type=float, nargs="+", default=[0.5, 1, 2, 3, 5], help="x capacity")
    ap.add_argument("--encoding", choices=["png", "raw", "jpeg"], default="png")
    ap.add_argument("--slow-fps", type=float, default=10.0)
    ap.add_argument("--flood-fps", type=float, default=None, help="default 4 x capacity")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    t_run = time.monotonic()
    loadavg_start = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    work = Path(args.work or tempfile.mkdtemp(prefix="lw-overload-"))
    print(f"work folder {work}; building the bank", flush=True)
    bank, images = build_bank(work)
    daemon = Daemon(work, bank, ingest={"cameras": []})
    print(f"ready in {daemon.start():.2f} s", flush=True)
    sub = Subscriber(daemon.publish_url)
    sub.start()
    ctx = zmq.Context()
    sock = camera_socket(ctx, daemon)
    wait_joined(sock, sub, images[0])
    make = frame_maker(images, args.encoding)
    next_id: Counter = Counter()
    all_keys: list[tuple[str, int]] = []
    out: dict = {"encoding": args.encoding, "frame_shape": list(images[0].shape), "args": vars(args)}

    # ---------------------------------------------------------------- capacity
    config = load_config(daemon.config)
    deadline_s = config.runtime.pipeline.deadline_ms / 1000
    max_batch = config.runtime.batch.max_batch
    windows = args.windows or sorted({1, 2, 4, max_batch, 2 * max_batch})
    print(f"\ncapacity: closed loop, windows {windows}, each {args.warmup_s:g} s warm-up + {args.capacity_s:g} s",
          flush=True)
    out["capacity_by_window"] = {}
    for window in windows:
        t = time.monotonic()
        rate, keys = closed_loop(sock, sub, make, window, args.warmup_s, args.capacity_s, deadline_s, next_id)
        sub.settle(keys, 60.0)
        all_keys += keys
        s = summarize(sub, keys, time.monotonic() - t)  # counts include the warm-up
        s["judged_per_s"] = rate  # after the warm-up
        out["capacity_by_window"][window] = s
        print(f"  window {window}: {rate:.2f} judged/s; verdicts {s['verdicts']}, "
              f"p50/p99 {ms(s['p50_ms'])}/{ms(s['p99_ms'])} ms", flush=True)
        time.sleep(1.0)
    window, capacity = max(((w, s["judged_per_s"]) for w, s in out["capacity_by_window"].items()), key=lambda x: x[1])
    out.update(capacity_judged_per_s=capacity, capacity_window=window)
    print(f"  capacity {capacity:.2f} judged/s (window {window})", flush=True)
    time.sleep(args.pause_s)

    # ---------------------------------------------------------------- load curve
    out["load"] = []
    for load in args.loads:
        camera = f"load{load:g}x"
        rate = load * capacity
        print(f"\nload {load:g}x: camera {camera} at {rate:.1f} fps for {args.phase_s:.0f} s", flush=True)
        events = schedule({camera: rate}, args.phase_s, next_id)
        seconds, late, keys = run_phase(daemon, sub, sock, make, events, args.phase_s, args.pause_s)
        all_keys += keys
        s = {"load": load, **summarize(sub, keys, seconds), "late": late}
        s["late_share"] = late / max(1.0, s["judged"] + late)
        out["load"].append(s)
        print(f"  {s}", flush=True)

    # ---------------------------------------------------------------- fairness
    flood_fps = args.flood_fps or round(4 * capacity)
    share_slow = min(args.slow_fps, capacity / 2)
    shares = {"slow": share_slow, "flood": min(flood_fps, capacity - share_slow)}
    print(f"\nfairness: slow at {args.slow_fps:g} fps beside flood at {flood_fps:g} fps for {args.phase_s:.0f} s; "
          f"max-min shares {shares['slow']:.1f} / {shares['flood']:.1f}", flush=True)
    events = schedule({"slow": args.slow_fps, "flood": flood_fps}, args.phase_s, next_id)
    seconds, late, keys = run_phase(daemon, sub, sock, make, events, args.phase_s, args.pause_s)
    all_keys += keys
    out["fairness"] = {"late": late}
    for camera in ("slow", "flood"):
        s = summarize(sub, [k for k in keys if k[0] == camera], seconds)
        s.update(share=shares[camera], of_share=s["judged_per_s"] / shares[camera])
        out["fairness"][camera] = s
        print(f"  {camera}: {s}", flush=True)

    # ---------------------------------------------------------------- big PNGs
    png = big_png()
    make = frame_maker(images, args.encoding, png)
    print(f"\nbig: two 7000x7000 16-bit RGBA PNGs ({len(png) / 1024:.0f} KB each) at once, 1 s into "
          f"{args.phase_s:.0f} s of slow at {args.slow_fps:g} fps", flush=True)
    events = schedule({"slow": args.slow_fps}, args.phase_s, next_id)
    events = sorted(events + [(1.0, "big", next_id["big"]), (1.0, "big", next_id["big"] + 1)])
    next_id["big"] += 2
    hwm_before = daemon.hwm_mb()
    sampler = RssSampler(daemon.proc.pid, 0.05)
    sampler.start()
    seconds, late, keys = run_phase(daemon, sub, sock, make, events, args.phase_s, 0.0)
    sampler.close()
    hwm_after = daemon.hwm_mb()
    time.sleep(args.pause_s)
    all_keys += keys
    with sub.lock:
        bigs = [sub.first.get(k, ("none", None, None)) for k in keys if k[0] == "big"]
    peak = max(sampler.peak_mb(), hwm_after if hwm_after > hwm_before else 0.0)
    out["big"] = {
        "png_bytes": len(png),
        "verdicts": [{"verdict": v, "reason": r, "latency_s": lat} for v, r, lat in bigs],
        "rss_before_mb": sampler.samples[0][1] if sampler.samples else None,
        "rss_peak_sampled_mb": sampler.peak_mb(),
        "hwm_before_mb": hwm_before,
        "hwm_after_mb": hwm_after,
        "peak_mb": peak,
        "slow": summarize(sub, [k for k in keys if k[0] == "slow"], seconds),
    }
    print(f"  {out['big']}", flush=True)

    # ---------------------------------------------------------------- the end
    with sub.lock:
        not_once = sum(sub.per_frame[k] != 1 for k in all_keys)
        lost = sub.lost
    rc = daemon.stop()
    sub.close()
    sock.close(linger=0)
    ctx.term()
    out.update(frames=len(all_keys), not_once=not_once, seq_gaps=lost, serve_exit=rc,
               run_s=time.monotonic() - t_run, loadavg_start=loadavg_start, loadavg_end=os.getloadavg()[0])

    print(f"\ncapacity {capacity:.2f} judged/s (closed loop, window {out['capacity_window']}, {args.encoding} "
          f"{images[0].shape[1]}x{images[0].shape[0]}); by window: "
          + ", ".join(f"{w}: {s['judged_per_s']:.2f}" for w, s in out["capacity_by_window"].items()))
    print(f"run took {out['run_s']:.0f} s; machine load average (1 min) {out['loadavg_start']:.1f} at the start, "
          f"{out['loadavg_end']:.1f} at the end")
    print(f"{'phase':<14} {'offered':>7} {'judged/s':>8} {'/cap':>6} {'pass':>5} {'fail':>5} {'shed':>5} "
          f"{'tmout':>5} {'error':>5} {'late (%work)':>12} {'p50/p99 ms':>11} {'!=1':>4}")
    for s in out["load"]:
        print(line(f"{s['load']:g}x", s, capacity, s["late"]))
    for camera in ("slow", "flood"):
        s = out["fairness"][camera]
        print(line(f"fair {camera}", s, capacity) + f"  share {s['share']:.1f}, judged/share {s['of_share']:.2f}")
    print(f"{'':<14} fairness phase late results: {out['fairness']['late']:.0f}")
    print(line("big: slow", out["big"]["slow"], capacity))
    big_verdicts = ", ".join(f"{b['verdict']}/{b['reason']}" for b in out["big"]["verdicts"])
    print(f"{'':<14} big frames: {big_verdicts}; "
          f"peak RSS {peak:.0f} MB (VmHWM {hwm_before:.0f} -> {hwm_after:.0f} MB)")
    for s in out["load"]:
        if s["reasons"]:
            print(f"reasons {s['load']:g}x: {s['reasons']}")
    for camera in ("slow", "flood"):
        if out["fairness"][camera]["reasons"]:
            print(f"reasons fair {camera}: {out['fairness'][camera]['reasons']}")
    if out["big"]["slow"]["reasons"]:
        print(f"reasons big: slow: {out['big']['slow']['reasons']}")
    print(f"frames {len(all_keys)}, not answered exactly once {not_once}, verdict seq gaps {lost}, serve exit {rc}")

    print("\nissue 18 acceptance (printed, not asserted):")
    acceptance = []

    def accept(text: str, ok: bool) -> None:
        acceptance.append({"check": text, "ok": ok})
        print(f"  {'PASS' if ok else 'FAIL'}  {text}")

    at3 = next((s for s in out["load"] if s["load"] == 3), None)
    if at3:
        accept(f"judged/s at 3x {at3['judged_per_s']:.2f} >= 0.9 x capacity {capacity:.2f}",
               at3["judged_per_s"] >= 0.9 * capacity)
        accept(f"late results at 3x {100 * at3['late_share']:.1f} % <= 2 % of detector work", at3["late_share"] <= 0.02)
    slow = out["fairness"]["slow"]
    accept(f"slow camera judged {slow['judged_per_s']:.2f}/s >= 0.9 x its share {slow['share']:.1f}",
           slow["of_share"] >= 0.9)
    accept(f"every frame answered exactly once ({len(all_keys) - not_once}/{len(all_keys)})", not_once == 0)
    refused = all(b["verdict"] == "error" and b["reason"] in ("too_large", "bad_image") for b in out["big"]["verdicts"])
    slow_timeouts = out["big"]["slow"]["verdicts"].get("timeout", 0)
    accept(f"big PNGs refused ({refused}), peak RSS {peak:.0f} MB < 1200 MB, slow camera timeouts {slow_timeouts}",
           refused and peak < 1200 and slow_timeouts == 0)
    out["acceptance"] = acceptance
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 1 if not_once else 0


if __name__ == "__main__":
    sys.exit(main())
