"""deploy/prometheus: promtool on the rules and on a live /metrics scrape; a real Prometheus
server on loopback scrapes a running daemon and answers queries for its series, and every
dashboard and alert expression runs on it."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.waiting import wait_until

from ._tools import DEPLOY, require_tool, run

PROM_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "linewatch.json"


@pytest.mark.system
def test_promtool_check_rules():
    res = run([require_tool("promtool"), "check", "rules", str(PROM_DIR / "alerts.yml")])
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.system
def test_promtool_alert_unit_tests():
    """alerts.test.yml feeds series to the rules and states which alerts must fire (and not)."""
    res = run([require_tool("promtool"), "test", "rules", "alerts.test.yml"], cwd=PROM_DIR)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.system
def test_promtool_check_compose_config():
    res = run([require_tool("promtool"), "check", "config", str(PROM_DIR / "prometheus.yml")])
    assert res.returncode == 0, res.stdout + res.stderr


def test_alerts_cover_the_issue():
    rules = {r["alert"]: r["expr"] for g in yaml.safe_load((PROM_DIR / "alerts.yml").read_text())["groups"]
             for r in g["rules"]}
    assert "linewatch_last_frame_timestamp_seconds" in rules["LinewatchNoFrames"]
    assert 'verdict="error"' in rules["LinewatchErrorRate"]
    assert 'verdict="shed"' in rules["LinewatchShedRate"]
    assert "histogram_quantile(0.99" in rules["LinewatchLatencyP99OverBudget"]
    assert "linewatch_ready == 0" in rules["LinewatchNotReady"]
    # pass scores only, against the loaded bank's own calibration, with a traffic guard
    drift = rules["LinewatchScoreDrift"]
    assert 'linewatch_score_ratio_bucket{verdict="pass"}' in drift
    assert "linewatch_calibration_score_ratio_bucket" in drift and "linewatch_score_ratio_count" in drift
    # the operator sinks: lost verdict copies and an MQTT broker out of reach
    assert "linewatch_sink_dropped_total" in rules["LinewatchSinkDropped"]
    assert "linewatch_mqtt_connected == 0" in rules["LinewatchMqttDisconnected"]
    # the acknowledged channel: verdicts a subscriber missed, a configured subscriber absent
    assert "linewatch_acked_verdicts_missed_total" in rules["LinewatchAckedVerdictsMissed"]
    assert "linewatch_acked_subscriber_connected == 0" in rules["LinewatchAckedSubscriberAbsent"]


def test_health_endpoints(live_daemon):
    assert live_daemon.get("/healthz")[0] == 200
    assert live_daemon.get("/readyz")[0] == 200


def test_promtool_check_metrics_on_live_scrape(live_daemon):
    status, body = live_daemon.get("/metrics")
    assert status == 200 and b"linewatch_ready 1.0" in body
    res = subprocess.run([require_tool("promtool"), "check", "metrics"], input=body,
                         capture_output=True, timeout=30)
    assert res.returncode == 0, (res.stdout + res.stderr).decode()
    assert not (res.stdout + res.stderr).strip(), (res.stdout + res.stderr).decode()


def test_live_scrape_carries_the_score_histograms(live_daemon):
    """The drift alert's two inputs from a real `linewatch serve`: the loaded bank's calibration
    scores, and one score / threshold per judged (pass/fail) frame, none for the `error` one."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for f in text_string_to_metric_families(live_daemon.get("/metrics")[1].decode()) for s in f.samples]

    def total(name: str, verdicts=("pass", "fail")) -> float:
        return sum(s.value for s in samples if s.name == name and s.labels.get("verdict", "pass") in verdicts)

    assert total("linewatch_calibration_score_ratio_count") > 0
    judged = total("linewatch_verdicts_total")
    assert judged >= 3 and total("linewatch_score_ratio_count") == judged
    assert total("linewatch_verdicts_total", ("error",)) >= 1


def _query(base: str, expr: str, timeout: float = 5.0) -> dict:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.load(e)


def _dashboard_exprs() -> list[str]:
    exprs = []
    for p in json.loads(DASHBOARD.read_text())["panels"]:
        exprs += [t["expr"] for t in p.get("targets", []) if t.get("expr")]
    # Grafana's variables, as Grafana would substitute them with "All" selected
    subst = {"$__rate_interval": "1m", "$instance": ".*", "$camera": ".*"}
    out = []
    for e in exprs:
        for k, v in subst.items():
            e = e.replace(k, v)
        out.append(e)
    return out


def _alert_exprs() -> list[str]:
    doc = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


@pytest.mark.slow
def test_real_prometheus_scrapes_the_daemon(live_daemon, tmp_path: Path):
    prom = require_tool("prometheus")
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROM_DIR / "alerts.yml")],
        "scrape_configs": [{"job_name": "linewatch", "static_configs": [{"targets": [f"127.0.0.1:{live_daemon.port}"]}]}],
    }))
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen([prom, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'data'}",
                             "--web.listen-address=127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT)
    try:
        def listening() -> str | None:  # port 0: the log line says which port it got
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            found = re.search(r'msg="Listening on" address=(127\.0\.0\.1:\d+)', (tmp_path / "prometheus.log").read_text())
            return found and found.group(1)

        address = wait_until(listening, 30, poll_s=0.1)
        assert address, "Prometheus logged no listening address within 30 s:\n" + (tmp_path / "prometheus.log").read_text()[-2000:]
        base = f"http://{address}"

        def scraped() -> list:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            try:
                return _query(base, "linewatch_ready", timeout=2).get("data", {}).get("result", [])
            except (OSError, ValueError):
                return []

        result = wait_until(scraped, 30, poll_s=0.5)
        assert result, "Prometheus returned no linewatch_ready series within 30 s:\n" + (tmp_path / "prometheus.log").read_text()[-2000:]
        assert result[0]["value"][1] == "1"
        assert result[0]["metric"]["job"] == "linewatch"

        up = _query(base, 'up{job="linewatch"}')["data"]["result"]
        assert up and up[0]["value"][1] == "1"
        series = _query(base, 'count by (__name__) ({__name__=~"linewatch_.+"})')["data"]["result"]
        names = {s["metric"]["__name__"] for s in series}
        assert {"linewatch_frames_received_total", "linewatch_verdicts_total",
                "linewatch_capture_to_verdict_seconds_bucket", "linewatch_build_info"} <= names, names

        # Every dashboard and alert expression is valid PromQL for this server (the real parser).
        bad = {}
        for expr in _dashboard_exprs() + _alert_exprs():
            body = _query(base, expr)
            if body.get("status") != "success":
                bad[expr] = body.get("error")
        assert not bad, bad
        # The rules file loaded into the server's rule manager
        with urllib.request.urlopen(f"{base}/api/v1/rules", timeout=5) as r:
            rules = json.load(r)["data"]["groups"]
        assert {rule["name"] for g in rules for rule in g["rules"]} >= {"LinewatchNoFrames", "LinewatchNotReady"}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
