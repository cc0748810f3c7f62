"""Prometheus config, alert rules and the Grafana dashboard: valid, and about metrics the server exports.

promtool (Debian's prometheus package; skipped with a message where it is absent) checks the config
and the rules and runs the alert unit tests of deploy/prometheus-alerts.test.yml. Every metric
named in a rule or a dashboard query must be one the server's registry exports (or Prometheus' own
``up``), so a renamed metric cannot silently empty a panel or disarm an alert.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import DEPLOY, tool

PROMTOOL_WHY = "promtool comes with Debian's prometheus package (apt-get install prometheus)"
PROMQL_WORDS = {"sum", "by", "rate", "max", "histogram_quantile", "le", "or", "vector", "label_values", "and",
                "without", "on", "instance", "code", "model", "method", "job", "device", "version", "avg", "count"}


def _promtool(*args: str) -> None:
    out = subprocess.run([tool("promtool", PROMTOOL_WHY), *args], capture_output=True, text=True, timeout=60,
                         cwd=DEPLOY)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_checks_the_config() -> None:
    _promtool("check", "config", "prometheus.yml")


def test_promtool_checks_the_rules() -> None:
    _promtool("check", "rules", "prometheus-alerts.yml")


def test_alerts_fire_as_intended() -> None:
    _promtool("test", "rules", "prometheus-alerts.test.yml")


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """Sample names the server exports, with a model loaded (and the GPU gauges, which need CUDA here)."""
    from prometheus_client import generate_latest

    from segsvc.server.metrics import ServerMetrics

    metrics = ServerMetrics()
    metrics.watch_models(lambda: [("m", 1, 0, True)], failed=lambda: [("m", 0, "broken")])
    metrics.observe_request("Segment", "m", "OK", 0.01, 0.001, 0.005)
    metrics.observe_batch("m", 1, 2, 0.005)
    names = {s.name for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())
             for s in f.samples}
    gpu = {"segsvc_gpu_memory_allocated_bytes", "segsvc_gpu_memory_reserved_bytes", "segsvc_gpu_memory_used_bytes",
           "segsvc_gpu_memory_total_bytes", "segsvc_gpu_utilization_ratio"}  # test_metrics.py checks these
    return names | gpu | {"up"}


def _metric_names(expr: str) -> set[str]:
    no_strings = re.sub(r'"[^"]*"', '""', expr)
    no_labels = re.sub(r"\{[^}]*\}", "", no_strings)
    no_ranges = re.sub(r"\[[^\]]*\]", "", no_labels)
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", no_ranges))
    return {w for w in words if w not in PROMQL_WORDS and not w.startswith("$")}


def test_alert_rules_cover_the_issue_and_use_exported_metrics(exported: set[str]) -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus-alerts.yml").read_text())
    alerts = {r["alert"]: r for g in rules["groups"] for r in g["rules"]}
    assert {"SegsvcDown", "SegsvcHighErrorRate", "SegsvcHighLatencyP99", "SegsvcQueueBacklog"} <= set(alerts)
    for name, rule in alerts.items():
        unknown = _metric_names(rule["expr"]) - exported
        assert not unknown, f"{name} uses {unknown}, which the server does not export"


def test_dashboard_queries_use_exported_metrics(exported: set[str]) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "segsvc-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(exprs) >= 10
    for expr in exprs:
        unknown = _metric_names(expr) - exported
        assert not unknown, f"dashboard query {expr!r} uses {unknown}"
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("gpu memory", "gpu utilisation", "process cpu", "queue depth", "latency"):
        assert topic in titles, topic
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_grafana_provisioning_points_at_the_dashboard() -> None:
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "segsvc.yml").read_text())
    compose = yaml.safe_load((DEPLOY.parent / "docker-compose.yml").read_text())
    mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"])
    dashboards_dir = provider["providers"][0]["options"]["path"]
    assert mounts["./deploy/grafana/segsvc-dashboard.json"].startswith(dashboards_dir + "/")
