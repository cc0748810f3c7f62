"""Client side of batch and training jobs: handles on long-running operations, uploads (downloads: ``segsvc.downloads``).

``SegmentationClient.submit_job`` returns a ``JobHandle``; ``wait(progress=True)``
follows the operation with ``WaitOperation`` and shows a tqdm bar fed by the
operation's ``JobMetadata`` (on a terminal; in a log, a plain line per
milestone); ``result()`` returns the ``JobResult`` or raises the job's error as
a domain error. ``submit_training_job`` returns a
``TrainingJobHandle``: the same calls, with a bar over epochs that shows the
loss and validation mIoU, a ``TrainingResult`` (the gate's verdict and its
comparison table) and ``fetch`` of the run's artifacts. ``handle_for`` picks
the handle from the operation's metadata type. Like ``segsvc.client`` this
needs only grpc, NumPy and the generated messages.

Example:
    >>> with SegmentationClient("localhost:50051") as client:  # doctest: +SKIP
    ...     job = client.submit_job(["scans/2026-11"], model="membrane", overlay=True)
    ...     job.wait(progress=True)
    ...     print(job.result().done, "images ->", job.result().output_location)
    ...     job.fetch("out/scans")
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Sequence

import grpc
from google.longrunning import operations_pb2
from google.protobuf import duration_pb2

from segsvc.errors import Cancelled, DeadlineExceeded, InvalidArgument
from segsvc.downloads import download
from segsvc.progress import JobBar
from segsvc.v1 import jobs_pb2 as jobs_pb
from segsvc.v1 import training_pb2 as tpb
from segsvc.wire import error_from_status

if TYPE_CHECKING:
    from segsvc.client import SegmentationClient

UPLOAD_CHUNK_BYTES = 1 << 20
WAIT_STEP_S = 1.0  # each WaitOperation call returns at least this often, to refresh the progress bar
STATES = {v: k.removeprefix("JOB_STATE_") for k, v in jobs_pb.JobState.items()}


@dataclass(frozen=True)
class JobStatus:
    """A job's progress, from its operation's ``JobMetadata``."""

    name: str
    state: str
    done_flag: bool
    total: int
    done: int
    failed: int
    skipped: int
    images_per_s: float
    eta_s: float
    model: str
    version: int
    cancel_requested: bool
    error: str = ""  # why a FAILED (or CANCELLED) job ended: the operation's error message
    paused_reason: str = ""  # why a running job waits (its output volume full, its model not taking requests)

    @property
    def processed(self) -> int:
        return self.done + self.failed + self.skipped


@dataclass(frozen=True)
class JobResult:
    """A finished job's response: where the outputs are and what they hold."""

    output_location: str
    total: int
    done: int
    failed: int
    skipped: int
    class_pixel_totals: dict[str, int]
    failures: tuple[tuple[str, str], ...]
    elapsed_s: float
    images_per_s: float
    failures_truncated: bool = False  # more failed than ``failures`` lists: ``failures_file`` lists them all
    failures_file: str = ""  # in the output folder (FetchJobOutputs), one JSON line per failed input


def _status(op: operations_pb2.Operation) -> JobStatus:
    meta = jobs_pb.JobMetadata()
    op.metadata.Unpack(meta)
    return JobStatus(op.name, STATES.get(meta.state, "UNSPECIFIED"), op.done, meta.total, meta.done, meta.failed,
                     meta.skipped, meta.images_per_second, meta.eta_seconds, meta.model, meta.model_version,
                     meta.cancel_requested, _error_of(op), meta.paused_reason)


def _error_of(op: operations_pb2.Operation) -> str:
    """The message of a finished operation's error; "" while it runs or when it succeeded."""
    return op.error.message if op.done and op.HasField("error") else ""


class JobHandle:
    """A submitted job (``jobs/<id>``), followed through the standard Operations service."""

    def __init__(self, client: "SegmentationClient", operation: operations_pb2.Operation) -> None:
        self._client = client
        self.name = operation.name
        self.id = operation.name.removeprefix("jobs/")
        self._op = operation

    def __repr__(self) -> str:
        return f"JobHandle({self.name!r}, state={self.status(refresh=False).state})"

    def status(self, refresh: bool = True) -> JobStatus:
        if refresh and not self._op.done:
            self._op = self._client._ops_call("GetOperation", operations_pb2.GetOperationRequest(name=self.name))
        return _status(self._op)

    def _wait_step(self, step_s: float) -> None:
        """One ``WaitOperation`` of at most ``step_s`` (returns earlier when the job ends)."""
        timeout = duration_pb2.Duration()
        timeout.FromNanoseconds(round(step_s * 1e9))  # whole seconds and nanos below one second, as Duration says
        request = operations_pb2.WaitOperationRequest(name=self.name, timeout=timeout)
        self._op = self._client._ops_call("WaitOperation", request, timeout_s=step_s + 30)

    def _waited(self, deadline: float | None) -> bool:
        """Wait one step for the job; False (without waiting) once it is done or ``deadline`` has passed.

        A step lasts its length even when the server answers earlier with a job still running (WaitOperation
        may, and a proxy or another implementation does): else the next call would follow at once, a loop of
        calls for as long as the job runs.
        """
        if self._op.done:
            return False
        started = time.monotonic()
        step = WAIT_STEP_S if deadline is None else min(WAIT_STEP_S, deadline - started)
        if step <= 0:
            return False
        self._wait_step(step)
        if not self._op.done:
            time.sleep(max(0.0, started + step - time.monotonic()))
        return True

    def _error(self) -> None:
        op = self._op
        if op.HasField("error"):
            if op.error.code == grpc.StatusCode.CANCELLED.value[0]:
                raise Cancelled(f"job {self.id}: {op.error.message}")  # the server's words do not name it
            if op.error.code == grpc.StatusCode.ABORTED.value[0]:  # the job ran and failed
                raise error_from_status(op.error.code, f"job {self.id} failed: {op.error.message}")
            raise error_from_status(op.error.code, op.error.message)

    def wait(self, progress: bool = False, timeout_s: float | None = None) -> JobStatus:
        """Block until the job is done (or ``timeout_s`` passes); a tqdm bar shows its metadata.

        The bar draws on a terminal; in a log, a line per state and per tenth of the images (``JobBar``).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        status = _status(self._op)
        # the bar starts where the job is: its rate is this wait's, not all the job's images over no time at all
        shown = JobBar(progress, total=status.total, initial=status.processed, unit="img", desc=self.id[:8])
        bar = shown.bar
        try:
            while True:
                bar.total = status.total
                bar.n = status.processed
                state = "paused" if status.paused_reason and not status.done_flag else status.state.lower()
                bar.set_postfix(state=state, failed=status.failed, rate=f"{status.images_per_s:.1f}/s", refresh=False)
                shown.show((state, 10 * status.processed // status.total if status.total else 0))
                if not self._waited(deadline):
                    return status
                status = _status(self._op)
        finally:
            shown.close()

    def result(self, timeout_s: float | None = None) -> JobResult:
        """Wait for the job and return its result; a failed or cancelled job raises its error."""
        if not self._op.done:
            self.wait(timeout_s=timeout_s)
        op = self._op
        if not op.done:
            raise DeadlineExceeded(f"job {self.id} is not done after {timeout_s:g} s")
        self._error()
        res = jobs_pb.SegmentationJobResult()
        op.response.Unpack(res)
        return JobResult(res.output_location, res.total, res.done, res.failed, res.skipped,
                         dict(res.class_pixel_totals), tuple((f.input, f.reason) for f in res.failures),
                         res.elapsed_seconds, res.images_per_second, res.failures_truncated, res.failures_file)

    def cancel(self) -> None:
        self._client._ops_call("CancelOperation", operations_pb2.CancelOperationRequest(name=self.name))
        self.status()

    def delete(self, outputs: bool = False) -> int:
        """Forget the finished job (and delete its outputs on the server when asked); returns files removed."""
        response = self._client._job_call("DeleteJob", jobs_pb.DeleteJobRequest(name=self.name, delete_outputs=outputs))
        return int(response.deleted_files)

    def fetch(self, dest: str | os.PathLike, progress: bool = False,
              idle_timeout_s: float | None = None) -> list[Path]:
        """Download every output file into ``dest`` (same relative layout); returns the paths written.

        A server that sends nothing for ``idle_timeout_s`` (default: the client's ``timeout_s``) ends the
        download with ``DeadlineExceeded``; the whole download has no deadline (``download``).
        """
        check_fetch_folder(dest)
        stream = self._client._job_stream("FetchJobOutputs", jobs_pb.FetchJobOutputsRequest(name=self.name))
        return download(stream, dest, progress, self._idle_limit(idle_timeout_s))

    def _idle_limit(self, idle_timeout_s: float | None) -> float | None:
        return self._client.timeout_s if idle_timeout_s is None else idle_timeout_s


def check_fetch_folder(dest: str | os.PathLike, named: str = "") -> None:
    """Refuse, before any call, a fetch into a path that cannot be a folder: a file, or a path below one.

    Else the download fails on its first file's temporary (``NotADirectoryError`` naming
    ``.class_shares.png.<hex>.part-...``, a name the user never gave). ``named``: how the user gave ``dest``
    (``--out out.png``); by default the path itself.
    """
    path = Path(dest)
    named = named or os.fspath(dest)
    for folder in (path, *path.parents):
        if not folder.exists():  # made by the download
            continue
        if folder.is_dir():
            return
        if folder == path:
            raise InvalidArgument(f"{named} is a file, not a folder: fetch into a folder (it is made if missing)")
        raise InvalidArgument(f"{named} is below {os.fspath(folder)}, which is a file, not a folder: fetch into a "
                              "folder (it is made if missing)")


def path_list(paths: str | os.PathLike | Iterable[str | os.PathLike], what: str) -> list[str | os.PathLike]:
    """``paths`` as a list, where a single ``str`` or ``os.PathLike`` is one path.

    A ``str`` is itself iterable: taken as a list, ``"shapes/images"`` would be 13 paths of one character each
    ("input 's' matches no image"). ``what`` names the argument in the ``InvalidArgument`` for anything else
    (bytes, a number, a list holding one).
    """
    if isinstance(paths, (str, os.PathLike)):
        return [paths]
    if isinstance(paths, (bytes, bytearray, memoryview)) or not isinstance(paths, Iterable):
        raise InvalidArgument(f"{what} is a path or a list of paths (str or os.PathLike), got "
                              f"{type(paths).__name__}")
    items = list(paths)
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise InvalidArgument(f"{what} holds {item!r}: paths are str or os.PathLike, not {type(item).__name__}")
    return items


def upload_files(files: Sequence[Path], root: Path | None) -> Iterator[jobs_pb.UploadImagesRequest]:
    """Chunks of each file, named relative to ``root`` (or by file name), with the SHA-256 on the last one."""
    for path in files:
        name = path.relative_to(root).as_posix() if root is not None else path.name
        digest = hashlib.sha256()
        offset = 0
        with open(path, "rb") as f:
            while True:
                data = f.read(UPLOAD_CHUNK_BYTES)
                digest.update(data)
                last = len(data) < UPLOAD_CHUNK_BYTES
                yield jobs_pb.UploadImagesRequest(name=name, offset=offset, data=data, last=last,
                                                  sha256=digest.hexdigest() if last else "")
                offset += len(data)
                if last:
                    break


def local_images(paths: str | os.PathLike | Iterable[str | os.PathLike]) -> tuple[list[Path], Path | None]:
    """Image files to upload (``paths``: one path or a list) and the folder their names are relative to (one
    folder: that folder); none is an error (``client.no_images``)."""
    from segsvc.client import IMAGE_SUFFIXES, image_files, no_images

    typed = path_list(paths, "the files to upload")
    given = [Path(p) for p in typed]
    files = image_files(given)
    if not files:
        raise no_images(typed)
    # a job takes the images of an upload by their suffix, as it walks a folder: another file named here would be
    # sent and then left out without a word (the job's only file: "input '.' matches no image under the data root")
    others = [os.fspath(p) for p in given if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES]
    if others:
        raise InvalidArgument(f"{others[0]} is not an image file: jobs take {', '.join(IMAGE_SUFFIXES)} files")
    if len(given) == 1 and given[0].is_dir():
        return files, given[0]
    names = [f.name for f in files]
    if len(set(names)) != len(names):
        raise InvalidArgument("uploaded files need distinct names; upload one folder to keep relative paths")
    return files, None


# -- training jobs ---------------------------------------------------------------------------
PHASES = {v: k.removeprefix("TRAINING_PHASE_").lower() for k, v in tpb.TrainingPhase.items()}
POLICY_NAMES = {v: k.removeprefix("PROMOTE_POLICY_").lower() for k, v in tpb.PromotePolicy.items()}


@dataclass(frozen=True)
class TrainingStatus:
    """A training job's progress, from its operation's ``TrainingJobMetadata``."""

    name: str
    state: str
    done_flag: bool
    phase: str
    epoch: int
    epochs: int
    step: int
    steps_per_epoch: int
    loss: float
    lr: float
    val_miou: float
    best_miou: float
    images_per_s: float
    eta_s: float
    elapsed_s: float
    dataset: str
    model: str
    base_model: str
    recipe: str
    attempts: int
    cancel_requested: bool
    error: str = ""  # why a FAILED (or CANCELLED) job ended: the operation's error message
    trainer_restarts: int = 0  # the trainer was killed from outside and resumed from its checkpoint this often
    eval_restarts: int = 0  # an evaluation killed so was run again this often

    @property
    def shown_phase(self) -> str:
        """The phase as a person reads it: the server's phase is ``done`` for every end, and a cancelled or failed
        job read "train done" (its progress, "phase=done", just before the error)."""
        return self.state.lower() if self.done_flag and self.state in ("CANCELLED", "FAILED") else self.phase

    @property
    def started(self) -> bool:
        """Whether the trainer has reported a step: before it, epoch, step and loss are only the message's zeros."""
        return self.epoch > 0 or self.step > 0

    @property
    def fraction(self) -> float:
        """Share of the planned steps done (0..1)."""
        if self.epochs <= 0:
            return 0.0
        within = self.step / self.steps_per_epoch if self.steps_per_epoch > 0 else 0.0
        return min(1.0, (max(self.epoch - 1, 0) + within) / self.epochs)


@dataclass(frozen=True)
class MetricRow:
    split: str
    metric: str
    candidate: float
    default: float | None
    delta: float


@dataclass(frozen=True)
class TrainingResult:
    """A finished training job: the published version, whether it became the default, and why."""

    model: str
    version: int
    promoted: bool
    verdict: str
    previous_default: int
    promote: str
    gate_margin: float
    comparison: tuple[MetricRow, ...]
    metrics: dict[str, float]
    epochs: int
    train_seconds: float
    artifacts: tuple[str, ...]

    def table(self) -> str:
        """The comparison, candidate against default, per split and metric."""
        lines = [f"{'split':8} {'metric':20} {'candidate':>10} {'default':>10} {'delta':>9}"]
        for r in self.comparison:
            default = "-" if r.default is None else f"{r.default:.4f}"
            delta = "-" if r.default is None else f"{r.delta:+.4f}"
            lines.append(f"{r.split:8} {r.metric:20} {r.candidate:>10.4f} {default:>10} {delta:>9}")
        return "\n".join(lines)


def _training_status(op: operations_pb2.Operation) -> TrainingStatus:
    m = tpb.TrainingJobMetadata()
    op.metadata.Unpack(m)
    return TrainingStatus(op.name, STATES.get(m.state, "UNSPECIFIED"), op.done, PHASES.get(m.phase, "unspecified"),
                          m.epoch, m.epochs, m.step, m.steps_per_epoch, m.loss, m.learning_rate, m.val_miou,
                          m.best_miou, m.images_per_second, m.eta_seconds, m.elapsed_seconds, m.dataset, m.model,
                          m.base_model, m.recipe, m.attempts, m.cancel_requested, _error_of(op),
                          m.trainer_restarts, m.eval_restarts)


class TrainingJobHandle(JobHandle):
    """A submitted training job (``jobs/<id>``): progress over epochs, the gate's result, the run's artifacts."""

    def status(self, refresh: bool = True) -> TrainingStatus:  # type: ignore[override]
        if refresh and not self._op.done:
            self._op = self._client._ops_call("GetOperation", operations_pb2.GetOperationRequest(name=self.name))
        return _training_status(self._op)

    def wait(self, progress: bool = False, timeout_s: float | None = None) -> TrainingStatus:  # type: ignore[override]
        """Block until the job is done (or ``timeout_s`` passes); the bar shows epochs, loss and val mIoU.

        The bar draws on a terminal; in a log, a line per state, phase and epoch (``JobBar``).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        status = _training_status(self._op)
        shown = JobBar(progress, total=1000, desc=self.id[:8])
        bar = shown.bar
        try:
            while True:
                bar.n = round(1000 * (1.0 if status.state == "SUCCEEDED" else status.fraction))
                # before its first epoch a time-budgeted run cannot know how many epochs fit
                planned = status.epochs if status.epoch else "?"
                postfix = {"phase": status.shown_phase, "epoch": f"{status.epoch}/{planned}"}
                if status.loss:
                    postfix["loss"] = f"{status.loss:.4f}"
                if status.val_miou:
                    postfix["val_mIoU"] = f"{status.val_miou:.4f}"
                if status.eta_s and not status.done_flag:
                    postfix["eta"] = f"{status.eta_s:.0f}s"
                # the text after the bar (tqdm's own postfix would begin with ", ")
                text = ", ".join(f"{k}={v}" for k, v in postfix.items()).replace("{", "{{").replace("}", "}}")
                bar.bar_format = "{l_bar}{bar}| " + text
                shown.show((status.state, status.phase, status.epoch))
                if not self._waited(deadline):
                    return status
                status = _training_status(self._op)
        finally:
            shown.close()

    def result(self, timeout_s: float | None = None) -> TrainingResult:  # type: ignore[override]
        """Wait for the job and return the gate's result; a failed or cancelled job raises its error."""
        if not self._op.done:
            self.wait(timeout_s=timeout_s)
        if not self._op.done:
            raise DeadlineExceeded(f"job {self.id} is not done after {timeout_s:g} s")
        self._error()
        r = tpb.TrainingJobResponse()
        self._op.response.Unpack(r)
        rows = tuple(MetricRow(c.split, c.metric, c.candidate, c.default if c.HasField("default") else None, c.delta)
                     for c in r.comparison)
        return TrainingResult(r.model, r.version, r.promoted, r.verdict, r.previous_default,
                              POLICY_NAMES.get(r.promote, "gate"), r.gate_margin, rows, dict(r.metrics), r.epochs,
                              r.train_seconds, tuple(r.artifacts))

    def fetch(self, dest: str | os.PathLike, progress: bool = False,
              idle_timeout_s: float | None = None) -> list[Path]:
        """Download the training curve, metrics, events, log, evaluation reports and gate.json into ``dest``
        (``idle_timeout_s`` as in ``JobHandle.fetch``)."""
        check_fetch_folder(dest)
        stream = self._client._training_stream("FetchTrainingArtifacts",
                                               tpb.FetchTrainingArtifactsRequest(name=self.name))
        return download(stream, dest, progress, self._idle_limit(idle_timeout_s))


def handle_for(client: "SegmentationClient", op: operations_pb2.Operation) -> JobHandle:
    """The handle that matches the operation's kind (training or batch)."""
    if op.metadata.Is(tpb.TrainingJobMetadata.DESCRIPTOR):
        return TrainingJobHandle(client, op)
    return JobHandle(client, op)
