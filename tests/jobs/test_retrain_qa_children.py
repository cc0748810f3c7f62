"""A server killed with SIGKILL while a job evaluates leaves no ``segsvc eval`` child running: the evaluation is
started with a parent-death signal (``GroupProcess.spawn(parent_death_signal=...)``, Linux ``PR_SET_PDEATHSIG``).
A real child under a stand-in server that is killed with SIGKILL; the test waits on the child's exit (a pidfd)."""

from __future__ import annotations

import asyncio
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from segsvc.jobs import training
from segsvc.jobs.procgroup import GroupProcess, group_alive

EXIT_BOUND_S = 60.0  # generous: a child that outlives its server by this long is not stopped at all

STAND_IN_SERVER = """
import asyncio, os, signal, sys
from pathlib import Path
from segsvc.jobs.procgroup import GroupProcess

fifo, log, death = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
child = GroupProcess.spawn(["sh", "-c", f"echo up > {fifo}; exec sleep 600"], log_path=log,
                           parent_death_signal=None if death == "none" else int(death))
child.release()
with open(fifo) as f:  # the command runs (the held start let it)
    assert f.readline().strip() == "up"
print(child.pgid, flush=True)
sys.stdin.read()  # until killed
"""

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not hasattr(os, "pidfd_open"),
                                reason="PR_SET_PDEATHSIG and pidfds are Linux's")


def _child_under_killed_server(tmp_path: Path, death: str) -> int:
    """Start the stand-in server with its child, kill the server with SIGKILL; the child's pid."""
    fifo = tmp_path / "up.fifo"
    os.mkfifo(fifo)
    server = subprocess.Popen([sys.executable, "-c", STAND_IN_SERVER, str(fifo), str(tmp_path / "child.log"), death],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              cwd=Path(training.__file__).resolve().parents[2])
    try:
        pid = int(server.stdout.readline())
    finally:
        server.kill()
        server.wait(EXIT_BOUND_S)
    return pid


def _exits_within(pid: int, timeout_s: float) -> bool:
    """Whether process ``pid`` (not our child: re-parented once its server died) exits within ``timeout_s``."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        readable, _, _ = select.select([fd], [], [], timeout_s)
        return bool(readable)
    finally:
        os.close(fd)


def test_a_child_with_a_parent_death_signal_stops_when_its_server_is_killed(tmp_path):
    pid = _child_under_killed_server(tmp_path, str(int(signal.SIGTERM)))
    assert _exits_within(pid, EXIT_BOUND_S), "the child outlived its killed server"


def test_without_one_the_child_outlives_its_server(tmp_path):
    """The control: the same child started without the signal runs on (the next server start stops its group)."""
    pid = _child_under_killed_server(tmp_path, "none")
    try:
        assert not _exits_within(pid, 0) and group_alive(pid)
    finally:
        os.killpg(pid, signal.SIGKILL)
    assert _exits_within(pid, EXIT_BOUND_S)


def test_the_job_starts_its_evaluations_with_sigterm_on_server_death(tmp_path, monkeypatch):
    """``_run_eval`` asks for it (the trainer's children are left to the next start: it resumes from a checkpoint)."""
    asked: list[int | None] = []

    class Spawned(Exception):
        pass

    def spawn(argv, **kwargs):  # type: ignore[no-untyped-def]
        asked.append(kwargs.get("parent_death_signal"))
        raise Spawned

    monkeypatch.setattr(GroupProcess, "spawn", staticmethod(spawn))
    runner = training.TrainingRunner.__new__(training.TrainingRunner)
    runner.config = training.TrainingConfig(state_dir=tmp_path)
    job = type("J", (), {"id": "j1", "spec": {}})()
    run = training._Run(job)  # type: ignore[arg-type]

    with pytest.raises(Spawned):
        asyncio.run(runner._run_eval(run, ["segsvc", "eval"], tmp_path / "out", "candidate", "val"))
    assert asked == [signal.SIGTERM]
