"""Builds the detector's models from config, through the backend `detector.backend` names.

The backends themselves (what each builds, fits and records) are the modules of
`linewatch.detector.backends`: `samlad` (DINOv2 + FeatUp JBU + SAM from the official
checkpoints) and `classic` (weights-free, not SAM-LAD's accuracy). Both share the same
DCGA / OMM / AMM / bank / calibration code. Here: the device, and what every backend's models
get alike (device, eval mode, TF32, compilation).
"""

from __future__ import annotations

import torch

from linewatch.config import DetectorConfig
from linewatch.detector.backends import BACKEND_LABELS, Models, get_backend

__all__ = ["BACKEND_LABELS", "Models", "build_models", "select_device"]


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("detector.device is 'cuda' but no CUDA device is available")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_models(config: DetectorConfig, device: torch.device) -> Models:
    """Build and load every model the configured backend needs, on `device`. The models hold
    no bank's fitted state (see `linewatch.detector.backends.base`): one set serves any bank
    built under the same config."""
    models = get_backend(config.backend).build(config, device)
    models.backbone = models.backbone.to(device).eval()
    models.upsampler = models.upsampler.to(device).eval()
    models.dcga = models.dcga.to(device).eval()
    if device.type == "cuda" and config.precision == "fp32":
        # TF32 matrix products (10-bit mantissa inputs, fp32 accumulation): what "fp32" means on
        # Ampere and later for every framework that does not say otherwise; process-wide.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if config.compile:
        models.backbone = torch.compile(models.backbone)  # attribute access (identity, out_channels) reaches the module
        models.segmenter.compile_encoder()  # SAM's image encoder; nothing for the classic segmenter
    return models
