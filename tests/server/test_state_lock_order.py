"""The state folder's lock covers everything the server keeps in that folder, from start to stop.

A server waiting to take the folder over starts once the lock goes: it opens the same SQLite files and
resumes the jobs. So the lock is taken before the job store opens, and released after the job store,
the dataset registry and the models are closed.
"""

from __future__ import annotations

import fcntl
import os

import pytest

from segsvc import errors
from segsvc.datasets.registry import DatasetsConfig
from segsvc.jobs.batch import LOCK_FILE, JobsConfig
from tests.jobs.test_batch_state_lock import _held
from tests.server.conftest import RunningServer, publish, server_config


def test_the_state_lock_is_released_after_the_store_the_registry_and_the_models(tmp_path, monkeypatch):
    """``JobRunner.stop`` released the lock, and the stop then still closed the job store, the dataset registry
    (both in the folder) and drained the models: a server started in that window resumed the jobs beside them."""
    publish(tmp_path / "repo", "m", seed=2)
    state = tmp_path / "state"
    config = server_config(tmp_path / "repo", jobs=JobsConfig(state_dir=state, output_root=tmp_path / "out"),
                           datasets=DatasetsConfig(state_dir=state))
    server = RunningServer(config)
    seen: dict[str, bool] = {}
    try:
        app = server.server
        assert app.jobs is not None and app.datasets is not None
        close_store, close_registry, stop_models = app.jobs.store.close, app.datasets.close, app.manager.stop

        def store_closing() -> None:
            seen["the job store"] = _held(state)
            close_store()

        def registry_closing() -> None:
            seen["the dataset registry"] = _held(state)
            close_registry()

        async def models_stopping() -> list[str]:
            seen["the models"] = _held(state)
            return await stop_models()

        monkeypatch.setattr(app.jobs.store, "close", store_closing)
        monkeypatch.setattr(app.datasets, "close", registry_closing)
        monkeypatch.setattr(app.manager, "stop", models_stopping)
        server.call(app.stop(0.0), timeout=120)  # only a hang reaches the timeout
        assert seen == {"the job store": True, "the dataset registry": True, "the models": True}
        assert not _held(state)  # and released at the end: the next server may take the folder
    finally:
        server.close()


def test_a_stop_cut_short_while_the_models_drain_still_releases_the_lock(tmp_path, monkeypatch):
    """The lock goes last, after the models' drain (up to --drain-timeout-s): a stop cancelled there (an embedding
    program's timeout) kept the folder locked in this process for good."""
    import asyncio

    publish(tmp_path / "repo", "m", seed=2)
    state = tmp_path / "state"
    server = RunningServer(server_config(tmp_path / "repo", jobs=JobsConfig(state_dir=state,
                                                                              output_root=tmp_path / "out")))
    try:
        app = server.server
        draining: list[asyncio.Event] = []

        async def models_stuck() -> list[str]:
            draining[0].set()
            await asyncio.Event().wait()  # a drain that does not end before the caller gives up
            return []

        monkeypatch.setattr(app.manager, "stop", models_stuck)

        async def stop_cut_short() -> None:
            draining.append(asyncio.Event())
            stopping = asyncio.ensure_future(app.stop(0.0))
            await draining[0].wait()
            assert _held(state)  # the store and the registry are closed; the models still drain
            stopping.cancel()
            await asyncio.gather(stopping, return_exceptions=True)

        server.call(stop_cut_short(), timeout=120)
        assert not _held(state)
    finally:
        monkeypatch.undo()
        server.close()


def test_a_server_refused_the_state_folder_never_opened_its_job_store(tmp_path):
    """The job store was opened (its file created, its schema created or checked) when the server object was
    made, before ``start`` met the lock: a second server on a folder another one runs touched its database."""
    publish(tmp_path / "repo", "m", seed=2)
    state = tmp_path / "state"
    state.mkdir()
    holder = os.open(state / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)  # another server runs it
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        config = server_config(tmp_path / "repo", jobs=JobsConfig(state_dir=state, output_root=tmp_path / "out"))
        with pytest.raises(errors.FailedPrecondition, match="already runs the jobs of state folder"):
            RunningServer(config)
        assert sorted(p.name for p in state.iterdir()) == [LOCK_FILE]  # no jobs.sqlite, -wal, -shm, uploads/
    finally:
        os.close(holder)
