"""Training jobs inside the server: train in a child process, evaluate, gate, publish.

A training job is a ``JobStore`` row of kind ``train`` (no items). The server
never imports the trainer: the job runs ``python -m training`` (``torchrun``
for several processes) in its own process group, with its run directory under
``<state_dir>/training/<job_id>/`` and a private candidate repository there.
Its live metadata (epoch, step, loss, learning rate, validation mIoU, ETA)
comes from the trainer's ``events.jsonl``, not from its output, which goes to
``train.log``. Then ``segsvc eval`` (the same code as the command) measures
the candidate and the current default on the dataset's val split and, when one
is registered as ``golden-<model>``, on that golden set (a default with other
classes is not evaluated, and under the ``gate`` policy not replaced);
``segsvc.jobs.gate`` decides and publishes the candidate as a new version with its lineage; a
promoted version becomes the repository's persistent default and the server
swaps to it (``ModelManager.refresh_default``). One the server cannot load is
not promoted after all: DEFAULT goes back to the version served, and the job's
verdict says why (``_switch_default``).

Jobs of one model publish one at a time (a lock per model name; with
``max_training_jobs`` above 1 several may finish together): the check of the
default, the publication and the DEFAULT write of one job never interleave
with another's. The gate compares the candidate with the default fixed when
the evaluation began; if that is no longer the default when the job publishes
(another job promoted its own version meanwhile), the candidate is published
but not promoted, and its verdict says to compare again with a new job. A job
pins the current default in DEFAULT, only when no pointer is there, before its
version appears (resumed with its version published already, before promoting
it), so neither a crash between the steps nor a promotion whose
DEFAULT write fails leaves it served by default while it says "not promoted".

Before its trainer starts (and again on each restart), a job checks every dataset it
uses: still registered, and a dataset registered in place (its files in the data
root, not copied) walked and hashed again (``DatasetRegistry.check_unchanged``): a
link that now leads outside the data root, or other content, fails the job. A file
replaced after that check, while the job trains or evaluates, is not detected.

Artifacts are served through ``artifact_files``: each text artifact (the log,
events, config, metrics, reports) as a scrubbed copy, line by line, with the
server's paths replaced as in job errors (``<job>``, ``<state>``, the dataset by
name); PNGs as they are.

Cancel sends SIGTERM to the process group and SIGKILL after ``kill_grace_s``.
A server that stops (or crashes) leaves the job RUNNING: the next start kills
a trainer group that outlived its server (its id and start time are stored)
and restarts the trainer with ``--resume`` from its last checkpoint. A trainer
killed on its own while the server runs (``kill -9``, the OOM killer, an
operator's ``kill``, a container runtime's SIGTERM) is resumed the same way, at
most ``MAX_TRAINER_RESTARTS`` times a job (``trainer_restarts`` in its
metadata). One rule says what such a death is, for every child
(``signal_death``): killed by SIGTERM, SIGINT, SIGHUP or SIGKILL, with no
handler (a negative exit code) or with 128 + it (the trainer's handler exits
143 on SIGTERM, ``segsvc eval`` 130 on SIGINT); a crash of its own (SIGSEGV,
SIGABRT) is not one. Under torchrun that is the
agent or any one of its workers (``torchrun_death``): an agent stopped by a
signal it handles says so and exits 1, a worker's death makes the agent exit 1
and torchrun's report of its root cause in ``train.log`` names the worker and
its exit code (``worker_death``); a worker that fails by itself fails the job
as a lone trainer does. A trainer that fails without its own error line says
its exit code and the last words of its output (``last_words``), on one line
with no server path. An evaluation child killed so runs again from the start
(it has no checkpoint), at most ``MAX_EVAL_RESTARTS`` times a job. A cancel
already asked for when a child is about to start (a job resumed after a
restart) starts none; one that lands as a phase's last child finishes names
that phase (``_Cancel``). Each phase is idempotent: a finished evaluation (its
``metrics.json``, which ``segsvc eval`` writes last) is not redone, and a
version published just before a crash is found again by its lineage's job id.

Example:
    >>> runner = TrainingRunner(store, manager, datasets, TrainingConfig(state_dir))  # doctest: +SKIP
    >>> await runner.start()  # doctest: +SKIP
    >>> request = TrainingRequest(dataset="shapes", recipe="synthetic-quick", epochs=2)
    >>> job = await runner.submit(request)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

import segsvc
from segsvc.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, SegsvcError
from segsvc.files import write_atomic
from segsvc.inference.manager import ModelManager
from segsvc.jobs import gate
from segsvc.models.artifact import read_manifest
from segsvc.jobs.procgroup import EventTail, GroupProcess, kill_stale_group
from segsvc.jobs.runner import StoreRunner
from segsvc.jobs.store import Job, JobStore
from segsvc.jobs.trainspec import (
    LOG_TAIL_BYTES, MAX_REASON_CHARS, MAX_RECIPE_CHECKS, DatasetRegistry, TrainingConfig, TrainingRequest,
    _root_cause, check_can_train, check_recipe, eval_argv, last_words, log_tail, resolve_submission, trainer_argv,
    trainer_error,
)

__all__ = ["KIND", "TrainingConfig", "TrainingRequest", "TrainingRunner"]

log = logging.getLogger("segsvc.jobs")

KIND = "train"
ARTIFACT_NAMES = ("training_curve.png", "metrics.jsonl", "events.jsonl", "config.yaml")
BINARY_SUFFIXES = (".png",)  # served as they are; every other artifact is text, served scrubbed
SERVED_DIR = ".served"  # <job>/.served/<artifact>: the scrubbed copies the API streams
MAX_LINE_BYTES = 1 << 20  # a longer line of a served text artifact is cut
MAX_TRAINER_RESTARTS = 2  # a trainer killed from outside (the server alive) is resumed this often, at most
MAX_EVAL_RESTARTS = 2  # evaluation children killed from outside (the server alive) are run again this often a job
# torchrun's agent killed by a signal it handles (SIGTERM, SIGINT, SIGHUP): it stops its workers and exits 1, its last
# line this exception (``torch.distributed.elastic.multiprocessing.api.SignalException``).
_AGENT_SIGNAL = re.compile(r"(?:\S+\.)?SignalException: Process \d+ got signal: (?:Signals\.)?(\w+)")
# The signals that end a process from outside: an operator's ``kill``, a container runtime's stop, the OOM killer,
# a hang-up. Killed by one, a child exits with its negative (no handler) or, when a handler stops it cleanly (the
# trainer's 143 on SIGTERM, ``segsvc eval``'s 130 on SIGINT) or a shell or launcher reports it, 128 + it.
_OUTSIDE_SIGNALS = frozenset(int(s) for s in (signal.SIGHUP, signal.SIGINT, signal.SIGKILL, signal.SIGTERM))
# What a job is doing, by phase, as a cancel names it ("cancelled while training", "cancelled before publishing").
_DOING = {"training": "while training", "evaluating": "while evaluating", "publishing": "before publishing"}
# An absolute path in a child's output: not inside a word or a relative path (after ":" too: PYTHONPATH=/a:/b).
_PATH = re.compile(r"(?<![\w<>.~/-])/[^\s'\"(),;:]+")


class _Stop(Exception):
    """The job ends here with this state and message (cancelled, or the trainer failed)."""

    def __init__(self, state: str, message: str) -> None:
        super().__init__(message)
        self.state = state


@dataclass(frozen=True)
class _Rerun:
    """How a kind of child killed from outside (``kill -9``, the OOM killer; the server alive) is started again.

    Its restarts are counted in the job's metadata as ``<key>_restarts`` (at most ``limit`` in the job's life)
    and its last death is ``last_<key>_death``.
    """

    key: str
    limit: int
    who: str  # the child, in words
    doing: str  # what the job does while it runs (a cancel then says "cancelled while ...")
    how: str  # how it starts again


_TRAINER = _Rerun("trainer", MAX_TRAINER_RESTARTS, "the trainer", "training", "from its checkpoint")
# An evaluation has no checkpoint: it simply runs again.
_EVALUATOR = _Rerun("eval", MAX_EVAL_RESTARTS, "an evaluation", "evaluating", "from the start")


class _Cancel(asyncio.Event):
    """A job's cancel flag, which keeps what the job was doing when it was set (``seen``).

    The job keeps ``doing`` current: ``(phase, words)``, as in ``("evaluating", "while evaluating the default")``.
    A cancel that lands as a child finishes is acted on at the job's next check, maybe in its next phase: the job
    then says the phase it was in (``_cancelled``), not the one it had moved on to.
    """

    def __init__(self) -> None:
        super().__init__()
        self.doing: tuple[str, str] = ("", "")
        self.seen: tuple[str, str] | None = None

    def set(self) -> None:
        if not self.is_set():
            self.seen = self.doing
        super().set()


@dataclass
class _Run:
    job: Job
    cancel: asyncio.Event = field(default_factory=_Cancel)
    progress: dict[str, Any] = field(default_factory=dict)
    published_at: float = 0.0


class TrainingRunner(StoreRunner):
    """Accepts, schedules, runs, cancels and deletes training jobs.

    Args:
        store: the durable job state (shared with batch jobs; kind ``train``).
        manager: the served models: the repository to publish into and the default to follow.
        datasets: resolves a dataset name or hash (``get``) to a record with ``spec_path`` and ``sha256``.
        config: where runs live and how many run at once.
    """

    def __init__(self, store: JobStore, manager: ModelManager, datasets: DatasetRegistry | None,
                 config: TrainingConfig) -> None:
        super().__init__(store, KIND, config.max_training_jobs)
        # Set as the server begins to stop (``begin_stop``): a child that dies meanwhile (the service manager's
        # SIGTERM reached the whole group) is no outside death; its job resumes at the next start.
        self.stopping = False
        self.manager = manager
        self.datasets = datasets
        self.config = config
        self._runs: dict[str, _Run] = {}  # type: ignore[assignment]
        # One publish at a time per model (all jobs run in this event loop): the gate's check of the default,
        # the publication and the DEFAULT write of one job never interleave with another's. A lock per model
        # name trained on this server; they are few.
        self._publish_locks: dict[str, asyncio.Lock] = {}
        self._checks = asyncio.Semaphore(MAX_RECIPE_CHECKS)  # trainers' recipe checks at once (``submit``)
        if datasets is not None:  # a dataset a QUEUED or RUNNING job uses is not deleted
            datasets.guard_deletes(self.jobs_using)

    def jobs_using(self, dataset: Any) -> list[str]:
        """The ids of the unfinished (QUEUED, RUNNING) training jobs that train or evaluate on ``dataset``."""
        return [job.id for job in self.store.unfinished(KIND) if dataset.sha256 in _dataset_hashes(job.spec)]

    # -- requests ---------------------------------------------------------------------
    async def submit(self, request: TrainingRequest, request_id: str = "") -> Job:
        """Resolve the dataset, recipe and base model and commit the job; an equal resubmission returns it.

        Equal means the same request under the same ``request_id``, also when the two
        calls race (a client retrying while its first call is still in flight): the
        first to commit wins and the other gets its job, even if its own resolution
        differs (a default version moved in between). A different request under a
        used ``request_id`` raises ``AlreadyExists``; a server whose environment lacks
        the trainer's packages raises ``FailedPrecondition`` (``check_can_train``).
        """

        async def same_request() -> Job | None:
            """The job already submitted under ``request_id`` for this request, if any; another request raises."""
            if not request_id:
                return None
            found = await asyncio.to_thread(self.store.find, KIND, request_id)
            if found is not None and found.spec.get("request") != request.to_dict():
                raise AlreadyExists(f"request_id {request_id!r} was already used for a different training job "
                                    f"({found.id}); use a new request_id to submit another one")
            return found

        existing = await same_request()
        if existing is not None:
            return existing
        if self.datasets is None:
            raise FailedPrecondition("this server has no dataset registry: training jobs are not available")
        check_can_train(self.config)  # else the job would be accepted and its trainer die on import
        spec = await asyncio.to_thread(resolve_submission, request, self.datasets, self.manager.repository,
                                       self.config)
        if self.config.check_recipes:  # what the trainer would refuse is refused now, by the trainer's own code
            await check_recipe(spec, self.config, self._env(),
                               lambda text, folder: self._spec_scrubber(spec, folder)(text), self._checks)
        try:
            job, created = await asyncio.to_thread(self.store.submit, KIND, spec, [],
                                                   request_id=request_id or None)
        except AlreadyExists:  # a concurrent submission with this request_id committed first
            existing = await same_request()
            if existing is None:
                raise
            return existing
        if created:
            await asyncio.to_thread(self.store.set_progress, job.id, {"phase": "queued"})
            log.info("training job %s submitted: %s on %s -> %s", job.id, spec["recipe_name"],
                     spec["dataset"]["name"], spec["model_name"])
            self._wake.set()
        return await asyncio.to_thread(self.store.get, job.id)

    def job_dir(self, job_id: str) -> Path:
        if not job_id.replace("-", "").replace("_", "").isalnum():
            raise InvalidArgument(f"invalid job id {job_id[:80]!r}")
        return Path(self.config.state_dir) / "training" / job_id

    files_dir = job_dir

    def artifact_files(self, job_id: str) -> list[tuple[str, Path]]:
        """``(relative path, path)`` of the files the API serves: the curve, metrics, events, config, log,
        evaluation reports and gate.json.

        A text artifact is served as a copy scrubbed of the server's paths (``_public``, line by line; a line
        over ``MAX_LINE_BYTES`` is cut), written now under ``<job>/.served/``; a PNG is served as it is.
        """
        job = self.store.get(job_id)
        if job.kind != KIND:
            raise InvalidArgument(f"job {job_id} is a {job.kind} job, not a training job")
        scrub = self._scrubber(job)
        served = self.job_dir(job_id) / SERVED_DIR
        return [(rel, path if path.suffix in BINARY_SUFFIXES else _scrubbed_copy(path, served / rel, scrub))
                for rel, path in self._artifact_sources(job)]

    def _artifact_sources(self, job: Job) -> list[tuple[str, Path]]:
        """``(relative path, path)`` of the job's artifacts as the trainer and the evaluator wrote them."""
        root = self.job_dir(job.id)
        run_dir = root / job.spec["run_dir"]
        found = [(name, run_dir / name) for name in ARTIFACT_NAMES]
        found += [("train.log", root / "train.log"), ("gate.json", root / "gate.json")]
        eval_root = root / "eval"
        if eval_root.is_dir():
            found += [(p.relative_to(root).as_posix(), p) for p in sorted(eval_root.rglob("*"))
                      if p.name in ("metrics.json", "report.png")]
        return [(rel, p) for rel, p in found if p.is_file() and not p.is_symlink()]

    # -- one job ---------------------------------------------------------------------------
    async def _run_job(self, job: Job) -> None:
        try:
            started = await self._start(job)
            if started is None:
                return
            job = started
            run = _Run(job, progress=dict(job.progress))
            phase = str(run.progress.get("phase") or "")
            _doing(run, phase, _DOING.get(phase, ""))  # a cancel asked for while the server was down lands here
            await self._register(job.id, run)
            pgid = run.progress.pop("pgid", None)
            if pgid:  # a trainer started by a server that crashed may still be running: stop it first
                await kill_stale_group(int(pgid), run.progress.pop("pgid_start", None), self.config.kill_grace_s)
            candidate = await self._train(run)
            evaluations = await self._evaluate(run, candidate)
            await self._recheck_datasets(run)
            result = await self._publish(run, candidate, evaluations)
            await self._set_phase(run, "done")
            await asyncio.to_thread(self.store.finish, job.id, "SUCCEEDED", result=result)
            log.info("training job %s succeeded: %s", job.id, result["verdict"])
        except asyncio.CancelledError:
            log.info("training job %s interrupted; it resumes when the server starts again", job.id)
            raise
        except _Stop as stop:
            message = self._public(job, str(stop))
            await asyncio.to_thread(self.store.finish, job.id, stop.state, error=message)
            log.info("training job %s %s: %s", job.id, stop.state.lower(), stop)
        except Exception as exc:
            message = (self._public(job, str(exc)) if isinstance(exc, SegsvcError)
                       else "internal error; see the server log")
            log.error("training job %s failed: %s", job.id, message, exc_info=not isinstance(exc, SegsvcError))
            with contextlib.suppress(SegsvcError):
                await asyncio.to_thread(self.store.finish, job.id, "FAILED", error=message)
        self._notify(job.id)

    def _public(self, job: Job, message: str) -> str:
        """``message`` as a client may see it: the job's datasets by name and hash, its base model by name and
        version, its folder as ``<job>``, no other path of the server's state folder or model repository (the
        trainer and the evaluator report their exceptions as they are)."""
        return self._scrubber(job)(message)

    def _scrubber(self, job: Job) -> Callable[[str], str]:
        """What ``_public`` does to a text, with the job's paths looked up once (a served log is many lines)."""
        return self._spec_scrubber(job.spec, self.job_dir(job.id))

    def _spec_scrubber(self, spec: dict[str, Any], job_dir: Path) -> Callable[[str], str]:
        """``_scrubber`` of a job's ``spec`` whose folder is ``job_dir`` (a submission's check has only a spec)."""
        names: dict[str, str] = {}
        for dataset in _datasets_of(spec):
            if not dataset.get("spec_path"):
                continue
            label = f"dataset {dataset.get('name')!r} ({str(dataset.get('sha256'))[:12]})"
            spec_path = Path(dataset["spec_path"])
            names[str(spec_path)] = label
            names[str(spec_path.parent)] = f"<{label}>"
            root = _spec_root(spec_path)
            if root is not None:
                names[str(root)] = f"<{label}>"
        base = spec.get("base") or {}
        if base.get("dir"):  # the version fine-tuned from, as the trainer names it (model.init_from)
            names[str(Path(base["dir"]))] = f"<model {base.get('model')}:{base.get('version')}>"
        for folder, name in ((job_dir, "<job>"), (Path(self.config.state_dir), "<state>"),
                             (Path(self.manager.repository.root), "<model repository>"),
                             (Path(self.config.workdir), "<project>")):
            names.setdefault(str(folder), name)
            names.setdefault(str(folder.resolve()), name)
        order = [(path, names[path]) for path in sorted(names, key=len, reverse=True)
                 if path.strip(os.sep)]  # never the filesystem root

        def scrub(text: str) -> str:
            for path, name in order:
                text = text.replace(path, name)
            return text

        return scrub

    def _check_dataset(self, dataset: dict[str, Any]) -> None:
        """Fail the job, naming the dataset, when its spec is gone (deleted while no check held it)."""
        if not Path(dataset["spec_path"]).is_file():
            raise _gone(dataset)

    def _check_datasets(self, spec: dict[str, Any]) -> None:
        """Before the job's children start: every dataset it uses is still registered, and one registered in
        place is still what was registered (``DatasetRegistry.check_unchanged`` walks and hashes it again; an
        uploaded one only needs its spec). ``_recheck_datasets`` does it again before anything is published."""
        seen: set[str] = set()
        for dataset in _datasets_of(spec):
            if dataset["sha256"] in seen:
                continue
            seen.add(dataset["sha256"])
            self._check_dataset(dataset)
            if self.datasets is None:
                raise _Stop("FAILED", "this server has no dataset registry to check the job's datasets in")
            try:
                self.datasets.check_unchanged(dataset["sha256"])
            except NotFound:
                raise _gone(dataset) from None
            except SegsvcError as exc:
                raise _Stop("FAILED", str(exc)) from None

    async def _recheck_datasets(self, run: _Run) -> None:
        """After training and evaluating, before publishing: the datasets are still what the job started on, so
        the model and its metrics describe the data they name. A file changed while the job ran fails it and
        nothing is published; one changed and put back in between is not seen (the hash is of the contents).
        Once passed it is recorded: a job restarted after that may already have published its version
        (``_place`` finds it again), and a change made since is no longer this job's to report."""
        if run.progress.get("datasets_rechecked"):  # passed before a restart: publishing may have begun since
            return
        try:
            await asyncio.to_thread(self._check_datasets, run.job.spec)
        except _Stop as stop:
            raise _Stop(stop.state, f"{stop}; it changed while this job ran, so nothing was published") from None
        await self._save(run, datasets_rechecked=True)

    async def _set_phase(self, run: _Run, phase: str, **extra: Any) -> None:
        _doing(run, phase, _DOING.get(phase, f"while {phase}"))
        await self._save(run, phase=phase, **extra)

    async def _child(self, run: _Run, argv: list[str], what: str, parent_death_signal: int | None = None) -> int:
        """Run one child to its end, or stop it on cancel; its output goes to train.log.

        A cancel already asked for (a job resumed after a restart) starts no child, and one that lands while its
        group is being stored stops it still held: its command never runs. ``parent_death_signal`` is sent to the
        child if the server dies (``GroupProcess.spawn``; started here, in the event loop's thread).
        """
        _doing(run, str(run.progress.get("phase") or ""), f"while {what}")
        _check_cancel(run, f"while {what}")
        root = self.job_dir(run.job.id)
        child = GroupProcess.spawn(argv, log_path=root / "train.log", cwd=self.config.workdir, env=self._env(),
                                   parent_death_signal=parent_death_signal)
        waiter = asyncio.ensure_future(child.wait())
        cancel = asyncio.ensure_future(run.cancel.wait())
        try:
            # Held until the group is stored: a server killed before this leaves no trainer behind, one killed
            # after has it stopped by the next start (kill_stale_group).
            await self._save(run, pgid=child.pgid, pgid_start=child.start_time)
            _check_cancel(run, f"while {what}")
            child.release()
            while not waiter.done():
                await asyncio.wait({waiter, cancel}, timeout=self.config.progress_interval_s,
                                   return_when=asyncio.FIRST_COMPLETED)
                if cancel.done() and not waiter.done():
                    await child.terminate(self.config.kill_grace_s)
                    raise _cancelled(run, f"while {what}")
                await self._tick(run)
            # What is left of its group (torchrun's workers, when the agent alone was killed) goes before
            # anything else starts, a restarted trainer above all.
            await child.terminate(self.config.kill_grace_s)
            return waiter.result()
        except BaseException:
            await asyncio.shield(child.terminate(self.config.kill_grace_s))  # server stopping: no orphan
            raise
        finally:
            cancel.cancel()
            waiter.cancel()
            run.progress.pop("pgid", None)
            run.progress.pop("pgid_start", None)

    def _env(self) -> dict[str, str]:
        paths = [str(self.config.workdir), *filter(None, [os.environ.get("PYTHONPATH")])]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "NO_ALBUMENTATIONS_UPDATE": "1",
                "PYTHONUNBUFFERED": "1"}

    async def _save(self, run: _Run, **fields: Any) -> None:
        run.progress.update(fields)
        await asyncio.to_thread(self.store.set_progress, run.job.id, _stored(run.progress))

    async def _tick(self, run: _Run) -> None:
        """Fold new trainer events into the job's metadata (written at most every progress interval)."""
        tail: EventTail | None = run.progress.get("_tail")  # type: ignore[assignment]
        if tail is None:
            return
        changed = False
        for event in await asyncio.to_thread(tail.read):
            changed = True
            apply_event(run.progress, event)
        now = time.monotonic()
        if changed and now - run.published_at >= self.config.progress_interval_s:
            run.published_at = now
            await asyncio.to_thread(self.store.set_progress, run.job.id, _stored(run.progress))

    # -- phases -------------------------------------------------------------------------
    async def _train(self, run: _Run) -> Path:
        """Train the candidate (or find the one a trainer finished before a restart); its version folder.

        A trainer killed by a signal from outside the service (``kill -9``, the kernel's OOM killer, an operator's
        SIGTERM: ``signal_death``) while the server lives on is started again, resuming from its last checkpoint
        as after a server restart, at most ``MAX_TRAINER_RESTARTS`` times in the job's life (``trainer_restarts``
        in its metadata). Under torchrun its agent or a worker killed so counts the same (``_trainer_death``): the
        OOM killer picks the process that holds the memory, a worker rather than the agent. A trainer that exits
        with an error of its own fails the job: starting it again would fail the same way.
        """
        spec = run.job.spec
        root = self.job_dir(run.job.id)
        candidate_repo = root / "candidate"
        name = spec["model_name"]
        if not _has_version(candidate_repo / name):
            while True:
                code, log_start = await self._run_trainer(run)
                if code == 0 and _has_version(candidate_repo / name):
                    break
                death = await self._trainer_death(run, code, log_start)
                if death is not None:
                    refused = await self._restart_after_kill(run, death, _TRAINER)
                    if refused is None:
                        continue
                    run.progress["end_reason"] = f"{refused}; see train.log (FetchTrainingArtifacts)"
                raise _Stop("FAILED", f"training failed: {await self._failure_reason(run, code, log_start)}")
        else:  # a trainer finished before a crash (or one the dead server left behind did): its events say how far
            for event in await asyncio.to_thread(EventTail(root / spec["run_dir"] / "events.jsonl").read):
                apply_event(run.progress, event)
            await self._save(run)
        return candidate_repo / name / str(max(_versions(candidate_repo / name)))

    async def _run_trainer(self, run: _Run) -> tuple[int, int]:
        """Start the trainer (resuming from its checkpoint when there is one) and wait for it; ``(exit code, where
        this attempt's output begins in train.log)``."""
        _check_cancel(run, "while training")  # before anything of a new attempt: its count, its dataset checks
        spec = run.job.spec
        root = self.job_dir(run.job.id)
        await asyncio.to_thread(self._check_datasets, spec)  # each start of the trainer, before it runs
        await asyncio.to_thread(_write_text, root / "recipe.yaml", spec["recipe_text"])
        run_dir = root / spec["run_dir"]
        resume = (run_dir / "checkpoints" / "last.pt").is_file()
        argv = trainer_argv(spec, root, self.config, resume=resume)
        tail = EventTail(run_dir / "events.jsonl")
        run.progress["_tail"] = tail
        log_start = await asyncio.to_thread(_size, root / "train.log")  # this attempt's output starts here
        attempts = int(run.progress.get("attempts", 0)) + 1
        run.progress.pop("end_reason", None)  # an earlier attempt's ("terminated") is not why this one fails
        await self._set_phase(run, "training", attempts=attempts)
        log.info("training job %s: starting the trainer (attempt %d%s)", run.job.id, attempts,
                 ", resuming from its checkpoint" if resume else "")
        try:
            code = await self._child(run, argv, "training")
            for event in await asyncio.to_thread(tail.read):
                apply_event(run.progress, event)
        finally:
            run.progress.pop("_tail", None)
        await self._save(run)
        return code, log_start

    async def _trainer_death(self, run: _Run, code: int, log_start: int) -> str | None:
        """How the trainer that exited with ``code`` was killed from outside, in words, or None when it was not:
        the process the server started killed by a signal (``signal_death``: the trainer stopped by SIGTERM exits
        143), or under torchrun (an agent that exits 1) the agent stopped by a signal it handles, or a worker
        killed by one, as this attempt's part of train.log says (``torchrun_death``)."""
        signum = signal_death(code)
        if signum is not None:
            return f"{_TRAINER.who} was {_killed(signum)}"
        if code == 0 or int(run.job.spec["request"].get("nproc_per_node") or 1) <= 1:
            return None
        return await asyncio.to_thread(torchrun_death, self.job_dir(run.job.id) / "train.log", log_start)

    def begin_stop(self) -> None:
        """The server is stopping (``stop`` comes after its drain): no child that dies from now on is restarted
        or counted; its job waits for ``stop``, stays RUNNING and resumes at the next start."""
        self.stopping = True

    async def stop(self) -> None:
        self.begin_stop()
        await super().stop()

    async def _restart_after_kill(self, run: _Run, death: str, child: _Rerun) -> str | None:
        """None when a ``child`` killed from outside (``death``: who was killed and how, in words) is started
        again (its restarts left), recorded in the metadata; else why it is not.

        While the server stops, the signal was most likely the stop's own (systemd and supervisord signal the
        whole group): the job then waits, uncounted, for ``stop`` to end it; it resumes at the next start.
        """
        if run.cancel.is_set():  # a cancel that came as it died: not started again only to be stopped
            raise _cancelled(run, f"while {child.doing}")
        if self.stopping:
            log.info("training job %s: %s while the server stops; it resumes at the next start", run.job.id, death)
            await asyncio.Event().wait()  # until ``stop`` cancels this job's task
        restarts = int(run.progress.get(f"{child.key}_restarts", 0))
        if restarts >= child.limit:
            return f"{death} and had already been restarted {restarts} times {child.how}"
        await self._save(run, **{f"{child.key}_restarts": restarts + 1, f"last_{child.key}_death": death})
        log.warning("training job %s: %s; restarting it %s (restart %d of %d)", run.job.id, death, child.how,
                    restarts + 1, child.limit)
        return None

    async def _failure_reason(self, run: _Run, code: int, log_start: int) -> str:
        """Why the trainer failed: its last event's reason, else its own error line in train.log, else its code
        and the last words of its output (``last_words``: torchrun's agent that failed before any worker ran, as
        when its rendezvous port is taken, says why only there), scrubbed of the server's paths."""
        reason = run.progress.get("end_reason")
        if reason:
            return str(reason)
        log_path = self.job_dir(run.job.id) / "train.log"
        said = await asyncio.to_thread(trainer_error, log_path, log_start)
        if said:  # it stopped before its events began (a bad recipe or override): its own error
            return _clip(self._public(run.job, said), MAX_REASON_CHARS)
        last = await asyncio.to_thread(last_words, log_path, log_start)
        return f"the trainer exited with code {code}" + (f": {self._one_line(run.job, last)}" if last else "")

    def _one_line(self, job: Job, text: str) -> str:
        """A child's own words as a client may read them: the job's paths named (``_public``), any other absolute
        path cut to its last part, on one line, clipped."""
        text = _PATH.sub(lambda m: "..." + m.group(0)[m.group(0).rstrip("/").rfind("/"):],
                         self._public(job, " ".join(text.split())))
        return _clip(text, MAX_REASON_CHARS)

    async def _evaluate(self, run: _Run, candidate: Path) -> dict[str, dict[str, dict[str, float]]]:
        """``{"candidate": {split: metrics}, "default": {split: metrics}}`` via ``segsvc eval`` children."""
        await self._set_phase(run, "evaluating")
        spec = run.job.spec
        root = self.job_dir(run.job.id)
        if "default_version" not in run.progress:  # fixed once, so a resumed job compares the same two
            await self._save(run, default_version=self._current_default(spec["model_name"]))
        default_version = int(run.progress["default_version"] or 0)
        default_dir = None
        if default_version:
            default_dir = self.manager.repository.version_dir(spec["model_name"], default_version)
            mine, theirs = read_manifest(candidate), read_manifest(default_dir)
            if tuple(mine.class_names) != tuple(theirs.class_names):
                log.info("training job %s: default version %d has other classes; not compared", run.job.id,
                         default_version)
                default_dir = None
        results: dict[str, dict[str, dict[str, float]]] = {"candidate": {}, "default": {}}
        for split, dataset in spec["eval_sets"].items():
            for who, model_dir in (("candidate", candidate), ("default", default_dir)):
                if model_dir is None:
                    continue
                out = root / "eval" / f"{who}-{split}"
                if not (out / "metrics.json").is_file():
                    await asyncio.to_thread(self._check_dataset, dataset)
                    argv = eval_argv(self.config, model_dir, dataset["spec_path"], out, spec["request"]["device"])
                    await self._run_eval(run, argv, out, who, split)
                results[who][split] = gate.read_eval_metrics(out)
        await self._save(run)
        return results

    async def _run_eval(self, run: _Run, argv: list[str], out: Path, who: str, split: str) -> None:
        """Run one evaluation child until it writes ``out/metrics.json`` (its last file).

        One killed by a signal from outside the service while the server lives on (``signal_death``, the trainer's
        rule) runs again from the start, as a killed trainer is resumed (``_restart_after_kill``, at most
        ``MAX_EVAL_RESTARTS`` times in the job's life, ``eval_restarts`` in its metadata); one that exits with an
        error of its own fails the job.
        """
        while True:
            # With no checkpoint to resume, an evaluation outliving a killed server is wasted: it stops with it.
            code = await self._child(run, argv, f"evaluating the {who}", parent_death_signal=signal.SIGTERM)
            if code == 0 and (out / "metrics.json").is_file():
                return
            refused, signum = None, signal_death(code)
            if signum is not None:
                refused = await self._restart_after_kill(run, f"{_EVALUATOR.who} was {_killed(signum)}", _EVALUATOR)
                if refused is None:
                    continue
            why = (f": {refused}" if refused else f" (exit code {code})" if code
                   else " (it exited without writing its metrics)")
            raise _Stop("FAILED", f"evaluating the {who} on {split} failed{why}; "
                                  "see train.log (FetchTrainingArtifacts)")

    def _current_default(self, name: str) -> int:
        """The version served by default now (0: the model does not exist yet)."""
        served = self.manager.default_version(name)
        if served:
            return served
        try:
            return self.manager.repository.resolve_version(name, None)
        except NotFound:
            return 0

    async def _publish(self, run: _Run, candidate: Path, results: dict[str, dict[str, dict[str, float]]]
                       ) -> dict[str, Any]:
        await self._set_phase(run, "publishing")
        spec, request = run.job.spec, run.job.spec["request"]
        name = spec["model_name"]
        compared = int(run.progress.get("default_version") or 0)
        rows = gate.compare(results["candidate"], results["default"] or None)
        # A default with other classes was not evaluated: there is a default, but nothing to compare it with.
        promoted, verdict = gate.decide(request["promote"], rows, float(request["gate_margin"]),
                                        has_default=bool(compared))
        lock = self._publish_locks.setdefault(name, asyncio.Lock())
        if lock.locked():
            log.info("training job %s: waiting for another job to finish publishing %s", run.job.id, name)
        async with lock:
            version, promoted, verdict, unserved = await self._place(run, candidate, results, compared, promoted,
                                                                     verdict)
        result = {
            "model": name, "version": version, "promoted": promoted, "verdict": verdict,
            "previous_default": compared, "promote": request["promote"],
            "gate_margin": request["gate_margin"], "comparison": [r.to_dict() for r in rows],
            "metrics": {k: float(v) for k, v in read_manifest(candidate).metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)},
            "epochs": int(run.progress.get("epoch") or 0), "train_seconds": float(run.progress.get("elapsed_s") or 0),
        }
        if unserved:  # promoted by the gate, yet not served: why (the verdict says it too)
            result["serving_error"] = unserved
        await asyncio.to_thread(_write_json, self.job_dir(run.job.id) / "gate.json",
                                {**result, "comparison": [_gate_json_row(r) for r in rows],
                                 "table": gate.format_table(rows)})
        result["artifacts"] = [rel for rel, _ in await asyncio.to_thread(self._artifact_sources, run.job)]
        log.info("training job %s: published %s:%d (%s)", run.job.id, name, version, verdict)
        return result

    async def _place(self, run: _Run, candidate: Path, results: dict[str, dict[str, dict[str, float]]],
                     compared: int, promoted: bool, verdict: str) -> tuple[int, bool, str, str | None]:
        """Publish the candidate and move DEFAULT as decided; ``(version, promoted, verdict, unserved)``, the last
        saying why a version the gate promoted is not served (``_switch_default``), else None.

        Called with the model's publish lock held, so no other job of this server reads or writes the
        model's DEFAULT in between. A ``gate`` decision measured against version ``compared`` stands
        only while that is still the default (the repository's, or the one the server serves);
        otherwise the candidate is not promoted. A cancel is honoured only until the version is published:
        one published before a crash is finished as decided (versions are never deleted). Each step
        survives a crash or a failed write before the next: a job pins the current default before its
        version appears (without a pointer the newest version is served), a version already published
        is found again by its lineage, and a promotion is the last write.
        """
        spec, request = run.job.spec, run.job.spec["request"]
        name, repo = spec["model_name"], self.manager.repository

        def look() -> tuple[int | None, int, int | None]:
            version = gate.find_published(repo, name, run.job.id)
            return version, gate.current_default(repo, name, own=version), repo.default_version(name)

        version, now, pointer = await asyncio.to_thread(look)
        # A cancel stops the job only while nothing is published. A version this job published before a crash
        # is in the repository (and may be served): the job finishes with it rather than deny it.
        if run.cancel.is_set() and version is None:
            raise _cancelled(run, "before publishing")
        if (promoted and request["promote"] == "gate" and now not in (compared, version)
                and not (compared and self.manager.default_version(name) == compared)):
            promoted, verdict = False, gate.moved_verdict(compared, now)
        if now and now != version and pointer != now:
            # No pointer (or one to no complete version): the newest version, soon this one, would be served. A
            # promoted job pins it too, before its version appears: its own DEFAULT write may fail after that,
            # and the job then says "not promoted" while the version served is still the one pinned here. So
            # does a job resumed with its version already published (by a server from before this pin).
            failed = await self._pin(run, name, now)
            if failed and version is None:
                raise _Stop("FAILED", f"the DEFAULT pointer of {name} could not be written ({failed}), so nothing "
                                      "was published; train again once the model repository can be written")
            if failed and not promoted:  # published before the crash: the newest, served with no pointer
                verdict = (f"{verdict}; but DEFAULT could not be pinned to v{now} ({failed}), so version {version}, "
                           "the newest, is served by default until one is set (SetDefaultVersion)")
            elif not failed and version is not None and not promoted:  # this server may serve it as the newest
                await self._follow_pin(run, name)
        if version is None:
            lineage = {
                "job_id": run.job.id, "dataset": {k: spec["dataset"][k] for k in ("name", "sha256")},
                "parent": spec.get("base"), "recipe": spec["recipe_name"], "overrides": list(request["overrides"]),
                "segsvc_version": segsvc.__version__, "metrics": results["candidate"], "gate": verdict,
            }
            path = await asyncio.to_thread(gate.publish_candidate, candidate, repo.root, name, lineage)
            version = int(path.name)
        unserved = await self._switch_default(run, name, version, compared) if promoted else None
        if unserved:
            promoted, verdict = False, f"not promoted: the gate promoted it ({verdict}), but {unserved}"
        return version, promoted, verdict, unserved

    async def _follow_pin(self, run: _Run, name: str) -> None:
        """Make this server serve the DEFAULT just pinned, not the job's version it took for the newest: else it
        serves the version the job says is not promoted until its next poll. A failure is logged; the poll
        follows the pointer later."""
        try:
            await self.manager.refresh_default(name)
        except Exception as exc:
            log.error("training job %s: cannot follow the default of %s: %s", run.job.id, name, _reason(exc))

    async def _pin(self, run: _Run, name: str, version: int) -> str | None:
        """Write DEFAULT = ``version``, the default served now, before the job's own version appears (or before a
        version published before a crash is promoted); None once written, else why not (a full or read-only
        disk). Without the pin the job's version is the newest, served by default whatever the gate decided: one
        not published yet is then not published (``_place``)."""
        try:
            await asyncio.to_thread(self.manager.repository.set_default, name, version)
        except OSError as exc:
            log.error("training job %s: cannot pin DEFAULT of %s to %d: %s", run.job.id, name, version, _reason(exc))
            return _reason(exc)
        return None

    async def _switch_default(self, run: _Run, name: str, version: int, compared: int) -> str | None:
        """Write DEFAULT = ``version`` and make this server serve it; None once it does, else why not.

        A version that does not load here (damaged files, too little memory) or a repository that cannot be read
        or written leaves the server on the version it served. DEFAULT is then put back to that version (else to
        ``compared``, or removed when there is neither): a pointer naming a version that does not load would be
        tried first by every restarted server and replica, which then serve the newest version that loads, maybe
        one the gate turned down. The job finishes with its version published and not promoted, and says why.
        A model unloaded on this server (``UnloadModel``) is not a failure: DEFAULT is followed when it is loaded.
        """
        repo, written = self.manager.repository, False
        try:
            await asyncio.to_thread(repo.set_default, name, version)
            written = True
            served = await self.manager.refresh_default(name)
        except Exception as exc:  # the job ends with its published version either way, never "internal error"
            log.error("training job %s: serving %s:%d failed", run.job.id, name, version,
                      exc_info=not isinstance(exc, (SegsvcError, OSError)))
            reason, served = _reason(exc), self.manager.default_version(name)
            if written and served == version:  # it raised once the server had switched: DEFAULT and server agree
                log.warning("training job %s: %s:%d is served by default all the same", run.job.id, name, version)
                return None
        else:
            if served == version:
                return None
            reason = self.manager.record.reason(name, version)
            if not reason and not served:  # unloaded by an operator: not ours to load; DEFAULT waits for it
                log.info("training job %s: %s is unloaded on this server; DEFAULT names version %d", run.job.id,
                         name, version)
                return None
            reason = reason or f"this server still serves version {served}"
        said = _clip(reason, MAX_REASON_CHARS)
        if not written:
            return await self._unwritten(run, name, version, said)
        where = await self._put_default_back(run, name, version,
                                             next((v for v in (served, compared) if v and v != version), None))
        return self._public(run.job, f"version {version} does not load on this server ({said}), so {where}; "
                                     "SetDefaultVersion once it loads, or train again")

    async def _unwritten(self, run: _Run, name: str, version: int, said: str) -> str | None:
        """After DEFAULT = ``version`` failed to be written: None when ``version`` is the default all the same and
        this server now serves it, else why it is not promoted.

        With no pointer there to write over (a job pins the default before its version appears, so mostly a
        model with no other version, or a repository where the pin failed too) the newest version, this one, is
        the default of every server that starts: this one loads and serves it too (its poller would, later), and
        the job does not say "not promoted" about a version served by default. Otherwise this server follows the
        pointer there is (the job's pin), so it does not serve the version the job says is not promoted.
        """
        default = None
        try:
            default = await asyncio.to_thread(gate.current_default, self.manager.repository, name)
            served = await self.manager.refresh_default(name)
            if default == version and served not in (version, 0):  # 0: unloaded here; loaded with its newest
                await self.manager.load(name)
                served = self.manager.default_version(name)
        except Exception as exc:  # the job ends with its published version either way
            log.error("training job %s: cannot follow the default of %s: %s", run.job.id, name, _reason(exc))
            served = self.manager.default_version(name)
        if served == version and default == version:
            log.warning("training job %s: DEFAULT of %s could not be written (%s); version %d is served as its "
                        "newest version", run.job.id, name, said, version)
            return None
        return self._public(run.job, f"its DEFAULT pointer could not be written ({said})")

    async def _put_default_back(self, run: _Run, name: str, version: int, keep: int | None) -> str:
        """DEFAULT of ``name`` moved from ``version`` (not served) back to ``keep`` (None: removed); where it is
        now, in words."""
        try:
            await asyncio.to_thread(self.manager.repository.set_default, name, keep)
        except Exception as exc:  # what the job says is the truth either way
            log.error("training job %s: cannot put DEFAULT of %s back: %s", run.job.id, name, _reason(exc))
            return f"DEFAULT could not be put back and still names version {version}"
        log.error("training job %s: version %d of %s is not served; DEFAULT is %s", run.job.id, version, name,
                  keep or "removed")
        return f"DEFAULT is back on v{keep}" if keep else "DEFAULT was removed"


def apply_event(progress: dict[str, Any], event: dict[str, Any]) -> None:
    """Fold one trainer event into the job's live metadata."""
    kind = event.get("event")
    pick = {
        "start": ("epochs", "steps_per_epoch", ("start_epoch", "epoch")),
        "step": ("epoch", "step", "steps_per_epoch", "loss", "lr", "images_per_s"),
        "epoch": ("epoch", "epochs", ("train_loss", "loss"), "lr", "images_per_s", "val_miou", "best_miou",
                  "elapsed_s", "eta_s"),
    }.get(kind, ())
    for key in pick:
        src, dst = key if isinstance(key, tuple) else (key, key)
        value = event.get(src)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            progress[dst] = value
    if kind == "step":  # the event counts optimiser steps over the run; metadata shows the step in the epoch
        per_epoch, epoch = int(progress.get("steps_per_epoch") or 0), int(progress.get("epoch") or 1)
        if per_epoch > 0:
            progress["step"] = max(0, min(per_epoch, int(progress.get("step") or 0) - (epoch - 1) * per_epoch))
    elif kind == "epoch":
        progress["step"] = progress.get("steps_per_epoch", progress.get("step", 0))
    if kind == "start":
        progress.pop("end_reason", None)
    elif kind == "end" and event.get("status") != "completed":
        progress["end_reason"] = str(event.get("reason") or "the trainer reported a failure")[:500]


def signal_death(code: int) -> int | None:
    """The signal a child that exited with ``code`` was killed by from outside, or None when it ended by itself.

    One rule for the trainer, torchrun's workers and the evaluations: killed by one of ``_OUTSIDE_SIGNALS``, with no
    handler (a negative code) or through one that a handler or a launcher turned into 128 + it (the trainer exits
    143 on SIGTERM, ``segsvc eval`` 130 on SIGINT; torchrun reports its worker's code as it is). A crash of the
    child's own (SIGSEGV, SIGABRT: a CUDA assert, the NCCL watchdog) is no outside death: running it again would
    crash the same way.
    """
    signum = -code if code < 0 else code - 128
    return signum if signum in _OUTSIDE_SIGNALS else None


def worker_death(log_path: Path, start: int = 0, limit: int = LOG_TAIL_BYTES) -> tuple[int, int] | None:
    """``(rank, signal)`` of the torchrun worker whose death by a signal (``signal_death``) ended the run, as
    torchrun's report of its root cause (``ChildFailedError``) in ``log_path`` from byte ``start`` on says; None
    when the run's first failure was no such death (a worker's own error), or there is no report (the agent itself
    was killed).
    """
    cause = _root_cause(log_tail(log_path, start, limit))
    if cause is None:
        return None
    signum = signal_death(cause[1])
    return None if signum is None else (cause[0], signum)


def torchrun_death(log_path: Path, start: int = 0, limit: int = LOG_TAIL_BYTES) -> str | None:
    """How torchrun's run, whose output from byte ``start`` of ``log_path`` on is this attempt's, was killed from
    outside, in words: its agent stopped by a signal it handles (it stops its workers, says so and exits 1), or a
    worker killed by one (``worker_death``); None when it was not."""
    lines = log_tail(log_path, start, limit)
    last = next((line.strip() for line in reversed(lines) if any(c.isalnum() for c in line)), "")
    found = _AGENT_SIGNAL.fullmatch(last)  # its very last words: a line the trainer printed earlier is no report
    if found:
        name = found.group(1)
        signum = int(name) if name.isdigit() else int(getattr(signal.Signals, name, 0))
        if signum in _OUTSIDE_SIGNALS:
            return f"{_TRAINER.who}'s torchrun agent was {_killed(signum)}"
    cause = _root_cause(lines)
    signum = signal_death(cause[1]) if cause else None
    if cause is None or signum is None:
        return None
    return f"{_TRAINER.who}'s torchrun worker of rank {cause[0]} was {_killed(signum)}"


def _scrubbed_copy(source: Path, dest: Path, scrub: Callable[[str], str]) -> Path:
    """``dest``, written now: ``source`` line by line through ``scrub`` (renamed into place: a fetch streaming
    an earlier copy keeps reading that one)."""
    tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")
    with open(source, "rb") as src:  # first: a job folder deleted meanwhile is not made again
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as out:
                for line in _lines(src, MAX_LINE_BYTES):
                    out.write(scrub(line.decode("utf-8", "surrogateescape")).encode("utf-8", "surrogateescape"))
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
    return dest


def _lines(f: Any, limit: int) -> Iterator[bytes]:
    """The lines of a binary file, each read with at most ``limit`` bytes: a longer one is cut there (back to
    its last whitespace, so no half path is left to escape the scrub) and ends ``[line cut]``."""
    while line := f.readline(limit):
        if len(line) == limit and not line.endswith(b"\n"):
            while (rest := f.readline(limit)) and not rest.endswith(b"\n"):
                pass
            line = line[:max(line.rfind(b" "), line.rfind(b"\t")) + 1] + b"[line cut]\n"
        yield line


def _reason(exc: Exception) -> str:
    """What a client may read of an exception: a domain error's message, an OS error's text, else nothing."""
    if isinstance(exc, SegsvcError):
        return str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return "an internal error; see the server log"


def _check_cancel(run: _Run, words: str) -> None:
    """Stop the job here when it was asked to stop: before a child starts, not once it runs."""
    if run.cancel.is_set():
        raise _cancelled(run, words)


def _cancelled(run: _Run, words: str) -> _Stop:
    """The stop of a job whose cancel is acted on now, while it does ``words`` (``"while training"``) in its current
    phase; a cancel that landed in an earlier phase (as that phase's last child finished) names that phase."""
    seen = getattr(run.cancel, "seen", None)
    if seen and seen[0] in _DOING and seen[0] != run.progress.get("phase"):
        words = seen[1]
    return _Stop("CANCELLED", f"cancelled {words}")


def _doing(run: _Run, phase: str, words: str) -> None:
    """Record what the job does now (``words``, in ``phase``) for a cancel that lands meanwhile (``_Cancel``)."""
    if isinstance(run.cancel, _Cancel):
        run.cancel.doing = (phase, words)


def _killed(signum: int) -> str:
    return f"killed by signal {signum} ({_signal_name(signum)})"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "unknown signal"


def _gone(dataset: dict[str, Any]) -> _Stop:
    return _Stop("FAILED", f"dataset {dataset['name']!r} ({dataset['sha256'][:12]}) is no longer registered on this "
                           "server; register it again and submit a new job")


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _datasets_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The datasets a job's spec trains and evaluates on (``name``, ``sha256``, ``spec_path``)."""
    found = [spec.get("dataset"), *(spec.get("eval_sets") or {}).values()]
    return [dataset for dataset in found if isinstance(dataset, dict)]


def _dataset_hashes(spec: dict[str, Any]) -> set[str]:
    return {str(dataset.get("sha256")) for dataset in _datasets_of(spec)}


def _spec_root(spec_path: Path) -> Path | None:
    """The absolute data folder a dataset spec names (a registered dataset's), if it can be read."""
    try:
        root = (yaml.safe_load(spec_path.read_text()) or {}).get("root")
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    return Path(root) if isinstance(root, str) and Path(root).is_absolute() else None


def _stored(progress: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in progress.items() if not k.startswith("_")}


def _versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return [int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / "manifest.json").is_file()]


def _has_version(model_dir: Path) -> bool:
    return bool(_versions(model_dir))


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode())


def _gate_json_row(row: gate.Comparison) -> dict[str, Any]:
    """One comparison as gate.json says it: ``delta`` is null, not 0, when there was no default to compare with
    (as the table's '-'); the job's result keeps the proto's 0 (``MetricComparison.delta`` is a plain double)."""
    return {**row.to_dict(), "delta": None if row.default is None else row.delta}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    _write_text(path, json.dumps(data, indent=2) + "\n")


