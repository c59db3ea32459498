"""The self-check in a real `linewatch serve` (classic bank from sim images): its rounds run at
start and every interval, their verdicts reach no verdict subscriber (whose sequence has no
gap), and a mislabelled reference -- a defective part listed as good -- fails it: the failure
counter in the real Prometheus text, the live page (its state and, in Chromium, what it
shows), the log."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from linewatch.images import read_image, write_image
from linewatch.sim.defects import paint_defect
from tests.serving import Served, http_get, of, scrape, sim_images
from tests.waiting import wait_until

pytestmark = pytest.mark.system


def bank_good_files(bank: Path) -> list[Path]:
    """The good images `bank` was built from (its manifest names them)."""
    from linewatch.detector.bank import TemplateBank

    manifest = TemplateBank.load(bank).manifest
    return [Path(manifest.source) / name for name in manifest.source_files]


def rounds(port: int) -> dict[str, float]:
    samples = scrape(port).get("linewatch_selfcheck_rounds_total", {})
    return {dict(labels)["result"]: value for labels, value in samples.items()}


def test_selfcheck_in_serve(small_bank, tmp_path, browser):
    good = bank_good_files(small_bank)
    # a defective part listed as good: the bank's 4th good image with a blob painted on it
    mislabelled = tmp_path / "mislabelled.png"
    write_image(mislabelled, paint_defect(read_image(good[3]), "contamination", np.random.default_rng(7))[0])
    selfcheck = {"enabled": True, "interval_s": 1.0, "good": [str(good[0]), str(mislabelled)], "bad_count": 2}
    served = Served(tmp_path, small_bank, runtime={"selfcheck": selfcheck})
    try:
        served.wait_ready()
        port = served.metrics_port
        # the round at start finished (it fails: one of its "good" references is defective)
        assert wait_until(lambda: rounds(port).get("fail", 0) >= 1, 60), served.log()
        served.warm_up("warm", lambda: served.cam.send_multipart([b"warm", b"not json", b""]))
        # a round that ran while the subscriber was connected (interval 1 s)
        after = sum(rounds(port).values())
        assert wait_until(lambda: sum(rounds(port).values()) >= after + 1, 60), served.log()
        images = sim_images(4, seed=5)
        for i, image in enumerate(images):
            served.send_frame("cam0", i, image, encoding="png")
        served.recv(lambda vs: len(of(vs, "cam0")) == 4, 60)

        metrics = scrape(port)
        failures = {dict(k)["kind"]: v for k, v in metrics["linewatch_selfcheck_failures_total"].items()}
        results = {dict(k)["result"]: v for k, v in metrics["linewatch_selfcheck_rounds_total"].items()}
        # every round fails, each on the mislabelled reference alone, as a wrong verdict
        assert results["pass"] == 0 and results["fail"] >= 2
        assert failures["wrong_verdict"] == results["fail"]
        assert failures["drift"] == failures["not_judged"] == failures["no_references"] == 0
        assert metrics["linewatch_selfcheck_failing"][()] == 1.0
        assert metrics["linewatch_selfcheck_last_ok_timestamp_seconds"][()] == 0.0
        assert metrics["linewatch_selfcheck_interval_seconds"][()] == 1.0
        # the self-check's frames were judged (counted under its camera), none was published
        assert metrics["linewatch_verdicts_total"][(("camera", "_selfcheck"), ("verdict", "fail"))] >= 3 * 2
        assert not of(served.verdicts, "_selfcheck")
        seqs = [v.seq for v in served.verdicts]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs  # no gap where they went
        assert [v.verdict in ("pass", "fail") for v in of(served.verdicts, "cam0")] == [True] * 4

        status, body = http_get(port, "/live/state.json")
        last = json.loads(body)["daemon"]["selfcheck"]["last"]
        assert status == 200 and last["ok"] is False and last["failed"] == ["good/mislabelled.png"]
        checks = {c["reference"]: c for c in last["checks"]}
        assert set(checks) == {f"good/{good[0].name}", "good/mislabelled.png", f"bad/contamination-0/{good[0].name}",
                               "bad/scratch-1/mislabelled.png"}
        assert checks[f"good/{good[0].name}"]["verdict"] == "pass" and checks[f"good/{good[0].name}"]["failure"] is None
        assert checks["good/mislabelled.png"]["verdict"] == "fail"
        assert all(checks[name]["verdict"] == "fail" and checks[name]["failure"] is None
                   for name in checks if name.startswith("bad/"))
        assert http_get(port, "/readyz")[0] == 200  # unready_on_failure is off

        # the live page, in a browser: the last self-check failed, on which reference, and why
        from selenium.webdriver.common.by import By
        from selenium.webdriver.support.ui import WebDriverWait

        browser.get(f"http://127.0.0.1:{port}/live")
        WebDriverWait(browser, 60).until(
            lambda b: b.find_element(By.ID, "selfcheck-pill").text == "SELF-CHECK FAILED")
        detail = browser.find_element(By.ID, "selfcheck-detail").text
        assert "4 references" in detail and "good/mislabelled.png: wrong_verdict (fail, expected pass" in detail, detail
        assert browser.find_element(By.ID, "selfcheck").is_displayed()
        # its fails are not the line's: the page counts cam0's alone
        assert browser.find_element(By.ID, "count-fail").text == str(sum(v.verdict == "fail" for v in served.verdicts))
    finally:
        code = served.stop()
    assert code == 0
    assert "selfcheck_failed" in served.log_path.read_text()
