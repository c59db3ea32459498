"""The bank fingerprint covers every detector setting that changes a score or the threshold.

A bank calibrated under one config and served under another is judged against a threshold
that no longer means anything. These tests walk the config schema, so a key added later is
in the fingerprint unless someone lists it in NOT_IN_FINGERPRINT on purpose.
"""

from __future__ import annotations

import typing
from typing import Any

import pytest
from pydantic import BaseModel

from linewatch.config import CalibrationConfig, Config, ConfigError, DetectorConfig, config_from_dict


def leaves(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, field info) for every leaf setting of a config section."""
    out = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.extend(leaves(annotation, f"{prefix}{name}."))
        else:
            out.append((f"{prefix}{name}", field))
    return out


def other_values(field: Any, current: Any) -> list[Any]:
    """A few valid-looking values different from `current`, for one field."""
    annotation = field.annotation
    if typing.get_origin(annotation) is typing.Literal:
        return [v for v in typing.get_args(annotation) if v != current]
    if annotation is bool:
        return [not current]
    if annotation is int:
        return [current + 1, current - 1, current * 2]
    if annotation is float:
        return [current * 1.5 + 0.01, current * 0.5, current + 0.1]
    if annotation is str:
        return [current + "-other"]
    if typing.get_origin(annotation) is list and typing.get_args(annotation) == (int,):
        return [[*current[:-1], current[-1] - 1], [*current[:-1], current[-1] + 1]]
    raise AssertionError(f"no test values for a field of type {annotation}; extend other_values()")


def with_setting(base: dict, key: str, value: Any) -> DetectorConfig | None:
    data = {"detector": dict(base)}
    node = data["detector"]
    *path, last = key.split(".")
    for part in path:
        node[part] = dict(node.get(part, {}))
        node = node[part]
    node[last] = value
    try:
        return config_from_dict(data).detector
    except ConfigError:
        return None  # out of range, or a combination the validators refuse


@pytest.mark.parametrize("backend", ["classic", "samlad"])
def test_every_detector_setting_is_in_the_fingerprint_unless_listed(backend: str) -> None:
    base = {"backend": backend, "image_size": 224}
    if backend == "samlad":  # so that image_size and backbone may change with FeatUp's checkpoint
        base["samlad"] = {"allow_untrained_upsampler_setup": True}
    reference = config_from_dict({"detector": base}).detector
    unused_section = "samlad." if backend == "classic" else "classic."
    for key, field in leaves(DetectorConfig):
        current = reference.model_dump()
        for part in key.split("."):
            current = current[part]
        changed = [c for c in (with_setting(base, key, v) for v in other_values(field, current)) if c is not None]
        assert changed, f"{key}: no valid other value to try"
        config = changed[0]
        if key in DetectorConfig.NOT_IN_FINGERPRINT or key.startswith(unused_section):
            assert config.identity_hash() == reference.identity_hash(), f"{key} changes the fingerprint"
        else:
            assert config.identity_hash() != reference.identity_hash(), (
                f"detector.{key} is not in the bank fingerprint: a bank built under another value would be "
                "accepted. If it truly changes no score and no threshold, list it in NOT_IN_FINGERPRINT")
            assert key in config.fingerprint_settings()


def test_calibration_settings_are_each_checked_or_build_only() -> None:
    # The threshold belongs to its target: TemplateBank.check_calibration refuses another one.
    checked_at_load = {"target_false_reject_rate"}
    # min_validation_images refuses a build with too few images; confidence sets the level of the
    # reported interval; neither changes the threshold
    build_only = {"min_validation_images", "confidence"}
    assert set(CalibrationConfig.model_fields) == checked_at_load | build_only, (
        "a new calibration setting: decide whether a bank built under another value must be refused")


def test_only_the_detector_and_calibration_sections_can_change_a_score() -> None:
    # runtime.* and bank.* decide when and where frames are judged, actuate.* what the reject
    # gate does with a verdict: never the score.
    assert set(Config.model_fields) == {"detector", "calibration", "bank", "runtime", "actuate"}
