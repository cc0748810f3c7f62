"""The trainer's check at submission (``python -m training --check``) is bounded: a submission cancelled by its
client (a deadline) or past ``RECIPE_CHECK_TIMEOUT_S`` kills its check, with everything the check started, before
its slot is given back and its scratch folder removed; the check runs under a hard memory limit, and a model too
large for it is refused by the trainer in seconds, planned on the meta device, never built. The cancel tests use a
stand-in trainer that blocks until killed (it says when it runs through a FIFO); the size test the real trainer."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from segsvc.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument
from segsvc.inference.repository import ModelRepository
from segsvc.jobs import procgroup, trainspec
from segsvc.jobs.store import JobStore
from segsvc.jobs.training import TrainingConfig, TrainingRequest, TrainingRunner
from segsvc.jobs.trainspec import MAX_RECIPE_CHECKS, PROJECT_ROOT
from tests.jobs.test_retrain_qa_submit import shapes, store  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups and /proc are Linux's")

BOUND_S = 120.0  # generous: what a wait that never ends fails after
# Blocks until killed, having started a grandchild in its group; says "<its pid> <the grandchild's>" on the FIFO.
STAND_IN = """#!/bin/sh
sleep 600 &
echo "$$ $!" > {fifo}
wait
"""
REQUEST = TrainingRequest(dataset="shapes", recipe="synthetic-quick", device="cpu", epochs=1)


def _runner(tmp_path: Path, store: JobStore, spec_path: Path, python: str = sys.executable) -> TrainingRunner:
    record = SimpleNamespace(name="shapes", sha256="f" * 64, spec_path=spec_path)
    datasets = SimpleNamespace(get=lambda name: record, check_unchanged=lambda name: record,
                               guard_deletes=lambda users: None)
    manager = SimpleNamespace(repository=ModelRepository(tmp_path / "repo"))
    config = TrainingConfig(state_dir=tmp_path / "state", python=python)
    return TrainingRunner(store, manager, datasets, config)  # type: ignore[arg-type]


def _stand_in(tmp_path: Path) -> tuple[str, Path]:
    fifo = tmp_path / "started.fifo"
    os.mkfifo(fifo)
    script = tmp_path / "stand-in-python"
    script.write_text(STAND_IN.format(fifo=fifo))
    script.chmod(0o755)
    return str(script), fifo


async def _started(fifo: Path, count: int) -> list[int]:
    """The pids of the next ``count`` stand-ins to start (each writes one line; one read may get several)."""
    lines: list[str] = []
    while len(lines) < count:
        lines += (await asyncio.wait_for(asyncio.to_thread(fifo.read_text), BOUND_S)).splitlines()
    return [int(pid) for line in lines for pid in line.split()]


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, killed and not yet reaped by whoever adopted it, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:].split()[0] != "Z"


def _nothing_left(pids: list[int], runner: TrainingRunner, tmp_path: Path, store: JobStore) -> None:
    """No check process outlived its submission, every slot is back, no scratch folder or job is left."""
    assert [pid for pid in pids if _running(pid)] == []
    assert runner._checks._value == MAX_RECIPE_CHECKS
    assert _scratch(tmp_path) == [] and store.list() == []


def _scratch(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "state" / "training").iterdir())


def test_cancelled_submissions_leave_no_check_running_and_give_their_slots_back(tmp_path, store, shapes):
    """Four submissions at once: two checks run, two wait for a slot; all four are cancelled (their clients'
    deadline). Nothing the checks started runs on, both slots are free, no scratch folder is left."""
    python, fifo = _stand_in(tmp_path)
    runner = _runner(tmp_path, store, shapes, python)

    async def scenario() -> list[int]:
        tasks = [asyncio.create_task(runner.submit(REQUEST)) for _ in range(4)]
        pids = await _started(fifo, MAX_RECIPE_CHECKS)
        assert all(_running(pid) for pid in pids)
        assert runner._checks.locked()  # the other two wait
        for task in tasks:
            task.cancel()
        for task in tasks:
            with pytest.raises(asyncio.CancelledError):
                await task
        return pids

    pids = asyncio.run(scenario())
    _nothing_left(pids, runner, tmp_path, store)


def test_a_check_past_its_time_is_killed_and_the_submission_told_to_try_later(tmp_path, store, shapes, monkeypatch):
    python, fifo = _stand_in(tmp_path)
    runner = _runner(tmp_path, store, shapes, python)
    monkeypatch.setattr(trainspec, "RECIPE_CHECK_TIMEOUT_S", 2.0)  # the stand-in never ends: this always fires

    async def scenario() -> list[int]:
        task = asyncio.create_task(runner.submit(REQUEST))
        pids = await _started(fifo, 1)
        with pytest.raises(DeadlineExceeded, match=r"took more than 2 s; the server is busy: submit again later"):
            await task
        return pids

    pids = asyncio.run(scenario())
    _nothing_left(pids, runner, tmp_path, store)


def test_the_check_runs_under_a_hard_address_space_limit(tmp_path):
    """A mapping past the limit fails in the child (mapped, not touched: without the limit it would cost nothing)."""
    probe = "import mmap, sys\ntry:\n    mmap.mmap(-1, int(sys.argv[1]))\nexcept OSError:\n    sys.exit(3)\n"

    async def mapped(size: int, limit: int | None) -> int:
        return await procgroup.run_bounded([sys.executable, "-c", probe, str(size)], output=tmp_path / "out.log",
                                 max_address_space=limit)

    assert asyncio.run(mapped(3 << 30, None)) == 0
    assert asyncio.run(mapped(3 << 30, 1 << 30)) == 3


def test_a_model_too_large_for_the_check_is_refused_in_seconds_not_built(tmp_path, store, shapes):
    """base_channels=8000 makes a U-Net of some 120 billion parameters (448 GiB of weights): it was built on the
    CPU and took the host down (OOM-killed at 22 GB). It is planned on the meta device and refused by name."""
    runner = _runner(tmp_path, store, shapes)
    request = TrainingRequest(dataset="shapes", recipe="synthetic-quick", device="cpu", epochs=1,
                              overrides=("model.params.base_channels=8000",))
    with pytest.raises(InvalidArgument) as caught:
        asyncio.run(runner.submit(request))
    said = str(caught.value)
    assert said.startswith("the model (unet, 120,193,016,005 parameters, 447.8 GiB of weights) is too large to "
                           f"build within the check's memory limit of {trainspec.RECIPE_CHECK_MEMORY_GIB} GiB"), said
    assert store.list() == [] and _scratch(tmp_path) == []


def test_a_trainer_that_cannot_start_is_named_without_its_path(tmp_path, store, shapes):
    runner = _runner(tmp_path, store, shapes, python=str(tmp_path / "no" / "python"))
    with pytest.raises(FailedPrecondition) as caught:
        asyncio.run(runner.submit(REQUEST))
    said = str(caught.value)
    assert said == "this server cannot start its trainer (its configured Python): No such file or directory", said
    assert _scratch(tmp_path) == []


def test_the_check_validates_a_cuda_device_without_touching_cuda(shapes):
    """A GPU server: ``--check`` with train.device=cuda counts the devices, creates no CUDA context (no
    ``set_device``, no initialisation) and plans the model on the meta device. Run in a child, whose torch is
    patched to look like a GPU machine's and to fail on any CUDA initialisation."""
    code = (
        "import sys, torch\n"
        "from training.config import load_config\n"
        "from training import train\n"
        "def touched(*args, **kwargs):\n"
        "    raise AssertionError('the check touched CUDA')\n"
        "torch.cuda.is_available = lambda: True\n"
        "torch.cuda.set_device = torch.cuda.init = torch.cuda._lazy_init = touched\n"
        "cfg = load_config(sys.argv[1], ['data.spec=' + sys.argv[2], 'train.device=cuda'])\n"
        "train.check_recipe(cfg)\n"
        "print('checked')\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(PROJECT_ROOT / "training/recipes/synthetic-quick.yaml"),
                           str(shapes)], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=BOUND_S)
    assert done.returncode == 0 and done.stdout.strip() == "checked", done.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_on_a_gpu_the_check_accepts_cuda_under_its_memory_limit(tmp_path, store, shapes):
    """The real check on a GPU machine: train.device=cuda is accepted (NVML counts the devices: the CUDA driver's
    own start would need more address space than the check's limit leaves)."""
    runner = _runner(tmp_path, store, shapes)
    request = TrainingRequest(dataset="shapes", recipe="synthetic-quick", device="cuda", epochs=1)
    job = asyncio.run(runner.submit(request))
    assert [j.id for j in store.list()] == [job.id]
