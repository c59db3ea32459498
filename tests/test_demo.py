"""`linewatch demo` end to end as a new user runs it, and its embedded config vs configs/demo.yaml."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _linewatch() -> list[str]:
    """The installed `linewatch` script next to this interpreter (what the README runs), else -m."""
    script = Path(sys.executable).parent / "linewatch"
    return [str(script)] if script.exists() else [sys.executable, "-m", "linewatch.cli"]


def test_demo_config_is_configs_demo_yaml():
    from linewatch.config import load_config
    from linewatch.demo import DEMO_DETECTOR, demo_config

    on_disk = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["detector"]
    assert DEMO_DETECTOR == on_disk
    # the demo reads the copy the package ships (an installed wheel has no configs/): the same file
    from importlib import resources

    from linewatch.demo import DEMO_CONFIG

    shipped = resources.files("linewatch").joinpath(DEMO_CONFIG)
    assert shipped.read_text() == (ROOT / "configs" / "demo.yaml").read_text()
    assert (ROOT / "configs" / "demo.yaml").resolve() == (ROOT / "linewatch" / DEMO_CONFIG).resolve()
    assert demo_config("x.lwbank").detector == load_config(ROOT / "configs" / "demo.yaml").detector


@pytest.mark.system
def test_demo_runs_end_to_end(tmp_path):
    res = subprocess.run([*_linewatch(), "demo", "--frames", "30", "--fps", "30"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    out = res.stdout
    assert res.returncode == 0, out[-3000:] + res.stderr[-3000:]
    assert "backend: classic (weights-free" in out and "not SAM-LAD's DINOv2/SAM accuracy" in out, out[:1000]
    m = re.search(r"^\s*verdicts\s+(\d+): (.*)$", out, re.M)
    assert m, out[-2000:]
    counts = {k: int(n) for k, n in (item.split() for item in m.group(2).split(", "))}
    assert int(m.group(1)) == 30 and sum(counts.values()) == 30, m.group(0)
    assert set(counts) <= {"pass", "fail", "error", "timeout", "shed"}, counts
    assert re.search(r"exactly once\s+yes", out), out[-2000:]
    assert re.search(r"metrics\s+http://127\.0\.0\.1:\d+/metrics", out), out[-2000:]
    assert re.search(r"live page: http://127\.0\.0\.1:\d+/live$", out, re.M), out[-2000:]
    assert re.search(r"linewatch_frames_received_total 30\b", out), out[-2000:]
    # one line per verdict, frame ids 0..29 each once
    ids = [int(i) for i in re.findall(r"^\s+cam0 #(\d+) ", out, re.M)]
    assert sorted(ids) == list(range(30)), ids
    assert not list(tmp_path.iterdir()), "the demo must not leave files in the working directory"
