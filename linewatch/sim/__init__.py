"""Synthetic production line (drawn products with logical/structural anomalies) for tests,
the demo and the evaluation harness. Not a benchmark of real-world accuracy."""

from linewatch.sim.generator import (
    ALL_ANOMALIES,
    ALL_PRODUCTS,
    ANOMALIES,
    IDENTITY_PRODUCTS,
    KNOWN_PRODUCTS,
    LOGICAL_ANOMALIES,
    PRODUCTS,
    SHAPE_ANOMALIES,
    SHAPE_PRODUCTS,
    STRUCTURAL_ANOMALIES,
    generate_dataset,
    product_anomalies,
    render,
)

__all__ = [
    "ALL_ANOMALIES",
    "ALL_PRODUCTS",
    "ANOMALIES",
    "IDENTITY_PRODUCTS",
    "KNOWN_PRODUCTS",
    "LOGICAL_ANOMALIES",
    "PRODUCTS",
    "SHAPE_ANOMALIES",
    "SHAPE_PRODUCTS",
    "STRUCTURAL_ANOMALIES",
    "generate_dataset",
    "product_anomalies",
    "render",
]
