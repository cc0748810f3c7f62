"""Retraining through the service, fourth review: a torchrun worker killed on its own, the restarts a client sees,
a switch that raised after the server already served the new version, and a resumed job's failed DEFAULT write.

The trainer tests run ``_train`` with the real ``torch.distributed.run`` over a stand-in ``training`` package in
the trainer's working folder (a few lines of Python that kill a worker or write a candidate, no model trains). The
promotion tests publish into a real repository served by a real ``ModelManager`` (``_publish`` with fixed
evaluation results, no child process).
"""

from __future__ import annotations

import asyncio
import errno
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from segsvc.inference.manager import ModelManager
from segsvc.inference.repository import ModelRepository
from segsvc.jobs import gate, training
from segsvc.jobs.training import TrainingRunner, _Run, _Stop
from segsvc.jobs.trainspec import TrainingConfig
from segsvc.server.training import training_metadata
from tests.inference.managers import quiet_manager
from tests.jobs.test_retrain_review3 import _gate_run, _publish_served, _Store, _train_with
from tests.jobs.test_training_gate_races import _served_after_restart
from tests.server.conftest import publish

NAME = "m"

# -- 1. a torchrun worker killed on its own --------------------------------------------------------------------
FAKE_WORKER = '''
"""Stand-in for ``python -m training`` under torchrun: while deaths.txt counts down, rank 1 writes a checkpoint and
dies by SIGKILL (rank 0 waits for it: the agent stops it); -1: rank 1 fails by itself."""
import json, os, signal, sys, time
from pathlib import Path

args = sys.argv[1:]
sets = dict(args[i + 1].split("=", 1) for i, a in enumerate(args) if a == "--set")
run_dir = Path(json.loads(sets["output.runs_dir"])) / "r" / "run"
rank = int(os.environ["LOCAL_RANK"])
done = Path(f"rank1-done-{os.environ['TORCHELASTIC_RESTART_COUNT']}-{os.getppid()}")
if rank == 0:
    with open("starts.txt", "a") as f:
        f.write("resume\\n" if "--resume" in args else "fresh\\n")
    deadline = time.monotonic() + 300
    while not done.exists():  # rank 1 lives on, or dies and the agent stops this one
        if time.monotonic() > deadline:
            sys.exit(5)
        time.sleep(0.05)
    version = Path(json.loads(sets["output.repo"])) / sets["output.model_name"] / "1"
    version.mkdir(parents=True)
    (version / "manifest.json").write_text("{}")
    sys.exit(0)
deaths = Path("deaths.txt")
left = int(deaths.read_text())
if left == -1:
    print("training: error: rank 1 failed by itself", flush=True)
    sys.exit(3)
if left > 0:
    deaths.write_text(str(left - 1))
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints" / "last.pt").write_text("epoch 1")
    os.kill(os.getpid(), signal.SIGKILL)
done.touch()
'''


def _train_under_torchrun(tmp_path: Path, deaths: int) -> tuple[Path | _Stop, dict[str, Any], list[str]]:
    """``_train`` of one job on 2 torchrun processes whose rank 1 dies ``deaths`` times before it finishes (-1: it
    fails by itself); what it returned (or the ``_Stop`` it raised), the stored metadata and how each start began."""
    return _train_with(tmp_path, deaths, trainer=FAKE_WORKER, nproc=2, kill_grace_s=30)


def test_a_torchrun_worker_killed_on_its_own_resumes_from_the_checkpoint_like_a_killed_trainer(tmp_path):
    """torchrun's agent exits 1 when a worker dies: a worker killed by the OOM killer (the likeliest victim: it
    holds the memory) used to fail the job ("the trainer exited with code 1"), while a killed agent was resumed."""
    outcome, progress, starts = _train_under_torchrun(tmp_path, deaths=1)
    assert isinstance(outcome, Path), outcome
    assert starts == ["fresh", "resume"]
    assert (progress["attempts"], progress["trainer_restarts"]) == (2, 1)
    death = progress["last_trainer_death"]
    assert "rank 1" in death and "killed by signal 9 (SIGKILL)" in death, death


def test_a_torchrun_worker_that_fails_by_itself_fails_the_job_and_is_not_restarted(tmp_path):
    outcome, progress, starts = _train_under_torchrun(tmp_path, deaths=-1)
    assert isinstance(outcome, _Stop) and outcome.state == "FAILED"
    assert "rank 1 failed by itself" in str(outcome), outcome
    assert starts == ["fresh"] and "trainer_restarts" not in progress


def test_a_worker_death_counts_against_the_trainers_restart_limit(tmp_path, monkeypatch):
    """One budget for both: the trainer's restarts already used up, a dead worker fails the job saying so."""
    monkeypatch.setattr(training, "_TRAINER", training._Rerun("trainer", 0, "the trainer", "training",
                                                                "from its checkpoint"))
    outcome, progress, starts = _train_under_torchrun(tmp_path, deaths=1)
    assert isinstance(outcome, _Stop) and outcome.state == "FAILED"
    assert "rank 1" in str(outcome) and "killed by signal 9" in str(outcome), outcome
    assert "restarted 0 times" in str(outcome) and starts == ["fresh"]


def test_the_worker_death_is_read_from_torchruns_root_cause_in_this_attempts_log(tmp_path):
    log = tmp_path / "train.log"
    earlier = _root_cause(rank=1, exitcode=-9)
    log.write_text(earlier)
    assert training.worker_death(log) == (1, 9)
    assert training.worker_death(log, start=len(earlier)) is None  # an earlier attempt's death is not this one's
    with open(log, "a") as f:
        f.write(_root_cause(rank=0, exitcode=1))
    assert training.worker_death(log, start=len(earlier)) is None  # a worker's own failure: no signal
    # the workers' own output, prefixed with their rank by torchrun, is not the agent's report even when it reads so
    log.write_text("".join(f"[rank1]: {line}\n" for line in _root_cause(rank=1, exitcode=-9).splitlines()))
    assert training.worker_death(log) is None


def _root_cause(rank: int, exitcode: int) -> str:
    """The end of torchrun's ChildFailedError report, as ``torch.distributed.elastic`` formats it."""
    signal_part = " (SIGKILL)" if exitcode == -9 else ""
    return ("torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
            "============================================================\ntraining FAILED\n"
            "------------------------------------------------------------\nFailures:\n  <NO_OTHER_FAILURES>\n"
            "------------------------------------------------------------\nRoot Cause (first observed failure):\n"
            f"[0]:\n  time      : 2026-11-25_04:00:00\n  host      : h\n  rank      : {rank} (local_rank: {rank})\n"
            f"  exitcode  : {exitcode} (pid: 4242){signal_part}\n  error_file: <N/A>\n"
            "  traceback : Signal 9 (SIGKILL) received by PID 4242\n"
            "============================================================\n")


# -- 2. the restarts in the metadata ---------------------------------------------------------------------------
def test_the_metadata_shows_how_often_the_trainer_and_the_evaluations_were_restarted():
    """``trainer_restarts`` was stored with the job but never reached the client."""
    job = SimpleNamespace(
        id="j1", kind="train", state="RUNNING", finished=False, request_id=None, cancel_requested=False,
        progress={"phase": "training", "attempts": 3, "trainer_restarts": 2, "eval_restarts": 1},
        spec={"dataset": {"name": "d", "sha256": "0" * 64}, "model_name": NAME, "recipe_name": "r", "base": None},
        created_at=1.0, started_at=2.0, updated_at=3.0, finished_at=None,
    )
    metadata = training_metadata(job)  # type: ignore[arg-type]
    assert (metadata.attempts, metadata.trainer_restarts, metadata.eval_restarts) == (3, 2, 1)
    job.progress = {"phase": "training", "attempts": 1}
    assert training_metadata(job).trainer_restarts == 0  # type: ignore[arg-type]


# -- 3. a switch that raised after the server already served the new version -----------------------------------
def test_a_refresh_that_raises_after_switching_reports_the_version_served_not_a_load_failure(tmp_path):
    """``refresh_default`` switched to v2 and then raised: the job said "version 2 does not load" and put DEFAULT
    back on v1, while this server served v2 (and a restarted one v1)."""

    def switch_then_fail(manager: ModelManager) -> None:
        real = manager.refresh_default

        async def refresh_default(name: str) -> int:
            await real(name)
            raise OSError(errno.EIO, "Input/output error")

        manager.refresh_default = refresh_default  # type: ignore[method-assign]

    root = tmp_path / "repo"
    publish(root, NAME, seed=1)
    candidate = publish(tmp_path / "cand", NAME, seed=2)
    results = {"candidate": {"val": {"miou": 0.9}}, "default": {"val": {"miou": 0.5}}}
    result, served = _publish_served(root, tmp_path / "state", candidate, results, 1, switch_then_fail)
    assert (result["version"], served) == (2, 2)
    assert result["promoted"] is True and "does not load" not in result["verdict"], result["verdict"]
    assert ModelRepository(root).default_version(NAME) == 2
    assert asyncio.run(_served_after_restart(root)) == 2


# -- 4. a resumed job whose version was published before the promotion pin, and whose DEFAULT write fails -------
def _resumed_promotion(tmp_path: Path, served_before: int, read_only: bool = False, candidate_miou: float = 0.9,
                       load_then_fail: bool = False) -> tuple[dict[str, Any], int]:
    """A gate job that beat v1 published v2 before a crash, with no DEFAULT pointer (a server from before the
    promotion pin); resumed, its DEFAULT write of v2 fails (a full disk; ``read_only``: every write fails). The
    server serves ``served_before`` when the job resumes; with ``load_then_fail`` its ``refresh_default`` loads the
    newest version and then raises. The job's result and the version the running server then serves."""
    root = tmp_path / "repo"
    publish(root, NAME, seed=1)
    candidate = publish(tmp_path / "cand", NAME, seed=2)
    results = {"candidate": {"val": {"miou": candidate_miou}}, "default": {"val": {"miou": 0.5}}}

    def publish_v2() -> None:
        gate.publish_candidate(candidate, root, NAME, {"job_id": "jobA"})

    if served_before == 2:
        publish_v2()

    async def main() -> tuple[dict[str, Any], int]:
        manager = quiet_manager(root)
        await manager.start()
        try:
            if served_before == 1:
                publish_v2()  # seen by no poll yet
            real = manager.repository.set_default

            def set_default(name: str, version: int | None) -> None:
                if version == 2 or read_only:
                    raise OSError(errno.ENOSPC, "No space left on device")
                real(name, version)

            manager.repository.set_default = set_default  # type: ignore[method-assign]
            if load_then_fail:
                async def refresh_default(name: str) -> int:
                    await manager.load(name)
                    raise OSError(errno.EIO, "Input/output error")

                manager.refresh_default = refresh_default  # type: ignore[method-assign]
            assert manager.default_version(NAME) == served_before
            config = TrainingConfig(state_dir=tmp_path / "state")
            runner = TrainingRunner(_Store(), manager, None, config)  # type: ignore[arg-type]
            result = await runner._publish(_gate_run("jobA", 1), candidate, results)
            return result, manager.default_version(NAME)
        finally:
            await manager.stop()

    return asyncio.run(main())


def test_a_resumed_promotion_whose_default_write_fails_is_not_served_by_default_while_it_says_not_promoted(
        tmp_path):
    """Its v2, with no pointer, was the newest: the job said "not promoted" while every server that started (and
    this one's poller) served v2 by default."""
    result, served = _resumed_promotion(tmp_path, served_before=1)
    assert result["version"] == 2 and result["promoted"] is False, result["verdict"]
    assert "No space left on device" in result["verdict"]
    assert served == 1 and ModelRepository(tmp_path / "repo").default_version(NAME) == 1
    assert asyncio.run(_served_after_restart(tmp_path / "repo")) == 1


def test_a_resumed_promotion_whose_default_write_fails_moves_this_server_off_the_candidate_too(tmp_path):
    """The restarted server already served v2 as the newest version: once the job pins v1 and says "not
    promoted", this server follows the pin instead of serving v2 until its next poll."""
    result, served = _resumed_promotion(tmp_path, served_before=2)
    assert result["version"] == 2 and result["promoted"] is False, result["verdict"]
    assert served == 1 and ModelRepository(tmp_path / "repo").default_version(NAME) == 1
    assert asyncio.run(_served_after_restart(tmp_path / "repo")) == 1


def test_a_resumed_promotion_into_a_repository_that_takes_no_write_says_promoted_and_serves_it(tmp_path):
    """Neither the pin nor the promotion can be written: v2, the newest with no pointer, is the default of every
    server that starts. The job used to say "not promoted" while this server kept v1 until its next poll."""
    result, served = _resumed_promotion(tmp_path, served_before=1, read_only=True)
    assert (result["version"], result["promoted"], served) == (2, True, 2), result["verdict"]
    assert ModelRepository(tmp_path / "repo").default_version(NAME) is None
    assert asyncio.run(_served_after_restart(tmp_path / "repo")) == 2


def test_a_resumed_job_the_gate_turned_down_whose_pin_fails_says_its_version_is_served_not_that_none_was_published(
        tmp_path):
    """Its v2 was published before the crash: a pin that could not be written failed the job with "nothing was
    published" while v2, the newest with no pointer, was what every server served by default."""
    result, served = _resumed_promotion(tmp_path, served_before=2, read_only=True, candidate_miou=0.4)
    assert (result["version"], result["promoted"], served) == (2, False, 2), result["verdict"]
    verdict = result["verdict"]
    assert verdict.startswith("not promoted: mIoU does not beat") and "No space left on device" in verdict, verdict
    assert "version 2, the newest, is served by default" in verdict, verdict
    assert asyncio.run(_served_after_restart(tmp_path / "repo")) == 2


def test_a_resumed_job_the_gate_turned_down_moves_this_server_off_its_version_once_pinned(tmp_path):
    """Its v2, published before the crash with no pointer, was what the restarted server served as the newest: the
    pin to v1 was written, but this server went on serving v2, which the job says is not promoted, until a poll."""
    result, served = _resumed_promotion(tmp_path, served_before=2, candidate_miou=0.4)
    assert (result["version"], result["promoted"]) == (2, False), result["verdict"]
    assert served == 1 and ModelRepository(tmp_path / "repo").default_version(NAME) == 1


def test_a_refresh_that_raises_after_serving_the_newest_version_with_no_pointer_says_promoted(tmp_path):
    """As with a DEFAULT written: a refresh that raised once this server served the job's version (the newest, no
    pointer) made the job say "not promoted" about the version served by default."""
    result, served = _resumed_promotion(tmp_path, served_before=1, read_only=True, load_then_fail=True)
    assert (result["version"], result["promoted"], served) == (2, True, 2), result["verdict"]
    assert asyncio.run(_served_after_restart(tmp_path / "repo")) == 2


# -- other: an evaluation that exits 0 without its metrics -----------------------------------------------------
def test_an_evaluation_that_exits_0_without_metrics_says_so_not_exit_code_0(tmp_path):
    """It said "evaluating the candidate on val failed (exit code 0)": a contradiction to read."""
    config = TrainingConfig(state_dir=tmp_path / "state", workdir=tmp_path, kill_grace_s=5)
    manager = SimpleNamespace(repository=ModelRepository(tmp_path / "repo"))
    runner = TrainingRunner(_Store(), manager, None, config)  # type: ignore[arg-type]
    run = _Run(SimpleNamespace(id="job1", kind="train", spec={}))

    async def main() -> _Stop | None:
        try:
            await runner._run_eval(run, [sys.executable, "-c", "pass"], tmp_path / "out", "candidate", "val")
        except _Stop as stop:
            return stop
        return None

    stop = asyncio.run(main())
    assert stop is not None and stop.state == "FAILED"
    assert "exit code" not in str(stop) and "without writing its metrics" in str(stop), stop
    assert "eval_restarts" not in run.progress
