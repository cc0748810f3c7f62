"""``StoreRunner.stop`` of a runner whose scheduler had already crashed."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest

from segsvc.jobs.batch import JobRunner
from segsvc.jobs.store import JobStore
from tests.jobs.test_batch_runner import _config, _Service, clock  # noqa: F401  (clock: a fixture)


def test_a_scheduler_that_crashed_is_logged_when_the_runner_stops(tmp_path: Path, clock,  # noqa: F811
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """The stop awaits the scheduler with ``gather(return_exceptions=True)``: its crash was taken there and never
    reported (nor did asyncio's "exception was never retrieved", the exception being retrieved)."""
    store = JobStore(tmp_path / "state" / "jobs.sqlite")

    def failing(kind: str) -> list:
        raise sqlite3.OperationalError("disk I/O error")

    async def main() -> None:
        runner = JobRunner(store, _Service(clock), _config(tmp_path))  # type: ignore[arg-type]
        await runner.start()
        store.unfinished = failing  # type: ignore[method-assign]
        runner._wake.set()
        await asyncio.wait([runner._scheduler])  # type: ignore[list-item]
        await runner.stop()

    try:
        with caplog.at_level(logging.ERROR, logger="segsvc.jobs"):
            asyncio.run(main())
    finally:
        store.close()
    assert "the segmentation scheduler had stopped on an error: disk I/O error" in caplog.text
