"""A dataset an unfinished training job uses cannot be deleted, and a job whose dataset is gone says which one.

These run the ``TrainingRunner`` against a real ``DatasetRegistry`` without a real
training run: the jobs stay QUEUED (the runner is not started), or the trainer is
a stand-in script, or the dataset is already gone so nothing trains.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest

from segsvc.datasets.registry import DatasetRegistry, DatasetsConfig
from segsvc.errors import FailedPrecondition
from segsvc.inference.repository import ModelRepository
from segsvc.jobs.store import Job, JobStore
from segsvc.jobs.training import TrainingRunner
from segsvc.jobs.trainspec import TrainingConfig, TrainingRequest
from tests.datasets.helpers import flat, synth
from tests.jobs.conftest import run_to_end

REQUEST = TrainingRequest(dataset="shapes", recipe="synthetic-quick", epochs=1)

# Stands in for ``python -m training``: ends its run as the trainer does when its data spec is bad,
# with the spec's path and its run folder in the reason (the trainer reports the exception as it is).
FAKE_TRAINER = """\
import json, os, sys
sets = dict(a.split("=", 1) for a in sys.argv if "=" in a)
spec, runs = json.loads(sets["data.spec"]), json.loads(sets["output.runs_dir"])
events = os.path.join(runs, os.environ["FAKE_RUN_DIR"], "events.jsonl")
os.makedirs(os.path.dirname(events), exist_ok=True)
with open(events, "w") as f:
    f.write(json.dumps({"event": "start", "epochs": 1}) + "\\n")
    f.write(json.dumps({"event": "end", "status": "failed",
                        "reason": f"DatasetError: {spec}: split 'val' is empty (run folder {runs})"}) + "\\n")
sys.exit(1)
"""


@pytest.fixture
def registry(tmp_path: Path):
    data = tmp_path / "data"
    synth(data / "shapes")
    flat(data / "other", ["a", "b", "c", "d"])
    reg = DatasetRegistry(DatasetsConfig(tmp_path / "state", data_root=data))
    reg.register("shapes", name="shapes")
    reg.register("other", name="other")
    yield reg
    reg.close()


@pytest.fixture
def store(tmp_path: Path):
    s = JobStore(tmp_path / "state" / "jobs.sqlite")
    yield s
    s.close()


def _runner(tmp_path: Path, store: JobStore, registry: DatasetRegistry, **config) -> TrainingRunner:
    manager = SimpleNamespace(repository=ModelRepository(tmp_path / "repo"))
    return TrainingRunner(store, manager, registry,  # type: ignore[arg-type]
                          TrainingConfig(state_dir=tmp_path / "state", kill_grace_s=1.0,
                                         check_recipes=False, **config))


def _run_one(runner: TrainingRunner, job: Job) -> Job:
    return asyncio.run(run_to_end(runner, job.id))


def test_a_dataset_a_queued_or_running_training_job_uses_is_not_deleted(tmp_path, store, registry):
    runner = _runner(tmp_path, store, registry)  # not started: its jobs stay where the test puts them
    queued = asyncio.run(runner.submit(REQUEST))
    running = asyncio.run(runner.submit(TrainingRequest(dataset="shapes", recipe="synthetic-quick", epochs=2)))
    store.start(running.id)
    shapes = registry.get("shapes")
    with pytest.raises(FailedPrecondition) as info:
        registry.delete("shapes")
    message = str(info.value)
    assert queued.id in message and running.id in message and "cancel them or wait" in message
    assert "shapes" in message and str(tmp_path) not in message
    assert registry.get("shapes") == shapes and shapes.spec_path.is_file()  # nothing was removed
    assert registry.delete("other").name == "other"  # a dataset no job uses goes as before
    store.request_cancel(queued.id)  # QUEUED: cancelled at once
    store.finish(running.id, "FAILED", error="stopped by the test")
    assert registry.delete(shapes.sha256[:12]) == shapes  # finished jobs do not hold it
    assert not shapes.spec_path.exists()


def test_a_golden_set_a_queued_job_evaluates_on_is_not_deleted(tmp_path, store, registry):
    flat(tmp_path / "data" / "golden", ["g1", "g2", "g3", "g4", "g5"])
    registry.register("golden", name="golden-synthetic-quick")
    job = asyncio.run(_runner(tmp_path, store, registry).submit(REQUEST))
    assert "golden" in job.spec["eval_sets"]
    with pytest.raises(FailedPrecondition, match=job.id):
        registry.delete("golden-synthetic-quick")


def test_a_job_whose_dataset_vanished_fails_naming_the_dataset_not_the_server_path(tmp_path, store, registry):
    runner = _runner(tmp_path, store, registry)
    job = asyncio.run(runner.submit(REQUEST))
    shapes = registry.get("shapes")
    # Gone behind the runner's back (a server without this check sharing the state folder, an operator).
    other = DatasetRegistry(DatasetsConfig(tmp_path / "state"))
    other.delete("shapes")
    other.close()
    final = _run_one(runner, job)
    assert final.state == "FAILED"
    assert "'shapes'" in final.error and shapes.sha256[:12] in final.error, final.error
    assert str(tmp_path) not in final.error and "spec.yaml" not in final.error, final.error


def test_a_trainer_failure_naming_server_paths_reaches_the_job_without_them(tmp_path, store, registry, monkeypatch):
    script = tmp_path / "fake-python"
    script.write_text(f"#!{sys.executable}\n{FAKE_TRAINER}")
    script.chmod(0o755)
    runner = _runner(tmp_path, store, registry, python=str(script))
    job = asyncio.run(runner.submit(REQUEST))
    monkeypatch.setenv("FAKE_RUN_DIR", job.spec["run_dir"])
    final = _run_one(runner, job)
    shapes = registry.get("shapes")
    assert final.state == "FAILED" and final.error.startswith("training failed: DatasetError:"), final.error
    assert "split 'val' is empty" in final.error
    assert f"dataset 'shapes' ({shapes.sha256[:12]})" in final.error, final.error
    assert str(tmp_path) not in final.error and os.sep + "state" + os.sep not in final.error, final.error


def test_a_failure_naming_the_base_model_or_the_repository_reaches_the_job_without_them(tmp_path, store, registry):
    """A fine-tune whose recipe does not fit its base model: the trainer names model.init_from, a folder of the
    model repository (the path reached the client before)."""
    runner = _runner(tmp_path, store, registry)
    job = asyncio.run(runner.submit(REQUEST))
    repo = tmp_path / "repo"
    job = dataclasses.replace(job, spec={**job.spec, "base": {"model": "m", "version": 1, "dir": str(repo / "m" / "1")}})
    text = runner._public(job, f"IncompatibleInit: model.init_from '{repo / 'm' / '1'}' was built with other params; "
                               f"{repo / 'other' / '2' / 'manifest.json'} does not exist")
    assert str(tmp_path) not in text, text
    assert "model.init_from '<model m:1>'" in text and "<model repository>/other/2/manifest.json" in text, text


# Stands in for ``python -m training``: says it ran (the job's reason), so a test sees whether the trainer started.
RAN_TRAINER = """\
import json, os, sys
sets = dict(a.split("=", 1) for a in sys.argv if "=" in a)
events = os.path.join(json.loads(sets["output.runs_dir"]), os.environ["FAKE_RUN_DIR"], "events.jsonl")
os.makedirs(os.path.dirname(events), exist_ok=True)
with open(events, "w") as f:
    f.write(json.dumps({"event": "start", "epochs": 1}) + "\\n")
    f.write(json.dumps({"event": "end", "status": "failed", "reason": "the stand-in trainer ran"}) + "\\n")
sys.exit(1)
"""


def _runner_with_stand_in(tmp_path: Path, store: JobStore, registry: DatasetRegistry) -> TrainingRunner:
    script = tmp_path / "fake-python"
    script.write_text(f"#!{sys.executable}\n{RAN_TRAINER}")
    script.chmod(0o755)
    return _runner(tmp_path, store, registry, python=str(script))


def test_a_registered_dataset_whose_file_now_links_outside_the_data_root_fails_the_job_before_training(
        tmp_path, store, registry, monkeypatch):
    """Registered in place (checked then), then val images replaced by links to a file outside the data root:
    the job fails at its start, naming the dataset, and no trainer reads the outside file."""
    runner = _runner_with_stand_in(tmp_path, store, registry)
    job = asyncio.run(runner.submit(REQUEST))
    monkeypatch.setenv("FAKE_RUN_DIR", job.spec["run_dir"])
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    val = sorted((tmp_path / "data" / "shapes" / "images" / "val").glob("*.png"))
    secret.write_bytes(val[0].read_bytes())
    for path in val:
        path.unlink()
        os.symlink(secret, path)
    final = _run_one(runner, job)
    assert (final.state, final.error) == ("FAILED", "dataset 'shapes' changed since it was registered (or a link "
                                                    "now leads outside the data root): register it again")
    assert not (runner.job_dir(job.id) / "train.log").exists()  # no child ever started


def test_a_registered_dataset_whose_content_changed_fails_the_job_and_an_unchanged_one_trains(
        tmp_path, store, registry, monkeypatch):
    runner = _runner_with_stand_in(tmp_path, store, registry)
    unchanged = asyncio.run(runner.submit(REQUEST))
    monkeypatch.setenv("FAKE_RUN_DIR", unchanged.spec["run_dir"])
    final = _run_one(runner, unchanged)
    assert (final.state, final.error) == ("FAILED", "training failed: the stand-in trainer ran")
    image = next((tmp_path / "data" / "shapes" / "images" / "train").glob("*.png"))
    image.write_bytes(image.read_bytes() + b"\0")  # still inside the data root, but not what was registered
    runner = _runner_with_stand_in(tmp_path, store, registry)  # a runner runs in one event loop
    changed = asyncio.run(runner.submit(TrainingRequest(dataset="shapes", recipe="synthetic-quick", epochs=2)))
    final = _run_one(runner, changed)
    assert final.state == "FAILED" and final.error.startswith("dataset 'shapes' changed since it was registered")


def _without_trainer(runner: TrainingRunner, monkeypatch: pytest.MonkeyPatch,
                     during_training: Callable[[], None] = lambda: None) -> list[str]:
    """Replace the runner's train, evaluate and publish phases (``during_training`` runs in the first); the ids
    of the jobs that reached publishing."""
    published: list[str] = []

    async def train(run):  # type: ignore[no-untyped-def]
        during_training()
        return Path("candidate")

    async def evaluate(run, candidate):  # type: ignore[no-untyped-def]
        return {"candidate": {}, "default": {}}

    async def publish(run, candidate, results):  # type: ignore[no-untyped-def]
        published.append(run.job.id)
        return {"verdict": "published"}

    monkeypatch.setattr(runner, "_train", train)
    monkeypatch.setattr(runner, "_evaluate", evaluate)
    monkeypatch.setattr(runner, "_publish", publish)
    return published


def _touch_a_training_image(tmp_path: Path) -> None:
    image = next((tmp_path / "data" / "shapes" / "images" / "train").glob("*.png"))
    image.write_bytes(image.read_bytes() + b"\0")  # still inside the data root, but not what was registered


def test_a_dataset_changed_while_the_job_trained_fails_it_and_nothing_is_published(tmp_path, store, registry,
                                                                                   monkeypatch):
    """The datasets were checked only when the trainer started: an image replaced during training went unseen,
    and the model was published with metrics for data it never saw. They are checked again before publishing."""
    runner = _runner(tmp_path, store, registry)
    job = asyncio.run(runner.submit(REQUEST))
    published = _without_trainer(runner, monkeypatch, lambda: _touch_a_training_image(tmp_path))
    final = _run_one(runner, job)
    assert final.state == "FAILED", final
    assert final.error == ("dataset 'shapes' changed since it was registered (or a link now leads outside the data "
                           "root): register it again; it changed while this job ran, so nothing was published")
    assert not published


def test_a_job_whose_datasets_stayed_as_registered_is_published(tmp_path, store, registry, monkeypatch):
    runner = _runner(tmp_path, store, registry)
    job = asyncio.run(runner.submit(REQUEST))
    published = _without_trainer(runner, monkeypatch)
    final = _run_one(runner, job)
    assert (final.state, final.result, published) == ("SUCCEEDED", {"verdict": "published"}, [job.id])


def test_a_job_restarted_after_its_recheck_passed_goes_on_to_publish(tmp_path, store, registry, monkeypatch):
    """The recheck passed, then the server died while publishing (the version may be in the repository, even
    the default). A change to the folder after that is not this job's: the restarted job finishes publishing
    (``_place`` finds its version again) instead of failing with 'nothing was published'."""
    runner = _runner(tmp_path, store, registry)
    job = asyncio.run(runner.submit(REQUEST))
    store.set_progress(job.id, {"datasets_rechecked": True})  # what the first run stored before publishing
    _touch_a_training_image(tmp_path)  # changed while the server was down
    published = _without_trainer(runner, monkeypatch)
    final = _run_one(runner, job)
    assert (final.state, published) == ("SUCCEEDED", [job.id]), final
