"""The SAM-LAD backend (`backend: samlad`): DINOv2 (timm) + FeatUp-compatible JBU stack + SAM
automatic masks, from the official checkpoints (`linewatch models download`). It learns
nothing from the good images beyond what the bank holds."""

from __future__ import annotations

import torch

from linewatch.config import DetectorConfig
from linewatch.detector.backbone import DinoV2Backbone
from linewatch.detector.backends.base import Backend, Models, area_filter, build_dcga
from linewatch.detector.segment import build_sam_segmenter
from linewatch.detector.upsample import load_featup_jbu
from linewatch.detector.weights import CHECKPOINTS, resolve_checkpoint, verify_checkpoint


def _checkpoint(name_or_path: str, weights_dir: str):
    path = resolve_checkpoint(name_or_path, weights_dir)
    spec = CHECKPOINTS.get(name_or_path)
    verify_checkpoint(path, spec.sha256 if spec else None)
    return path


class SamLadBackend(Backend):
    name = "samlad"
    label = "samlad (DINOv2 + FeatUp JBU + SAM)"

    def build(self, config: DetectorConfig, device: torch.device) -> Models:
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
        segmenter = build_sam_segmenter(s.sam, _checkpoint(s.sam.checkpoint, s.weights_dir), area_filter(config),
                                        device=device)
        return Models(backbone=backbone, upsampler=upsampler, segmenter=segmenter, dcga=build_dcga(config))
