"""Recipe changeover with real processes: a `linewatch serve` judging a stream of frames,
`linewatch bank switch` mid-stream through the control socket, refusals that keep the old
bank, and SIGHUP after an edit of the config file. Banks: classic backend, sim images, built
once per session by tests/conftest.py (two good-image subsets of one product, and one under other
detector settings)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import yaml

from tests.serving import Served, by_label, scrape, sim_images
from tests.waiting import wait_until

pytestmark = pytest.mark.system

SWITCH_TIMEOUT_S = 300.0  # the CLI's whole run: a loaded CI machine is slow, never wrong


@pytest.fixture
def control_dir():
    """A short directory for the control socket (a Unix socket path has at most 107 bytes)."""
    d = tempfile.mkdtemp(prefix="lwsw", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def bank_id(path: Path) -> str:
    from linewatch.detector.bank import TemplateBank

    return TemplateBank.load(path).bank_id


def bank_switch(socket: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "linewatch.cli", "bank", "switch", "--socket", str(socket), *args],
                          capture_output=True, text=True, timeout=SWITCH_TIMEOUT_S)


def switches(port: int) -> dict[str, float]:
    """linewatch_bank_switches_total by result, from /metrics parsed with prometheus_client."""
    return by_label(scrape(port).get("linewatch_bank_switches_total", {}), "result")


def banks_in_service(port: int) -> set[str]:
    return {dict(labels)["bank_id"] for labels in scrape(port).get("linewatch_bank_info", {})}


class Camera:
    """Streams cam0 frames 0, 1, 2, ... (raw, ten a second) on its own thread until stopped."""

    def __init__(self, served: Served) -> None:
        self.served = served
        self.images = sim_images(4, seed=21)
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.served.send_frame("cam0", self.sent, self.images[self.sent % 4], encoding="raw")
            self.sent += 1
            self._stop.wait(0.1)  # the camera's frame rate

    def __enter__(self) -> "Camera":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10.0)


def cam0(verdicts: list) -> list:
    return [v for v in verdicts if v.camera == "cam0"]


def judge_one(served: Served, frame_id: int) -> object:
    """Send one cam0 frame and return its verdict."""
    served.send_frame("cam0", frame_id, sim_images(1, seed=frame_id)[0], encoding="raw")
    served.recv(lambda vs: any(v.camera == "cam0" and v.frame_id == frame_id for v in vs), 120)
    mine = [v for v in served.verdicts if v.camera == "cam0" and v.frame_id == frame_id]
    assert mine, f"no verdict for cam0 #{frame_id}:\n{served.log()}"
    return mine[0]


def test_bank_switch_mid_stream_then_refusals(small_bank, second_bank, other_settings_bank, tmp_path, control_dir):
    old_id, new_id = bank_id(small_bank), bank_id(second_bank)
    assert old_id != new_id
    sock = control_dir / "ctl.sock"
    served = Served(tmp_path, small_bank, runtime={"control": {"socket": str(sock)}})
    try:
        served.wait_ready()
        served.warm_up("warm", lambda: served.cam.send_multipart([b"warm", b"not json", b""]))
        with Camera(served) as camera:
            served.recv(lambda vs: len(cam0(vs)) >= 10, 120)  # judging with the old bank
            res = bank_switch(sock, "--bank", str(second_bank))
            assert res.returncode == 0, res.stdout + res.stderr + served.log()
            after = camera.sent + 10
            served.recv(lambda vs: len(cam0(vs)) >= after, 120)  # and on with the new one
        served.recv(lambda vs: len(cam0(vs)) >= camera.sent, 120)

        verdicts = cam0(served.verdicts)
        assert [v.frame_id for v in verdicts] == list(range(camera.sent)), "a verdict is missing or out of order"
        assert all(v.verdict in ("pass", "fail") for v in verdicts), [(v.frame_id, v.verdict, v.reason) for v in verdicts]
        cut = re.search(r"cam0 #(\d+)", res.stdout)
        assert cut and f"{old_id} -> {new_id}" in res.stdout, res.stdout
        n_old = int(cut.group(1)) + 1  # frames 0 .. the last before the cut
        assert 10 <= n_old <= camera.sent - 10, (n_old, camera.sent)  # frames on both sides of the cut
        assert [v.bank_id for v in verdicts] == [old_id] * n_old + [new_id] * (camera.sent - n_old)
        assert banks_in_service(served.metrics_port) == {new_id}  # the old bank's label set is gone

        # Refusals: the bank in service stays, says why, and is counted.
        corrupt = tmp_path / "corrupt.lwbank"
        corrupt.write_bytes(b"\x00" * 64 + b"not a bank")
        refusals = [
            (str(corrupt), "not a readable bank file"),
            (str(other_settings_bank), "detector.image_size: bank built with 56, this config has 112"),
            (str(tmp_path / "missing.lwbank"), "no bank file here"),
        ]
        for i, (path, reason) in enumerate(refusals):
            res = bank_switch(sock, "--bank", path)
            assert res.returncode == 1, res.stdout + res.stderr
            assert reason in res.stderr and f"bank {new_id} stays in service" in res.stderr, res.stderr
            assert judge_one(served, 1000 + i).bank_id == new_id
        assert switches(served.metrics_port) == {"switched": 1.0, "refused": 3.0}
        assert banks_in_service(served.metrics_port) == {new_id}
        log = served.log_path.read_text()
        assert log.count("bank_switch_refused") == 3 and "bank_switched" in log
    finally:
        rc = served.stop()
    assert rc == 0, served.log()
    assert not sock.exists()  # removed at stop


def test_unreachable_daemon_exits_2(control_dir):
    res = bank_switch(control_dir / "none.sock", "--bank", "/x.lwbank")
    assert res.returncode == 2 and "cannot reach the daemon" in res.stderr, res.stderr


def test_sighup_rereads_the_config_file(small_bank, second_bank, tmp_path):
    served = Served(tmp_path, small_bank)
    try:
        served.wait_ready()
        served.warm_up("warm", lambda: served.cam.send_multipart([b"warm", b"not json", b""]))
        old_id, new_id = bank_id(small_bank), bank_id(second_bank)
        assert judge_one(served, 0).bank_id == old_id
        config = yaml.safe_load(served.config_path.read_text())

        # A config naming a bank that is not there: refused, the old bank stays.
        config["bank"]["path"] = str(tmp_path / "missing.lwbank")
        served.config_path.write_text(yaml.safe_dump(config))
        served.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: switches(served.metrics_port).get("refused") == 1, 60), served.log()
        assert judge_one(served, 1).bank_id == old_id

        # The second bank, and a runtime change that needs a restart (a warning, not a refusal).
        config["bank"]["path"] = str(second_bank)
        config["runtime"]["batch"]["max_batch"] = 2
        served.config_path.write_text(yaml.safe_dump(config))
        served.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: switches(served.metrics_port).get("switched") == 1, 120), served.log()
        assert banks_in_service(served.metrics_port) == {new_id}
        assert judge_one(served, 2).bank_id == new_id
        log = served.log_path.read_text()
        assert "runtime.batch.max_batch: running with 4, the config says 2" in log, log[-3000:]
        assert "models=reused" in log  # same detector settings: the models in service judge the new bank
    finally:
        rc = served.stop()
    assert rc == 0, served.log()
