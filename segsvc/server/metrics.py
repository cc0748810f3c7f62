"""Prometheus metrics of one server, in its own registry (so several servers can share a process).

Exposed on ``--metrics-port`` at ``/metrics``:

- ``segsvc_requests_total{method, model, code}`` every call of the ``segsvc.v1`` services, the long-running
  operations and the Open Inference Protocol, once, by the status code it ended with: the segmentation
  service's and ``ModelInfer`` counted by their servicers (with the model that served them), the others by
  ``counting.CallCounter`` (model ``"-"``), and those an interceptor refused (auth, call limit, drain) by
  ``observe_refused``. Health, reflection and the readiness probes (``ServerLive``, ``ServerReady``,
  ``ModelReady``) are not counted;
- ``segsvc_request_seconds{method, model}`` total server-side latency (of each image, in a SegmentStream);
- ``segsvc_queue_seconds{model, lane}`` time waiting in the batch queue, per image, and
  ``segsvc_inference_seconds{model, lane}`` run time of the batch that held it: ``lane="interactive"``
  for Segment, SegmentStream and ModelInfer, ``lane="batch"`` for batch jobs' images, which give way to
  the interactive ones in the queue (a long wait there is by design: filter the lane for client latency);
- ``segsvc_batch_size{model}`` images per batch (both lanes: they share batches);
- ``segsvc_queue_depth{model, version}`` images waiting now in a model's batch queue;
- ``segsvc_memory_waiting{lane}`` requests waiting now for the server's memory budget (``--max-inflight-mb``,
  ``MemoryBudget``), before any batch queue: they are in no ``segsvc_queue_depth``, so a backlog (or a
  queue-depth autoscaler) sums both; 0 until ``watch_memory`` gives the budget;
- ``segsvc_loaded_models`` loaded model versions, and ``segsvc_model_loaded{model, version, default}``;
- ``segsvc_model_version_failed{model, version}`` 1 per version whose last load failed and that is not serving
  (corrupt, incomplete, mismatched manifest, symlink out of the repository; a version whose reload failed serves
  on and shows the reason on its READY status); the reason is in
  ``GetModel``'s ``version_status`` and the log, never in a label;
- ``segsvc_calls_in_flight`` places the call limit has given (calls in progress, images streams hold) and
  ``segsvc_calls_limit`` (``--max-concurrent-rpcs``), once ``watch_calls`` is called;
- ``segsvc_queue_dropped_total{model}`` images that left a batch queue without running (cancelled, past
  their deadline, failed by a stop), over every version of the model, once ``watch_dropped`` is called;
- ``process_*`` (CPU seconds, resident memory, open file descriptors, start time) and ``python_info``;
- on CUDA, per device the process computes on: ``segsvc_gpu_memory_allocated_bytes`` and
  ``segsvc_gpu_memory_reserved_bytes`` (torch's caching allocator), ``segsvc_gpu_memory_used_bytes``
  and ``segsvc_gpu_memory_total_bytes`` (the whole device), ``segsvc_gpu_utilization_ratio`` (NVML).

The ``model`` label is a loaded model's name (``"-"`` before a model is
resolved), never raw request text, so label cardinality stays bounded. A
source read at scrape time that fails (a CUDA error) is left out of that scrape
and logged: it does not fail the whole page, whose other metrics and ``up`` stay.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from typing import Callable, Hashable, Iterable, Mapping, Protocol

from prometheus_client import (CollectorRegistry, Counter, Histogram, PlatformCollector, ProcessCollector,
                               make_wsgi_app, start_http_server)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from segsvc.inference.batcher import Priority

log = logging.getLogger("segsvc.server")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)

Snapshot = Callable[[], list[tuple[str, int, int, bool]]]
FailedSnapshot = Callable[[], list[tuple[str, int, str]]]  # (model, version, reason)


class DropCount(Protocol):
    """What ``watch_dropped`` reads of a batcher: its ``stats`` (``DynamicBatcher.stats``)."""

    dropped: int


DroppedSnapshot = Callable[[], Iterable[tuple[str, DropCount]]]  # (model, its batcher's stats) per loaded version
WaitingSnapshot = Callable[[], Mapping[Hashable, int]]  # lane (``Priority``) -> requests waiting: MemoryBudget.waiting
INTERACTIVE, BATCH = "interactive", "batch"  # the ``lane`` label's values


class _Guarded(Collector):
    """``inner``'s metrics, or none while it fails: prometheus_client fails the whole scrape on one collector's
    error, so a CUDA error in the GPU gauges took every metric (and ``up``) with it. The first failure is
    logged; the next success says the source is back."""

    def __init__(self, inner: Collector, what: str) -> None:
        self._inner = inner
        self._what = what
        self._failing = False

    def collect(self) -> Iterable[Metric]:
        try:
            families = list(self._inner.collect())
        except Exception:
            if not self._failing:
                log.warning("metrics: the %s are left out of the scrape while reading them fails", self._what,
                            exc_info=True)
            self._failing = True
            return []
        if self._failing:
            log.info("metrics: the %s are back in the scrape", self._what)
            self._failing = False
        return families


class _CallsCollector(Collector):
    """The call limit's places in use, and its size, read at scrape time."""

    def __init__(self, in_flight: Callable[[], int], limit: int) -> None:
        self._in_flight = in_flight
        self._limit = limit

    def collect(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily("segsvc_calls_in_flight", "Places the call limit has given: calls in progress "
                                "and the images SegmentStream calls hold", value=self._in_flight())
        yield GaugeMetricFamily("segsvc_calls_limit", "Most places at once (--max-concurrent-rpcs); one more call "
                                "is refused with RESOURCE_EXHAUSTED, but for management calls, which have 4 more "
                                "places of their own", value=self._limit)


class _DroppedCollector(Collector):
    """Images the batchers dropped, per model, summed over every version seen loaded.

    A version's batcher counts on after it is unloaded (a forced stop fails its queue then), and a reload
    starts a new batcher from zero: the stats of every batcher seen at a scrape are kept (a few integers per
    version ever loaded), so the total never goes down and a stop's drops are counted at the next scrape.
    """

    def __init__(self, source: DroppedSnapshot) -> None:
        self._source = source
        self._seen: dict[int, tuple[str, DropCount]] = {}  # id(stats) -> (model, stats); kept, so ids stay unique
        self._lock = threading.Lock()  # scrapes run on the HTTP server's threads, possibly at once

    def collect(self) -> Iterable[CounterMetricFamily]:
        with self._lock:
            for model, stats in self._source():
                self._seen.setdefault(id(stats), (model, stats))
            totals: dict[str, int] = defaultdict(int)
            for model, stats in self._seen.values():
                totals[model] += stats.dropped
        family = CounterMetricFamily("segsvc_queue_dropped", "Images that left a batch queue without running: "
                                     "cancelled, past their deadline, or failed by a stop", labels=["model"])
        for model in sorted(totals):
            family.add_metric([model], totals[model])
        yield family


class _MemoryCollector(Collector):
    """Requests waiting for the server's memory budget, per lane, read at scrape time (both lanes always)."""

    def __init__(self, waiting: WaitingSnapshot) -> None:
        self._waiting = waiting

    def collect(self) -> Iterable[GaugeMetricFamily]:
        counts = {INTERACTIVE: 0, BATCH: 0}
        for lane, count in self._waiting().items():
            counts[BATCH if lane == Priority.BATCH else INTERACTIVE] += count
        family = GaugeMetricFamily("segsvc_memory_waiting", "Requests waiting for the server's memory budget "
                                   "(--max-inflight-mb), not yet in a batch queue", labels=["lane"])
        for lane, count in counts.items():
            family.add_metric([lane], count)
        yield family


class _ModelsCollector(Collector):
    """Reads queue depths and loaded versions at scrape time (no bookkeeping on the hot path)."""

    def __init__(self, snapshot: Snapshot, failed: FailedSnapshot | None = None) -> None:
        self._snapshot = snapshot
        self._failed = failed

    def collect(self) -> Iterable[GaugeMetricFamily]:
        rows = self._snapshot()
        depth = GaugeMetricFamily("segsvc_queue_depth", "Requests waiting in a model's batch queue",
                                  labels=["model", "version"])
        loaded = GaugeMetricFamily("segsvc_model_loaded", "1 per loaded model version",
                                   labels=["model", "version", "default"])
        for name, version, queued, is_default in rows:
            depth.add_metric([name, str(version)], queued)
            loaded.add_metric([name, str(version), "true" if is_default else "false"], 1)
        yield depth
        yield loaded
        yield GaugeMetricFamily("segsvc_loaded_models", "Number of loaded model versions", value=len(rows))
        if self._failed is not None:
            failed = GaugeMetricFamily("segsvc_model_version_failed",
                                       "1 per model version whose last load failed and that is not serving (see GetModel "
                                       "for the reason)",
                                       labels=["model", "version"])
            for name, version, _reason in self._failed():
                failed.add_metric([name, str(version)], 1)
            yield failed


class _CudaCollector(Collector):
    """GPU memory and utilisation of the CUDA devices this process computes on, read at scrape time.

    Only once the process has initialised CUDA, and only devices where torch's
    caching allocator holds memory: a CPU server on a GPU host never creates a
    CUDA context for its metrics. Utilisation comes from NVML through
    ``torch.cuda.utilization`` (package ``nvidia-ml-py``, in the CUDA image);
    without NVML that gauge is left out.
    """

    def __init__(self) -> None:
        self._nvml = True

    def collect(self) -> Iterable[GaugeMetricFamily]:
        import torch

        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return
        labels = ["device"]
        allocated = GaugeMetricFamily("segsvc_gpu_memory_allocated_bytes",
                                      "GPU memory held by tensors (torch caching allocator)", labels=labels)
        reserved = GaugeMetricFamily("segsvc_gpu_memory_reserved_bytes",
                                     "GPU memory reserved by torch's caching allocator", labels=labels)
        used = GaugeMetricFamily("segsvc_gpu_memory_used_bytes", "GPU memory in use on the device (all processes)",
                                 labels=labels)
        total = GaugeMetricFamily("segsvc_gpu_memory_total_bytes", "GPU memory of the device", labels=labels)
        utilization = GaugeMetricFamily("segsvc_gpu_utilization_ratio",
                                        "Share of the last NVML sample period in which a kernel ran (0..1)",
                                        labels=labels)
        for index in range(torch.cuda.device_count()):
            held = torch.cuda.memory_reserved(index)
            if not held:
                continue
            device = [f"cuda:{index}"]
            allocated.add_metric(device, torch.cuda.memory_allocated(index))
            reserved.add_metric(device, held)
            free, capacity = torch.cuda.mem_get_info(index)
            used.add_metric(device, capacity - free)
            total.add_metric(device, capacity)
            if self._nvml:
                try:
                    utilization.add_metric(device, torch.cuda.utilization(index) / 100.0)
                except Exception:  # no NVML library or bindings, or no permission: stop asking
                    self._nvml = False
        yield from (allocated, reserved, used, total, utilization)


class ServerMetrics:
    """The server's metrics and their HTTP endpoint."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("segsvc_requests", "RPCs by method, model and status code",
                                ["method", "model", "code"], registry=r)
        self.request_seconds = Histogram("segsvc_request_seconds",
                                         "Server-side latency of an RPC (of each image, in a SegmentStream)",
                                         ["method", "model"], buckets=LATENCY_BUCKETS, registry=r)
        self.queue_seconds = Histogram("segsvc_queue_seconds", "Time an image waited in the batch queue, "
                                       "by lane (interactive calls, batch jobs)", ["model", "lane"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.inference_seconds = Histogram("segsvc_inference_seconds", "Run time of the batch that held an image, "
                                           "by lane (interactive calls, batch jobs)", ["model", "lane"],
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("segsvc_batch_size", "Images per batch", ["model"],
                                    buckets=BATCH_BUCKETS, registry=r)
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        r.register(_Guarded(_CudaCollector(), "GPU gauges"))
        self._watched: dict[str, Collector] = {}
        self.watch_memory(dict)  # nothing waits until a budget is watched (the page always has the family)
        self._http = None
        self._thread = None

    def _watch(self, key: str, collector: Collector, what: str) -> None:
        """Register ``collector`` (fault-isolated), replacing the one an earlier ``watch_*`` of ``key`` made:
        two would export each family twice, which Prometheus rejects."""
        old = self._watched.pop(key, None)
        if old is not None:
            self.registry.unregister(old)
        self._watched[key] = guarded = _Guarded(collector, what)
        self.registry.register(guarded)

    def watch_calls(self, in_flight: Callable[[], int], limit: int) -> None:
        """Report ``in_flight()`` (``CallLimit.in_flight``) and ``limit`` at every scrape."""
        self._watch("calls", _CallsCollector(in_flight, limit), "call-limit gauges")

    def watch_dropped(self, source: DroppedSnapshot) -> None:
        """Report the images dropped unrun by each model's batchers: ``source()`` gives ``(model, stats)`` of
        every loaded version (``DynamicBatcher.stats``), read at every scrape."""
        self._watch("dropped", _DroppedCollector(source), "dropped-image counts")

    def watch_memory(self, waiting: WaitingSnapshot) -> None:
        """Report the requests waiting for the memory budget: ``waiting()`` (``MemoryBudget.waiting``) gives them
        per lane, read at every scrape."""
        self._watch("memory", _MemoryCollector(waiting), "memory-budget gauge")

    def watch_models(self, snapshot: Snapshot, failed: FailedSnapshot | None = None) -> None:
        """Report queue depths and loaded versions from ``snapshot()``, failed versions from ``failed()``, at every scrape."""
        self.registry.register(_ModelsCollector(snapshot, failed))

    def observe_batch(self, model: str, version: int, size: int, run_s: float) -> None:
        self.batch_size.labels(model).observe(size)

    def observe_request(self, method: str, model: str, code: str, total_s: float,
                        queue_s: float | None = None, run_s: float | None = None) -> None:
        self.requests.labels(method, model, code).inc()
        self.request_seconds.labels(method, model).observe(total_s)
        self.observe_stages(model, queue_s, run_s)

    def observe_refused(self, method: str, code: str) -> None:
        """A call refused before any servicer ran (auth, admission), or a SegmentStream that failed as a whole (its
        images count one by one): counted under model '-', no latency (zeros would drag the quantiles down)."""
        self.requests.labels(method, "-", code).inc()

    def observe_stages(self, model: str, queue_s: float | None, run_s: float | None,
                       lane: str = INTERACTIVE) -> None:
        """Where one image's time went in the batcher (a ``ModelInfer`` request observes each of its images)."""
        if queue_s is not None:
            self.queue_seconds.labels(model, lane).observe(queue_s)
        if run_s is not None:
            self.inference_seconds.labels(model, lane).observe(run_s)

    def observe_job_image(self, model: str, queue_s: float, run_s: float) -> None:
        """One batch job's image, segmented (``JobRunner``'s ``on_image``): its stages in the batch lane."""
        self.observe_stages(model, queue_s, run_s, BATCH)

    def start_http(self, host: str, port: int, certfile: str | None = None, keyfile: str | None = None) -> int:
        """Serve ``/metrics`` (only: any other path is 404) on ``host:port`` (0: any free port; HTTPS with a
        certificate) from a daemon thread."""
        self._http, self._thread = start_http_server(port, addr=host, registry=self.registry,
                                                     certfile=certfile, keyfile=keyfile)
        # prometheus_client's server (address family, TLS, daemon threads), with its app behind the router
        self._http.set_app(_only_metrics(make_wsgi_app(self.registry)))
        return int(self._http.server_port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


METRICS_PATH = "/metrics"


def _only_metrics(app: Callable) -> Callable:
    """``app`` at ``/metrics``, 404 elsewhere: the page is not served at every path an accidental crawler or
    probe tries (prometheus_client's own server answers it at any path)."""

    def route(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") == METRICS_PATH:
            return app(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found: metrics are served at /metrics\n"]

    return route
