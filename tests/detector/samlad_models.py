"""SAM-LAD with tiny random-weight models (tests/detector/test_samlad_pipeline.py, test_cuda.py):
a config that needs no checkpoints, the models, and sim images to build a bank from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from linewatch.config import config_from_dict
from linewatch.detector.backbone import DinoV2Backbone
from linewatch.detector.describe import DCGA
from linewatch.detector.models import Models
from linewatch.detector.segment import AreaFilter, SamSegmenter, build_tiny_sam
from linewatch.detector.upsample import JBUStack
from linewatch.images import write_image
from linewatch.sim import render

TINY_VIT = dict(depth=1, embed_dim=48, num_heads=2)


def samlad_config(tmp_path: Path, prompts: str = "full_grid"):
    return config_from_dict({
        "detector": {
            "backend": "samlad", "device": "cpu", "image_size": 112, "k_references": 2,
            "objects": {"min_area": 0.0005, "max_area": 0.9, "max_objects": 6},
            "samlad": {"weights_dir": str(tmp_path / "models"), "upsample_stages": 2,
                       "allow_untrained_upsampler_setup": True,  # tiny random models at 112
                       "sam": {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0,
                               "prompts": prompts, "coarse_points_per_side": 1}},
        },
        "calibration": {"min_validation_images": 2},
    })


def tiny_samlad_models(config) -> Models:
    torch.manual_seed(0)
    backbone = DinoV2Backbone(config.detector.samlad.backbone, image_size=config.detector.image_size,
                              model_kwargs=TINY_VIT).eval()
    upsampler = JBUStack(backbone.out_channels, num_stages=config.detector.samlad.upsample_stages,
                         use_norm=config.detector.samlad.upsampler_use_norm).eval()
    sam = config.detector.samlad.sam
    segmenter = SamSegmenter(build_tiny_sam(seed=0), AreaFilter(0.0005, 0.9, 6), sam, model_name="tiny-random")
    return Models(backbone=backbone, upsampler=upsampler, segmenter=segmenter,
                  dcga=DCGA(kernel_size=3, context_weight=0.5).eval())


def write_images(folder: Path, count: int, seed: int) -> None:
    for i in range(count):
        image, _, _ = render("screw_tray", np.random.default_rng([seed, i]), size=112)
        write_image(folder / f"{i:03d}.png", image)
