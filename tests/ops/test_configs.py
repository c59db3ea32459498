"""configs/: every YAML loads with the real loader; reference.yaml names every key with its default."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from linewatch.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml")) + sorted((ROOT / "configs").rglob("*.yml"))
REFERENCE = ROOT / "configs" / "reference.yaml"


def _plain(value):
    """A default as it would be written in YAML (models and lists of models become dicts)."""
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _schema_leaves(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
    """Every key of the schema (walking Config.model_fields recursively) -> its default."""
    leaves: dict[str, object] = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            leaves.update(_schema_leaves(ann, key + "."))
        else:
            leaves[key] = _plain(field.get_default(call_default_factory=True))
    return leaves


def _yaml_leaves(data: dict, schema: type[BaseModel], prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        field = schema.model_fields.get(name)
        ann = field.annotation if field else None
        if isinstance(ann, type) and issubclass(ann, BaseModel) and isinstance(value, dict):
            out.update(_yaml_leaves(value, ann, key + "."))
        else:
            out[key] = value
    return out


def test_configs_exist():
    names = {p.relative_to(ROOT / "configs").as_posix() for p in CONFIGS}
    assert {"reference.yaml", "demo.yaml", "container.yaml"} <= names
    assert any(n.startswith("products/") for n in names)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_config_loads(path: Path):
    load_config(path)


def test_reference_lists_every_key_with_its_default():
    data = yaml.safe_load(REFERENCE.read_text())
    expected = _schema_leaves(Config)
    written = _yaml_leaves(data, Config)
    missing = sorted(set(expected) - set(written))
    unknown = sorted(set(written) - set(expected))
    assert not missing, f"configs/reference.yaml lacks keys: {missing}"
    assert not unknown, f"configs/reference.yaml has keys the schema lacks: {unknown}"
    wrong = {k: (written[k], expected[k]) for k in expected if written[k] != expected[k]}
    assert not wrong, f"configs/reference.yaml values differ from the defaults (written, default): {wrong}"


def test_reference_comments_every_key():
    """Each leaf key line is preceded by a comment line (its meaning); section headers need none."""
    lines = REFERENCE.read_text().splitlines()
    uncommented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- ") or ":" not in stripped or stripped.endswith(":"):
            continue
        indent = len(line) - len(line.lstrip())
        prev = lines[i - 1].strip() if i else ""
        # keys inside a list item (endpoints) are described in the comment above the list
        if indent >= 8 and lines[i - 1].lstrip().startswith(("- ", "mode:", "url:")):
            continue
        if not prev.startswith("#"):
            uncommented.append(f"{i + 1}: {stripped}")
    assert not uncommented, f"keys without a comment above them: {uncommented}"


def test_products_use_samlad():
    products = sorted((ROOT / "configs" / "products").glob("*.yaml"))
    assert len(products) >= 5
    for p in products:
        cfg = load_config(p)
        assert cfg.detector.backend == "samlad", p
        assert cfg.detector.image_size % 14 == 0, p


def test_container_config_listens_on_all_interfaces():
    cfg = load_config(ROOT / "configs" / "container.yaml")
    assert cfg.runtime.metrics.host == "0.0.0.0"
    assert all(e.url.startswith("tcp://*:") for e in cfg.runtime.ingest.endpoints)
    assert cfg.runtime.publish.url.startswith("tcp://*:")
