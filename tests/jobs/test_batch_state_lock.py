"""One server runs the jobs of a state folder: a second one on the same folder is refused at start.

Two servers on one ``--state-dir`` would both resume its unfinished jobs: each deletes the
other's temporaries (failing its renames), writes the same outputs, and only the one that
got a ``CancelOperation`` stops; the second one's start would also delete the first's
half-received uploads.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from segsvc.errors import FailedPrecondition
from segsvc.jobs.batch import JobRunner, JobsConfig
from segsvc.jobs.store import JobStore
from tests.jobs.test_batch_runner import _Clock, _Service


def _runner(tmp_path: Path) -> JobRunner:
    """A runner with its own connection to the state folder's store, as another server process has."""
    config = JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out", data_root=tmp_path / "data")
    return JobRunner(JobStore(tmp_path / "state" / "jobs.sqlite"), _Service(_Clock()), config)  # type: ignore[arg-type]


def test_a_second_runner_on_the_same_state_dir_is_refused_until_the_first_stops(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()

    async def main() -> None:
        first, second = _runner(tmp_path), _runner(tmp_path)
        await first.start()
        try:
            partial = first.staging.open()  # an upload the first server is receiving
            with pytest.raises(FailedPrecondition, match="already runs the jobs of state folder"):
                await second.start()
            assert [p.name for p in first.staging.root.iterdir()] == [f"{partial.upload_id}.partial"]
            partial.abort()
        finally:
            await first.stop()
        await second.start()  # a restart after the first one ended
        await second.stop()
        first.store.close()
        second.store.close()

    asyncio.run(main())
