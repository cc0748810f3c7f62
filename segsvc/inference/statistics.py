"""What one loaded model version has served: counts and cumulative times per stage.

The same figures that Triton's ``ModelStatistics`` reports, kept by the core so
that every path counts (``segsvc.v1``, the Open Inference Protocol, batch jobs),
and read by the protocol adapters. One image is one inference request here, so
a ``ModelInfer`` call with N images counts N. Per image:

- ``success`` / ``fail``: the whole of ``InferenceService.segment``, from the
  lease on the version to the result (or the error);
- ``compute_input``: decoding the image and preparing its input tensor;
- ``queue``: waiting in the batcher until its batch started;
- ``compute_infer``: the forward passes of the batch that held it;
- ``compute_output``: turning that batch's logits into label maps (arg-max, crop,
  copy back from the device).

Every image of a batch reports its batch's ``compute_infer`` and
``compute_output``, as Triton's backends do. Each successful batch counts one
execution, under its size. The figures live as long as the loaded version: an
unload and a load start from zero; a reload of changed files (LoadModel of a
loaded version) keeps them.

Example:
    >>> stats = VersionStatistics()
    >>> stats.executed(batch_size=2, infer_s=0.010, output_s=0.001)
    >>> stats.succeeded(total_s=0.020, prepare_s=0.004, queue_s=0.003, infer_s=0.010, output_s=0.001)
    >>> snap = stats.snapshot()
    >>> snap.inference_count, snap.execution_count, snap.compute_infer, snap.batches[2].compute_infer
    (1, 1, Duration(count=1, ns=10000000), Duration(count=1, ns=10000000))
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True)
class Duration:
    """A count of events and their cumulative duration in nanoseconds."""

    count: int = 0
    ns: int = 0

    def plus(self, seconds: float) -> Duration:
        return Duration(self.count + 1, self.ns + max(0, round(seconds * 1e9)))


@dataclass(frozen=True)
class BatchStatistics:
    """The executions of one batch size."""

    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()


@dataclass(frozen=True)
class StatisticsSnapshot:
    """A consistent copy of a version's statistics (``VersionStatistics.snapshot``); ``batches`` is read-only,
    as the version's own record shares it."""

    last_inference_ms: int = 0
    inference_count: int = 0
    execution_count: int = 0
    success: Duration = Duration()
    fail: Duration = Duration()
    queue: Duration = Duration()
    compute_input: Duration = Duration()
    compute_infer: Duration = Duration()
    compute_output: Duration = Duration()
    batches: Mapping[int, BatchStatistics] = field(default_factory=lambda: MappingProxyType({}))


class VersionStatistics:
    """Accumulates one loaded version's statistics; safe from any thread (the batch thread records executions)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._snap = StatisticsSnapshot()

    def succeeded(self, *, total_s: float, prepare_s: float, queue_s: float, infer_s: float,
                  output_s: float) -> None:
        """One image segmented: its time in ``segment`` and in each stage."""
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            s = self._snap
            self._snap = replace(
                s, last_inference_ms=now_ms, inference_count=s.inference_count + 1,
                success=s.success.plus(total_s), queue=s.queue.plus(queue_s),
                compute_input=s.compute_input.plus(prepare_s), compute_infer=s.compute_infer.plus(infer_s),
                compute_output=s.compute_output.plus(output_s),
            )

    def failed(self, total_s: float) -> None:
        """One image that reached the version and got no result (bad data, a deadline, a cancelled call)."""
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            s = self._snap
            self._snap = replace(s, last_inference_ms=now_ms, fail=s.fail.plus(total_s))

    def executed(self, *, batch_size: int, infer_s: float, output_s: float) -> None:
        """One successful batch of ``batch_size`` images."""
        with self._lock:
            s = self._snap
            old = s.batches.get(batch_size, BatchStatistics())
            batches = MappingProxyType({**s.batches, batch_size: BatchStatistics(old.compute_infer.plus(infer_s),
                                                                                 old.compute_output.plus(output_s))})
            self._snap = replace(s, execution_count=s.execution_count + 1, batches=batches)

    def snapshot(self) -> StatisticsSnapshot:
        """The statistics now (an immutable value: later records do not change it)."""
        with self._lock:
            return self._snap
