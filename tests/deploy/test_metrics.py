"""Process and GPU metrics on the server's /metrics, which deploy/grafana and the alerts read.

No GPU here: the CUDA gauges are checked with a stand-in for torch.cuda (the calls the collector
makes, with the values a one-GPU server would report), and on CPU they must be absent, with no CUDA
context created for them. The serving image has no matplotlib: a job still finishes without its chart.
"""

from __future__ import annotations

import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from segsvc.server.metrics import ServerMetrics

GIB = 1 << 30


def test_process_metrics_are_scraped(start_server, tmp_path: Path) -> None:
    server = start_server(tmp_path)
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics", timeout=60).read().decode()
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
                 "process_start_time_seconds", "python_info", "segsvc_loaded_models"):
        assert f"\n{name}" in body, name


def test_no_gpu_metrics_and_no_cuda_context_on_cpu() -> None:
    metrics = ServerMetrics()
    assert metrics.registry.get_sample_value("segsvc_gpu_memory_total_bytes", {"device": "cuda:0"}) is None
    if torch.cuda.is_available():
        assert not torch.cuda.is_initialized(), "scraping must not initialise CUDA"


class _FakeCuda:
    """torch.cuda as a process computing on GPU 1 of two would see it."""

    def __init__(self, nvml: bool) -> None:
        self.nvml = nvml

    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def device_count(self) -> int:
        return 2

    def memory_reserved(self, index: int) -> int:
        return 3 * GIB if index == 1 else 0

    def memory_allocated(self, index: int) -> int:
        return 2 * GIB

    def mem_get_info(self, index: int) -> tuple[int, int]:
        return 70 * GIB, 80 * GIB

    def utilization(self, index: int) -> int:
        if not self.nvml:
            raise ModuleNotFoundError("pynvml")
        return 85


@pytest.mark.parametrize("nvml", [True, False])
def test_gpu_memory_and_utilisation_of_the_devices_in_use(monkeypatch, nvml: bool) -> None:
    monkeypatch.setattr(torch, "cuda", _FakeCuda(nvml))
    metrics = ServerMetrics()
    value = metrics.registry.get_sample_value
    gpu1 = {"device": "cuda:1"}
    assert value("segsvc_gpu_memory_reserved_bytes", gpu1) == 3 * GIB
    assert value("segsvc_gpu_memory_allocated_bytes", gpu1) == 2 * GIB
    assert value("segsvc_gpu_memory_used_bytes", gpu1) == 10 * GIB
    assert value("segsvc_gpu_memory_total_bytes", gpu1) == 80 * GIB
    assert value("segsvc_gpu_utilization_ratio", gpu1) == (0.85 if nvml else None)
    assert value("segsvc_gpu_memory_total_bytes", {"device": "cuda:0"}) is None, "a device it does not use"


def test_job_outputs_without_matplotlib(monkeypatch, tmp_path: Path) -> None:
    """The serving image has no matplotlib: a job still writes its results and its chart (drawn with OpenCV)."""
    from segsvc.jobs.outputs import CHART_FILE, SUMMARY_FILE, JobOutputs

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... -> ImportError
    out = JobOutputs(tmp_path)
    record = out.write_item("a.png", np.zeros((4, 4), np.uint8), palette=[(0, 0, 0)])
    summary = out.finalize([{"input": "a.png", "output": record["labels"], "height": 4, "width": 4,
                           "class_counts": {"c0": 16}}], [], class_names=["c0"], palette=[(0, 0, 0)],
                         summary_fields={"job_id": "j"})
    assert summary["counts"]["done"] == 1
    assert (tmp_path / SUMMARY_FILE).is_file()
    assert (tmp_path / CHART_FILE).read_bytes().startswith(b"\x89PNG")
