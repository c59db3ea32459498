"""Backends behind one interface: the registry, a third backend added in this file alone (plus
its config section), the bank builder calling `Backend.fit` instead of probing the segmenter,
and fitted state that stays with its bank when models are shared."""

from __future__ import annotations

import copy
from typing import Literal

import cv2
import numpy as np
import pytest
import torch

from linewatch.bank_builder import build_bank, working_size
from linewatch.config import BackendSection, CalibrationConfig, Config, DetectorConfig, config_from_dict
from linewatch.detector.backbone import ClassicFeatures
from linewatch.detector.backends import (BACKEND_LABELS, BACKENDS, Backend, Models, area_filter, build_dcga,
                                         get_backend, register)
from linewatch.detector.backends.classic import ClassicBackend
from linewatch.detector.bank import BankError, BankManifest, TemplateBank
from linewatch.detector.inspector import Inspector
from linewatch.detector.models import build_models
from linewatch.detector.segment import ClassicSegmenter
from linewatch.detector.upsample import ClassicJointBilateralUpsampler
from linewatch.sim import render

CPU = torch.device("cpu")
SIZE = 128


def write_good(folder, product: str, n: int, start: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, _, _ = render(product, np.random.default_rng(start + i), size=SIZE)
        assert cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return folder


def frame(product: str, seed: int, anomaly: str | None = None) -> np.ndarray:
    return render(product, np.random.default_rng(1000 + seed), anomaly=anomaly, size=SIZE)[0]


# ---------------------------------------------------------------------------- the registry


def test_registry_matches_the_config():
    assert set(BACKENDS) == {"classic", "samlad"}
    literal = DetectorConfig.model_fields["backend"].annotation.__args__
    assert set(literal) == set(BACKENDS) == set(DetectorConfig().backend_sections())
    for name, backend in BACKENDS.items():
        assert backend.name == name == backend.config_section
        assert BACKEND_LABELS[name] == backend.label
        assert isinstance(getattr(DetectorConfig(), backend.config_section), BackendSection)
    assert "not SAM-LAD" in BACKEND_LABELS["classic"]
    with pytest.raises(ValueError, match="unknown detector backend 'sam2'.*classic, samlad"):
        get_backend("sam2")
    with pytest.raises(ValueError, match="already registered"):
        register(ClassicBackend())


def test_fingerprint_keeps_only_the_chosen_backends_section():
    for name in BACKENDS:
        keys = config_from_dict({"detector": {"backend": name, "image_size": 224}}).detector.fingerprint_settings()
        assert any(k.startswith(f"{name}.") for k in keys)
        assert not any(k.startswith(f"{other}.") for other in BACKENDS if other != name for k in keys)


# ---------------------------------------------------------------------------- a third backend


class DummySection(BackendSection):
    """A third backend's settings (in a real one: a class in linewatch/config.py)."""

    feature_stride: int = 8
    background_threshold: float = 6.0

    def check(self, detector: DetectorConfig) -> None:
        if detector.image_size % self.feature_stride:
            raise ValueError(f"dummy.feature_stride ({self.feature_stride}) must divide image_size")


class DummyDetectorConfig(DetectorConfig):
    """What a third backend adds to DetectorConfig: its name in the Literal and its section."""

    backend: Literal["classic", "samlad", "dummy"] = "dummy"
    dummy: DummySection = DummySection()


class DummyBackend(Backend):
    """Classical parts under other settings, with state of its own naming."""

    name = "dummy"
    label = "dummy (a test's third backend)"

    def __init__(self) -> None:
        self.fitted: list[Models] = []

    def build(self, config: DetectorConfig, device: torch.device) -> Models:
        d = self.settings(config)
        return Models(backbone=ClassicFeatures(stride=d.feature_stride, position_gain=2.0),
                      upsampler=ClassicJointBilateralUpsampler(1),
                      segmenter=ClassicSegmenter(area_filter(config), threshold=d.background_threshold),
                      dcga=build_dcga(config))

    def fit(self, models: Models, good_images01: torch.Tensor) -> dict[str, torch.Tensor]:
        self.fitted.append(models)
        state = copy.copy(models.segmenter).fit(good_images01).state_dict()
        return {"background_mean": state["mean"], "background_cov": state["cov"]}

    def load_state(self, models: Models, state: dict[str, torch.Tensor]) -> Models:
        segmenter = copy.copy(models.segmenter)
        segmenter.load_state_dict({"mean": state["background_mean"], "cov": state["background_cov"]})
        return Models(models.backbone, models.upsampler, segmenter, models.dcga)


class PrefittedSegmenter(ClassicSegmenter):
    """A segmenter that needs no fitting, and fails loudly if anyone probes it for fit/state."""

    def fit(self, good_images01):
        raise AssertionError("the bank builder must call Backend.fit, not the segmenter's fit")

    def state_dict(self):
        raise AssertionError("the bank builder must store Backend.fit's state, not the segmenter's")


class StatelessDummyBackend(DummyBackend):
    """A backend that learns nothing at bank build (as samlad): Backend's fit / load_state."""

    def __init__(self, background: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.background = background

    def build(self, config: DetectorConfig, device: torch.device) -> Models:
        models = super().build(config, device)
        segmenter = PrefittedSegmenter(area_filter(config), threshold=self.settings(config).background_threshold)
        segmenter.load_state_dict(self.background)
        return Models(models.backbone, models.upsampler, segmenter, models.dcga)

    fit = Backend.fit
    load_state = Backend.load_state


@pytest.fixture
def registered():
    """Registers a backend for one test (a real one registers in linewatch.detector.backends)."""
    names = []

    def add(backend: Backend) -> Backend:
        names.append(backend.name)
        return register(backend)

    yield add
    for name in names:
        BACKENDS.pop(name, None)


def dummy_config() -> Config:
    return Config(detector=DummyDetectorConfig(image_size=112, device="cpu", k_references=2),
                  calibration=CalibrationConfig(min_validation_images=2))


def test_dummy_config_section_is_chosen_by_the_backend_name():
    det = dummy_config().detector
    keys = det.fingerprint_settings()
    assert keys["dummy.feature_stride"] == 8
    assert not any(k.startswith(("classic.", "samlad.")) for k in keys)
    assert det.identity_hash() != DummyDetectorConfig(image_size=112, device="cpu", k_references=2,
                                                      dummy=DummySection(feature_stride=4)).identity_hash()
    with pytest.raises(ValueError, match="dummy.feature_stride"):
        DummyDetectorConfig(image_size=100)
    DummyDetectorConfig(backend="classic", image_size=100)  # another backend's section is not checked
    with pytest.raises(ValueError, match="backend 'dummy' has no settings section"):
        DetectorConfig.model_validate({"backend": "classic"}).model_copy(update={"backend": "dummy"})._backend_settings()


def test_a_third_backend_builds_models_a_bank_and_an_inspector(tmp_path, registered):
    backend = registered(DummyBackend())
    assert BACKEND_LABELS["dummy"] == backend.label
    config = dummy_config()
    good = write_good(tmp_path / "good", "screw_tray", 5)
    val = write_good(tmp_path / "val", "screw_tray", 2, start=50)
    models = build_models(config.detector, CPU)
    assert models.backbone.stride == 8 and models.shape_weight == 0.0

    bank = build_bank(config, good, val, models=models, progress=False)
    assert backend.fitted == [models]  # the builder asked the backend, once
    assert models.segmenter.mean is None  # and left the given models unfitted
    assert set(bank.segmenter_state) == {"background_mean", "background_cov"}
    assert bank.manifest.identity["backend"] == "dummy"
    assert bank.manifest.settings["dummy.feature_stride"] == 8
    assert BankManifest.from_dict(bank.manifest.to_dict()) == bank.manifest

    bank.save(tmp_path / "dummy.lwbank")
    loaded = TemplateBank.load(tmp_path / "dummy.lwbank")
    inspector = Inspector(config.detector, build_models(config.detector, CPU), loaded, CPU)  # fresh, unfitted models
    assert inspector.identity() == loaded.manifest.identity
    assert torch.equal(inspector.models.segmenter.mean, loaded.segmenter_state["background_mean"])
    good_result, bad_result = inspector.inspect([frame("screw_tray", 1), frame("screw_tray", 1, "missing")])
    assert np.isfinite(good_result.score) and good_result.backend == "dummy"
    assert bad_result.score > good_result.score

    # a config of another backend is refused by the bank, naming the backend
    classic = config_from_dict({"detector": {"image_size": 112, "device": "cpu", "k_references": 2}}).detector
    with pytest.raises(BankError, match="backend: bank has 'dummy', this config has 'classic'"):
        Inspector(classic, build_models(classic, CPU), loaded, CPU)


def test_builder_calls_backend_fit_and_never_probes_the_segmenter(tmp_path, registered):
    good = write_good(tmp_path / "good", "screw_tray", 5)
    threshold = DetectorConfig().classic.background_threshold  # fitting does not use it
    background = ClassicSegmenter(area_filter(DetectorConfig()), threshold).fit(working_size(
        [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(good.iterdir())], 112)).state_dict()
    registered(StatelessDummyBackend(background))
    config = dummy_config()
    models = build_models(config.detector, CPU)
    bank = build_bank(config, good, models=models, progress=False)  # PrefittedSegmenter raises if probed
    assert bank.segmenter_state == {}
    bank.save(tmp_path / "b.lwbank")
    inspector = Inspector(config.detector, models, TemplateBank.load(tmp_path / "b.lwbank"), CPU)
    assert inspector.models is models  # nothing to apply: a stateless backend's models are used as they are
    assert len(inspector.inspect([frame("screw_tray", 2)])[0].objects) == 6


def test_classic_bank_build_goes_through_the_backend(tmp_path, monkeypatch):
    calls = []
    fit = ClassicBackend.fit

    def spy(self, models, good_images01):
        calls.append((models, tuple(good_images01.shape)))
        return fit(self, models, good_images01)

    monkeypatch.setattr(ClassicBackend, "fit", spy)
    config = config_from_dict({"detector": {"image_size": 112, "device": "cpu", "k_references": 2}})
    models = build_models(config.detector, CPU)
    bank = build_bank(config, write_good(tmp_path / "good", "screw_tray", 5), models=models, progress=False)
    assert calls == [(models, (5, 3, 112, 112))]
    assert set(bank.segmenter_state) == {"mean", "cov"}
    assert models.segmenter.mean is None


# ---------------------------------------------------------------------------- fitted state stays with its bank


def test_inspectors_on_different_banks_do_not_share_fitted_state(tmp_path):
    """One set of models (as the evaluation, the demo and the benchmark use) for two banks of
    products with different backgrounds: each inspector segments with its own bank's model."""
    config = config_from_dict({"detector": {"image_size": 112, "device": "cpu", "k_references": 2}})
    models = build_models(config.detector, CPU)
    screws = build_bank(config, write_good(tmp_path / "screws", "screw_tray", 5), models=models, progress=False)
    boxes = build_bank(config, write_good(tmp_path / "boxes", "breakfast_box", 5), models=models, progress=False)
    assert not torch.equal(screws.segmenter_state["mean"], boxes.segmenter_state["mean"])

    on_screws = Inspector(config.detector, models, screws, CPU)
    image = frame("screw_tray", 3)
    before = on_screws.inspect([image])[0]
    on_boxes = Inspector(config.detector, models, boxes, CPU)
    for inspector, bank in ((on_screws, screws), (on_boxes, boxes)):
        for key in ("mean", "cov"):
            assert torch.equal(getattr(inspector.models.segmenter, key), bank.segmenter_state[key])
    assert models.segmenter.mean is None  # the shared models carry no bank's state
    after = on_screws.inspect([image])[0]
    assert after.score == before.score and len(after.objects) == len(before.objects) == 6
