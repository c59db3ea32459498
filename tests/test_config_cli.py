"""`linewatch config check | schema | example`, run as the installed command would be."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import jsonschema
import pytest
import yaml

from linewatch.config import Config, config_from_dict
from linewatch.config_cli import config_schema
from tests.serving import DETECTOR

pytestmark = pytest.mark.system  # every test here starts a program

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "linewatch.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def test_example_is_the_repository_reference_config_and_holds_the_defaults():
    out = run_cli("config", "example")
    assert out.returncode == 0, out.stderr
    assert out.stdout == (ROOT / "configs" / "reference.yaml").read_text()
    assert config_from_dict(yaml.safe_load(out.stdout)) == Config()


def test_schema_accepts_every_shipped_config_and_refuses_what_the_loader_refuses():
    out = run_cli("config", "schema")
    assert out.returncode == 0, out.stderr
    schema = json.loads(out.stdout)
    assert schema == json.loads(json.dumps(config_schema()))
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        errors = list(validator.iter_errors(yaml.safe_load(path.read_text()) or {}))
        assert not errors, f"{path}: {errors[0].message}"
    # a misspelt key, a value out of range and a wrong type: the loader refuses them, so must the schema
    for bad in ({"runtime": {"live": {"enabeld": True}}}, {"runtime": {"mqtt": {"qos": 3}}},
                {"runtime": {"archive": {"max_age_days": "forever"}}}):
        assert list(validator.iter_errors(bad)), bad
        with pytest.raises(Exception):
            config_from_dict(bad)


def test_check_a_good_config_with_its_bank(small_bank, tmp_path):
    config = tmp_path / "line.yaml"
    config.write_text(yaml.safe_dump({"detector": DETECTOR, "bank": {"path": str(small_bank)}}))
    out = run_cli("config", "check", str(config))
    assert out.returncode == 0, out.stderr
    assert f"ok  config: {config} is valid" in out.stdout
    assert f"ok  bank: {small_bank}" in out.stdout and "fits the detector settings" in out.stdout


def test_check_names_what_is_wrong(small_bank, tmp_path):
    bad_key = tmp_path / "typo.yaml"
    bad_key.write_text("runtime:\n  archive:\n    enabled: true\n    max_bytez: 10\n")
    out = run_cli("config", "check", str(bad_key), "--config-only")
    assert out.returncode == 2 and "runtime.archive.max_bytez: unknown key" in out.stderr, out.stderr

    no_bank = tmp_path / "nobank.yaml"
    no_bank.write_text(yaml.safe_dump({"bank": {"path": str(tmp_path / "absent.lwbank")}}))
    out = run_cli("config", "check", str(no_bank))
    assert out.returncode == 2 and "absent.lwbank: no bank file here" in out.stderr, out.stderr
    assert run_cli("config", "check", str(no_bank), "--config-only").returncode == 0

    # the bank was built at image_size 112: another working size does not fit it
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"detector": {**DETECTOR, "image_size": 96}, "bank": {"path": str(small_bank)}}))
    out = run_cli("config", "check", str(other))
    assert out.returncode == 2 and "image_size" in out.stderr, out.stderr

    tls = tmp_path / "tls.yaml"
    tls.write_text(yaml.safe_dump({"runtime": {"metrics": {"tls_cert_file": str(tmp_path / "no.pem"),
                                                           "tls_key_file": str(tmp_path / "no.key")}}}))
    out = run_cli("config", "check", str(tls), "--config-only")
    assert out.returncode == 2 and "cannot use the TLS certificate" in out.stderr, out.stderr


def test_check_takes_the_file_as_dash_c_like_every_other_command(tmp_path):
    config = tmp_path / "line.yaml"
    config.write_text("runtime:\n  logging:\n    level: DEBUG\n")
    for args in (["-c", str(config)], ["--config", str(config)], [str(config)], [str(config), "-c", str(config)]):
        out = run_cli("config", "check", *args, "--config-only")
        assert out.returncode == 0, (args, out.stderr)
        assert f"ok  config: {config} is valid" in out.stdout, args

    other = tmp_path / "other.yaml"
    other.write_text("")
    out = run_cli("config", "check", str(config), "-c", str(other), "--config-only")
    assert out.returncode == 2 and "two different config files given" in out.stderr, out.stderr
    assert out.stdout == ""
    out = run_cli("config", "check", "--config-only")
    assert out.returncode == 2 and "no config file given" in out.stderr, out.stderr
    # -c reaches the check itself: a bad file named with -c is refused like a positional one
    bad = tmp_path / "typo.yaml"
    bad.write_text("runtime:\n  loging: {}\n")
    out = run_cli("config", "check", "-c", str(bad), "--config-only")
    assert out.returncode == 2 and "runtime.loging: unknown key" in out.stderr, out.stderr


def test_an_installed_wheel_ships_the_reference_config(tmp_path):
    """Build the wheel from the package sources, install it into a fresh virtual environment
    (dependencies from this one), and run its `linewatch config example` outside the repository."""
    src = tmp_path / "src"
    shutil.copytree(ROOT / "linewatch", src / "linewatch", ignore=shutil.ignore_patterns("__pycache__"), symlinks=False)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp_path / "dist").glob("linewatch-*.whl")
    assert "linewatch/reference.yaml" in zipfile.ZipFile(wheel).namelist()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    # The dependencies come from this environment: its site-packages goes on the new one's path
    # through a .pth line (after the new one's own, and without running this one's .pth files,
    # so the editable install of this checkout stays out).
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True, timeout=120).stdout.strip()
    Path(site, "deps-from-test-env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "-q",
                              "--no-deps", "--force-reinstall", str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr
    out = subprocess.run([str(venv / "bin" / "linewatch"), "config", "example"], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == (ROOT / "configs" / "reference.yaml").read_text()
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import linewatch; print(linewatch.__file__)"],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert where.stdout.startswith(str(venv)), where.stdout  # the wheel's copy, not this checkout
