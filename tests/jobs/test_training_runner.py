"""The protocol-free pieces of training jobs: requests, command lines, events, the gate, process groups."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from segsvc.errors import InvalidArgument
from segsvc.jobs import gate
from segsvc.jobs.procgroup import EventTail, GroupProcess, group_alive, kill_stale_group, process_start_time
from segsvc.jobs.training import apply_event
from segsvc.jobs.trainspec import TrainingConfig, TrainingRequest, eval_argv, trainer_argv


# -- requests --------------------------------------------------------------------------
@pytest.mark.parametrize("override", ["output.repo=/tmp/x", "output=1", "data.spec=/etc", "model.init_from=/x",
                                      "name=../../x"])
def test_overrides_of_keys_the_service_sets_are_refused(override):
    with pytest.raises(InvalidArgument, match="sets"):
        TrainingRequest(dataset="d", recipe="r", overrides=(override,))


@pytest.mark.parametrize("kwargs, match", [
    ({"recipe": ""}, "recipe"),
    ({"epochs": 2, "max_time_min": 1.0}, "one budget"),
    ({"max_time_min": float("nan")}, "max_time_min"),
    ({"promote": "sometimes"}, "promote"),
    ({"gate_margin": 2.0}, "gate_margin"),
    ({"device": "tpu"}, "device"),
    ({"overrides": ("novalue",)}, "key.subkey=value"),
    ({"recipe_yaml": "a: 1"}, "not both"),
])
def test_bad_requests_say_what_is_wrong(kwargs, match):
    with pytest.raises(InvalidArgument, match=match):
        TrainingRequest(**{"dataset": "d", "recipe": "r", **kwargs})


def test_request_round_trips_through_its_stored_form():
    request = TrainingRequest(dataset="d", recipe="r", overrides=("a.b=1",), epochs=3, promote="never")
    assert TrainingRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request


def _spec(tmp_path: Path, request: TrainingRequest, base: dict | None = None) -> dict:
    return {"request": request.to_dict(), "dataset": {"name": "d", "sha256": "ab", "spec_path": "/data/d y.yaml"},
            "base": base, "model_name": "m", "run_dir": "r/run", "recipe_name": "r"}


def test_trainer_command_line_puts_the_service_keys_last(tmp_path):
    request = TrainingRequest(dataset="d", recipe="r", overrides=("optim.lr=0.1",), max_time_min=2.5, device="cpu")
    config = TrainingConfig(state_dir=tmp_path, python="py")
    argv = trainer_argv(_spec(tmp_path, request, {"model": "b", "version": 2, "dir": "/repo/b/2"}), tmp_path / "j",
                        config, resume=True)
    assert argv[:3] == ["py", "-m", "training"]
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert sets[0] == "optim.lr=0.1"
    assert "train.max_time_min=2.5" in sets and "schedule.horizon=time" in sets
    assert 'data.spec="/data/d y.yaml"' in sets and 'model.init_from="/repo/b/2"' in sets
    assert f'output.repo="{tmp_path / "j" / "candidate"}"' in sets
    assert sets.index("optim.lr=0.1") < sets.index("output.model_name=m")
    assert argv[-2:] == ["--resume", str(tmp_path / "j" / "r" / "run")]


def test_several_processes_run_torchrun_and_epochs_lift_the_time_budget(tmp_path):
    request = TrainingRequest(dataset="d", recipe="r", epochs=4, nproc_per_node=2)
    argv = trainer_argv(_spec(tmp_path, request), tmp_path, TrainingConfig(state_dir=tmp_path, python="py"), False)
    assert argv[:7] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "training"]
    assert "train.epochs=4" in argv and "train.max_time_min=null" in argv and "--resume" not in argv


def test_evaluation_runs_segsvc_eval(tmp_path):
    argv = eval_argv(TrainingConfig(state_dir=tmp_path, python="py"), tmp_path / "m" / "1", "d.yaml",
                     tmp_path / "out", "cpu")
    assert argv[:4] == ["py", "-m", "segsvc", "eval"] and "--no-progress" in argv


# -- events ----------------------------------------------------------------------------
def test_event_tail_leaves_a_partial_line_for_the_next_read(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read() == []
    path.write_text('{"event": "start", "epochs": 3}\n{"event": "st')
    assert [e["event"] for e in tail.read()] == ["start"]
    with open(path, "a") as f:
        f.write('ep", "epoch": 1}\nnot json\n{"event": "end", "status": "completed"}\n')
    assert [e["event"] for e in tail.read()] == ["step", "end"]


def test_events_become_live_metadata():
    progress: dict = {}
    apply_event(progress, {"event": "start", "epochs": 4, "steps_per_epoch": 10, "start_epoch": 0})
    apply_event(progress, {"event": "step", "epoch": 2, "step": 13, "steps_per_epoch": 10, "loss": 0.5, "lr": 1e-3,
                           "images_per_s": 80.0})
    assert (progress["epoch"], progress["step"], progress["loss"]) == (2, 3, 0.5)
    apply_event(progress, {"event": "epoch", "epoch": 2, "epochs": 4, "train_loss": 0.4, "lr": 9e-4,
                           "images_per_s": 90.0, "val_miou": 0.3, "best_miou": 0.35, "elapsed_s": 20.0, "eta_s": 20.0})
    assert (progress["val_miou"], progress["best_miou"], progress["eta_s"], progress["step"]) == (0.3, 0.35, 20.0, 10)
    apply_event(progress, {"event": "end", "status": "failed", "reason": "CUDA out of memory"})
    assert progress["end_reason"] == "CUDA out of memory"
    apply_event(progress, {"event": "start", "epochs": 4, "steps_per_epoch": 10, "start_epoch": 2})
    assert "end_reason" not in progress  # a resumed run starts clean


# -- the gate ----------------------------------------------------------------------------
def test_gate_promotes_only_a_candidate_that_beats_the_default_on_every_split():
    better = gate.compare({"val": {"miou": 0.6, "pixel_accuracy": 0.9}, "golden": {"miou": 0.5}},
                          {"val": {"miou": 0.5, "pixel_accuracy": 0.95}, "golden": {"miou": 0.45}})
    assert gate.decide("gate", better, 0.01, has_default=True)[0]
    assert not gate.decide("gate", better, 0.06, has_default=True)[0]  # golden: +0.05 only
    worse = gate.compare({"val": {"miou": 0.4}}, {"val": {"miou": 0.5}})
    promoted, verdict = gate.decide("gate", worse, 0.0, has_default=True)
    assert not promoted and "val (-0.1000)" in verdict
    assert gate.decide("always", worse, 0.0, has_default=True)[0]
    assert not gate.decide("never", better, 0.0, has_default=True)[0]
    assert gate.decide("gate", gate.compare({"val": {"miou": 0.1}}, None), 0.0, has_default=False)[0]
    tie = gate.compare({"val": {"miou": 0.5}}, {"val": {"miou": 0.5}})
    assert not gate.decide("gate", tie, 0.0, has_default=True)[0]  # "beats" is strict
    table = gate.format_table(worse)
    assert "0.4000" in table and "0.5000" in table and "-0.1000" in table


# -- process groups -------------------------------------------------------------------
SLEEPER = [sys.executable, "-c", "import subprocess, sys, time; "
           "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"]


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rfind(")") + 2:].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(entry.name))
    return members


def _wait_until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` for up to 60 s: Python processes starting (or dying) on a loaded host can take seconds."""
    deadline = time.monotonic() + 60
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.025)


def _wait_members(pgid: int, count: int) -> None:
    _wait_until(lambda: len(_group_members(pgid)) >= count, f"group {pgid} never had {count} members")


def test_terminate_stops_the_whole_group_including_grandchildren(tmp_path):
    async def main() -> None:
        proc = GroupProcess.spawn(SLEEPER, log_path=tmp_path / "log")
        proc.release()
        await asyncio.to_thread(_wait_members, proc.pgid, 2)
        await proc.terminate(grace_s=60)  # ends once the group is gone; SIGKILL only after a hang's worth
        assert not group_alive(proc.pgid) and proc.popen.returncode == -signal.SIGTERM

    asyncio.run(main())


def test_a_group_that_ignores_sigterm_gets_sigkill(tmp_path):
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "print('ready', flush=True); time.sleep(120)"]

    async def main() -> None:
        proc = GroupProcess.spawn(stubborn, log_path=tmp_path / "log")
        proc.release()
        while "ready" not in (tmp_path / "log").read_text():
            await asyncio.sleep(0.02)
        await proc.terminate(grace_s=0.3)
        assert proc.popen.returncode == -signal.SIGKILL

    asyncio.run(main())


def test_stale_group_of_a_dead_server_is_killed_but_a_recycled_id_is_not(tmp_path):
    # The "server" is a middle process that starts the group and exits: the group is orphaned.
    code = ("import subprocess, sys; p = subprocess.Popen(sys.argv[1:], start_new_session=True, "
            "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid, flush=True)")
    out = subprocess.run([sys.executable, "-c", code, *SLEEPER], capture_output=True, text=True, check=True)
    pgid = int(out.stdout.strip())
    _wait_members(pgid, 2)
    start = process_start_time(pgid)
    assert start is not None
    assert not asyncio.run(kill_stale_group(pgid, start + 1, grace_s=5))  # another process's start time
    assert group_alive(pgid)
    assert asyncio.run(kill_stale_group(pgid, start, grace_s=5))
    _wait_until(lambda: not _group_members(pgid), f"group {pgid} still has members")


def test_no_group_no_kill():
    assert not asyncio.run(kill_stale_group(2 ** 22 - 3, None, grace_s=0))
    assert os.getpgid(0) != 2 ** 22 - 3


# -- resolving a submission --------------------------------------------------------------
class _Registry:
    def __init__(self, names: list[str]) -> None:
        self.names = names

    def get(self, name_or_hash: str):
        from types import SimpleNamespace

        from segsvc.errors import NotFound

        if name_or_hash not in self.names:
            raise NotFound(f"no dataset named {name_or_hash!r}")
        return SimpleNamespace(name=name_or_hash, sha256="f" * 64, spec_path=f"/d/{name_or_hash}.yaml")


def test_submission_resolves_recipe_golden_set_and_a_base_models_recorded_recipe(tmp_path):
    from segsvc.errors import NotFound
    from segsvc.inference.repository import ModelRepository
    from segsvc.jobs.trainspec import resolve_submission
    from segsvc.models.artifact import save_artifact
    from tests.server.conftest import tiny_model

    config = TrainingConfig(state_dir=tmp_path)
    repo = ModelRepository(tmp_path / "repo")
    registry = _Registry(["shapes", "golden-synthetic-quick"])
    spec = resolve_submission(TrainingRequest(dataset="shapes", recipe="synthetic-quick"), registry, repo, config)
    assert (spec["model_name"], spec["recipe_name"], spec["run_dir"]) == ("synthetic-quick", "synthetic-quick",
                                                                           "synthetic-quick/run")
    assert sorted(spec["eval_sets"]) == ["golden", "val"] and spec["eval_sets"]["golden"]["spec_path"].endswith(
        "golden-synthetic-quick.yaml")
    with pytest.raises(NotFound, match="synthetic-quick"):  # lists the recipes there are
        resolve_submission(TrainingRequest(dataset="shapes", recipe="nope"), registry, repo, config)
    with pytest.raises(NotFound):
        resolve_submission(TrainingRequest(dataset="other", recipe="synthetic-quick"), registry, repo, config)
    model_spec, model = tiny_model(1)
    recorded = {"name": "old-recipe", "model": {"arch": "unet", "params": {"base_channels": 4}},
                "data": {"spec": "/elsewhere"}}
    save_artifact(model, repo.root, "served", spec=model_spec, training={"config": recorded})
    spec = resolve_submission(TrainingRequest(dataset="shapes", base_model="served"), registry, repo, config)
    assert spec["base"] == {"model": "served", "version": 1, "dir": str(repo.version_dir("served", 1))}
    assert (spec["model_name"], spec["recipe_name"]) == ("served", "old-recipe")
    assert "base_channels: 4" in spec["recipe_text"] and list(spec["eval_sets"]) == ["val"]


def test_a_time_budget_lifts_the_recipes_epoch_cap_unless_the_request_sets_one():
    lifted = TrainingRequest(dataset="d", recipe="r", max_time_min=2.0).budget_overrides()
    assert "train.epochs=100000" in lifted and "schedule.horizon=time" in lifted
    capped = TrainingRequest(dataset="d", recipe="r", overrides=("train.epochs=7",), max_time_min=2.0)
    assert not [s for s in capped.budget_overrides() if s.startswith("train.epochs=")]
