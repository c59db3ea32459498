"""The weights-free backend (`backend: classic`): classical colour/gradient/texture features,
classical joint bilateral upsampling and a background-colour segmenter fitted on the good
images. It needs no weights and is what the demo and CI run; it is not SAM-LAD's accuracy and
is labelled as such everywhere."""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from linewatch.config import DetectorConfig
from linewatch.detector.backbone import ClassicFeatures
from linewatch.detector.backends.base import Backend, Models, area_filter, build_dcga
from linewatch.detector.segment import ClassicSegmenter
from linewatch.detector.upsample import ClassicJointBilateralUpsampler


class ClassicBackend(Backend):
    name = "classic"
    label = "classic (weights-free: classical features + colour segmentation; not SAM-LAD's DINOv2/SAM accuracy)"

    def build(self, config: DetectorConfig, device: torch.device) -> Models:
        c = config.classic
        return Models(
            backbone=ClassicFeatures(stride=c.feature_stride, position_gain=c.position_gain),
            upsampler=ClassicJointBilateralUpsampler(num_stages=c.upsample_stages),
            segmenter=ClassicSegmenter(area_filter(config), threshold=c.background_threshold),
            dcga=build_dcga(config),
            shape_weight=c.shape_weight,
        )

    def fit(self, models: Models, good_images01: torch.Tensor) -> dict[str, torch.Tensor]:
        """The background colour model of the good images (ClassicSegmenter.state_dict)."""
        return copy.copy(models.segmenter).fit(good_images01).state_dict()

    def load_state(self, models: Models, state: dict[str, torch.Tensor]) -> Models:
        """A copy of the segmenter holding the bank's background model (the state is required:
        an unfitted segmenter cannot segment)."""
        segmenter = copy.copy(models.segmenter)
        segmenter.load_state_dict(state)
        return replace(models, segmenter=segmenter)
