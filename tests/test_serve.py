"""`linewatch serve` as a real process: a classic-backend bank from sim data, frames in over
ZeroMQ (our wire format and imagezmq's own ImageSender), verdicts out, /metrics, bad frames,
SIGTERM mid-stream, config errors. Every wait is bounded."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml

from tests.serving import DETECTOR, SIZE, Served, by_label, http_get, of, scrape, sim_images
from tests.waiting import wait_until

pytestmark = pytest.mark.system


def test_serve_wire_and_imagezmq_frames_bad_frames_and_metrics(small_bank, tmp_path):
    import imagezmq
    import zmq

    # imagezmq's PUB sender binds (port 0 here), the daemon connects to it
    sender = imagezmq.ImageSender(connect_to="tcp://127.0.0.1:0", REQ_REP=False)
    served = Served(tmp_path, small_bank, imagezmq_url=sender.zmq_socket.getsockopt_string(zmq.LAST_ENDPOINT))
    try:
        served.wait_ready()
        log = served.log()
        assert "classic (weights-free" in log and "not SAM-LAD" in log, log  # the start line names the backend
        assert small_bank.exists()
        served.warm_up("warm", lambda: served.cam.send_multipart([b"warm", b"not json", b""]))
        served.warm_up("izwarm", lambda: sender.send_jpg("izwarm", b"not a jpeg"))

        images = sim_images(8, seed=11)
        for i in range(6):
            served.send_frame("cam0", i, images[i])
        for image in images[:3]:  # imagezmq: BGR arrays; frame ids are counted by the daemon
            sender.send_image("izcam|extra text", np.ascontiguousarray(image[:, :, ::-1]))
        # bad frames: a header that is not JSON, then a JPEG that is not one
        served.cam.send_multipart([b"bad", b"{this is not json", b"\x00"])
        header = {"v": 1, "camera": "bad", "frame_id": 7, "capture_ts": time.time(), "encoding": "jpeg"}
        served.cam.send_multipart([b"bad", json.dumps(header).encode(), b"\xff\xd8\xff garbage"])
        # the daemon keeps serving after them
        for i in (6, 7):
            served.send_frame("cam0", i, images[i])

        want = {"cam0": 8, "izcam": 3, "bad": 2}
        verdicts = served.recv(lambda vs: all(len(of(vs, c)) >= n for c, n in want.items()), 120)
        # Nothing more (no duplicates) can follow once nothing is in flight in the daemon and
        # this subscriber has every verdict released since its first one: seq counts 0, 1, 2, ...
        # over the run, and the earliest warm-up verdicts may have gone out before it joined.
        def settled() -> bool:
            m = scrape(served.metrics_port)
            released = sum(m["linewatch_verdicts_total"].values())
            first = min(v.seq for v in served.verdicts)
            served.recv(lambda vs: len(vs) >= released - first, 1.0)
            seqs = sorted(v.seq for v in served.verdicts)
            return m["linewatch_inflight_frames"][()] == 0 and seqs == list(range(first, int(released)))

        assert wait_until(settled, 60), served.log()
        verdicts = served.verdicts
        assert len({v.id for v in verdicts}) == len(verdicts)  # and each has its own id

        cam0 = of(verdicts, "cam0")
        assert [v.frame_id for v in cam0] == list(range(8)), [(v.frame_id, v.verdict, v.reason) for v in cam0]
        assert all(v.verdict in ("pass", "fail") and v.score is not None and v.threshold is not None for v in cam0), \
            [(v.frame_id, v.verdict, v.reason) for v in cam0]
        assert all(v.backend == "classic" for v in cam0)
        assert [v.part_id for v in cam0] == [f"cam0-{i}" for i in range(8)]
        iz = of(verdicts, "izcam")
        assert len(iz) == 3 and [v.frame_id for v in iz] == sorted({v.frame_id for v in iz})  # increasing
        assert all(v.verdict in ("pass", "fail") for v in iz), [(v.verdict, v.reason) for v in iz]
        bad = of(verdicts, "bad")
        assert [v.verdict for v in bad] == ["error", "error"]
        assert [v.reason for v in bad] == ["bad_header", "decode_failed"]
        assert bad[1].frame_id == 7

        m = scrape(served.metrics_port)
        received = by_label(m["linewatch_frames_received_total"], "camera")
        for camera, n in want.items():
            assert received.get(camera) == n, received
        per_camera = by_label(m["linewatch_verdicts_total"], "camera")
        for camera, n in want.items():
            assert per_camera.get(camera) == n, per_camera
        by_value = {}
        for labels, value in m["linewatch_verdicts_total"].items():
            d = dict(labels)
            if d["camera"] in want:
                by_value[d["verdict"]] = by_value.get(d["verdict"], 0) + value
        assert by_value.get("error") == 2 and by_value.get("pass", 0) + by_value.get("fail", 0) == 11, by_value
        assert m["linewatch_ready"][()] == 1
        assert http_get(served.metrics_port, "/healthz")[0] == 200
    finally:
        sender.close()
        rc = served.stop()
    assert rc == 0, served.log()


def test_serve_a_mono_bank_judges_mono8_and_16_bit_frames_and_refuses_colour_ones(mono_bank, tmp_path):
    from linewatch import wire
    from linewatch.sim import render

    served = Served(tmp_path, mono_bank)
    try:
        served.wait_ready()
        served.warm_up("warm", lambda: served.cam.send_multipart([b"warm", b"not json", b""]))
        rng = np.random.default_rng(21)
        grey = [render("screw_tray", rng, None if i % 2 == 0 else "missing", size=SIZE, mono=True)[0] for i in range(4)]
        def send(frame_id: int, image: np.ndarray, encoding: str, pixel_format: str = "gray") -> None:
            served.cam.send_multipart(wire.encode_frame("cam0", frame_id, image, encoding=encoding,
                                                        pixel_format=pixel_format))

        for i, image in enumerate(grey):  # Mono8 as a camera bridge sends it: raw, one channel
            send(i, image, "raw")
        send(4, grey[0], "png")
        send(5, grey[0].astype(np.uint16) * 257, "png")  # Mono16: v * 257 through [0, 65535] is v again
        send(6, render("screw_tray", rng, None, size=SIZE)[0], "png", "rgb")  # a colour camera on a mono line
        cam0 = served.recv(lambda vs: len(of(vs, "cam0")) >= 7, 120)
        cam0 = of(cam0, "cam0")
        got = [(v.frame_id, v.verdict, v.reason) for v in cam0]
        assert [v.frame_id for v in cam0] == list(range(7)), got
        assert all(v.verdict in ("pass", "fail") and v.score is not None for v in cam0[:6]), got
        # one image, three encodings: one score (up to rounding: frames batched with different
        # others sum in another order, ~1e-5 apart; different images are far more than 1e-4 apart)
        assert cam0[4].score == pytest.approx(cam0[0].score, abs=1e-4) == cam0[5].score, got
        assert (cam0[6].verdict, cam0[6].reason) == ("error", "colour_image")
        assert max(cam0[i].score for i in (0, 2)) < min(cam0[i].score for i in (1, 3)), got  # missing parts
        assert "a colour frame, the bank judges grey (mono) frames" in served.log()
    finally:
        rc = served.stop()
    assert rc == 0, served.log()


def test_sigterm_mid_stream_answers_every_frame_once(small_bank, tmp_path):
    served = Served(tmp_path, small_bank, deadline_ms=5000.0)
    try:
        served.wait_ready()
        served.warm_up("warm", lambda: served.cam.send_multipart([b"warm", b"not json", b""]))
        images = sim_images(4, seed=5)
        n = 12
        for i in range(n):  # faster than the detector: frames are still in flight at SIGTERM
            served.send_frame("cam0", i, images[i % 4], encoding="raw")
        def cam0_received() -> float:
            return by_label(scrape(served.metrics_port).get("linewatch_frames_received_total", {}), "camera").get("cam0", 0)

        assert wait_until(lambda: cam0_received() == n, 30) and cam0_received() == n, cam0_received()
        served.proc.send_signal(signal.SIGTERM)
        rc = served.proc.wait(60)
        verdicts = served.drain_after_exit()
        cam0 = of(verdicts, "cam0")
        assert [v.frame_id for v in cam0] == list(range(n)), [(v.frame_id, v.verdict, v.reason) for v in cam0]
        assert rc == 0, served.log()
        log = served.log()
        assert "signal_received" in log
        inflight = re.search(r"inflight_at_stop=(\d+)", log)
        assert inflight and int(inflight.group(1)) > 0, log  # the signal came while frames were in flight
    finally:
        served.stop()


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "linewatch.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_serve_bad_config_key_exits_2_naming_the_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("runtime:\n  ingest:\n    endpointz: []\n")
    res = _run_cli("serve", "-c", str(cfg))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "runtime.ingest.endpointz" in res.stderr and "unknown key" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_serve_missing_bank_says_how_to_build_one(tmp_path):
    cfg = tmp_path / "ok.yaml"
    cfg.write_text(yaml.safe_dump({"detector": DETECTOR, "bank": {"path": str(tmp_path / "nope.lwbank")}}))
    res = _run_cli("serve", "-c", str(cfg))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "nope.lwbank" in res.stderr and "linewatch bank build" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("which", ["ingest", "publish", "metrics"])
def test_a_port_in_use_is_one_line_of_error(small_bank, tmp_path, which):
    # Fault run: an ingest port in use printed JSON log lines before the one-line error.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        urls = {name: f"tcp://127.0.0.1:{port if name == which else 0}" for name in ("ingest", "publish")}
        config = {
            "detector": DETECTOR,
            "bank": {"path": str(small_bank)},
            "runtime": {
                "ingest": {"endpoints": [{"url": urls["ingest"]}]},
                "publish": {"url": urls["publish"]},
                "metrics": {"port": port if which == "metrics" else 0},
            },
        }
        cfg = tmp_path / "taken.yaml"
        cfg.write_text(yaml.safe_dump(config))
        res = _run_cli("serve", "-c", str(cfg))
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("linewatch: error: ") and str(port) in lines[0] and "in use" in lines[0], lines[0]
