"""TrainingRunner's submission and start-up without a trainer: idempotent retries and a cancel landing at start."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from segsvc.errors import AlreadyExists, NotFound
from segsvc.inference.repository import ModelRepository
from segsvc.jobs import training
from segsvc.jobs.store import Job, JobStore
from segsvc.jobs.training import TrainingRunner
from segsvc.jobs.trainspec import TrainingConfig, TrainingRequest
from tests.jobs.conftest import cancel_inside_start, run_to_end

REQUEST = TrainingRequest(dataset="shapes", recipe="synthetic-quick", epochs=1)


class _Datasets:
    def get(self, name: str) -> SimpleNamespace:
        if name != "shapes":
            raise NotFound(f"no dataset named {name!r}")
        return SimpleNamespace(name=name, sha256="f" * 64, spec_path="/d/shapes.yaml")

    def check_unchanged(self, name_or_hash: str) -> SimpleNamespace:
        return self.get("shapes")

    def guard_deletes(self, users) -> None:  # type: ignore[no-untyped-def]
        pass


@pytest.fixture
def store(tmp_path: Path):
    s = JobStore(tmp_path / "jobs.sqlite")
    yield s
    s.close()


def _runner(tmp_path: Path, store: JobStore) -> TrainingRunner:
    manager = SimpleNamespace(repository=ModelRepository(tmp_path / "repo"))
    config = TrainingConfig(state_dir=tmp_path / "state", check_recipes=False)  # stand-in datasets: no check
    return TrainingRunner(store, manager, _Datasets(), config)  # type: ignore[arg-type]


def _both_miss_the_first_lookup(monkeypatch: pytest.MonkeyPatch, store: JobStore) -> None:
    """Neither of two concurrent submissions finds the other's job: both go on to insert (a client retry)."""
    barrier = threading.Barrier(2, timeout=60)
    lookups = iter(range(2))  # the first lookup of each; any later one goes straight through
    real_find = store.find

    def find(kind: str, request_id: str) -> Job | None:
        job = real_find(kind, request_id)
        if next(lookups, None) is not None:
            barrier.wait()
        return job

    monkeypatch.setattr(store, "find", find)


def _submit_twice(runner: TrainingRunner, first: TrainingRequest, second: TrainingRequest) -> list:
    async def main() -> list:
        return await asyncio.gather(runner.submit(first, "retry-1"), runner.submit(second, "retry-1"),
                                    return_exceptions=True)

    return asyncio.run(main())


def test_a_concurrent_identical_retry_gets_the_same_job(tmp_path, store, monkeypatch):
    _both_miss_the_first_lookup(monkeypatch, store)
    results = _submit_twice(_runner(tmp_path, store), REQUEST, REQUEST)
    assert all(isinstance(r, Job) for r in results), results
    assert results[0].id == results[1].id
    assert [j.id for j in store.list()] == [results[0].id]
    assert store.get(results[0].id).progress == {"phase": "queued"}


def test_a_concurrent_different_request_with_the_same_id_is_refused(tmp_path, store, monkeypatch):
    _both_miss_the_first_lookup(monkeypatch, store)
    other = TrainingRequest(dataset="shapes", recipe="synthetic-quick", epochs=2)
    results = _submit_twice(_runner(tmp_path, store), REQUEST, other)
    jobs = [r for r in results if isinstance(r, Job)]
    refused = [r for r in results if isinstance(r, AlreadyExists)]
    assert len(jobs) == 1 and len(refused) == 1, results
    assert "retry-1" in str(refused[0])
    assert [j.id for j in store.list()] == [jobs[0].id]


def test_a_retry_whose_spec_resolved_differently_still_gets_the_first_job(tmp_path, store, monkeypatch):
    """The same request resolved twice can differ (a base model's default moved in between): the first job wins."""
    _both_miss_the_first_lookup(monkeypatch, store)
    real_resolve = training.resolve_submission
    calls = iter(range(2))

    def resolve(*args):  # type: ignore[no-untyped-def]
        return {**real_resolve(*args), "resolution": next(calls)}

    monkeypatch.setattr(training, "resolve_submission", resolve)
    results = _submit_twice(_runner(tmp_path, store), REQUEST, REQUEST)
    assert all(isinstance(r, Job) for r in results), results
    assert results[0].id == results[1].id and len(store.list()) == 1


def test_a_cancel_landing_between_start_and_registration_stops_the_job(tmp_path, store, monkeypatch):
    runner = _runner(tmp_path, store)
    seen: list[bool] = []

    async def train(run) -> Path:  # type: ignore[no-untyped-def]
        seen.append(run.cancel.is_set())
        if run.cancel.is_set():
            raise training._Stop("CANCELLED", "cancelled before training")
        raise training._Stop("FAILED", "training began although the cancel was acknowledged")

    monkeypatch.setattr(runner, "_train", train)

    async def main() -> tuple[Job, Job]:
        acknowledged = cancel_inside_start(monkeypatch, store, runner, asyncio.get_running_loop())
        job = await runner.submit(REQUEST)
        final = await run_to_end(runner, job.id)
        return acknowledged[0], final

    acknowledged, final = asyncio.run(main())
    assert acknowledged.cancel_requested and acknowledged.state == "RUNNING"
    assert (final.state, final.error, seen) == ("CANCELLED", "cancelled before training", [True])


def test_a_relative_state_dir_reaches_the_trainer_as_absolute_paths(tmp_path, monkeypatch):
    """``segsvc serve --state-dir out/state`` started anywhere: the trainer runs in the project root, so every
    path on its command line must be absolute (it read ``out/state/training/<id>/recipe.yaml`` there)."""
    import argparse

    from segsvc.cli_train import training_config
    from segsvc.errors import SegsvcError
    from segsvc.jobs.trainspec import eval_argv

    spec_file = tmp_path / "shapes.yaml"
    spec_file.write_text("name: shapes\n")
    record = SimpleNamespace(name="shapes", sha256="f" * 64, spec_path=spec_file)
    datasets = SimpleNamespace(get=lambda name: record, check_unchanged=lambda name: record,
                               guard_deletes=lambda users: None)
    monkeypatch.chdir(tmp_path)
    config = training_config(argparse.Namespace(state_dir="out/state", max_training_jobs=1))
    config = dataclasses.replace(config, check_recipes=False)  # a stand-in dataset: no check at submission
    spawned: list[tuple[list[str], Path]] = []

    def spawn(argv, *, log_path, cwd=None, env=None, parent_death_signal=None):  # type: ignore[no-untyped-def]
        spawned.append((list(argv), Path(cwd)))
        raise SegsvcError("the test stops here")

    monkeypatch.setattr(training.GroupProcess, "spawn", spawn)
    store = JobStore(tmp_path / "jobs.sqlite")
    manager = SimpleNamespace(repository=ModelRepository(tmp_path / "repo"))
    runner = TrainingRunner(store, manager, datasets, config)  # type: ignore[arg-type]

    async def main() -> Job:
        job = await runner.submit(REQUEST)
        return await run_to_end(runner, job.id)

    try:
        final = asyncio.run(main())
    finally:
        store.close()
    assert final.state == "FAILED" and final.error == "the test stops here"
    [(argv, cwd)] = spawned
    assert cwd != tmp_path  # the trainer does not run where the server was started ...
    recipe = cwd / argv[argv.index("--config") + 1]
    assert recipe.is_file(), f"the trainer would look for {recipe}"  # ... yet finds its recipe
    sets = dict(argv[i + 1].split("=", 1) for i, arg in enumerate(argv) if arg == "--set")
    for key in ("data.spec", "output.runs_dir", "output.repo"):
        assert Path(json.loads(sets[key])).is_absolute(), (key, sets[key])
    assert config.state_dir == tmp_path / "out" / "state"  # resolved against where the server started
    root = runner.job_dir(final.id)
    evaluation = eval_argv(config, root / "candidate" / "m" / "1", str(spec_file), root / "eval" / "candidate-val",
                           "cpu")
    for flag in ("--model", "--data", "--out"):
        assert Path(evaluation[evaluation.index(flag) + 1]).is_absolute(), (flag, evaluation)


def test_a_server_without_the_trainer_s_dependencies_refuses_training_up_front(tmp_path, store, monkeypatch):
    """The server images lack albumentations: a job it accepted would die on import in `python -m training`.
    Looked up, never imported (the service does not import the trainer)."""
    import importlib.util

    from segsvc.errors import FailedPrecondition

    real_find_spec = importlib.util.find_spec
    looked_up: list[str] = []

    def find_spec(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        looked_up.append(name)
        return None if name == "albumentations" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    runner = _runner(tmp_path, store)
    with pytest.raises(FailedPrecondition, match="this server cannot train: the trainer's dependency albumentations "
                                                 "is not installed; run training in the trainer image"):
        asyncio.run(runner.submit(REQUEST, "no-trainer"))
    assert "albumentations" in looked_up
    assert store.list() == []


# -- a trainer that fails before its events begin: the job's reason is the trainer's own error ----------------
def _runner_with_spec(tmp_path: Path, store: JobStore, **config) -> TrainingRunner:  # type: ignore[no-untyped-def]
    spec_file = tmp_path / "data" / "shapes.yaml"
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    spec_file.write_text("name: shapes\n")
    record = SimpleNamespace(name="shapes", sha256="f" * 64, spec_path=spec_file)
    datasets = SimpleNamespace(get=lambda name: record, check_unchanged=lambda name: record,
                               guard_deletes=lambda users: None)
    manager = SimpleNamespace(repository=ModelRepository(tmp_path / "repo"))
    return TrainingRunner(store, manager, datasets,  # type: ignore[arg-type]
                          TrainingConfig(state_dir=tmp_path / "state", kill_grace_s=1.0,
                                         check_recipes=False, **config))


def test_a_mistyped_override_fails_the_job_with_the_trainer_s_own_error(tmp_path, store):
    """`--set data.crp=[64,64]`: the real trainer refuses the key before it writes any event; the job's
    reason is its error line ("did you mean 'crop'?"), not only its exit code, and names no server path."""
    runner = _runner_with_spec(tmp_path, store)
    request = TrainingRequest(dataset="shapes", recipe="synthetic-quick", overrides=("data.crp=[64,64]",), epochs=1,
                              device="cpu")

    async def main() -> Job:
        job = await runner.submit(request)
        return await run_to_end(runner, job.id, timeout_s=600)  # the real trainer imports torch first: slow when busy

    final = asyncio.run(main())
    assert final.state == "FAILED"
    assert final.error.startswith("training failed: data.crp: unknown key (did you mean 'crop'?)"), final.error
    assert "exited with code" not in final.error
    assert str(tmp_path) not in final.error and "/" not in final.error.split("valid keys")[0]
    assert len(final.error) <= len("training failed: ") + training.MAX_REASON_CHARS


def test_the_trainer_s_error_is_read_from_this_attempt_s_log_tail_scrubbed_and_clipped(tmp_path, store):
    """A stand-in trainer (the runner's `python`) writes 200 KB of output, then an error naming the job's
    recipe path and 1000 more characters: the reason names `<job>`, not the path, and is cut; an error line an
    earlier attempt left in train.log is not this attempt's reason."""
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\n"  # argv: -m training --config <job>/recipe.yaml ...
                    "head -c 200000 /dev/zero | tr '\\0' x; echo\n"
                    "echo \"training: error: data.crp: unknown key; recipe '$4' "
                    "$(head -c 1000 /dev/zero | tr '\\0' z)\"\n"
                    "echo 'some trailing output'\n"
                    "exit 2\n")
    fake.chmod(0o755)
    runner = _runner_with_spec(tmp_path, store, python=str(fake))
    request = TrainingRequest(dataset="shapes", recipe="synthetic-quick", overrides=("data.crp=1",), epochs=1)

    async def main() -> Job:
        job = await runner.submit(request)
        log = runner.job_dir(job.id) / "train.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("training: error: a stale error of an earlier attempt\n")
        return await run_to_end(runner, job.id)

    final = asyncio.run(main())
    assert final.state == "FAILED"
    assert final.error.startswith("training failed: data.crp: unknown key; recipe '<job>/recipe.yaml' zzz"), \
        final.error[:200]
    assert str(tmp_path) not in final.error and "stale" not in final.error
    assert final.error.endswith("...") and len(final.error) <= len("training failed: ") + training.MAX_REASON_CHARS


def test_the_trainer_s_error_line_is_looked_for_only_in_the_log_s_tail(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("training: error: long ago\n" + "x" * (training.LOG_TAIL_BYTES + 10) + "\nthe end\n")
    assert training.trainer_error(log) is None  # beyond the tail: not read (and a cut first line is no match)
    log.write_text("[rank0]: training: error: data.crp: unknown key\nE0101 torchrun: child failed\n")
    assert training.trainer_error(log) == "data.crp: unknown key"
    assert training.trainer_error(log, start=log.stat().st_size) is None
    assert training.trainer_error(tmp_path / "missing.log") is None


def test_a_trainer_whose_group_cannot_be_stored_is_stopped_before_it_runs(tmp_path, store, monkeypatch):
    """The trainer's group id is stored before the trainer may run. When that write fails (a full disk), the
    job fails and the held child is stopped: it used to go on training with no record a restart could find."""
    import sqlite3
    import sys

    ran = tmp_path / "ran"
    started: list[training.GroupProcess] = []
    real_spawn, real_set_progress = training.GroupProcess.spawn, store.set_progress

    def spawn(argv, *, log_path, cwd=None, env=None, parent_death_signal=None):  # type: ignore[no-untyped-def]
        started.append(real_spawn([sys.executable, "-c", "import sys; open(sys.argv[1], 'x').close()", str(ran)],
                                  log_path=log_path))
        return started[-1]

    def set_progress(job_id: str, progress: dict) -> None:
        if "pgid" in progress:
            raise sqlite3.OperationalError("disk I/O error")
        real_set_progress(job_id, progress)

    spec_file = tmp_path / "shapes.yaml"
    spec_file.write_text("name: shapes\n")
    record = SimpleNamespace(name="shapes", sha256="f" * 64, spec_path=spec_file)
    datasets = SimpleNamespace(get=lambda name: record, check_unchanged=lambda name: record,
                               guard_deletes=lambda users: None)
    monkeypatch.setattr(training.GroupProcess, "spawn", spawn)
    monkeypatch.setattr(store, "set_progress", set_progress)
    manager = SimpleNamespace(repository=ModelRepository(tmp_path / "repo"))
    config = TrainingConfig(state_dir=tmp_path / "state", check_recipes=False)  # stand-in datasets: no check
    runner = TrainingRunner(store, manager, datasets, config)  # type: ignore[arg-type]

    async def main() -> Job:
        job = await runner.submit(REQUEST)
        return await run_to_end(runner, job.id)

    final = asyncio.run(main())
    assert final.state == "FAILED" and final.error == "internal error; see the server log"
    [child] = started
    child.popen.wait(timeout=60)  # stopped already; one left running would end after creating the file
    assert not ran.exists(), "the trainer ran although its group was never stored"
