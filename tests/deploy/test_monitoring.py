"""Prometheus config, alert rules and the Grafana dashboard: valid, and about metrics the server exports.

promtool (Debian's prometheus package; skipped with a message where it is absent) checks the configs
and the rules and runs the alert unit tests of deploy/prometheus-alerts.test.yml. Every metric
named in a rule or a dashboard query must be one the server's registry exports (or Prometheus' own
``up``), so a renamed metric cannot silently empty a panel or disarm an alert. The scrape job: the
alerts select ``job="segsvc"``, so every shipped scrape config (compose, Kubernetes) names it so, and
the Kubernetes one is checked by applying its relabeling to the pods of deploy/k8s.
"""

from __future__ import annotations

import json
import re
import subprocess
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.conftest import DEPLOY, tool
from tests.deploy.k8s_objects import K8S, render

PROMTOOL_WHY = "promtool comes with Debian's prometheus package (apt-get install prometheus)"
PROMQL_WORDS = {"sum", "by", "rate", "max", "histogram_quantile", "le", "or", "vector", "label_values", "and",
                "without", "on", "instance", "code", "model", "method", "job", "device", "version", "avg", "count"}


def _promtool(*args: str) -> None:
    out = subprocess.run([tool("promtool", PROMTOOL_WHY), *args], capture_output=True, text=True, timeout=60,
                         cwd=DEPLOY)
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_checks_the_config() -> None:
    _promtool("check", "config", "prometheus.yml")


def test_promtool_checks_the_kubernetes_config() -> None:
    out = subprocess.run([tool("promtool", PROMTOOL_WHY), "check", "config", "prometheus-k8s.yml"],
                         capture_output=True, text=True, timeout=60, cwd=DEPLOY)
    if out.returncode != 0 and "field kubernetes_sd_configs not found" in out.stdout + out.stderr:
        pytest.skip("this promtool is built without Kubernetes service discovery (Debian's prometheus package)")
    assert out.returncode == 0, out.stdout + out.stderr


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


# -- the scrape job the alerts and the dashboard select --------------------------------------------------
SCRAPE_CONFIGS = ("prometheus.yml", "prometheus-k8s.yml")


def _alert_jobs() -> set[str]:
    rules = yaml.safe_load((DEPLOY / "prometheus-alerts.yml").read_text())
    return {job for g in rules["groups"] for r in g["rules"] for job in re.findall(r'job="([^"]*)"', r["expr"])}


def test_every_scrape_config_names_the_job_the_alerts_select() -> None:
    """SegsvcDown can tell a segsvc target that is down only by its job: every shipped config must name it."""
    assert _alert_jobs() == {"segsvc"}
    for name in SCRAPE_CONFIGS:
        config = yaml.safe_load((DEPLOY / name).read_text())
        assert [j["job_name"] for j in config["scrape_configs"]] == ["segsvc"], name
        assert config["rule_files"] == ["prometheus-alerts.yml"], name


def test_dashboard_selects_the_job_through_a_variable() -> None:
    """No query hard-codes the job; a `job` variable (default segsvc) selects it, and the instances it lists
    are segsvc servers only, so `All` never takes in other targets of a shared job (kubernetes-pods)."""
    text = (DEPLOY / "grafana" / "segsvc-dashboard.json").read_text()
    dashboard = json.loads(text)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    job = variables["job"]
    assert job["current"]["value"] == "segsvc" and not job.get("multi") and not job.get("includeAll")
    assert re.fullmatch(r"label_values\(segsvc_\w+, job\)", job["query"]["query"]), job["query"]
    instance = variables["instance"]
    assert re.fullmatch(r'label_values\(segsvc_\w+\{job="\$job"\}, instance\)', instance["query"]["query"])
    assert "allValue" not in instance, "All must mean the listed segsvc instances, not every target (.*)"
    names = [v["name"] for v in dashboard["templating"]["list"]]
    assert names.index("job") < names.index("instance")
    assert 'job=\\"segsvc\\"' not in text and 'job="segsvc"' not in text
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            selectors = re.findall(r"\b([a-z_:]+)\{([^}]*)\}", target["expr"])
            assert selectors, target["expr"]
            for metric, labels in selectors:
                assert 'job="$job"' in labels, f"{panel['title']}: {metric} does not select the job"


def _relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus' relabeling (actions keep, drop, replace), enough for the scrape configs here."""
    labels = dict(labels)
    for rule in rules:
        action = rule.get("action", "replace")
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule.get("source_labels", ()))
        match = re.fullmatch(rule.get("regex", "(.*)"), value)
        if action == "keep" and not match or action == "drop" and match:
            return None
        if action == "replace" and match:
            replacement = re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", rule.get("replacement", "$1"))
            result = match.expand(replacement)
            if result:
                labels[rule["target_label"]] = result
            else:
                labels.pop(rule["target_label"], None)
        elif action not in ("keep", "drop", "replace"):
            raise AssertionError(f"_relabel does not know action {action}")
    return labels


def _meta(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", name)


def _pod_targets(pod_name: str, metadata: dict[str, Any], spec: dict[str, Any], job: str) -> list[dict[str, str]]:
    """The targets of Kubernetes pod discovery for one pod: one per declared container port."""
    targets = []
    for container in spec["containers"]:
        for port in container.get("ports", ()):
            labels = {"job": job, "__address__": f"10.0.0.7:{port['containerPort']}", "__metrics_path__": "/metrics",
                      "__meta_kubernetes_namespace": "segsvc", "__meta_kubernetes_pod_name": pod_name,
                      "__meta_kubernetes_pod_container_port_name": port.get("name", "")}
            labels |= {f"__meta_kubernetes_pod_label_{_meta(k)}": v for k, v in metadata.get("labels", {}).items()}
            labels |= {f"__meta_kubernetes_pod_annotation_{_meta(k)}": v
                       for k, v in metadata.get("annotations", {}).items()}
            targets.append(labels)
    return targets


def _scraped(targets: list[dict[str, str]], rules: list[dict[str, Any]]) -> list[dict[str, str]]:
    out = []
    for target in targets:
        labels = _relabel(target, rules)
        if labels is not None:
            out.append({"instance": labels["__address__"], **{k: v for k, v in labels.items() if not k.startswith("__")},
                        "__metrics_path__": labels["__metrics_path__"]})
    return out


def test_kubernetes_scrape_job_gives_the_server_pods_the_job_segsvc() -> None:
    """prometheus-k8s.yml against the pods of deploy/k8s: the server's metrics port only, as job segsvc, with
    the namespace and pod labels prometheus-adapter maps to the queue-depth HPA's pods."""
    (job,) = yaml.safe_load((DEPLOY / "prometheus-k8s.yml").read_text())["scrape_configs"]
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == ["segsvc"]
    scraped = []
    for directory in (K8S, K8S / "jobs"):
        for doc in render(directory):
            if doc["kind"] in ("Deployment", "Job"):
                template = doc["spec"]["template"]
                scraped += _scraped(_pod_targets(f"{doc['metadata']['name']}-x", template["metadata"],
                                                 template["spec"], job["job_name"]), job["relabel_configs"])
    assert scraped == [{"instance": "10.0.0.7:9090", "job": "segsvc", "namespace": "segsvc", "pod": "segsvc-x",
                        "__metrics_path__": "/metrics"}], scraped
    adapter = yaml.safe_load((K8S / "autoscaling" / "prometheus-adapter-values.yaml").read_text())
    for rule in adapter["rules"]["custom"]:
        assert set(rule["resources"]["overrides"]) <= set(scraped[0]), "labels the adapter maps to pods"


def test_relabel_rule_for_an_annotation_job_renames_only_segsvc_pods() -> None:
    """The rule prometheus-k8s.yml gives for an existing `kubernetes-pods` job: segsvc pods get job segsvc."""
    text = (DEPLOY / "prometheus-k8s.yml").read_text()
    block = re.search(r"relabel_configs instead[^\n]*\n((?:#   [^\n]*\n)+)", text)
    assert block, "prometheus-k8s.yml gives the relabel rule for an annotation-discovery job"
    rules = yaml.safe_load("\n".join(line[4:] for line in block.group(1).splitlines()))
    server = [d for d in render(K8S) if d["kind"] == "Deployment"][0]["spec"]["template"]
    (metrics,) = [t for t in _pod_targets("segsvc-x", server["metadata"], server["spec"], "kubernetes-pods")
                  if t["__address__"].endswith(":9090")]
    assert _relabel(metrics, rules)["job"] == "segsvc"
    other = {"job": "kubernetes-pods", "__meta_kubernetes_pod_label_app_kubernetes_io_name": "web"}
    assert _relabel(other, rules)["job"] == "kubernetes-pods"
    assert _relabel({"job": "kubernetes-pods"}, rules)["job"] == "kubernetes-pods"
