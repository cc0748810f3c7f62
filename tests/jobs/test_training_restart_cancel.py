"""A cancel that reaches a training job after a restart, when its version was already published before the crash.

The job's trainer and evaluators are not run: its folder holds a finished candidate and both evaluations, as a
server killed while publishing leaves them, and the job resumes in a real ``JobStore`` against a real repository
served by a real ``ModelManager``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace

from segsvc.inference.repository import ModelRepository
from segsvc.jobs import gate
from segsvc.jobs.store import Job, JobStore
from segsvc.jobs.training import TrainingRunner
from segsvc.jobs.trainspec import TrainingConfig, TrainingRequest
from tests.inference.managers import quiet_manager
from tests.jobs.conftest import run_to_end
from tests.server.conftest import publish

NAME = "m"
DATASET = {"name": "shapes", "sha256": "f" * 64, "spec_path": "/nonexistent/shapes.yaml"}


class _Datasets:
    def get(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(name="shapes", sha256=DATASET["sha256"], spec_path=DATASET["spec_path"])

    check_unchanged = get

    def guard_deletes(self, users) -> None:  # type: ignore[no-untyped-def]
        pass


def _interrupted_job(tmp_path: Path, store: JobStore, runner: TrainingRunner, publish_before_crash: bool) -> Job:
    """A RUNNING job whose candidate (0.9 mIoU) beat v1 (0.5); with ``publish_before_crash`` the server died
    right after publishing it as v2, before DEFAULT and the job's outcome were written."""
    request = TrainingRequest(dataset="shapes", recipe="r", epochs=1)
    spec = {"request": request.to_dict(), "dataset": DATASET, "eval_sets": {"val": DATASET}, "base": None,
            "recipe_name": "r", "recipe_text": "name: r\n", "model_name": NAME, "run_dir": "r/run"}
    job, _ = store.submit("train", spec, [])
    store.start(job.id)
    store.set_progress(job.id, {"phase": "publishing", "default_version": 1, "datasets_rechecked": True,
                                "attempts": 1, "epoch": 1})
    root = runner.job_dir(job.id)
    candidate = publish(root / "candidate", NAME, seed=2)
    for who, miou in (("candidate", 0.9), ("default", 0.5)):
        out = root / "eval" / f"{who}-val"
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"metrics": {"miou": miou}}))
    if publish_before_crash:
        gate.publish_candidate(candidate, runner.manager.repository.root, NAME, {"job_id": job.id})
    return store.get(job.id)


def _resume_with_cancel(tmp_path: Path, publish_before_crash: bool) -> tuple[Job, int]:
    repo_root = tmp_path / "repo"
    publish(repo_root, NAME, seed=1)
    store = JobStore(tmp_path / "jobs.sqlite")

    async def main() -> tuple[Job, int]:
        manager = quiet_manager(repo_root)
        await manager.start()
        try:
            runner = TrainingRunner(store, manager, _Datasets(), TrainingConfig(state_dir=tmp_path / "state"))
            job = _interrupted_job(tmp_path, store, runner, publish_before_crash)
            await runner.cancel(job.id)  # asked for after the restart, before the job resumed
            final = await run_to_end(runner, job.id)
            return final, manager.default_version(NAME)
        finally:
            await manager.stop()

    try:
        return asyncio.run(main())
    finally:
        store.close()


def test_a_cancel_after_the_version_was_published_finishes_the_job_with_that_version(tmp_path):
    """Used to end CANCELLED ("cancelled before publishing") while its v2 stayed in the repository and, with no
    DEFAULT pointer, was served as the newest version: the Operation denied a version that was live."""
    final, served = _resume_with_cancel(tmp_path, publish_before_crash=True)
    assert final.state == "SUCCEEDED", (final.state, final.error)
    assert (final.result["version"], final.result["promoted"]) == (2, True), final.result["verdict"]
    assert ModelRepository(tmp_path / "repo").versions(NAME) == [1, 2]
    assert served == 2 and ModelRepository(tmp_path / "repo").default_version(NAME) == 2


def test_a_cancel_before_anything_was_published_still_cancels_and_publishes_nothing(tmp_path):
    final, served = _resume_with_cancel(tmp_path, publish_before_crash=False)
    assert (final.state, final.error) == ("CANCELLED", "cancelled before publishing")
    assert ModelRepository(tmp_path / "repo").versions(NAME) == [1]
    assert served == 1
