"""What the batch and training runners share: scheduling jobs of one kind from the store, cancel, wait, delete.

A subclass names its store ``kind``, how many of its jobs run at once
(``max_running``), where a job's files live (``files_dir``) and how one job runs
(``_run_job``, which registers its run with ``_register`` right after
``store.start``, records the outcome in the store and calls ``_notify``).
Unfinished jobs, including those a crash interrupted, are picked up in
submission order whenever a slot is free. A run that raises (its store failing:
"database or disk is full"; a bug) leaves its job unfinished, and the scheduler
would pick it again at once, for ever: its slot waits first, ``BACK_OFF_S[0]``,
twice that each failed run in a row, at most ``BACK_OFF_S[1]`` (the batch
runner's pause on a full volume grows alike, through ``_next_pause``), with one
error logged per row of failures, not one per try. A cancel ends that wait at once.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from segsvc.errors import FailedPrecondition, InvalidArgument
from segsvc.jobs.store import Job, JobStore

log = logging.getLogger("segsvc.jobs")

# A job waits the first before it runs again, then twice as long each time in a row, at most the second: a
# trouble gone soon is noticed soon, one lasting for hours costs a try a minute.
BACK_OFF_S = (5.0, 60.0)
_FAILED_RUN = "its run failed"  # the reason of a row of runs that raised (``_Pause.reason``)


@dataclass
class _Pause:
    """The pauses in a row of one job (its runs end at each; this outlives them): why, and how many so far."""

    reason: str
    count: int = 0


class RunningJob(Protocol):
    """A job running in this process: setting ``cancel`` asks it to stop."""

    cancel: asyncio.Event


class StoreRunner(abc.ABC):
    """Schedules, cancels, awaits and deletes the store's jobs of ``kind``.

    Args:
        store: the durable job state.
        kind: the store kind this runner owns.
        max_running: jobs of this kind running at once.
    """

    def __init__(self, store: JobStore, kind: str, max_running: int) -> None:
        self.store = store
        self.kind = kind
        self.max_running = max_running
        self._runs: dict[str, RunningJob] = {}
        self._tasks: dict[str, asyncio.Task] = {}
        self._finished: dict[str, asyncio.Event] = {}
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self._pauses: dict[str, _Pause] = {}  # jobs pausing in a row (``_next_pause``), until a run gets on
        self._backing_off: dict[str, asyncio.Event] = {}  # jobs waiting after a failed run: a cancel sets it

    @abc.abstractmethod
    def files_dir(self, job_id: str) -> Path:
        """The folder holding the job's files (removed by ``delete(..., delete_outputs=True)``)."""

    @abc.abstractmethod
    async def _run_job(self, job: Job) -> None:
        """Run one job to its end (or until cancelled), recording the outcome in the store."""

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Start the scheduler, which also resumes the jobs a crash or restart interrupted."""
        self._scheduler = asyncio.get_running_loop().create_task(self._schedule(), name=f"{self.kind}-scheduler")

    async def stop(self) -> None:
        """Stop scheduling and abandon running jobs: they resume at the next start."""
        if self._scheduler is not None:
            self._scheduler.cancel()
            # gather, not suppress(CancelledError): a cancel of the caller's own (a stop cut short) goes on up
            [ended] = await asyncio.gather(self._scheduler, return_exceptions=True)
            if isinstance(ended, Exception):  # it had crashed (its store failing): gather took the error, say it
                log.error("the %s scheduler had stopped on an error: %s", self.kind, ended,
                          exc_info=(type(ended), ended, ended.__traceback__))
            self._scheduler = None
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- requests ---------------------------------------------------------------------
    def get(self, job_id: str) -> Job:
        return self.store.get(job_id)

    async def cancel(self, job_id: str) -> Job:
        """Ask a job to stop; a queued job ends at once, a running one at its next check."""
        job = await asyncio.to_thread(self.store.request_cancel, job_id)
        run = self._runs.get(job_id)
        if run is not None:
            run.cancel.set()
        elif job.finished:
            self._notify(job_id)
        backing_off = self._backing_off.get(job_id)
        if backing_off is not None:  # waiting after a failed run (its run's own cancel may predate the wait)
            backing_off.set()
        return job

    async def wait(self, job_id: str, timeout_s: float) -> Job:
        """The job once finished, or as it is after ``timeout_s``."""
        event = self._finished.setdefault(job_id, asyncio.Event())
        job = await asyncio.to_thread(self.store.get, job_id)
        if not job.finished:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout_s)
            job = await asyncio.to_thread(self.store.get, job_id)
        if job.finished:
            self._finished.pop(job_id, None)
        return job

    async def delete(self, job_id: str, delete_outputs: bool = False) -> int:
        """Forget a finished job (and its files when asked); returns the files removed."""
        job = await asyncio.to_thread(self.store.get, job_id)
        if not job.finished:
            raise FailedPrecondition(f"job {job_id} is {job.state}; cancel it and wait until it stops first")
        removed = 0
        if delete_outputs:
            removed = await asyncio.to_thread(remove_tree, self.files_dir(job_id))
        await asyncio.to_thread(self.store.delete, job_id)
        self._pauses.pop(job_id, None)  # a job deleted before it finished (finished ones are dropped by _notify)
        await self._deleted(job)
        return removed

    async def _deleted(self, job: Job) -> None:
        """What a kind of job lets go of once one is deleted (nothing here)."""

    # -- scheduling -------------------------------------------------------------------
    async def _schedule(self) -> None:
        while True:
            self._wake.clear()
            while len(self._tasks) < self.max_running:
                waiting = await asyncio.to_thread(self.store.unfinished, self.kind)
                job = next((j for j in waiting if j.id not in self._tasks), None)
                if job is None:
                    break
                task = asyncio.get_running_loop().create_task(self._run_guarded(job), name=f"{self.kind}-{job.id}")
                self._tasks[job.id] = task
                task.add_done_callback(lambda _t, jid=job.id: self._job_ended(jid))
            await self._wake.wait()

    async def _run_guarded(self, job: Job) -> None:
        """``_run_job``, then, if it raised, ``BACK_OFF_S`` before the job can be picked again (it holds its slot).

        A run records its own outcome; one that raised could not (the store refusing writes: a full volume), so
        its job is still unfinished and would be re-run at once, for ever. A cancel ends the wait at once.
        """
        try:
            await self._run_job(job)
        except Exception as exc:  # noqa: BLE001  (whatever it is, the job must not spin)
            cancel = self._backing_off[job.id] = asyncio.Event()
            try:
                count, pause_s = self._next_pause(job.id, _FAILED_RUN, *BACK_OFF_S)
                if count == 1:
                    log.error("%s job %s: its run failed and the job stays unfinished; trying again in %g s, then "
                              "at most every %g s while it fails: %s", self.kind, job.id, pause_s, BACK_OFF_S[1],
                              exc, exc_info=(type(exc), exc, exc.__traceback__))
                else:
                    log.debug("%s job %s failed again (%s); trying again in %g s", self.kind, job.id, exc, pause_s)
                await pause_for(cancel, pause_s)
            finally:
                self._backing_off.pop(job.id, None)
        else:
            pause = self._pauses.get(job.id)
            if pause is not None and pause.reason == _FAILED_RUN:  # a run ended as it should: the row is over
                del self._pauses[job.id]

    def _next_pause(self, job_id: str, reason: str, first_s: float, most_s: float) -> tuple[int, float]:
        """Count one more pause of the job for ``reason``: its place in the row (1: another reason, or none
        before, starts one), and how long it lasts: ``first_s``, twice that each pause in a row, at most ``most_s``.
        The row ends when the job gets on (``_end_pauses``) or finishes (``_notify``)."""
        pause = self._pauses.get(job_id)
        if pause is None or pause.reason != reason:
            pause = self._pauses[job_id] = _Pause(reason)
        pause_s = min(first_s * 2 ** min(pause.count, 32), most_s)
        pause.count += 1
        return pause.count, pause_s

    def _end_pauses(self, job_id: str) -> int:
        """The job got on: its row of pauses is over; how many it had."""
        pause = self._pauses.pop(job_id, None)
        return pause.count if pause is not None else 0

    async def _register(self, job_id: str, run: RunningJob) -> None:
        """Make ``run`` the job's running instance, so ``cancel`` signals it, and pick up a cancel already asked for.

        Call it right after ``store.start``. ``cancel`` commits the flag and then looks
        for a registered run; one that committed after ``start`` but before this call
        found none, so the flag is read again here, after registering. Both steps run
        on the event loop, so every cancel is either signalled by ``cancel`` or seen here.
        """
        self._runs[job_id] = run
        job = await asyncio.to_thread(self.store.get, job_id)
        if job.cancel_requested:
            run.cancel.set()

    def _job_ended(self, job_id: str) -> None:
        self._tasks.pop(job_id, None)
        self._runs.pop(job_id, None)
        self._wake.set()

    def _notify(self, job_id: str) -> None:
        """The job has finished: its waiters are told, and its row of pauses (``_next_pause``) is over."""
        self._pauses.pop(job_id, None)
        event = self._finished.get(job_id)
        if event is not None:
            event.set()

    async def _start(self, job: Job) -> Job | None:
        """``store.start``, or None when the job finished since the scheduler picked it (a cancel of the QUEUED
        job landed in between): nothing ran, so there is no failure to log or record; its waiters are told."""
        try:
            return await asyncio.to_thread(self.store.start, job.id)
        except InvalidArgument:
            if not (await asyncio.to_thread(self.store.get, job.id)).finished:
                raise
            log.info("%s job %s was cancelled before it started", self.kind, job.id)
            self._notify(job.id)
            return None


async def pause_for(cancel: asyncio.Event, pause_s: float) -> None:
    """Wait ``pause_s``, or until ``cancel`` is set (tests substitute it to drive a pause by events)."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(cancel.wait(), pause_s)


def remove_tree(root: Path) -> int:
    """Delete a folder; returns how many files it held (0 when it does not exist)."""
    if not root.is_dir():
        return 0
    count = sum(1 for p in root.rglob("*") if p.is_file())
    shutil.rmtree(root)
    return count
