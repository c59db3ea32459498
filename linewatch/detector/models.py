"""Builds the detector's models from config: the one place that knows which backend uses what.

- `samlad`: DINOv2 (timm) + FeatUp-compatible JBU stack + SAM automatic masks, from the
  official checkpoints (`linewatch models download`).
- `classic`: the weights-free backend: classical colour/gradient/texture features, classical
  joint bilateral upsampling and a colour/background segmenter. It needs no weights and is
  what the demo and CI run; it is not SAM-LAD's accuracy and is labelled as such everywhere.
Both share the same DCGA / OMM / AMM / bank / calibration code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from linewatch.config import DetectorConfig
from linewatch.detector.backbone import ClassicFeatures, DinoV2Backbone
from linewatch.detector.describe import DCGA
from linewatch.detector.segment import AreaFilter, ClassicSegmenter, build_sam_segmenter
from linewatch.detector.upsample import ClassicJointBilateralUpsampler, load_featup_jbu
from linewatch.detector.weights import CHECKPOINTS, resolve_checkpoint, verify_checkpoint

BACKEND_LABELS = {
    "classic": "classic (weights-free: classical features + colour segmentation; not SAM-LAD's DINOv2/SAM accuracy)",
    "samlad": "samlad (DINOv2 + FeatUp JBU + SAM)",
}


@dataclass
class Models:
    backbone: nn.Module  # images01 (B, 3, S, S) -> (B, C, h, w); .identity
    upsampler: nn.Module  # (features, images01) -> (B, C, H', W'); .identity
    segmenter: Any  # images01 -> list of (M_b, S, S) bool; .identity
    dcga: DCGA
    shape_weight: float = 0.0  # weight of the parts' outline descriptors (linewatch.detector.shape); 0: unused


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("detector.device is 'cuda' but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _checkpoint(name_or_path: str, weights_dir: str):
    path = resolve_checkpoint(name_or_path, weights_dir)
    spec = CHECKPOINTS.get(name_or_path)
    verify_checkpoint(path, spec.sha256 if spec else None)
    return path


def build_models(config: DetectorConfig, device: torch.device) -> Models:
    """Build and load every model the configured backend needs, on `device`."""
    area_filter = AreaFilter(
        min_area=config.objects.min_area, max_area=config.objects.max_area, max_objects=config.objects.max_objects
    )
    dcga = DCGA(kernel_size=config.matching.dcga_kernel_size, context_weight=config.matching.context_weight)
    if config.backend == "classic":
        c = config.classic
        backbone = ClassicFeatures(stride=c.feature_stride, position_gain=c.position_gain)
        upsampler = ClassicJointBilateralUpsampler(num_stages=c.upsample_stages)
        segmenter = ClassicSegmenter(area_filter, threshold=c.background_threshold)
    else:
        s = config.samlad
        backbone = DinoV2Backbone(
            s.backbone, checkpoint=_checkpoint(s.backbone_checkpoint, s.weights_dir), image_size=config.image_size
        )
        upsampler = load_featup_jbu(
            _checkpoint(s.upsampler_checkpoint, s.weights_dir),
            channels=backbone.out_channels,
            num_stages=s.upsample_stages,
            use_norm=s.upsampler_use_norm,
        )
        segmenter = build_sam_segmenter(
            s.sam.kind,
            _checkpoint(s.sam.checkpoint, s.weights_dir),
            area_filter,
            device=device,
            points_per_side=s.sam.points_per_side,
            coarse_points_per_side=s.sam.coarse_points_per_side,
            generator=s.sam.generator,
            prompts=s.sam.prompts,
            points_per_batch=s.sam.points_per_batch,
            pred_iou_thresh=s.sam.pred_iou_thresh,
            stability_score_thresh=s.sam.stability_score_thresh,
            box_nms_thresh=s.sam.box_nms_thresh,
        )
    backbone = backbone.to(device).eval()
    upsampler = upsampler.to(device).eval()
    dcga = dcga.to(device).eval()
    if device.type == "cuda" and config.precision == "fp32":
        # TF32 matrix products (10-bit mantissa inputs, fp32 accumulation): what "fp32" means on
        # Ampere and later for every framework that does not say otherwise; process-wide.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if config.compile:
        backbone = torch.compile(backbone)  # attribute access (identity, out_channels) reaches the module
        if hasattr(segmenter, "compile_encoder"):
            segmenter.compile_encoder()
    shape_weight = config.classic.shape_weight if config.backend == "classic" else 0.0
    return Models(backbone=backbone, upsampler=upsampler, segmenter=segmenter, dcga=dcga, shape_weight=shape_weight)
