"""Runtime benchmark (a script, not a test): prints figures.

    python benchmarks/runtime_bench.py [--frames 5000] [--rate 1000]

(a) ingest -> batch -> publish over loopback ZeroMQ with a no-op detector stage, 224x224 RGB
    raw frames: frames/s (burst) and added latency p50/p99 (paced). The camera and actuator
    run in a separate process, so they do not share the daemon's GIL; latency is sender
    capture_ts to actuator receive, on the same host clock. Targets: >= 2000 frames/s,
    <= 0.5 ms/frame added. Also the in-process pipeline alone (submit -> on_verdict).
(b) pipelined throughput of a 3-stage graph with known per-batch costs vs the slowest-stage
    bound (1 / max cost). Target ratio >= 0.85.
(c) the verdict path with the operator sinks: `Daemon._publish` (what the pipeline's output
    thread calls per verdict) timed per call with the archive, MQTT (a local Mosquitto) and the
    live page on, against all off, in the same run, variants interleaved. 224x224 frames, 30 %
    (--fail-share) fails (their pictures go to the archive), paced at --sink-rate verdicts/s. The sinks' own
    threads (pictures, MQTT) run meanwhile and compete for the GIL: that is part of the cost.
    Target: <= 0.2 ms added per verdict.

    python benchmarks/runtime_bench.py --only sinks [--verdicts 1000] [--sink-rate 200]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import shutil
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from linewatch.config import (
    BatchConfig, EndpointConfig, IngestConfig, MetricsConfig, PipelineConfig, PublishConfig, RuntimeConfig,
)
from linewatch.detector.result import InspectionResult
from linewatch.images import DEFAULT_SAMPLE_WINDOW
from linewatch.runtime.pipeline.runner import Pipeline
from linewatch.wire import Frame

SIZE = 224
FAIL_SHARE = 0.3  # failed parts in (c) unless --fail-share says otherwise


def is_fail(k: int, share: float) -> bool:
    """Whether the k-th verdict (from 0) fails, so that exactly `share` of them do, spread evenly."""
    return int((k + 1) * share) > int(k * share)


class NoopProcessor:
    """One stage that returns a constant result per image: the runtime's cost alone."""

    backend = "noop"
    bank_id = "bench"
    bank_images = 0
    calibration = None
    frame_size = None  # any size
    colour_mode = None  # colour or grey
    sample_window = DEFAULT_SAMPLE_WINDOW
    device = "cpu"

    def __init__(self, costs: list[tuple[str, float]] | None = None, fail_share: float = 0.0) -> None:
        """`fail_share`: this fraction of the results fail (spread evenly, `is_fail`; a failed
        part's pictures go to the archive), with a few objects, as the detector's results carry."""
        heat = np.zeros((SIZE, SIZE), np.float32)
        costs = costs or [("noop", 0.0)]
        judged = iter(range(1 << 62))
        objects = [{"bbox": [10.0 * i, 20.0, 30.0, 30.0], "status": "matched" if i else "missing", "score": 0.1 * i}
                   for i in range(6)]

        def result() -> InspectionResult:
            if is_fail(next(judged), fail_share):
                return InspectionResult(score=0.9, verdict="fail", threshold=0.5, heatmap=heat, objects=objects)
            return InspectionResult(score=0.1, verdict="pass", threshold=0.5, heatmap=heat, objects=objects)

        def make(i: int, cost: float):
            def stage(x: Any) -> Any:
                if cost:
                    time.sleep(cost)
                if i < len(costs) - 1:
                    return x
                return [result() for _ in x]
            return stage

        self.stages = [(name, make(i, c)) for i, (name, c) in enumerate(costs)]

    def check_image(self, image: np.ndarray, name: str) -> None:
        """Judges any image."""



def _pace(t0: float, k: int, rate: float | None) -> None:
    """Sleep until frame k's send time at `rate` frames/s from t0 (no pacing when rate is falsy)."""
    if rate:
        wait = t0 + k / rate - time.perf_counter()
        if wait > 0:
            time.sleep(wait)

def quiet_log() -> Any:
    import io
    import logging

    import structlog

    return structlog.wrap_logger(structlog.PrintLogger(io.StringIO()),
                                 wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


# ---------------------------------------------------------------- (a) over loopback


def _line_process(ingest_url: str, verdict_url: str, n: int, rate: float | None, out: Any) -> None:
    """Camera + actuator in their own process: send n frames, collect verdict latencies."""
    import zmq

    from linewatch import wire

    ctx = zmq.Context()
    cam = ctx.socket(zmq.PUB)
    cam.setsockopt(zmq.SNDHWM, 100_000)
    cam.connect(ingest_url)
    act = ctx.socket(zmq.SUB)
    act.setsockopt(zmq.RCVHWM, 100_000)
    act.setsockopt(zmq.SUBSCRIBE, b"")
    act.connect(verdict_url)
    image = np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), np.uint8)
    # Warm up until the PUB/SUB paths are connected both ways.
    i = 0
    while not act.poll(50):
        cam.send_multipart(wire.encode_frame("warm", i, image))
        i += 1
    time.sleep(0.3)
    while act.poll(100):
        act.recv_multipart()

    lat: list[float] = []
    values: Counter[str] = Counter()
    done = threading.Event()

    def receive() -> None:
        end = time.monotonic() + 60
        while len(lat) < n and time.monotonic() < end:
            if act.poll(200):
                v = wire.decode_verdict(act.recv_multipart())
                if v.camera == "cam0":
                    lat.append(time.time() - v.capture_ts)
                    values[v.verdict] += 1
        done.set()

    t = threading.Thread(target=receive)
    t.start()
    t0 = time.perf_counter()
    for k in range(n):
        _pace(t0, k, rate)
        cam.send_multipart(wire.encode_frame("cam0", k, image, capture_ts=time.time()))
    t_sent = time.perf_counter() - t0
    done.wait(70)
    t_all = time.perf_counter() - t0
    t.join(1)
    out.put({"lat": lat, "values": dict(values), "send_s": t_sent, "total_s": t_all})
    cam.close(linger=0)
    act.close(linger=0)
    ctx.term()


def bench_loopback(n: int, rate: float | None, max_delay_ms: float, sinks: dict[str, Any] | None = None,
                   fail_share: float = 0.0) -> dict[str, Any]:
    """`sinks`: runtime sections to set (archive, mqtt, live), e.g. {"archive": {"enabled": True, ...}}."""
    from linewatch.runtime.daemon import Daemon

    config = RuntimeConfig(
        ingest=IngestConfig(endpoints=[EndpointConfig(url="tcp://127.0.0.1:*")], receive_hwm=100_000, decode_workers=2),
        batch=BatchConfig(max_batch=8, max_delay_ms=max_delay_ms),
        pipeline=PipelineConfig(max_pending_frames=4096, deadline_ms=10_000),
        publish=PublishConfig(url="tcp://127.0.0.1:*", send_hwm=100_000),
        metrics=MetricsConfig(port=0),
        **(sinks or {"live": {"enabled": False}}),
    )
    daemon = Daemon(config, NoopProcessor(fail_share=fail_share), log=quiet_log())
    daemon.start()
    try:
        q: Any = mp.get_context("spawn").Queue()
        p = mp.get_context("spawn").Process(
            target=_line_process, args=(daemon.ingest.bound_urls[0], daemon.publisher.bound_url, n, rate, q))
        p.start()
        res = q.get(timeout=120)
        p.join(10)
    finally:
        daemon.stop()
    return res


# ---------------------------------------------------------------- in-process pipeline


def bench_inprocess(n: int, costs: list[tuple[str, float]], max_batch: int, max_delay_ms: float,
                    rate: float | None = None) -> dict[str, Any]:
    got: list[float] = []
    received: dict[int, float] = {}
    done = threading.Event()

    def on_verdict(v) -> None:
        got.append(time.monotonic() - received[v.frame_id])
        if len(got) == n:
            done.set()

    p = Pipeline(NoopProcessor(costs), BatchConfig(max_batch=max_batch, max_delay_ms=max_delay_ms),
                 PipelineConfig(max_pending_frames=n + 1, deadline_ms=60_000), on_verdict, log=quiet_log())
    p.start()
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    t0 = time.perf_counter()
    for k in range(n):
        _pace(t0, k, rate)
        now = time.monotonic()
        received[k] = now
        p.submit(Frame("cam0", k, time.time(), image, time.time(), now))
    done.wait(120)
    elapsed = time.perf_counter() - t0
    p.stop()
    return {"lat": got, "elapsed": elapsed, "n": len(got)}


# ---------------------------------------------------------------- (c) the verdict path with sinks


def _mosquitto(tmp: Path) -> tuple[Any, int] | None:
    """A local Mosquitto on a free port (None when it is not installed)."""
    import shutil
    import socket
    import subprocess

    exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    if exe is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            time.sleep(0.05)
    proc.kill()
    return None


def _verdicts(n: int, fail_share: float = FAIL_SHARE) -> list[Any]:
    from linewatch.wire import Verdict

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (SIZE, SIZE, 3), np.uint8)
    heat = rng.random((SIZE, SIZE), dtype=np.float32)
    objects = [{"bbox": [10.0 * i, 20.0, 30.0, 30.0], "status": "matched" if i else "missing", "score": 0.1 * i}
               for i in range(6)]
    out = []
    for k in range(n):
        fail = is_fail(k, fail_share)
        out.append(Verdict(camera="cam0", frame_id=k, verdict="fail" if fail else "pass", capture_ts=time.time(),
                           score=1.4 if fail else 0.6, threshold=1.0, objects=objects, latency_s=0.05,
                           backend="classic", bank_id="bench", heatmap=heat, image=image, run_id="bench", seq=k,
                           branch_scores={"objects": 1.0, "patch": 0.5}))
    return out


def bench_sinks(n: int, rate: float, fail_share: float = FAIL_SHARE, rounds: int = 3) -> dict[str, dict[str, list[float]]]:
    """Per-verdict cost (s) of Daemon._publish for each sink variant, verdicts paced at `rate`
    per second (0: back to back), variants interleaved per round. Returns per variant the
    p50 and p99 of each round and the sink drops counted."""
    import tempfile

    from linewatch.runtime.daemon import Daemon

    tmp = Path(tempfile.mkdtemp(prefix="lw-sinks-"))
    broker = _mosquitto(tmp)
    variants: dict[str, dict[str, Any]] = {"all off": {}, "archive": {"archive": True}, "live": {"live": True}}
    if broker is not None:
        variants["mqtt"] = {"mqtt": True}
        variants["archive+mqtt+live"] = {"archive": True, "mqtt": True, "live": True}
    else:
        print("    mqtt: no mosquitto here, MQTT variants left out")
        variants["archive+live"] = {"archive": True, "live": True}
    results: dict[str, dict[str, list[float]]] = {name: {"p50": [], "p99": [], "dropped": []} for name in variants}
    try:
        for r in range(rounds):
            for name, on in variants.items():
                config = RuntimeConfig(
                    ingest=IngestConfig(endpoints=[EndpointConfig(url="tcp://127.0.0.1:*")]),
                    publish=PublishConfig(url="tcp://127.0.0.1:*", send_hwm=100_000),
                    metrics=MetricsConfig(port=0),
                    live={"enabled": bool(on.get("live"))},
                    archive={"enabled": bool(on.get("archive")), "path": str(tmp / f"archive-{r}-{name}")},
                    mqtt={"enabled": bool(on.get("mqtt")), "port": broker[1] if broker else 1883, "qos": 1,
                          "max_queued": 65_535},
                )
                daemon = Daemon(config, NoopProcessor(), log=quiet_log())
                daemon.start()
                try:
                    batch = _verdicts(n, fail_share)
                    per_call = []
                    t0 = time.perf_counter()
                    for k, v in enumerate(batch):
                        _pace(t0, k, rate)
                        t = time.perf_counter()
                        daemon._publish(v)
                        per_call.append(time.perf_counter() - t)
                    results[name]["p50"].append(pct(per_call, 50))
                    results[name]["p99"].append(pct(per_call, 99))
                finally:
                    daemon.stop()
                results[name]["dropped"].append(sum(
                    s.value for f in daemon.metrics.registry.collect() if f.name == "linewatch_sink_dropped"
                    for s in f.samples if s.name.endswith("_total")))
    finally:
        if broker is not None:
            broker[0].kill()
        shutil.rmtree(tmp, ignore_errors=True)  # the archives' pictures: hundreds of MB a run
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=5000)
    ap.add_argument("--rate", type=float, default=1000.0, help="paced rate for the latency runs, frames/s")
    ap.add_argument("--verdicts", type=int, default=1000, help="verdicts per variant and round in (c)")
    ap.add_argument("--sink-rate", type=float, default=200.0,
                    help="verdicts per second in (c) (0: back to back, far beyond any camera)")
    ap.add_argument("--fail-share", type=float, default=FAIL_SHARE,
                    help="share of failed parts in (c), spread evenly (their pictures go to the archive)")
    ap.add_argument("--only", choices=("runtime", "sinks"), help="run only (a)-(b) or only (c)")
    args = ap.parse_args()
    n = args.frames
    if args.only != "sinks":
        bench_runtime(n, args.rate)
    if args.only != "runtime":
        print(f"(c) verdict path with the operator sinks: Daemon._publish per verdict, {args.verdicts} verdicts "
              f"per variant at {args.sink_rate:g}/s, 3 interleaved rounds, {SIZE}x{SIZE} frames, "
              f"{args.fail_share:.0%} fails")
        res = bench_sinks(args.verdicts, args.sink_rate, args.fail_share)
        base50, base99 = (float(np.median(res["all off"][q])) for q in ("p50", "p99"))
        for name, r in res.items():
            p50, p99 = float(np.median(r["p50"])), float(np.median(r["p99"]))
            rounds = ", ".join(f"{a * 1e6:.0f}/{b * 1e6:.0f}" for a, b in zip(r["p50"], r["p99"]))
            extra = "" if name == "all off" else (f"; added p50 {(p50 - base50) * 1e3:.3f} ms (ratio {p50 / base50:.1f}), "
                                                  f"p99 {(p99 - base99) * 1e3:.3f} ms  (target <= 0.2 ms added)")
            print(f"    {name:18s} p50 {p50 * 1e6:6.1f} us, p99 {p99 * 1e6:6.1f} us per verdict (rounds p50/p99 us: "
                  f"{rounds}; sink drops {int(sum(r['dropped']))}){extra}")
        rate = args.sink_rate or 200.0
        print(f"(c') end to end: camera -> daemon -> actuator over loopback (as (a)), {args.verdicts} frames at "
              f"{rate:g}/s, {args.fail_share:.0%} fails; each sink alone and all on vs all off, 3 interleaved rounds")
        e2e = bench_sinks_end_to_end(args.verdicts, rate, args.fail_share)
        off50, off99 = (float(np.median([x[i] for x in e2e["all off"]])) for i in (0, 1))
        for name, per in e2e.items():
            p50, p99 = (float(np.median([x[i] for x in per])) for i in (0, 1))
            extra = "" if name == "all off" else (f"; added p50 {(p50 - off50) * 1e3:.3f} ms, p99 {(p99 - off99) * 1e3:.3f} ms"
                                                  "  (target <= 0.2 ms added)")
            print(f"    {name:15s} capture->verdict p50 {p50 * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms (rounds: "
                  + ", ".join(f"{a * 1e3:.2f}/{b * 1e3:.2f}" for a, b in per) + ")" + extra)


def bench_sinks_end_to_end(n: int, rate: float, fail_share: float = FAIL_SHARE,
                           rounds: int = 3) -> dict[str, list[tuple[float, float]]]:
    """Camera -> daemon -> actuator over loopback (as (a)), `fail_share` fails, each sink on alone and all
    on vs all off, interleaved: capture->verdict (p50, p99) per round, seconds."""
    import tempfile

    from linewatch.runtime.sinks import mqtt_client as mqtt_module

    tmp = Path(tempfile.mkdtemp(prefix="lw-sinks-e2e-"))
    broker = _mosquitto(tmp)

    # "mqtt, no settle": the MQTT sink's thread starting on a verdict at once (SETTLE_S 0), as before
    mqtt_variants = ["mqtt", "mqtt, no settle"] if broker is not None else []
    variants = ["all off", "archive", "live", *mqtt_variants, "all on"]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    settle = mqtt_module.SETTLE_S
    try:
        for r in range(rounds):
            for name in variants:
                sinks: dict[str, Any] = {"live": {"enabled": name in ("live", "all on")}}
                if name in ("archive", "all on"):
                    sinks["archive"] = {"enabled": True, "path": str(tmp / f"archive-{r}-{name}")}
                if (name in mqtt_variants or name == "all on") and broker is not None:
                    sinks["mqtt"] = {"enabled": True, "port": broker[1], "qos": 1}
                mqtt_module.SETTLE_S = 0.0 if name == "mqtt, no settle" else settle
                lat = bench_loopback(n, rate, 0.0, sinks=sinks, fail_share=fail_share)["lat"]
                results[name].append((pct(lat, 50), pct(lat, 99)))
    finally:
        mqtt_module.SETTLE_S = settle
        if broker is not None:
            broker[0].kill()
        shutil.rmtree(tmp, ignore_errors=True)  # the archives' pictures: hundreds of MB a run
    return results


def bench_runtime(n: int, rate_fps: float) -> None:

    print(f"(a) loopback ZMQ, {SIZE}x{SIZE} raw RGB, no-op stage, max_batch 8")
    r = bench_loopback(n, None, max_delay_ms=1.0)
    fps = len(r["lat"]) / r["total_s"]
    print(f"    burst {n} frames: {len(r['lat'])} verdicts {r['values']} in {r['total_s']:.2f} s"
          f" -> {fps:.0f} frames/s  (target >= 2000)")
    for delay in (0.0, 10.0):
        r = bench_loopback(n // 2, rate_fps, max_delay_ms=delay)
        lat_ms = [x * 1000 for x in r["lat"]]
        print(f"    paced {rate_fps:.0f} frames/s, max_delay_ms={delay:g}: {len(lat_ms)} verdicts {r['values']};"
              f" capture->verdict p50 {pct(lat_ms, 50):.2f} ms p99 {pct(lat_ms, 99):.2f} ms"
              + ("  (target <= 0.5 ms added)" if delay == 0 else "  (includes batch wait)"))

    print("(a') in-process pipeline only (submit -> on_verdict), no-op stage, max_batch 8")
    r = bench_inprocess(n, [("noop", 0.0)], 8, 1.0)
    print(f"    burst {n} frames in {r['elapsed']:.2f} s -> {r['n'] / r['elapsed']:.0f} frames/s,"
          f" {r['elapsed'] / max(r['n'], 1) * 1e3:.3f} ms/frame")
    r = bench_inprocess(n // 2, [("noop", 0.0)], 8, 0.0, rate=rate_fps)
    lat_ms = [x * 1000 for x in r["lat"]]
    print(f"    paced {rate_fps:.0f} frames/s, max_delay 0: received->verdict p50 {pct(lat_ms, 50):.3f} ms"
          f" p99 {pct(lat_ms, 99):.3f} ms")

    print("(b) pipelined 3-stage graph, costs 5/10/5 ms per batch, max_batch 1")
    costs = [("pre", 0.005), ("net", 0.010), ("post", 0.005)]
    r = bench_inprocess(300, costs, 1, 0.0)
    bound = 1 / max(c for _, c in costs)
    rate = r["n"] / r["elapsed"]
    print(f"    {r['n']} batches in {r['elapsed']:.2f} s -> {rate:.1f} batches/s; slowest-stage bound {bound:.0f}/s;"
          f" ratio {rate / bound:.2f} (target >= 0.85; sequential would be {1 / sum(c for _, c in costs) / bound:.2f})")


if __name__ == "__main__":
    main()
