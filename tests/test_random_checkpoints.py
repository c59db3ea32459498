"""benchmarks/random_checkpoints.py writes files that the project's real loaders accept, so the GPU
benchmark's daemon (benchmarks/gpu_e2e.py) goes through the real loading path; and the GPU check
script references only files that exist."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_random_checkpoints_load_through_the_real_loaders(tmp_path):
    from segment_anything import sam_model_registry

    from linewatch.detector.backbone import DinoV2Backbone
    from linewatch.detector.segment import load_sam_weights
    from linewatch.detector.upsample import load_featup_jbu

    paths = _load("random_checkpoints").write_random_checkpoints(tmp_path, seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())

    backbone = DinoV2Backbone("vit_small_patch14_dinov2.lvd142m", checkpoint=paths["backbone"], image_size=224)
    upsampler = load_featup_jbu(paths["upsampler"], channels=backbone.out_channels, num_stages=3, use_norm=True)
    images = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        features = backbone(images)
        upsampled = upsampler(features, images)
    assert features.shape == (1, 384, 16, 16) and upsampled.shape == (1, 384, 128, 128)
    assert torch.isfinite(upsampled).all()
    assert paths["backbone"].name in backbone.identity and paths["upsampler"].name in upsampler.identity

    sam = sam_model_registry["vit_b"](checkpoint=None)
    load_sam_weights(sam, paths["sam"])
    saved = torch.load(paths["sam"], map_location="cpu", weights_only=True)
    key = "image_encoder.blocks.0.attn.qkv.weight"
    assert torch.equal(sam.state_dict()[key], saved[key])


@pytest.mark.system
def test_gpu_check_references_only_files_that_exist():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    referenced = set(re.findall(r"\b(?:benchmarks|tests)/[\w./-]+\.(?:py|sh)\b", text))
    assert {"benchmarks/detector_bench.py", "benchmarks/gpu_e2e.py"} <= referenced
    assert [p for p in sorted(referenced) if not (ROOT / p).is_file()] == []


@pytest.mark.system
def test_gpu_check_help_runs_nothing(tmp_path):
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--help"], capture_output=True,
                            text=True, cwd=tmp_path, timeout=30)
    assert result.returncode == 0 and "OUT_DIR" in result.stdout
    assert list(tmp_path.iterdir()) == []
