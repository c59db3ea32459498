"""Cross-check: every linewatch_* metric the Grafana dashboard and the alert rules query exists
in the daemon's registry (`Metrics().metric_names()`: counters as *_total, histograms as
*_bucket/_sum/_count, so a histogram queried by its bare name is an error too); and the
dashboard shows every metric the daemon has and every view the issue asks for."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from ._tools import DEPLOY

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "linewatch.json"
RULES = DEPLOY / "prometheus" / "alerts.yml"
NAME = re.compile(r"\blinewatch_[a-zA-Z0-9_]+")


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _dashboard_queries() -> list[str]:
    d = _dashboard()
    out = [t["expr"] for p in d["panels"] for t in p.get("targets", []) if t.get("expr")]
    for v in d.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if v.get("type") == "query" and q:
            out.append(q)
    return out


def _rule_queries() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


@pytest.fixture(scope="module")
def registry_names() -> set[str]:
    from linewatch.runtime.ops.metrics import Metrics

    return Metrics().metric_names()


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_queried_metric_exists(registry_names, source):
    queries = _dashboard_queries() if source == "dashboard" else _rule_queries()
    used = {n for q in queries for n in NAME.findall(q)}
    assert used, f"no linewatch_* metric found in the {source}"
    unknown = sorted(used - registry_names)
    assert not unknown, f"{source} queries metrics the daemon does not export: {unknown}"


def test_dashboard_shows_every_metric_family(registry_names):
    used = {n for q in _dashboard_queries() for n in NAME.findall(q)}
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in registry_names}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    missing = sorted(families - shown)
    assert not missing, f"metrics no panel shows: {missing}"


def test_dashboard_has_the_required_views():
    text = "\n".join(_dashboard_queries())
    titles = " | ".join(p["title"] for p in _dashboard()["panels"])
    for needle in ("rate(linewatch_frames_received_total",                       # FPS
                   "histogram_quantile(0.5, sum by (le) (rate(linewatch_capture_to_verdict_seconds_bucket",
                   "histogram_quantile(0.99, sum by (le) (rate(linewatch_capture_to_verdict_seconds_bucket",
                   "by (le, stage) (rate(linewatch_stage_seconds_bucket",         # per-stage latency
                   "linewatch_batch_size_bucket", "linewatch_queue_depth",
                   "sum by (verdict) (rate(linewatch_verdicts_total",             # verdict rates by value
                   "linewatch_frames_shed_total", "linewatch_frames_timed_out_total",
                   "linewatch_frame_errors_total", "linewatch_gpu_memory_bytes"):
        assert needle in text, needle
    assert "GPU memory" in titles


def test_dashboard_structure():
    d = _dashboard()
    assert d["uid"] == "linewatch" and d["title"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in d["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            refs = [t["refId"] for t in p["targets"]]
            assert refs and len(refs) == len(set(refs)), p["title"]
    names = [v["name"] for v in d["templating"]["list"]]
    assert names[0] == "datasource"


def test_grafana_provisioning_matches_compose():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/linewatch.yaml").read_text())
    path = provider["providers"][0]["options"]["path"]
    assert any(m.startswith("./grafana/dashboards:" + path) for m in mounts), (mounts, path)
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
