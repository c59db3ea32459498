"""The live page in a real headless Chromium against a real `linewatch serve`: after frames with
defects were sent, it shows the counts the verdict stream carried and the failed parts with
their overlays (a screenshot is taken); it updates by itself when more verdicts arrive, in the
same page; and it says so when the daemon is gone."""

from __future__ import annotations

import signal

import numpy as np
import pytest
from PIL import Image

from linewatch import wire
from linewatch.sim import render
from tests.serving import PRODUCT, SIZE, Served, of

pytestmark = pytest.mark.system  # every test here starts a program


WAIT_S = 120.0  # generous: the classic backend on a loaded CI machine is slow, never wrong
VERDICTS = ("pass", "fail", "timeout", "shed", "error")


def frames(n: int, seed: int) -> list[np.ndarray]:
    """Sim parts, every other one with a gross defect (a part of the wrong kind or one too many)."""
    rng = np.random.default_rng(seed)
    defects = ["wrong_part", "extra"]
    return [render(PRODUCT, rng, None if i % 2 == 0 else defects[i // 2 % 2], size=SIZE)[0] for i in range(n)]


def drain(served: Served) -> list:
    """Take every verdict already waiting on the test's subscriber."""
    while served.sub.poll(0):
        served.verdicts.append(wire.decode_verdict(served.sub.recv_multipart()))
    return served.verdicts


def page_counts(driver) -> dict[str, int | None]:
    """The counts the page shows (None: not drawn yet, "–")."""
    from selenium.webdriver.common.by import By

    texts = {v: driver.find_element(By.ID, f"count-{v}").text for v in VERDICTS}
    return {v: int(t) if t.isdigit() else None for v, t in texts.items()}


def expected_counts(served: Served) -> dict[str, int]:
    """What the page must show: the subscriber's verdicts, plus the ones released before it had
    joined (seq 0 .. first - 1: warm-up probes, answered `error`)."""
    seqs = [v.seq for v in served.verdicts]
    counts = {value: sum(v.verdict == value for v in served.verdicts) for value in VERDICTS}
    counts["error"] += min(seqs)
    assert sorted(seqs) == list(range(min(seqs), max(seqs) + 1)), "the subscriber lost a verdict"
    return counts


def test_live_page_shows_counts_and_failed_parts_and_updates_itself(small_bank, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    served = Served(tmp_path, small_bank)
    try:
        served.wait_ready()
        served.warm_up("warm", lambda: served.cam.send_multipart([b"warm", b"not json", b""]))
        images = frames(8, seed=21)
        for i in range(4):
            served.send_frame("cam0", i, images[i])
        served.recv(lambda vs: len(of(vs, "cam0")) >= 4, WAIT_S)
        cam0 = of(served.verdicts, "cam0")
        assert len(cam0) == 4, served.log()
        assert any(v.verdict == "fail" for v in cam0), [(v.frame_id, v.verdict, v.score) for v in cam0]

        browser.get(f"http://127.0.0.1:{served.metrics_port}/live")
        wait = WebDriverWait(browser, WAIT_S)

        def shows_all_verdicts_and_a_failed_part() -> bool:
            drain(served)
            return (page_counts(browser) == expected_counts(served)
                    and browser.execute_script(
                        "const imgs = [...document.querySelectorAll('#failures .failure img')];"
                        "return imgs.length > 0 && imgs.every(img => img.complete && img.naturalWidth > 0)"))

        wait.until(lambda _: shows_all_verdicts_and_a_failed_part())
        counts = page_counts(browser)
        assert counts["fail"] == sum(v.verdict == "fail" for v in served.verdicts) >= 1
        assert browser.find_element(By.ID, "total").text == str(sum(counts.values()))
        newest_fail = [v for v in cam0 if v.verdict == "fail"][-1]
        card = browser.find_element(By.CSS_SELECTOR, "#failures .failure")
        assert f"frame {newest_fail.frame_id}" in card.text and f"cam0-{newest_fail.frame_id}" in card.text, card.text
        assert f"{newest_fail.score:.3f}" in card.text, card.text
        assert browser.find_element(By.ID, "link").text == "READY"
        assert "weights-free" in browser.find_element(By.ID, "backend").text  # the classic backend, honestly
        assert not browser.find_element(By.ID, "lost").is_displayed()

        shot = tmp_path / "live.png"
        assert browser.save_screenshot(str(shot))
        width, height, ratio = browser.execute_script("return [innerWidth, innerHeight, devicePixelRatio]")
        with Image.open(shot) as png:
            assert png.format == "PNG" and png.size == (round(width * ratio), round(height * ratio))
            picture = np.asarray(png.convert("RGB"))
        rect = browser.find_element(By.CSS_SELECTOR, "#failures .failure img").rect  # the overlay, as drawn
        x, y, w, h = (round(rect[k] * ratio) for k in ("x", "y", "width", "height"))
        drawn = picture[y:min(y + h, picture.shape[0]), x:x + w]
        assert drawn.size and drawn.std() > 10, "the failed part's picture is not in the screenshot"

        # The same page (no reload) follows new verdicts by itself.
        browser.execute_script("window.sameDocument = true")
        cards_before = len(browser.find_elements(By.CSS_SELECTOR, "#failures .failure"))
        for i in range(4, 8):
            served.send_frame("cam0", i, images[i])
        served.recv(lambda vs: len(of(vs, "cam0")) >= 8, WAIT_S)
        assert len(of(served.verdicts, "cam0")) == 8, served.log()
        wait.until(lambda _: shows_all_verdicts_and_a_failed_part())
        assert sum(page_counts(browser).values()) > sum(counts.values())
        new_fails = [v for v in of(served.verdicts, "cam0")[4:] if v.verdict == "fail"]
        cards = browser.find_elements(By.CSS_SELECTOR, "#failures .failure")
        assert len(cards) == cards_before + len(new_fails)
        if new_fails:
            assert f"frame {new_fails[-1].frame_id}" in cards[0].text, cards[0].text
        assert browser.execute_script("return window.sameDocument === true"), "the page was reloaded"

        # The daemon goes away: the page says the connection is lost.
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(60) == 0, served.log()
        wait.until(lambda _: browser.find_element(By.ID, "lost").is_displayed())
        assert browser.find_element(By.ID, "link").text == "CONNECTION LOST"
    finally:
        served.stop()
