"""The alerts and the dashboard against what the server really records: labels, methods, buckets.

test_monitoring.py checks that every metric name a query uses is exported. Here: every label a query
matches on or groups by is one that metric carries (or one Prometheus adds to each target), the
latency alert and panel watch every inference entry point (Segment, SegmentStream and the Open
Inference Protocol's ModelInfer, the only one a KServe client calls), and the latency buckets resolve
the range of real requests (CPU U-Net: 20 ms to several seconds) and the alert's threshold.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict

import pytest
import torch
import yaml

from segsvc.server.metrics import LATENCY_BUCKETS, ServerMetrics
from tests.deploy.conftest import DEPLOY, ROOT
from tests.deploy.test_metrics import _FakeCuda

TARGET_LABELS = {"job", "instance", "namespace", "pod"}  # added by the scrape (prometheus-k8s.yml: namespace, pod)
INFERENCE_METHODS = ("Segment", "SegmentStream", "ModelInfer")  # the RPCs that observe segsvc_request_seconds
LATENCY = "segsvc_request_seconds_bucket"


@pytest.fixture(scope="module")
def labels_of() -> dict[str, set[str]]:
    """{sample name: its label names} as the server exports them, GPU gauges included (a stand-in CUDA)."""
    found: dict[str, set[str]] = defaultdict(set)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "cuda", _FakeCuda(nvml=True))
        metrics = ServerMetrics()
        metrics.watch_models(lambda: [("m", 1, 0, True)], failed=lambda: [("m", 0, "broken")])
        metrics.observe_request("Segment", "m", "OK", 0.01, 0.001, 0.005)
        metrics.observe_batch("m", 1, 2, 0.005)
        for family in metrics.registry.collect():
            for sample in family.samples:
                found[sample.name] |= set(sample.labels)
    found["up"] = set()
    return found


def _alert_exprs() -> dict[str, str]:
    rules = yaml.safe_load((DEPLOY / "prometheus-alerts.yml").read_text())
    return {r["alert"]: r["expr"] for g in rules["groups"] for r in g["rules"]}


def _dashboard_exprs() -> dict[str, str]:
    dashboard = json.loads((DEPLOY / "grafana" / "segsvc-dashboard.json").read_text())
    return {f"{p['title']} #{i}": t["expr"] for p in dashboard["panels"] for i, t in enumerate(p["targets"])}


def _selectors(expr: str) -> list[tuple[str, dict[str, tuple[str, str]]]]:
    """(metric, {label: (operator, value)}) of each ``metric{...}`` in ``expr``."""
    found = []
    for metric, body in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\}", expr):
        matchers = re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"', body)
        found.append((metric, {label: (op, value) for label, op, value in matchers}))
    return found


def _grouping(expr: str) -> list[set[str]]:
    return [{label.strip() for label in group.split(",") if label.strip()}
            for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)]


def _metrics_in(expr: str, known: dict[str, set[str]]) -> set[str]:
    return {w for w in re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", re.sub(r'"[^"]*"', '""', expr)) if w in known}


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_every_label_a_query_uses_is_on_its_metric(labels_of: dict[str, set[str]], source: str) -> None:
    exprs = _alert_exprs() if source == "alerts" else _dashboard_exprs()
    problems = []
    for name, expr in exprs.items():
        for metric, matchers in _selectors(expr):
            unknown = set(matchers) - labels_of.get(metric, set()) - TARGET_LABELS
            if unknown:
                problems.append(f"{name}: {metric} has no label {sorted(unknown)}")
        metrics = _metrics_in(expr, labels_of)
        for group in _grouping(expr):
            for metric in metrics:
                unknown = group - labels_of[metric] - TARGET_LABELS
                if unknown:
                    problems.append(f"{name}: groups {metric} by {sorted(unknown)}, which it does not carry")
    assert not problems, "\n".join(problems)


def test_the_label_check_catches_a_wrong_label(labels_of: dict[str, set[str]]) -> None:
    assert "model" in labels_of["segsvc_queue_depth"] and "code" not in labels_of["segsvc_queue_depth"]
    (selector,) = _selectors('sum by (code) (segsvc_queue_depth{job="$job",modle="m"})')
    assert set(selector[1]) - labels_of[selector[0]] - TARGET_LABELS == {"modle"}
    assert _grouping('sum by (code) (segsvc_queue_depth{job="$job"})') == [{"code"}]


def test_inference_methods_are_the_ones_the_server_records() -> None:
    """The names INFERENCE_METHODS stands for: RPCs of the services, and the labels their handlers record."""
    from segsvc.server.oip_pb import grpc_service_pb2
    from segsvc.v1 import segmentation_pb2

    segmentation = segmentation_pb2.DESCRIPTOR.services_by_name["SegmentationService"].methods_by_name
    oip = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name
    assert {"Segment", "SegmentStream"} <= set(segmentation) and "ModelInfer" in oip
    servicer = (ROOT / "segsvc" / "server" / "servicer.py").read_text()
    assert '"Segment", request_id_of' in servicer and '_Call("SegmentStream"' in servicer
    assert 'observe_request("ModelInfer"' in (ROOT / "segsvc" / "server" / "oip.py").read_text()


def _latency_queries(exprs: dict[str, str]) -> dict[str, str]:
    return {name: expr for name, expr in exprs.items() if LATENCY in expr}


def _watched_methods(expr: str) -> set[str]:
    """The inference methods the latency selectors of ``expr`` take in (every one without a method matcher)."""
    watched = set()
    for metric, matchers in _selectors(expr):
        if metric != LATENCY:
            continue
        op, value = matchers.get("method", ("=~", ".*"))
        match = {"=": lambda m: m == value, "!=": lambda m: m != value,
                 "=~": lambda m: re.fullmatch(value, m) is not None, "!~": lambda m: re.fullmatch(value, m) is None}[op]
        watched |= {m for m in INFERENCE_METHODS if match(m)}
    return watched


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_latency_is_watched_for_every_inference_method(source: str) -> None:
    """A KServe client calls ModelInfer only, a batch client SegmentStream: a p99 of Segment alone never sees
    them slow down. Each method gets its own quantile (grouped by method): a stream's per-image times and a
    ModelInfer call's whole-request time are not one distribution."""
    queries = _latency_queries(_alert_exprs() if source == "alerts" else _dashboard_exprs())
    assert queries, f"the {source} watch request latency"
    watched = set().union(*(_watched_methods(expr) for expr in queries.values()))
    assert watched == set(INFERENCE_METHODS), f"{source}: latency of {sorted(set(INFERENCE_METHODS) - watched)} unwatched"
    for name, expr in queries.items():
        if len(_watched_methods(expr)) > 1:
            assert all("method" in group for group in _grouping(expr)), f"{name}: methods mixed in one quantile"


def test_latency_buckets_resolve_real_requests() -> None:
    """CPU U-Net requests take 20 ms to several seconds: buckets below and above that, no gap over 2.5x."""
    bounds = sorted(LATENCY_BUCKETS)
    assert bounds[0] <= 0.02 and bounds[-1] >= 10
    inside = [b for b in bounds if 0.01 <= b <= 10]
    assert all(hi / lo <= 2.5 for lo, hi in zip(inside, inside[1:])), inside


def test_latency_alert_threshold_is_a_bucket_bound() -> None:
    """histogram_quantile interpolates inside a bucket: a threshold between two bounds would fire on a guess."""
    for name, expr in _latency_queries(_alert_exprs()).items():
        threshold = float(re.search(r">\s*([0-9.]+)\s*$", expr.strip()).group(1))
        assert threshold in LATENCY_BUCKETS, (name, threshold)


def _rpc_paths() -> dict[str, str]:
    """{method path: method name} of every method the server serves on its gated services."""
    from google.longrunning import operations_pb2

    from segsvc.server.oip_pb import grpc_service_pb2
    from segsvc.v1 import datasets_pb2, jobs_pb2, segmentation_pb2, training_pb2

    every = {}
    for module in (segmentation_pb2, jobs_pb2, datasets_pb2, training_pb2, operations_pb2, grpc_service_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            every |= {f"/{service.full_name}/{name}": name for name in service.methods_by_name}
    return every


def _counted_by_servicers() -> set[str]:
    """The methods whose servicers count them (with the model that served them)."""
    from segsvc.v1 import segmentation_pb2

    return set(segmentation_pb2.DESCRIPTOR.services_by_name["SegmentationService"].methods_by_name) | {"ModelInfer"}


def test_the_self_counting_methods_are_counted_by_their_servicers() -> None:
    servicer = (ROOT / "segsvc" / "server" / "servicer.py").read_text()
    for method in _counted_by_servicers() - {"ModelInfer", "SegmentStream"}:
        assert f'_handle("{method}"' in servicer or f'"{method}", request_id_of' in servicer, method
    assert '_Call("SegmentStream"' in servicer
    assert 'observe_request("ModelInfer"' in (ROOT / "segsvc" / "server" / "oip.py").read_text()


def test_every_method_is_counted_once() -> None:
    """Each served method is counted by its servicer or by the server's CallCounter, never both, never
    neither; only the readiness probes are left out (like gRPC health). Jobs, datasets, training,
    operations and most Open Inference Protocol methods were counted only when refused."""
    from segsvc.server.counting import counted_label
    from segsvc.server.gate import PROBE_METHODS

    by_servicers = _counted_by_servicers()
    for path, name in _rpc_paths().items():
        counters = (name in by_servicers) + (counted_label(path) is not None)
        assert counters == (0 if path in PROBE_METHODS else 1), path
        assert counted_label(path) in (None, name), path


@pytest.mark.parametrize("source", ["alerts", "dashboard"])
def test_error_ratio_is_over_every_method(source: str) -> None:
    """Every method is counted on every outcome now: an error ratio over some methods only would miss a
    failing job, dataset or training service (the filter was there because those were counted only when
    refused)."""
    every = set(_rpc_paths().values())
    exprs = _alert_exprs() if source == "alerts" else _dashboard_exprs()
    ratios = {name: expr for name, expr in exprs.items() if expr.count("segsvc_requests_total") >= 2 and "/" in expr}
    assert ratios, f"the {source} have an error ratio"
    for name, expr in ratios.items():
        for metric, matchers in _selectors(expr):
            if metric != "segsvc_requests_total":
                continue
            op, value = matchers.get("method", ("=~", ".*"))
            assert op == "=~", (name, op)
            selected = {m for m in every if re.fullmatch(value, m)}
            assert selected == every, f"{name}: {sorted(every - selected)}"


def test_the_memory_wait_line_is_watched_beside_the_queues() -> None:
    """Requests waiting for the memory budget are in no batch queue (segsvc_queue_depth): an alert and the
    queue-depth panel watch segsvc_memory_waiting, the alert on the interactive lane only (a job's images
    wait there by design)."""
    alerts = {name: expr for name, expr in _alert_exprs().items() if "segsvc_memory_waiting" in expr}
    assert alerts
    for name, expr in alerts.items():
        for metric, matchers in _selectors(expr):
            if metric == "segsvc_memory_waiting":
                assert matchers.get("lane") == ("=", "interactive"), name
    panels = [name for name, expr in _dashboard_exprs().items() if "segsvc_memory_waiting" in expr]
    assert any(name.startswith("Queue depth #") for name in panels), panels
