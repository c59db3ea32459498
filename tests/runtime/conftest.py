"""Fixtures shared by the runtime tests."""

from __future__ import annotations

import pytest

from linewatch.runtime.pipeline import Pipeline


@pytest.fixture
def started():
    """Start pipelines and always stop them (bounded), even when a test fails."""
    pipes: list[Pipeline] = []

    def start(p: Pipeline) -> Pipeline:
        p.start()
        pipes.append(p)
        return p

    yield start
    for p in pipes:
        p.stop(timeout_s=2.0)
