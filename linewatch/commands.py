"""The runtime commands of `linewatch`: serve, replay, tap, demo, camera, actuate (and `bank
switch`, which talks to a running serve).

`register(subparsers)` adds them to the parser built in linewatch/cli.py. Errors a user can
fix raise the exceptions cli.main maps to exit status 2 (ConfigError, BankError, ...), or
print one `linewatch: error:` line and return 2 themselves.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


# ---------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    from linewatch.config import load_config
    from linewatch.detector.manifest import BankError, read_manifest
    from linewatch.runtime.ops.logs import configure_logging
    from linewatch.runtime.ops.memory import limit_malloc_arenas

    limit_malloc_arenas()  # before the detector's and the runtime's threads start
    config = load_config(args.config)
    log = configure_logging(config.runtime.logging)
    bank_path = Path(args.bank or config.bank.path)
    if not bank_path.is_file():
        raise BankError(
            f"{bank_path}: no bank file here. Build one from known-good images first:\n"
            f"  linewatch bank build -c {args.config} --good GOOD_DIR --validation HELD_OUT_DIR --out {bank_path}\n"
            "(for a quick try without a camera: `linewatch demo`)"
        )
    # a corrupt or unfitting bank is told before the models start (as the loader would tell it)
    read_manifest(bank_path).check_fits(config, source=f"bank {bank_path}")
    from linewatch.detector.models import BACKEND_LABELS
    from linewatch.recipe import RecipeLoader
    from linewatch.runtime.daemon import Daemon

    # the loader warms the models up (CUDA, compile) before anyone is told we are ready, and
    # loads the banks of later changeovers (`linewatch bank switch`, SIGHUP)
    recipes = RecipeLoader(args.config, args.bank, config.runtime, log)
    inspector = recipes.load(config, str(bank_path))
    references = None
    if config.runtime.selfcheck.enabled:  # the reference frames of each bank put in service
        from linewatch.selfcheck_references import load_references

        def references(processor):
            return load_references(config.runtime.selfcheck, processor)
    daemon = Daemon(config.runtime, inspector, log=log, bank_loader=recipes, selfcheck_references=references)
    try:
        daemon.start()
    except RuntimeError as e:  # a port in use, an endpoint that cannot be opened
        print(f"linewatch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    calibration = inspector.bank.calibration  # fields absent in banks built before are None
    log.info(
        "serving",
        backend=BACKEND_LABELS[config.detector.backend],
        bank_id=inspector.bank_id,
        bank_images=inspector.bank_images,
        threshold=round(float(inspector.bank.threshold), 6),
        target_false_reject_rate=calibration.target_false_reject_rate,
        expected_false_reject_rate=calibration.expected_false_reject_rate,
        false_reject_rate_ci=[calibration.ci_low, calibration.ci_high],
        calibration_confidence=calibration.confidence,
        calibration_method=calibration.method,
        calibration_scores=calibration.n,
        calibration_scores_required=calibration.n_required,
        ingest=[f"{url} ({e.protocol}, {e.mode})" for url, e in zip(daemon.ingest.bound_urls, config.runtime.ingest.endpoints)],
        verdicts=daemon.publisher.bound_url,
        metrics=f"{daemon.health.scheme}://{daemon.health.host}:{daemon.health.port}/metrics",
    )
    if calibration.warning:
        log.warning("calibration_too_few_good_images", warning=calibration.warning)
    code = daemon.run_until_signal()
    exit_now_if_a_stage_still_runs(daemon.pipeline.running_after_stop(), code, log)
    skip_the_final_garbage_collection()
    return code


def skip_the_final_garbage_collection() -> None:
    """(serve, demo) The daemon has stopped: every frame answered, every sink closed, the logs
    written. The interpreter's exit would still run a full garbage collection over every object
    of the models, the bank and the libraries, only to free memory the process hands back anyway;
    systemd's stop and restart wait for it. On a busy 2-core machine: serve 1.3-1.4 s from its
    `stopped` line to the exit, 0.2-0.4 s with this; demo 2.4-2.5 s from its last line, 0.6 s.
    Frozen objects are left out of that collection (reference counting still frees what it
    frees; atexit handlers still run)."""
    import gc

    gc.freeze()


def exit_now_if_a_stage_still_runs(threads: list[str], code: int, log) -> None:
    """After a clean stop every frame is answered, but a stage thread may still be inside a model
    call (seconds on a CPU). Interpreter shutdown would then end that thread with pthread_exit in
    the middle of PyTorch's C++ code, which aborts the process (exit -6, "terminate called
    without an active exception") and makes systemd call a clean stop a failure. Leave at once
    instead, with the exit status the stop earned."""
    if not threads:
        return
    log.warning("exit_with_stage_running", threads=threads, exit_code=code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cmd_bank_switch(args: argparse.Namespace) -> int:
    """Ask a running daemon to put another bank in service: exit 0 switched, 1 refused (the
    old bank stays), 2 the daemon cannot be reached."""
    from linewatch.runtime.ops.control import ControlError, request

    def absolute(path: str | None) -> str | None:  # the daemon's working directory is not ours
        return os.path.abspath(path) if path is not None else None

    try:
        reply = request(args.socket, {"command": "switch", "bank": absolute(args.bank), "config": absolute(args.config)})
    except ControlError as e:
        print(f"linewatch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not reply.get("ok"):
        print(f"linewatch: the daemon did not take the request: {reply.get('error')}", file=sys.stderr)
        return 1
    for warning in reply.get("warnings") or []:
        print(f"linewatch: warning: {warning}", file=sys.stderr)
    if not reply.get("switched"):
        print(f"linewatch: bank switch refused: {reply.get('reason')}\n"
              f"bank {reply.get('bank_id')} stays in service", file=sys.stderr)
        return 1
    last = ", ".join(f"{camera} #{frame_id}" for camera, frame_id in sorted((reply.get("last_frame_ids") or {}).items()))
    print(f"switched: bank {reply.get('old_bank_id')} -> {reply.get('bank_id')} ({reply.get('bank')}); "
          f"{reply.get('frames_before')} frame(s) received before the cut keep the old bank"
          + (f" (the last per camera: {last})" if last else ""))
    return 0


# ---------------------------------------------------------------------------- replay / tap


def cmd_replay(args: argparse.Namespace) -> int:
    from linewatch.runtime.transport.replay import replay

    try:
        sent = replay(
            Path(args.source), args.endpoint, args.fps, protocol=args.protocol, camera=args.camera,
            encoding=args.encoding, loop=args.loop, count=args.count, mode=args.mode, curve=_curve_keys(args),
        )
    except (ValueError, TimeoutError) as e:
        print(f"linewatch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"sent {sent} frame(s) to {args.endpoint} ({args.protocol})", file=sys.stderr)
    return 0


def cmd_tap(args: argparse.Namespace) -> int:
    from linewatch.runtime.transport.tap import SequenceGaps, tap

    try:
        curve = _curve_keys(args)
    except ValueError as e:
        print(f"linewatch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    gaps = SequenceGaps()
    seen = tap(args.endpoint, count=args.count, timeout_s=args.timeout, cameras=args.camera or None, gaps=gaps,
               curve=curve)
    if gaps.lost:
        print(f"linewatch: {gaps.lost} verdict(s) were lost on the way to this tap (gaps in seq)", file=sys.stderr)
    if args.count is not None and seen < args.count:
        print(f"linewatch: tap saw {seen} of {args.count} verdicts before the timeout", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- demo


def cmd_demo(args: argparse.Namespace) -> int:
    from linewatch.demo import run_demo

    code = run_demo(
        frames=args.frames, fps=args.fps, product=args.product, anomaly_rate=args.anomaly_rate,
        keep_running=args.keep_running, workdir=args.workdir, seed=args.seed,
    )
    skip_the_final_garbage_collection()  # its daemon has stopped, the summary is printed
    return code


# ---------------------------------------------------------------------------- actuate


def cmd_actuate(args: argparse.Namespace) -> int:
    """The reject component: verdicts in, the reject gate driven (docs/line.md). Runs until
    SIGTERM/SIGINT. Errors a user can fix (the config, an address the PLC refuses, a missing
    library) print one line and exit 2."""
    import signal
    import threading

    from prometheus_client import start_http_server

    from linewatch.actuate.outputs import AddressRefused, OutputError, build_output
    from linewatch.actuate.service import Actuator
    from linewatch.config import ConfigError, load_config
    from linewatch.runtime.ops.logs import configure_logging

    def fail(message: str) -> int:
        print(f"linewatch: error: {message}", file=sys.stderr)
        return EXIT_USAGE

    try:
        config = load_config(args.config)
        curve = _curve_keys(args)
    except ConfigError as e:  # one line: "FILE: invalid configuration (top level): Value error, actuate..."
        return fail(" ".join(line.strip() for line in str(e).splitlines()))
    except ValueError as e:
        return fail(str(e))
    settings = config.actuate
    if args.output:
        settings.output = args.output
    if not settings.cameras:
        return fail(f"{args.config}: actuate.cameras is empty: name each camera whose parts this gate rejects, "
                    "with its travel_ms (docs/line.md)")
    log = configure_logging(config.runtime.logging)
    output = build_output(settings, log)
    actuator = Actuator(settings, output, log, curve=curve)
    try:
        actuator.check_output()
    except AddressRefused as e:
        return fail(str(e))
    except OutputError as e:  # a library missing, a password file unreadable
        return fail(str(e))
    try:
        server, _ = start_http_server(settings.metrics.port, addr=settings.metrics.host, registry=actuator.metrics.registry)
    except OSError as e:
        actuator.worker.output.close()
        return fail(f"actuate.metrics: cannot listen on {settings.metrics.host}:{settings.metrics.port}: {e.strerror or e}")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            actuator.start()
        except RuntimeError as e:
            return fail(str(e))
        log.info("actuating", verdicts=settings.verdicts, channel=settings.channel, subscriber=settings.subscriber,
                 output=settings.output, cameras=sorted(settings.cameras),
                 plc_connected=actuator.worker.connected,
                 metrics=f"http://{settings.metrics.host}:{server.server_port}/metrics")
        stop.wait()
        log.info("stopping", verdicts_received=actuator.received, **actuator.gate.counts)
    finally:
        actuator.stop()
        server.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


# ---------------------------------------------------------------------------- keys


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from linewatch.runtime.transport.security import generate_keys

    public, secret = generate_keys(args.dir, args.name)
    print(f"public key: {public}  (give it to the other side: the daemon's to senders and subscribers, "
          f"a client's into the daemon's frame_senders or verdict_subscribers folder)")
    print(f"secret key: {secret}  (keep it on this machine, readable only by its user)")
    return 0


def _curve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server-key", help="the daemon's public key file (runtime.security is on)")
    p.add_argument("--client-key", help="this client's secret key file (its public key is allowed by the daemon)")


def _curve_keys(args: argparse.Namespace):
    """ClientKeys from --server-key/--client-key, None without them; both or neither."""
    from linewatch.runtime.transport.security import ClientKeys

    if args.server_key is None and args.client_key is None:
        return None
    if args.server_key is None or args.client_key is None:
        raise ValueError("--server-key and --client-key go together")
    return ClientKeys.load(args.server_key, args.client_key)


# ---------------------------------------------------------------------------- camera


def _camera_config(args: argparse.Namespace):
    """The camera config file (or the defaults) with the command-line options on top."""
    from linewatch.config import load_camera_config

    overrides = {key: value for key, value in {
        "source": args.source, "camera": args.camera, "endpoint": getattr(args, "endpoint", None),
        "encoding": getattr(args, "encoding", None), "metrics.port": getattr(args, "metrics_port", None),
        "metrics.host": getattr(args, "metrics_host", None), "folder.after": getattr(args, "after", None),
        "security.server_key": getattr(args, "server_key", None), "security.client_key": getattr(args, "client_key", None),
        "logging.format": getattr(args, "log_format", None),
    }.items() if value is not None}
    if args.mono_to_rgb:
        overrides["mono_to_rgb"] = True
    return load_camera_config(args.config, overrides)


def _run_bridge(bridge, count: int | None, timeout_s: float | None, log) -> tuple[int, bool]:
    """Run the bridge's loop in a thread until it ends, SIGTERM/SIGINT or `timeout_s`: (status,
    timed_out). The main thread only waits, so a signal is handled at once even while the loop
    is inside a blocking camera read; a loop still stuck 5 s after the stop is left behind."""
    import signal
    import threading
    import time

    stop = threading.Event()
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            bridge.run(stop, count)
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            failure.append(e)

    def on_signal(signum, frame) -> None:
        log.info("camera_stopping", camera=bridge.config.camera, signal=signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    thread = threading.Thread(target=loop, name="lw-camera", daemon=True)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    timed_out = False
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.2)
            if deadline is not None and time.monotonic() >= deadline and not stop.is_set():
                timed_out = True
                stop.set()
            if stop.is_set():
                thread.join(5.0)
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failure:
        raise failure[0]
    if thread.is_alive():
        log.warning("camera_capture_stuck", camera=bridge.config.camera,
                    detail="the capture thread did not end within 5 s of the stop (a blocking camera read)")
        return 1, timed_out
    return 0, timed_out


def cmd_camera(args: argparse.Namespace) -> int:
    from linewatch.runtime.ops.health import HealthServer
    from linewatch.runtime.ops.logs import configure_logging
    from linewatch.runtime.ops.native_stderr import NativeStderr
    from linewatch.runtime.systemd import Watchdog, sd_notify
    from linewatch.runtime.transport.camera import CameraBridge, CameraMetrics, DaemonSink, SourceError, open_source
    from linewatch.runtime.transport.security import ClientKeys

    config = _camera_config(args)
    log = configure_logging(config.logging)
    try:
        source = open_source(config.source, config, log)
    except SourceError as e:
        print(f"linewatch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    curve = None
    if config.security.server_key is not None:
        curve = ClientKeys.load(config.security.server_key, config.security.client_key)
    metrics = CameraMetrics(config.camera)
    try:
        sink = DaemonSink(config, curve, log)
    except ValueError as e:
        print(f"linewatch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    bridge = CameraBridge(config, source, sink, metrics, log)
    try:
        health = HealthServer(config.metrics, metrics.registry,
                              readiness=lambda: (bridge.up, "source open" if bridge.up else f"source lost: {bridge.lost_reason}"))
    except OSError as e:
        sink.close()
        print(f"linewatch: error: camera metrics on {config.metrics.host}:{config.metrics.port}: {e.strerror or e}",
              file=sys.stderr)
        return EXIT_USAGE
    health.start()
    # OpenCV and FFmpeg write their complaints (a stream that stalls, a corrupt JPEG) to descriptor 2:
    # as rate-limited log events, as in the daemon
    native = NativeStderr(log, metrics, enabled=config.logging.capture_native_stderr)
    native.start()
    log.info("camera_started", camera=config.camera, source=source.describe(), endpoint=config.endpoint,
             encoding=config.encoding, curve=curve is not None,
             metrics=f"{health.scheme}://{health.host}:{health.port}/metrics")
    import time

    stale_s = config.reconnect.max_s + 60.0  # the longest wait plus a blocking read's own timeout
    watchdog = Watchdog(lambda: time.monotonic() - bridge.heartbeat < stale_s and sd_notify("WATCHDOG=1"))
    sd_notify("READY=1")
    watchdog.start()
    try:
        code, _ = _run_bridge(bridge, args.count, None, log)
    except SourceError as e:
        print(f"linewatch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        watchdog.stop()
        sd_notify("STOPPING=1")
        health.stop()
        native.stop()
    log.info("camera_stopped", camera=config.camera, frames_sent=bridge.delivered, frames_dropped=bridge.dropped)
    if code:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # the capture thread is stuck in native code: do not let interpreter shutdown meet it
    return 0


def cmd_camera_grab(args: argparse.Namespace) -> int:
    import json as json_module

    from linewatch.runtime.ops.logs import configure_logging
    from linewatch.runtime.transport.camera import CameraBridge, CameraMetrics, FileSink, SourceError, open_source

    if args.frames < 1:
        print("linewatch: error: --frames must be at least 1", file=sys.stderr)
        return EXIT_USAGE
    config = _camera_config(args)
    log = configure_logging(config.logging)
    out = Path(args.out)
    try:
        source = open_source(config.source, config, log, readonly=True)
        sink = FileSink(out)
        bridge = CameraBridge(config, source, sink, CameraMetrics(config.camera), log, first_open_fatal=True)
        _, timed_out = _run_bridge(bridge, args.frames, args.timeout, log)
    except (SourceError, OSError) as e:
        print(f"linewatch: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    (out / "grab.json").write_text(json_module.dumps(
        {"source": config.source, "camera": config.camera, "frames": sink.records, "dropped": bridge.dropped}, indent=2))
    print(f"wrote {len(sink.records)} frame(s) and grab.json to {out}", file=sys.stderr)
    if len(sink.records) < args.frames:
        why = f"within {args.timeout:g} s" if timed_out else "before the stop"
        print(f"linewatch: got {len(sink.records)} of {args.frames} frames {why}", file=sys.stderr)
        return 1
    return 0


def _camera_arguments(p: argparse.ArgumentParser, grab: bool) -> None:
    from linewatch.runtime.transport.camera.sources import EXAMPLES

    # grab's copies of the shared options leave what was given before `grab` alone when absent
    keep = {"default": argparse.SUPPRESS} if grab else {}
    p.add_argument("--config", "-c", help="camera config YAML (docs/line.md, Cameras); options below override it",
                   **keep)
    p.add_argument("--source", help=f"camera source URI: {EXAMPLES} (or `source:` in the config)", **keep)
    p.add_argument("--camera", help="camera id (the frames' topic; default cam0)", **keep)
    p.add_argument("--mono-to-rgb", action="store_true", help="send grey frames as 3 equal channels, for a colour "
                   "bank (a mono bank judges grey frames as they are)", **keep)
    p.add_argument("--log-format", choices=("json", "console"), help="log line format (default json)", **keep)
    if grab:
        return
    p.add_argument("--endpoint", help="the daemon's frame ingest (default tcp://127.0.0.1:5555)")
    from linewatch.wire import ENCODINGS

    p.add_argument("--encoding", choices=ENCODINGS, help="raw (default), jpeg or png")
    p.add_argument("--metrics-port", type=int, help="port of this camera's /metrics (default 9120; 0: any free port)")
    p.add_argument("--metrics-host", help="address of /metrics (default 127.0.0.1)")
    p.add_argument("--after", choices=("move", "leave"), help="hot folder: move sent files to done/ (default) or leave them")
    p.add_argument("--count", type=int, help="stop after this many frames sent")
    _curve_arguments(p)


def _register_camera(subparsers) -> None:
    p = subparsers.add_parser("camera", help="capture process for one camera: frames from a source to the daemon's ingest")
    _camera_arguments(p, grab=False)
    p.set_defaults(func=cmd_camera)
    actions = p.add_subparsers(dest="camera_command", metavar="{grab}")
    g = actions.add_parser("grab", help="write N frames as PNG files and grab.json (ids, capture times)")
    _camera_arguments(g, grab=True)
    g.add_argument("--frames", type=int, required=True, help="frames to write")
    g.add_argument("--out", "-o", required=True, help="output folder")
    g.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds (default 60)")
    g.set_defaults(func=cmd_camera_grab)


# ---------------------------------------------------------------------------- parser


def register(subparsers) -> None:
    """Add serve, replay, tap and demo to the `linewatch` argument parser's subparsers."""
    from linewatch.runtime.transport.replay import PROTOCOLS
    from linewatch.sim import ALL_PRODUCTS as PRODUCTS
    from linewatch.wire import ENCODINGS

    p = subparsers.add_parser("serve", help="run the inspection daemon (frames in, verdicts out, /metrics)")
    p.add_argument("--config", "-c", required=True, help="YAML config (see configs/reference.yaml)")
    p.add_argument("--bank", "-b", help="bank file (default: bank.path from the config)")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser("replay", help="camera simulator: send a folder of images or a video as frames")
    p.add_argument("source", help="folder of images or a video file")
    p.add_argument("--endpoint", required=True, help="ZeroMQ endpoint, e.g. tcp://127.0.0.1:5555")
    p.add_argument("--fps", type=float, default=10.0, help="frames per second (<= 0: as fast as possible)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="linewatch")
    p.add_argument("--camera", default="cam0", help="camera id")
    p.add_argument("--encoding", choices=ENCODINGS, default="jpeg")
    p.add_argument("--loop", action="store_true", help="start over at the end, until Ctrl-C")
    p.add_argument("--count", type=int, help="stop after this many frames")
    p.add_argument("--mode", choices=("bind", "connect"), help="default: connect (linewatch), imagezmq's own otherwise")
    _curve_arguments(p)
    p.set_defaults(func=cmd_replay)

    p = subparsers.add_parser("tap", help="print one line per verdict from a running daemon")
    p.add_argument("--endpoint", required=True, help="the daemon's verdict endpoint, e.g. tcp://127.0.0.1:5556")
    p.add_argument("--count", type=int, help="stop after this many verdicts")
    p.add_argument("--timeout", type=float, help="stop after this many seconds")
    p.add_argument("--camera", action="append", help="only this camera (repeatable)")
    _curve_arguments(p)
    p.set_defaults(func=cmd_tap)

    p = subparsers.add_parser("actuate", help="the reject component: verdicts in, the reject gate (PLC) driven on time")
    p.add_argument("--config", "-c", required=True, help="YAML config with an actuate section (docs/line.md)")
    p.add_argument("--output", choices=("log", "modbus", "opcua"), help="override actuate.output (log: a dry run)")
    _curve_arguments(p)
    p.set_defaults(func=cmd_actuate)

    p = subparsers.add_parser("keys", help="CurveZMQ keys for runtime.security")
    keys = p.add_subparsers(dest="keys_command", required=True)
    g = keys.add_parser("generate", help="write NAME.key (public) and NAME.key_secret (secret) into a folder")
    g.add_argument("--dir", required=True, help="folder for the key files (created if needed)")
    g.add_argument("--name", required=True, help="file name stem, e.g. linewatch-server or camera-3")
    g.set_defaults(func=cmd_keys_generate)

    p = subparsers.add_parser(
        "demo", help="synthetic line -> daemon -> tap on loopback, weights-free classic backend (no GPU, no downloads)"
    )
    p.add_argument("--frames", type=int, default=120, help="frames to send")
    # 10 fps: within what the classic backend judges at 224 px on a 2-core CPU (measured ~19-20
    # frames/s with `linewatch demo --fps 60` there); faster shows the overload policy (shed verdicts)
    p.add_argument("--fps", type=float, default=10.0, help="camera frame rate (default 10: within a small CPU's capacity)")
    p.add_argument("--product", choices=PRODUCTS, default=PRODUCTS[0])
    p.add_argument("--anomaly-rate", type=float, default=0.3, help="fraction of frames with a defect")
    p.add_argument("--keep-running", action="store_true", help="keep the daemon up (for curl /metrics) until Ctrl-C")
    p.add_argument("--workdir", help="where the synthetic images and the bank go (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    _register_camera(subparsers)
