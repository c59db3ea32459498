"""Bank building: the errors bad input folders give, the scores calibration pools (validation
and leave-one-out), and a leave-one-out build (no validation folder) on non-square synthetic
images. The threshold computation itself is tested in test_calibration.py."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pytest
import torch

from linewatch.bank_builder import BankBuildError, build_bank, judge_bank_images
from linewatch.config import config_from_dict
from linewatch.detector.bank import IDENTITY_KEYS, BankManifest, TemplateBank
from linewatch.detector.inspector import Inspector
from linewatch.detector.models import build_models
from linewatch.detector.result import OBJECT_STATUSES
from linewatch.images import ImageError
from linewatch.sim import render

CPU = torch.device("cpu")
H, W = 128, 160  # non-square on purpose: catches (w, h) / (h, w) mix-ups


def small_config(**calibration):
    return config_from_dict({
        "detector": {"image_size": 112, "device": "cpu", "k_references": 2},
        "calibration": calibration,
    })


def sim_image(seed: int, anomaly: str | None = None, product: str = "screw_tray") -> np.ndarray:
    """A 128 x 160 frame: the 128 x 128 synthetic scene with the tray extended on the right."""
    image, _, _ = render(product, np.random.default_rng(seed), anomaly=anomaly, size=H)
    return cv2.copyMakeBorder(image, 0, 0, 0, W - H, cv2.BORDER_REPLICATE)


def write_png(path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR) if rgb.ndim == 3 else rgb)


def write_folder(folder, n: int, start: int = 0, shape=(H, W)) -> list:
    paths = []
    for i in range(n):
        img = sim_image(start + i)
        if img.shape[:2] != shape:
            img = cv2.resize(img, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)
        paths.append(folder / f"{i:03d}.png")
        write_png(paths[-1], img)
    return paths


# ---------------------------------------------------------------------------- input errors


def _build_error(exc, *args, config=None, **kwargs) -> str:
    with pytest.raises(exc) as info:
        build_bank(config or small_config(), *args, progress=False, **kwargs)
    return str(info.value)


def test_missing_good_folder(tmp_path):
    message = _build_error(ImageError, tmp_path / "nope")
    assert str(tmp_path / "nope") in message and "not a folder" in message


def test_empty_good_folder(tmp_path):
    message = _build_error(ImageError, tmp_path)
    assert str(tmp_path) in message and "no images" in message


def test_folder_of_non_images(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "data.csv").write_text("1,2,3")
    (tmp_path / "sub.png").mkdir()  # a folder named like an image is not an image
    message = _build_error(ImageError, tmp_path)
    assert str(tmp_path) in message and "no images" in message


def test_mixed_sizes_names_the_file(tmp_path):
    write_folder(tmp_path, 5)
    odd = tmp_path / "002.png"
    write_png(odd, cv2.resize(sim_image(2), (W // 2, H // 2)))
    message = _build_error(ImageError, tmp_path)
    assert str(odd) in message
    assert f"{W // 2}x{H // 2}" in message and f"{W}x{H}" in message


@pytest.mark.parametrize("kind", ["random-bytes", "truncated", "text", "empty"])
def test_corrupt_png_among_good_images_names_the_file(tmp_path, kind):
    write_folder(tmp_path, 5)
    bad = tmp_path / "003.png"
    data = bad.read_bytes()
    if kind == "random-bytes":
        bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    elif kind == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "text":
        bad.write_text("not a png")
    else:
        bad.write_bytes(b"")
    message = _build_error(ImageError, tmp_path)
    assert str(bad) in message and "not a readable image" in message


def test_grey_png_among_good_images_names_the_file(tmp_path):
    write_folder(tmp_path, 5)
    grey = tmp_path / "001.png"
    write_png(grey, cv2.cvtColor(sim_image(1), cv2.COLOR_RGB2GRAY))
    message = _build_error(ImageError, tmp_path)
    assert str(grey) in message and "grey" in message


def test_too_few_images_for_leave_one_out(tmp_path):
    write_folder(tmp_path, 3)  # k_references = 2 needs 4
    message = _build_error(BankBuildError, tmp_path)
    assert str(tmp_path) in message
    assert "3 good images" in message and "k_references + 2 = 4" in message


def test_too_few_validation_images(tmp_path):
    write_folder(tmp_path / "good", 4)
    write_folder(tmp_path / "val", 3, start=50)
    message = _build_error(BankBuildError, tmp_path / "good", tmp_path / "val")
    assert str(tmp_path / "val") in message
    assert "3 validation images" in message and "min_validation_images" in message


def test_fewer_good_images_than_k_with_validation(tmp_path):
    write_folder(tmp_path / "good", 1)
    write_folder(tmp_path / "val", 5, start=50)
    message = _build_error(BankBuildError, tmp_path / "good", tmp_path / "val")
    assert str(tmp_path / "good") in message and "k_references" in message


def test_exactly_k_good_images_with_validation(tmp_path):
    """Learning each part's normal variation compares every good image with k others: k + 1
    images are needed, and the error must say so up front (not a bank error mid-build)."""
    write_folder(tmp_path / "good", 2)
    write_folder(tmp_path / "val", 5, start=50)
    message = _build_error(BankBuildError, tmp_path / "good", tmp_path / "val")
    assert str(tmp_path / "good") in message and "k_references + 1 = 3" in message


def test_exactly_k_good_images_without_normalization(tmp_path):
    write_folder(tmp_path / "good", 2)
    write_folder(tmp_path / "val", 5, start=50)
    config = small_config()
    config.detector.measure.normalize_objects = False
    bank = build_bank(config, tmp_path / "good", tmp_path / "val", progress=False)
    cal = bank.calibration
    assert bank.size == 2 and cal.n == 5  # 2 good images: no leave-one-out with k = 2
    assert "validation folder" in cal.source and "leave-one-out" not in cal.source
    assert torch.all(bank.object_noise == 1.0)


def test_calibration_pools_validation_and_leave_one_out_and_warns(tmp_path):
    write_folder(tmp_path / "good", 4)
    write_folder(tmp_path / "val", 5, start=50)
    messages = []
    config = small_config()
    config.detector.score.source = "objects"  # raw object scores: comparable magnitudes (a fused score can be ~0)
    bank = build_bank(config, tmp_path / "good", tmp_path / "val", progress=False, log=messages.append)
    cal = bank.calibration
    assert cal.n == 9 and len(cal.scores) == 9  # 5 validation + 4 leave-one-out
    assert cal.source == (f"validation folder {(tmp_path / 'val').resolve()} (5) + "
                             "leave-one-out over the good images (4)")
    # validation images are not in the bank: each scores like a leave-one-out image, not ~0
    assert min(cal.scores[:5]) > 0.2 * max(cal.scores[5:])
    assert cal.n_required == 1000 and cal.enough is False
    assert cal.ci_low <= cal.expected_false_reject_rate <= cal.ci_high
    warnings = [m for m in messages if m.startswith("WARNING")]
    assert warnings == [f"WARNING: calibration: {cal.warning}"]
    assert "9 good-image scores are too few for a false-reject rate of 0.50%" in cal.warning
    assert "at least 1000 good images" in cal.warning


def test_empty_validation_folder(tmp_path):
    write_folder(tmp_path / "good", 4)
    (tmp_path / "val").mkdir()
    message = _build_error(ImageError, tmp_path / "good", tmp_path / "val")
    assert str(tmp_path / "val") in message and "no images" in message


def test_validation_of_another_size(tmp_path):
    write_folder(tmp_path / "good", 4)
    write_folder(tmp_path / "val", 5, start=50, shape=(H, H))
    message = _build_error(ImageError, tmp_path / "good", tmp_path / "val")
    assert str(tmp_path / "val") in message
    assert f"{H}x{H}" in message and f"{W}x{H}" in message


# ---------------------------------------------------------------------------- a leave-one-out build


@pytest.fixture(scope="module")
def loo(tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    paths = write_folder(folder, 7)
    config = small_config()
    models = build_models(config.detector, CPU)
    bank = build_bank(config, folder, None, models=models, progress=False)
    return folder, paths, config, models, bank


def test_leave_one_out_manifest(loo):
    folder, paths, config, models, bank = loo
    m = bank.manifest
    cal = bank.calibration
    assert cal.source == f"leave-one-out over the good images ({len(paths)})"
    assert cal.n == len(paths) == bank.size
    assert len(cal.scores) == len(paths)
    assert all(np.isfinite(cal.scores))
    assert cal.method in ("normal-fit", "lognormal-fit", "gamma-fit")  # 7 scores: a whole-sample fit
    assert cal.threshold > max(cal.scores)  # its 99.5 % quantile lies beyond the largest of 7
    assert cal.observed_false_reject_rate == 0.0
    assert cal.target_false_reject_rate == config.calibration.target_false_reject_rate
    assert cal.confidence == config.calibration.confidence
    assert cal.n_required == 1000 and cal.enough is False and "7 good-image scores" in cal.warning
    assert bank.threshold == cal.threshold
    assert m.source_shape == [H, W, 3]
    assert m.image_size == 112
    assert m.images == len(paths)
    assert m.source_files == [p.name for p in paths]
    assert m.source == str(folder.resolve())
    assert re.fullmatch(r"[0-9a-f]{12}", m.bank_id)
    assert set(m.identity) == set(IDENTITY_KEYS)
    assert m.identity["backend"] == "classic"
    assert m.identity["config_hash"] == config.detector.identity_hash()
    assert m.identity == Inspector(config.detector, models, bank, CPU).identity()
    assert m.build_seconds >= 0
    assert isinstance(m, BankManifest) and BankManifest.from_dict(m.to_dict()) == m  # as a file holds it


def test_leave_one_out_scores_exclude_self(loo):
    """Judged against a bank holding itself, an image scores ~0; leave-one-out must not."""
    folder, paths, config, models, bank = loo
    from linewatch.images import read_image

    inspector = Inspector(config.detector, models, bank, CPU)
    own = inspector.inspect([read_image(paths[0])])[0].components["objects"]
    left_out = [r.components["objects"] for _, batch in judge_bank_images(inspector, 8, False, "") for r in batch.results]
    assert min(left_out) > 2 * own + 1e-3


def test_bank_tensors(loo):
    _, paths, config, _, bank = loo
    z = len(paths)
    assert bank.retrieval.shape[0] == z and bank.retrieval.dtype == torch.float32
    assert bank.features.dtype == torch.float16 and bank.masks.dtype == torch.float16
    assert bank.features.shape[0] == z and bank.masks.shape[:2] == bank.object_valid.shape
    assert bank.masks.shape[-2:] == bank.features.shape[-2:]
    assert (bank.object_valid.sum(1) == 6).all()  # screw_tray: 6 parts, all segmented
    # padding objects have zero masks and descriptors, and noise 1
    assert not bank.masks[~bank.object_valid].any()
    assert not bank.descriptors[~bank.object_valid].any()
    # normalize_objects: every real part has its own measured noise level
    noise = bank.object_noise[bank.object_valid]
    assert torch.isfinite(noise).all() and (noise > 0).all()
    assert not torch.all(noise == 1.0)
    boxes = bank.boxes[bank.object_valid]
    assert (boxes[:, 2:] > 0).all() and (boxes[:, 0] + boxes[:, 2] <= 112).all() and (boxes[:, 1] + boxes[:, 3] <= 112).all()
    assert bank.segmenter_state  # the fitted background model travels with the bank


def test_saved_bank_reloads_and_judges_non_square_images(loo, tmp_path):
    _, _, config, _, bank = loo
    bank.save(tmp_path / "b.lwbank")
    loaded = TemplateBank.load(tmp_path / "b.lwbank")
    assert loaded.manifest == bank.manifest  # the bank in memory is the one its file holds
    assert loaded.manifest.source_shape == [H, W, 3]
    # fresh models: the segmenter must come from the bank's saved state
    inspector = Inspector(config.detector, build_models(config.detector, CPU), loaded, CPU)
    results = inspector.inspect([sim_image(100), sim_image(101, "extra")])
    for r in results:
        assert r.heatmap.shape == (H, W)
        assert np.isfinite(r.heatmap).all() and np.isfinite(r.score)
        for obj in r.objects:
            x, y, w, h = obj["bbox"]
            assert obj["status"] in OBJECT_STATUSES
            assert 0 <= x and 0 <= y and x + w <= W + 0.11 and y + h <= H + 0.11, obj
    good, extra = results
    assert good.verdict == "pass" and extra.verdict == "fail"
    assert any(o["status"] in ("surplus", "unmatched") for o in extra.objects)
