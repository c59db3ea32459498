"""What every detector backend is: the `Models` it builds and the `Backend` interface.

A backend is one module of this package with one `Backend` subclass (registered in
`linewatch.detector.backends`) and one settings section of `DetectorConfig`, the field named
like the backend (`detector.classic`, `detector.samlad`). Everything downstream of the models
(DCGA, OMM, AMM, the bank, calibration) is shared.

Fitted state and sharing models. `fit` and `load_state` never change the models they are
given: `fit` returns the state (stored in the bank), `load_state` returns models that carry
it (a copy of the stateful part; the heavy modules are shared, and a stateless backend
returns the very same `Models`). So one `Models` can serve many banks (the evaluation builds
it once for every category, the demo and the benchmark build it once), and every
`Inspector` runs on models set for its own bank.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from linewatch.detector.bank import BankError
from linewatch.detector.describe import DCGA
from linewatch.detector.segment import AreaFilter, Segmenter

if TYPE_CHECKING:
    from linewatch.config import DetectorConfig


@dataclass
class Models:
    backbone: nn.Module  # images01 (B, 3, S, S) -> (B, C, h, w); .identity
    upsampler: nn.Module  # (features, images01) -> (B, C, H', W'); .identity
    segmenter: Segmenter  # .segment(images01 (B, 3, S, S)) -> ObjectMasks (B, M, S, S); declares what it needs
    dcga: DCGA
    shape_weight: float = 0.0  # weight of the parts' outline descriptors (linewatch.detector.shape); 0: unused

    def __post_init__(self) -> None:
        if not isinstance(self.segmenter, Segmenter):
            missing = [name for name in ("wants_frames", "wants_seeds", "identity", "compile_encoder")
                       if not hasattr(self.segmenter, name)]
            raise TypeError(f"{type(self.segmenter).__name__} is not a Segmenter (linewatch.detector.segment): "
                            f"it lacks {missing}")


class Backend(ABC):
    """One detector backend. Subclasses set `name` and `label` and implement `build`; the
    defaults of the rest suit a backend that learns nothing from the good images."""

    name: str  # detector.backend value; also the DetectorConfig field holding its settings
    label: str  # how reports and the CLI name it (honest about what it is and is not)

    @property
    def config_section(self) -> str:
        """The DetectorConfig field holding this backend's settings (config.py relies on the
        field being named like the backend)."""
        return self.name

    def settings(self, config: "DetectorConfig") -> Any:
        return getattr(config, self.config_section)

    @abstractmethod
    def build(self, config: "DetectorConfig", device: torch.device) -> Models:
        """Build and load the models (`build_models` then moves them to `device`, sets eval
        mode, precision and compilation)."""

    def fit(self, models: Models, good_images01: torch.Tensor) -> dict[str, torch.Tensor]:
        """What this backend learns from the good images (B, 3, S, S) in [0, 1] at the working
        size, as tensors for the bank; `models` stay unchanged. None by default."""
        return {}

    def load_state(self, models: Models, state: dict[str, torch.Tensor]) -> Models:
        """Models carrying a bank's `state` (as `fit` returned it), without changing `models`."""
        if state:
            raise BankError(f"the {self.name} backend keeps no fitted state, but the bank carries {sorted(state)}; "
                            "rebuild the bank")
        return models

    def identity(self, models: Models) -> dict[str, str]:
        """What the bank records of the models, so that a bank built with others is refused."""
        return {
            "backbone": models.backbone.identity,
            "upsampler": models.upsampler.identity,
            "segmenter": models.segmenter.identity,
        }


def area_filter(config: "DetectorConfig") -> AreaFilter:
    """Which segments count as objects (detector.objects), for any backend's segmenter."""
    return AreaFilter.from_config(config.objects)


def build_dcga(config: "DetectorConfig") -> DCGA:
    """The DCGA descriptor module every backend shares (detector.matching)."""
    return DCGA(kernel_size=config.matching.dcga_kernel_size, context_weight=config.matching.context_weight)
