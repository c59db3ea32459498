"""The pictures people look at: heatmap over the image, boxes by status, verdict banner."""

from __future__ import annotations

import cv2
import numpy as np

from linewatch.detector.result import InspectionResult
from linewatch.overlay import STATUS_COLOURS, overlay_jpeg, render_overlay


def result(verdict: str = "fail", objects=None) -> InspectionResult:
    heat = np.zeros((40, 60), np.float32)
    heat[20:30, 40:50] = 4.0  # a hot spot twice the threshold
    return InspectionResult(score=4.0, verdict=verdict, threshold=2.0, heatmap=heat, objects=objects or [],
                            backend="classic")


def test_overlay_keeps_size_marks_hot_spot_and_boxes() -> None:
    image = np.full((80, 120, 3), 128, np.uint8)  # twice the heatmap's size: it is resized
    box = {"bbox": [10, 30, 20, 20], "area": 400, "status": "missing", "score": 3.0}
    out = render_overlay(image, result(objects=[box]))
    assert out.shape == image.shape and out.dtype == np.uint8
    hot, cold = out[50, 90].astype(int), out[70, 60].astype(int)
    assert hot[0] > cold[0] + 40  # red end of the colour map where the map is at 2x threshold
    assert tuple(out[40, 10]) == STATUS_COLOURS["missing"]  # left edge of the box
    banner = out[:15].reshape(-1, 3)  # bar height max(14, 80 / 16), both corners drawn
    red = np.all(banner == (200, 30, 30), axis=1).mean()
    text = np.all(banner > 200, axis=1).mean()  # the white text, whatever the font rasterizer does
    assert red > 0.5 and text > 0.01  # a red banner for a fail, with words on it
    below = out[15:, 60:].reshape(-1, 3)
    assert not np.all(below == (200, 30, 30), axis=1).any()  # and only the banner is red


def test_overlay_banner_is_green_for_a_pass() -> None:
    out = render_overlay(np.full((80, 120, 3), 128, np.uint8), result(verdict="pass"))
    assert np.all(out[:15].reshape(-1, 3) == (30, 140, 30), axis=1).mean() > 0.5


def test_overlay_jpeg_decodes_to_the_image_size() -> None:
    data = overlay_jpeg(np.zeros((40, 60, 3), np.uint8), result(verdict="pass"))
    assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR).shape == (40, 60, 3)


def test_a_grey_frame_is_drawn_as_the_same_overlay_as_its_three_channel_copy() -> None:
    grey = np.tile(np.arange(120, dtype=np.uint8), (80, 1))
    box = {"bbox": [10, 30, 20, 20], "area": 400, "status": "missing", "score": 3.0}
    out = render_overlay(grey, result(objects=[box]))
    assert out.shape == (80, 120, 3)
    np.testing.assert_array_equal(out, render_overlay(np.dstack([grey] * 3), result(objects=[box])))


def test_archive_pictures_of_a_grey_frame_keep_it_grey() -> None:
    from linewatch.runtime.sinks.archive.encoder import encode_pictures
    from linewatch.wire import Verdict

    grey = np.tile(np.arange(120, dtype=np.uint8), (80, 1))
    verdict = Verdict(camera="cam0", frame_id=1, verdict="fail", capture_ts=0.0, score=4.0, threshold=2.0,
                      backend="classic", heatmap=result().heatmap)
    frame, _, overlay = encode_pictures(grey, verdict)
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_UNCHANGED), grey)
    assert cv2.imdecode(np.frombuffer(overlay, np.uint8), cv2.IMREAD_COLOR).shape == (80, 120, 3)
