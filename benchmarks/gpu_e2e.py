"""End-to-end daemon run with the SAM-LAD models at full size: prints and writes what it measured.

    python benchmarks/gpu_e2e.py --out e2e.json [--duration 60] [--rates 30 100] [--set KEY=VALUE ...]
        [--serve-set KEY=VALUE ...] [--restart]
    python benchmarks/gpu_e2e.py --device cpu --size 256 --duration 5 --rates 2 --out /tmp/e2e.json   (CPU try)
    python benchmarks/gpu_e2e.py --device cpu --tiny --size 128 --duration 3 --rates 2 --out /tmp/e2e.json
        (tiny random models through benchmarks/tiny_cli.py: the plumbing in a minute on a CPU)

Steps, each through the project's own commands (`python -m linewatch.cli`, as the installed `linewatch`):
  1. benchmarks/random_checkpoints.py writes DINOv2 ViT-S/14, FeatUp's JBU stack and SAM vit_b with RANDOM
     weights in the official layouts; the config names them by path, so the real loaders read them.
  2. `linewatch sim generate` draws --size x --size frames: good ones for the bank, good and anomalous test
     ones, written again as JPEG files for the replay.
  3. `linewatch bank build`, then `linewatch serve` (free loopback ports; /readyz polled up to a deadline).
  4. A few warm-up frames, then per rate: `linewatch replay --fps RATE --encoding jpeg --loop --count
     RATE*duration` with one camera id per rate, while a ZeroMQ subscriber here collects the verdicts.
  5. SIGTERM to serve, which must exit 0.
  6. With --restart: `linewatch serve` started again on the same bank (torch.compile's caches warm from the
     first start), the seconds until /readyz answers 200 (restart_ready_s), and SIGTERM again.
--set applies to the config of every command, --serve-set (e.g. detector.compile=true) to serve's alone: the bank
is built without paying for compilation (detector.compile is not part of the bank's fingerprint).
The JSON is written after each step, so a run stopped by a timeout leaves what it had measured.

Per rate: frames sent; verdicts received, by value and by reason; judged frames/s = (pass + fail verdicts - 1) over
the time from the first to the last of them; capture->verdict latency p50/p99 = verdict receive time minus the
frame's capture_ts (replay stamps it at send time; same host clock); the send rate replay achieved (from those
capture_ts); the largest GPU memory seen by a 1 s sampler: the daemon's linewatch_gpu_memory_bytes gauges (torch
allocator; the daemon exports the current value, not a peak) and nvidia-smi's memory.used (whole GPU).
The weights are random: the compute is that of the real models; SAM's masks and the verdicts mean nothing.
On a CPU (--device cpu) SAM vit_b takes seconds per frame: the run checks the plumbing, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's linewatch, also when another one is pip-installed
    sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402
import zmq  # noqa: E402

from linewatch import wire  # noqa: E402

VALUES = ("pass", "fail", "error", "timeout", "shed")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}


class E2EError(Exception):
    """A step failed; the message says which and shows the end of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY = {"flag": False}  # --tiny: every command through benchmarks/tiny_cli.py


def cli(*args: str) -> list[str]:
    """The `linewatch` command of this checkout (pyproject's [project.scripts]: linewatch.cli:main); with
    --tiny, the same through benchmarks/tiny_cli.py (tiny random samlad models)."""
    if TINY["flag"]:
        return [sys.executable, str(ROOT / "benchmarks" / "tiny_cli.py"), *args]
    return [sys.executable, "-m", "linewatch.cli", *args]


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def run_step(name: str, cmd: list[str], log: Path, timeout_s: float) -> float:
    """Run a command with its output appended to `log`; returns its wall seconds, raises E2EError on failure."""
    t0 = time.monotonic()
    with open(log, "ab") as out:
        out.write(f"\n==> {name}: {' '.join(cmd)}\n".encode())
        out.flush()
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT,
                                timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            raise E2EError(f"{name} took longer than {timeout_s:.0f} s; end of {log}:\n{tail(log)}") from None
    if rc != 0:
        raise E2EError(f"{name} exited with {rc}; end of {log}:\n{tail(log)}")
    return time.monotonic() - t0


def set_key(config: dict, dotted: str, value: Any) -> None:
    """config["a"]["b"]["c"] = value for "a.b.c", creating sections."""
    *path, last = dotted.split(".")
    for key in path:
        config = config.setdefault(key, {})
    config[last] = value


def make_config(args, work: Path, checkpoints: dict[str, Path], ports: dict[str, int],
                extra: list[str] = (), name: str = "e2e.yaml") -> Path:
    """The daemon's YAML: samlad on args.device, checkpoints by path (--tiny: none, tiny models' settings),
    loopback ports, --set overrides, then `extra` ones (serve's --serve-set)."""
    sam: dict[str, Any] = {"pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    samlad: dict[str, Any] = {"weights_dir": str(work / "models"), "sam": sam}
    if checkpoints:
        sam["checkpoint"] = str(checkpoints["sam"])
        samlad.update(backbone_checkpoint=str(checkpoints["backbone"]), upsampler_checkpoint=str(checkpoints["upsampler"]))
    if args.sam_points_per_side is not None:
        sam["points_per_side"] = args.sam_points_per_side
    detector: dict[str, Any] = {"backend": "samlad", "device": args.device, "image_size": args.image_size,
                                "samlad": samlad}
    if args.tiny:  # as tests/detector/samlad_models.py: 1-block models at 112 px, a 2 x 2 grid, two JBU stages
        samlad.update(upsample_stages=2, allow_untrained_upsampler_setup=True)
        sam["coarse_points_per_side"] = 1
        detector["objects"] = {"min_area": 0.0005, "max_area": 0.9, "max_objects": 6}
    config: dict[str, Any] = {
        "detector": detector,
        "bank": {"path": str(work / "bank.lwbank")},
        "runtime": {
            "ingest": {"endpoints": [{"url": f"tcp://127.0.0.1:{ports['ingest']}"}], "receive_hwm": 1000,
                       "decode_workers": args.decode_workers},
            "publish": {"url": f"tcp://127.0.0.1:{ports['publish']}", "send_hwm": 100_000},
            "metrics": {"host": "127.0.0.1", "port": ports["metrics"]},
            "logging": {"level": "INFO", "format": "json"},
        },
    }
    if args.tiny:
        config["calibration"] = {"min_validation_images": min(5, args.validation)}
    for item in [*args.set, *extra]:
        key, sep, value = item.partition("=")
        if not sep:
            raise E2EError(f"--set {item!r}: expected KEY=VALUE")
        set_key(config, key, yaml.safe_load(value))
    path = work / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def make_frames(args, work: Path, log: Path) -> tuple[Path, Path, Path]:
    """`linewatch sim generate`; returns (good, validation, replay) folders, the replay one holding the test
    images (good and anomalous) as JPEG files."""
    n = args.test_per_kind
    run_step("sim generate", cli("sim", "generate", "--out", str(work / "sim"), "--product", args.product,
                                 "--seed", "0", "--size", str(args.size), "--train", str(args.good),
                                 "--validation", str(args.validation), "--test-good", str(n), "--test-logical",
                                 str(n), "--test-structural", str(n), "--quiet"), log, 600)
    root = work / "sim" / args.product
    replay = work / "replay"
    replay.mkdir()
    for kind in ("good", "logical_anomalies", "structural_anomalies"):
        for png in sorted((root / "test" / kind).glob("*.png")):
            cv2.imwrite(str(replay / f"{kind}_{png.stem}.jpg"), cv2.imread(str(png)), [cv2.IMWRITE_JPEG_QUALITY, 95])
    return root / "train" / "good", root / "validation" / "good", replay


class Subscriber(threading.Thread):
    """Verdicts from the daemon's PUB socket, per camera: value, capture_ts, receive time, reason."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.setsockopt(zmq.RCVHWM, 1_000_000)
        self.sock.connect(url)
        self.lock = threading.Lock()
        self.seen: dict[str, list[tuple[str, float, float, str | None]]] = {}  # camera -> verdicts
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if not self.sock.poll(100):
                continue
            parts = self.sock.recv_multipart()
            received = time.time()
            v = wire.decode_verdict(parts)
            with self.lock:
                self.seen.setdefault(v.camera, []).append((v.verdict, v.capture_ts, received, v.reason))

    def count(self, camera: str) -> int:
        with self.lock:
            return len(self.seen.get(camera, []))

    def verdicts(self, camera: str) -> list[tuple[str, float, float, str | None]]:
        with self.lock:
            return list(self.seen.get(camera, []))

    def close(self) -> None:
        self.stop.set()
        self.join(5)
        self.sock.close(linger=0)
        self.ctx.term()


class Serve:
    """`linewatch serve` as a child process, and its HTTP endpoints."""

    def __init__(self, config: Path, metrics_port: int, log: Path) -> None:
        self.base = f"http://127.0.0.1:{metrics_port}"
        self.log_path = log
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(cli("serve", "-c", str(config)), stdout=self.log, stderr=subprocess.STDOUT,
                                     env=ENV, cwd=ROOT)

    def wait_ready(self, timeout_s: float) -> float:
        """Seconds until /readyz answered 200; E2EError if serve exits or the deadline passes."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise E2EError(f"serve exited with {self.proc.returncode} before /readyz answered 200; "
                               f"end of {self.log_path}:\n{tail(self.log_path)}")
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.2)
        raise E2EError(f"serve: /readyz did not answer 200 within {timeout_s:.0f} s; "
                       f"end of {self.log_path}:\n{tail(self.log_path)}")

    def metrics(self) -> dict[str, float]:
        """Sample name{labels} -> value from /metrics (labels sorted, as Prometheus' text shows them)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(self.base + "/metrics", timeout=5) as r:
            text = r.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def stop(self, timeout_s: float = 60.0) -> int | None:
        """SIGTERM, wait; returns the exit status (None if it had to be killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                self.log.close()
                return None
        self.log.close()
        return self.proc.returncode


class MemorySampler(threading.Thread):
    """Every `interval_s`: the daemon's GPU memory gauges and nvidia-smi's memory.used; keeps the largest."""

    def __init__(self, serve: Serve, interval_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.serve = serve
        self.interval_s = interval_s
        self.smi = shutil.which("nvidia-smi")
        self.peak: dict[str, float] = {}
        self.stop = threading.Event()

    def sample(self) -> None:
        try:
            m = self.serve.metrics()
            for kind in ("allocated", "reserved"):
                value = m.get(f"linewatch_gpu_memory_bytes{{kind={kind}}}")
                if value is not None:
                    key = f"daemon_{kind}_mib"
                    self.peak[key] = max(self.peak.get(key, 0.0), value / 2**20)
        except OSError:
            pass
        if self.smi:
            try:
                out = subprocess.run([self.smi, "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout.split()
                if out:
                    self.peak["nvidia_smi_used_mib"] = max(self.peak.get("nvidia_smi_used_mib", 0.0), float(out[0]))
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass

    def run(self) -> None:
        while not self.stop.is_set():
            self.sample()
            self.stop.wait(self.interval_s)

    def finish(self) -> dict[str, float]:
        self.stop.set()
        self.join(10)
        self.sample()
        return {k: round(v, 1) for k, v in self.peak.items()}


def replay(folder: Path, port: int, rate: float, count: int, camera: str, log: Path, timeout_s: float) -> int:
    """`linewatch replay`; returns the frames it says it sent."""
    cmd = cli("replay", str(folder), "--endpoint", f"tcp://127.0.0.1:{port}", "--fps", f"{rate:g}",
              "--encoding", "jpeg", "--loop", "--count", str(count), "--camera", camera)
    run_step(f"replay {camera}", cmd, log, timeout_s)
    found = re.findall(r"sent (\d+) frame\(s\)", tail(log, 5))
    return int(found[-1]) if found else count


def wait_for(predicate, timeout_s: float, interval_s: float = 0.1) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def run_rate(args, rate: float, serve: Serve, sub: Subscriber, replay_dir: Path, ingest_port: int, log: Path,
             drain_s: float) -> dict[str, Any]:
    """One rate: replay RATE*duration frames, collect their verdicts, sample GPU memory."""
    camera = f"rate{rate:g}"
    count = max(1, int(round(rate * args.duration)))
    sampler = MemorySampler(serve)
    sampler.start()
    sent = replay(replay_dir, ingest_port, rate, count, camera, log, timeout_s=args.duration * 3 + 60)
    complete = wait_for(lambda: sub.count(camera) >= sent, drain_s)
    memory = sampler.finish()
    verdicts = sub.verdicts(camera)
    values = Counter(v for v, _, _, _ in verdicts)
    reasons = Counter(f"{v}:{reason}" for v, _, _, reason in verdicts if reason)
    judged = [(capture, received) for v, capture, received, _ in verdicts if v in ("pass", "fail")]
    received = sorted(r for _, _, r, _ in verdicts)
    captures = sorted(c for _, c, _, _ in verdicts)
    judged_span = (max(r for _, r in judged) - min(r for _, r in judged)) if len(judged) > 1 else 0.0
    return {
        "rate_fps": rate,
        "camera": camera,
        "frames_sent": sent,
        "verdicts_received": len(verdicts),
        "all_answered": complete and len(verdicts) == sent,
        "verdicts": {v: values.get(v, 0) for v in VALUES},
        "reasons": dict(reasons),
        "judged_fps": round((len(judged) - 1) / judged_span, 2) if judged_span > 0 else None,
        "judged_window_s": round(judged_span, 2),
        "latency_ms_judged": {"p50": pct([1000 * (r - c) for c, r in judged], 50),
                              "p99": pct([1000 * (r - c) for c, r in judged], 99)},
        "latency_ms_all": {"p50": pct([1000 * (r - c) for _, c, r, _ in verdicts], 50),
                           "p99": pct([1000 * (r - c) for _, c, r, _ in verdicts], 99)},
        "send_fps_achieved": round((len(captures) - 1) / (captures[-1] - captures[0]), 2)
        if len(captures) > 1 and captures[-1] > captures[0] else None,
        "verdict_window_s": round(received[-1] - received[0], 2) if received else 0.0,
        "gpu_memory_peak_sampled": memory,
    }


def format_table(results: dict[str, Any]) -> str:
    head = ("rate", "sent", "verdicts", *VALUES, "judged/s", "p50 ms", "p99 ms", "send/s", "alloc MiB", "smi MiB")
    lines = [" ".join(f"{h:>9s}" for h in head)]
    for r in results["rates"]:
        mem = r["gpu_memory_peak_sampled"]
        cells = [f"{r['rate_fps']:g}", r["frames_sent"], r["verdicts_received"], *(r["verdicts"][v] for v in VALUES),
                 r["judged_fps"], r["latency_ms_judged"]["p50"], r["latency_ms_judged"]["p99"],
                 r["send_fps_achieved"], mem.get("daemon_allocated_mib"), mem.get("nvidia_smi_used_mib")]
        lines.append(" ".join(f"{'-' if c is None else str(c):>9s}" for c in cells))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", required=True, help="JSON results file")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of frames per rate")
    ap.add_argument("--rates", type=float, nargs="+", default=[30.0, 100.0], help="replay frame rates, frames/s")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--size", type=int, default=1024, help="side of the camera frames, pixels")
    ap.add_argument("--image-size", type=int, default=224, help="detector.image_size (a multiple of 14)")
    ap.add_argument("--sam-points-per-side", type=int, default=None,
                    help="detector.samlad.sam.points_per_side (default: the config's 32 on cuda, 2 on cpu)")
    ap.add_argument("--good", type=int, default=None, help="good images in the bank (default: 10 on cuda, 3 on cpu)")
    ap.add_argument("--validation", type=int, default=5, help="held-out good images for calibration (at least 5)")
    ap.add_argument("--test-per-kind", type=int, default=None,
                    help="replayed test images of each kind: good, logical, structural (default: 4 on cuda, 1 on cpu)")
    ap.add_argument("--product", default="screw_tray")
    ap.add_argument("--decode-workers", type=int, default=4, help="runtime.ingest.decode_workers")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any config key, e.g. runtime.pipeline.deadline_ms=60000 (repeatable; VALUE read as YAML)")
    ap.add_argument("--serve-set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config key for `serve` alone, after --set: detector.compile=true compiles in serve's "
                         "warm-up, not in the bank build (repeatable)")
    ap.add_argument("--restart", action="store_true",
                    help="after the rates, start serve again on the same bank and time it to ready")
    ap.add_argument("--tiny", action="store_true",
                    help="tiny random samlad models (benchmarks/tiny_cli.py), no checkpoints: the plumbing on a CPU")
    ap.add_argument("--warmup-frames", type=int, default=3, help="frames sent and answered before the first rate")
    ap.add_argument("--ready-timeout", type=float, default=180.0, help="seconds for serve to answer /readyz 200")
    ap.add_argument("--work", help="work folder, kept (default: a temporary folder, removed)")
    ap.add_argument("--logs", help="copy the step log and the daemon's log (steps.log, serve.log) into this folder")
    args = ap.parse_args(argv)
    cpu = args.device == "cpu"
    if args.tiny and args.image_size == 224:
        args.image_size = 112
    if args.sam_points_per_side is None and (cpu or args.tiny):
        args.sam_points_per_side = 2
    if args.good is None:
        args.good = 3 if cpu else 10
    if args.test_per_kind is None:
        args.test_per_kind = 1 if cpu else 4
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    TINY["flag"] = args.tiny
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a `timeout` still runs the cleanup below
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lw-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "steps.log"
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work", "logs")},
        "weights": ("TINY random models (benchmarks/tiny_cli.py): the plumbing only" if args.tiny else
                    "RANDOM (official layouts, real loaders): compute of the real models, verdicts meaningless"),
        "judged_fps_definition": "(pass + fail verdicts of the rate - 1) / time from the first to the last of them",
        "latency_definition": "verdict receive time minus the frame's capture_ts (replay's send time), same host",
        "steps_s": {}, "rates": [], "ok": False, "complete": False,
    }

    def save() -> None:  # after every step: a run stopped by its timeout keeps what it measured
        out.write_text(json.dumps(results, indent=2) + "\n")

    serve: Serve | None = None
    sub: Subscriber | None = None
    code = 1
    try:
        t0 = time.monotonic()
        checkpoints: dict[str, Path] = {}
        if not args.tiny:
            from random_checkpoints import write_random_checkpoints  # benchmarks/ is sys.path[0] for this script

            checkpoints = write_random_checkpoints(work / "models")
            results["steps_s"]["random_checkpoints"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        good, validation, replay_dir = make_frames(args, work, log)
        results["steps_s"]["sim_generate"] = round(time.monotonic() - t0, 1)
        ports = {k: free_port() for k in ("ingest", "publish", "metrics")}
        config = make_config(args, work, checkpoints, ports)
        serve_config = make_config(args, work, checkpoints, ports, args.serve_set, "e2e-serve.yaml")
        results["config"] = yaml.safe_load(config.read_text())
        results["serve_config_changes"] = list(args.serve_set)
        save()
        results["steps_s"]["bank_build"] = round(run_step(
            "bank build", cli("bank", "build", "-c", str(config), "--good", str(good), "--validation",
                              str(validation), "--quiet"), log, 1800), 1)
        save()
        serve = Serve(serve_config, ports["metrics"], work / "serve.log")
        results["steps_s"]["serve_ready"] = round(serve.wait_ready(args.ready_timeout), 1)
        save()
        sub = Subscriber(f"tcp://127.0.0.1:{ports['publish']}")
        sub.start()
        time.sleep(1.0)  # PUB/SUB joins asynchronously
        deadline_s = float(results["config"].get("runtime", {}).get("pipeline", {}).get("deadline_ms", 2000)) / 1000
        drain_s = deadline_s + 30.0  # every frame is answered by its deadline; margin for the publisher
        t0 = time.monotonic()
        if args.warmup_frames:
            replay(replay_dir, ports["ingest"], 1.0, args.warmup_frames, "warmup", log, timeout_s=120)
            wait_for(lambda: sub.count("warmup") >= args.warmup_frames, drain_s)
        results["steps_s"]["warmup"] = round(time.monotonic() - t0, 1)
        results["warmup_verdicts"] = dict(Counter(v for v, _, _, _ in sub.verdicts("warmup")))
        save()
        for rate in args.rates:
            wait_for(lambda: serve.metrics().get("linewatch_inflight_frames", 0) == 0, drain_s, 0.5)
            results["rates"].append(run_rate(args, rate, serve, sub, replay_dir, ports["ingest"], log, drain_s))
            print(json.dumps(results["rates"][-1]), flush=True)
            save()
        wait_for(lambda: serve.metrics().get("linewatch_inflight_frames", 0) == 0, drain_s, 0.5)
        rc = serve.stop()
        if rc != 0:
            results["serve_log_tail"] = tail(serve.log_path, 15)
        results["serve_exit_status"] = rc
        results["ok"] = rc == 0 and all(r["all_answered"] for r in results["rates"])
        save()
        if args.restart:
            serve = Serve(serve_config, ports["metrics"], work / "serve.log")
            results["restart_ready_s"] = round(serve.wait_ready(args.ready_timeout), 1)
            rc = serve.stop()
            results["restart_exit_status"] = rc
            results["ok"] = results["ok"] and rc == 0
        results["complete"] = True
        code = 0 if results["ok"] else 1
    except (E2EError, OSError, subprocess.SubprocessError) as e:
        results["error"] = str(e)
        print(f"gpu_e2e: error: {e}", file=sys.stderr)
    finally:
        save()
        if sub is not None:
            sub.close()
        if serve is not None and serve.proc.poll() is None:
            results.setdefault("serve_exit_status", serve.stop(15))
        if args.logs:
            Path(args.logs).mkdir(parents=True, exist_ok=True)
            for name in ("steps.log", "serve.log"):
                if (work / name).is_file():
                    shutil.copyfile(work / name, Path(args.logs) / name)
        save()
        if results["rates"]:
            print(format_table(results))
        print(f"serve exit status {results.get('serve_exit_status')}; ok={results['ok']}; "
              f"restart to ready {results.get('restart_ready_s')} s; wrote {out}")
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
