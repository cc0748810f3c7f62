"""Progress as JSON lines: ``<run_dir>/events.jsonl``, for the job runner and anyone tailing a run.

One JSON object per line, each with ``event`` and ``time`` (unix seconds),
written by rank 0 only and flushed line by line. The schema is a contract with
the job runner (fields may be added, never renamed)::

    start       run_dir, epochs (planned max), steps_per_epoch, train_samples, val_samples,
                start_epoch (0 fresh, >0 resumed) [, init_from]
    step        epoch (1-based), step (global optimiser step), steps_per_epoch, loss (running
                mean this epoch), lr, images_per_s; at most one per ``STEP_INTERVAL_S``
                and one at the end of every epoch
    epoch       epoch, epochs (planned), train_loss, lr, images_per_s, val_miou|null,
                best_miou|null, elapsed_s, eta_s|null
    checkpoint  epoch, path
    published   path (artifact version dir), name, version, metrics
    end         status ("completed" | "failed"), reason: always the last line of a run

The file is opened once the run directory exists (errors before that, such
as a malformed recipe, show only in the exit status and stderr). A resumed
run appends to the same file: it starts again with a ``start`` line.
SIGTERM (how the job runner cancels) raises ``Terminated`` in the training
process, so the run ends with ``{"status": "failed", "reason": "terminated"}``
and a non-zero exit. ``read_events`` is the reader's side.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Iterator

from segsvc.errors import SegsvcError

EVENTS_FILE = "events.jsonl"
STEP_INTERVAL_S = 2.0


class Terminated(Exception):
    """The process received SIGTERM: the run stops where it is (the last checkpoint stays valid)."""


class EventLog:
    """Appends events to ``events.jsonl``; a disabled log (other ranks) writes nothing.

    Used as a context manager it guarantees the ``end`` line: on an exception it
    writes ``failed`` with the error message, or ``terminated`` after SIGTERM.

    Example:
        >>> with EventLog(run_dir / EVENTS_FILE) as events:  # doctest: +SKIP
        ...     events.emit("start", run_dir=str(run_dir), epochs=10, ...)
        ...     events.end("completed", "all 10 epochs")
    """

    def __init__(self, path: Path | None, step_interval_s: float = STEP_INTERVAL_S) -> None:
        self.path = path
        self.step_interval_s = step_interval_s
        self._file: IO[str] | None = None
        self._last_step_t = -math.inf
        self.ended = False

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def __enter__(self) -> "EventLog":
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if not self.ended:
                if exc is None:
                    self.end("completed", "")
                else:
                    self.end("failed", failure_reason(exc))
        finally:
            if self._file is not None:
                self._file.close()
                self._file = None

    def emit(self, event: str, **fields: Any) -> None:
        """Write one line now (``time`` is added); non-finite numbers become null."""
        if self._file is None:
            return
        record = {"event": event, "time": round(time.time(), 3), **fields}
        # ensure_ascii=False: paths verbatim (a job's served copy is scrubbed of the server's paths as written)
        self._file.write(json.dumps(json_safe(record), allow_nan=False, ensure_ascii=False) + "\n")
        self._file.flush()

    def step_due(self) -> bool:
        """Whether a ``step`` event may go out now (callers skip computing it otherwise)."""
        return self._file is not None and time.monotonic() - self._last_step_t >= self.step_interval_s

    def step(self, **fields: Any) -> None:
        self._last_step_t = time.monotonic()
        self.emit("step", **fields)

    def end(self, status: str, reason: str) -> None:
        self.emit("end", status=status, reason=reason)
        self.ended = True


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, Terminated):
        return "terminated"
    text = str(exc)
    if isinstance(exc, SegsvcError) and text:  # a domain error's message is written for the user: no class name
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (an absent class's NaN IoU) as None: strict JSON, ``null``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def read_events(path: str | os.PathLike[str], offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The complete events after byte ``offset`` and the offset to continue from.

    A last line still being written (no newline yet) is left for the next call;
    a missing file reads as no events. Lines that are not JSON objects are skipped.

    Example:
        >>> events, offset = read_events(run_dir / "events.jsonl")  # doctest: +SKIP
        >>> more, offset = read_events(run_dir / "events.jsonl", offset)  # doctest: +SKIP
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    complete = data[: data.rfind(b"\n") + 1]
    events = []
    for line in complete.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            events.append(record)
    return events, offset + len(complete)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` in the main thread (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Terminated("terminated by SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
