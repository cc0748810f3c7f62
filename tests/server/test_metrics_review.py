"""Metrics and logs under review: the call limit and the batchers' dropped images as metrics, a failing GPU
read that must not empty the scrape, JSON log lines that stay JSON, statistics snapshots that stay fixed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import warnings

import grpc
import pytest
import torch
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from segsvc.errors import Unavailable
from segsvc.inference.batcher import BatchingConfig, DynamicBatcher
from segsvc.inference.statistics import BatchStatistics, Duration, VersionStatistics
from segsvc.server.app import CallLimit
from segsvc.server.logs import JsonFormatter, configure_logging
from segsvc.server.metrics import ServerMetrics
from segsvc.v1 import segmentation_pb2 as pb
from segsvc.v1 import segmentation_pb2_grpc as pb_grpc
from tests.deploy.test_metrics import _FakeCuda
from tests.server.conftest import encode, make_image, metric, metrics_text, publish

TIMEOUT_S = 60.0  # only a failing test waits this long


def _families(metrics: ServerMetrics) -> dict[str, object]:
    """The scrape as Prometheus parses it: {family name: family} (a page it could not parse raises)."""
    text = generate_latest(metrics.registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


# -- the call limit --------------------------------------------------------------------------------------
def test_call_limit_places_and_size_are_exported() -> None:
    calls = CallLimit(3)
    metrics = ServerMetrics()
    metrics.watch_calls(lambda: calls.in_flight, calls.limit)  # the wiring app.py needs
    value = metrics.registry.get_sample_value

    async def take_two() -> None:
        await calls.take()
        await calls.take()

    asyncio.run(take_two())
    assert value("segsvc_calls_in_flight") == 2 and value("segsvc_calls_limit") == 3
    calls.give_back()
    assert value("segsvc_calls_in_flight") == 1


def test_watching_again_replaces_the_earlier_source() -> None:
    """A second watch (a test on a server that already watches) must not export each family twice."""
    metrics = ServerMetrics()
    metrics.watch_calls(lambda: 1, 4)
    metrics.watch_calls(lambda: 2, 4)
    metrics.watch_dropped(lambda: [])
    metrics.watch_dropped(lambda: [])
    text = generate_latest(metrics.registry).decode()
    assert text.count("# TYPE segsvc_calls_in_flight gauge") == 1
    assert text.count("# TYPE segsvc_queue_dropped_total counter") == 1
    assert metrics.registry.get_sample_value("segsvc_calls_in_flight") == 2


# -- images the batchers dropped ---------------------------------------------------------------------------
def test_dropped_images_count_per_model_through_unload_and_reload() -> None:
    """Real batchers: a cancelled image, then the images a forced stop fails after the version left the
    loaded table, then a reload's new batcher: the model's total only grows."""
    metrics = ServerMetrics()
    loaded: list[tuple[str, DynamicBatcher]] = []
    metrics.watch_dropped(lambda: [(name, b.stats) for name, b in loaded])  # app.py: manager.loaded()
    dropped = lambda: metrics.registry.get_sample_value("segsvc_queue_dropped_total", {"model": "m"})  # noqa: E731
    running, release = threading.Event(), threading.Event()

    def predict(items: list[int]) -> list[int]:
        running.set()
        assert release.wait(TIMEOUT_S)
        return items

    async def scenario() -> list[float | None]:
        seen = []
        config = BatchingConfig(max_batch_size=1, max_delay_s=0.0, max_queue_size=8)
        first = DynamicBatcher(predict, config, name="m:1")
        first.start()
        loaded.append(("m", first))
        seen.append(dropped())
        busy = first.submit(1)
        assert await asyncio.to_thread(running.wait, TIMEOUT_S)  # the batch thread holds image 1
        cancelled, failed = first.submit(2), first.submit(3)
        cancelled.cancel()
        await asyncio.sleep(0)  # one loop turn: the cancelled future's callback takes it off the queue
        seen.append(dropped())
        loaded.clear()  # unloaded: gone from the table, its batcher still stopping
        stopping = asyncio.ensure_future(first.stop(drain=False))
        await asyncio.sleep(0)  # stop() fails the queue before it first waits
        seen.append(dropped())
        release.set()
        await stopping
        assert (await busy).value == 1
        with pytest.raises(Unavailable):
            await failed
        second = DynamicBatcher(predict, config, name="m:1")  # the same version, loaded again
        second.start()
        loaded.append(("m", second))
        again = second.submit(4)
        again.cancel()
        await asyncio.sleep(0)
        seen.append(dropped())
        await second.stop()
        return seen

    assert asyncio.run(scenario()) == [0, 1, 2, 3]


def test_a_real_server_exports_its_call_limit_and_its_drops(start_server, tmp_path) -> None:
    """``SegmentationServer`` wires the call limit and the batchers' drops into its /metrics."""
    publish(tmp_path, "tiny", seed=1)
    running = start_server(tmp_path)
    server = running.server
    with grpc.insecure_channel(running.address) as channel:
        pb_grpc.SegmentationServiceStub(channel).Segment(
            pb.SegmentRequest(model="tiny", image=encode(make_image(16, 16))), timeout=TIMEOUT_S)
    text = metrics_text(running)
    assert metric(text, "segsvc_calls_limit") == server.config.limits.max_concurrent_rpcs
    assert metric(text, "segsvc_calls_in_flight") == 0
    assert metric(text, "segsvc_queue_dropped_total", model="tiny") == 0
    assert metric(text, "segsvc_requests_total", code="OK", method="Segment", model="tiny") == 1


# -- a source that fails ------------------------------------------------------------------------------------
class _BrokenCuda(_FakeCuda):
    """torch.cuda after a device fault: every query raises, until ``healthy``."""

    healthy = False

    def mem_get_info(self, index: int) -> tuple[int, int]:
        if not self.healthy:
            raise RuntimeError("CUDA error: unspecified launch failure")
        return super().mem_get_info(index)


def test_a_failing_gpu_read_leaves_the_other_metrics(monkeypatch, caplog) -> None:
    cuda = _BrokenCuda(nvml=True)
    monkeypatch.setattr(torch, "cuda", cuda)
    metrics = ServerMetrics()
    metrics.observe_request("Segment", "m", "OK", 0.01)
    with caplog.at_level(logging.INFO, logger="segsvc.server"):
        for _ in range(2):
            families = _families(metrics)
            assert "segsvc_requests" in families and "process_cpu_seconds" in families
            assert "segsvc_gpu_memory_used_bytes" not in families
        cuda.healthy = True
        assert metrics.registry.get_sample_value("segsvc_gpu_memory_used_bytes", {"device": "cuda:1"}) == 10 << 30
    said = [r.getMessage() for r in caplog.records if r.name == "segsvc.server"]
    assert len([m for m in said if "left out" in m]) == 1, said  # once, not at every scrape
    assert any("back" in m for m in said), said


def test_latency_help_says_what_one_observation_is() -> None:
    """One observation per call (a ModelInfer of N images is one), per image only in a SegmentStream."""
    help_text = _families(ServerMetrics())["segsvc_request_seconds"].documentation
    assert "per image)" not in help_text and "SegmentStream" in help_text, help_text


# -- JSON log lines -----------------------------------------------------------------------------------------
def _record(msg: str, args: tuple = (), **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("segsvc.server", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def _strict(line: str) -> dict:
    """``line`` parsed as JSON proper: one object, no NaN or Infinity tokens."""
    assert "\n" not in line

    def refuse(token: str) -> None:
        raise AssertionError(f"{token} is not JSON: {line}")

    return json.loads(line, parse_constant=refuse)


def test_a_message_whose_arguments_do_not_fit_is_still_one_json_line() -> None:
    line = JsonFormatter().format(_record("loaded %s in %d s", ("tiny",), request_id="r1"))
    entry = _strict(line)
    assert "loaded %s in %d s" in entry["msg"] and "tiny" in entry["msg"] and entry["request_id"] == "r1"


def test_non_finite_numbers_are_written_as_text() -> None:
    entry = _strict(JsonFormatter().format(_record("done", ms=float("nan"), batch_size=float("inf"))))
    assert entry["ms"] == "nan" and entry["batch_size"] == "inf"


def test_a_field_whose_text_fails_does_not_lose_the_line() -> None:
    class Opaque:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    entry = _strict(JsonFormatter().format(_record("done", model=Opaque())))
    assert entry["msg"] == "done" and entry["model"] == "<Opaque>"


def test_stack_info_is_kept() -> None:
    record = _record("where")
    record.stack_info = "Stack (most recent call last):\n  File \"x.py\", line 1, in f"
    assert "x.py" in _strict(JsonFormatter().format(record))["stack"]


@pytest.fixture
def json_logging():  # type: ignore[no-untyped-def]
    """``configure_logging`` as ``segsvc serve`` calls it; the root logger and warnings are put back after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.handlers[:] = handlers
        root.setLevel(level)


def test_python_warnings_are_json_lines_too(json_logging, capsys) -> None:
    """torch and NumPy warn through ``warnings``, which printed raw text between the JSON lines."""
    configure_logging("INFO", json_lines=True)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("TypedStorage is deprecated", UserWarning, stacklevel=1)
    logging.getLogger("segsvc.server").info("after")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    entries = [_strict(line) for line in lines]  # every line on stderr is a JSON object
    assert any(e["logger"] == "py.warnings" and "TypedStorage is deprecated" in e["msg"] for e in entries), lines
    assert entries[-1]["msg"] == "after"


# -- statistics snapshots -------------------------------------------------------------------------------------
def test_a_snapshot_cannot_change_the_statistics() -> None:
    stats = VersionStatistics()
    stats.executed(batch_size=2, infer_s=0.01, output_s=0.001)
    snap = stats.snapshot()
    with contextlib.suppress(TypeError):
        snap.batches[4] = BatchStatistics(Duration(9, 9))  # type: ignore[index]
    stats.executed(batch_size=1, infer_s=0.01, output_s=0.001)
    later = stats.snapshot()
    assert set(later.batches) == {1, 2}, "a reader's change reached the version's record"
    assert set(snap.batches) == {2}, "a snapshot changed after it was taken"
