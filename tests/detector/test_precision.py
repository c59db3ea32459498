"""detector.precision (autocast) and the stage list declared once: bf16 model outputs follow
fp32 within a stated tolerance, verdicts on the synthetic line are the same, every stage is
timed, and the runtime's stage groups are exactly the detector's stages in order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from linewatch.bank_builder import build_bank
from linewatch.config import config_from_dict
from linewatch.detector.backbone import DinoV2Backbone
from linewatch.detector.inspector import PIPELINE_GROUPS, STAGES, Inspector, StageTimer
from linewatch.detector.models import build_models
from linewatch.detector.upsample import JBUStack
from linewatch.sim import generate_dataset, render

CPU = torch.device("cpu")
PRODUCT = "screw_tray"


def config_for(precision: str):
    return config_from_dict({
        # the object score alone: a random tiny DINOv2's good-image object scores spread so widely
        # that, fused in units of that spread, nothing fails; this is about precision, not fusion
        "detector": {"image_size": 112, "device": "cpu", "k_references": 2, "precision": precision,
                     "score": {"source": "objects"}},
        # a threshold inside the 12 good scores (a 0.5 % target from 12 scores is extrapolated far
        # above them by the tail fit): some frames fail, some pass, in both precisions
        "calibration": {"min_validation_images": 3, "target_false_reject_rate": 0.2},
    })


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    return generate_dataset(root, PRODUCT, seed=0, n_train=8, n_val=4, n_test_good=0, n_test_logical=0,
                            n_test_structural=0, size=128)


def tiny_dino_models(config):
    """A random tiny DINOv2 + JBU (the samlad feature path, whose matrix products autocast turns
    to bf16) with the classic segmenter (SAM's cost is not what this test is about)."""
    torch.manual_seed(0)
    backbone = DinoV2Backbone("vit_small_patch14_dinov2.lvd142m", image_size=112, model_kwargs=dict(depth=2, embed_dim=48, num_heads=2)).eval()
    models = build_models(config.detector, CPU)
    models.backbone = backbone
    models.upsampler = JBUStack(backbone.out_channels, num_stages=2, use_norm=True).eval()
    models.shape_weight = 0.0  # part outlines and grain statistics belong to the classic features
    return models


@pytest.fixture(scope="module")
def inspectors(dataset):
    out = {}
    for precision in ("fp32", "bf16"):
        config = config_for(precision)
        models = tiny_dino_models(config)
        bank = build_bank(config, dataset / "train" / "good", dataset / "validation" / "good", models=models,
                          progress=False)
        out[precision] = Inspector(config.detector, models, bank, CPU)
    return out


def test_pipeline_groups_are_the_stages_in_order():
    assert tuple(name for group in PIPELINE_GROUPS for name in group) == STAGES


def test_every_stage_is_timed_once_per_inspect(inspectors):
    image, _, _ = render(PRODUCT, np.random.default_rng(5), size=128)
    (result,) = inspectors["fp32"].inspect([image])
    assert set(result.timings) == set(STAGES)
    assert all(seconds >= 0 for seconds in result.timings.values())


def test_runtime_stage_functions_time_every_stage(inspectors):
    inspector = inspectors["fp32"]
    image, _, _ = render(PRODUCT, np.random.default_rng(6), size=128)
    value = [image]
    for _, fn in inspector.stages:
        value = fn(value)
    assert set(value[0].timings) == set(STAGES)


def test_stage_timer_adds_up_repeated_stages_on_cpu():
    ticks = iter([1.0, 1.5, 2.0, 2.25])
    timer = StageTimer(CPU)
    import linewatch.detector.inspector as inspector_module

    real = inspector_module.time.perf_counter
    inspector_module.time.perf_counter = lambda: next(ticks)
    try:
        timer.stop("x", timer.start())
        timer.stop("x", timer.start())
    finally:
        inspector_module.time.perf_counter = real
    assert timer.resolve() == {"x": 0.75}


def test_bf16_verdicts_equal_fp32_on_the_synthetic_line(inspectors):
    """DINOv2 + JBU features under bf16 autocast, bank and frames alike: every verdict equal to
    fp32's, scores within 5 %, and the scores do differ (autocast really ran in bf16). The classic
    backend's own features do not autocast: precision changes nothing there."""
    frames = []
    for seed in range(6):
        for anomaly in (None, "missing", "extra"):
            image, _, _ = render(PRODUCT, np.random.default_rng(100 + seed), anomaly=anomaly, size=128)
            frames.append(image)
    fp32 = inspectors["fp32"].inspect(frames)
    bf16 = inspectors["bf16"].inspect(frames)
    assert [r.verdict for r in bf16] == [r.verdict for r in fp32]
    assert "fail" in [r.verdict for r in fp32] and "pass" in [r.verdict for r in fp32]
    for a, b in zip(fp32, bf16):
        assert b.score == pytest.approx(a.score, rel=0.05)
    assert any(a.score != b.score for a, b in zip(fp32, bf16))


def test_bf16_autocast_follows_fp32_for_the_small_samlad_models():
    """Tiny random DINOv2 + JBU under CPU bf16 autocast: relative error of the upsampled features
    below 3 % (bf16 keeps 8 bits of mantissa: about 0.4 % per rounding, a few roundings deep)."""
    torch.manual_seed(0)
    backbone = DinoV2Backbone("vit_small_patch14_dinov2.lvd142m", image_size=112, model_kwargs=dict(depth=2, embed_dim=48, num_heads=2)).eval()
    upsampler = JBUStack(backbone.out_channels, num_stages=2, use_norm=True).eval()
    images01 = torch.rand(2, 3, 112, 112)
    with torch.inference_mode():
        want = upsampler(backbone(images01), images01).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = upsampler(backbone(images01), images01).float()
    rel = (got - want).norm() / want.norm()
    assert rel < 0.03, float(rel)
    assert rel > 0  # autocast did change the arithmetic


def test_precision_is_part_of_the_bank_fingerprint(inspectors):
    from linewatch.detector.bank import BankError

    config = config_for("bf16")
    with pytest.raises(BankError, match="precision"):
        Inspector(config.detector, tiny_dino_models(config), inspectors["fp32"].bank, CPU)


def test_warm_up_judges_one_blank_batch_per_size(inspectors, monkeypatch):
    inspector = inspectors["fp32"]
    seen = []
    real = inspector.inspect
    monkeypatch.setattr(inspector, "inspect", lambda images: seen.append(len(images)) or real(images))
    inspector.warm_up((8, 1, 8))
    assert seen == [1, 8]


def test_compile_wraps_the_backbone_and_keeps_its_identity():
    """detector.compile: the backbone goes through torch.compile (lazily: nothing compiles until
    the first call, which the daemon's warm-up makes) and still answers identity/out_channels."""
    plain = build_models(config_for("fp32").detector, CPU)
    config = config_for("fp32")
    config.detector.compile = True
    models = build_models(config.detector, CPU)
    assert isinstance(models.backbone, torch._dynamo.eval_frame.OptimizedModule)
    assert models.backbone.identity == plain.backbone.identity
    assert models.backbone.out_channels == plain.backbone.out_channels
    assert config.detector.identity_hash() == config_for("fp32").detector.identity_hash()  # same bank either way
