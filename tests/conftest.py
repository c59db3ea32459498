"""Suite-wide markers: `cuda` tests run only where a CUDA device is present (benchmarks/gpu_check.sh
runs them on one); elsewhere they skip and say why."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
