"""Training jobs of one model publishing at once (``max_training_jobs`` > 1): the publish lock and the stale gate.

The jobs' trainers and evaluators are not run: ``_publish`` gets fixed evaluation results and a
candidate saved here, and publishes into a real repository served by a real ``ModelManager``.
A race is made deterministic with a hook inside ``ModelRepository.set_default`` that holds one
job there until the test lets it go.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest

from segsvc.inference.manager import ModelManager
from segsvc.inference.repository import ModelRepository
from segsvc.jobs import gate
from segsvc.jobs.training import TrainingRunner, _Run
from segsvc.jobs.trainspec import TrainingConfig
from tests.inference.managers import quiet_manager
from tests.server.conftest import publish

WAIT_S = 60  # an upper bound for events that happen at once; never reached when the code is right
NAME = "m"


class _Store:
    """What ``_publish`` uses of the job store: progress writes, ignored here."""

    def set_progress(self, job_id: str, progress: dict[str, Any]) -> None:
        pass


class _OnLog(logging.Handler):
    """Calls ``then`` (once) when a record's message contains ``text``."""

    def __init__(self, text: str, then: Callable[[], None]) -> None:
        super().__init__()
        self.text, self.then = text, then

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.then()


def _runner(tmp_path: Path, manager: ModelManager) -> TrainingRunner:
    config = TrainingConfig(state_dir=tmp_path / "state")
    return TrainingRunner(_Store(), manager, None, config)  # type: ignore[arg-type]


def _run(job_id: str, compared: int) -> _Run:
    """A job whose evaluation compared its candidate with version ``compared`` (the default when it began)."""
    spec = {"model_name": NAME, "dataset": {"name": "d", "sha256": "0" * 64}, "recipe_name": "r", "base": None,
            "run_dir": "run", "request": {"promote": "gate", "gate_margin": 0.02, "overrides": []}}
    return _Run(SimpleNamespace(id=job_id, kind="train", spec=spec), progress={"default_version": compared})


def _results(candidate: float, default: float) -> dict[str, dict[str, dict[str, float]]]:
    return {"candidate": {"val": {"miou": candidate}}, "default": {"val": {"miou": default}}}


def _pointer(root: Path) -> str:
    return (root / NAME / "DEFAULT").read_text().strip()


async def _served_after_restart(root: Path) -> int:
    manager = quiet_manager(root)
    await manager.start()
    try:
        return manager.default_version(NAME)
    finally:
        await manager.stop()


def _assert_consistent(root: Path, served: int, *results: dict[str, Any]) -> None:
    """DEFAULT, the running server and a restarted one agree, and a job that says promoted is that default."""
    assert int(_pointer(root)) == served
    assert asyncio.run(_served_after_restart(root)) == served
    for result in results:
        assert (result["version"] == served) == result["promoted"], result["verdict"]


def test_a_rejected_jobs_pin_never_overwrites_a_concurrent_promotion(tmp_path, monkeypatch, caplog):
    """Job B (rejected) pins v1 while job A (promoted) publishes: B's late pin used to win over A's DEFAULT."""
    root = tmp_path / "repo"
    publish(root, NAME, seed=1)
    cand_a, cand_b = publish(tmp_path / "cand_a", NAME, seed=2), publish(tmp_path / "cand_b", NAME, seed=3)
    b_pinning, release_b = threading.Event(), threading.Event()
    real_set_default = ModelRepository.set_default

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], int]:
        loop = asyncio.get_running_loop()
        a_waits_or_wrote = asyncio.Event()  # A is held behind B (fixed) or has written its DEFAULT (the race)

        def set_default(repo: ModelRepository, name: str, version: int | None) -> None:
            if version == 1 and not b_pinning.is_set():  # B pins the default it was compared with
                b_pinning.set()
                assert release_b.wait(WAIT_S)
            real_set_default(repo, name, version)
            if version != 1:  # A's promotion
                loop.call_soon_threadsafe(a_waits_or_wrote.set)

        monkeypatch.setattr(ModelRepository, "set_default", set_default)
        waiting = _OnLog("training job jobA: waiting", lambda: loop.call_soon_threadsafe(a_waits_or_wrote.set))
        logging.getLogger("segsvc.jobs").addHandler(waiting)
        manager = quiet_manager(root)
        await manager.start()
        try:
            runner = _runner(tmp_path, manager)
            task_b = asyncio.create_task(runner._publish(_run("jobB", 1), cand_b, _results(0.40, 0.50)))
            assert await asyncio.to_thread(b_pinning.wait, WAIT_S)
            task_a = asyncio.create_task(runner._publish(_run("jobA", 1), cand_a, _results(0.90, 0.50)))
            await asyncio.wait_for(a_waits_or_wrote.wait(), WAIT_S)
            release_b.set()
            result_a, result_b = await asyncio.wait_for(asyncio.gather(task_a, task_b), WAIT_S)
            return result_a, result_b, manager.default_version(NAME)
        finally:
            release_b.set()
            logging.getLogger("segsvc.jobs").removeHandler(waiting)
            await manager.stop()

    caplog.set_level(logging.INFO, logger="segsvc.jobs")
    result_a, result_b, served = asyncio.run(scenario())
    monkeypatch.undo()
    assert result_a["promoted"] and not result_b["promoted"], (result_a["verdict"], result_b["verdict"])
    assert {result_a["version"], result_b["version"]} == {2, 3}
    assert served == result_a["version"]
    _assert_consistent(root, served, result_a, result_b)


def test_a_job_is_not_promoted_over_a_default_it_was_not_compared_with(tmp_path):
    """A (0.90) promotes v2; B (0.60), compared with v1 (0.50) like A, used to replace the better v2."""
    root = tmp_path / "repo"
    publish(root, NAME, seed=1)
    cand_a, cand_b = publish(tmp_path / "cand_a", NAME, seed=2), publish(tmp_path / "cand_b", NAME, seed=3)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], int]:
        manager = quiet_manager(root)
        await manager.start()
        try:
            runner = _runner(tmp_path, manager)
            result_a = await runner._publish(_run("jobA", 1), cand_a, _results(0.90, 0.50))
            result_b = await runner._publish(_run("jobB", 1), cand_b, _results(0.60, 0.50))
            return result_a, result_b, manager.default_version(NAME)
        finally:
            await manager.stop()

    result_a, result_b, served = asyncio.run(scenario())
    assert (result_a["version"], result_a["promoted"]) == (2, True), result_a["verdict"]
    assert (result_b["version"], result_b["promoted"]) == (3, False), result_b["verdict"]
    assert "the default moved from v1 to v2" in result_b["verdict"]
    assert served == 2
    _assert_consistent(root, served, result_a, result_b)
    repo = ModelRepository(root)
    assert gate.lineage_of(repo.version_dir(NAME, 3))["gate"] == result_b["verdict"]


def test_a_stale_job_without_a_pointer_pins_the_version_served_now(tmp_path):
    """No DEFAULT: v2 appeared (the newest is served) after B's evaluation began against v1. B is not
    promoted and pins v2, not the v1 it compared with, before its own v3 would become the newest."""
    root = tmp_path / "repo"
    publish(root, NAME, seed=1)
    publish(root, NAME, seed=2)
    cand_b = publish(tmp_path / "cand_b", NAME, seed=3)

    async def scenario() -> tuple[dict[str, Any], int]:
        manager = quiet_manager(root)
        await manager.start()
        try:
            assert manager.default_version(NAME) == 2
            result = await _runner(tmp_path, manager)._publish(_run("jobB", 1), cand_b, _results(0.90, 0.50))
            return result, manager.default_version(NAME)
        finally:
            await manager.stop()

    result, served = asyncio.run(scenario())
    assert (result["version"], result["promoted"]) == (3, False), result["verdict"]
    assert "the default moved from v1 to v2" in result["verdict"]
    assert served == 2
    _assert_consistent(root, served, result)


@pytest.mark.parametrize("moved", [False, True])
def test_a_job_that_published_before_a_crash_finishes_by_its_lineage(tmp_path, moved):
    """Restart after publishing, before DEFAULT was written: the version is found again, not published twice.

    Its own version (the newest, with no pointer) is not a move of the default; another job's promotion is.
    """
    root = tmp_path / "repo"
    publish(root, NAME, seed=1)
    cand_a = publish(tmp_path / "cand_a", NAME, seed=2)
    gate.publish_candidate(cand_a, root, NAME, {"job_id": "jobA"})  # v2, then the server died
    if moved:  # another job promoted v3 before this one resumed
        publish(root, NAME, seed=3)
        ModelRepository(root).set_default(NAME, 3)

    async def scenario() -> tuple[dict[str, Any], int]:
        manager = quiet_manager(root)
        await manager.start()
        try:
            result = await _runner(tmp_path, manager)._publish(_run("jobA", 1), cand_a, _results(0.90, 0.50))
            return result, manager.default_version(NAME)
        finally:
            await manager.stop()

    result, served = asyncio.run(scenario())
    assert result["version"] == 2
    assert ModelRepository(root).versions(NAME) == ([1, 2, 3] if moved else [1, 2])
    assert result["promoted"] is not moved, result["verdict"]
    assert served == (3 if moved else 2)
    _assert_consistent(root, served, result)
