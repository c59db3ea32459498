"""`linewatch demo`: a synthetic production line on loopback, end to end, without weights or GPU.

  1. the weights-free `classic` backend (honestly labelled: not SAM-LAD's accuracy)
  2. synthetic good images of one product -> a template bank, calibrated on held-out and leave-one-out good ones,
     loaded as `serve` loads one (linewatch.recipe.load_processor)
  3. the daemon, in this process, on free loopback ports (never collides with a running one)
  4. a tap on the verdict stream (linewatch.runtime.transport.tap)
  5. a camera: frames rendered on the fly (good and defective, known ground truth), sent by the
     replay sender (linewatch.runtime.transport.replay) in the linewatch wire format at --fps
  6. one line per verdict, then a summary checked against what was sent and a live /metrics scrape;
     the live page (/live on the metrics server) shows the same line in a browser

The detector settings are DEMO_DETECTOR, the `detector` section of configs/demo.yaml, read from
the copy the package ships (linewatch/demo.yaml; configs/demo.yaml is a link to it); only the
ports and the log level are the demo's own.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import threading
import time
import urllib.request
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import yaml

if TYPE_CHECKING:
    from linewatch.config import Config
    from linewatch.detector.inspector import Inspector

DEMO_CONFIG = "demo.yaml"  # package data of linewatch: configs/demo.yaml
DEMO_DETECTOR = yaml.safe_load(resources.files("linewatch").joinpath(DEMO_CONFIG).read_text())["detector"]
N_TRAIN = 16  # good images in the bank
N_VALIDATION = 10  # held-out good images for the threshold
IMAGE_SIZE = 256  # rendered frame side, pixels
CAMERA = "cam0"


def demo_config(bank_path: str | Path):
    """The demo's Config: DEMO_DETECTOR, loopback sockets on ports the OS picks, quiet logs."""
    from linewatch.config import config_from_dict

    return config_from_dict({
        "detector": copy.deepcopy(DEMO_DETECTOR),
        "bank": {"path": str(bank_path)},
        "runtime": {
            "ingest": {"endpoints": [{"url": "tcp://127.0.0.1:*", "mode": "bind", "protocol": "linewatch"}]},
            # a CPU judges a few frames/s: keep little work in flight, so that at a faster camera
            # the newest frames get judged and the excess is answered `shed` at once
            "batch": {"max_batch": 4, "max_delay_ms": 10},
            "pipeline": {"stage_queue_size": 1, "max_pending_frames": 4, "shed_policy": "oldest"},
            "publish": {"url": "tcp://127.0.0.1:*", "mode": "bind"},
            "metrics": {"host": "127.0.0.1", "port": 0},
            "live": {"enabled": True},  # the live page on the metrics server: /live
            "logging": {"level": "WARNING", "format": "console"},
        },
    }, "<demo config>")


def _say(message: str = "") -> None:
    print(message, flush=True)


def _truth_plan(frames: int, anomaly_rate: float, seed: int, product: str) -> list[str | None]:
    """Ground truth per frame: None (good) or one of the product's anomaly kinds, cycling for variety."""
    from linewatch.sim import product_anomalies

    logical, structural = product_anomalies(product)
    ANOMALIES = logical + structural

    rng = np.random.default_rng([seed, 1])
    plan, k = [], 0
    for _ in range(frames):
        if rng.random() < anomaly_rate:
            plan.append(ANOMALIES[k % len(ANOMALIES)])
            k += 1
        else:
            plan.append(None)
    return plan


def _pct_ms(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q) * 1000:.0f}" if values else "-"


def run_demo(frames: int = 120, fps: float = 10.0, product: str = "screw_tray", anomaly_rate: float = 0.3,
             keep_running: bool = False, workdir: str | None = None, seed: int = 0) -> int:
    """Run the demo; returns 0 when every frame got exactly one verdict, else 1."""
    from linewatch.detector.models import BACKEND_LABELS
    from linewatch.runtime.daemon import Daemon
    from linewatch.runtime.transport.replay import replay
    from linewatch.runtime.transport.tap import tap

    t_begin = time.monotonic()
    _say("linewatch demo: synthetic line -> daemon -> tap, all on this machine (loopback only)")
    _say(f"[1/5] backend: {BACKEND_LABELS[DEMO_DETECTOR['backend']]}")
    with contextlib.ExitStack() as cleanup:  # at the end the tap stops, then the daemon; the temporary folder goes
        if workdir is None:
            work = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="linewatch-demo-")))
        else:
            work = Path(workdir)
            work.mkdir(parents=True, exist_ok=True)
        bank_path = work / f"demo-{product}-seed{seed}.lwbank"
        config = demo_config(bank_path)
        inspector = _load_or_build_bank(config, bank_path, work, product, seed, show_path=workdir is not None)

        daemon = Daemon(config.runtime, inspector, summary_interval_s=3600.0)
        cleanup.callback(daemon.stop)
        daemon.start()
        ingest_url, verdict_url = daemon.ingest.bound_urls[0], daemon.publisher.bound_url
        metrics_url = f"http://{daemon.health.host}:{daemon.health.port}/metrics"
        live_url = f"http://{daemon.health.host}:{daemon.health.port}/live"
        deadline_s = config.runtime.pipeline.deadline_ms / 1000
        _say(f"[3/5] daemon up: frames in {ingest_url}, verdicts out {verdict_url}, metrics {metrics_url} "
             f"(deadline {deadline_s * 1000:.0f} ms)")
        _say(f"      live page: {live_url}")

        truth = _truth_plan(frames, anomaly_rate, seed, product)
        watch, stop_tap = _Watch(truth), threading.Event()
        tap_thread = threading.Thread(target=tap, args=(verdict_url,), kwargs={"callback": watch, "stop": stop_tap},
                                      name="demo-tap", daemon=True)
        cleanup.callback(tap_thread.join, 2.0)
        cleanup.callback(stop_tap.set)
        tap_thread.start()

        _say(f"[4/5] camera: sending {frames} frames at {fps:g} fps "
             f"({sum(t is not None for t in truth)} with a defect) ...")
        camera = _Camera(product, truth, seed)
        # PUB/SUB drops what is sent before the peers have joined ("slow joiner"): wait for the
        # connection to the daemon's ingest, then a moment for its subscription
        replay(camera, ingest_url, fps, camera=CAMERA, encoding="raw", handshake_s=10.0, warmup_s=0.3)
        watch.wait(frames, deadline_s + 5.0)  # every received frame is answered by its deadline

        _say("[5/5] summary")
        exactly_once = _summary(watch, camera, deadline_s)
        _say(f"  metrics            {metrics_url} (live while the demo runs; --keep-running keeps it up)")
        _say(f"  live page          {live_url}")
        try:
            _say("  live scrape        " + _scrape_summary(metrics_url))
        except OSError as e:
            _say(f"  live scrape        failed: {e}")
        _say(f"  total              {time.monotonic() - t_begin:.1f} s")

        if keep_running:
            watch.demo_running = False
            _say("the daemon keeps running; Ctrl-C stops it")
            _say(f"  live page: {live_url}")
            _say(f"  curl {metrics_url}")
            _say(f"  linewatch replay {work / 'sim' / product / 'validation' / 'good'} --endpoint {ingest_url} --fps 2")
            _say(f"  linewatch tap --endpoint {verdict_url}")
            daemon.run_until_signal()
        return 0 if exactly_once else 1


def _load_or_build_bank(config: Config, bank_path: Path, work: Path, product: str, seed: int,
                        show_path: bool) -> Inspector:
    """The Inspector the demo serves: the bank at `bank_path` when an earlier --workdir run left
    one that still fits, else one built from freshly rendered good images (and saved there)."""
    from linewatch.bank_builder import build_bank
    from linewatch.detector.bank import BankError
    from linewatch.detector.models import build_models, select_device
    from linewatch.recipe import Recipe, load_processor
    from linewatch.sim import generate_dataset

    device = select_device(config.detector.device)
    builder = Recipe(config, build_models(config.detector, device), device)  # its models judge with the bank too
    t0 = time.monotonic()
    inspector = None
    if bank_path.is_file():
        try:
            inspector, _ = load_processor(config, bank_path, builder)
            _say(f"[2/5] reusing the template bank {bank_path}")
        except BankError as e:
            _say(f"[2/5] not reusing {bank_path} ({e}); rebuilding it")
    if inspector is None:
        generate_dataset(work / "sim", product, seed=seed, n_train=N_TRAIN, n_val=N_VALIDATION,
                         n_test_good=0, n_test_logical=0, n_test_structural=0, size=IMAGE_SIZE)
        _say(f"[2/5] {product}: {N_TRAIN} good images + {N_VALIDATION} held-out good images rendered; "
             "building the template bank ...")
        data = work / "sim" / product
        bank = build_bank(config, data / "train" / "good", data / "validation" / "good", models=builder.models,
                          progress=False)
        bank.save(bank_path)
        inspector, _ = load_processor(config, bank, builder)
    cal = inspector.calibration
    _say(f"      bank {inspector.bank_id}: {inspector.bank_images} images, threshold {inspector.bank.threshold:.3f} "
         f"(target false-reject rate {cal.target_false_reject_rate:.1%}, calibrated on {cal.n} "
         f"good-image scores), {time.monotonic() - t0:.1f} s" + (f" -> {bank_path}" if show_path else ""))
    return inspector


class _Camera:
    """The demo's camera for the replay sender: renders each planned frame (good, or with its
    defect) when the sender takes it, and notes when sending began and ended."""

    def __init__(self, product: str, truth: list[str | None], seed: int) -> None:
        self.product, self.truth, self.seed = product, truth, seed
        self.started = self.finished = time.monotonic()

    def __iter__(self):
        from linewatch.sim import render

        rng = np.random.default_rng([self.seed, 2])
        self.started = time.monotonic()
        for i, anomaly in enumerate(self.truth):
            image, _, _ = render(self.product, rng, anomaly, size=IMAGE_SIZE)
            yield image, f"P{i:04d}"
        self.finished = time.monotonic()


class _Watch:
    """The tap's callback: keeps every verdict and when it arrived, and prints its line beside
    the ground truth (after the demo, with --keep-running: the tap's own line)."""

    def __init__(self, truth: list[str | None]) -> None:
        self.truth = truth
        self.demo_running = True
        self.lock = threading.Lock()
        self.got: dict[int, list] = {}
        self.arrived: list[float] = []

    def __call__(self, v) -> None:
        from linewatch.runtime.transport.tap import format_verdict

        with self.lock:
            self.got.setdefault(v.frame_id, []).append(v)
            self.arrived.append(time.monotonic())
        if not self.demo_running:  # --keep-running: frames from elsewhere, no ground truth
            _say(format_verdict(v))
            return
        want = self.truth[v.frame_id] if 0 <= v.frame_id < len(self.truth) else None
        line = f"  {v.camera} #{v.frame_id:03d} {v.verdict.upper():7s}"
        if v.score is not None:
            line += f" score {v.score:6.2f} / thr {v.threshold:.2f}"
        if v.reason:
            line += f" ({v.reason})"
        if v.latency_s is not None:
            line += f"  {v.latency_s * 1000:5.0f} ms"
        line += f"  truth={want or 'good'}"
        if v.verdict == "fail":
            line += "  detected" if want else "  FALSE REJECT"
        elif v.verdict == "pass" and want:
            line += "  MISSED"
        _say(line)

    def wait(self, frames: int, timeout_s: float) -> None:
        """Until `frames` frames have a verdict or `timeout_s` passed, then a moment more: a
        duplicate, if there were one, would show up then."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with self.lock:
                if len(self.got) >= frames:
                    break
            time.sleep(0.05)
        time.sleep(0.2)

    def snapshot(self) -> tuple[dict[int, list], float | None]:
        """The verdicts per frame id so far, and when the last one arrived (None: none did)."""
        with self.lock:
            return {k: list(v) for k, v in self.got.items()}, (max(self.arrived) if self.arrived else None)


def _summary(watch: _Watch, camera: _Camera, deadline_s: float) -> bool:
    """Print what arrived against what was sent; returns whether each frame got exactly one verdict."""
    truth, frames = watch.truth, len(watch.truth)
    verdicts, last_arrival = watch.snapshot()
    send_s = camera.finished - camera.started
    all_v = [v for vs in verdicts.values() for v in vs]
    counts: dict[str, int] = {}
    for v in all_v:
        counts[v.verdict] = counts.get(v.verdict, 0) + 1
    missing = [i for i in range(frames) if i not in verdicts]
    duplicated = [i for i, vs in verdicts.items() if len(vs) > 1]
    unknown = [i for i in verdicts if not 0 <= i < frames]
    exactly_once = not missing and not duplicated and not unknown
    judged = [v for v in all_v if v.verdict in ("pass", "fail")]
    latencies = [v.latency_s for v in all_v if v.latency_s is not None]
    judged_lat = [v.latency_s for v in judged if v.latency_s is not None]
    span = max((last_arrival if last_arrival is not None else camera.started) - camera.started, 1e-9)
    bad = [v for v in judged if truth[v.frame_id] is not None]
    good = [v for v in judged if truth[v.frame_id] is None]

    _say(f"  frames sent        {frames} in {send_s:.1f} s ({(frames - 1) / send_s if frames > 1 and send_s > 0 else 0:.1f} fps)")
    _say(f"  verdicts           {len(all_v)}: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())))
    if exactly_once:
        _say(f"  exactly once       yes: each of the {frames} frames got one verdict")
    else:
        _say(f"  exactly once       NO: missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
             f"duplicated {duplicated[:10]}, unexpected ids {unknown[:10]}")
    _say(f"  throughput         {len(judged) / span:.1f} frames/s judged by the detector "
         f"({len(all_v) / span:.1f} verdicts/s overall)")
    _say(f"  capture->verdict   p50 {_pct_ms(latencies, 50)} ms, p95 {_pct_ms(latencies, 95)} ms, "
         f"p99 {_pct_ms(latencies, 99)} ms (all verdicts); judged only: p50 {_pct_ms(judged_lat, 50)} ms, "
         f"p99 {_pct_ms(judged_lat, 99)} ms")
    detected = sum(v.verdict == "fail" for v in bad)
    false_rejects = sum(v.verdict == "fail" for v in good)
    _say(f"  vs ground truth    defects detected {detected}/{len(bad)}, false rejects {false_rejects}/{len(good)} "
         "(judged frames only; synthetic data, weights-free backend)")
    unjudged = len(all_v) - len(judged)
    if unjudged:
        _say(f"  note               {unjudged} frame(s) answered without a judgement (timeout/shed/error): the camera "
             f"sent faster than this CPU judges, so the overload policy answered them rather than let them "
             f"queue past the {deadline_s * 1000:.0f} ms deadline; lower --fps until every frame is judged")
    return exactly_once


def _scrape_summary(metrics_url: str) -> str:
    """Fetch /metrics once and pick a few series out of it with prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=5) as r:
        text = r.read().decode()
    received, verdicts, ready = 0.0, {}, None
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "linewatch_frames_received_total":
                received += s.value
            elif s.name == "linewatch_verdicts_total":
                verdicts[s.labels["verdict"]] = verdicts.get(s.labels["verdict"], 0) + s.value
            elif s.name == "linewatch_ready":
                ready = s.value
    parts = ", ".join(f'{k}={v:g}' for k, v in sorted(verdicts.items()))
    return (f"linewatch_frames_received_total {received:g}; linewatch_verdicts_total {{{parts}}}; "
            f"linewatch_ready {ready:g}" if ready is not None else "linewatch_ready missing")
