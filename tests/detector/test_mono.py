"""Mono banks: grey images through the detector. The classic features and background model are
defined on one channel (no colour channels standing at zero), the samlad models take a grey
image as three equal channels, the bank says which kind it judges and refuses the other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from linewatch.good_images import read_folder
from linewatch.config import config_from_dict
from linewatch.detector.backbone import ClassicFeatures, DinoV2Backbone
from linewatch.detector.bank import BankError, BankManifest, TemplateBank
from linewatch.detector.inspector import InputError, Inspector
from linewatch.detector.models import build_models
from linewatch.detector.segment import AreaFilter, ClassicSegmenter, SegmenterError
from linewatch.detector.upsample import ClassicJointBilateralUpsampler, JBUStack
from linewatch.images import ImageError, read_image, write_image
from linewatch.sim import render
from tests.serving import DETECTOR, PRODUCT, SIZE


def test_grey_features_are_the_luminance_channels_of_the_colour_features() -> None:
    # For a grey image given as three equal channels, R-G and Y-B are 0 everywhere: the colour
    # block's L channels (+, -, spread: 0, 3, 6) are all it has, and every other channel is the same.
    features = ClassicFeatures(stride=4, position_gain=2.0)
    grey = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    from_grey, from_rgb = features(grey), features(grey.expand(-1, 3, -1, -1))
    assert features.channels_for(grey=True) == from_grey.shape[1] == 3 + 7 * 3 + 4 == 28
    assert features.channels_for(grey=False) == from_rgb.shape[1] == features.out_channels == 34
    torch.testing.assert_close(from_grey[:, :3], from_rgb[:, [0, 3, 6]])
    torch.testing.assert_close(from_grey[:, 3:], from_rgb[:, 9:])
    assert from_rgb[:, [1, 2, 4, 5]].abs().max() == 0  # the colour channels a grey image would carry: zeros
    torch.testing.assert_close(features.texture_channels(from_grey), features.texture_channels(from_rgb))
    with pytest.raises(ValueError, match="3 \\(RGB\\) or 1 \\(grey\\)"):
        features(torch.zeros(1, 2, 32, 32))


def _tray(value: float, part: float, noise: float = 0.01, seed: int = 0) -> torch.Tensor:
    """A grey (1, 1, 64, 64) tray of level `value` with a 16 x 16 part of level `part` in the middle."""
    g = torch.Generator().manual_seed(seed)
    image = value + noise * torch.randn(1, 1, 64, 64, generator=g)
    image[..., 24:40, 24:40] = part
    return image.clamp(0, 1)


def test_the_background_model_of_grey_images_is_one_dimensional() -> None:
    segmenter = ClassicSegmenter(AreaFilter(0.01, 0.5, 4), threshold=6.0)
    segmenter.fit(torch.cat([_tray(0.3, 0.8, seed=i) for i in range(3)]))
    state = segmenter.state_dict()
    assert state["mean"].shape == (1,) and state["cov"].shape == (1, 1)
    assert abs(float(state["mean"][0]) - 0.3) < 0.005
    # noise 0.01 plus the floor 0.02 squared: the variance is about 0.0001 + 0.0004
    assert 0.0004 < float(state["cov"][0, 0]) < 0.0006
    masks = segmenter(_tray(0.3, 0.8, seed=9))[0]
    assert masks.shape == (1, 64, 64) and int(masks[0].sum()) == 16 * 16
    assert bool(masks[0, 24:40, 24:40].all())
    # 0.3 + 6 sigma (about 0.134) is the edge: a part at 0.40 is background, at 0.46 a part
    assert len(segmenter(_tray(0.3, 0.40, noise=0.0))[0]) == 0
    assert len(segmenter(_tray(0.3, 0.46, noise=0.0))[0]) == 1
    again = ClassicSegmenter(AreaFilter(0.01, 0.5, 4), threshold=6.0)
    again.load_state_dict(state)
    assert torch.equal(again(_tray(0.3, 0.8, seed=9))[0], masks)
    with pytest.raises(SegmenterError, match="fitted on 1-channel images, given 3"):
        segmenter(_tray(0.3, 0.8).expand(-1, 3, -1, -1))


def test_the_classic_upsampler_guides_by_the_grey_difference() -> None:
    # one channel: the range weight sees the grey step; three equal channels would see it 3 times
    upsampler = ClassicJointBilateralUpsampler(num_stages=1)
    features = torch.rand(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    grey = _tray(0.3, 0.8, noise=0.0)[..., :32, :32]
    assert upsampler(features, grey).shape == (1, 4, 16, 16)
    scaled = upsampler(features, grey * 3 ** 0.5)  # the grey step made as large as the replicated one
    torch.testing.assert_close(scaled, upsampler(features, grey.expand(-1, 3, -1, -1)), rtol=1e-5, atol=1e-6)


def test_the_samlad_models_take_a_grey_image_as_three_equal_channels() -> None:
    torch.manual_seed(0)
    backbone = DinoV2Backbone("vit_small_patch14_dinov2.lvd142m", image_size=56,
                              model_kwargs=dict(depth=1, embed_dim=48, num_heads=2)).eval()
    upsampler = JBUStack(backbone.out_channels, num_stages=1, use_norm=True).eval()
    grey = torch.rand(1, 1, 56, 56, generator=torch.Generator().manual_seed(2))
    rgb = grey.expand(-1, 3, -1, -1)
    with torch.inference_mode():
        features = backbone(grey)
        torch.testing.assert_close(features, backbone(rgb))
        torch.testing.assert_close(upsampler(features, grey), upsampler(features, rgb))
    assert backbone.channels_for(grey=True) == backbone.out_channels


def _manifest(**changes) -> dict:
    data = {"linewatch_version": "0", "identity": {}, "settings": {}, "images": 1, "source": "s",
            "source_files": ["a.png"], "source_shape": [4, 4, 3], "image_size": 56, "created": "now",
            "calibration": {"threshold": 1.0}, "bank_id": "b", "format_version": 2}
    data.update(changes)
    return {k: v for k, v in data.items() if v is not ...}


def test_a_bank_built_before_mono_banks_is_a_colour_bank_with_the_full_window() -> None:
    old = BankManifest.from_dict(_manifest())
    assert (old.colour_mode, old.sample_window) == ("colour", [0, 65535])
    assert old.to_dict()["colour_mode"] == "colour"  # written from now on
    mono = BankManifest.from_dict(_manifest(colour_mode="mono", sample_window=[0, 4095], source_shape=[4, 4]))
    assert (mono.colour_mode, mono.sample_window) == ("mono", [0, 4095])
    with pytest.raises(BankError, match="colour_mode is 'grey'"):
        BankManifest.from_dict(_manifest(colour_mode="grey"))
    with pytest.raises(BankError, match="sample_window"):
        BankManifest.from_dict(_manifest(sample_window=[9, 9]))
    with pytest.raises(BankError, match="sample_window"):
        BankManifest.from_dict(_manifest(sample_window="all"))


def _sim(anomaly: str | None, seed: int, mono: bool) -> np.ndarray:
    return render(PRODUCT, np.random.default_rng([seed, 77]), anomaly, size=SIZE, mono=mono)[0]


def test_a_mono_bank_judges_grey_frames_and_refuses_colour_ones(mono_bank: Path) -> None:
    bank = TemplateBank.load(mono_bank)
    assert bank.manifest.colour_mode == "mono" and bank.manifest.source_shape == [SIZE, SIZE]
    assert bank.manifest.sample_window == [0, 65535]
    config = config_from_dict({"detector": DETECTOR})
    inspector = Inspector(config.detector, build_models(config.detector, torch.device("cpu")), bank,
                          torch.device("cpu"))
    assert (inspector.colour_mode, inspector.frame_size) == ("mono", (SIZE, SIZE))
    good = [_sim(None, seed, mono=True) for seed in range(4)]
    bad = [_sim(anomaly, seed, mono=True) for seed, anomaly in enumerate(("missing", "wrong_part", "extra"))]
    results = inspector.inspect(good + bad)
    good_scores, bad_scores = [r.score for r in results[:4]], [r.score for r in results[4:]]
    assert min(bad_scores) > max(good_scores), (good_scores, bad_scores)
    verdicts = [r.verdict for r in results]
    assert verdicts[:4] == ["pass"] * 4 and verdicts[4] == verdicts[6] == "fail"  # a part missing, one too many
    with pytest.raises(InputError, match="a colour image; the bank judges grey"):
        inspector.check_image(_sim(None, 0, mono=False), "frame 1")
    inspector.warm_up((1,))  # blank grey frames
    # a config reading 16-bit frames through another window than the bank's images were
    other = config_from_dict({"detector": {**DETECTOR, "sample_window": [0, 4095]}})
    with pytest.raises(BankError, match=r"sample_window \[0, 65535\], this config has \[0, 4095\]"):
        Inspector(other.detector, build_models(other.detector, torch.device("cpu")), bank, torch.device("cpu"))


def test_a_colour_bank_refuses_grey_images(small_bank: Path) -> None:
    bank = TemplateBank.load(small_bank)
    assert bank.manifest.colour_mode == "colour"
    config = config_from_dict({"detector": DETECTOR})
    inspector = Inspector(config.detector, build_models(config.detector, torch.device("cpu")), bank,
                          torch.device("cpu"))
    with pytest.raises(InputError, match="a grey image; the bank judges colour"):
        inspector.check_image(_sim(None, 0, mono=True), "frame 1")


def test_good_images_of_one_bank_are_all_grey_or_all_colour(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", _sim(None, 0, mono=True))
    write_image(tmp_path / "b.png", _sim(None, 1, mono=False))
    with pytest.raises(ImageError, match="b.png: is colour but a.png is grey"):
        read_folder(tmp_path)


def test_16_bit_good_images_are_read_through_the_window(tmp_path: Path) -> None:
    import cv2

    cv2.imwrite(str(tmp_path / "mono12.png"), np.array([[0, 1000, 1500, 2000, 4095]], np.uint16))
    assert read_image(tmp_path / "mono12.png", (1000, 2000)).tolist() == [[0, 0, 128, 255, 255]]
    assert read_image(tmp_path / "mono12.png", (0, 4095)).tolist() == [[0, 62, 93, 125, 255]]
    assert read_image(tmp_path / "mono12.png").tolist() == [[0, 4, 6, 8, 16]]  # default: / 257
