"""Process groups when the server is a child subreaper, as it is as PID 1 of a container without an init; held starts.

A trainer's workers outlive it for a moment when the group is signalled; orphaned, they are re-parented
to the nearest subreaper, i.e. the server, and stay zombies of the group until the server reaps them.
``terminate_group`` must reap them rather than wait its 10 s group timeout (and leave them behind).
The tests make this process a subreaper (``PR_SET_CHILD_SUBREAPER``) for their duration.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from segsvc.jobs import held_start, procgroup
from segsvc.jobs.procgroup import GroupProcess, group_alive

PR_SET_CHILD_SUBREAPER = 36

# The trainer starts a worker (same group), writes the worker's pid, then sleeps; the worker is never reaped
# by it. `stubborn` ignores SIGTERM (the runner SIGKILLs it after the grace), `plain` dies of it.
TRAINER = ("import os, signal, subprocess, sys, time\n"
           "if sys.argv[2] == 'stubborn': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
           "worker = subprocess.Popen(['sleep', '600'])\n"
           "with open(sys.argv[1] + '.tmp', 'w') as f: f.write(str(worker.pid))\n"
           "os.replace(sys.argv[1] + '.tmp', sys.argv[1])\n"
           "time.sleep(600)\n")


@pytest.fixture
def subreaper() -> Iterator[None]:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        pytest.skip(f"prctl(PR_SET_CHILD_SUBREAPER) failed: {os.strerror(ctypes.get_errno())}")
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


@pytest.fixture
def spawned() -> Iterator[list[GroupProcess]]:
    """The groups a test starts; whatever is left of them is killed and reaped afterwards."""
    groups: list[GroupProcess] = []
    yield groups
    for proc in groups:
        try:
            os.killpg(proc.pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.popen.wait()
        while True:
            try:
                os.waitpid(-proc.pgid, 0)
            except ChildProcessError:
                break


def _state(pid: int) -> str | None:
    """The process state letter of ``pid`` (Z: zombie), None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rfind(")") + 2:].split()[0]


async def _until(condition, what: str, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, f"{what}: not within {timeout_s} s"
        await asyncio.sleep(0.02)


async def _start(tmp_path: Path, mode: str, spawned: list[GroupProcess]) -> tuple[GroupProcess, int]:
    pid_file = tmp_path / "worker.pid"
    proc = GroupProcess.spawn([sys.executable, "-c", TRAINER, str(pid_file), mode], log_path=tmp_path / "log")
    spawned.append(proc)
    proc.release()
    await _until(pid_file.exists, f"the trainer starting its worker (log: {tmp_path / 'log'})")
    return proc, int(pid_file.read_text())


def _no_child_left_in(pgid: int) -> bool:
    try:
        os.waitpid(-pgid, os.WNOHANG)
    except ChildProcessError:
        return True
    return False


@pytest.mark.parametrize("mode, grace_s", [("stubborn", 0.5), ("plain", 30.0)],
                         ids=["sigkill-after-the-grace", "exits-on-sigterm"])
def test_terminate_reaps_the_orphaned_workers_a_subreaper_inherits(tmp_path, subreaper, spawned, mode, grace_s,
                                                                    monkeypatch):
    """What the stop did is recorded, not timed: one that waited on the group's zombies instead of reaping them
    sends SIGKILL to a group that died of SIGTERM (after the 30 s grace), and waits out the 10 s after a SIGKILL."""
    signals, waits = [], []
    send, wait_gone = procgroup._signal_group, procgroup._wait_group_gone

    def recording_send(pgid: int, sig: int) -> None:
        signals.append(sig)
        send(pgid, sig)

    async def recording_wait(pgid: int, timeout_s: float) -> bool:
        # a stalled host may take longer than the source's 10 s to reap a killed group; zombies left unreaped never
        # go, so a longer wait still fails on them, just later
        waits.append(await wait_gone(pgid, max(timeout_s, 120.0)))
        return waits[-1]

    monkeypatch.setattr(procgroup, "_signal_group", recording_send)
    monkeypatch.setattr(procgroup, "_wait_group_gone", recording_wait)

    async def main() -> None:
        proc, worker = await _start(tmp_path, mode, spawned)
        await proc.terminate(grace_s=grace_s)
        if mode == "stubborn":
            assert signals == [signal.SIGTERM, signal.SIGKILL]
            assert waits == [True], "the group's zombies outlived the wait after SIGKILL"
        else:
            assert signals == [signal.SIGTERM], "the group died of SIGTERM, yet its zombies kept it 'running'"
        assert not group_alive(proc.pgid)
        assert _state(worker) is None, f"worker {worker} left behind in state {_state(worker)}"
        assert _no_child_left_in(proc.pgid)
        expected = -signal.SIGKILL if mode == "stubborn" else -signal.SIGTERM
        assert proc.popen.returncode == expected  # the leader's own status, not stolen by the reaping

    asyncio.run(main())


def test_a_trainer_that_exits_leaves_no_zombie_worker(tmp_path, subreaper, spawned):
    """Its worker dead but never reaped, the trainer exits: wait() returns its code and reaps the orphan."""
    code = ("import os, subprocess, sys, time\n"
            "worker = subprocess.Popen(['true'])\n"
            "def state():\n"
            "    stat = open(f'/proc/{worker.pid}/stat').read()\n"
            "    return stat[stat.rfind(')') + 2:].split()[0]\n"
            "while state() != 'Z': time.sleep(0.01)\n"
            "print(worker.pid, flush=True)\n"
            "os._exit(3)\n")

    async def main() -> None:
        proc = GroupProcess.spawn([sys.executable, "-c", code], log_path=tmp_path / "log")
        spawned.append(proc)
        proc.release()
        assert await asyncio.wait_for(proc.wait(), 60) == 3
        worker = int((tmp_path / "log").read_text())
        assert _state(worker) is None, f"worker {worker} left behind in state {_state(worker)}"
        assert not group_alive(proc.pgid) and _no_child_left_in(proc.pgid)

    asyncio.run(main())


# -- held start ------------------------------------------------------------------------
TOUCH = "import sys; open(sys.argv[1], 'x').close()"

# A server in miniature: it starts a held child, says its pid, and is killed before it can record and release it.
STARTER = ("import os, signal, sys\n"
           "from pathlib import Path\n"
           "from segsvc.jobs.procgroup import GroupProcess\n"
           "proc = GroupProcess.spawn([sys.executable, '-c', sys.argv[1], sys.argv[2]], log_path=Path(sys.argv[3]))\n"
           "print(proc.pgid, flush=True)\n"
           "os.kill(os.getpid(), signal.SIGKILL)\n")


def _reap(pid: int, timeout_s: float = 60.0) -> int:
    """The exit status of ``pid``, our child (a subreaper's orphan), once it ends; a hang fails after the bound."""
    end = time.monotonic() + timeout_s
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        assert time.monotonic() < end, f"process {pid} still running after {timeout_s} s"
        time.sleep(0.02)


def test_a_server_killed_before_it_recorded_its_trainer_leaves_none_running(tmp_path, subreaper):
    """Between starting a trainer and storing its group with the job, a kill -9 of the server left a trainer
    that no restart knew of. The child is held until released: with the server gone, it never runs its command."""
    ran = tmp_path / "ran"
    starter = subprocess.run([sys.executable, "-c", STARTER, TOUCH, str(ran), str(tmp_path / "log")],
                             capture_output=True, text=True, timeout=120)
    assert starter.returncode == -signal.SIGKILL, starter.stderr
    child = int(starter.stdout)
    assert _reap(child) == held_start.NOT_RELEASED  # orphaned to this subreaper: its status is ours to read
    assert not ran.exists(), "the command ran although its process was never recorded"
    assert "did not run" in (tmp_path / "log").read_text()


def test_a_held_child_runs_its_command_once_released(tmp_path, spawned):
    ran = tmp_path / "ran"

    async def main() -> None:
        proc = GroupProcess.spawn([sys.executable, "-c", TOUCH, str(ran)], log_path=tmp_path / "log")
        spawned.append(proc)
        start = proc.start_time
        proc.release()
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        assert ran.exists() and start is not None

    asyncio.run(main())


def test_a_held_child_stopped_before_release_never_runs_its_command(tmp_path, spawned):
    ran = tmp_path / "ran"

    async def main() -> None:
        proc = GroupProcess.spawn([sys.executable, "-c", TOUCH, str(ran)], log_path=tmp_path / "log")
        spawned.append(proc)
        # It waits in held_start (exec has run when Popen returns): the command itself has not started.
        assert "held_start.py" in Path(f"/proc/{proc.pgid}/cmdline").read_bytes().decode(errors="replace")
        await proc.terminate(grace_s=60)
        assert proc.popen.returncode in (held_start.NOT_RELEASED, -signal.SIGTERM)
        assert not ran.exists()
        with pytest.raises(RuntimeError, match="already"):
            proc.release()

    asyncio.run(main())


def test_a_command_that_cannot_run_says_so_in_the_log(tmp_path, spawned):
    async def main() -> None:
        proc = GroupProcess.spawn([str(tmp_path / "no-such-trainer")], log_path=tmp_path / "log")
        spawned.append(proc)
        proc.release()
        assert await asyncio.wait_for(proc.wait(), 60) == held_start.NOT_FOUND
        assert "cannot run" in (tmp_path / "log").read_text()

    asyncio.run(main())


def test_the_command_gets_the_default_signal_dispositions(tmp_path, spawned):
    """Python ignores SIGPIPE and SIGXFSZ and exec keeps what is ignored; Popen resets them for its own child,
    and held_start must too, or a shell-script trainer would see writes to a closed pipe fail instead of end."""
    async def main() -> None:
        proc = GroupProcess.spawn(["sh", "-c", "grep SigIgn /proc/self/status"], log_path=tmp_path / "log")
        spawned.append(proc)
        proc.release()
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        ignored = int((tmp_path / "log").read_text().split()[-1], 16)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            assert not ignored & (1 << (sig - 1)), f"{sig.name} is ignored in the command"

    asyncio.run(main())


def test_held_start_refuses_an_option_it_does_not_know(tmp_path):
    """A misspelt option must not be taken for the command (run_bounded passes its limits as options)."""
    done = subprocess.run([sys.executable, "-I", "-S", str(procgroup.HELD_START), "--unheld", "--adress-space=1",
                           "true"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "unknown option --adress-space=1" in done.stderr


def test_a_bounded_command_runs_unheld_under_its_limit(tmp_path):
    """run_bounded starts through held_start: at once (no byte to wait for) and with RLIMIT_AS set."""
    probe = "import resource; print(resource.getrlimit(resource.RLIMIT_AS)[0])"
    out = tmp_path / "out.log"
    code = asyncio.run(procgroup.run_bounded([sys.executable, "-c", probe], output=out,
                                             max_address_space=3 << 30))
    assert code == 0
    assert out.read_text().split() == [str(3 << 30)]
