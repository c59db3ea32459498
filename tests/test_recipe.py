"""serve's RecipeLoader with real banks and configs (classic backend, CPU): which config and
bank each request loads, when the models in service are reused and when new ones are built,
what is refused, and which runtime differences come back as warnings."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from linewatch.config import config_from_dict, load_config
from linewatch.recipe import RecipeLoader, model_settings, runtime_differences
from linewatch.runtime.daemon import SwitchRefused
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
    assert loaded.processor.recipe.models is first.recipe.models  # reused: nothing rebuilt

    # --config alone: that file and its bank.path; other model settings: new models
    other = write_config(tmp_path / "other.yaml", other_settings_bank, {**DETECTOR, "image_size": 56}, max_batch=2)
    loaded = loader(None, str(other), first)
    assert loaded.path == str(other_settings_bank)
    assert loaded.processor.config.image_size == 56
    assert loaded.processor.recipe.models is not first.recipe.models
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
