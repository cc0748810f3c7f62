"""Review 4: a trainer killed with ``kill -9`` while its DataLoader workers run.

The workers are forked from the trainer and inherited the descriptor of its ``run.lock``: the ``flock`` stayed
held until the orphaned workers noticed their parent was gone (up to ``MP_STATUS_CHECK_INTERVAL``, 5 s), and a
restart in that window was refused as "in use by another trainer". Here the workers are stopped (SIGSTOP)
before the trainer is killed, so the window lasts as long as the test needs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.config import load_config
from training.rundir import CHECKPOINT, LOCK_FILE, hold_run_dir, release_run_dir
from training.train import main

DEADLINE_S = 300.0  # generous: a loaded 2-core machine; the waits end on an event, not on this


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def state(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def events(run_dir: Path) -> list[dict]:
    try:
        lines = (run_dir / "events.jsonl").read_text().splitlines()
    except OSError:
        return []
    return [json.loads(line) for line in lines if line.endswith("}")]


def wait_for(condition, what: str, trainer: subprocess.Popen) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + DEADLINE_S
    while not condition():
        if trainer.poll() is not None:
            pytest.fail(f"the trainer ended (exit {trainer.returncode}) before {what}")
        if time.monotonic() > end:
            pytest.fail(f"no {what} within {DEADLINE_S} s")
        time.sleep(0.01)


def holds(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open."""
    try:
        fds = list((Path("/proc") / str(pid) / "fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) == str(path):
                return True
        except OSError:
            continue
    return False


def stop_with_stopped_workers(trainer: subprocess.Popen, run_dir: Path) -> list[int]:
    """Freeze the trainer at a moment it has DataLoader workers, and freeze those workers; their pids.

    Only workers past their start count: one frozen in the instant between its fork and the fork hook that
    closes its copy of run.lock (a window no real kill leaves open for more than microseconds, which a loaded
    machine let this test hit) is let go and the freeze tried again.
    """
    while True:
        os.kill(trainer.pid, signal.SIGSTOP)  # no worker starts or ends while it is stopped
        workers = children(trainer.pid)
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        stopped = [pid for pid in workers if state(pid) in ("T", "t")]
        if stopped and not any(holds(pid, run_dir / LOCK_FILE) for pid in stopped):
            return stopped
        for pid in workers:
            os.kill(pid, signal.SIGCONT)
        os.kill(trainer.pid, signal.SIGCONT)
        wait_for(lambda: bool(children(trainer.pid)), "DataLoader worker", trainer)


def test_a_trainer_killed_with_live_dataloader_workers_can_be_resumed_at_once(tiny_recipe):
    overrides = ["output.run_name=killed", "data.train_limit=24", "train.epochs=2"]
    run_dir = tiny_recipe.parent / "runs" / "tiny" / "killed"
    command = [sys.executable, "-m", "training", "--config", str(tiny_recipe), "--set", "data.workers=2",
               "--set", "train.epochs=1000", *(a for o in overrides[:2] for a in ("--set", o))]
    trainer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        wait_for(lambda: any(e["event"] == "checkpoint" for e in events(run_dir)), "checkpoint", trainer)
        wait_for(lambda: bool(children(trainer.pid)), "DataLoader worker", trainer)
        workers = stop_with_stopped_workers(trainer, run_dir)
        trainer.kill()  # kill -9: no clean-up of its own
        trainer.wait()
        assert all(state(pid) in ("T", "t") for pid in workers)  # its workers outlive it, as they do for seconds
        hold_run_dir(run_dir)  # what a restart takes first
        release_run_dir(run_dir)
        assert main(load_config(tiny_recipe, overrides), resume=str(run_dir)) is not None
        assert (run_dir / CHECKPOINT).is_file()
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
