"""The self-check's reference frames (linewatch.selfcheck_references): which good images of a
bank, the made-bad ones, and the errors that stop serve from starting."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from linewatch.config import SelfCheckConfig
from linewatch.images import write_image
from linewatch.selfcheck_references import load_references, spread


def test_spread_by_hand() -> None:
    assert spread(12, 4) == [0, 4, 7, 11]  # round(0, 3.67, 7.33, 11)
    assert spread(5, 1) == [0]
    assert spread(3, 5) == [0, 1, 2]
    assert spread(4, 0) == []


def bank_folder(tmp_path: Path, n: int = 6) -> SimpleNamespace:
    """A processor as load_references sees one: its bank's manifest names n good images here."""
    folder = tmp_path / "good"
    names = []
    for i in range(n):
        image = np.full((40, 60, 3), 100, np.uint8)
        image[10:30, 15 + i:45 + i] = (200, 40, 40)
        names.append(f"{i:03d}.png")
        write_image(folder / names[-1], image)
    manifest = SimpleNamespace(source=str(folder), source_files=names)
    return SimpleNamespace(bank=SimpleNamespace(manifest=manifest), frame_size=(40, 60))


def test_good_from_the_bank_bad_made_from_them(tmp_path: Path) -> None:
    processor = bank_folder(tmp_path)
    config = SelfCheckConfig(enabled=True, good_count=3, bad_count=3, seed=5)
    refs = load_references(config, processor)
    assert [(r.name, r.expected) for r in refs] == [
        ("good/000.png", "pass"), ("good/002.png", "pass"), ("good/005.png", "pass"),  # spread(6, 3) = 0, 2 (2.5), 5
        ("bad/contamination-0/000.png", "fail"), ("bad/scratch-1/002.png", "fail"),
        ("bad/contamination-2/005.png", "fail")]
    for good, bad in zip(refs[:3], refs[3:]):
        assert not np.array_equal(good.image, bad.image)
        assert (good.image != bad.image).any(axis=2).sum() < 0.1 * 40 * 60  # a defect, not another picture
    again = load_references(config, processor)  # the same frames at every start
    assert all(np.array_equal(a.image, b.image) for a, b in zip(refs, again))
    other = load_references(SelfCheckConfig(enabled=True, good_count=3, bad_count=3, seed=6), processor)
    assert not np.array_equal(refs[3].image, other[3].image)


def test_named_files_instead_of_the_bank(tmp_path: Path) -> None:
    processor = bank_folder(tmp_path)
    good = tmp_path / "good" / "004.png"
    bad = tmp_path / "master-bad.png"
    write_image(bad, np.zeros((40, 60, 3), np.uint8))
    refs = load_references(SelfCheckConfig(enabled=True, good=[str(good)], bad=[str(bad)], bad_count=1), processor)
    assert [(r.name, r.expected) for r in refs] == [
        ("good/004.png", "pass"), ("bad/master-bad.png", "fail"), ("bad/contamination-0/004.png", "fail")]


def test_what_stops_serve_from_starting(tmp_path: Path) -> None:
    processor = bank_folder(tmp_path)
    (tmp_path / "good" / "005.png").unlink()
    with pytest.raises(ValueError, match="not where it was built from .*005.png.*selfcheck.good"):
        load_references(SelfCheckConfig(enabled=True, good_count=2), processor)
    with pytest.raises(ValueError, match="selfcheck: .*nothing.png: no such file"):
        load_references(SelfCheckConfig(enabled=True, bad=[str(tmp_path / "nothing.png")], good_count=1), processor)
    small = tmp_path / "small.png"
    write_image(small, np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(ValueError, match="reference good/small.png is 30x20, the bank judges 60x40 frames"):
        load_references(SelfCheckConfig(enabled=True, good=[str(small)]), processor)


def test_config_check_loads_them(small_bank, tmp_path: Path) -> None:
    """`linewatch config check` loads the references as serve would, and names what is missing."""
    import yaml

    from linewatch.config import ConfigError
    from linewatch.config_cli import check_config
    from tests.serving import DETECTOR

    def check(selfcheck: dict) -> list[str]:
        path = tmp_path / "check.yaml"
        path.write_text(yaml.safe_dump({"detector": DETECTOR, "bank": {"path": str(small_bank)},
                                        "runtime": {"selfcheck": selfcheck}}))
        return check_config(str(path))

    assert check({"enabled": True})[-1] == "selfcheck: 2 good and 2 bad reference(s) load, each of the bank's frame size"
    with pytest.raises(ConfigError, match="selfcheck: /nowhere/good.png: no such file"):
        check({"enabled": True, "good": ["/nowhere/good.png"]})
