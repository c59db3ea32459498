"""`linewatch` (linewatch.cli) with the samlad backend's models made tiny and random: the GPU check's
dry run on a CPU (benchmarks/gpu_e2e.py --tiny).

    python benchmarks/tiny_cli.py bank build -c CONFIG ...   (any linewatch command)

The samlad backend builds a 1-block DINOv2 ViT-S/14 (48 channels), FeatUp's JBU stack for it and a
1-block SAM (linewatch.detector.segment.build_tiny_sam) from a fixed seed instead of loading the
configured checkpoints, so that `bank build` and `serve` agree on the models' identity. Everything
else -- config, bank, serve, precision, torch.compile, the runtime -- is the real code path: the
plumbing runs in seconds a frame on a CPU; the verdicts mean nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # this checkout's linewatch, also when another one is pip-installed
    sys.path.insert(0, str(ROOT))

from linewatch.detector.backbone import DinoV2Backbone  # noqa: E402
from linewatch.detector.backends.base import Models, area_filter, build_dcga  # noqa: E402
from linewatch.detector.backends.samlad import SamLadBackend  # noqa: E402
from linewatch.detector.segment import SamSegmenter, build_tiny_sam  # noqa: E402
from linewatch.detector.upsample import JBUStack  # noqa: E402

TINY_VIT = dict(depth=1, embed_dim=48, num_heads=2)


def build_tiny(self, config, device: torch.device) -> Models:
    """SamLadBackend.build with tiny random models (the checkpoints are not read)."""
    s = config.samlad
    torch.manual_seed(0)
    backbone = DinoV2Backbone(s.backbone, image_size=config.image_size, model_kwargs=TINY_VIT)
    upsampler = JBUStack(backbone.out_channels, num_stages=s.upsample_stages, use_norm=s.upsampler_use_norm)
    segmenter = SamSegmenter(build_tiny_sam(seed=0).to(device).eval(), area_filter(config), s.sam,
                             model_name="tiny-random")
    return Models(backbone=backbone, upsampler=upsampler, segmenter=segmenter, dcga=build_dcga(config))


SamLadBackend.build = build_tiny

if __name__ == "__main__":
    from linewatch.cli import main

    sys.exit(main())
