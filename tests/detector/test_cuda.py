"""The detector on a CUDA device (skipped without one; benchmarks/gpu_check.sh runs these).

Tiny random samlad models (DINOv2 + JBU + SAM with the batched generator, its encoder with
SdpaAttention as build_sam_segmenter gives it): the stages other than measure queue their work
without waiting for the device (torch.cuda.set_sync_debug_mode raises on any synchronisation), and
the results on CUDA follow those on the CPU."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from linewatch.bank_builder import build_bank
from linewatch.detector.inspector import Batch, Inspector, StageTimer
from linewatch.detector.sam_attention import use_sdpa_attention
from tests.detector.samlad_models import samlad_config, tiny_samlad_models, write_images

pytestmark = pytest.mark.cuda

CUDA = torch.device("cuda")
# Segment pads its results to fixed shapes (linewatch.detector.sam_masks); measure reads its counts
# and copies the results to the host at its end. Every other stage must not wait.
SYNC_FREE_STAGES = ("backbone", "upsample", "segment", "describe", "match")


def to_device(models, device):
    models.backbone.to(device)
    models.upsampler.to(device)
    models.dcga.to(device)
    use_sdpa_attention(models.segmenter.sam.image_encoder)  # segment-anything's get_rel_pos indexes with a CPU arange
    models.segmenter.sam.to(device)
    return models


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda")
    config = samlad_config(tmp)
    write_images(tmp / "good", 4, seed=1)
    write_images(tmp / "val", 2, seed=2)
    out = {}
    for device in (torch.device("cpu"), CUDA):
        models = to_device(tiny_samlad_models(config), device)
        bank = build_bank(config, tmp / "good", tmp / "val", models=models, batch_size=2, progress=False)
        out[device.type] = Inspector(config.detector, models, bank, device)
    return tmp, out


def test_stage_timer_on_cuda_uses_events_without_device_sync():
    a = torch.randn(2048, 2048, device=CUDA)
    timer = StageTimer(CUDA)
    torch.cuda.set_sync_debug_mode("error")
    try:
        started = timer.start()
        b = a @ a
        timer.stop("matmul", started)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert timer.resolve()["matmul"] > 0 and torch.isfinite(b).all()


def test_hot_stages_do_not_synchronise(setup):
    from linewatch.images import read_image

    tmp, inspectors = setup
    inspector = inspectors["cuda"]
    images = [read_image(p) for p in sorted((tmp / "val").iterdir())]
    batch = inspector.run(Batch(images=images), ("preprocess",))
    for name in ("backbone", "upsample", "segment", "describe", "match", "measure"):
        if name in SYNC_FREE_STAGES:
            torch.cuda.set_sync_debug_mode("error")
        try:
            batch = inspector.run(batch, (name,))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(batch.results) == len(images)


def test_cuda_results_follow_cpu(setup):
    from linewatch.sim import render

    _, inspectors = setup
    images = [render("screw_tray", np.random.default_rng(s), anomaly=a, size=112)[0]
              for s, a in ((1, None), (2, "missing"), (3, "extra"))]
    cpu = inspectors["cpu"].inspect(images)
    cuda = inspectors["cuda"].inspect(images)
    for a, b in zip(cpu, cuda):
        assert b.verdict == a.verdict
        assert b.score == pytest.approx(a.score, rel=0.02)
        assert [o["status"] for o in b.objects] == [o["status"] for o in a.objects]
    assert set(cuda[0].timings) >= {"backbone", "segment", "measure"}
