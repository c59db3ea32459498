"""Synthetic production line (drawn products with logical/structural anomalies) for tests,
the demo and the evaluation harness. Not a benchmark of real-world accuracy."""

from linewatch.sim.generator import (
    ANOMALIES,
    LOGICAL_ANOMALIES,
    PRODUCTS,
    STRUCTURAL_ANOMALIES,
    generate_dataset,
    render,
)

__all__ = [
    "ANOMALIES",
    "LOGICAL_ANOMALIES",
    "PRODUCTS",
    "STRUCTURAL_ANOMALIES",
    "generate_dataset",
    "render",
]
