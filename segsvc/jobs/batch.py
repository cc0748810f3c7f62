"""Batch segmentation jobs inside the server: durable, resumable, below interactive traffic.

A job is a row in the ``JobStore`` with one item per input image. Submission
resolves the inputs (confined to the data root or an upload), pins the model
version and commits the job in one transaction. A scheduler runs at most
``max_running_jobs`` jobs at a time, oldest first; each job keeps a window of
items in flight through the protocol-free ``InferenceService`` in the batch
lane, writes each item's files (temporary name, then rename) and only then
marks the item DONE. A crash at any point therefore leaves every input either
DONE with its files in place, or PENDING, to be redone on restart into the
same file names: nothing lost, nothing written twice. Leftover temporaries
are removed when a job (re)starts. Undecodable or oversized inputs, inputs
no output can be named after (``outputs.input_name_problem``) and inputs whose
output names clash with another's (``outputs.item_write_problem``) are FAILED
with their reason; the job still completes, and lists them in ``failures.jsonl`` (its result and summary
hold only the first ``outputs.FAILURES_SHOWN``). A full output volume (ENOSPC, EDQUOT) pauses the job: the
item stays PENDING, the job tries again after ``SPACE_PAUSE_S`` (growing while the volume stays full) and
its progress says why (``paused_reason``, when the store can take it: a full volume may hold the store too;
the pause happens either way) until an item goes through; a cancel ends the pause at once, a
restart resumes the job like any other (one warning per row of pauses: the writes in flight that the pause
cancels, refused too, are not each reported). A disk that refuses writes otherwise (read-only, permissions, I/O
errors) fails the job with that reason, after writing, when the folder takes them, the records a cancelled job
gets (``results.jsonl``, ``failures.jsonl``, ``summary.json`` saying it failed and why). An item FAILED or SKIPPED
keeps no files (a killed run may have renamed some into place), and a cancel
or a stop waits for the writes in flight, so every file has its DONE item.
The server holds ``<state_dir>/jobs.lock`` while it runs jobs: a second server
on the same state folder is refused at start. The server ``claim``s the folder
(the lock, then the store) and calls ``release_state`` last, once everything it
keeps there is closed; a runner used alone locks in ``start``, unlocks in ``stop``.

An upload (``UploadImages``) lives as long as a job references it: deleting the
last such job deletes it, and one that no job references is swept once older
than ``upload_ttl_s`` (a client that died before submitting), at start-up and
every ``SWEEP_EVERY_S``. Checking references and renaming the upload away is
one store transaction, and submission re-checks the upload inside its own, so
an upload is never deleted under a job. All uploads together are bounded by
``max_uploads_disk_bytes`` (committed ones plus those in progress, charged
before each chunk is written), so clients cannot fill the state folder that
also holds the job database.

Example:
    >>> runner = JobRunner(JobStore(state / "jobs.sqlite"), service, JobsConfig(state, outputs))  # doctest: +SKIP
    >>> await runner.start()  # doctest: +SKIP
    >>> job = await runner.submit(JobRequest(model="membrane", paths=("test",)))  # doctest: +SKIP
    >>> job = await runner.wait(job.id, timeout_s=600)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from segsvc.errors import (
    AlreadyExists, Cancelled, FailedPrecondition, InvalidArgument, NotFound, Overloaded, SegsvcError, Unavailable,
)
from segsvc.inference.batcher import Priority
from segsvc.inference.engine import InferenceOptions
from segsvc.inference.service import ImageFile, InferenceService, Segmentation
from segsvc.jobs import store as job_store
from segsvc.jobs.inputs import confine, resolve_inputs
from segsvc.jobs.outputs import (
    FAILURES_FILE, RESULTS_FILE, SUMMARY_FILE, JobOutputs, check_rel, checked_inputs, clean_temporaries, is_temporary,
    item_write_problem,
)
from segsvc.jobs import runner as job_runner
from segsvc.jobs.runner import StoreRunner
from segsvc.jobs.staging import MAX_DISK_BYTES as UPLOADS_DISK_BYTES, StagingArea, UploadLimits
from segsvc.jobs.store import Item, Job, JobStore

log = logging.getLogger("segsvc.jobs")

KIND = "segmentation"
RETRY_S = (0.05, 0.1, 0.2, 0.5, 1.0)  # back-off while the model's queue is full
PAUSE_S = 5.0  # how long a job that met Unavailable waits before it runs again (the scheduler would re-run it at once)
# A job whose output volume is full waits the first, then twice as long each time in a row, at most the second:
# a volume freed soon is noticed soon, one left full for hours costs a retry a minute.
SPACE_PAUSE_S = job_runner.BACK_OFF_S
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})  # a write refused for lack of space (or quota)
NO_SPACE_REASON = "no space left on the output volume; the job continues when space is freed"
SWEEP_EVERY_S = 3600.0  # how often unreferenced uploads are looked for (more often when upload_ttl_s is shorter)
LOCK_FILE = "jobs.lock"  # held (flock) by the server running the state folder's jobs; never deleted
STORE_FILE = "jobs.sqlite"  # the job store of a claimed state folder (``JobRunner.claim``)
UPLOAD_REF = "$.request.upload_id"  # where a job's spec names its upload (a JSON path for the store)
# Items a cancel skips per store transaction: a few transactions for a 100k-item job, not one per item, and
# the inputs of one chunk (whose files are removed first) held in memory at a time.
SKIP_CHUNK = 10_000


@dataclass(frozen=True)
class JobsConfig:
    """Where jobs keep their state, read their inputs and write their outputs.

    Args:
        state_dir: the SQLite job database and the upload staging area.
        output_root: outputs go to ``<output_root>/<job_id>/``.
        data_root: server-side inputs must lie under it (``None``: uploads only).
        max_running_jobs: jobs run at once; further jobs wait in submission order.
        max_inputs: most images in one job (checked before the job is accepted).
        max_input_specs: most input paths (folders, globs, files) one request may name,
            checked before any is listed: each spec is walked, so this bounds a
            request's cost where ``max_inputs`` (distinct files) cannot.
        max_file_bytes: an input file larger than this fails without being read.
        window: images of one job in flight at once (a few batches' worth).
        upload: limits of ``UploadImages``.
        progress_interval_s: how often live progress is written to the store.
        upload_ttl_s: an upload no job references is deleted this long after its commit.
        max_uploads_disk_bytes: most bytes ``<state_dir>/uploads`` may hold (``--max-uploads-disk-mb``): the
            committed uploads plus the uploads in progress, each chunk charged before it is written; one that
            would pass it is refused (``Overloaded``). ``upload`` bounds one upload, this all of them: the state
            folder also holds the job database.
    """

    state_dir: Path
    output_root: Path
    data_root: Path | None = None
    max_running_jobs: int = 1
    max_inputs: int = 100_000
    max_input_specs: int = 1_000
    max_file_bytes: int = 64 << 20
    window: int = 16
    upload: UploadLimits = field(default_factory=UploadLimits)
    progress_interval_s: float = 0.5
    upload_ttl_s: float = 24 * 3600.0
    max_uploads_disk_bytes: int = UPLOADS_DISK_BYTES

    def __post_init__(self) -> None:
        for name in ("max_running_jobs", "max_inputs", "max_input_specs", "max_file_bytes", "window",
                     "max_uploads_disk_bytes"):
            if getattr(self, name) < 1:
                raise InvalidArgument(f"jobs: {name} must be positive, got {getattr(self, name)}")
        if not self.upload_ttl_s > 0:  # also refuses NaN
            raise InvalidArgument(f"jobs: upload_ttl_s must be positive, got {self.upload_ttl_s}")


@dataclass(frozen=True)
class JobRequest:
    """What a client asks for (the idempotency comparison is over exactly this).

    Args:
        model, version: the model; version 0 means the default at submission.
        paths: server-side inputs relative to the data root (folders, globs, files).
        upload_id: or an upload committed by ``UploadImages``.
        options: tiling, flip TTA, confidence (class counts are always computed).
        color, overlay, overlay_alpha: extra pictures per image.
    """

    model: str = ""
    version: int = 0
    paths: tuple[str, ...] = ()
    upload_id: str = ""
    options: InferenceOptions = InferenceOptions()
    color: bool = False
    overlay: bool = False
    overlay_alpha: float = 0.5

    def __post_init__(self) -> None:
        if bool(self.paths) == bool(self.upload_id):
            raise InvalidArgument("a job needs inputs: server paths (inputs.paths) or an upload (inputs.upload_id)")
        if not 0.0 < self.overlay_alpha <= 1.0:
            raise InvalidArgument(f"outputs.overlay_alpha must be in (0, 1], got {self.overlay_alpha}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["paths"] = list(self.paths)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobRequest":
        return cls(**{**data, "paths": tuple(data["paths"]), "options": InferenceOptions(**data["options"])})


@dataclass
class _Run:
    """One job running in this process: its cancel signal and live counters.

    ``elapsed_before`` is the job's running time in earlier runs (before a restart),
    as the last of them recorded it; ``started`` is when this run began.
    """

    job: Job
    request: JobRequest
    model: str
    version: int
    elapsed_before: float = 0.0
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    started: float = field(default_factory=lambda: time.monotonic())  # looked up per call: tests substitute it
    processed: int = 0
    published: float = 0.0
    paused_reason: str | None = None  # why the job is paused (published with its progress), until an item goes through
    halted: bool = False  # an item raised (a full volume, a refused write...): the run ends for it, not for a stop


class _NoSpace(Unavailable):
    """The output volume is full (ENOSPC) or the quota is spent (EDQUOT): the job pauses, its items stay PENDING."""


def _lock_state_dir(state: Path) -> int:
    """A descriptor holding ``flock`` on ``state/LOCK_FILE`` (the folder made if missing), or
    ``FailedPrecondition`` when another server holds it."""
    state.mkdir(parents=True, exist_ok=True)
    fd = os.open(state / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FailedPrecondition(f"another segsvc server already runs the jobs of state folder {state}: "
                                 "stop it first, or give this server its own --state-dir") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


class JobRunner(StoreRunner):
    """Accepts, schedules, runs, cancels and deletes segmentation jobs.

    Args:
        store: the durable job state.
        service: the inference core (jobs use its batch lane).
        config: roots and limits.
        on_image: called with ``(model, queue_s, run_s)`` of each image segmented (the server's metrics,
            ``ServerMetrics.observe_job_image``); may be set after construction (``claim``).
    """

    def __init__(self, store: JobStore, service: InferenceService, config: JobsConfig,
                 on_image: Callable[[str, float, float], None] | None = None) -> None:
        super().__init__(store, KIND, config.max_running_jobs)
        self.config = config
        self._service = service
        self.on_image = on_image
        self.staging = StagingArea(Path(config.state_dir) / "uploads", config.upload,
                                   max_disk_bytes=config.max_uploads_disk_bytes)
        self._runs: dict[str, _Run] = {}  # type: ignore[assignment]
        self._sweeper: asyncio.Task | None = None
        self._state_lock: int | None = None  # the fd holding LOCK_FILE while started (or claimed)
        self._claimed = False  # the lock was taken before ``start`` (``claim``): ``stop`` keeps it

    @classmethod
    def claim(cls, service: InferenceService, config: JobsConfig) -> JobRunner:
        """Lock ``config.state_dir``, then open its job store: a runner holding the folder until ``release_state``.

        The lock comes first: on a folder another server runs this raises ``FailedPrecondition`` before the
        database is opened (created, its schema checked). The runner's ``stop`` keeps the lock: the owner
        releases it once it has closed the store and whatever else it keeps in the folder.
        """
        state = Path(config.state_dir)
        fd = _lock_state_dir(state)
        try:
            store = JobStore(state / STORE_FILE)
            try:
                runner = cls(store, service, config)
            except BaseException:
                store.close()
                raise
        except BaseException:
            os.close(fd)
            raise
        runner._state_lock, runner._claimed = fd, True
        return runner

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        """Lock the state folder, clean half-finished uploads, sweep stale ones and start the scheduler
        (which resumes unfinished jobs).

        Raises ``FailedPrecondition`` when another server holds the state folder: both would resume the
        same jobs, delete each other's temporaries and half-received uploads, and write the same files.
        """
        self._lock_state()
        try:
            await asyncio.to_thread(self.staging.clean_partial)
            await asyncio.to_thread(self.sweep_uploads)
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_periodically(),
                                                                   name="upload-sweeper")
            await super().start()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        await super().stop()
        if not self._claimed:  # the jobs have stopped writing: another server may take over
            self.release_state()

    def release_state(self) -> None:
        """Release the state folder's lock: another server may take it over. Nothing when not held.

        ``stop`` does it when ``start`` took the lock; a ``claim``ed runner's owner calls it last.
        """
        if self._state_lock is not None:
            os.close(self._state_lock)
            self._state_lock = None
        self._claimed = False

    def _lock_state(self) -> None:
        """Hold ``flock`` on ``<state_dir>/LOCK_FILE`` until ``stop`` (a killed server's lock goes with it)."""
        if self._state_lock is None:
            self._state_lock = _lock_state_dir(Path(self.config.state_dir))

    async def _deleted(self, job: Job) -> None:
        """A deleted job's upload goes too, unless another job uses it."""
        upload_id = job.spec.get("request", {}).get("upload_id")
        if upload_id:  # a crash before this leaves the upload unreferenced: the sweep takes it
            await asyncio.to_thread(self._release_upload, upload_id)

    # -- uploads -----------------------------------------------------------------------
    def sweep_uploads(self) -> list[str]:
        """Delete the uploads that no job references and that were committed over ``upload_ttl_s`` ago."""
        cutoff = time.time() - self.config.upload_ttl_s
        swept = [upload_id for upload_id in self.staging.committed_before(cutoff) if self._release_upload(upload_id)]
        if swept:
            log.info("deleted %d upload(s) no job used for %.0f s", len(swept), self.config.upload_ttl_s)
        return swept

    def _release_upload(self, upload_id: str) -> bool:
        """Delete the upload unless a job (any state) references it; whether it went."""
        try:
            released = self.store.release_unreferenced(UPLOAD_REF, upload_id,
                                                       lambda: self.staging.detach(upload_id))
        except NotFound:  # already deleted
            return False
        if released:
            self.staging.purge(upload_id)
        return released

    async def _sweep_periodically(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_EVERY_S, self.config.upload_ttl_s))
            try:
                await asyncio.to_thread(self.sweep_uploads)
            except Exception:  # noqa: BLE001  (a locked database, the disk: the sweeper must outlive it)
                log.exception("sweeping uploads failed; trying again in the next round")

    # -- requests ---------------------------------------------------------------------
    async def submit(self, request: JobRequest, request_id: str = "") -> Job:
        """Validate, pin the model version and commit the job; an equal resubmission returns the first job."""
        if request_id:
            existing = await asyncio.to_thread(self.store.find, KIND, request_id)
            if existing is not None:
                if existing.spec.get("request") != request.to_dict():
                    raise AlreadyExists(f"request_id {request_id!r} was already used for a different job")
                return existing
        name, version, _ = self._service.resolve(request.model or None, request.version or None)
        root = self._input_root(request)
        if request.upload_id and (refused := await asyncio.to_thread(self.staging.no_images, request.upload_id)):
            raise refused  # else "input '.' matches no image under the data root", naming neither upload nor files
        files = await asyncio.to_thread(
            resolve_inputs, root, request.paths or ["."], max_files=self.config.max_inputs,
            max_specs=self.config.max_input_specs,
        )
        spec = {"request": request.to_dict(), "model": name, "version": version}
        # Inputs no output can be named after (a backslash, not UTF-8, too long) are FAILED with their reason.
        names, unusable = checked_inputs([f.rel for f in files])
        # Checked again inside the store transaction: a sweep may have deleted the upload since.
        still_there = (lambda: self.staging.path(request.upload_id)) if request.upload_id else None
        job, created = await asyncio.to_thread(
            self.store.submit, KIND, spec, names, request_id=request_id or None, failed=unusable,
            precondition=still_there,
        )
        if created:
            log.info("job %s submitted: %d images, model %s:%d", job.id, job.total, name, version)
            self._wake.set()
        return job

    def output_dir(self, job_id: str) -> Path:
        return Path(self.config.output_root) / check_rel(job_id)

    files_dir = output_dir

    def output_files(self, job_id: str) -> list[tuple[str, Path]]:
        """The job's output files as ``(relative path, path)``, symlinks and temporaries excluded.

        A temporary is a name ``outputs`` gives a file being written (``.<name>.tmp-<12 hex>``);
        an input whose own name merely contains ``.tmp-`` keeps its outputs listed.
        """
        self.store.get(job_id)
        root = self.output_dir(job_id)
        if not root.is_dir():
            return []
        return [(p.relative_to(root).as_posix(), p) for p in sorted(root.rglob("*"))
                if p.is_file() and not p.is_symlink() and not is_temporary(p.name)]

    # -- scheduling -------------------------------------------------------------------
    def _input_root(self, request: JobRequest) -> Path:
        if request.upload_id:
            return self.staging.path(request.upload_id)
        if self.config.data_root is None:
            raise FailedPrecondition("this server has no --data-root: upload the images (UploadImages) instead")
        return Path(self.config.data_root)

    # -- running one job -------------------------------------------------------------------
    async def _run_job(self, job: Job) -> None:
        try:
            started = await self._start(job)
            if started is None:
                return
            job = started
            request = JobRequest.from_dict(job.spec["request"])
            run = _Run(job, request, job.spec["model"], int(job.spec["version"]),
                       elapsed_before=float(job.progress.get("elapsed_s") or 0.0),
                       paused_reason=job.progress.get("paused_reason"))  # shown until an item goes through
            await self._register(job.id, run)
            outputs = JobOutputs(self.output_dir(job.id))
            await asyncio.to_thread(clean_temporaries, outputs.root)
            await self._service.manager.retain(run.model, run.version, job=True)  # no swap retires it mid-job
            try:
                try:
                    await self._run_items(run, outputs, self._input_root(request))
                except Unavailable:
                    raise
                except Exception as exc:  # the job fails: first the records of what it did, as a cancel writes
                    await self._write_failed_records(run, outputs, _failure_message(exc))
                    raise
                await self._finalize(run, outputs)  # failing, it failed writing these records: not tried again
            finally:
                self._service.manager.release(run.model, run.version, job=True)
        except asyncio.CancelledError:  # server stopping: the job resumes at the next start
            log.info("job %s interrupted; it resumes when the server starts again", job.id)
            raise
        except Unavailable as exc:  # the model is not taking requests, the output volume is full: pause
            await self._pause(job.id, exc)
        except Exception as exc:
            message = _failure_message(exc)
            # Recorded before it is logged: a store refusing it too raises, and the runner logs both once per
            # row of such runs (``StoreRunner._run_guarded``), not once per retry.
            await asyncio.to_thread(self.store.finish, job.id, "FAILED", error=message)
            log.error("job %s failed: %s", job.id, message, exc_info=not isinstance(exc, SegsvcError))
            self._notify(job.id)

    async def _pause(self, job_id: str, exc: Unavailable) -> None:
        """Say why the job is paused (its progress' ``paused_reason``), then wait before the scheduler runs it
        again (it would at once); a cancel ends the wait, and the next run finalizes the job. The wait happens
        even when the store refuses the progress ("database or disk is full": the state folder is on the full
        volume, as ``<state-dir>/outputs`` is by default).

        The job's run ends at each pause, and its PENDING items are taken up by the next run: the
        mechanism of a restart. ``Unavailable`` waits ``PAUSE_S``; ``_NoSpace`` waits ``SPACE_PAUSE_S[0]``,
        twice that each pause in a row, at most ``SPACE_PAUSE_S[1]``. One warning per pause in a row: a
        volume left full overnight logs once, not a retry a minute.
        """
        no_space = isinstance(exc, _NoSpace)
        reason = NO_SPACE_REASON if no_space else f"{exc}; the job continues when the model takes requests again"
        first_s, most_s = SPACE_PAUSE_S if no_space else (PAUSE_S, PAUSE_S)
        count, pause_s = self._next_pause(job_id, reason, first_s, most_s)
        if count == 1:
            log.warning("job %s paused: %s (%s); trying again in %g s%s", job_id, reason, exc.__cause__ or exc,
                        pause_s, f", then at most every {most_s:g} s" if no_space else "")
        else:
            log.debug("job %s still paused (%d in a row); trying again in %g s", job_id, count, pause_s)
        run = self._runs.get(job_id)
        if run is not None:
            run.paused_reason = reason
            await self._publish_if_possible(run, count == 1)
        await job_runner.pause_for(run.cancel if run is not None else asyncio.Event(), pause_s)

    async def _resumed(self, run: _Run) -> None:
        """An item went through after a pause: clear ``paused_reason`` (published at once) and the pause count."""
        if run.paused_reason is None:
            return
        log.info("job %s runs again after %d pause(s): %s", run.job.id, self._end_pauses(run.job.id),
                 run.paused_reason)
        run.paused_reason = None
        await self._publish(run, force=True)

    async def _pending(self, job_id: str) -> AsyncIterator[Item]:
        """The job's PENDING items in index order, read ``store.ITEM_PAGE`` per query: a job of a million
        items holds a page and its window, not the job. A page starts after the last index of the one
        before, so items finished meanwhile are not read again; a restart reads the ones still PENDING."""
        after = -1
        while page := await asyncio.to_thread(self.store.pending_items, job_id, job_store.ITEM_PAGE, after=after):
            for item in page:
                yield item
            after = page[-1].index

    async def _run_items(self, run: _Run, outputs: JobOutputs, root: Path) -> None:
        slots = asyncio.Semaphore(self.config.window)
        tasks: set[asyncio.Task] = set()
        errors: list[BaseException] = []  # what items that ended raised (Unavailable, a failed write, a bug)
        stop = asyncio.get_running_loop().create_task(run.cancel.wait())

        def ended(task: asyncio.Task) -> None:
            tasks.discard(task)
            slots.release()
            if not task.cancelled() and task.exception() is not None:
                errors.append(task.exception())  # type: ignore[arg-type]
                run.halted = True  # the writes still in flight are cancelled for it (``_late_write_error``)
                if not stop.done():
                    stop.cancel()  # wakes the loops below, which then stop starting items

        try:
            async with contextlib.aclosing(self._pending(run.job.id)) as pending:
                async for item in pending:
                    acquire = asyncio.get_running_loop().create_task(slots.acquire())
                    await asyncio.wait({acquire, stop}, return_when=asyncio.FIRST_COMPLETED)
                    if run.cancel.is_set() or errors:
                        acquire.cancel()
                        break
                    task = asyncio.get_running_loop().create_task(self._run_item(run, outputs, root, item))
                    tasks.add(task)
                    task.add_done_callback(ended)
            while tasks and not run.cancel.is_set() and not errors:
                await asyncio.wait({*tasks, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            for task in list(tasks):  # cancel: queued images leave the batcher; written ones stay DONE
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        # An item that raised is still PENDING: raise, so the job is paused (Unavailable, a full volume) or FAILED,
        # never SUCCEEDED with that item neither done nor failed.
        for result in [*errors, *results]:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                raise result

    async def _run_item(self, run: _Run, outputs: JobOutputs, root: Path, item: Item) -> None:
        t0 = time.perf_counter()
        try:
            source = ImageFile(*_confined(root, item.input), item.input, self.config.max_file_bytes)
            seg = await self._segment(run, source)
        except Unavailable:
            raise
        except (InvalidArgument, Cancelled) as exc:  # this input cannot be segmented: record why
            await self._fail_item(run, outputs, item, str(exc))
        else:
            await _uninterrupted(self._write_and_record(run, outputs, item, seg, t0),
                                 lambda exc: _late_write_error(run, exc))
        run.processed += 1
        await self._resumed(run)
        await self._publish(run)

    async def _write_and_record(self, run: _Run, outputs: JobOutputs, item: Item, seg: Segmentation,
                                t0: float) -> None:
        """Write the item's files, then record it DONE (or FAILED, with no files, if its outputs are refused).

        A full output volume leaves the item PENDING without its files (the extras written before the
        refused one go: their space is the volume's) and raises ``_NoSpace``, which pauses the job.
        """
        try:
            record = await self._service.run_io(self._write, run, outputs, item.input, seg, t0)
        except (InvalidArgument, OSError) as exc:
            problem = item_write_problem(exc, outputs.root)
            if problem is None:  # the disk (full, read-only, gone): every image would fail alike
                assert isinstance(exc, OSError)
                if exc.errno in NO_SPACE_ERRNOS:
                    await self._service.run_io(outputs.remove_item, item.input)
                    raise _NoSpace(f"cannot write the job's outputs: {exc.strerror or 'no space'}") from exc
                raise _unwritable(exc) from exc
            await self._fail_item(run, outputs, item, problem)  # a clash with another input's output name
        else:
            await asyncio.to_thread(self.store.finish_item, run.job.id, item.index, "DONE", result=record)

    async def _fail_item(self, run: _Run, outputs: JobOutputs, item: Item, reason: str) -> None:
        """Record the item FAILED after deleting any files of it: a run killed between renaming them into
        place and recording it DONE left them, and no file may outlive its item's record."""
        await self._service.run_io(outputs.remove_item, item.input)
        await asyncio.to_thread(self.store.finish_item, run.job.id, item.index, "FAILED", reason=reason)

    async def _skip_pending(self, run: _Run, outputs: JobOutputs) -> None:
        """Record the items a cancel left PENDING SKIPPED, ``SKIP_CHUNK`` per store transaction.

        Called once no item is in flight (``_run_items`` waited for the writes). Like
        ``_fail_item``, each chunk's files go before its record: a run killed between renaming
        them into place and recording DONE left some, and no file may outlive its item's record.
        """
        job_id = run.job.id
        while chunk := await asyncio.to_thread(self.store.pending_items, job_id, SKIP_CHUNK):
            await self._service.run_io(outputs.remove_items, [item.input for item in chunk])
            if not await asyncio.to_thread(self.store.skip_pending, job_id, "cancelled", through=chunk[-1].index):
                return  # nothing left to skip (cannot happen while this run owns the job; never loop on it)

    async def _segment(self, run: _Run, source: ImageFile) -> Segmentation:
        options = dataclasses.replace(run.request.options, class_counts=True)
        for delay in (*RETRY_S, None):
            try:
                seg = await self._service.segment(source, model=run.model, version=run.version,
                                                  options=options, priority=Priority.BATCH)
                if self.on_image is not None:
                    self.on_image(seg.model, seg.queue_s, seg.run_s)
                return seg
            except Overloaded:
                if delay is None:
                    raise Unavailable(f"model {run.model}:{run.version} stays overloaded") from None
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    @staticmethod
    def _write(run: _Run, outputs: JobOutputs, rel: str, seg: Segmentation, t0: float) -> dict[str, Any]:
        """Write the image's files (atomically) and build its results record; runs on an I/O thread."""
        req, out, manifest = run.request, seg.output, seg.manifest
        outputs.write_item(rel, out.labels, palette=manifest.palette, image=seg.image if req.overlay else None,
                           confidence=out.confidence, color=req.color, overlay=req.overlay,
                           alpha=req.overlay_alpha)
        return outputs.item_record(rel, out.labels, class_names=manifest.class_names, model=seg.model,
                                   version=seg.version, ms=(time.perf_counter() - t0) * 1e3,
                                   confidence=out.confidence, counts=out.class_counts)

    async def _publish(self, run: _Run, force: bool = False) -> None:
        """Write live progress (throughput, ETA) at most every ``progress_interval_s``.

        ``elapsed_s`` is the job's running time over all its runs: a run starts from
        the ``elapsed_s`` the previous run last wrote (``_Run.elapsed_before``) and adds
        its own time, so the result's ``elapsed_seconds`` and ``images_per_second`` cover
        every image done. A crash (``kill -9``) loses only the time since that run's
        last write (about ``progress_interval_s`` plus one image); time the server was
        down is not counted. ``images_per_s`` and ``eta_s`` are this run's live rate.
        """
        now = time.monotonic()
        if not force and now - run.published < self.config.progress_interval_s:
            return
        run.published = now
        job = await asyncio.to_thread(self.store.get, run.job.id)
        rate = run.processed / max(now - run.started, 1e-9)
        left = job.total - job.done - job.failed - job.skipped
        progress = {"images_per_s": round(rate, 3), "eta_s": round(left / rate, 1) if rate > 0 else None,
                    "elapsed_s": round(run.elapsed_before + now - run.started, 3)}
        if run.paused_reason is not None:  # no estimate while paused: it depends on when the pause ends
            progress.update(eta_s=None, paused_reason=run.paused_reason)
        await asyncio.to_thread(self.store.set_progress, run.job.id, progress)

    async def _publish_if_possible(self, run: _Run, say: bool) -> None:
        """``_publish(run, force=True)``, best effort: a store that refuses it (its volume full: "database or
        disk is full") is logged, a warning when ``say`` (once per row of pauses), else a debug line."""
        try:
            await self._publish(run, force=True)
        except (sqlite3.Error, OSError) as exc:
            (log.warning if say else log.debug)("job %s: its progress could not be stored: %s", run.job.id, exc)

    async def _write_records(self, run: _Run, outputs: JobOutputs,
                             **fields: Any) -> tuple[Job, dict[str, Any], float]:
        """Write the job's ``results.jsonl``, ``failures.jsonl``, ``summary.json`` and chart from its store
        (``fields`` added to the summary); the job as read, the summary and the job's elapsed time."""
        job_id = run.job.id
        job = await asyncio.to_thread(self.store.get, job_id)
        manifest = self._service.manager.resolve(run.model, run.version).manifest
        elapsed = float(job.progress.get("elapsed_s") or 0.0)
        # Read from the store a page at a time as results.jsonl and failures.jsonl are written, on the I/O thread;
        # the summary and the result keep the first failures (outputs.FAILURES_SHOWN), job.failed counts them all.
        done = (i.result for i in self.store.iter_items(job_id, "DONE") if i.result is not None)
        failed = ({"input": i.input, "reason": i.reason} for i in self.store.iter_items(job_id, "FAILED"))
        summary = await self._service.run_io(
            lambda: outputs.finalize(
                done, failed,
                class_names=manifest.class_names, palette=manifest.palette,
                summary_fields={"job_id": job_id, "model": run.model, "version": run.version,
                                "total": job.total, "skipped": job.skipped, "elapsed_s": elapsed, **fields},
            )
        )
        return job, summary, elapsed

    async def _write_failed_records(self, run: _Run, outputs: JobOutputs, error: str) -> None:
        """Best effort, before a failing job is recorded FAILED: the records a cancelled job gets (the images it
        did, those that failed; the inputs still to do are in neither), the summary with ``state`` FAILED and the
        job's ``error``, so a fetch of the failed job says which inputs were done. An output folder refusing them
        too (or any other trouble) is logged: the job fails with its own error all the same."""
        run.paused_reason = None  # the job ends, whatever it waited for
        try:
            await self._publish_if_possible(run, False)  # the elapsed time in the summary
            await self._write_records(run, outputs, state="FAILED", error=error)
        except Exception as exc:  # noqa: BLE001  (whatever it is, the job's own failure is what is recorded)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            log.warning("job %s: failing, its %s, %s and %s could not be written either: %s", run.job.id,
                        RESULTS_FILE, FAILURES_FILE, SUMMARY_FILE, reason)

    async def _finalize(self, run: _Run, outputs: JobOutputs) -> None:
        job_id = run.job.id
        cancelled = run.cancel.is_set()
        if cancelled:
            await self._skip_pending(run, outputs)
            run.paused_reason = None  # a cancel during a pause: the job ends, whatever it waited for
        # Best effort: the outcome below is what matters (its elapsed time is then the last one stored).
        await self._publish_if_possible(run, True)
        try:
            job, summary, elapsed = await self._write_records(run, outputs)
        except OSError as exc:
            if exc.errno not in NO_SPACE_ERRNOS:
                raise _unwritable(exc) from exc
            if not cancelled:  # every item is DONE or FAILED: the run after the pause writes these files again
                raise _NoSpace(f"cannot write the job's results: {exc.strerror or 'no space'}") from exc
            # Cancelled on a full volume (typically during a pause): the job stops as asked, without the files
            # (the operation of a cancelled job carries no result); its items' outputs are kept.
            job = await asyncio.to_thread(self.store.get, job_id)
            await asyncio.to_thread(self.store.finish, job_id, "CANCELLED")
            log.warning("job %s cancelled: %d done, %d failed, %d skipped; %s and %s not written: %s", job_id,
                        job.done, job.failed, job.skipped, RESULTS_FILE, SUMMARY_FILE, exc.strerror)
            self._notify(job_id)
            return
        result = {"output_location": job_id, "total": job.total, "done": job.done, "failed": job.failed,
                  "skipped": job.skipped, "class_pixel_totals": summary["class_pixels"],
                  "failures": summary["failures"], "failures_truncated": summary["failures_truncated"],
                  "failures_file": summary["failures_file"], "results_file": RESULTS_FILE,
                  "summary_file": SUMMARY_FILE, "elapsed_seconds": elapsed,
                  "images_per_second": summary["images_per_s"] or 0.0}
        state = "CANCELLED" if cancelled else "SUCCEEDED"
        await asyncio.to_thread(self.store.finish, job_id, state, result=result)
        log.info("job %s %s: %d done, %d failed, %d skipped", job_id, state.lower(), job.done, job.failed, job.skipped)
        self._notify(job_id)


def _failure_message(exc: BaseException) -> str:
    """A failed job's error: a ``SegsvcError``'s own message (it names no server path), else a pointer to the log."""
    return str(exc) if isinstance(exc, SegsvcError) else "internal error; see the server log"


def _late_write_error(run: _Run, exc: BaseException) -> None:
    """Log the error of an image's write that ended after its run was told to end (``_uninterrupted``).

    The image stays to do (PENDING: skipped by a cancel, redone by the next run). A full volume is not worth a
    warning: the job pauses (its one warning per row of pauses says so) or ends anyway, and a warning per image
    in flight, at every retry of a pause, repeated the pause's warning as if the job were stopping. Nor is an error
    of a run that ends for another image's error: that one pauses or fails the job, and is logged as such.
    """
    if isinstance(exc, _NoSpace):
        log.debug("job %s: an image's write was refused for lack of space as the job's run ended: %s", run.job.id, exc)
    elif run.halted and not run.cancel.is_set():
        log.debug("job %s: an image's write failed as the job's run ended for another image's error: %s",
                  run.job.id, exc)
    else:
        log.warning("job %s: an image's write failed while the job was stopping: %s", run.job.id, exc)


def _unwritable(exc: OSError) -> FailedPrecondition:
    """The job's failure when its output folder refuses writes (not for lack of space, which pauses the job):
    the reason, not the server's paths."""
    return FailedPrecondition(f"cannot write the job's outputs: {exc.strerror or type(exc).__name__}; "
                              "make the output root writable, then submit the job again")


async def _uninterrupted(work: Awaitable[None], late_error: Callable[[BaseException], None]) -> None:
    """Await ``work`` to its end even when the caller is cancelled meanwhile, then pass the cancel on
    (``late_error`` gets what ``work`` raised then, which the cancel replaces).

    An image's write runs on an I/O thread that a cancel cannot stop: a cancelled job (or a
    stopping server) that did not wait for it would find the item PENDING, skip it, and then
    get its files anyway. So the write and its record always finish together (a few ms).
    """
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        while not task.done():
            with contextlib.suppress(asyncio.CancelledError):  # a second cancel (server stop after a cancel)
                await asyncio.wait({task})
        if not task.cancelled() and task.exception() is not None:
            late_error(task.exception())  # type: ignore[arg-type]
        raise


def _confined(root: Path, rel: str) -> tuple[Path, str]:
    """The real root and ``rel`` resolved below it, refusing (as a failed item) a path that a symlink
    swapped in since submission points out.

    The resolved path names no symlink, and ``ImageFile`` opens it without following
    any, so a symlink swapped in after this check fails the read instead of leading out.
    """
    real_root = root.resolve()
    real = confine(real_root, check_rel(rel), rel, what="input")
    if real == real_root:
        raise InvalidArgument(f"input {rel!r} now resolves to the root folder itself, not a file; refused")
    return real_root, real.relative_to(real_root).as_posix()
