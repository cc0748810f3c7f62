"""Training jobs, fourth review: a cancel before the job starts, evaluation children killed on their own, a cancel
of a job resumed after a restart, and a promotion whose DEFAULT cannot be written.

No model trains: the trainer and ``segsvc eval`` children are stand-ins written into the children's working folder
(``python -m training`` and ``python -m segsvc`` find them there first), a few lines that record each start and
die by SIGKILL or write what the real ones would. Promotions publish into a real repository served by a real
``ModelManager``.
"""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from segsvc.inference.repository import ModelRepository
from segsvc.jobs import training
from segsvc.jobs.store import Job, JobStore
from segsvc.jobs.training import TrainingRunner, _Run, _Stop
from segsvc.jobs.trainspec import TrainingConfig, TrainingRequest
from tests.inference.managers import quiet_manager
from tests.jobs.conftest import run_to_end
from tests.jobs.test_retrain_review3 import _Datasets, _gate_run, _publish_served, _Store
from tests.jobs.test_training_gate_races import _served_after_restart
from tests.server.conftest import publish

NAME = "m"
WAIT_S = 60  # an upper bound for what happens at once; only a hang reaches it


def _spec(spec_path: Path) -> dict[str, Any]:
    request = TrainingRequest(dataset="shapes", recipe="r", epochs=1, device="cpu")
    dataset = {"name": "shapes", "sha256": "ab" * 32, "spec_path": str(spec_path)}
    return {"request": request.to_dict(), "dataset": dataset, "eval_sets": {"val": dataset}, "base": None,
            "recipe_name": "r", "recipe_text": "name: r\n", "model_name": NAME, "run_dir": "r/run"}


def _dataset_spec(tmp_path: Path) -> Path:
    spec_path = tmp_path / "shapes.yaml"
    spec_path.write_text("root: .\n")
    return spec_path


# -- 1. a cancel between the scheduler's pick and the job's start ----------------------------------------------
def test_a_job_cancelled_between_the_schedulers_pick_and_its_start_ends_quietly(tmp_path, monkeypatch, caplog):
    """``store.start`` of a job cancelled while QUEUED raises: the runner used to log it as a failure and try to
    finish the CANCELLED job as FAILED."""
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.submit(training.KIND, _spec(_dataset_spec(tmp_path)), [])
    manager = SimpleNamespace(repository=ModelRepository(tmp_path / "repo"))
    runner = TrainingRunner(store, manager, _Datasets(tmp_path / "shapes.yaml"),  # type: ignore[arg-type]
                            TrainingConfig(state_dir=tmp_path / "state"))
    start, finish = store.start, store.finish
    reached: list[asyncio.Future] = []  # set once the job's task has called store.start
    finished: list[str] = []

    def cancelled_first(job_id: str) -> Job:
        store.request_cancel(job_id)  # lands after the scheduler took the QUEUED job, before it starts it
        future = reached[0]
        future.get_loop().call_soon_threadsafe(future.set_result, None)
        return start(job_id)

    def recorded_finish(job_id: str, state: str, **kwargs: Any) -> Job:
        finished.append(state)
        return finish(job_id, state, **kwargs)

    monkeypatch.setattr(store, "start", cancelled_first)
    monkeypatch.setattr(store, "finish", recorded_finish)

    async def main() -> tuple[BaseException | None, Job]:
        reached.append(asyncio.get_running_loop().create_future())
        await runner.start()
        try:
            await asyncio.wait_for(reached[0], WAIT_S)
            (task,) = runner._tasks.values()  # the job's task: it called store.start
            await asyncio.wait({task})
            return task.exception(), await runner.wait(job.id, timeout_s=WAIT_S)
        finally:
            await runner.stop()

    with caplog.at_level("ERROR", logger="segsvc.jobs"):
        raised, waited = asyncio.run(main())
    final = store.get(job.id)
    store.close()
    assert raised is None, f"the job's task raised {raised!r}"
    assert (final.state, final.error, waited.state) == ("CANCELLED", None, "CANCELLED")
    assert finished == []
    assert not [r for r in caplog.records if r.levelname == "ERROR"], [r.getMessage() for r in caplog.records]


# -- 2. an evaluation child killed on its own --------------------------------------------------------------------
FAKE_EVAL = '''
"""Stand-in for ``python -m segsvc eval``: while deaths.txt counts down, die by SIGKILL; else write metrics.json."""
import json, os, signal, sys
from pathlib import Path

args = sys.argv[1:]
out = Path(args[args.index("--out") + 1])
with open("evals.txt", "a") as f:
    f.write("start\\n")
deaths = Path("deaths.txt")
left = int(deaths.read_text())
if left == -1:
    sys.exit(3)  # the evaluator's own failure: not a death to recover from
if left > 0:
    deaths.write_text(str(left - 1))
    os.kill(os.getpid(), signal.SIGKILL)
out.mkdir(parents=True, exist_ok=True)
(out / "metrics.json").write_text(json.dumps({"metrics": {"miou": 0.7}}))
'''


def _evaluate_with(tmp_path: Path, deaths: int) -> tuple[Any, dict[str, Any], int]:
    """``_evaluate`` of a job with no default to compare with, whose evaluation child dies ``deaths`` times
    (-1: it fails by itself); what it returned (or the ``_Stop`` it raised), the stored metadata, its starts."""
    workdir = tmp_path / "work"
    (workdir / "segsvc").mkdir(parents=True)
    (workdir / "segsvc" / "__init__.py").write_text("")
    (workdir / "segsvc" / "__main__.py").write_text(FAKE_EVAL)
    (workdir / "deaths.txt").write_text(str(deaths))
    spec_path = _dataset_spec(tmp_path)
    store = _Store()
    config = TrainingConfig(state_dir=tmp_path / "state", workdir=workdir, kill_grace_s=5)
    manager = SimpleNamespace(repository=ModelRepository(tmp_path / "repo"))
    runner = TrainingRunner(store, manager, _Datasets(spec_path), config)  # type: ignore[arg-type]
    run = _Run(SimpleNamespace(id="job1", kind="train", spec=_spec(spec_path)), progress={"default_version": 0})

    async def main() -> Any:
        try:
            return await runner._evaluate(run, tmp_path / "candidate" / NAME / "1")
        except _Stop as stop:
            return stop

    outcome = asyncio.run(main())
    return outcome, store.progress, len((workdir / "evals.txt").read_text().split())


def test_an_evaluation_killed_on_its_own_runs_again(tmp_path):
    """A kill -9 of the evaluation child alone (the server alive) used to fail the job: "exit code -9"."""
    outcome, progress, starts = _evaluate_with(tmp_path, deaths=2)
    assert outcome == {"candidate": {"val": {"miou": 0.7}}, "default": {}}, outcome
    assert starts == 3
    assert progress["eval_restarts"] == 2 and "signal 9" in progress["last_eval_death"]


def test_an_evaluation_killed_more_often_than_the_limit_fails_the_job_saying_so(tmp_path):
    outcome, progress, starts = _evaluate_with(tmp_path, deaths=training.MAX_EVAL_RESTARTS + 1)
    assert isinstance(outcome, _Stop) and outcome.state == "FAILED", outcome
    assert "killed by signal 9" in str(outcome) and f"{training.MAX_EVAL_RESTARTS} times" in str(outcome)
    assert starts == training.MAX_EVAL_RESTARTS + 1
    assert progress["eval_restarts"] == training.MAX_EVAL_RESTARTS


def test_an_evaluation_that_fails_by_itself_is_not_run_again(tmp_path):
    outcome, progress, starts = _evaluate_with(tmp_path, deaths=-1)
    assert isinstance(outcome, _Stop) and "exit code 3" in str(outcome), outcome
    assert starts == 1 and "eval_restarts" not in progress


# -- 3. a cancel of a job resumed after a restart ----------------------------------------------------------------
FAKE_TRAINER = '''
"""Stand-in for ``python -m training``: records that it ran."""
with open("starts.txt", "a") as f:
    f.write("start\\n")
'''


@pytest.mark.parametrize("phase", ["training", "evaluating"])
def test_a_cancel_of_a_job_resumed_after_a_restart_starts_no_child(tmp_path, phase):
    """Cancelled while the server was down, mid-training or mid-evaluation: the resumed job used to start its
    trainer or evaluator (a new attempt, a process group, train.log) and only then see the cancel and stop it."""
    workdir = tmp_path / "work"
    (workdir / "training").mkdir(parents=True)
    (workdir / "training" / "__init__.py").write_text("")
    (workdir / "training" / "__main__.py").write_text(FAKE_TRAINER)
    spec_path = _dataset_spec(tmp_path)
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = store.submit(training.KIND, _spec(spec_path), [])
    store.start(job.id)
    store.set_progress(job.id, {"phase": phase, "attempts": 1, "epoch": 1, "default_version": 0})
    store.request_cancel(job.id)  # RUNNING: only the flag, read by the next server's runner
    manager = SimpleNamespace(repository=ModelRepository(tmp_path / "repo"))
    config = TrainingConfig(state_dir=tmp_path / "state", workdir=workdir, kill_grace_s=5)
    runner = TrainingRunner(store, manager, _Datasets(spec_path), config)  # type: ignore[arg-type]
    if phase == "evaluating":  # the trainer finished before the crash: its candidate is there
        version = runner.job_dir(job.id) / "candidate" / NAME / "1"
        version.mkdir(parents=True)
        (version / "manifest.json").write_text("{}")
    try:
        final = asyncio.run(run_to_end(runner, job.id))
    finally:
        store.close()
    said = "cancelled while training" if phase == "training" else "cancelled while evaluating the candidate"
    assert (final.state, final.error) == ("CANCELLED", said)
    assert final.progress["attempts"] == 1
    assert not (runner.job_dir(job.id) / "train.log").exists()
    assert not (workdir / "starts.txt").exists()


# -- 4. a promotion whose DEFAULT cannot be written --------------------------------------------------------------
def test_a_promotion_whose_default_cannot_be_written_leaves_the_old_default_served(tmp_path, monkeypatch):
    """No DEFAULT pointer, v1 served; the candidate beats it but writing DEFAULT = v2 fails (a full disk). The job
    said "not promoted" while, with no pointer, v2 was the newest version: served by every server that started."""
    root = tmp_path / "repo"
    publish(root, NAME, seed=1)
    candidate = publish(tmp_path / "cand", NAME, seed=2)
    results = {"candidate": {"val": {"miou": 0.9}}, "default": {"val": {"miou": 0.5}}}
    real_set_default = ModelRepository.set_default

    def set_default(repo: ModelRepository, name: str, version: int | None) -> None:
        if version == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_set_default(repo, name, version)

    monkeypatch.setattr(ModelRepository, "set_default", set_default)
    result, served = _publish_served(root, tmp_path / "state", candidate, results, 1)
    monkeypatch.undo()
    assert (result["version"], result["promoted"], served) == (2, False, 1), result["verdict"]
    assert "could not be written" in result["verdict"] and "No space left" in result["verdict"]
    assert ModelRepository(root).default_version(NAME) == 1
    assert asyncio.run(_served_after_restart(root)) == 1


def test_a_first_version_whose_default_cannot_be_written_is_served_and_said_promoted(tmp_path, monkeypatch):
    """A new model: nothing to pin, and the candidate is its only version, the default of every server that starts.
    The job said "not promoted" (its DEFAULT write failed) while a restarted server served it; this one did not."""
    root = tmp_path / "repo"
    root.mkdir()
    candidate = publish(tmp_path / "cand", NAME, seed=2)
    results: dict[str, dict[str, dict[str, float]]] = {"candidate": {"val": {"miou": 0.9}}, "default": {}}

    def set_default(repo: ModelRepository, name: str, version: int | None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ModelRepository, "set_default", set_default)
    result, served = _publish_served(root, tmp_path / "state", candidate, results, 0)
    monkeypatch.undo()
    assert (result["version"], result["promoted"], served) == (1, True, 1), result["verdict"]
    assert ModelRepository(root).default_version(NAME) is None
    assert asyncio.run(_served_after_restart(root)) == 1


def test_a_pin_that_cannot_be_written_fails_the_job_saying_why_and_publishes_nothing(tmp_path, monkeypatch):
    """Without its pin the candidate, once published, would be the newest version and served by default whatever
    the gate said; the raw OSError used to reach the job as "internal error; see the server log"."""
    root = tmp_path / "repo"
    publish(root, NAME, seed=1)
    candidate = publish(tmp_path / "cand", NAME, seed=2)
    results = {"candidate": {"val": {"miou": 0.9}}, "default": {"val": {"miou": 0.5}}}

    def set_default(repo: ModelRepository, name: str, version: int | None) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def main() -> Any:
        manager = quiet_manager(root)
        await manager.start()
        try:
            runner = TrainingRunner(_Store(), manager, None,  # type: ignore[arg-type]
                                    TrainingConfig(state_dir=tmp_path / "state"))
            try:
                return await runner._publish(_gate_run("jobA", 1), candidate, results)
            except _Stop as stop:
                return stop
        finally:
            await manager.stop()

    monkeypatch.setattr(ModelRepository, "set_default", set_default)
    outcome = asyncio.run(main())
    monkeypatch.undo()
    assert isinstance(outcome, _Stop) and outcome.state == "FAILED", outcome
    assert "No space left on device" in str(outcome) and "nothing was published" in str(outcome)
    assert str(tmp_path) not in str(outcome)
    assert ModelRepository(root).versions(NAME) == [1]
