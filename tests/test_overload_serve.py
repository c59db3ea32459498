"""Overload against a real `linewatch serve`: a flooding camera cannot starve another, and
frames declaring a huge image are refused without being decoded. Counts, never times: how
fast this machine judges decides only how many flood frames are shed, not what is asserted.
(The curve, judged/s against the load offered, is measured by benchmarks/overload.py.)"""

from __future__ import annotations

import json
import struct
import time
import zlib

import pytest

from tests.serving import Served, by_label, of, scrape, sim_images

pytestmark = pytest.mark.system


def huge_png(width: int, height: int) -> bytes:
    """A real 16-bit RGBA PNG of width x height grey pixels, built without holding its pixels:
    decoding it would take width * height * 8 bytes (392 MB at 7000 x 7000)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + b"\x80\x00" * 4 * width  # filter byte, then RGBA samples of 16 bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 6, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc status")


def test_a_flooding_camera_cannot_starve_another_and_huge_frames_are_refused_unread(small_bank, tmp_path):
    served = Served(tmp_path, small_bank, deadline_ms=3000.0)
    try:
        served.wait_ready()
        served.warm_up("warm", lambda: served.cam.send_multipart([b"warm", b"not json", b""]))
        images = sim_images(4, seed=11)
        big = huge_png(7000, 7000)
        slow_n, flood_per_slow = 30, 60  # slow: ~3 frames/s; flood: ~200 frames/s, far beyond capacity
        # (75 frames/s was not, once the fused score got cheaper: nothing was shed on a quiet machine)
        flood_n = 0
        for i in range(slow_n):
            served.send_frame("slow", i, images[i % 4], encoding="png")
            for _ in range(flood_per_slow):
                served.send_frame("flood", flood_n, images[flood_n % 4], encoding="png")
                flood_n += 1
                time.sleep(0.3 / flood_per_slow)  # pacing the sender, not waiting for a state
            if i == slow_n // 2:  # two at once, from a third camera, mid-flood
                for k in range(2):
                    header = {"v": 1, "camera": "big", "frame_id": k, "capture_ts": time.time(), "encoding": "png"}
                    served.cam.send_multipart([b"big", json.dumps(header).encode(), big])
        expected = {"slow": slow_n, "flood": flood_n, "big": 2}
        served.recv(lambda vs: all(len(of(vs, c)) >= n for c, n in expected.items()), timeout_s=120)

        for camera, n in expected.items():  # every frame answered exactly once
            assert sorted(v.frame_id for v in of(served.verdicts, camera)) == list(range(n)), camera
        slow = [v.verdict for v in of(served.verdicts, "slow")]
        assert sum(v in ("pass", "fail") for v in slow) >= 0.9 * slow_n, slow
        assert [(v.verdict, v.reason) for v in of(served.verdicts, "big")] == [("error", "too_large")] * 2  # max_decoded_bytes
        assert peak_rss_mb(served.proc.pid) < 1200  # 392 MB each, had they been decoded

        shed = scrape(served.metrics_port)["linewatch_frames_shed_total"]
        flood_shed = {dict(labels)["reason"]: n for labels, n in shed.items() if dict(labels)["camera"] == "flood"}
        assert sum(flood_shed.values()) == sum(v.verdict == "shed" for v in of(served.verdicts, "flood")) > 0
        assert set(flood_shed) <= {"over_share", "pending_full", "deadline_unreachable"}
        assert by_label(scrape(served.metrics_port)["linewatch_frames_received_total"], "camera")["big"] == 2
        log = served.log_path.read_text(errors="replace")
        assert "7000x7000 png, 4 channels of 16 bits" in log  # the refusal says what arrived
    finally:
        served.stop()
