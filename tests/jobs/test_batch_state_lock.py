"""One server runs the jobs of a state folder: a second one on the same folder is refused at start.

Two servers on one ``--state-dir`` would both resume its unfinished jobs: each deletes the
other's temporaries (failing its renames), writes the same outputs, and only the one that
got a ``CancelOperation`` stops; the second one's start would also delete the first's
half-received uploads.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from pathlib import Path

import pytest

from segsvc.errors import FailedPrecondition
from segsvc.jobs.batch import LOCK_FILE, JobRunner, JobsConfig
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


def _held(state: Path) -> bool:
    """Whether another server's ``flock`` on the folder would be refused now."""
    fd = os.open(state / LOCK_FILE, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_a_claimed_state_dir_stays_locked_after_stop_until_released(tmp_path: Path) -> None:
    """The server's runner released the lock in its ``stop``, before the server closed the job store and the rest
    of the folder: a server waiting for the folder started beside them. A claimed runner keeps the lock until
    ``release_state``; a runner that took it in its own ``start`` still releases it in ``stop``."""
    config = JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out", data_root=tmp_path / "data")
    (tmp_path / "data").mkdir()

    async def main() -> None:
        runner = JobRunner.claim(_Service(_Clock()), config)  # type: ignore[arg-type]
        assert _held(config.state_dir)
        await runner.start()
        await runner.stop()
        assert _held(config.state_dir)  # the store is still open
        runner.store.close()
        runner.release_state()
        assert not _held(config.state_dir)
        alone = _runner(tmp_path)
        await alone.start()
        assert _held(config.state_dir)
        await alone.stop()
        assert not _held(config.state_dir)
        alone.store.close()

    asyncio.run(main())


def test_a_claim_refused_the_state_dir_opens_no_job_store(tmp_path: Path) -> None:
    """The lock comes before the store: a server refused the folder never opens (creates, checks) its database."""
    config = JobsConfig(state_dir=tmp_path / "state", output_root=tmp_path / "out")
    first = JobRunner.claim(_Service(_Clock()), config)  # type: ignore[arg-type]
    try:
        opened: list[str] = []
        original = JobStore.__init__

        def spy(self: JobStore, path: str | os.PathLike[str]) -> None:
            opened.append(os.fspath(path))
            original(self, path)

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(JobStore, "__init__", spy)
            with pytest.raises(FailedPrecondition, match="already runs the jobs of state folder"):
                JobRunner.claim(_Service(_Clock()), config)  # type: ignore[arg-type]
        assert opened == []
    finally:
        first.store.close()
        first.release_state()
    assert not _held(config.state_dir)
