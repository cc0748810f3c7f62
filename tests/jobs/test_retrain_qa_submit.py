"""A training request the trainer would refuse from its recipe alone is refused at submission, by the trainer's own
check (``python -m training --check``), with the trainer's message and no exception class name: unknown keys, values
out of range, an architecture or parameters that do not build, a device this server lacks, a sample limit of 0,
an index range its split cannot hold, an unknown augmentation preset."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from segsvc.data.synthetic import SyntheticConfig, write_synthetic_dataset
from segsvc.errors import InvalidArgument
from segsvc.inference.repository import ModelRepository
from segsvc.jobs.store import JobStore
from segsvc.jobs.training import TrainingConfig, TrainingRequest, TrainingRunner, apply_event
from segsvc.jobs.trainspec import MAX_EPOCHS, PROJECT_ROOT

RECIPE = PROJECT_ROOT / "training" / "recipes" / "synthetic-quick.yaml"

REFUSED = [
    (("train.bogus=1",), "auto", "train.bogus: unknown key; valid keys here: epochs, "),
    (("model.arch=nosuch",), "auto", "unknown model architecture 'nosuch'; valid names: "),
    (("model.params.depth=40",), "auto", "U-Net depth must be between 1 and 6, got 40"),
    (("optim.lr=-1",), "auto", "optim.lr must be >= 0, got -1.0"),
    (("data.train_limit=0",), "auto", "data.train_limit must be >= 1 or null, got 0"),
    # what the folders and the augmentation refuse: 6 training and 2 validation samples
    (("data.train_indices=[0,100]",), "auto",
     "data.train_indices / data.train_limit: index range [0, 100) does not fit a split of 6 samples"),
    (("data.val_indices=[1,3]",), "auto",
     "data.val_indices / data.val_limit: index range [1, 3) does not fit a split of 2 samples"),
    (("data.preset=streets",), "auto", "unknown augmentation preset 'streets'; valid: "),
    pytest.param((), "cuda", "train.device=cuda but no CUDA device is available; use train.device=cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")),
]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "shapes"
    write_synthetic_dataset(folder, 8, SyntheticConfig(size_hw=(32, 32)), seed=0, val_fraction=0.25)
    return folder / "dataset.yaml"


@pytest.fixture
def store(tmp_path: Path):
    s = JobStore(tmp_path / "jobs.sqlite")
    yield s
    s.close()


def _runner(tmp_path: Path, store: JobStore, spec_path: Path) -> TrainingRunner:
    record = SimpleNamespace(name="shapes", sha256="f" * 64, spec_path=spec_path)

    def get(name: str) -> SimpleNamespace:
        if name != "shapes":
            raise InvalidArgument(f"no dataset named {name!r}")
        return record

    datasets = SimpleNamespace(get=get, check_unchanged=get, guard_deletes=lambda users: None)
    manager = SimpleNamespace(repository=ModelRepository(tmp_path / "repo"))
    config = TrainingConfig(state_dir=tmp_path / "state")
    return TrainingRunner(store, manager, datasets, config)  # type: ignore[arg-type]


@pytest.mark.parametrize("overrides, device, message", REFUSED)
def test_what_the_trainer_refuses_is_refused_at_submission(tmp_path, store, shapes, overrides, device, message):
    runner = _runner(tmp_path, store, shapes)
    request = TrainingRequest(dataset="shapes", recipe="synthetic-quick", overrides=overrides, device=device,
                              epochs=1)
    with pytest.raises(InvalidArgument) as caught:
        asyncio.run(runner.submit(request))
    said = str(caught.value)
    assert said.startswith(message), said
    assert "Error:" not in said and "InvalidArgument" not in said and str(tmp_path) not in said
    assert store.list() == []  # no job
    assert [p.name for p in (tmp_path / "state" / "training").iterdir()] == []  # the check's folder is gone


def test_a_valid_request_is_accepted_after_the_check(tmp_path, store, shapes):
    runner = _runner(tmp_path, store, shapes)
    request = TrainingRequest(dataset="shapes", recipe="synthetic-quick", overrides=("data.train_limit=4",),
                              device="cpu", max_time_min=2)
    job = asyncio.run(runner.submit(request))
    assert [j.id for j in store.list()] == [job.id] and job.progress == {"phase": "queued"}


def test_a_time_budget_never_announces_its_epoch_cap():
    """A budget job's ``train.epochs`` is a cap (``MAX_EPOCHS``), no epoch count: the trainer's start event says
    none before an epoch is timed, and after a resume what its epoch events said (``planned_epochs``), so the
    job's metadata never shows ``epoch 18/100000``."""
    from training.checkpoint import RunState
    from training.config import load_config
    from training.distributed import DistEnv
    from training.train import announced_epochs

    cfg = load_config(RECIPE, TrainingRequest(dataset="shapes", recipe="synthetic-quick",
                                              max_time_min=2).budget_overrides())
    assert cfg.train.epochs == MAX_EPOCHS
    env = DistEnv(0, 1, torch.device("cpu"))
    run = RunState()
    assert announced_epochs(cfg, run, env) is None  # a first start: nothing timed yet
    run.history = [{"epoch": i + 1} for i in range(18)]
    run.epoch, run.elapsed_s = 18, 18 * 2.0  # 2 s an epoch, 84 s of the 120 left: 42 more
    assert announced_epochs(cfg, run, env) == 60  # a resumed start: the budget's estimate

    progress: dict = {}  # the job's metadata, from the events of a run killed after epoch 18 and resumed
    for event in ({"event": "start", "epochs": None, "steps_per_epoch": 10, "start_epoch": 0},
                  {"event": "epoch", "epoch": 18, "epochs": 61, "train_loss": 0.4},
                  {"event": "start", "epochs": 60, "steps_per_epoch": 10, "start_epoch": 18}):
        apply_event(progress, event)
        assert progress.get("epochs", 0) != MAX_EPOCHS
    assert (progress["epoch"], progress["epochs"]) == (18, 60)
    assert announced_epochs(load_config(RECIPE, ["train.epochs=3"]), RunState(), env) == 3  # an epoch budget
