"""deploy/kubernetes: `kubectl kustomize` renders one daemon per line with a GPU request, a
Service with the metrics port and a mounted config that the real loader accepts; the scrape
config passes `promtool check config` where promtool has Kubernetes discovery."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from linewatch.config import config_from_dict, load_config

from ._tools import DEPLOY, require_tool, run

K8S = DEPLOY / "kubernetes"
LINES = sorted(p.name for p in (K8S / "lines").iterdir() if p.is_dir())


def _render() -> list[dict]:
    if shutil.which("kustomize"):
        cmd = [shutil.which("kustomize"), "build", str(K8S)]
    else:
        cmd = [require_tool("kubectl"), "kustomize", str(K8S)]
    res = run(cmd, timeout=120)
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


def _check_pod(spec: dict, what: str) -> None:
    (c,) = spec["containers"]
    for part in ("requests", "limits"):
        assert str(c["resources"][part]["nvidia.com/gpu"]) == "1", f"{what}: GPU {part}"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert set(ports) == {"ingest", "verdicts", "metrics"}
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
        assert c[probe]["httpGet"]["path"] == path and c[probe]["httpGet"]["port"] == "metrics", f"{what}: {probe}"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False


@pytest.mark.system
def test_kustomize_renders_one_daemon_per_line():
    docs = _render()
    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        assert d.get("apiVersion") and d.get("kind") and d.get("metadata", {}).get("name"), d
        by_kind.setdefault(d["kind"], []).append(d)
    deployments = by_kind["Deployment"]
    assert len(deployments) == len(LINES) >= 2
    configmaps = {d["metadata"]["name"]: d for d in by_kind["ConfigMap"]}
    services = by_kind["Service"]
    for dep in deployments:
        name = dep["metadata"]["name"]
        assert dep["metadata"]["namespace"] == "linewatch"
        assert dep["spec"]["replicas"] == 1 and dep["spec"]["strategy"]["type"] == "Recreate"
        spec = dep["spec"]["template"]["spec"]
        _check_pod(spec, name)
        line = dep["spec"]["selector"]["matchLabels"]["linewatch.io/line"]
        # the mounted config is this line's and loads with the real loader
        cm_name = next(v["configMap"]["name"] for v in spec["volumes"] if "configMap" in v)
        cfg = config_from_dict(yaml.safe_load(configmaps[cm_name]["data"]["linewatch.yaml"]), cm_name)
        assert cfg.runtime.metrics.host == "0.0.0.0", "metrics must listen beyond loopback to be scraped"
        assert cfg.runtime.metrics.port == 9108
        assert cfg.runtime.ingest.endpoints[0].url == "tcp://*:5555" and cfg.runtime.publish.url == "tcp://*:5556"
        # a Service of this line selects these pods and exposes the metrics port
        svc = next(s for s in services if s["spec"]["selector"].get("linewatch.io/line") == line)
        assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        assert any(p["name"] == "metrics" and p["port"] == 9108 for p in svc["spec"]["ports"])
        pvc = next(v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if "persistentVolumeClaim" in v)
        assert pvc in {p["metadata"]["name"] for p in by_kind["PersistentVolumeClaim"]}


def test_manifests_structure_without_tools():
    """What can be checked without kubectl: every file parses and the base asks for one GPU."""
    for path in K8S.rglob("*.yaml"):
        for d in yaml.safe_load_all(path.read_text()):
            if path.name == "linewatch.yaml":
                continue
            if path.name == "prometheus-scrape.yaml":
                assert d["scrape_configs"]
                continue
            assert d.get("apiVersion") and d.get("kind"), path
    dep = yaml.safe_load((K8S / "base/deployment.yaml").read_text())
    _check_pod(dep["spec"]["template"]["spec"], "base")


@pytest.mark.parametrize("line", LINES)
def test_line_configs_load(line):
    load_config(K8S / "lines" / line / "linewatch.yaml")


@pytest.mark.system
def test_scrape_config(tmp_path: Path):
    doc = yaml.safe_load((K8S / "prometheus-scrape.yaml").read_text())
    relabel = doc["scrape_configs"][0]["relabel_configs"]
    assert {"source_labels": ["__meta_kubernetes_endpoint_port_name"], "regex": "metrics", "action": "keep"} in relabel
    svc = yaml.safe_load((K8S / "base/service.yaml").read_text())
    assert "metrics" in {p["name"] for p in svc["spec"]["ports"]}
    monitor = yaml.safe_load((K8S / "servicemonitor.yaml").read_text())
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"

    res = run([require_tool("promtool"), "check", "config", str(K8S / "prometheus-scrape.yaml")])
    if "field kubernetes_sd_configs not found" in res.stdout + res.stderr:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's prometheus "
                    "package leaves it out), so it cannot check kubernetes_sd_configs")
    assert res.returncode == 0, res.stdout + res.stderr
