"""Child processes in their own process group, and the trainer's event log read as it grows.

A training job runs ``python -m training`` (or ``torchrun``, which starts one
worker per GPU) in a new session, so that one signal to the group reaches every
process of it and a crash of the server never leaves workers behind unnoticed:
the group's id and its leader's start time are stored with the job, and the
next server start kills a group that outlived the server which started it
(``kill_stale_group``). The start time guards against a recycled process id:
a group is only killed when its leader is gone (Linux never hands out the id of
a live process group to a new process) or is the very process that was started.

Members whose parent dies are re-parented to the nearest child subreaper: the
server itself when it runs as PID 1 of a container without an init. Their
zombies keep the group id alive until someone reaps them, so whatever waits for
a group to end reaps the group's exited members that are our children
(``reap_group``), under any init.

A child is started held (``held_start.py``): it runs its command only once
``release()`` is called, which the server does after storing the group with
the job. A server killed in between leaves nothing running. A child started with
``parent_death_signal`` gets that signal when the server dies (``kill -9``
included; Linux's ``PR_SET_PDEATHSIG``): one with nothing to resume (an
evaluation, run again from its start) does not run on unwatched until the next
start. Only the group's leader gets it; its own children are its to stop.

A short check that the server waits on for its answer (``run_bounded``) runs in
a session of its own too, under a hard address-space limit (``RLIMIT_AS``, set
by a small launcher before the command's own code runs) and with SIGKILL as its
parent-death signal; whoever awaits it and is cancelled (a client's deadline, a
timeout) kills its group and waits for it to exit before going on, so such a
check never outlives the request that asked for it.

Example:
    >>> proc = GroupProcess.spawn(["sleep", "60"], log_path=Path("/tmp/sleep.log"))  # doctest: +SKIP
    >>> proc.release()  # after recording proc.pgid and proc.start_time  # doctest: +SKIP
    >>> await proc.terminate(grace_s=10)  # SIGTERM to the group, SIGKILL after 10 s  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from segsvc.jobs import held_start

log = logging.getLogger("segsvc.jobs")

POLL_S = 0.05  # how often a terminating group is checked for exit
HELD_START = Path(__file__).with_name("held_start.py")


def process_start_time(pid: int) -> int | None:
    """The start time of ``pid`` in clock ticks since boot (``/proc/<pid>/stat`` field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but not ours: never signal it
        return False
    return True


def reap_group(pgid: int) -> None:
    """Reap every exited member of group ``pgid`` that is our child (none: nothing to do).

    Call it only once the group's leader, when it is our ``Popen``, has been reaped
    (``poll()`` returned its code): else this could take the leader's exit status from it.
    """
    while True:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:  # no child of ours is in the group
            return
        if pid == 0:  # children of ours are in it, all still running
            return


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


async def _wait_group_gone(pgid: int, timeout_s: float) -> bool:
    """Wait until no process of the group is left, reaping its zombies that are ours; False on timeout."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while True:
        reap_group(pgid)
        if not group_alive(pgid):
            return True
        if loop.time() >= end:
            return False
        await asyncio.sleep(POLL_S)


async def terminate_group(pgid: int, grace_s: float, leader: subprocess.Popen | None = None) -> None:
    """SIGTERM to the group, then SIGKILL to whatever is left after ``grace_s``; returns once it is gone.

    ``leader`` (our own child) is reaped on the way, and then the members that were re-parented to us
    (``reap_group``): zombies keep the group id alive.
    """
    def gone() -> bool:
        if leader is not None and leader.poll() is None:
            return False
        reap_group(pgid)
        return not group_alive(pgid)

    if gone():
        return
    _signal_group(pgid, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    end = loop.time() + grace_s
    while not gone():
        if loop.time() >= end:
            log.warning("process group %d still running %.1f s after SIGTERM; sending SIGKILL", pgid, grace_s)
            _signal_group(pgid, signal.SIGKILL)
            if leader is not None:
                await asyncio.to_thread(leader.wait)
            await _wait_group_gone(pgid, 10.0)
            return
        await asyncio.sleep(POLL_S)


async def kill_stale_group(pgid: int, start_time: int | None, grace_s: float) -> bool:
    """Stop a process group that a previous server started (after a crash); True when one was found.

    The leader's start time must match the recorded one; a leader that is gone
    while the group lives on is ours too (its id cannot have been reused).
    """
    if not group_alive(pgid):
        return False
    now = process_start_time(pgid)
    if now is not None and start_time is not None and now != start_time:
        return False  # the id belongs to an unrelated process now
    log.warning("process group %d of a previous server run is still alive; stopping it", pgid)
    await terminate_group(pgid, grace_s)
    return True


@dataclass
class GroupProcess:
    """A child started in its own session (process group id = its pid), held until ``release()``, output to a
    log file."""

    popen: subprocess.Popen
    start_time: int | None
    gate: int | None = field(default=None, repr=False)  # the pipe end that lets the child run

    @property
    def pgid(self) -> int:
        return self.popen.pid

    @classmethod
    def spawn(cls, argv: Sequence[str], *, log_path: Path, cwd: Path | None = None,
              env: Mapping[str, str] | None = None, parent_death_signal: int | None = None) -> "GroupProcess":
        """Start ``argv`` held: its group exists, but the command runs only after ``release()``.

        ``parent_death_signal``: sent to the command when this process dies (``held_start.py``); call this from a
        thread that lives as long as the process (the event loop's), as the kernel sends it when that thread ends.
        """
        log_path.parent.mkdir(parents=True, exist_ok=True)
        held = [sys.executable, "-I", "-S", str(HELD_START)]
        if parent_death_signal is not None:
            held.append(f"{held_start.PARENT_DEATH_OPTION}{int(parent_death_signal)}:{os.getpid()}")
        read_end, gate = os.pipe()  # both close-on-exec: no other child of the server holds the gate open
        try:
            with open(log_path, "ab") as out:
                popen = subprocess.Popen([*held, *argv], stdin=read_end,
                                         stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                                         env=dict(env) if env is not None else None, start_new_session=True)
        except BaseException:
            os.close(gate)
            raise
        finally:
            os.close(read_end)
        return cls(popen, process_start_time(popen.pid), gate)

    def release(self) -> None:
        """Let the command run (once its group is recorded where a restarted server finds it)."""
        if self.gate is None:
            raise RuntimeError("this process was already released or stopped")
        try:
            os.write(self.gate, b"1")
        except BrokenPipeError:  # the child is gone already (killed): its exit code says so
            pass
        self._close_gate()

    def _close_gate(self) -> None:
        if self.gate is not None:
            os.close(self.gate)
            self.gate = None

    async def wait(self) -> int:
        """The exit code (negative: killed by that signal), polled so the event loop stays free.

        The members of the group that ended before the leader and were re-parented to us are reaped too.
        """
        while (code := self.popen.poll()) is None:
            await asyncio.sleep(POLL_S * 4)
        reap_group(self.pgid)
        return code

    async def terminate(self, grace_s: float) -> None:
        """Stop the group; a child still held then never runs its command."""
        self._close_gate()
        await terminate_group(self.pgid, grace_s, self.popen)


async def run_bounded(argv: Sequence[str], *, output: Path, cwd: Path | None = None,
                      env: Mapping[str, str] | None = None, max_address_space: int | None = None) -> int:
    """Run ``argv`` to its end in a session of its own, its stdout and stderr appended to ``output``; its exit code
    (negative: killed by that signal; ``held_start.NOT_FOUND``: it could not be started, the reason in ``output``
    on a line that starts ``held_start.CANNOT_RUN``).

    ``max_address_space`` (bytes) is a hard limit on the command's virtual memory (``RLIMIT_AS``): past it an
    allocation fails in the command, whatever the host has free. Cancelling the caller (a client's deadline, an
    ``asyncio.timeout``) kills the group with SIGKILL and waits for the command's exit before the cancel goes on:
    nothing is left running, and no thread is held while it runs (an asyncio subprocess). Call it from the event
    loop's thread (the parent-death signal is sent when the thread that started the child ends).
    """
    launcher = [sys.executable, "-I", "-S", str(HELD_START), held_start.UNHELD_OPTION,
                f"{held_start.PARENT_DEATH_OPTION}{int(signal.SIGKILL)}:{os.getpid()}"]
    if max_address_space:
        launcher.append(f"{held_start.ADDRESS_SPACE_OPTION}{max_address_space}")
    with open(output, "ab") as out:
        proc = await asyncio.create_subprocess_exec(*launcher, *argv, stdin=subprocess.DEVNULL, stdout=out,
                                                    stderr=subprocess.STDOUT, cwd=cwd,
                                                    env=dict(env) if env is not None else None,
                                                    start_new_session=True)
    try:
        return await proc.wait()
    finally:
        if proc.returncode is None:  # cancelled: not reaped yet, so its id is still its group's
            _signal_group(proc.pid, signal.SIGKILL)  # the whole group at once: nothing it started runs on
            await _uninterrupted(proc.wait())
            await _uninterrupted(_wait_group_gone(proc.pid, 10.0))  # and the members it started, if any


async def _uninterrupted(awaitable: Any) -> Any:
    """Await ``awaitable`` to its end even if the caller is cancelled meanwhile; then the cancel goes on."""
    task = asyncio.ensure_future(awaitable)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return result


class EventTail:
    """Reads the JSON lines a trainer appends to ``events.jsonl``, from where the last read stopped.

    A line without its newline yet is left for the next read; lines that do not
    parse (a torn write after a crash) are skipped.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        events = []
        for line in data[:end].splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and isinstance(event.get("event"), str):
                events.append(event)
        return events
