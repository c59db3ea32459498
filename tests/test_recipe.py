"""serve's RecipeLoader with real banks and configs (classic backend, CPU): which config and
bank each request loads, when the models in service are reused and when new ones are built,
what is refused, and which runtime differences come back as warnings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from linewatch.config import config_from_dict, load_config
from linewatch.recipe import RecipeLoader, model_settings, runtime_differences
from linewatch.runtime.changeover import SwitchRefused
from tests.runtime.fakes import quiet_log
from tests.serving import DETECTOR


def write_config(path: Path, bank: Path, detector: dict | None = None, max_batch: int = 4) -> Path:
    path.write_text(yaml.safe_dump({"detector": detector or DETECTOR, "bank": {"path": str(bank)},
                                    "runtime": {"batch": {"max_batch": max_batch}}}))
    return path


def test_requests_load_the_documented_config_and_bank(small_bank, second_bank, other_settings_bank, tmp_path):
    serve_config = write_config(tmp_path / "serve.yaml", small_bank)
    config = load_config(serve_config)
    loader = RecipeLoader(str(serve_config), None, config.runtime, quiet_log())
    first = loader.load(config, str(small_bank))

    # --bank alone: that bank under the config in service, on the same models
    loaded = loader(str(second_bank), None, first)
    assert loaded.path == str(second_bank) and loaded.warnings == []
    assert loaded.processor.bank.bank_id != first.bank_id
    assert loader.recipe_of(loaded.processor).models is loader.recipe_of(first).models  # reused: nothing rebuilt

    # --config alone: that file and its bank.path; other model settings: new models
    other = write_config(tmp_path / "other.yaml", other_settings_bank, {**DETECTOR, "image_size": 56}, max_batch=2)
    loaded = loader(None, str(other), first)
    assert loaded.path == str(other_settings_bank)
    assert loaded.processor.config.image_size == 56
    assert loader.recipe_of(loaded.processor).models is not loader.recipe_of(first).models
    assert loaded.warnings == ["runtime.batch.max_batch: running with 4, the config says 2 (applies after a restart)"]

    # neither: what a restart would load, the serve config read again (edited meanwhile)
    write_config(serve_config, second_bank)
    loaded = loader(None, None, first)
    assert loaded.path == str(second_bank)


def test_neither_keeps_serves_bank_option(small_bank, second_bank, tmp_path):
    serve_config = write_config(tmp_path / "serve.yaml", second_bank)
    config = load_config(serve_config)
    loader = RecipeLoader(str(serve_config), str(small_bank), config.runtime, quiet_log())  # serve --bank small
    first = loader.load(config, str(small_bank))
    assert loader(None, None, first).path == str(small_bank)


def test_banks_that_do_not_fit_are_refused_naming_why(small_bank, other_settings_bank, tmp_path):
    serve_config = write_config(tmp_path / "serve.yaml", small_bank)
    config = load_config(serve_config)
    loader = RecipeLoader(str(serve_config), None, config.runtime, quiet_log())
    first = loader.load(config, str(small_bank))
    with pytest.raises(SwitchRefused, match="detector.image_size: bank built with 56, this config has 112"):
        loader(str(other_settings_bank), None, first)
    stricter = tmp_path / "stricter.yaml"
    stricter.write_text(yaml.safe_dump({"detector": DETECTOR, "calibration": {"target_false_reject_rate": 0.01}}))
    with pytest.raises(SwitchRefused, match="calibrated for calibration.target_false_reject_rate"):
        loader(str(small_bank), str(stricter), first)
    bad = tmp_path / "bad.yaml"
    bad.write_text("detector:\n  backendz: classic\n")
    with pytest.raises(SwitchRefused, match="detector.backendz: unknown key"):
        loader(str(small_bank), str(bad), first)


def test_the_manifest_refuses_before_the_models_what_the_loader_refuses_in_its_words(small_bank):
    """The commands check a bank file against the config from its manifest alone before the
    models start (BankManifest.check_fits): what it refuses, load_processor refuses with the
    same message; what only the models can name (another fingerprint) it leaves to them, even
    when the sample window differs too (the loader names the identity first)."""
    from linewatch.detector.bank import BankError
    from linewatch.detector.manifest import read_manifest
    from linewatch.recipe import load_processor

    manifest = read_manifest(small_bank)
    stricter = {"target_false_reject_rate": 0.01}
    refused = {
        "target": config_from_dict({"detector": DETECTOR, "calibration": stricter}),
        "window": config_from_dict({"detector": {**DETECTOR, "sample_window": [0, 4095]}}),
        "target and window": config_from_dict({"detector": {**DETECTOR, "sample_window": [0, 4095]},
                                               "calibration": stricter}),
    }
    for name, config in refused.items():
        with pytest.raises(BankError) as early:
            manifest.check_fits(config, source=f"bank {small_bank}")
        with pytest.raises(BankError) as late:
            load_processor(config, small_bank)
        assert str(early.value) == str(late.value), name
    assert "calibration.target_false_reject_rate = 0.005" in str(early.value)

    manifest.check_fits(config_from_dict({"detector": DETECTOR}))  # the config it was built with
    other = config_from_dict({"detector": {**DETECTOR, "image_size": 56, "sample_window": [0, 4095]}})
    manifest.check_fits(other)  # left to the Inspector, which names it
    with pytest.raises(BankError, match="detector.image_size: bank built with 112, this config has 56"):
        load_processor(other, small_bank)


def test_model_settings_leave_out_only_what_judges_against_the_bank():
    base = config_from_dict({"detector": DETECTOR}).detector
    judged = config_from_dict({"detector": {**DETECTOR, "k_references": 3, "score": {"source": "objects"}}}).detector
    built = config_from_dict({"detector": {**DETECTOR, "classic": {"feature_stride": 8}}}).detector
    assert model_settings(judged) == model_settings(base)
    assert model_settings(built) != model_settings(base)


def test_runtime_differences_name_each_key():
    running = config_from_dict({}).runtime
    wanted = config_from_dict({"runtime": {"batch": {"max_batch": 2}, "control": {"socket": "/run/x.sock"}}}).runtime
    assert runtime_differences(running, running) == []
    assert [w.split(":")[0] for w in runtime_differences(running, wanted)] == ["runtime.batch.max_batch",
                                                                             "runtime.control.socket"]


def _spy_on_the_loader(monkeypatch) -> list[str]:
    """Record every load_processor call (the bank each loads: a path, or "in memory")."""
    import linewatch.recipe as recipe
    from linewatch.detector.bank import TemplateBank

    calls: list[str] = []
    real = recipe.load_processor

    def spy(config, bank, *args, **kwargs):
        calls.append("in memory" if isinstance(bank, TemplateBank) else str(bank))
        return real(config, bank, *args, **kwargs)

    monkeypatch.setattr(recipe, "load_processor", spy)
    return calls


def test_every_command_loads_its_bank_through_load_processor(small_bank, second_bank, tmp_path, monkeypatch):
    from linewatch.cli import main
    from linewatch.config_cli import check_config
    from linewatch.demo import _load_or_build_bank

    calls = _spy_on_the_loader(monkeypatch)
    serve_config = write_config(tmp_path / "serve.yaml", small_bank)
    config = load_config(serve_config)

    loader = RecipeLoader(str(serve_config), None, config.runtime, quiet_log())
    first = loader.load(config, str(small_bank))  # serve
    assert calls == [str(small_bank)]
    loader(str(second_bank), None, first)  # bank switch (and SIGHUP)
    assert calls[1:] == [str(second_bank)]

    image = tmp_path / "frame.png"
    image.write_bytes(b"not a picture")  # the bank is loaded before the images are read
    main(["inspect", "-c", str(serve_config), "--bank", str(second_bank), "--out", str(tmp_path / "out"), str(image)])
    assert calls[2:] == [str(second_bank)]

    check_config(str(serve_config))  # config check: the config's bank.path
    assert calls[3:] == [str(small_bank)]

    inspector = _load_or_build_bank(config, small_bank, tmp_path, "screw_tray", 0, show_path=False)  # the demo's
    assert calls[4:] == [str(small_bank)] and inspector.bank_id == first.bank_id


def test_the_processor_has_all_the_runtime_needs(small_bank):
    from linewatch.detector.bank import TemplateBank
    from linewatch.recipe import load_processor
    from linewatch.runtime.pipeline.runner import Processor

    config = config_from_dict({"detector": DETECTOR})
    inspector, recipe = load_processor(config, small_bank)
    bank = TemplateBank.load(small_bank)
    declared = set(Processor.__annotations__) | {"check_image"}
    assert declared == {"backend", "bank_id", "bank_images", "frame_size", "colour_mode", "sample_window", "device",
                        "calibration", "stages", "check_image"}
    assert all(hasattr(inspector, name) for name in declared)
    assert inspector.frame_size == tuple(bank.manifest.source_shape[:2])
    assert inspector.bank_images == bank.size and inspector.calibration == bank.calibration
    assert inspector.colour_mode == bank.manifest.colour_mode == "colour"
    assert inspector.sample_window == tuple(config.detector.sample_window) == (0, 65535)
    assert recipe.config is config and inspector.device == recipe.device
    with pytest.raises(ValueError, match="good images are"):
        inspector.check_image(np.zeros((8, 8, 3), np.uint8), "small")


def test_load_processor_shares_fitting_models_and_refuses_a_bank_before_building_any(small_bank, monkeypatch):
    import linewatch.recipe as recipe
    from linewatch.detector.bank import BankError

    config = config_from_dict({"detector": DETECTOR})
    first, shared = recipe.load_processor(config, small_bank)
    other = config_from_dict({"detector": DETECTOR, "runtime": {"batch": {"max_batch": 2}}})  # the same models
    _, again = recipe.load_processor(other, small_bank, shared)
    assert again.models is shared.models and again.config is other
    bigger = config_from_dict({"detector": {**DETECTOR, "image_size": 56}})
    assert not shared.fits(bigger)

    def no_models(*args, **kwargs):
        raise AssertionError("models built for a bank that does not fit")

    monkeypatch.setattr(recipe, "build_models", no_models)
    stricter = config_from_dict({"detector": DETECTOR, "calibration": {"target_false_reject_rate": 0.01}})
    with pytest.raises(BankError, match="calibrated for calibration.target_false_reject_rate"):
        recipe.load_processor(stricter, small_bank)
    with pytest.raises(BankError, match="no bank file"):
        recipe.load_processor(config, small_bank.parent / "absent.lwbank")
